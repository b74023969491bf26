"""Serve MathJax 3 from the site itself instead of a CDN.

Sphinx points ``mathjax_path`` at jsDelivr by default, so a page read offline (or
checked by the site test, which allows no off-site request) shows raw LaTeX. The
PyPI package ``django-static-mathjax`` ships the MathJax 3.2.2 ``es5`` bundle;
this extension copies the parts a page can load (the combined ``tex-chtml.js``
component plus the lazily loaded components and fonts) to
``_build/html/_static/mathjax/`` and points ``mathjax_path`` at it.
"""

from __future__ import annotations

import pathlib
import shutil

from sphinx.application import Sphinx
from sphinx.errors import ExtensionError

ENTRY = "tex-chtml.js"
# Directories MathJax may load from at run time (fonts, the context menu, the
# accessibility extensions); the other combined bundles are never requested.
SUBDIRS = ("a11y", "adaptors", "input", "output", "sre", "ui")


def mathjax_es5() -> pathlib.Path:
    """Return the ``es5`` directory of the installed MathJax 3 distribution."""
    try:
        import mathjax  # provided by django-static-mathjax
    except ImportError as err:
        raise ExtensionError(
            "local_mathjax needs the PyPI package django-static-mathjax "
            "(pip install -r requirements.txt)"
        ) from err
    es5 = pathlib.Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (es5 / ENTRY).is_file():
        raise ExtensionError(f"local_mathjax expected MathJax's {ENTRY} in {es5}")
    return es5


def _use_local_path(app: Sphinx, config) -> None:
    mathjax_es5()  # fail early, before reading any page
    # A relative mathjax_path is resolved against _static/ by Sphinx.
    config.mathjax_path = f"mathjax/{ENTRY}"


def _copy(app: Sphinx, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    source = mathjax_es5()
    target = pathlib.Path(app.outdir) / "_static" / "mathjax"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copy2(source / ENTRY, target / ENTRY)
    for name in SUBDIRS:
        shutil.copytree(source / name, target / name, dirs_exist_ok=True)
    shutil.copy2(source.parent / "LICENSE", target / "LICENSE")


def setup(app: Sphinx) -> dict:
    app.connect("config-inited", _use_local_path)
    app.connect("build-finished", _copy)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
