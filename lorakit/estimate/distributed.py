"""Sum accumulators over ranks when torch.distributed is initialised (a no-op otherwise).

Each rank estimates on its own shard of the examples; after every pass the raw sums
Σᵢ ∇ℓᵢ (exact G, or the sketch products G·M / Gᵀ·M with the same test matrices M on every
rank, seeded per layer) and the example counts are all-reduced, then divided by the global
count. So N ranks × m examples give the same statistics as one process on N·m examples,
and every rank ends with identical statistics. Sketch mode sends (out + in)·k numbers per
layer and pass, not out × in.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def local_share(num_samples: int, rank: int, world: int) -> int:
    """This rank's part of ``num_samples`` (the first ``num_samples % world`` ranks take one more)."""
    return num_samples // world + (1 if rank < num_samples % world else 0)


def all_reduce_sum(tensors: list[Tensor]) -> None:
    """In-place sum over ranks (tensors on CPU are staged on the GPU for NCCL)."""
    if not is_distributed():
        return
    stage = dist.get_backend() == "nccl"
    for t in tensors:
        if stage and t.device.type == "cpu":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t)
