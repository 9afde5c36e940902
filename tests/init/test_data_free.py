"""Data-free initialisations: function preserved where SPEC.md says so, formulas on exact SVDs."""

import pytest
import torch
from conftest import MODELS, batch_for, logits, rel

import lorakit
from lorakit.linalg import exact_svd, truncate


@pytest.mark.parametrize("method", ["lora", "gaussian", "pissa", "svd-fa", "lora-fa", "dora", "lora-xs"])
@pytest.mark.parametrize("rslora", [False, True])
def test_function_preserved_at_init(model_kind, method, rslora):
    model = MODELS[model_kind]()
    batch = batch_for(model_kind)
    base = logits(model, batch)
    config = lorakit.AdapterConfig(method=method, rank=4, alpha=6, use_rslora=rslora, xs_init_std=0.0)
    lorakit.adapt(model, config)
    assert rel(logits(model, batch), base) <= 1e-10


def test_pissa_factors_are_scaled_principal_components():
    model = MODELS["llama"]()
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    lorakit.adapt(model, lorakit.AdapterConfig(method="pissa", rank=3, alpha=5, svd="exact"))
    for name, adapter in lorakit.adapters_of(model).items():
        W = originals[name]
        U, S, V = exact_svd(W, 3)
        s = adapter.scale
        # B·A = trunc_r(W) / s, and B, A share √(Σ/s) (up to the sign of each triplet)
        assert rel(s * adapter.B @ adapter.A, truncate(exact_svd(W, 3))) < 1e-12
        assert torch.allclose(adapter.B.norm(dim=0), torch.sqrt(S / s), rtol=1e-12)
        assert torch.allclose(adapter.A.norm(dim=1), torch.sqrt(S / s), rtol=1e-12)
        assert rel(adapter.base_weight, W - truncate(exact_svd(W, 3))) < 1e-12


def test_svd_fa_freezes_a_and_trains_b():
    model = MODELS["bert"]()
    lorakit.adapt(model, lorakit.AdapterConfig(method="svd-fa", rank=4))
    for adapter in lorakit.adapters_of(model).values():
        assert not adapter.A.requires_grad and adapter.B.requires_grad
        assert adapter.A.abs().sum() > 0


def test_lora_xs_structure_and_parameter_count(model_kind):
    model = MODELS[model_kind]()
    r = 4
    originals = {n: (m.weight if isinstance(m, torch.nn.Linear) else m.weight.T).detach().clone() for n, m in model.named_modules() if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2}
    lorakit.adapt(model, lorakit.AdapterConfig(method="lora-xs", rank=r))
    adapters = lorakit.adapters_of(model)
    head = sum(p.numel() for p in model.classifier.parameters()) if model_kind == "bert" else 0
    assert lorakit.parameter_report(model).trainable == r * r * len(adapters) + head
    for name, adapter in adapters.items():
        assert [n for n, p in adapter.named_parameters() if p.requires_grad] == ["R"]
        assert rel(adapter.B @ adapter.A, truncate(exact_svd(originals[name], r))) < 1e-12
        assert torch.allclose(adapter.B.T @ adapter.B, torch.eye(r, dtype=torch.float64), atol=1e-12)
        assert 0 < adapter.R.std().item() < 1e-4  # σ = 1e-5 by default


def test_lora_init_is_kaiming_uniform_with_zero_b_and_reproducible():
    cfg = lorakit.AdapterConfig(method="lora", rank=8, seed=3)
    a = lorakit.adapt(MODELS["llama"](), cfg)
    b = lorakit.adapt(MODELS["llama"](), cfg)
    for (n, x), (_, y) in zip(lorakit.adapters_of(a).items(), lorakit.adapters_of(b).items()):
        assert torch.equal(x.A, y.A) and not x.B.any()
        bound = 1 / x.in_features**0.5  # kaiming_uniform(a=√5) on (r, in): U(−1/√in, 1/√in)
        assert x.A.abs().max() <= bound and x.A.abs().max() > 0.8 * bound
    c = lorakit.adapt(MODELS["llama"](), cfg.replace(seed=4))
    first = next(iter(lorakit.adapters_of(c).values()))
    assert not torch.equal(first.A, next(iter(lorakit.adapters_of(a).values())).A)


def test_gaussian_init_variance_is_one_over_rank():
    model = MODELS["llama"]()
    lorakit.adapt(model, lorakit.AdapterConfig(method="gaussian", rank=16))
    A = torch.cat([a.A.flatten() for a in lorakit.adapters_of(model).values()])
    assert abs(A.var().item() * 16 - 1) < 0.05


def test_pissa_on_dora_composes_and_preserves_function():
    model = MODELS["llama"]()
    batch = batch_for("llama")
    base = logits(model, batch)
    lorakit.adapt(model, lorakit.AdapterConfig(method="dora", init="pissa", rank=4))
    assert rel(logits(model, batch), base) < 1e-10
    assert all(a.has_offset for a in lorakit.adapters_of(model).values())
