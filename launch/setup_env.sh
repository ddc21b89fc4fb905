#!/usr/bin/env bash
# Creates (once) the project's virtual environment in .venv and installs emola-jax into it with
# the extras the tests and demo use. Re-running is cheap: it reinstalls only when setup.py changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${EMOLA_VENV:-.venv}"
stamp="$VENV/.emola-installed"
want="$(sha256sum setup.py | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "[setup] creating $VENV (first run: a few minutes)" >&2
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# The CPU build of torch (only the parity tests, the PyTorch export and .bin import use it).
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[torch,test,landmarks]"
echo "$want" > "$stamp"
