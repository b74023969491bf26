"""The commands of the setup page work as written.

``book/setup.md`` tells a reader to unzip the book (the zip file the site serves),
create a virtual environment, ``pip install -r requirements.txt`` and run
``jupyter lab chapters/``. This test builds that zip with the site's own code
(``book/_ext/downloads.py``), then runs the page's command block line by line in
bash, in a temporary folder. Two additions keep it offline and finite: the new
environment sees the packages of the running one (a ``.pth`` file, with
``PIP_NO_INDEX``), so that ``pip install -r requirements.txt`` resolves without
downloading, and JupyterLab runs without a browser until it has served the
chapter list, then stops.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "book" / "_ext"))

import downloads  # noqa: E402

SETUP = ROOT / "book" / "setup.md"


def _install_block() -> list[str]:
    text = SETUP.read_text(encoding="utf-8")
    section = text.split("## On your own machine", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the setup page has no bash block for a local install"
    return [line for line in block.group(1).splitlines() if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_links_name_the_built_files():
    text = SETUP.read_text(encoding="utf-8")
    for name in (downloads.wheel_name(ROOT), downloads.NOTEBOOKS_ZIP):
        assert f'href="../downloads/{name}"' in text, f"setup.md does not link {name}"


@pytest.mark.skipif(shutil.which("unzip") is None, reason="unzip is not installed")
def test_local_install_commands_run_as_written(tmp_path):
    lines = _install_block()
    assert lines[0].startswith("unzip ") and lines[-1] == "jupyter lab chapters/", lines
    downloads.zip_notebooks(ROOT, tmp_path)
    port = _free_port()
    here = sysconfig.get_paths()["purelib"]
    script = ["set -euo pipefail"]
    for line in lines:
        if line.startswith("jupyter lab"):
            script += [
                # headless, on a free port, and allowed to run as root (as CI does)
                f"{line} --no-browser --port={port} --ServerApp.token= "
                "--allow-root > lab.log 2>&1 &",
                "LAB=$!",
                "trap 'kill $LAB' EXIT",
                "python - <<'EOF'",
                "import json, time, urllib.request",
                "for _ in range(120):",
                "    try:",
                f"        page = urllib.request.urlopen('http://127.0.0.1:{port}/api/contents')",
                "        break",
                "    except OSError:",
                "        time.sleep(0.5)",
                "else:",
                "    raise SystemExit('JupyterLab did not start: ' + open('lab.log').read())",  # noqa: E501
                "names = [item['name'] for item in json.load(page)['content']]",
                "print('JupyterLab lists', sorted(names))",
                "EOF",
            ]
            continue
        script.append(line)
        if line.startswith("python -m venv"):
            # see the packages of this environment (first: its setuptools is the
            # one pyproject.toml needs) instead of downloading them
            reuse = f"import sys; sys.path.insert(0, {here!r})"
            site = ".venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()[\"purelib\"])'"  # noqa: E501
            script.append(f'echo "{reuse}" > "$({site})/_test_reuse.pth"')
        if line.startswith("pip install"):
            script.append(
                "python -c 'import refimpl, pathlib; "
                'print("refimpl from", pathlib.Path(refimpl.__file__).parent)\''
            )
    # (pip reads PIP_NO_BUILD_ISOLATION=0 as --no-build-isolation)
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0")
    env["PATH"] = f"{pathlib.Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("PYTHONPATH", None)  # refimpl must come from the unzipped folder
    env.pop("VIRTUAL_ENV", None)
    result = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    folder = tmp_path / "dynamic-convolution"
    assert f"refimpl from {folder / 'refimpl'}" in result.stdout, log[-2000:]
    listed = re.search(r"JupyterLab lists (.*)", result.stdout)
    assert listed and "01_convolution_arithmetic.ipynb" in listed.group(1), log[-2000:]
