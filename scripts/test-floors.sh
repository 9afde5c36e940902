#!/usr/bin/env bash
# The oldest dependency versions pyproject.toml allows, installed in .venv-floors, run the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-floors LORAKIT_FLOORS=1 bash scripts/setup.sh
.venv-floors/bin/python -m pytest -q "$@"
