"""Copy the repository URL of ``_config.yml`` into every chapter's set-up cell.

The URL is set once, as ``repository.url`` in ``_config.yml``: Jupyter Book uses it
for the "open in Colab" and "open in Binder" buttons of every chapter, and this
tool writes it into the line ``REPOSITORY = "..."`` of each notebook's set-up
cell, which installs ``refimpl`` from there on Colab. Only that line changes (no
output, so the stored outputs stay valid)::

    python book/tools/sync_repository_url.py           # rewrite the notebooks
    python book/tools/sync_repository_url.py --check   # exit 1 if one differs
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
LINE = re.compile(r'^REPOSITORY = "[^"\n]*"', re.M)


def configured_url(root: pathlib.Path = ROOT) -> str:
    config = yaml.safe_load((root / "_config.yml").read_text(encoding="utf-8"))
    return ((config.get("repository") or {}).get("url") or "").strip()


def _first_code_cell(nb: dict) -> dict:
    return next(c for c in nb["cells"] if c["cell_type"] == "code")


def notebook_url(path: pathlib.Path) -> str | None:
    """The URL in the notebook's set-up cell, or None if the line is missing."""
    source = "".join(_first_code_cell(json.loads(path.read_text("utf-8")))["source"])
    match = LINE.search(source)
    return match.group(0).split('"')[1] if match else None


def sync(path: pathlib.Path, url: str) -> bool:
    """Write ``url`` into the notebook; return whether it changed."""
    text = path.read_text(encoding="utf-8")
    nb = json.loads(text)
    cell = _first_code_cell(nb)
    source = "".join(cell["source"])
    if not LINE.search(source):
        raise ValueError(f'{path}: the set-up cell has no line REPOSITORY = "..."')
    new = LINE.sub(f'REPOSITORY = "{url}"', source, count=1)
    if new == source:
        return False
    cell["source"] = new.splitlines(keepends=True)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", "utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare")
    args = parser.parse_args(argv)
    url = configured_url()
    notebooks = sorted((ROOT / "chapters").glob("*.ipynb"))
    if args.check:
        stale = [p.name for p in notebooks if notebook_url(p) != url]
        for name in stale:
            print(f"{name}: REPOSITORY differs from _config.yml ({url!r})")
        return 1 if stale else 0
    for path in notebooks:
        if sync(path, url):
            print(f"{path.relative_to(ROOT)}: REPOSITORY = {url!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
