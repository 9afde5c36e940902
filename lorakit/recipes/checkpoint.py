"""Training checkpoints: everything a resumed run needs to continue bit for bit.

    checkpoint/
      adapter/              lorakit.save_adapter (adapter runs): factors, offsets, modules_to_save
      model.safetensors     full fine-tuning: every trainable tensor
      optimizer.pt          optimizer.state_dict() (torch.save; read back with weights_only=True)
      rng.safetensors       torch CPU (and CUDA) RNG state of every process: dropout and NEFTune
                            noise ("cpu", "cuda0", ... for rank 0; "rank1.cpu", ... for the others)
      state.json            step, epoch, position in the epoch's order, scheduler state,
                            metrics-log offset, number of processes, optimizer.pt's SHA-256

The directory is written under a temporary name and renamed into place, so a kill leaves
either the previous checkpoint or the new one. ``optimizer.pt`` is only loaded when its
SHA-256 matches the one lorakit recorded in ``state.json``: files lorakit did not write
are refused (and even then torch.load runs with ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.errors import LorakitError
from lorakit.io import atomic_directory

CHECKPOINT_DIR = "checkpoint"


@dataclass
class Position:
    step: int  # optimizer steps done
    epoch: int  # epoch in progress
    batch: int  # micro-batches of that epoch already consumed
    metrics_offset: int  # bytes of metrics.jsonl written up to this step


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random-number state: CPU, and every visible CUDA device."""
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return rng


def _rank_prefix(rank: int) -> str:
    return "" if rank == 0 else f"rank{rank}."


def check_world_size(state: dict[str, Any], world: int) -> None:
    saved = int(state.get("world_size", 1))
    if saved != world:
        how = "without torchrun" if saved == 1 else f"with torchrun --nproc_per_node {saved}"
        raise LorakitError(f"the checkpoint was written by {saved} process(es) but {world} are running; resume {how} "
                           "(the position in the data depends on the number of processes)")


def save_checkpoint(run_dir: Path, model: nn.Module, full: bool, optimizer: torch.optim.Optimizer,
                    scheduler: Any, position: Position, rng: list[dict[str, torch.Tensor]] | None = None) -> Path:
    """``rng``: every process's rng_state(), in rank order (default: this process's alone)."""
    rng = rng if rng is not None else [rng_state()]
    target = run_dir / CHECKPOINT_DIR
    with atomic_directory(target) as tmp:
        if full:
            save_file(trainable_tensors(model), str(tmp / "model.safetensors"))
        else:
            lorakit.save_adapter(model, tmp / "adapter")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        save_file({_rank_prefix(r) + k: v for r, states in enumerate(rng) for k, v in states.items()},
                  str(tmp / "rng.safetensors"))
        state = {
            "format": "lorakit-checkpoint",
            "position": asdict(position),
            "world_size": len(rng),
            "scheduler": scheduler.state_dict(),
            "optimizer_sha256": _sha256(tmp / "optimizer.pt"),
        }
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
    return target


def read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CHECKPOINT_DIR / "state.json"
    if not path.is_file():
        raise LorakitError(f"{run_dir} has no checkpoint to resume from; train with train.checkpoint_every=N to write them")
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise LorakitError(f"{path} is corrupt; the run cannot be resumed from it") from None
    if state.get("format") != "lorakit-checkpoint":
        raise LorakitError(f"{path} is not a lorakit checkpoint")
    return state


def load_model_state(run_dir: Path, model: nn.Module, full: bool) -> None:
    """Bring a freshly loaded base model to the checkpoint's weights."""
    directory = run_dir / CHECKPOINT_DIR
    if not full:
        lorakit.load_adapter(model, directory / "adapter")
        return
    tensors = load_file(str(directory / "model.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def restore_training_state(run_dir: Path, state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                           rank: int = 0) -> Position:
    """Optimizer, scheduler and this process's RNG state; returns where to continue."""
    directory = run_dir / CHECKPOINT_DIR
    optimizer_file = directory / "optimizer.pt"
    if not optimizer_file.is_file() or _sha256(optimizer_file) != state.get("optimizer_sha256"):
        raise LorakitError(f"{optimizer_file} is missing or was not written by lorakit for this checkpoint; refusing to load it")
    optimizer.load_state_dict(torch.load(optimizer_file, weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(state["scheduler"])
    prefix = _rank_prefix(rank)
    rng = {k[len(prefix):]: v for k, v in load_file(str(directory / "rng.safetensors")).items()
           if k.startswith(prefix) and (prefix or not k.startswith("rank"))}
    if "cpu" not in rng:
        raise LorakitError(f"{directory / 'rng.safetensors'} holds no random state for process {rank}; the checkpoint is incomplete")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda")), key=lambda k: int(k[4:]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return Position(**state["position"])
