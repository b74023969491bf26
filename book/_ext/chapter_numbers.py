"""Chapter numbers that follow the notebook's file name, not its place in the toc.

The chapters part of ``_toc.yml`` is a numbered toctree, so Sphinx numbers the
chapters, their sections, figures, equations and exercises 1, 2, 3, ... in the
order they are listed. The book's plan has eight chapters and some are not
written yet: with ``chapters/05_ddf`` missing, Sphinx would call
``chapters/06_deformable`` chapter 5 while the text (and every later chapter) calls
it chapter 6. This extension renumbers every page whose name starts with
``chapters/NN_`` as chapter ``NN``: the sidebar, the page's headings, and the
numbers of its figures, equations and exercises (which Sphinx derives from the
section numbers, so they are assigned again after the change).
"""

from __future__ import annotations

import re

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.environment.collectors.toctree import TocTreeCollector

CHAPTER_FILE = re.compile(r"^chapters/(\d+)_")


def chapter_number(docname: str) -> int | None:
    """``chapters/06_deformable`` -> 6; None for pages that are not chapters."""
    match = CHAPTER_FILE.match(docname)
    return int(match.group(1)) if match else None


def _renumber(number, chapter: int):
    if not number:
        return number
    return (chapter, *tuple(number)[1:])


def _apply(app: Sphinx, env: BuildEnvironment) -> list[str]:
    changed = []
    for docname, secnums in env.toc_secnumbers.items():
        chapter = chapter_number(docname)
        if chapter is None or not secnums:
            continue
        new = {anchor: _renumber(num, chapter) for anchor, num in secnums.items()}
        if new != secnums:
            env.toc_secnumbers[docname] = new
            changed.append(docname)
        # the numbers shown in toctrees (the sidebar, the next/previous links)
        for reference in env.tocs[docname].findall(nodes.reference):
            if reference.get("secnumber"):
                reference["secnumber"] = list(
                    _renumber(reference["secnumber"], chapter)
                )
        title = env.titles.get(docname)
        if title is not None and title.get("secnumber"):
            title["secnumber"] = list(_renumber(title["secnumber"], chapter))
    # figure, table, code, equation and exercise numbers start with the chapter's
    # section number: derive them again from the corrected section numbers
    changed += TocTreeCollector().assign_figure_numbers(env)
    return sorted(set(changed))


def setup(app: Sphinx) -> dict:
    # after the toctree collector (priority 500) has numbered everything
    app.connect("env-get-updated", _apply, priority=900)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
