"""model.dtype=bfloat16: a tiny Llama trains a few steps with finite losses for every method, the
base stays bf16, and the adapter factors and their AdamW state are fp32 (the documented default on
a half-precision base; adapter.adapter_dtype=bfloat16 keeps them bf16)."""

from __future__ import annotations

import math

import pytest
import torch

import assets
import lorakit
from lorakit.recipes import loop
from lorakit.recipes.config import from_dict
from lorakit.recipes.setup import attach, setup


class _Log:
    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, record: dict) -> None:
        self.records.append(record)


def _train_bf16(tmp_path, adapter: dict, optim: dict | None = None, steps: int = 3):
    adapter = {"rank": 4, **adapter, **({"num_samples": 8} if adapter["method"] in ("lora-ga", "lora-sb") else {})}
    config = assets.causal_config(tmp_path, model={"dtype": "bfloat16"}, adapter=adapter, optim=optim or {},
                                  train={"max_steps": steps, "epochs": 1, "batch_size": 4}, eval={"every_epoch": False})
    s = setup(from_dict(config))
    budget = loop.Budget.of(s.cfg, len(s.features["train"]), 1)
    attach(s, budget.warmup, progress=False)
    before = {n: p.detach().clone() for n, p in s.model.named_parameters() if p.requires_grad}
    opt = loop.Optimization.build(s.model, s.cfg, budget, s.device)
    log = _Log()
    loop.fit(s, opt, log, progress=False)
    return s, opt, before, [r["loss"] for r in log.records if r["type"] == "train"]


def _check_trained(s, opt, before, losses, factor_dtype, steps=3):
    assert len(losses) == steps and all(math.isfinite(l) for l in losses), losses
    trainable = {n: p for n, p in s.model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == factor_dtype for p in trainable.values()), {n: p.dtype for n, p in trainable.items()}
    assert all(torch.isfinite(p).all() for p in trainable.values())
    assert any(not torch.equal(p, before[n]) for n, p in trainable.items())  # the steps moved the adapters
    base = {n: p for n, p in s.model.named_parameters() if n.endswith((".weight", ".bias"))}
    assert base and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in base.values())  # the base stays bf16
    factors = {n: p for n, p in s.model.named_parameters() if n not in base}  # frozen ones too (lora-fa's A)
    assert all(p.dtype == factor_dtype for p in factors.values()), {n: p.dtype for n, p in factors.items()}
    states = [t for state in opt.optimizer.state.values() for t in state.values()
              if torch.is_tensor(t) and t.is_floating_point() and t.ndim > 0]
    assert states and all(t.dtype == factor_dtype for t in states)
    assert all(a.adapter_dtype == factor_dtype for a in lorakit.adapters_of(s.model).values())


@pytest.mark.parametrize("method", sorted(lorakit.METHODS))
def test_bfloat16_base_trains_finite_with_fp32_factors_and_state(tmp_path, method):
    s, opt, before, losses = _train_bf16(tmp_path, {"method": method})
    _check_trained(s, opt, before, losses, torch.float32)


def test_bfloat16_riemannian_preconditioner_trains_finite(tmp_path):
    s, opt, before, losses = _train_bf16(tmp_path, {"method": "lora"}, {"preconditioner": "riemannian"})
    _check_trained(s, opt, before, losses, torch.float32)


def test_bfloat16_factors_when_asked(tmp_path):
    s, opt, before, losses = _train_bf16(tmp_path, {"method": "lora", "adapter_dtype": "bfloat16"})
    _check_trained(s, opt, before, losses, torch.bfloat16)
