"""Adapters under autocast (the GPU mixed-precision path; CPU autocast in bfloat16 here): a
float32 base with float32 factors computes in bfloat16 as nn.Linear does under autocast, its
factor gradients stay float32 and match the float32 computation to bfloat16 rounding, and the
fused node agrees with the general path (same autocast)."""

import pytest
import torch
from conftest import rel
from torch import nn

from lorakit.adapters import ADAPTER_CLASSES, fused


def adapter_for(structure: str) -> nn.Module:
    torch.manual_seed(0)
    base = nn.Linear(16, 12).requires_grad_(False)
    adapter = ADAPTER_CLASSES[structure](base, rank=4, scale=0.5)
    with torch.no_grad():
        for p in adapter.factors().values():
            p.normal_(std=0.3)
    adapter.finish_init()  # DoRA's magnitude from the norms of W + s·BA, then moved off them
    if hasattr(adapter, "magnitude"):
        with torch.no_grad():
            adapter.magnitude.mul_(torch.linspace(0.5, 1.5, adapter.magnitude.numel()))
    adapter.set_trainable()
    return adapter


def grads(adapter: nn.Module, x: torch.Tensor, autocast: bool, general: bool = False):
    for p in adapter.parameters():
        p.grad = None
    xr = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if general:
            original = fused.applies
            fused.applies = lambda *a, **k: False
            try:
                y = adapter(xr)
            finally:
                fused.applies = original
        else:
            y = adapter(xr)
    (y.float() ** 2).sum().backward()
    return y, xr.grad, {n: p.grad for n, p in adapter.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("structure", sorted(ADAPTER_CLASSES))
def test_autocast_bf16_matches_float32_to_rounding_and_keeps_float32_factor_gradients(structure):
    adapter = adapter_for(structure)
    x = torch.randn(3, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected_dtype = adapter.base_layer(x).dtype
    y, gx, g = grads(adapter, x, autocast=True)
    y32, gx32, g32 = grads(adapter, x, autocast=False)
    assert y.dtype == expected_dtype == torch.bfloat16
    assert gx.dtype == torch.float32 and rel(gx, gx32) < 3e-2
    assert rel(y.float(), y32) < 2e-2
    for name, grad in g.items():
        assert grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        assert rel(grad, g32[name]) < 3e-2, name
    yg, gxg, gg = grads(adapter, x, autocast=True, general=True)
    assert rel(y.float(), yg.float()) < 1e-2 and rel(gx, gxg) < 2e-2
    for name in g:
        assert rel(g[name], gg[name]) < 2e-2, name


@pytest.mark.parametrize("method", ["lora", "lora-xs", "dora"])
def test_an_adapted_llama_trains_under_autocast_like_in_float32(method):
    """A training step of a float32 tiny Llama under bf16 autocast: loss and every trainable gradient
    (float32) equal the float32 step's to bf16 rounding."""
    import lorakit
    from conftest import batch_for, perturb_trainables, tiny_llama

    model = tiny_llama(dtype=torch.float32)
    lorakit.adapt(model, lorakit.AdapterConfig(method=method, rank=4))
    perturb_trainables(model, scale=0.3)
    batch = batch_for("causal")
    results = []
    for autocast in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        results.append((loss.detach().float(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss16, g16), (loss32, g32) = results
    assert abs(float(loss16 - loss32)) < 2e-2 * float(loss32)
    assert g16 and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in g16.values())
    assert max(rel(g16[n], g32[n]) for n in g32) < 0.1
