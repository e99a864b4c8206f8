"""Checkpoint I/O: adapter folders and training-run checkpoints, written so that an
interruption at any file-system step leaves something whole (tests interrupt every step).

Adapter folder (``MossModel.save_pretrained`` / ``from_pretrained``): ``moss_adapter.safetensors``
(the adapter tensors only) and ``moss_config.json`` (the MossConfig with a format version, the
wrapped layers' names, and the weights file's SHA-256). Two files cannot be replaced at once, so
one rename commits: the config's, which names the weights by hash. New weights are written first
under :data:`PENDING_NAME`, the config is replaced (the commit), then the weights are renamed into
place. Interrupted before the commit, the folder still holds the previous pair; after it, the
loader finds the weights the config names in the pending file. Every file is written to a
temporary name in the same folder, flushed, fsynced and renamed (and the folder fsynced).

A PEFT adapter folder (``PeftModel.save_pretrained`` of a MOSS adapter, moss/peft_method.py:
``adapter_config.json`` and ``adapter_model.safetensors``, keys prefixed ``base_model.model.``)
loads here too, without PEFT installed; PEFT writes it in place, with no hash to tell a torn
save (docs/design.md section 9).

Run checkpoint (``moss train``): ``<out>/checkpoint-<step>/`` holds an adapter folder plus
``trainer_state.pt``; it is written as a temporary folder renamed into place, then named in
``<out>/latest`` (written atomically), and only then is the previous checkpoint removed. So a
crash leaves ``latest`` naming a whole checkpoint, old or new.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch

from .config import MossConfig

WEIGHTS_NAME = "moss_adapter.safetensors"
CONFIG_NAME = "moss_config.json"
#: New weights wait under this name until the config naming them is committed.
PENDING_NAME = ".moss_adapter.safetensors.pending"
TRAINER_STATE_NAME = "trainer_state.pt"
LATEST_NAME = "latest"
#: PEFT's adapter folder: its file names, the ``peft_type`` of a MOSS adapter, and the prefix
#: PEFT puts before every key (the PeftModel's path to the backbone).
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPE = "MOSS"
PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------- adapter folders
def save_adapter(folder: str | os.PathLike, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` and ``meta`` (plus the weights' SHA-256) as an adapter folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    pending = atomic_write(folder / PENDING_NAME, lambda f: save_file(tensors, f))
    meta = {**meta, "weights_sha256": sha256(pending)}
    atomic_write(folder / CONFIG_NAME,
                 lambda f: Path(f).write_text(json.dumps(meta, indent=2) + "\n"))
    os.replace(pending, folder / WEIGHTS_NAME)
    fsync_dir(folder)


def load_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """``(meta, tensors, weights file read)`` of an adapter folder, every file-level fault
    refused before anything else is looked at: missing files,
    a config that is not JSON or not written by :func:`save_adapter`, weights whose hash differs
    from the config's, that are not safetensors, or that hold NaN, Inf or non-float values.
    A PEFT folder of a MOSS adapter (:func:`_load_peft_adapter`) is read as the same triple."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a folder path (str or os.PathLike), got "
                        f"{type(path).__name__}")
    folder = Path(path)
    if folder.is_file():
        raise FileNotFoundError(f"path: {folder} is a file; expected the adapter folder "
                                f"(holding {CONFIG_NAME} and {WEIGHTS_NAME})")
    if not (folder / CONFIG_NAME).is_file() and (folder / PEFT_CONFIG_NAME).is_file():
        return _load_peft_adapter(folder)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file() and not (
                name == WEIGHTS_NAME and (folder / PENDING_NAME).is_file()):
            raise FileNotFoundError(f"path: {folder / name} does not exist (a MOSS adapter "
                                    f"folder holds {CONFIG_NAME} and {WEIGHTS_NAME}, or PEFT's "
                                    f"{PEFT_CONFIG_NAME} and {PEFT_WEIGHTS_NAME})")
    meta = _read_json(folder / CONFIG_NAME)
    digest = meta.pop("weights_sha256", None)
    if digest is None:
        raise ValueError(f"{folder / CONFIG_NAME}: no weights_sha256 (not written by "
                         f"save_pretrained)")
    weights = _committed_weights(folder, digest)
    return meta, _read_weights(weights), weights


def _load_peft_adapter(folder: Path) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """A PEFT folder as :func:`load_adapter`'s triple: the config's MossConfig fields, the
    tensors keyed as ``MossModel.adapter_state_dict`` (PEFT's prefix removed). PEFT records no
    hash of its weights, so a save torn between its two files cannot be told here."""
    meta = _read_json(folder / PEFT_CONFIG_NAME)
    if meta.get("peft_type") != PEFT_TYPE:
        raise ValueError(f"{folder / PEFT_CONFIG_NAME}: a PEFT adapter of type "
                         f"{meta.get('peft_type')!r}, not a MOSS adapter ({PEFT_TYPE!r})")
    weights = folder / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"path: {weights} does not exist (PEFT writes it when saving "
                                f"with safe_serialization=True, its default)")
    tensors = _read_weights(weights)
    foreign = sorted(k for k in tensors if not k.startswith(PEFT_PREFIX))
    if foreign:
        raise ValueError(f"{weights}: keys {foreign[:5]} lack PEFT's prefix {PEFT_PREFIX!r}")
    own = {f.name for f in fields(MossConfig)} | {"format_version"}
    return ({k: v for k, v in meta.items() if k in own},
            {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}, weights)


def _read_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _read_weights(weights: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(weights)
    except SafetensorError as exc:
        raise ValueError(f"{weights}: not a safetensors file ({exc})") from None
    check_finite(tensors)
    return tensors


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    """Refuse adapter tensors holding NaN, Inf or non-float values (what a diverged run saves)."""
    for key, value in tensors.items():
        if not value.is_floating_point() or not bool(value.isfinite().all()):
            raise ValueError(f"{key}: the file holds NaN, Inf or non-float values (a diverged "
                             f"run?)")


def _committed_weights(folder: Path, digest: str) -> Path:
    """The weights file whose SHA-256 the config names: WEIGHTS_NAME, or PENDING_NAME when a
    save was interrupted after committing the config but before renaming the weights."""
    for name in (WEIGHTS_NAME, PENDING_NAME):
        if (folder / name).is_file() and sha256(folder / name) == digest:
            return folder / name
    raise ValueError(f"{folder / WEIGHTS_NAME}: its SHA-256 does not match the one in "
                     f"{CONFIG_NAME} (a truncated, corrupted or mismatched file)")


# ---------------------------------------------------------------------- run checkpoints
def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint folder ``<out>/latest`` names; None without a ``latest``. A ``latest``
    that names no folder directly inside ``out`` (empty, a path) was not written here: refused."""
    latest = out / LATEST_NAME
    if not latest.is_file():
        return None
    name = latest.read_text().strip()
    if not name or name in (".", "..") or Path(name).name != name:
        raise ValueError(f"{latest}: names {name!r}, not a checkpoint folder in {out} (not "
                         f"written by moss train)")
    return out / name


def save_run_checkpoint(out: Path, step: int, save_adapter_to: Callable[[Path], None],
                        trainer_state: dict) -> Path:
    """``<out>/checkpoint-<step>/``: the adapter (``save_adapter_to(folder)``) and the trainer
    state, committed by naming it in ``latest``; then the previous checkpoint goes."""
    target = out / f"checkpoint-{step}"
    try:
        previous = latest_checkpoint(out)
    except ValueError:  # a `latest` written by someone else: replaced, nothing removed
        previous = None
    if previous == target:
        # The committed checkpoint of this very step (a resumed run saving at once): exact
        # resume makes it identical, and replacing it would leave `latest` naming a folder
        # that is briefly absent.
        return target
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter_to(tmp)
    atomic_write(tmp / TRAINER_STATE_NAME, lambda f: torch.save(trainer_state, f))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    atomic_write(out / LATEST_NAME, lambda f: Path(f).write_text(target.name))
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    return target


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / TRAINER_STATE_NAME, weights_only=False)


# ---------------------------------------------------------------------- file-system steps
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(target: Path, write: Callable[[str], object]) -> Path:
    """``write(tmp_path)`` into a temporary file beside ``target``, fsync, rename over it (and
    fsync the folder, so that the rename itself survives a power cut)."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def fsync_dir(folder: Path) -> None:
    if os.name == "posix":  # Windows cannot open a folder for fsync; its renames are journaled
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
