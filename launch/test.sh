#!/usr/bin/env bash
# The test suite: tiny models and data built by the tests, CPU only, nothing downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec "${EMOLA_VENV:-.venv}/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
