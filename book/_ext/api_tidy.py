"""Leave out the boilerplate autodoc writes for named tuples.

For every field of a ``typing.NamedTuple`` the standard library generates an
accessor whose docstring is "Alias for field number 0", "... 1", and autodoc
prints it under each field. A field documented in the source (a docstring under
its annotation) shows that text, which autodoc prefers; any other field is listed
with its name and type only.
"""

from __future__ import annotations

import re

from sphinx.application import Sphinx

BOILERPLATE = re.compile(r"^Alias for field number \d+$")


def _drop_field_aliases(app: Sphinx, what, name, obj, options, lines) -> None:
    if len([line for line in lines if line.strip()]) == 1 and BOILERPLATE.match(
        "".join(lines).strip()
    ):
        lines.clear()


def setup(app: Sphinx) -> dict:
    app.connect("autodoc-process-docstring", _drop_field_aliases)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
