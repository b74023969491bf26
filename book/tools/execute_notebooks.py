"""Re-execute chapter notebooks in place, so their stored outputs are current.

Usage::

    python book/tools/execute_notebooks.py                  # every chapter
    python book/tools/execute_notebooks.py chapters/02_condconv.ipynb

Each notebook runs top to bottom in a fresh kernel whose working directory is
``chapters/`` (as in Jupyter Book and nbval). The stored notebook keeps no timing
metadata, so re-running an unchanged notebook leaves the file unchanged apart
from the outputs that really changed, and the notebook's ``book_status`` metadata:
the seconds it took, the day, the machine, and the versions of Python and PyTorch
(the book's status page, book/status.md, tabulates them). Run it on a CPU: the
stored outputs are the reference that nbval compares every later run against.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import pathlib
import platform
import sys
import time

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """The machine in words: CPU, core count, operating system."""
    cores = os.cpu_count() or 1
    return f"{_cpu_name()}, {cores} cores, {platform.system()} {platform.machine()}"


def status(seconds: float) -> dict:
    """What the status page shows about one execution."""
    return {
        "execution_seconds": round(seconds, 1),
        "executed_on": datetime.date.today().isoformat(),
        "machine": machine(),
        "device": "cpu",
        "python": platform.python_version(),
        "torch": importlib.metadata.version("torch"),
    }


def execute(path: pathlib.Path, timeout: int = 900) -> float:
    """Execute one notebook in place; return the seconds it took."""
    nb = nbformat.read(path, as_version=4)
    # Same conditions as CI: no GPU, no stray threads beyond the two cores.
    env_before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    start = time.perf_counter()
    try:
        client = NotebookClient(
            nb,
            timeout=timeout,
            kernel_name="python3",
            record_timing=False,
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
    finally:
        if env_before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = env_before
    seconds = time.perf_counter() - start
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    nb.metadata["book_status"] = status(seconds)
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=pathlib.Path)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((ROOT / "chapters").glob("*.ipynb"))
    for path in paths:
        seconds = execute(path.resolve(), args.timeout)
        print(f"{path}: {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
