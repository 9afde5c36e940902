"""Scaled GD / scaled AdamW against the closed forms of SPEC.md, computed independently here."""

import copy

import pytest
import torch
from conftest import MODELS, batch_for, perturb_trainables
from torch import nn

import lorakit
from lorakit.optim import PairPreconditioner, RiemannianAdamW, RiemannianSGD

DELTA = 1e-6


class OneLayer(nn.Module):
    """x → proj (adapted, 7 → 5) → tanh → head (trained fully, with bias)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(7, 5).double()
        self.head = nn.Linear(5, 3).double()

    def forward(self, x):
        return self.head(torch.tanh(self.proj(x)))


def one_adapter_model(method: str = "lora") -> nn.Module:
    model = OneLayer()
    config = lorakit.AdapterConfig(method=method, rank=3, alpha=6, targets=["proj"], modules_to_save=["head"])
    lorakit.adapt(model, config)
    perturb_trainables(model, scale=0.5)  # B ≠ 0 so both preconditioners matter
    return model


def loss_and_grads(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(11, 7, generator=g, dtype=torch.float64)
    y = torch.randn(11, 3, generator=g, dtype=torch.float64)
    model.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def inv(M: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(M + DELTA * torch.eye(M.shape[0], dtype=M.dtype))


def preconditioned(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SPEC.md: g̃_A = (BᵀB + δI)⁻¹ ∇_A, g̃_B = ∇_B (AAᵀ + δI)⁻¹; other tensors unchanged."""
    A, B = params["proj.A"], params["proj.B"]
    out = dict(grads)
    out["proj.A"] = inv(B.T @ B) @ grads["proj.A"]
    out["proj.B"] = grads["proj.B"] @ inv(A @ A.T)
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_scaled_gd_step_matches_closed_form(method):
    model = one_adapter_model(method)
    lr = 0.05
    opt = lorakit.make_optimizer(model, "sgd", lr=lr, preconditioner="riemannian", damping=DELTA)
    assert isinstance(opt, RiemannianSGD) and isinstance(opt, torch.optim.SGD)
    before = snapshot(model)
    grads = loss_and_grads(model, seed=1)
    expected = {n: before[n] - lr * g for n, g in preconditioned(before, grads).items()}
    opt.step()
    after = snapshot(model)
    assert set(after) == set(expected)
    for name in expected:
        torch.testing.assert_close(after[name], expected[name], rtol=1e-12, atol=1e-12, msg=name)
    # the preconditioner really changed A and B's step (it is not the plain one)
    assert (after["proj.A"] - (before["proj.A"] - lr * grads["proj.A"])).norm() > 1e-3
    # the raw gradient is restored after the step
    torch.testing.assert_close(model.proj.A.grad, grads["proj.A"], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("loraplus_ratio", [None, 4.0])
def test_two_scaled_adamw_steps_match_closed_form(method, loraplus_ratio):
    model = one_adapter_model(method)
    lr, betas, eps, wd = 0.01, (0.8, 0.95), 1e-8, 0.1
    opt = lorakit.make_optimizer(
        model, "adamw", lr=lr, betas=betas, eps=eps, weight_decay=wd,
        loraplus_ratio=loraplus_ratio, preconditioner="riemannian", damping=DELTA,
    )
    assert isinstance(opt, RiemannianAdamW) and isinstance(opt, torch.optim.AdamW)
    params = snapshot(model)
    names = list(params)
    lrs = {n: lr * (loraplus_ratio or 1.0) if n == "proj.B" else lr for n in names}
    decays = {n: wd if params[n].dim() >= 2 else 0.0 for n in names}  # biases / DoRA magnitude: no decay
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    for t in (1, 2):
        grads = loss_and_grads(model, seed=t)
        g = preconditioned(params, grads)
        for n in names:  # AdamW on g̃, decoupled decay
            m[n] = betas[0] * m[n] + (1 - betas[0]) * g[n]
            v[n] = betas[1] * v[n] + (1 - betas[1]) * g[n] ** 2
            m_hat, v_hat = m[n] / (1 - betas[0] ** t), v[n] / (1 - betas[1] ** t)
            params[n] = params[n] * (1 - lrs[n] * decays[n]) - lrs[n] * m_hat / (v_hat.sqrt() + eps)
        opt.step()
        after = snapshot(model)
        for n in names:
            torch.testing.assert_close(after[n], params[n], rtol=1e-11, atol=1e-13, msg=f"step {t}: {n}")


def test_non_pair_tensors_get_exactly_plain_adamw():
    """Head (weight + bias) updates equal torch's plain AdamW fed the same gradients."""
    model = one_adapter_model()
    opt = lorakit.make_optimizer(model, "adamw", lr=0.01, weight_decay=0.1, preconditioner="riemannian")
    head = [model.head.weight, model.head.bias]
    shadow = [nn.Parameter(p.detach().clone()) for p in head]
    plain = torch.optim.AdamW([{"params": shadow[:1], "weight_decay": 0.1}, {"params": shadow[1:], "weight_decay": 0.0}], lr=0.01)
    for seed in (1, 2, 3):
        loss_and_grads(model, seed)
        for s, p in zip(shadow, head):
            s.grad = p.grad.clone()
        opt.step()
        plain.step()
        for s, p in zip(shadow, head):
            assert torch.equal(s, p)


@pytest.mark.parametrize("method", ["lora", "gaussian", "pissa", "dora"])
def test_batched_preconditioner_matches_per_layer_formula(model_kind, method):
    """Many pairs of different shapes (incl. GPT-2 Conv1D) batched: same g̃ as one inverse per layer."""
    model = MODELS[model_kind]()
    lorakit.adapt(model, lorakit.AdapterConfig(method=method, rank=4))
    perturb_trainables(model, scale=0.3)
    model.zero_grad()
    model(**batch_for(model_kind)).loss.backward()
    pre = PairPreconditioner([a.low_rank_pair() for a in lorakit.adapters_of(model).values()], DELTA)
    got = {id(p): g for p, g in pre.preconditioned_gradients()}
    assert len(got) == 2 * len(lorakit.adapters_of(model))
    for adapter in lorakit.adapters_of(model).values():
        A, B = adapter.A.detach(), adapter.B.detach()
        torch.testing.assert_close(got[id(adapter.A)], inv(B.T @ B) @ adapter.A.grad, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got[id(adapter.B)], adapter.B.grad @ inv(A @ A.T), rtol=1e-9, atol=1e-12)


def test_identity_fallback_when_the_inverse_fails():
    """δ = 0 and B = 0: BᵀB is singular, so A takes its plain gradient; B is still preconditioned."""
    g = torch.Generator().manual_seed(0)
    A = nn.Parameter(torch.randn(3, 6, generator=g, dtype=torch.float64))
    B = nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    A.grad = torch.randn(3, 6, generator=g, dtype=torch.float64)
    B.grad = torch.randn(4, 3, generator=g, dtype=torch.float64)
    got = {id(p): t for p, t in PairPreconditioner([(A, B)], damping=0.0).preconditioned_gradients()}
    assert torch.equal(got[id(A)], A.grad)
    torch.testing.assert_close(got[id(B)], B.grad @ torch.linalg.inv(A.detach() @ A.detach().T))


@pytest.mark.parametrize("name", ["sgd", "adamw"])
@pytest.mark.parametrize("loraplus_ratio", [None, True])
@pytest.mark.parametrize("adapter_dtype, factor_dtype", [(None, torch.float32), ("bfloat16", torch.bfloat16)])
def test_bf16_steps_stay_finite_from_b_zero(name, loraplus_ratio, adapter_dtype, factor_dtype):
    model = MODELS["llama"](dtype=torch.bfloat16)
    lorakit.adapt(model, lorakit.AdapterConfig(method="lora", rank=4, adapter_dtype=adapter_dtype))  # B = 0 at init
    adapters = lorakit.adapters_of(model).values()
    assert all(a.B.dtype == factor_dtype and not a.B.any() for a in adapters)
    opt = lorakit.make_optimizer(model, name, lr=1e-3, preconditioner="riemannian", loraplus_ratio=loraplus_ratio)
    model.train()
    for step in range(3):
        opt.zero_grad()
        loss = model(**batch_for("llama", seed=step)).loss
        loss.backward()
        opt.step()
        for n, p in model.named_parameters():
            assert torch.isfinite(p).all(), f"step {step}: {n}"
    assert all(a.B.float().norm() > 0 for a in adapters)


def test_optimizer_copies_keep_the_preconditioner():
    model = one_adapter_model()
    opt = lorakit.make_optimizer(model, "adamw", lr=0.01, preconditioner="riemannian", damping=1e-4)
    clone = copy.deepcopy(opt)
    assert clone.damping == 1e-4 and len(clone.preconditioner.pairs) == 1


def test_one_batched_solve_per_rank_equals_the_per_pair_loop():
    """Pairs of mixed widths and ranks, some without gradients: one factorisation per rank, and g̃
    equal (float64, 1e-12) to one inverse per pair computed in a plain loop."""
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 7, 5), (3, 11, 2), (3, 7, 5), (5, 8, 9), (5, 6, 6), (3, 4, 13)]  # (r, in, out)
    pairs = []
    for k, (r, n_in, n_out) in enumerate(shapes):
        A = nn.Parameter(torch.randn(r, n_in, generator=g, dtype=torch.float64))
        B = nn.Parameter(torch.randn(n_out, r, generator=g, dtype=torch.float64) * 10.0 ** -k)  # B near 0 too
        A.grad = torch.randn(A.shape, generator=g, dtype=torch.float64)
        B.grad = None if k == 2 else torch.randn(B.shape, generator=g, dtype=torch.float64)
        pairs.append((A, B))
    pre = PairPreconditioner(pairs, DELTA)
    assert sorted(len(bucket) for bucket in pre._buckets) == [2, 4]  # one batch per rank, any widths
    got = {id(p): grad for p, grad in pre.preconditioned_gradients()}
    assert len(got) == 2 * len(pairs) - 1
    for A, B in pairs:
        torch.testing.assert_close(got[id(A)], inv(B.T @ B) @ A.grad, rtol=1e-12, atol=1e-12)
        if B.grad is not None:
            torch.testing.assert_close(got[id(B)], B.grad @ inv(A @ A.T), rtol=1e-12, atol=1e-12)
