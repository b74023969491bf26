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
    namespace = {"__name__": "readme_example"}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)
    assert out.getvalue().strip() == "torch.Size([2, 10])"
    layer, old = namespace["model"].layer4[1].conv2, namespace["old"]
    assert type(layer).__name__ == "CondConv2d" and layer.num_kernels == 4
    assert layer.bias is None and layer.weight.shape == (4, *old.weight.shape)


def test_readme_conversion_preserves_the_function():
    """The ``from_conv2d`` call after the example computes ``old``'s function."""
    import torch

    call = re.search(r"`(CondConv2d\.from_conv2d\(old, [^`]*\))`", README)
    assert call, "README.md no longer shows CondConv2d.from_conv2d"
    code = _block_after("<!-- readme-example", "python")
    namespace = {"__name__": "readme_example"}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, "README.md", "exec"), namespace)
    old = namespace["old"].eval()
    layer = eval(call.group(1), namespace)
    assert type(layer).__name__ == "CondConv2d" and not layer.training
    x = torch.randn(2, 512, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), old(x), rtol=1e-4, atol=1e-5)


def test_readme_names_no_removed_api():
    """Keywords and methods the operators no longer have do not appear."""
    for removed in (
        "num_experts",
        "kernel_num",
        "min_channel",
        "update_temperature",
        "offsets_and_mask",
        "attention_hidden_width",
    ):
        assert removed not in README, removed


def test_ci_runs_the_readme_test_command():
    """``.ci/run`` passes pytest the same options as the README's test command."""
    readme = next(
        line
        for line in README.splitlines()
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
