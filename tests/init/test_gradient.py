"""lora-ga and lora-sb against SPEC.md's formulas on an exact SVD (float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import MODELS, batch_for, logits, rel
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import AdapterConfig, LorakitError, adapters_of, parameter_report
from lorakit.estimate import LayerStats, estimate


def data_for(kind: str) -> list[dict]:
    return [batch_for(kind, 3, 9, seed=1), batch_for(kind, 2, 7, seed=2)]


def mean_loss(model, kind: str, batches: list[dict]) -> torch.Tensor:
    """The training loss, written here: the mean class CE over examples, or the mean next-token CE
    over every token of every example (estimation's default 'token' weighting)."""
    losses = []
    for b in batches:
        out = model(input_ids=b["input_ids"]).logits
        if kind == "bert":
            losses.append(F.cross_entropy(out, b["labels"], reduction="none"))
        else:
            losses.append(F.cross_entropy(out[:, :-1].transpose(1, 2), b["labels"][:, 1:], reduction="none").reshape(-1))
    return torch.cat(losses).mean()


def exact_stats(model, kind, rank=2, **options):
    config = AdapterConfig(method="lora-ga", rank=rank, estimator="exact", num_samples=5, **options)
    return estimate(model, config, data_for(kind), progress=False)


def align(vectors: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Flip each column of ``reference`` to point like the matching column of ``vectors`` (SVD sign freedom)."""
    return reference * torch.sign((vectors * reference).sum(dim=0))


# -- lora-ga ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "direction, ga_scale",
    [("ArB2r", "stable"), ("ArBr", "stable"), ("A2rBr", "stable"), ("ArB2r", "unit"), ("ArB2r", "gd")],
)
def test_lora_ga_factors_follow_the_spec(model_kind, direction, ga_scale):
    model = MODELS[model_kind]()
    stats = exact_stats(model, model_kind)
    original = {n: s.grad for n, s in stats.items()}
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in stats}
    config = AdapterConfig(method="lora-ga", rank=2, direction=direction, ga_scale=ga_scale, svd="exact")
    lorakit.adapt(model, config, stats=stats)
    r, s = 2, config.scale
    assert s == pytest.approx(config.lora_alpha / math.sqrt(r))  # rsLoRA by default
    for name, adapter in adapters_of(model).items():
        U, S, Vh = torch.linalg.svd(original[name])
        U, V = U[:, : 2 * r], Vh[: 2 * r].T
        zeta = {"stable": adapter.out_features**0.25 / 16**0.5, "unit": 1.0, "gd": 1 / s}[ga_scale]
        b_cols, a_cols = {"ArB2r": ([2, 3], [0, 1]), "A2rBr": ([0, 1], [2, 3]), "ArBr": ([0, 2], [1, 3])}[direction]
        B, A = adapter.B.detach(), adapter.A.detach()
        assert rel(B, zeta * align(B, U[:, b_cols])) <= 1e-10
        assert rel(A.T, zeta * align(A.T, V[:, a_cols])) <= 1e-10
        # the base is W − s·BA, so the function is unchanged
        W = weights[name].T if isinstance(adapter.base_layer, Conv1D) else weights[name]
        assert rel(adapter.base_weight, W - s * B @ A) <= 1e-12


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-6)])
def test_lora_ga_preserves_the_function(model_kind, dtype, tolerance):
    model = MODELS[model_kind](dtype=dtype)
    batch = batch_for(model_kind)
    before = logits(model, batch)
    lorakit.adapt(model, AdapterConfig(method="lora-ga", rank=2, alpha=4), data=data_for(model_kind))
    assert all(a.B.abs().sum() > 0 and a.has_offset for a in adapters_of(model).values())
    assert rel(logits(model, batch), before) <= tolerance
    # the base weight itself has moved by −s·BA ...
    assert all(rel(a.base_weight, a.base_weight + a.scale * a.B @ a.A) > 1e-6 for a in adapters_of(model).values())
    with lorakit.adapters_disabled(model):  # ... yet disabling gives the original function back
        assert rel(logits(model, batch), before) <= tolerance


def test_lora_ga_on_lora_fa_and_dora_structures():
    for method in ("lora-fa", "dora"):
        model = MODELS["llama"]()
        batch = batch_for("llama")
        before = logits(model, batch)
        lorakit.adapt(model, AdapterConfig(method=method, init="lora-ga", rank=2), data=data_for("llama"))
        assert rel(logits(model, batch), before) <= 1e-10


# -- lora-sb ---------------------------------------------------------------------------------------
def sb_config(**options) -> AdapterConfig:
    return AdapterConfig(method="lora-sb", rank=2, svd="exact", lr=2e-3, warmup_steps=4, **options)


@pytest.mark.parametrize("update", ["sign", "gradient"])
def test_lora_sb_is_the_truncated_first_update(model_kind, update):
    model = MODELS[model_kind]()
    stats = exact_stats(model, model_kind)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in stats}
    config = sb_config(update=update)
    lorakit.adapt(model, config, stats=stats)
    eta = 2e-3 / 4
    for name, adapter in adapters_of(model).items():
        G = stats[name].grad
        first = -eta * (torch.sign(G) if update == "sign" else G)
        U, S, Vh = torch.linalg.svd(first)
        truncation = (U[:, :2] * S[:2]) @ Vh[:2]
        assert rel(adapter.delta_weight(), truncation) <= 1e-10
        assert rel(adapter.R.detach(), torch.diag(S[:2]) / adapter.scale) <= 1e-12  # R = Σ/s, B and A orthonormal
        assert rel(adapter.B.T @ adapter.B, torch.eye(2, dtype=G.dtype)) <= 1e-12
        assert torch.equal(adapter.base_layer.weight, weights[name])  # base unmodified


def test_lora_sb_trains_only_R():
    model = MODELS["bert"]()
    lorakit.adapt(model, sb_config(), data=data_for("bert"))
    adapters = adapters_of(model)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert parameter_report(model).trainable == len(adapters) * 2 * 2 + head
    for adapter in adapters.values():
        assert adapter.R.requires_grad and not adapter.A.requires_grad and not adapter.B.requires_grad
        assert not adapter.base_layer.weight.requires_grad


def test_lora_sb_preserve_init_keeps_the_function_and_exports_at_rank_r():
    model = MODELS["gpt2"]()
    batch = batch_for("gpt2")
    before = logits(model, batch)
    lorakit.adapt(model, sb_config(preserve_init=True), data=data_for("gpt2"))
    assert rel(logits(model, batch), before) <= 1e-10
    for adapter in adapters_of(model).values():
        B, A = adapter.export_factors()
        assert B.shape[1] == 2 and A.abs().max() == 0  # R − R₀ = 0 at init: nothing to export yet


def test_lora_sb_equivalent_gradient_is_the_projected_gradient(model_kind):
    """An R step moves W by s·B(∇_R)A = s²·BBᵀ G AᵀA, G the gradient w.r.t. the full weight (SPEC)."""
    model = MODELS[model_kind]()
    stats = exact_stats(model, model_kind)
    lorakit.adapt(model, sb_config(preserve_init=True), stats=stats)  # function at init = base: G is the estimated one
    adapters = adapters_of(model)
    for adapter in adapters.values():
        adapter.base_layer.weight.requires_grad_(True)
    loss = mean_loss(model, model_kind, data_for(model_kind))
    tensors = [t for a in adapters.values() for t in (a.R, a.base_layer.weight)]
    grads = iter(torch.autograd.grad(loss, tensors))
    for name, adapter in adapters.items():
        grad_R, grad_W = next(grads), next(grads)
        grad_W = grad_W.T if isinstance(adapter.base_layer, Conv1D) else grad_W
        s, A, B = adapter.scale, adapter.A.detach(), adapter.B.detach()
        equivalent = s * B @ grad_R @ A
        assert rel(equivalent, s**2 * B @ B.T @ grad_W @ A.T @ A) <= 1e-10
        # Llama's RMSNorm rounds to float32 even in a float64 model, at a scale that differs between
        # estimation (sum, rescaled after) and this loss (mean): 1e-6 there
        assert rel(equivalent, s**2 * B @ B.T @ stats[name].grad @ A.T @ A) <= (1e-6 if model_kind == "llama" else 1e-8)


def test_lora_sb_default_step_size_is_documented_and_overridable(caplog):
    from lorakit.defaults import LR
    from lorakit.init.gradient import first_step_size

    assert first_step_size(AdapterConfig(method="lora-sb", eta=0.5, lr=1.0).lora_sb) == 0.5
    assert first_step_size(AdapterConfig(method="lora-sb", lr=1e-2, warmup_steps=10).lora_sb) == pytest.approx(1e-3)
    with caplog.at_level("WARNING", logger="lorakit"):
        assert first_step_size(AdapterConfig(method="lora-sb", warmup_steps=7).lora_sb) == pytest.approx(LR / 7)
    assert "defaults to lr=" in caplog.text


def test_lora_sb_sign_needs_the_exact_gradient():
    model = MODELS["bert"]()
    sketch = estimate(model, AdapterConfig(method="lora-sb", rank=2, update="gradient", estimator="sketch", num_samples=5), data_for("bert"), progress=False)
    with pytest.raises(LorakitError, match="no full gradient"):
        lorakit.adapt(model, AdapterConfig(method="lora-sb", rank=2), stats=sketch)


def test_statistics_of_another_shape_are_rejected():
    model = MODELS["bert"]()
    stats = exact_stats(model, "bert")
    name = next(iter(stats))
    stats[name] = LayerStats(grad=torch.zeros(5, 7, dtype=torch.float64))
    with pytest.raises(LorakitError, match="5 × 7 layer"):
        lorakit.adapt(model, AdapterConfig(method="lora-ga", rank=2), stats=stats)


# -- through adapt, every estimator -----------------------------------------------------------------
@pytest.mark.parametrize("method, estimator, budget", [
    ("lora-ga", "exact", None), ("lora-ga", "exact", "tight"), ("lora-ga", "sketch", None), ("lora-ga", "auto", "tight"),
    ("lora-sb", "exact", None), ("lora-sb", "auto", "tight"), ("lora-sb", "sketch", None),
])
def test_adapt_with_every_estimator(method, estimator, budget):
    model = MODELS["llama"]()
    reference = copy.deepcopy(model)
    options = {"update": "gradient"} if estimator == "sketch" else {}
    memory_budget = 40 * 32 * 8 if budget else None  # the largest layer's G (float64)
    # oversample=64: the sketch spans all of G on these tiny layers, so every estimator must agree exactly
    config = AdapterConfig(method=method, rank=2, estimator=estimator, memory_budget=memory_budget, lr=1e-3, oversample=64, **options)
    lorakit.adapt(model, config, data=data_for("llama"))
    exact = AdapterConfig(method=method, rank=2, estimator="exact", lr=1e-3, svd="exact", **options)
    lorakit.adapt(reference, exact, data=data_for("llama"))
    for (name, a), b in zip(adapters_of(model).items(), adapters_of(reference).values()):
        if method == "lora-sb":  # B·R·A pairs each u_i with its v_i: free of the SVD's sign choice
            assert rel(a.delta_weight(), b.delta_weight()) <= 1e-8, name
        else:  # lora-ga pairs u_{r+i} with v_i: compare the spanned subspaces
            assert rel(a.B @ a.B.T, b.B @ b.B.T) <= 1e-8 and rel(a.A.T @ a.A, b.A.T @ b.A) <= 1e-8, name
