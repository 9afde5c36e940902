"""Setup: the data and the model of a run, tokenised and placed, then the adapters attached.

    s = setup(cfg)             data splits, model + tokenizer, features; every input check happens here
    seconds = attach(s, w)     lorakit.adapt (estimating first for lora-ga / lora-sb), or unfreeze for full FT
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit.errors import LorakitError
from lorakit.linalg import single_thread_decompositions
from lorakit.recipes import data as D
from lorakit.recipes import distributed as dist_ctx
from lorakit.recipes.config import RunConfig
from lorakit.recipes.models import LoadedModel, load_model
from lorakit.recipes.runtime import cpu_threads, pick_device


@dataclass
class Setup:
    cfg: RunConfig
    loaded: LoadedModel
    splits: D.Splits
    features: dict[str, list[dict[str, Any]]]  # train / validation / test, tokenised
    prompts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # causal-lm: prompt ids per eval split
    options: dict[str, list[list[dict[str, Any]]]] = field(default_factory=dict)  # multiple-choice: option ids per eval split
    notes: list[str] = field(default_factory=list)  # what encoding the data cut or dropped, one line each
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # causal-lm: first generations per evaluated split
    device: torch.device = torch.device("cpu")
    ctx: dist_ctx.Context = field(default_factory=dist_ctx.Context)  # the processes of a torchrun launch

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def pad_id(self) -> int:
        return int(self.loaded.tokenizer.pad_token_id)


def setup(cfg: RunConfig, label_names: list[str] | None = None, ctx: dist_ctx.Context | None = None) -> Setup:
    """Data and model, tokenised; raises before anything is written when an input is bad."""
    ctx = ctx or dist_ctx.Context()
    device = pick_device(cfg.train.device, ctx)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.train.threads))
    splits = D.load_splits(cfg.data, cfg.task, label_names)
    if label_names is not None and splits.label_names is not None and label_names != splits.label_names:
        raise LorakitError(f"the data's labels {splits.label_names} differ from the run's {label_names}")
    if cfg.task == "classification" and splits.num_labels < 2:
        raise LorakitError(f"classification needs at least 2 classes, the data has {splits.num_labels}; check data.label_column")
    torch.manual_seed(cfg.train.seed)  # a fresh classifier head is drawn from this
    loaded = load_model(cfg.model, cfg.task, splits.num_labels or None, device)
    encoded = D.encode_splits(splits, cfg.data, cfg.task, loaded.tokenizer, cfg.model.max_length, cfg.model.name)
    if cfg.model.quantization is None:  # a quantized model is loaded onto its device
        loaded.model.to(device)
    return Setup(cfg, loaded, splits, encoded.features, encoded.prompts, encoded.options, splits.notes + encoded.notes,
                 device=device, ctx=ctx)


def estimation_batches(s: Setup) -> list[dict[str, torch.Tensor]]:
    """The first examples of the epoch-0 order: the data lora-ga / lora-sb estimate from (each
    process takes its contiguous share; lorakit.estimate sums the statistics over processes)."""
    n = s.cfg.adapter_config().estimation.num_samples
    order = s.ctx.shard(D.epoch_order(len(s.features["train"]), s.cfg.train.seed, 0)[:n])
    return list(D.batches(s.features["train"], s.cfg.train.batch_size, s.pad_id, order))


def unfreeze(model: nn.Module) -> None:
    """Full fine-tuning: every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)


def attach(s: Setup, warmup: int, progress: bool = True) -> float:
    """Full fine-tuning: unfreeze everything. Otherwise lorakit.adapt (estimating first when the
    method needs data). Returns the seconds it took."""
    start = time.perf_counter()
    if s.cfg.is_full:
        unfreeze(s.model)
    else:
        config = s.cfg.adapter_config(warmup)
        data = [D.to_device(b, s.device) for b in estimation_batches(s)] if config.needs_data else None
        with single_thread_decompositions():  # the recipe owns this process's threads
            lorakit.adapt(s.model, config, data=data, progress=progress)
    return time.perf_counter() - start
