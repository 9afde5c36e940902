#!/usr/bin/env bash
# One quality runner working through a queue file, one line per step:
#     <config name> <budget> <methods|GATHER> <output>
# e.g. "study_long_budget_minilm x4 pissa,dora parts/long4_a"  (--methods pissa,dora --output parts/long4_a)
#      "study_long_budget_minilm x4 GATHER gather_x4"           (--gather; <output> names only the log)
# Every step is --resume --threads 1 under nice, so a stopped queue started again skips what finished.
# Logs: runs/queue/<output>.log per step, runs/queue/<queue name>.chain (start/end of each step).
# Start one queue per core, detached:  setsid nohup bash scripts/bench-queue.sh QUEUE [WAIT_PID] &
# WAIT_PID: start only after that process exits (e.g. the runner whose baseline the second one needs).
set -uo pipefail
cd "$(dirname "$0")/.."
queue=$1
[ -f "$queue" ] || { echo "bench-queue: no queue file $queue; give a file of '<config> <budget> <methods|GATHER> <output>' lines" >&2; exit 2; }
if [ -n "${2:-}" ]; then while kill -0 "$2" 2>/dev/null; do sleep 30; done; fi
logs=runs/queue
chain="$logs/$(basename "$queue" .queue).chain"
mkdir -p "$logs/parts"
lines=$(grep -v '^[[:space:]]*\(#\|$\)' "$queue")  # read once: editing the file later does not move this queue
while read -r cfg budget methods out; do
    [ -z "$cfg" ] && continue
    run=(nice .venv/bin/python bench/quality.py --config "bench/configs/$cfg.yaml" --budget "$budget" --threads 1 --resume)
    if [ "$methods" = GATHER ]; then run+=(--gather); else run+=(--methods "$methods" --output "$out"); fi
    echo "$(date -u +%FT%T) start ${run[*]}" >> "$chain"
    "${run[@]}" > "$logs/$out.log" 2>&1
    rc=$?  # before the $(date) below, which would reset it
    echo "$(date -u +%FT%T) end rc=$rc $out" >> "$chain"
done <<< "$lines"
