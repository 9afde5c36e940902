"""The training recipe under torch.distributed (torchrun, accelerate launch, SLURM + env vars).

    ctx = start(device_kind, timeout)   init the process group from the launcher's environment
                                        (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT), or
                                        adopt one the caller made; one process: a no-op context
    ctx.shard(items)                    this rank's contiguous share of a list
    ctx.agree(fn)                       fn() on rank 0 only; its result (or its LorakitError) on every rank
    ctx.sum(values) / ctx.max(value)    small all-reduces of Python numbers
    ctx.gather(obj)                     every rank's object, in rank order

Conventions: ``train.batch_size`` is per process, so N processes step on N·batch_size examples;
the loss is normalised by the global count of loss targets, so N processes give the gradient
of one process on the N-fold batch. Rank 0 alone writes files and prints. Every collective
runs under the process group's timeout, and a failure of another rank (exit, crash, hang)
becomes a one-line LorakitError instead of a hang.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, TypeVar

import torch
import torch.distributed as dist

from lorakit.errors import LorakitError
from lorakit.estimate.distributed import all_reduce, collective_errors, local_share

T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this recipe created the process group (and destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, items: list[T]) -> list[T]:
        """Contiguous shares in rank order (the first ``len % world`` ranks hold one more)."""
        start = sum(local_share(len(items), r, self.world) for r in range(self.rank))
        return items[start : start + local_share(len(items), self.rank, self.world)]

    def agree(self, fn: Callable[[], T], what: str) -> T:
        """Run ``fn`` on rank 0; every rank returns its result or raises the same LorakitError."""
        if not self.active:
            return fn()
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except LorakitError as exc:
                box[0] = ("error", str(exc))
        with collective_errors(what):
            dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise LorakitError(value)
        return value

    def sum(self, values: list[float], what: str) -> list[float]:
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        with collective_errors(what):
            all_reduce([t])
        return t.tolist()

    def max(self, value: float, what: str) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        with collective_errors(what):
            all_reduce([t], op=dist.ReduceOp.MAX)
        return float(t.item())

    def gather(self, obj: T, what: str) -> list[T]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        with collective_errors(what):
            dist.all_gather_object(out, obj)
        return out

    def barrier(self, what: str) -> None:
        if self.active:
            with collective_errors(what):
                dist.barrier()


def _launched_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise LorakitError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number; launch with torchrun --nproc_per_node N") from None


def start(device_kind: str, timeout_seconds: float) -> Context:
    """The process group of this run: adopted when the caller made one, created from the
    launcher's environment when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA), else none."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = _launched_world()
    if world <= 1:
        return Context()
    if not dist.is_available():
        raise LorakitError("WORLD_SIZE > 1 but this torch build has no torch.distributed; install a build with it")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise LorakitError(f"WORLD_SIZE={world} but {', '.join(missing)} not set; launch with torchrun --nproc_per_node {world}")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    backend = "nccl" if device_kind == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_seconds))
    return Context(rank, world, local_rank, owns_group=True)


@contextmanager
def no_sync(engine: torch.nn.Module) -> Iterator[None]:
    """Backward without the gradient all-reduce (accumulate this micro-batch locally): DDP's
    ``no_sync``, or for a model sharded with FSDP2 its ``set_requires_gradient_sync(False)``."""
    if hasattr(engine, "no_sync"):
        with engine.no_sync():
            yield
        return
    engine.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        engine.set_requires_gradient_sync(True)


def stop(ctx: Context) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def running(device_kind: str, timeout_seconds: float) -> Iterator[Context]:
    ctx = start(device_kind, timeout_seconds)
    try:
        yield ctx
    finally:
        stop(ctx)
