"""Gradient checkpointing on a decoder: peak memory and step time with and without
``train.gradient_checkpointing`` (issue 14).

    nice python bench/checkpointing.py [--repeats 2] [--steps 1] [--batch 8] [--seq 512] [--threads 1]

SmolLM2-135M-Instruct (fp32), LoRA rank 16 on all seven linear projections of every block,
AdamW, one batch of ``--batch`` sequences of ``--seq`` tokens (seeded random token ids with
every position in the loss: the cost does not depend on the text), causal-LM loss. Checkpointing
is switched on exactly as the recipe does (lorakit.recipes.loop.gradient_checkpointing).

Each measurement is a fresh process (so its peak memory is its own): load, adapt, ``--warmup`` untimed
steps, then ``--steps`` timed steps (forward + backward + optimizer step). Each step's user and system CPU time and minor page faults (getrusage) are recorded beside its wall
time: the step without checkpointing first-touches several GB of new activations. Peak memory is the
process's peak resident set (VmHWM) over the steps, after the peak is reset once the model is
loaded and its weights paged in by a tiny no-grad forward (Linux /proc/self/clear_refs), and
the part of it above the resident set before the first step (activations, gradients, optimizer
state). A batch of 8 x 512 takes about a minute per step on one core, so by default there is
no warm-up step (``--warmup``): the tiny forward has already paged in the weights. The two settings take turns, ``--repeats``
times each; the figures are medians and the result is their ratio. The result file is written
after every finished repeat (status "partial" until the last), so a stopped run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def child(on: bool, batch: int, seq: int, steps: int, warmup: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import lorakit
    from lorakit.recipes.config import ModelSection
    from lorakit.recipes.loop import gradient_checkpointing
    from lorakit.recipes.models import load_model

    model = load_model(ModelSection(name="smollm2"), "causal-lm").model
    lorakit.adapt(model, lorakit.AdapterConfig(method="lora", rank=16, targets=TARGETS), progress=False)
    gradient_checkpointing(model, on)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    usage: list[dict[str, float]] = []

    def step() -> float:
        """One step's wall seconds; its user and system CPU seconds and minor page faults go to ``usage``."""
        start, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        after = resource.getrusage(resource.RUSAGE_SELF)
        usage.append({"user_seconds": after.ru_utime - before.ru_utime, "system_seconds": after.ru_stime - before.ru_stime,
                      "minor_page_faults": after.ru_minflt - before.ru_minflt})
        return time.perf_counter() - start

    with torch.no_grad():  # pages every weight in (they are memory-mapped) and warms the kernels up
        model(input_ids=ids[:1, :8])
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    warmups = [step() for _ in range(warmup)]
    times = [step() for _ in range(steps)]
    peak = _status_mb("VmHWM")
    return {"checkpointing": on, "rss_before_mb": before, "peak_rss_mb": peak, "peak_above_start_mb": peak - before,
            "step_seconds": times, "warmup_seconds": warmups, "step_usage": usage[warmup:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=0, help="untimed steps before the timed ones")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "on", args.batch, args.seq, args.steps, args.warmup, args.threads)))
        return

    runs: list[dict] = []
    for repeat in range(args.repeats):
        for mode in ("off", "on"):  # interleaved: machine noise hits both alike
            cmd = [sys.executable, __file__, "--child", mode, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"checkpointing={mode} failed: {proc.stderr.strip().splitlines()[-1]}")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
            run["repeat"] = repeat
            runs.append(run)
            print(f"repeat {repeat} checkpointing {mode}: step {statistics.median(run['step_seconds']):.1f}s, "
                  f"peak {run['peak_rss_mb']:.0f} MB (+{run['peak_above_start_mb']:.0f} MB)", flush=True)
        # after every finished pair, so a stopped run keeps its finished repeats ("partial")
        write_result("checkpointing", figures(args, runs), status="ok" if repeat + 1 == args.repeats else "partial")


def figures(args: argparse.Namespace, runs: list[dict]) -> dict:
    """Medians over the finished repeats of each setting, and the with/without ratios."""
    def summary(on: bool) -> dict:
        mine = [r for r in runs if r["checkpointing"] == on]
        return {
            "step_seconds_median": statistics.median(t for r in mine for t in r["step_seconds"]),
            "peak_rss_mb_median": statistics.median(r["peak_rss_mb"] for r in mine),
            "peak_above_start_mb_median": statistics.median(r["peak_above_start_mb"] for r in mine),
            "rss_before_mb_median": statistics.median(r["rss_before_mb"] for r in mine),
            **{f"{k}_median": statistics.median(u[k] for r in mine for u in r["step_usage"])
               for k in ("user_seconds", "system_seconds", "minor_page_faults") if all(r.get("step_usage") for r in mine)},
        }

    off, on = summary(False), summary(True)
    return {
        "model": "SmolLM2-135M-Instruct (fp32)", "adapter": "lora rank 16, all linear projections", "optimizer": "AdamW",
        "batch": args.batch, "seq": args.seq, "threads": args.threads, "repeats": args.repeats,
        "repeats_done": len({r["repeat"] for r in runs}), "steps": args.steps, "warmup_steps": args.warmup,
        "off": off, "on": on,
        "ratios": {"step_time": on["step_seconds_median"] / off["step_seconds_median"],
                   "peak_rss": on["peak_rss_mb_median"] / off["peak_rss_mb_median"],
                   "peak_above_start": on["peak_above_start_mb_median"] / off["peak_above_start_mb_median"]},
        "runs": runs,
    }


if __name__ == "__main__":
    main()
