"""The README's two set-up commands, and CI running the second one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_two_commands_and_ci_runs_the_second():
    install_and_bench, install_and_test = _commands()[:2]
    assert install_and_bench.endswith("&& moss bench")
    assert install_and_test.endswith("&& python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert install_and_test in ci
    assert (ROOT / ".ci" / "run").stat().st_mode & 0o111, ".ci/run must be executable"


def test_readme_usage_example_runs(capsys):
    # The first example (the kernel API) is self-contained; the second sketches the moss/
    # layer around a model the reader brings, and tests/test_moss_model.py covers it.
    example = re.findall(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S)[0]
    exec(compile(example, "README.md", "exec"), {})
    assert capsys.readouterr().out.split() == ["tensor([[1,", "2,", "2],", "[5,", "2,", "2]])"]
