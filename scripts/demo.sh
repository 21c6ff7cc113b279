#!/usr/bin/env bash
# Quick start 1: set up .venv, install celeriac, and run the tutorial against a real worker.
# Needs python3 >= 3.11 (or PYTHON=/path/to/python3.11). Nothing else: the broker is the
# embedded SQLite file, made fresh in a temporary directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
die() { printf '\nerror: %s\n' "$*" >&2; exit 1; }

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

find_python() {
    local candidate
    for candidate in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
        [[ -n "$candidate" ]] || continue
        if command -v "$candidate" >/dev/null 2>&1 && python_ok "$candidate"; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

if [[ ! -x .venv/bin/python ]]; then
    say "Creating .venv"
    py=$(find_python) || die "celeriac needs Python >= 3.11; set PYTHON=/path/to/python3.11"
    "$py" -m venv .venv || die "'$py -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)"
fi
python_ok .venv/bin/python || die ".venv has Python < 3.11; remove .venv and run again"

say "Installing celeriac into .venv (pip install -e .)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e .

say "Running examples/demo.py"
exec .venv/bin/python examples/demo.py
