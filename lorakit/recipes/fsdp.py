"""``train.parallel: fsdp``: the recipe's model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    adapt_sharded(model, config, data, mesh)   zero adapters in place → fully_shard → estimate on the
                                               sharded model (lora-ga / lora-sb) → initialise unit by unit
    shard(model, config, mesh)                 fully_shard an adapted model's units (a resumed run's)
    adapter_entries(model, is_main)            the full adapter tensors, gathered unit by unit (rank 0 keeps them)
    checkpoint_state / optimizer_loader        a checkpoint's gathered adapter and optimizer state, and its way back
    attach / save_outputs / check_config       the recipe's steps under train.parallel=fsdp

Units (one FSDP parameter group each, all-gathered for their forward and backward): every
``modules_to_save`` module, every transformer block (the classes transformers lists in the model's
``_no_split_modules``, the blocks accelerate's FSDP auto-wrap shards too), the input embeddings and
the output head (unless tied), then the root (anything left, e.g. the final norm). Frozen base
weights and trainable factors share a unit: FSDP2 only needs the *trainable* parameters of a unit to
have one dtype (the factors' ``adapter_dtype``; a classifier head trained in the model's dtype is a
unit of its own). No MixedPrecisionPolicy: every tensor computes in the dtype it is stored in, as in
one process, so N sharded processes match one unsharded process.

Order: the adapters are installed zero-initialised *before* sharding (a zero low-rank path leaves the
model's function and every layer's input and output gradient unchanged), so estimation runs on the
sharded model; the factors are then computed from the all-reduced statistics identically on every
rank, one unit at a time with that unit all-gathered, and each rank keeps its own shard.

What each rank holds at peak (N ranks, P parameters of the base): its shard P/N of every weight
(and of the factors, their gradients and AdamW moments), plus the all-gathered units in flight —
one or two blocks (FSDP2 prefetches the next), the embeddings at the start of the forward, the head
at its end (both throughout it when tied), the root's few small tensors — plus one micro-batch's
activations. Estimation adds the statistics of every target (sketch: O((out + in)·k) per layer;
exact: out × in per layer of the current ``memory_budget`` group). The initialisation and
the final save all-gather one unit at a time. Loading the base model is not sharded here: each
process reads the full checkpoint (``from_pretrained``) before sharding it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.adaptation import CONFIG_ATTR, compactor, initialise_adapter
from lorakit.adapters import LowRankAdapter
from lorakit.config import AdapterConfig
from lorakit.errors import LorakitError
from lorakit.estimate.distributed import peer_errors
from lorakit.inject import adapters_of, find_targets, inject, input_embeddings, resolve_modules_to_save


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def block_names(model: nn.Module) -> list[str]:
    """The model's transformer blocks: modules of the classes in ``model._no_split_modules``."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    names = [n for n, m in model.named_modules() if n and any(c.__name__ in classes for c in type(m).__mro__)]
    if not names:
        raise LorakitError(f"train.parallel=fsdp: {type(model).__name__} names no transformer blocks (_no_split_modules); "
                           "use train.parallel=ddp")
    return names


def _units(model: nn.Module, config: AdapterConfig) -> list[str]:
    """The units to shard, innermost first ("" is the root)."""
    saved = resolve_modules_to_save(model, config)
    blocks = [b for b in block_names(model) if not any(_within(b, s) for s in saved)]
    taken = saved + blocks
    return sorted(taken + _embedding_units(model, taken), key=lambda n: -n.count(".")) + [""]


def _within(name: str, unit: str) -> bool:
    return name == unit or name.startswith(unit + ".")


def _embedding_units(model: nn.Module, taken: list[str]) -> list[str]:
    """The input embeddings and the output head, each a unit of its own (all-gathered only at the
    start / end of the forward rather than throughout it as the root is), unless tied (one weight
    in two modules stays in the root) or inside another unit already."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = [m for m in (input_embeddings(model), head) if m is not None]
    weights = [getattr(m, "weight", None) for m in modules]
    if len(weights) == 2 and weights[0] is weights[1]:
        return []
    names = [n for n, m in model.named_modules() if n and any(m is x for x in modules)]
    return [n for n in names if not any(_within(n, t) for t in taken)]


def _owner(name: str, units: list[str]) -> str:
    """The innermost unit holding module ``name``."""
    return max((u for u in units if u == "" or _within(name, u)), key=len)


def _check_trainable_dtypes(model: nn.Module, units: list[str]) -> None:
    for unit in units:
        module = model.get_submodule(unit)
        inner = [u for u in units if u != unit and (unit == "" or u.startswith(unit + "."))]
        dtypes = {p.dtype for n, p in module.named_parameters()
                  if p.requires_grad and not any(f"{unit}.{n}".lstrip(".").startswith(u + ".") for u in inner)}
        if len(dtypes) > 1:
            raise LorakitError(f"train.parallel=fsdp: the trainable tensors of {unit or 'the model'} have several dtypes "
                               f"({', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))}); FSDP2 needs one per "
                               "block: set adapter.adapter_dtype to the model's dtype")


def shard(model: nn.Module, config: AdapterConfig, mesh: Any) -> list[str]:
    """fully_shard every unit (see the module doc) of an adapted model; returns the unit names."""
    from torch.distributed.fsdp import fully_shard

    units = _units(model, config)
    _check_trainable_dtypes(model, units)
    for unit in units:
        fully_shard(model.get_submodule(unit), mesh=mesh)
    return units


@contextmanager
def unsharded(unit: nn.Module) -> Iterator[None]:
    """The unit's own parameters all-gathered (plain full tensors) inside; sharded again after."""
    unit.unshard()
    try:
        yield
    finally:
        unit.reshard()


def _write_shards(unit: nn.Module, sharded: dict[str, Tensor]) -> None:
    """Copy each all-gathered (and possibly changed) parameter of ``unit`` back into its shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, full in unit.named_parameters():
            if isinstance(full, DTensor):  # an inner unit's parameter: still sharded
                continue
            shard_of = sharded[name]
            mine = distribute_tensor(full.detach(), shard_of.device_mesh, shard_of.placements, src_data_rank=None)
            shard_of.to_local().copy_(mine.to_local())


def adapt_sharded(model: nn.Module, config: AdapterConfig, data: Any, mesh: Any, progress: bool = True) -> list[str]:
    """``lorakit.adapt`` for FSDP2: the same adapters and initial factors, with the model sharded
    before estimation. Returns the unit names."""
    names, units = install_sharded(model, config, mesh)
    initialise_sharded(model, config, data, names, units, progress)
    return units


def install_sharded(model: nn.Module, config: AdapterConfig, mesh: Any) -> tuple[list[str], list[str]]:
    """The first half of ``adapt_sharded``: zero adapters in place, then every unit fully_shard-ed.
    Returns (target names, unit names)."""
    names = find_targets(model, config)
    inject(model, config, names)
    return names, shard(model, config, mesh)


def initialise_sharded(model: nn.Module, config: AdapterConfig, data: Any, names: list[str], units: list[str],
                       progress: bool = True) -> None:
    """The second half of ``adapt_sharded``: estimate on the sharded model (data-driven inits), then
    initialise each unit's adapters with the unit gathered, and write back the shards."""
    adapters = {name: model.get_submodule(name) for name in names}
    stats = None
    if config.needs_data:
        if data is None:
            raise LorakitError(f"method {config.method!r} initialises from gradients: it needs estimation data")
        from lorakit.estimate import estimate

        # the taps sit on the adapters' base layers: with zero factors their x and ∂L/∂y are the plain model's
        with peer_errors("estimating on the sharded model"):
            stats = estimate(model, config, data, targets=names, progress=progress, compact=compactor(config))
    by_unit: dict[str, list[str]] = {}
    for name in names:
        by_unit.setdefault(_owner(name, units), []).append(name)
    for unit_name in units:
        unit = model.get_submodule(unit_name)
        sharded = dict(unit.named_parameters())
        with peer_errors("initialising the sharded adapters"), unsharded(unit):
            for name in by_unit.get(unit_name, []):
                initialise_adapter(adapters[name], name, config, stats.pop(name) if stats is not None else None)
            _write_shards(unit, sharded)
    setattr(model, CONFIG_ATTR, config)


def adapter_entries(model: nn.Module, is_main: bool) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, layers) for ``lorakit.save_adapter(..., entries=)``, gathered from the shards one unit
    at a time (every rank takes part; rank 0 keeps CPU copies, the others return empty mappings)."""
    from lorakit.adaptation import get_config
    from lorakit.io import layer_entries, module_entries

    units = _units(model, get_config(model))
    tensors: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}

    def keep(found: dict[str, Tensor]) -> None:
        if is_main:
            tensors.update({k: v.detach().to("cpu", copy=True) for k, v in found.items()})

    by_unit: dict[str, list[tuple[str, LowRankAdapter]]] = {}
    for name, adapter in adapters_of(model).items():
        by_unit.setdefault(_owner(name, units), []).append((name, adapter))
    for unit_name in units:
        with unsharded(model.get_submodule(unit_name)):
            for name, adapter in by_unit.get(unit_name, []):
                found, layers[name] = layer_entries(name, adapter)
                keep(found)
    # state_dict() gives FSDP2's shards (DTensors) even of an all-gathered unit: gather each tensor
    saved = module_entries(model, resolve_modules_to_save(model, get_config(model)))
    keep({k: full_tensor(v) for k, v in saved.items()})
    return tensors, (layers if is_main else {})


def full_tensor(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# -- the recipe under train.parallel=fsdp ---------------------------------------------------------
def mesh_of(s: Any) -> Any:
    """The 1-D device mesh of the run's processes (gloo on CPU, NCCL on CUDA)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(s.device.type, (s.ctx.world,))


def attach(s: Any, warmup: int, progress: bool = True) -> float:
    """``setup.attach`` for a sharded run: adapt_sharded with each process's share of the
    estimation examples. Returns the seconds it took."""
    from lorakit.linalg import single_thread_decompositions
    from lorakit.recipes import data as D
    from lorakit.recipes.setup import estimation_batches

    start = time.perf_counter()
    config = s.cfg.adapter_config(warmup)
    data = [D.to_device(b, s.device) for b in estimation_batches(s)] if config.needs_data else None
    with single_thread_decompositions():
        adapt_sharded(s.model, config, data, mesh_of(s), progress=progress)
    return time.perf_counter() - start


def save_adapter(s: Any, directory: Path) -> None:
    """The final adapter, a normal lorakit adapter, written by rank 0 from the gathered shards."""
    import lorakit

    entries = adapter_entries(s.model, s.ctx.is_main)
    if s.ctx.is_main:
        lorakit.save_adapter(s.model, directory, entries=entries)


def enabled(s: Any) -> bool:
    """Whether this run shards its model: train.parallel=fsdp with several processes (one process runs unsharded)."""
    return s.cfg.train.parallel == "fsdp" and s.ctx.active


def check_config(cfg: Any, ctx: Any) -> None:
    """What train.parallel=fsdp does not do yet, refused before any work."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and cfg.train.parallel != "fsdp":
        raise LorakitError("accelerate launch was given an FSDP config but train.parallel is "
                           f"{cfg.train.parallel}; add train.parallel=fsdp (lorakit shards with FSDP2 itself)")
    if cfg.train.parallel != "fsdp" or not ctx.active:
        return
    if cfg.is_full:
        raise LorakitError("train.parallel=fsdp trains adapters; full fine-tuning (adapter.method=full) runs with train.parallel=ddp")
    if cfg.optim.preconditioner is not None:
        raise LorakitError("optim.preconditioner=riemannian is not supported with train.parallel=fsdp (its r × r "
                           "preconditioners need whole factors); use train.parallel=ddp or drop the preconditioner")


def save_outputs(s: Any, run_dir: Path) -> None:
    """adapter/ from the gathered shards; the PEFT and merged exports need the whole model on one
    process, so a sharded run leaves them to ``lorakit export RUN_DIR --format peft|merged``."""
    save_adapter(s, run_dir / "adapter")
    if s.ctx.is_main and (s.cfg.output.peft or s.cfg.output.merged):
        print(f"train.parallel=fsdp wrote adapter/ only: export with `lorakit export {run_dir} --format peft` "
              "(or --format merged) in one process")


# -- checkpoints: the small adapter and optimizer state, gathered to rank 0 --------------------------
def checkpoint_state(model: nn.Module, optimizer: torch.optim.Optimizer, is_main: bool) -> dict[str, Any]:
    """``save_checkpoint``'s ``entries`` and ``optimizer_state``: the adapter and the optimizer state
    (keyed by parameter name, torch.distributed.checkpoint's full state dict) gathered to rank 0's CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    entries = adapter_entries(model, is_main)
    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"entries": entries, "optimizer_state": state} if is_main else {}


def optimizer_loader(model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
    """How a checkpoint's full optimizer state enters the sharded optimizer: each rank keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    def load(state: dict[str, Any]) -> None:
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    return load
