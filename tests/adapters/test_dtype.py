"""Adapters follow the model's dtype: ``model.to(dtype)`` after ``adapt`` works for every
structure, and DoRA's merged and unmerged outputs agree to the rounding of the dtype."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import MODELS, batch_for, perturb_trainables, rel
from torch import nn

import lorakit
from lorakit.adapters import DoRA

# every structure, with and without a base offset
CONFIGS = {
    "lora": dict(method="lora"),
    "lora-fa": dict(method="lora-fa"),
    "lora-xs": dict(method="lora-xs"),
    "dora": dict(method="dora"),
    "pissa": dict(method="pissa"),
    "svd-fa": dict(method="svd-fa"),
    "dora+pissa": dict(method="dora", init="pissa"),
    "lora-ga": dict(method="lora-ga"),
    "lora-sb+offset": dict(method="lora-sb", preserve_init=True, eta=1e-2),
}


def adapted(kind: str, name: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    model = MODELS[kind](dtype=dtype)
    config = lorakit.AdapterConfig(rank=2, **CONFIGS[name])
    data = [batch_for(kind, 3, 9, seed=1), batch_for(kind, 2, 7, seed=2)] if config.needs_data else None
    lorakit.adapt(model, config, data=data)
    perturb_trainables(model, scale=0.05)
    return model


def loss_and_grads(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_model_to_half_after_adapt_runs_forward_and_backward(model_kind, name, dtype):
    model = adapted(model_kind, name)
    reference = copy.deepcopy(model)
    model.to(dtype)
    for adapter in lorakit.adapters_of(model).values():
        assert adapter.adapter_dtype == dtype and adapter.base_weight.dtype == dtype
    batch = batch_for(model_kind)
    ref_logits, ref_loss, ref_grads = loss_and_grads(reference, batch)
    logits, loss, grads = loss_and_grads(model, batch)
    assert logits.dtype == dtype
    # a half-precision copy of the same model: its output within a few % of float64's
    assert rel(logits.double(), ref_logits) < 0.05
    assert set(grads) == set(ref_grads)
    for n, g in grads.items():
        assert g is not None and g.dtype == dtype and torch.isfinite(g).all(), n
    flat = torch.cat([g.double().flatten() for g in grads.values()])
    ref_flat = torch.cat([ref_grads[n].flatten() for n in grads])
    assert rel(flat, ref_flat) < 0.1


@pytest.mark.parametrize("name", ["lora", "dora", "pissa", "lora-xs"])
def test_adapter_dtype_is_read_from_the_factors_at_call_time(name):
    model = adapted("llama", name, dtype=torch.float32)
    model.double()
    adapter = next(iter(lorakit.adapters_of(model).values()))
    assert adapter.adapter_dtype == torch.float64
    x = torch.randn(3, adapter.in_features, dtype=torch.float64)
    adapter.merge()
    merged = adapter(x)
    adapter.unmerge()
    assert rel(adapter(x), merged) < 1e-12  # the whole computation in float64 after the cast


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_default_adapter_dtype_on_a_half_precision_base_is_float32(base_dtype):
    model = MODELS["llama"](dtype=base_dtype)
    lorakit.adapt(model, lorakit.AdapterConfig(method="dora", rank=2))
    for adapter in lorakit.adapters_of(model).values():
        assert adapter.adapter_dtype == torch.float32 and adapter.base_weight.dtype == base_dtype
        assert adapter.magnitude.dtype == torch.float32
    out = model(**batch_for("llama"))
    assert out.logits.dtype == base_dtype
    out.loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_explicit_adapter_dtype_on_a_half_precision_base_is_kept():
    model = MODELS["llama"](dtype=torch.bfloat16)
    lorakit.adapt(model, lorakit.AdapterConfig(method="lora", rank=2, adapter_dtype="bfloat16"))
    assert all(a.adapter_dtype == torch.bfloat16 for a in lorakit.adapters_of(model).values())


def test_low_rank_path_does_not_cast_when_dtypes_match(monkeypatch):
    adapter = lorakit.adapters.LoRA(nn.Linear(6, 5), rank=2, scale=1.0)
    x = torch.randn(4, 6)
    calls = []
    original = torch.Tensor.to

    def spy(self, *args, **kwargs):
        calls.append((args, kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    adapter(x)
    assert calls == []


# -- DoRA: one norm, in float32, for forward and merge -----------------------------------------------
BF16_UNIT_ROUNDOFF = 2.0**-8  # bfloat16 keeps 8 significant bits: |fl(v) − v| ≤ 2⁻⁸·|v|


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_dora_merged_equals_unmerged_in_bfloat16_to_its_rounding(adapter_dtype):
    """Both outputs are y = x·W'ᵀ + b with W' = (m / ‖V‖) ⊙ V, V = W + sBA, on a bf16 base.

    Elementwise (worst case): merged rounds each W'_ij once (≤ u·|W'_ij|) and its output
    (≤ u·|y_i|); unmerged rounds x·Wᵀ + b (carried by m/‖V‖) and its output. So
    |merged − unmerged| ≤ 2u·(|x|·|W'|ᵀ + |y|), u = 2⁻⁸.

    Per row (what separates one precision from two): fit unmerged_i ≈ (1 + ε_i)·merged_i over
    N = 1024 inputs. Independent roundings average out in ε_i; the fixed per-row error left is
    the rounding δW'_i of the merged row, ε_i = δW'_i·W'_i / ‖W'_i‖², of expected size
    E|ε_i| ≈ √(2/π)·u/√in (≈ 0.10u for in = 64), plus the unmerged side's rounding of the
    factors to bf16, small while ΔW is small next to W (a tenth here). A norm computed in bf16
    in the forward but fp32 in the merge rounds each row's scale m/‖V‖ independently:
    E|ε_i| ≈ u/2 whatever ΔW. The test allows twice the rounding term: 0.20u.
    """
    torch.manual_seed(0)
    in_features = 64
    base = nn.Linear(in_features, 48).to(torch.bfloat16)
    adapter = DoRA(base, rank=4, scale=2.0, dtype=adapter_dtype)
    with torch.no_grad():  # a trained-looking adapter: ΔW about a tenth of W
        adapter.A.uniform_(-1 / 8, 1 / 8)
        adapter.B.normal_(0, 0.02)
    adapter.finish_init()
    with torch.no_grad():
        adapter.magnitude.mul_(torch.linspace(0.5, 1.5, 48, dtype=adapter_dtype))
    x = torch.randn(1024, in_features).to(torch.bfloat16)
    with torch.no_grad():
        unmerged = adapter(x).double()
        adapter.merge()
        W_merged = adapter.base_weight.double()
        merged = adapter(x).double()
        adapter.unmerge()
    u = BF16_UNIT_ROUNDOFF
    scale = x.double().abs() @ W_merged.abs().T + merged.abs()
    assert ((merged - unmerged).abs() <= 2 * u * scale).all()
    bias = base.bias.double()
    y_merged, y_unmerged = merged - bias, unmerged - bias
    eps = (y_unmerged * y_merged).sum(dim=0) / (y_merged * y_merged).sum(dim=0) - 1
    assert eps.abs().mean() <= 2 * math.sqrt(2 / math.pi) * u / math.sqrt(in_features)
