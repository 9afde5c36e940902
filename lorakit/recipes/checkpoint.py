"""Training checkpoints: everything a resumed run needs to continue bit for bit.

    checkpoint/
      step-00000120/          the last complete checkpoint (after optimizer step 120)
        adapter/              lorakit.save_adapter (adapter runs): factors, offsets, modules_to_save
        model.safetensors     full fine-tuning: every trainable tensor
        optimizer.pt          optimizer.state_dict() (torch.save; read back with weights_only=True)
        rng.safetensors       torch CPU (and CUDA) RNG state of every process: dropout and NEFTune
                              noise ("cpu", "cuda0", ... for rank 0; "rank1.cpu", ... for the others)
        state.json            step, epoch, position in the epoch's order, scheduler state,
                              metrics-log offset, number of processes, optimizer.pt's SHA-256

A checkpoint is written under a temporary name, flushed to disk and renamed to
``step-<N>`` in one step; only then is the previous one removed (renamed aside first). So
at every instant of a kill -9 the directory holds at least one complete checkpoint, or none
if the first was never finished (``--resume`` then starts the run over); the temporaries a
killed write leaves behind are removed by the next write or resume. ``optimizer.pt`` is only
loaded when its SHA-256 matches the one lorakit recorded in ``state.json``: files lorakit did
not write are refused (and even then torch.load runs with ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.errors import LorakitError
from lorakit.files import output_directory, remove_stale_temporaries, remove_tree, write_json

CHECKPOINT_DIR = "checkpoint"
_STEP_DIR = re.compile(r"step-(\d+)")


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


def _complete(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint, oldest first."""
    root = run_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None when none was finished."""
    found = _complete(run_dir)
    return found[-1][1] if found else None


def save_checkpoint(run_dir: Path, model: nn.Module, full: bool, optimizer: torch.optim.Optimizer,
                    scheduler: Any, position: Position, rng: list[dict[str, torch.Tensor]] | None = None,
                    extra: dict[str, Any] | None = None, *, entries: Any = None,
                    optimizer_state: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step-<position.step>`` and then drop the older ones. ``rng``: every
    process's rng_state(), in rank order (default: this process's alone); ``extra``: more
    numbers for state.json (e.g. the seconds spent so far). A sharded model (lorakit.recipes.fsdp)
    passes its gathered adapter ``entries`` and ``optimizer_state`` (default: read from the model
    and ``optimizer``)."""
    rng = rng if rng is not None else [rng_state()]
    root = run_dir / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root)
    target = root / f"step-{position.step:08d}"
    with output_directory(target, overwrite=True) as tmp:
        if full:
            save_file(trainable_tensors(model), str(tmp / "model.safetensors"))
        else:
            lorakit.save_adapter(model, tmp / "adapter", entries=entries)
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        save_file({_rank_prefix(r) + k: v for r, states in enumerate(rng) for k, v in states.items()},
                  str(tmp / "rng.safetensors"))
        write_json(tmp / "state.json", {
            **(extra or {}),
            "format": "lorakit-checkpoint",
            "position": asdict(position),
            "world_size": len(rng),
            "scheduler": scheduler.state_dict(),
            "optimizer_sha256": _sha256(tmp / "optimizer.pt"),
        })
    for step, older in _complete(run_dir):
        if older != target:
            remove_tree(older)
    return target


def _damaged(directory: Path, what: str) -> LorakitError:
    return LorakitError(f"checkpoint {directory} is damaged ({what}); delete {directory.parent} to start the run over "
                        "with --resume, or start a new run")


def read_state(run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """(checkpoint directory, its state.json) of the newest complete checkpoint, or None when the
    run has none (stale temporaries of a killed write are removed)."""
    remove_stale_temporaries(run_dir / CHECKPOINT_DIR)
    directory = latest(run_dir)
    if directory is None:
        return None
    try:
        state = json.loads((directory / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise _damaged(directory, "state.json is missing or not JSON") from None
    if not isinstance(state, dict) or state.get("format") != "lorakit-checkpoint":
        raise _damaged(directory, "state.json is not a lorakit checkpoint description")
    position = state.get("position")
    names = {f.name for f in fields(Position)}
    if not isinstance(position, dict) or set(position) != names or not all(isinstance(v, int) for v in position.values()):
        raise _damaged(directory, f"state.json's position must hold the integers {', '.join(sorted(names))}")
    if not isinstance(state.get("scheduler"), dict):
        raise _damaged(directory, "state.json has no scheduler state")
    return directory, state


def load_model_state(directory: Path, model: nn.Module, full: bool) -> None:
    """Bring a freshly loaded base model to the weights of checkpoint ``directory``."""
    if not full:
        try:
            lorakit.load_adapter(model, directory / "adapter")
        except LorakitError as exc:
            raise _damaged(directory, str(exc).split(";")[0]) from None
        return
    try:
        tensors = load_file(str(directory / "model.safetensors"))
    except Exception as exc:  # missing, truncated or garbled
        raise _damaged(directory, f"model.safetensors cannot be read: {type(exc).__name__}") from None
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    if unknown or any(params[n].shape != v.shape for n, v in tensors.items()):
        raise _damaged(directory, f"model.safetensors does not fit this model ({(unknown or ['a shape'])[0]})")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def restore_training_state(directory: Path, state: dict[str, Any], optimizer: torch.optim.Optimizer, scheduler: Any,
                           rank: int = 0, load_optimizer: Callable[[dict[str, Any]], None] | None = None) -> Position:
    """Optimizer, scheduler and this process's RNG state from checkpoint ``directory``; returns where to continue.
    ``load_optimizer``: how the saved optimizer state enters ``optimizer`` (default its load_state_dict)."""
    optimizer_file = directory / "optimizer.pt"
    if not optimizer_file.is_file() or _sha256(optimizer_file) != state.get("optimizer_sha256"):
        raise LorakitError(f"{optimizer_file} is missing or was not written by lorakit for this checkpoint; refusing to load it")
    try:
        (load_optimizer or optimizer.load_state_dict)(torch.load(optimizer_file, weights_only=True, map_location="cpu"))
    except Exception as exc:  # never repeat torch's advice to unpickle untrusted data
        raise _damaged(directory, f"optimizer.pt is not lorakit optimizer state for this run: {type(exc).__name__}") from None
    try:
        scheduler.load_state_dict(state["scheduler"])
        stored = load_file(str(directory / "rng.safetensors"))
    except Exception as exc:
        raise _damaged(directory, f"rng.safetensors or the scheduler state cannot be read: {type(exc).__name__}") from None
    prefix = _rank_prefix(rank)
    rng = {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix) and (prefix or not k.startswith("rank"))}
    if "cpu" not in rng:
        raise _damaged(directory, f"rng.safetensors holds no random state for process {rank}")
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda")), key=lambda k: int(k[4:]))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    return Position(**state["position"])
