"""Per-rank peak memory of FSDP2 estimation and training vs one process (issue 16).

    nice python bench/scaling_fsdp.py [--size 3] [--ranks 2] [--steps 2]

The config-built Llama of bench/scaling.py (random weights, float32), lora-ga rank 16 on every
linear layer, estimated with the sketch + activation checkpointing on 2 samples of 64 tokens
(each rank its share), then ``--steps`` AdamW steps of one sample per rank and step (no
checkpointing in training). One process: the plain model, ``lorakit.adapt``. N processes
(torchrun, gloo on the CPU): ``lorakit.recipes.fsdp.adapt_sharded``'s two halves as two phases,
"shard" (``install_sharded``: adapters installed, every block fully_shard-ed, the full weights
freed) and "estimation" (``initialise_sharded``: estimated on the sharded model, initialised). Memory per rank: peak resident set
(VmHWM after clear_refs=5) during each phase, minus the resident set before the model is built,
so it counts the rank's weights (its shard, under FSDP) plus what the phase adds. Building the
model is not sharded (each rank builds it in full, then shards it): that transient is reported
as "build". Same worker environment as bench/estimation.py (bench/common.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import proc_status, run_worker, write_result  # noqa: E402
from scaling import SIZES, TARGETS, batches, build, size_facts  # noqa: E402


def _phase(fn) -> float:
    """Peak resident MiB during fn() (the counter reset first)."""
    Path("/proc/self/clear_refs").write_text("5")
    fn()
    return proc_status("VmHWM") / 2**20


def worker(size: int, steps: int, samples: int, length: int, lora_rank: int) -> dict | None:
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    import lorakit

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    start = proc_status("VmRSS") / 2**20
    holder = {}
    peaks = {"build": _phase(lambda: holder.setdefault("model", build(size)))}
    model = holder["model"]
    mine = batches(samples, length)[rank::world]
    config = lorakit.AdapterConfig(method="lora-ga", rank=lora_rank, targets=TARGETS, num_samples=samples,
                                   estimator="sketch", estimate_checkpointing=True)

    if world > 1:  # sharded first (its own phase: the full model is still resident at its start), then estimated
        from torch.distributed.device_mesh import init_device_mesh

        from lorakit.recipes import fsdp

        installed = {}
        peaks["shard"] = _phase(lambda: installed.update(zip(("names", "units"), fsdp.install_sharded(
            model, config, init_device_mesh("cpu", (world,))))))
        gc.collect()

        def estimate() -> None:
            fsdp.initialise_sharded(model, config, mine, installed["names"], installed["units"], progress=False)
    else:
        def estimate() -> None:
            lorakit.adapt(model, config, data=mine, progress=False)

    peaks["estimation"] = _phase(estimate)
    model.train()

    def train() -> None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for step in range(steps):
            batch = mine[step % len(mine)]
            model(**batch, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    peaks["training"] = _phase(train)
    result = {k: v - start for k, v in peaks.items()}
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        dist.destroy_process_group()
        if rank != 0:
            return None
        return {"per_rank": gathered, "max": {k: max(g[k] for g in gathered) for k in result}}
    return {"per_rank": [result], "max": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=len(SIZES) - 1)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        out = worker(args.size, args.steps, args.samples, args.length, args.rank)
        if out is not None:
            print(json.dumps(out))
        return
    common = ["--worker", "--size", str(args.size), "--steps", str(args.steps), "--samples", str(args.samples),
              "--length", str(args.length), "--rank", str(args.rank)]
    peaks = {}
    for n in (1, args.ranks):
        launch = [sys.executable, __file__] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                            "--nproc_per_node", str(n), __file__]
        peaks[str(n)] = run_worker(launch + common)
        print(n, json.dumps(peaks[str(n)]["max"]), flush=True)
    facts = size_facts(*SIZES[args.size])
    write_result("scaling_fsdp", {
        "model": f"config-built Llama, {facts['parameters'] / 1e6:,.0f}M parameters (hidden {facts['hidden']}, {facts['layers']} "
                 "layers), float32, random weights",
        "detail": f"lora-ga rank {args.rank} on all linear layers, sketch + checkpointing on {args.samples} samples of "
                  f"{args.length} tokens (each rank its share), then {args.steps} AdamW steps of one sample per rank; gloo, "
                  "torchrun, 1 thread per rank",
        "parameters": facts["parameters"],
        "peaks_MiB": {n: v["max"] for n, v in peaks.items()},
        "per_rank_MiB": {n: v["per_rank"] for n, v in peaks.items()},
        "weights_MiB": facts["parameters"] * 4 / 2**20,
    })


if __name__ == "__main__":
    main()
