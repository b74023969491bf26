#!/usr/bin/env bash
# Build the website into _build/html, installing what it needs on first use.
#
#   bash book/tools/build_site.sh
#
# Uses the active virtual environment if it has jupyter-book; otherwise creates
# .venv/ at the repository root and installs requirements.txt into it (again only
# when requirements.txt changes). The notebooks are not executed: the site shows
# their stored outputs, which the test suite (nbval) proves current.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"

if [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/jupyter-book" ]]; then
    BIN="$VIRTUAL_ENV/bin"
else
    VENV="$ROOT/.venv"
    BIN="$VENV/bin"
    STAMP="$VENV/.requirements.sha256"
    WANT="$("${PYTHON:-python3}" -c 'import hashlib, pathlib
print(hashlib.sha256(pathlib.Path("requirements.txt").read_bytes()).hexdigest())')"
    if [[ ! -x "$BIN/python" ]]; then
        echo "Creating $VENV"
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
    if [[ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]]; then
        echo "Installing requirements.txt into $VENV (a few minutes the first time)"
        "$BIN/python" -m pip install --quiet --upgrade pip
        "$BIN/python" -m pip install -r requirements.txt
        echo "$WANT" > "$STAMP"
    fi
fi

"$BIN/jupyter-book" build . --warningiserror --nitpick --keep-going
echo
echo "Serve the book and open http://127.0.0.1:8000 (search needs HTTP):"
echo "    $BIN/python -m http.server -d _build/html"
