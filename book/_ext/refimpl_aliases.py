"""Resolve cross-references to ``refimpl``'s re-exported names.

``refimpl/__init__.py`` re-exports the operators, so docstrings may write
:class:`refimpl.ODConv2d` (the path a user imports) while the API page documents
the class where it is defined, ``refimpl.odconv.ODConv2d``. When Sphinx cannot
find a ``refimpl.*`` target, this extension imports it, and if it really exists,
retries with the name of the module that defines it. Names that do not exist stay
unresolved, so nitpicky mode still reports them.
"""

from __future__ import annotations

import importlib

from sphinx.application import Sphinx


def canonical_name(target: str) -> str | None:
    """``refimpl.ODConv2d.forward`` -> ``refimpl.odconv.ODConv2d.forward``."""
    parts = target.split(".")
    if parts[0] != "refimpl" or len(parts) < 2:
        return None
    obj = importlib.import_module("refimpl")
    for part in parts[1:]:
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    # Functions, classes and methods know where they are defined; data does not.
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not (isinstance(module, str) and isinstance(qualname, str)):
        return None
    name = f"{module}.{qualname}"
    return name if name != target and name.startswith("refimpl.") else None


def _resolve(app: Sphinx, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    try:
        canonical = canonical_name(target)
    except ImportError:
        return None
    if canonical is None:
        return None
    domain = env.get_domain("py")
    node = node.deepcopy()
    node["reftarget"] = canonical
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, node["reftype"], canonical, node, contnode
    )


def setup(app: Sphinx) -> dict:
    app.connect("missing-reference", _resolve)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
