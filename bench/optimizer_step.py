"""Step time of scaled (Riemannian) AdamW vs plain AdamW on the same adapted model (issue 4).

    python bench/optimizer_step.py [--repeats 31] [--steps 1] [--rank 16] [--batch 16] [--threads 1] [--output NAME]

Real all-MiniLM-L6-v2 classifier, Rotten Tomatoes batch (64 tokens), lorakit lora on all
linear layers, r = 16. ONE adapted model; two optimizers over the same parameters:
``make_optimizer(model)`` and ``make_optimizer(model, preconditioner="riemannian")``.
Measured side by side, interleaved; ratios are medians over repeats of the ratio within
one repeat (machine drifts cancel):
- train step: forward + backward + optimizer step (the target: scaled/plain ≤ 1.05×);
- optimizer step alone (gradients fixed), and the preconditioner alone, to show where
  the extra time goes.
A torch profiler summary (self CPU ms per operator of one optimizer step, riemannian vs plain)
shows what the extra time is; the preconditioner's arithmetic (4r²(in + out) FLOPs per pair:
two r × r Grams and two products with P) over the time of its GEMMs gives their FLOP rate and
the ratio the step could reach if everything but those GEMMs were free.
Both wall time and process CPU time are recorded: on a shared, loaded machine CPU time is
the steadier of the two (other processes' time slices do not count). ``--threads`` sets
torch's intra-op threads (default 1, which keeps the measurement stable on 2 shared cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import lorakit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import minilm_padded, profile_compare, write_result  # noqa: E402


def interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds of each call, the fns taking turns (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    times: dict[str, dict[str, list[float]]] = {"wall": {k: [] for k in fns}, "cpu": {k: [] for k in fns}}
    for _ in range(repeats):
        for key, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            times["cpu"][key].append(time.process_time() - c)
            times["wall"][key].append(time.perf_counter() - w)
    return times


def medians(times: dict[str, dict[str, list[float]]], per_call: int) -> dict[str, dict[str, float]]:
    return {clock: {k: statistics.median(v) / per_call for k, v in t.items()} for clock, t in times.items()}


def paired_ratio(times: dict[str, dict[str, list[float]]], clock: str) -> float:
    """Median over repeats of (riemannian / plain) within the same repeat: drifts of the machine cancel."""
    t = times[clock]
    return statistics.median(r / p for r, p in zip(t["riemannian adamw"], t["adamw"]))


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="result name (default optimizer_step, optimizer_step_r<rank> for r != 16)")
    return parser.parse_args()


def adapted_minilm(rank: int, batch_size: int):
    """MiniLM with lora on every linear layer in a mid-training state (B ≠ 0, so both Gram matrices are
    non-trivial), a Rotten Tomatoes batch, and the two optimizers over the same parameters."""
    model, batch = minilm_padded(batch_size, 64)
    lorakit.adapt(model, lorakit.AdapterConfig(method="lora", rank=rank, alpha=2 * rank))
    with torch.no_grad():
        for adapter in lorakit.adapters_of(model).values():
            adapter.B.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(0))
    model.train()
    # tiny lr: both optimizers move the same weights, which should stay where they are
    optimizers = {
        "adamw": lorakit.make_optimizer(model, "adamw", lr=1e-8),
        "riemannian adamw": lorakit.make_optimizer(model, "adamw", lr=1e-8, preconditioner="riemannian"),
    }
    return model, batch, optimizers


def timings(model, batch, optimizers, repeats: int, steps: int):
    """Interleaved train steps (forward + backward + optimizer), then optimizer steps alone on fixed
    gradients, with the preconditioner alone beside them."""
    preconditioner = optimizers["riemannian adamw"].preconditioner

    def train_steps(opt):
        def run() -> None:
            for _ in range(steps):
                model(**batch).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        return run

    def optimizer_steps(opt):
        return lambda: [opt.step() for _ in range(20)]

    train_times = interleaved({k: train_steps(o) for k, o in optimizers.items()}, repeats)
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()  # fixed gradients for the optimizer-only timing
    opt_times = interleaved(
        {**{k: optimizer_steps(o) for k, o in optimizers.items()},
         "preconditioner": lambda: [preconditioner.preconditioned_gradients() for _ in range(20)]},
        repeats,
    )
    return train_times, opt_times


def step_ratios(train_times, opt_times, train, opt_only, gemm_ms: float, plain_ms: float) -> dict[str, float]:
    ratios = {}
    for clock in ("cpu", "wall"):
        ratios[f"train step ({clock}): riemannian / plain"] = paired_ratio(train_times, clock)
        ratios[f"optimizer step ({clock}): riemannian / plain"] = paired_ratio(opt_times, clock)
        # the same ratio built from the steadier parts: plain train step + the optimizer steps' difference
        extra = opt_only[clock]["riemannian adamw"] - opt_only[clock]["adamw"]
        ratios[f"train step ({clock}), from parts: (plain + optimizer difference) / plain"] = 1 + extra / train[clock]["adamw"]
    ratios["optimizer step (profiled cpu), if all but the preconditioner's GEMMs were free: (plain + GEMMs) / plain"] = \
        1 + gemm_ms / plain_ms
    return ratios


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    model, batch, optimizers = adapted_minilm(args.rank, args.batch)
    preconditioner = optimizers["riemannian adamw"].preconditioner

    load_before = os.getloadavg()
    train_times, opt_times = timings(model, batch, optimizers, args.repeats, args.steps)
    train, opt_only = medians(train_times, args.steps), medians(opt_times, 20)
    every_op = profile_compare({"riemannian": optimizers["riemannian adamw"].step, "plain": optimizers["adamw"].step},
                               calls=20, warmup=1, top=10**6)
    profile = every_op[:12]
    flops = sum(4 * A.shape[0] ** 2 * (A.shape[1] + B.shape[0]) for A, B in preconditioner.pairs)
    gemm_ms = sum(r["riemannian"] - r["plain"] for r in profile if r["op"] in ("aten::bmm", "aten::mm"))
    plain_ms = sum(r["plain"] for r in every_op)
    ratios = step_ratios(train_times, opt_times, train, opt_only, gemm_ms, plain_ms)

    for what, m in (("train step", train), ("optimizer step", opt_only)):
        for k in m["cpu"]:
            print(f"{what:15s} {k:18s} cpu {1000 * m['cpu'][k]:9.3f} ms   wall {1000 * m['wall'][k]:9.3f} ms")
    for k, v in ratios.items():
        print(f"{k:72s} {v:.3f}x")
    print(f"preconditioner: {flops / 1e6:.1f} MFLOP per step in GEMMs of {gemm_ms:.3f} ms ({flops / gemm_ms / 1e6:.1f} GFLOP/s); "
          f"profiled plain AdamW step {plain_ms:.3f} ms")
    print("profile, self CPU ms of one optimizer step (riemannian vs plain), largest differences:")
    for row in profile:
        print(f"  {row['op']:40s} {row['riemannian']:8.3f} ({row['calls riemannian']:4d})  {row['plain']:8.3f} "
              f"({row['calls plain']:4d})  {row['extra']:+8.3f}")
    write_result(
        args.output or ("optimizer_step" if args.rank == 16 else f"optimizer_step_r{args.rank}"),
        {
            "model": "all-MiniLM-L6-v2 (sequence classification)",
            "data": "Rotten Tomatoes, padded to 64 tokens",
            "method": "lora",
            "rank": args.rank,
            "batch": args.batch,
            "targets": "all-linear",
            "pairs": len(preconditioner.pairs),
            "pairs_per_shape_bucket": [len(b) for b in preconditioner._buckets],
            "trainable_parameters": lorakit.parameter_report(model).trainable,
            "repeats": args.repeats,
            "torch_threads": args.threads,
            "steps_per_repeat": args.steps,
            "load_average": {"before": load_before, "after": os.getloadavg()},
            "train_step_seconds_median": train,
            "optimizer_step_seconds_median": opt_only,
            "ratios": ratios,
            "preconditioner_flops_per_step": flops,
            "preconditioner_gemm_ms_per_step": gemm_ms,
            "profiled_plain_step_ms": plain_ms,
            "profile_riemannian_vs_plain_ms": profile,
            "target": {"train step (cpu): riemannian / plain": "<= 1.05",
                       "optimizer step (cpu): riemannian / plain": "<= 1.15"},
            "target_met": ratios["train step (cpu): riemannian / plain"] <= 1.05
                          and ratios["optimizer step (cpu): riemannian / plain"] <= 1.15,
        },
    )


if __name__ == "__main__":
    main()
