"""Serve the ``refimpl`` wheel and a zip of the executed chapters with the site.

After an HTML build, ``_build/html/downloads/`` holds

- ``refimpl-<version>-py3-none-any.whl``, built from the repository with the
  environment's own setuptools (nothing is downloaded), so that a reader with a
  single notebook can ``pip install`` the package it imports;
- ``dynamic-convolution-notebooks.zip``: every chapter notebook with its stored
  outputs, as the site shows them, together with what they need to run:
  ``refimpl``, ``pyproject.toml`` and ``requirements.txt`` (unzip, then
  ``pip install -r requirements.txt`` in the folder).

The setup page links to both; the site test checks that the links resolve.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

NOTEBOOKS_ZIP = "dynamic-convolution-notebooks.zip"


def wheel_name(root: pathlib.Path) -> str:
    """``refimpl-<version>-py3-none-any.whl``, the version from pyproject.toml."""
    text = (root / "pyproject.toml").read_text("utf-8")
    version = re.search(r'^version = "([^"]+)"', text, re.M).group(1)
    return f"refimpl-{version}-py3-none-any.whl"


def build_wheel(root: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    with tempfile.TemporaryDirectory() as tmp:
        source = pathlib.Path(tmp) / "source"
        source.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE"):
            shutil.copy2(root / name, source / name)
        shutil.copytree(
            root / "refimpl",
            source / "refimpl",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
            + ["--disable-pip-version-check", "--wheel-dir", str(target), str(source)],
            capture_output=True,
            text=True,
            cwd=tmp,
        )
    if result.returncode != 0:
        raise ExtensionError(f"building the refimpl wheel failed:\n{result.stderr}")
    wheel = target / wheel_name(root)
    if not wheel.is_file():
        raise ExtensionError(f"the refimpl wheel is not {wheel.name}")
    return wheel


def zip_notebooks(root: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
    archive = target / NOTEBOOKS_ZIP
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for notebook in sorted((root / "chapters").glob("*.ipynb")):
            zf.write(notebook, f"dynamic-convolution/chapters/{notebook.name}")
        for name in ("requirements.txt", "pyproject.toml", "README.md", "LICENSE"):
            zf.write(root / name, f"dynamic-convolution/{name}")
        for module in sorted((root / "refimpl").glob("*.py")):
            zf.write(module, f"dynamic-convolution/refimpl/{module.name}")
    return archive


def _build(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    root = pathlib.Path(app.srcdir)
    target = pathlib.Path(app.outdir) / "downloads"
    target.mkdir(parents=True, exist_ok=True)
    build_wheel(root, target)
    zip_notebooks(root, target)


def setup(app: Sphinx) -> dict:
    app.connect("build-finished", _build)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
