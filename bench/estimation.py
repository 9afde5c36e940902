"""Gradient-estimation memory and time: lorakit lora-ga (exact, sketch) vs PEFT's LoRA-GA (issue 3).

    python bench/estimation.py [--samples 16] [--length 64] [--batch-size 1] [--rank 8] [--repeats 2]

On the real SmolLM2-135M (all 7 linear projections of its 30 blocks, 210 layers), the same
Rotten Tomatoes snippets as causal-LM text (labels = input ids, padding masked with -100):
- PEFT: `preprocess_loraga(model, config, train_step)` (target weights require grad, one
  forward/backward per batch, gradients kept in `.grad`) then `get_peft_model`;
- lorakit: `lorakit.adapt(model, AdapterConfig(method="lora-ga", estimator=...), data=batches)`
  with the exact estimator (one pass, G per layer), the sketch (q = 1: four passes), and the
  sketch with activation checkpointing (`estimate_checkpointing`, "sketch-ckpt": each block's
  activations recomputed in backward, issue 16).
Each measurement runs in a fresh subprocess that loads the model first (weights copied out
of the safetensors mmap and one warm-up forward, so neither page-ins nor one-time
allocations are charged to the method; peft is imported before too), then resets the
kernel's peak-RSS counter (`/proc/self/clear_refs` ← 5) and reads the resident set size
(`VmRSS`); "added memory" is the peak resident set (`VmHWM`) during estimation +
initialisation minus that baseline, so it counts every allocation the method makes (tensors,
autograd buffers) on the CPU; the workers run with MALLOC_MMAP_THRESHOLD_=65536 so that
freed blocks leave the resident set (glibc otherwise keeps them and the first backward
inflates every method by a few hundred MiB of free heap). Time is the wall time of the same
span, on `--threads` intra-op threads (default 1: on a shared 2-core machine two threads
mostly measure barrier waits); the methods take turns `--repeats` times and the median is
kept. Ratios are lorakit / PEFT.
Targets (issue 3): exact ≤ 1.0× PEFT's time at ≤ 1.0× its memory; sketch ≤ 0.25× PEFT's
added memory at ≤ 3× its time (issue 16: the same for the sketch with checkpointing).
The measurement helpers (worker environment, peak-RSS accounting, the methods' calls) live in
bench/common.py, shared with bench/scaling.py. "floor" is a forward/backward over the same batches with all
weights frozen and no estimator: the activation memory every backward-based estimator pays;
"above floor" compares what each method adds beyond it (G, sketches, .grad buffers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MEMORY_METHOD, lora_ga_init, measure_added, run_worker, write_result  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("peft", "lorakit-exact", "lorakit-sketch", "lorakit-sketch-ckpt", "floor")


def _batches(tokenizer, samples: int, length: int, batch_size: int) -> list[dict]:
    import torch

    from lorakit.recipes.data import rotten_tomatoes

    texts = [row["text"] for row in rotten_tomatoes()[:samples]]
    batches = []
    for i in range(0, samples, batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    assert all(b["input_ids"].shape[1] == length for b in batches) and torch.cat([b["labels"] for b in batches]).ne(-100).any()
    return batches


def worker(method: str, samples: int, length: int, rank: int, batch_size: int, threads: int) -> dict:
    """Load the model, then measure one estimation + initialisation."""
    import torch

    torch.set_num_threads(threads)
    import peft  # noqa: F401  (imported before the measurement, like everything else)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lorakit  # noqa: F401
    from lorakit.recipes.models import smollm2_path

    torch.manual_seed(0)
    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|im_end|>"
    batches = _batches(tokenizer, samples, length, batch_size)
    with torch.no_grad():
        for p in model.parameters():  # the weights are mmapped from safetensors: make them resident now
            p.data = p.data.clone()
        model(input_ids=batches[0]["input_ids"][:1], use_cache=False)  # one-time allocations (thread pools, caches)
    return measure_added(lambda: lora_ga_init(method, model, batches, rank, TARGETS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.samples, args.length, args.rank, args.batch_size, args.threads)))
        return

    from lorakit.recipes.models import smollm2_path

    smollm2_path()  # convert the GGUF once, outside the measurements
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for repeat in range(args.repeats):
        for method in METHODS:
            command = [sys.executable, __file__, "--worker", method, "--samples", str(args.samples), "--length", str(args.length), "--rank", str(args.rank), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
            runs[method].append(run_worker(command))
            print(f"[{repeat + 1}/{args.repeats}] {method:15s} {runs[method][-1]['seconds']:7.1f} s  +{runs[method][-1]['added_bytes'] / 2**20:7.0f} MiB", flush=True)
    summary = {
        m: {
            "seconds": statistics.median(r["seconds"] for r in rs),
            "added_MiB": statistics.median(r["added_bytes"] for r in rs) / 2**20,
            "runs": rs,
        }
        for m, rs in runs.items()
    }
    peft = summary["peft"]
    floor = summary["floor"]["added_MiB"]
    ratios = {
        m: {
            "time": summary[m]["seconds"] / peft["seconds"],
            "memory": summary[m]["added_MiB"] / peft["added_MiB"],
            "memory_above_floor": (summary[m]["added_MiB"] - floor) / (peft["added_MiB"] - floor),
        }
        for m in ("lorakit-exact", "lorakit-sketch", "lorakit-sketch-ckpt")
    }
    targets = {
        "lorakit-exact": {"time": 1.0, "memory": 1.0},
        "lorakit-sketch": {"time": 3.0, "memory": 0.25},
        "lorakit-sketch-ckpt": {"time": 3.0, "memory": 0.25},
    }
    print(f"\nSmolLM2-135M, {len(TARGETS) * 30} layers, {args.samples} samples × {args.length} tokens, rank {args.rank}")
    print(f"{'method':16s} {'time (s)':>9s} {'added MiB':>10s} {'time ratio':>11s} {'memory ratio':>13s} {'above floor':>12s}")
    for m in METHODS:
        r = ratios.get(m)
        cells = f"{r['time']:10.2f}× {r['memory']:12.2f}× {r['memory_above_floor']:11.2f}×" if r else ""
        print(f"{m:16s} {summary[m]['seconds']:9.1f} {summary[m]['added_MiB']:10.0f} {cells}")
    print("floor: one frozen forward/backward over the same batches (activations only), the least any estimator adds")
    met = {m: all(ratios[m][k] <= targets[m][k] for k in ("time", "memory")) for m in ratios}
    for m, ok in met.items():
        print(f"{m}: target time ≤ {targets[m]['time']}×, memory ≤ {targets[m]['memory']}× → {'met' if ok else 'NOT met'}")
    write_result(
        "estimation",
        {
            "model": "SmolLM2-135M-Instruct (fp32, dequantised GGUF)",
            "layers": len(TARGETS) * 30,
            "samples": args.samples,
            "tokens_per_sample": args.length,
            "rank": args.rank,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            "threads": args.threads,
            "memory_method": MEMORY_METHOD,
            "methods": summary,
            "ratios_vs_peft": ratios,
            "targets": targets,
            "targets_met": met,
        },
        status="ok" if all(met.values()) else "targets-missed",
    )


if __name__ == "__main__":
    main()
