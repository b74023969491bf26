"""Launching a chapter elsewhere: Colab and Binder buttons, and installing refimpl.

The repository URL is set once, in ``_config.yml``. These tests build the site
with a URL set (into a temporary folder) and check that every chapter links to its
own notebook on Colab and on Binder; and they run the install part of every
chapter's set-up cell the way a reader without ``refimpl`` meets it: it must say
exactly what to install, and on Colab install it.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import types

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "chapters").glob("*.ipynb"))
URL = "https://github.com/example-org/dynamic-convolution"
sys.path.insert(0, str(ROOT / "book" / "tools"))

import sync_repository_url  # noqa: E402


def _install_part(path: pathlib.Path) -> str:
    """The set-up cell up to the end of its refimpl install block."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    source = "".join(next(c for c in nb["cells"] if c["cell_type"] == "code")["source"])
    end = source.find(") from None\n")
    assert end > 0, f"{path.name}: the set-up cell does not install refimpl"
    return source[: end + len(") from None\n")]


def _run(code: str, monkeypatch, colab: bool):
    monkeypatch.setitem(sys.modules, "refimpl", None)  # import refimpl now fails
    if colab:
        monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("colab"))
    else:
        monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda args, **kw: calls.append(args))
    exec(compile(code, "set-up cell", "exec"), {})
    return calls


def test_notebooks_carry_the_configured_url():
    """``book/tools/sync_repository_url.py --check`` passes."""
    assert sync_repository_url.main(["--check"]) == 0


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_setup_cell_says_how_to_install_refimpl(path, monkeypatch):
    code = _install_part(path)
    assert 'REPOSITORY = "' in code
    # no URL configured: a clone with requirements.txt
    unset = sync_repository_url.LINE.sub('REPOSITORY = ""', code)
    with pytest.raises(ModuleNotFoundError, match=r"pip install -r requirements\.txt"):
        _run(unset, monkeypatch, colab=False)
    # a URL configured: pip install git+URL, which Colab runs by itself
    with_url = sync_repository_url.LINE.sub(f'REPOSITORY = "{URL}"', code)
    with pytest.raises(ModuleNotFoundError, match=rf"pip install git\+{URL}\n"):
        _run(with_url, monkeypatch, colab=False)
    calls = _run(with_url, monkeypatch, colab=True)
    assert calls and calls[0][-3:] == ["install", "-q", f"git+{URL}"]


def test_chapters_link_to_colab_and_binder(tmp_path):
    """Built with a repository URL, every chapter has both launch buttons."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    config["repository"]["url"] = URL
    extensions = config["sphinx"]["local_extensions"]
    for name, folder in extensions.items():  # relative to the config file
        extensions[name] = str(ROOT / folder)
    (tmp_path / "_config.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    build = subprocess.run(
        [
            str(pathlib.Path(sys.executable).with_name("jupyter-book")),
            "build",
            str(ROOT),
            "--config",
            str(tmp_path / "_config.yml"),
            "--path-output",
            str(tmp_path / "out"),
            "--warningiserror",
            "--nitpick",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    html = tmp_path / "out" / "_build" / "html"
    for notebook in NOTEBOOKS:
        name = notebook.relative_to(ROOT).as_posix()
        page = (html / name).with_suffix(".html").read_text(encoding="utf-8")
        colab = f"https://colab.research.google.com/github/example-org/dynamic-convolution/blob/main/{name}"
        binder = f"https://mybinder.org/v2/gh/example-org/dynamic-convolution/main?urlpath=lab/tree/{name}"
        assert f'href="{colab}"' in page, f"{name}: no Colab button"
        assert f'href="{binder}"' in page, f"{name}: no Binder button"
