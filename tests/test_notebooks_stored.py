"""The chapter notebooks are stored the way the book and nbval need them.

nbval compares each cell's fresh output with the stored one, but a notebook saved
without outputs passes nbval without comparing anything, and the website shows
the stored outputs as they are. These tests read the ``.ipynb`` files (they run
nothing) and check that every chapter was executed top to bottom in a fresh
kernel (``book/tools/execute_notebooks.py`` does that) and saved cleanly.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHAPTERS = ROOT / "chapters"
NOTEBOOKS = sorted(CHAPTERS.glob("*.ipynb"))
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


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_code_fits_the_page(path):
    """Code lines are at most 88 columns, so the page shows them without scrolling."""
    long_lines = [
        f"cell {i}, line {n}: {len(line)} columns"
        for i, cell in enumerate(_load(path)["cells"])
        if cell["cell_type"] == "code"
        for n, line in enumerate(_source(cell).splitlines(), start=1)
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
        files += [entry["file"] for entry in part.get("chapters", [])]
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
