"""The chapter notebooks are stored the way the book and nbval need them.

nbval compares each cell's fresh output with the stored one, but a notebook saved
without outputs passes nbval without comparing anything, and the website shows
the stored outputs as they are. These tests read the ``.ipynb`` files (they run
nothing) and check that every chapter was executed top to bottom in a fresh
kernel (``book/tools/execute_notebooks.py`` does that) and saved cleanly.
"""

from __future__ import annotations

import base64
import json
import pathlib
import re
import struct

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
NOTEBOOKS = sorted(CHAPTERS.glob("*.ipynb"))
# The line limit of code and output: book/_static/book.css sizes code so that 88
# columns fit the text column of a 1280 px window (and ruff formats refimpl, whose
# source the chapters display, to 88 columns too).
MAX_COLUMNS = 88
MACHINE_PATH = re.compile(r"(?<![\w.~-])/(?:work|tmp|root|home|Users)/")
SETUP_PATTERNS = {
    "picks CUDA when available": re.compile(
        r"torch\.device\(\s*[\"']cuda[\"']\s+if\s+torch\.cuda\.is_available\(\)"
        r"\s+else\s+[\"']cpu[\"']\s*\)"
    ),
    "disables TF32 for matmul": re.compile(
        r"torch\.backends\.cuda\.matmul\.allow_tf32\s*=\s*False"
    ),
    "disables TF32 for cuDNN": re.compile(
        r"torch\.backends\.cudnn\.allow_tf32\s*=\s*False"
    ),
}


def _load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code" and _source(c).strip()]


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _text(value) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _output_texts(output: dict):
    """The human-readable parts of an output (not base64 images)."""
    if output["output_type"] == "stream":
        yield _text(output.get("text", ""))
    elif output["output_type"] == "error":
        yield output.get("ename", "") + ": " + output.get("evalue", "")
        yield "\n".join(output.get("traceback", []))
    else:
        for mime, value in output.get("data", {}).items():
            if mime.startswith("text/") or mime.endswith("json"):
                yield _text(value) if not isinstance(value, dict) else json.dumps(value)


def _label(cell_index: int, cell: dict) -> str:
    first = _source(cell).strip().splitlines()[0][:60]
    return f"cell {cell_index} ({first!r})"


ids = [p.name for p in NOTEBOOKS]


def test_there_are_chapters():
    """The book has chapter notebooks (guards against an empty test run)."""
    assert NOTEBOOKS, f"no notebooks in {CHAPTERS}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_every_cell_has_a_unique_id(path):
    """nbformat 4.5 cell ids: the site build warns about a missing one, and nbformat
    will refuse it."""
    nb = _load(path)
    found = [c.get("id") for c in nb["cells"]]
    missing = [i for i, cell_id in enumerate(found) if not cell_id]
    assert not missing, f"{path.name}: cells without an id: {missing}"
    assert len(set(found)) == len(found), f"{path.name}: repeated cell ids"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_executed_top_to_bottom(path):
    """Every non-empty code cell ran once, in order, in one fresh kernel."""
    nb = _load(path)
    cells = _code_cells(nb)
    assert cells, f"{path.name} has no code cells"
    counts = [c.get("execution_count") for c in cells]
    missing = [i for i, n in enumerate(counts) if n is None]
    assert not missing, (
        f"{path.name}: {len(missing)} of {len(cells)} code cells were never executed "
        f"(first: code cell {missing[0]}); store outputs with "
        "python book/tools/execute_notebooks.py"
    )
    assert counts == list(range(1, len(cells) + 1)), (
        f"{path.name}: execution counts {counts} are not 1..{len(cells)}: the notebook "
        "was not run top to bottom in a fresh kernel"
    )
    assert any(c.get("outputs") for c in cells), f"{path.name} stores no output at all"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_no_errors_or_warnings_stored(path):
    """No traceback (unless the cell is tagged ``raises-exception``) and no stderr."""
    problems = []
    for i, cell in enumerate(_load(path)["cells"]):
        for out in cell.get("outputs", []):
            if out["output_type"] == "error" and "raises-exception" not in _tags(cell):
                error = f"{out.get('ename')}: {out.get('evalue')}"
                problems.append(f"{_label(i, cell)}: {error}")
            if out["output_type"] == "stream" and out.get("name") == "stderr":
                text = _text(out.get("text", "")).strip().splitlines()
                problems.append(f"{_label(i, cell)} writes to stderr: {text[:1]}")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_outputs_are_portable(path):
    """PNG figures only (no SVG), and no path of the machine that ran it."""
    problems = []
    for i, cell in enumerate(_load(path)["cells"]):
        for out in cell.get("outputs", []):
            if "image/svg+xml" in out.get("data", {}):
                problems.append(f"{_label(i, cell)}: SVG output (store PNG figures)")
            for text in _output_texts(out):
                match = MACHINE_PATH.search(text)
                if match:
                    line = next(x for x in text.splitlines() if match.group(0) in x)
                    where = _label(i, cell)
                    problems.append(f"{where}: machine path: {line.strip()!r}")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_no_timing_metadata(path):
    """No execution timestamps, so re-running an unchanged chapter changes nothing."""
    nb = _load(path)
    timed = [
        i
        for i, cell in enumerate(nb["cells"])
        if {"execution", "ExecuteTime"} & set(cell.get("metadata", {}))
    ]
    assert not timed, f"{path.name}: cells {timed} store timing metadata"


def _fenced_lines(markdown: str):
    """Lines of the code blocks of a Markdown text, which the page shows as code.

    A fence whose info string is a directive (```{exercise}) holds text, not code.
    """
    stack: list[tuple[str, bool]] = []  # (fence, holds code)
    for line in markdown.splitlines():
        fence = re.match(r"\s*(`{3,}|~{3,})(.*)$", line)
        if fence and stack and fence.group(1) == stack[-1][0] and not fence.group(2):
            stack.pop()
        elif fence:
            stack.append((fence.group(1), not fence.group(2).strip().startswith("{")))
        elif stack and stack[-1][1]:
            yield line


def _shown_output_lines(output: dict):
    """The lines of an output that the page shows in a code block."""
    if output["output_type"] == "stream":
        yield from _text(output.get("text", "")).splitlines()
    elif output["output_type"] == "error":
        yield from (output.get("ename", "") + ": " + output.get("evalue", "")).split(
            "\n"
        )
    else:
        data = output.get("data", {})
        if "text/markdown" in data:  # rendered as MyST: only code blocks are fixed
            yield from _fenced_lines(_text(data["text/markdown"]))
        elif not any(m.startswith("image/") or m == "text/html" for m in data):
            yield from _text(data.get("text/plain", "")).splitlines()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_code_and_outputs_fit_the_page(path):
    """Code and output lines are at most 88 columns: the page shows them whole."""
    long_lines = []
    for i, cell in enumerate(_load(path)["cells"]):
        if cell["cell_type"] == "markdown":
            lines = [("code block", x) for x in _fenced_lines(_source(cell))]
        elif cell["cell_type"] == "code":
            lines = [("code", x) for x in _source(cell).splitlines()]
            for out in cell.get("outputs", []):
                lines += [("output", x) for x in _shown_output_lines(out)]
        else:
            continue
        long_lines += [
            f"cell {i}, {kind}: {len(line)} columns: {line[:60]!r}..."
            for kind, line in lines
            if len(line) > MAX_COLUMNS
        ]
    assert not long_lines, f"{path.name}:\n" + "\n".join(long_lines)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_exactly_one_title(path):
    """One ``# Title`` (H1) per chapter; sections are ``##``."""
    titles = []
    for cell in _load(path)["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        fenced = False
        for line in _source(cell).splitlines():
            if line.lstrip().startswith(("```", "~~~")):
                fenced = not fenced
            elif not fenced and re.match(r"#\s+\S", line):
                titles.append(line.strip())
    assert len(titles) == 1, f"{path.name}: expected one H1, found {titles}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_setup_cell_is_device_aware(path):
    """The first code cell picks CUDA when present and switches TF32 off."""
    first = _source(_code_cells(_load(path))[0])
    missing = [what for what, rule in SETUP_PATTERNS.items() if not rule.search(first)]
    assert not missing, f"{path.name}: the set-up cell does not: {', '.join(missing)}"


def _toc_files() -> list[str]:
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [toc["root"]]
    for part in toc.get("parts", []):
        entries = list(part.get("chapters", []))
        while entries:
            entry = entries.pop(0)
            files.append(entry["file"])
            entries += entry.get("sections", [])
    return files


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_listed_in_toc(path):
    """Every chapter notebook is a page of the book."""
    entry = path.relative_to(ROOT).with_suffix("").as_posix()
    assert entry in _toc_files(), f"{entry} is not listed in _toc.yml"


def test_toc_entries_exist():
    """Every page listed in ``_toc.yml`` exists."""
    missing = [
        f
        for f in _toc_files()
        if not any((ROOT / f).with_suffix(s).is_file() for s in (".md", ".ipynb"))
    ]
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"


def _number(path: pathlib.Path) -> str:
    return path.name[:2]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_chapter_label_follows_file_name(path):
    """The title carries the label ``chapter-N`` that other pages link to."""
    first = _source(_load(path)["cells"][0])
    label = f"(chapter-{int(_number(path))})="
    assert first.startswith(label + "\n# "), (
        f"{path.name}: the first cell must start with {label!r} and the # title"
    )


EXERCISE = re.compile(r"^(`{3,})\{exercise\}[ \t]*(.*)\n:label: (\S+)", re.M)
SOLUTION = re.compile(r"^```\{solution-start\} (\S+)\n((?::\w+:.*\n)*)```\s*$")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_exercises_have_hidden_executed_solutions(path):
    """Every exercise is followed by its solution in a collapsed dropdown.

    The convention of the book: a Markdown cell with an ``{exercise}`` directive
    labelled ``chNN-ex-K`` (K = 1, 2, ...), then a cell ``{solution-start}
    chNN-ex-K`` with ``:label: chNN-sol-K`` and ``:class: dropdown``, then the
    solution (at least one code cell, executed and checked by nbval), then a cell
    ``{solution-end}``.
    """
    cells = _load(path)["cells"]
    chapter = _number(path)
    problems, labels = [], []
    for i, cell in enumerate(cells):
        text = _source(cell)
        if cell["cell_type"] != "markdown":
            continue
        if re.search(r"\{admonition\}\s*Exercise", text):
            problems.append(f"cell {i}: exercise as an admonition, not {{exercise}}")
        for match in EXERCISE.finditer(text):
            label = match.group(3)
            labels.append(label)
            k = len(labels)
            if label != f"ch{chapter}-ex-{k}":
                problems.append(f"cell {i}: exercise {k} is labelled {label!r}")
            solution = (
                SOLUTION.match(_source(cells[i + 1])) if i + 1 < len(cells) else None
            )
            if not solution or solution.group(1) != label:
                problems.append(f"cell {i + 1}: no {{solution-start}} {label} after it")
                continue
            options = solution.group(2)
            if ":class: dropdown" not in options:
                problems.append(f"cell {i + 1}: the solution of {label} is not hidden")
            if f":label: ch{chapter}-sol-{k}" not in options:
                problems.append(
                    f"cell {i + 1}: the solution needs :label: ch{chapter}-sol-{k}"
                )
            body = []
            for later in cells[i + 2 :]:
                if _source(later).startswith("```{solution-end}"):
                    break
                if EXERCISE.search(_source(later)) or _source(later).startswith("## "):
                    problems.append(f"solution of {label} has no {{solution-end}}")
                    break
                body.append(later)
            else:
                problems.append(f"solution of {label} has no {{solution-end}}")
            if not any(c["cell_type"] == "code" for c in body):
                problems.append(f"solution of {label} has no code cell")
    has_section = any(
        re.search(r"^## Exercises\s*$", _source(c), re.M)
        for c in cells
        if c["cell_type"] == "markdown"
    )
    if has_section and not labels:
        problems.append("an Exercises section without {exercise} directives")
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


# roles, equation labels, targets and directive labels: where a label belongs
LEGITIMATE = re.compile(
    r"\{\w+(?::\w+)?\}`[^`]*`|\$\$\s*\([\w-]+\)|^\([\w-]+\)=|^:label: .*", re.M
)


def _book_labels() -> set[str]:
    labels = set()
    pages = [_source(c) for p in NOTEBOOKS for c in _load(p)["cells"]]
    pages += [p.read_text(encoding="utf-8") for p in (ROOT / "book").glob("*.md")]
    for text in pages:
        labels |= set(re.findall(r"\$\$\s*\(([\w-]+)\)", text))
        labels |= set(re.findall(r"^\(([\w-]+)\)=", text, re.M))
        labels |= set(re.findall(r"^:label: (\S+)", text, re.M))
    return labels


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_no_internal_label_in_the_text(path):
    """Labels are link targets: "(cc-cost)" or "eq. (...)" must not reach a reader.

    A reference is a role ({eq}`cc-cost`, {numref}`...`) that Sphinx turns into a
    numbered link; a label written out in prose, in a code comment or in a
    printed output is a leak.
    """
    labels = _book_labels()
    assert labels, "no labels found: the pattern is out of date"
    mention = re.compile(r"\(([\w-]+)\)|\beqs?\.\s*\(")
    problems = []
    for i, cell in enumerate(_load(path)["cells"]):
        texts = [_source(cell)]
        if cell["cell_type"] == "markdown":
            # roles, equation labels and targets are the legitimate uses
            texts = [LEGITIMATE.sub("", texts[0])]
        for out in cell.get("outputs", []):
            texts += list(_output_texts(out))
        for text in texts:
            for match in mention.finditer(text):
                if match.group(1) is None or match.group(1) in labels:
                    problems.append(f"cell {i}: {match.group(0)!r}")
    assert not problems, f"{path.name}: labels written out as text:\n" + "\n".join(
        problems
    )


# Figures fill at most the text column at 1280 px (652 px): 6.3 in at the style's
# 100 dpi, plus the margin of the tight bounding box.
MAX_FIGURE_WIDTH = 652


def _png_size(data: str) -> tuple[int, int]:
    header = base64.b64decode(data[:44])  # the IHDR chunk is in the first 24 bytes
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_figures_are_sharp_legible_and_described(path):
    """Every figure: retina PNG, no wider than the column, numbered, described.

    ``refimpl.viz.use_book_style()`` stores figures at twice their display size
    (the output's ``width`` metadata), so they stay sharp on high-density screens;
    the cell's ``mystnb.image.alt`` metadata describes the figure for readers who
    cannot see it (the page would otherwise use the file name), and
    ``mystnb.figure`` gives it a caption and a name, so that it is numbered
    (Figure N.k) and the text refers to it with {numref}.
    """
    problems = []
    for i, cell in enumerate(_load(path)["cells"]):
        for out in cell.get("outputs", []):
            png = out.get("data", {}).get("image/png")
            if png is None:
                continue
            shown = out.get("metadata", {}).get("image/png", {}).get("width")
            width, _ = _png_size(_text(png))
            if not shown or width < 2 * shown - 2:
                problems.append(f"{_label(i, cell)}: {width} px PNG shown at {shown}")
            elif shown > MAX_FIGURE_WIDTH:
                problems.append(f"{_label(i, cell)}: {shown} px wide figure")
            mystnb = cell.get("metadata", {}).get("mystnb", {})
            alt = mystnb.get("image", {}).get("alt")
            if not alt or len(alt) < 30:
                problems.append(f"{_label(i, cell)}: no alt text (mystnb.image.alt)")
            figure = mystnb.get("figure", {})
            name = figure.get("name", "")
            if not figure.get("caption") or not name.startswith(
                f"fig-ch{path.name[:2]}-"
            ):
                problems.append(
                    f"{_label(i, cell)}: no numbered figure (mystnb.figure.caption and "
                    f"a name fig-ch{path.name[:2]}-...)"
                )
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_execution_is_recorded_for_the_status_page(path):
    """``execute_notebooks.py`` recorded the run the status page reports."""
    status = _load(path)["metadata"].get("book_status", {})
    missing = {
        "execution_seconds",
        "executed_on",
        "machine",
        "device",
        "python",
        "torch",
    } - set(status)
    assert not missing, f"{path.name}: book_status lacks {sorted(missing)}"
    assert status["device"] == "cpu", f"{path.name}: outputs must be stored on a CPU"
