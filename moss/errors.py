"""How a ``moss`` command reports bad input: one line and exit status 1, never a traceback."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def input_errors(command: str):
    """Around a command's input stage: a missing file, malformed data or checkpoint, or an
    unusable backend ends the command with its message (exit status 1), not a traceback.
    Errors after the input stage keep their traceback."""
    from moss_kernels import BackendUnavailableError

    try:
        yield
    except (OSError, ValueError, TypeError, BackendUnavailableError) as exc:
        raise SystemExit(f"moss {command}: {exc}") from None
