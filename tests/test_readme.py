"""The README's example and test command are the ones that work."""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import shlex

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _block_after(marker: str, language: str) -> str:
    match = re.search(
        rf"{re.escape(marker)}.*?\n```{language}\n(.*?)\n```", README, flags=re.S
    )
    assert match, f"README.md has no ```{language} block after {marker!r}"
    return match.group(1)


def test_readme_example_runs():
    """The ``refimpl`` example swaps a layer of a ResNet-18 and prints the shape."""
    code = _block_after("<!-- readme-example", "python")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    assert out.getvalue().strip() == "torch.Size([2, 10])"


def test_ci_runs_the_readme_test_command():
    """``.ci/run`` passes pytest the same options as the README's test command."""
    readme = next(
        line for line in README.splitlines()
        if line.startswith("python -m pytest") and "--nbval" in line
    )
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    body = re.search(r"run_tests\(\) \{\n(.*?)\n\}", ci, flags=re.S).group(1)
    ci_args = shlex.split(body.replace("\\\n", " "))
    readme_args = shlex.split(readme)[3:]  # after "python -m pytest"
    dropped = ("pytest_strict", "-p", "no:cacheprovider")
    ci_args = [a for a in ci_args if a not in dropped]
    ci_args = ["2" if a == '"$WORKERS"' or a == "$WORKERS" else a for a in ci_args]
    assert ci_args == readme_args
