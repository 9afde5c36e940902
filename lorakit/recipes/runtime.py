"""Where a run computes: the device and the CPU thread count.

    pick_device("auto")      cuda when available, else cpu; under torchrun each process takes cuda:LOCAL_RANK
    cpu_threads(None)        the default intra-op thread count (see its doc)
"""

from __future__ import annotations

import os

import torch

from lorakit.errors import LorakitError
from lorakit.recipes import distributed as dist_ctx

TORCH_THREADS = torch.get_num_threads()  # torch's own default, before any run changes it


def pick_device(name: str, ctx: dist_ctx.Context | None = None) -> torch.device:
    """``train.device``; under torchrun with CUDA each process takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LorakitError(f"train.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and ctx is not None and ctx.active:
        return torch.device("cuda", ctx.local_rank)
    return device


def device_kind(name: str) -> str:
    """'cuda' or 'cpu': which process-group backend ``train.device`` needs."""
    return pick_device(name).type


def cpu_threads(requested: int | None) -> int:
    """``train.threads``, or by default a fixed count for this machine: torch's own default (the
    physical cores) within the CPUs this process may use, shared by torchrun's local processes.

    Fixed, so the same command gives bit-identical numbers on a given machine however busy it is
    (a different thread count changes the order of floating-point sums). On a machine shared
    with other jobs, set ``train.threads`` lower: threads waiting for a busy core slow every step.
    """
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # torchrun's processes on this machine
    return max(1, min(TORCH_THREADS, cores) // local_processes)
