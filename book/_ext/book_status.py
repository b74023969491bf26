"""The book's status page, generated at build time.

The ``{book-status}`` directive writes two tables: one row per chapter notebook
with what ``book/tools/execute_notebooks.py`` recorded when it stored the outputs
(seconds, day, machine, Python and PyTorch versions, in the notebook's
``book_status`` metadata), and the versions of the book's software stack in the
environment that builds the site. The page is read again on every build, so it
never shows an earlier build's environment.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import pathlib
import platform

from docutils import nodes
from sphinx import addnodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective

STACK = (
    "torch",
    "torchvision",
    "numpy",
    "matplotlib",
    "jupyter-book",
    "sphinx",
    "myst-nb",
    "myst-parser",
    "sphinx-book-theme",
    "sphinx-exercise",
    "sphinxcontrib-bibtex",
    "nbval",
)
STATUS_DOCS: set[str] = set()


def _table(header: list[str], rows: list[list[nodes.Node | str]]) -> nodes.table:
    table = nodes.table(classes=["status-table"])
    group = nodes.tgroup(cols=len(header))
    table += group
    group += [nodes.colspec(colwidth=1) for _ in header]
    head = nodes.thead()
    group += head
    body = nodes.tbody()
    group += body
    for cells, parent in [(header, head)] + [(row, body) for row in rows]:
        row_node = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            para = nodes.paragraph()
            para += cell if isinstance(cell, nodes.Node) else nodes.Text(str(cell))
            entry += para
            row_node += entry
        parent += row_node
    return table


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


class BookStatus(SphinxDirective):
    """Tables of chapter executions and of the build's software versions."""

    def run(self) -> list[nodes.Node]:
        STATUS_DOCS.add(self.env.docname)
        root = pathlib.Path(self.env.srcdir)
        chapters = sorted(
            doc
            for doc in self.env.found_docs
            if doc.startswith("chapters/") and (root / f"{doc}.ipynb").is_file()
        )
        rows = []
        for doc in chapters:
            path = root / f"{doc}.ipynb"
            self.env.note_dependency(str(path))
            meta = json.loads(path.read_text(encoding="utf-8"))["metadata"]
            status = meta.get("book_status", {})
            link = addnodes.pending_xref(
                "",
                refdomain="std",
                reftype="doc",
                reftarget=f"/{doc}",
                refexplicit=False,
            )
            link += nodes.inline("", doc)
            seconds = status.get("execution_seconds")
            software = (
                f"Python {status.get('python', '?')}, torch {status.get('torch', '?')}"
            )
            rows.append(
                [
                    link,
                    f"{seconds:.0f} s" if seconds is not None else "not recorded",
                    status.get("executed_on", "—"),
                    status.get("machine", "—"),
                    software,
                ]
            )
        executions = _table(
            ["chapter", "execution time", "outputs stored on", "machine", "software"],
            rows,
        )
        stack = _table(
            ["package", "version"],
            [["Python", platform.python_version()]]
            + [[name, _version(name)] for name in STACK],
        )
        built = nodes.paragraph(
            text=f"This page was generated when the site was built, on "
            f"{datetime.date.today().isoformat()}, on {platform.system()} "
            f"{platform.machine()}."
        )
        return [executions, built, stack]


def _always_outdated(app: Sphinx, env, added, changed, removed) -> list[str]:
    return sorted(STATUS_DOCS & env.found_docs)


def setup(app: Sphinx) -> dict:
    app.add_directive("book-status", BookStatus)
    app.connect("env-get-outdated", _always_outdated)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
