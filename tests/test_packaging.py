"""The package installs cleanly and carries its license.

Builds the ``refimpl`` wheel from ``pyproject.toml`` with the environment's own
setuptools (no download) and checks that the build prints no warning (setuptools
deprecates the old ``license = {text = ...}`` table) and that the wheel declares
and ships the MIT license.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_license_file_is_mit():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n")
    assert "Permission is hereby granted, free of charge" in text


def test_wheel_builds_without_warnings(tmp_path):
    # build from a copy: setuptools writes build/ next to pyproject.toml
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "refimpl",
        source / "refimpl",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    wheels = tmp_path / "wheels"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "--wheel-dir",
            str(wheels),
            str(source),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    warnings = [line for line in log.splitlines() if "warning" in line.lower()]
    assert not warnings, "the build warns:\n" + "\n".join(warnings)
    (wheel,) = wheels.glob("refimpl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        fields = archive.read(metadata).decode()
    assert "License-Expression: MIT" in fields
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert "refimpl/__init__.py" in names
