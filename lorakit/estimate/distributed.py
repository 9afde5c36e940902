"""Sum accumulators over ranks when torch.distributed is initialised (a no-op otherwise).

Each rank estimates on its own shard of the examples; after every pass the raw sums
Σᵢ ∇ℓᵢ (exact G, or the sketch products G·M / Gᵀ·M with the same test matrices M on every
rank, seeded per layer) and the example counts are all-reduced, then divided by the global
count. So N ranks × m examples give the same statistics as one process on N·m examples,
and every rank ends with identical statistics. Sketch mode sends (out + in)·k numbers per
layer and pass, not out × in.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from lorakit.errors import LorakitError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def local_share(num_samples: int, rank: int, world: int) -> int:
    """This rank's part of ``num_samples`` (the first ``num_samples % world`` ranks take one more)."""
    return num_samples // world + (1 if rank < num_samples % world else 0)


@contextmanager
def collective_errors(what: str) -> Iterator[None]:
    """Turn a failed collective (another rank exited, crashed or timed out) into a one-line error."""
    try:
        yield
    except RuntimeError as exc:  # DistBackendError and gloo/NCCL timeouts are RuntimeErrors
        raise _peer_failure(what, exc) from None


# what gloo / NCCL / c10d say when a peer is gone or silent (their errors are plain RuntimeErrors)
_PEER_FAILURE = re.compile(r"gloo|nccl|connection (?:closed|reset|refused)|timed out|timeout|broken pipe", re.IGNORECASE)


@contextmanager
def peer_errors(what: str) -> Iterator[None]:
    """Like ``collective_errors`` around code that communicates only now and then (e.g. FSDP's
    all-gathers inside forward and backward): a failed collective becomes the one-line error, any
    other RuntimeError (a bug, out of memory) stays what it is."""
    try:
        yield
    except RuntimeError as exc:
        if not is_distributed() or not (isinstance(exc, getattr(dist, "DistError", ())) or _PEER_FAILURE.search(str(exc))):
            raise
        raise _peer_failure(what, exc) from None


def _peer_failure(what: str, exc: Exception) -> LorakitError:
    rank = dist.get_rank() if is_distributed() else 0
    return LorakitError(
        f"rank {rank}: the other processes stopped answering while {what} ({_backend_reason(exc)}); "
        "one of them failed or timed out: see its own error above"
    )


def _backend_reason(exc: Exception) -> str:
    """The first sentence of a gloo/NCCL error, without its source-file location."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    text = re.sub(r"\[[^\]]*\.(?:cc|cpp|h):\d+\]\s*", "", text)
    return re.split(r"(?<=[a-z0-9\]])\. ", text, maxsplit=1)[0][:200]


def all_reduce(tensors: list[Tensor], op=dist.ReduceOp.SUM if dist.is_available() else None) -> None:
    """In-place reduction over ranks (tensors on CPU are staged on the GPU for NCCL)."""
    if not is_distributed():
        return
    stage = dist.get_backend() == "nccl"
    for t in tensors:
        if stage and t.device.type == "cpu":
            on_gpu = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(on_gpu, op=op)
            t.copy_(on_gpu)
        else:
            dist.all_reduce(t, op=op)


def all_reduce_sum(tensors: list[Tensor], what: str = "summing gradient statistics") -> None:
    """In-place sum over ranks; a rank that failed or hung is a LorakitError here, not a hang."""
    with collective_errors(what):
        all_reduce(tensors)
