"""max_grad_norm clips the gradient the optimizer applies: after Riemannian preconditioning the
step taken is bounded; without a preconditioner the step equals torch's clip_grad_norm_ + step."""

import copy

import pytest
import torch
from conftest import MODELS, batch_for, perturb_trainables
from test_riemannian import DELTA, inv, loss_and_grads, one_adapter_model, snapshot

import lorakit
from lorakit import LorakitError
from lorakit.optim import NonFiniteGradient
from lorakit.recipes.config import OptimSection, RunConfig


def near_zero_B_model():
    """The start of training: B ≈ 0, so P_A = (BᵀB + δI)⁻¹ ≈ I/δ blows ∇_A up."""
    model = one_adapter_model()
    with torch.no_grad():
        model.proj.B.mul_(1e-4)
    return model


def flat(d):
    return torch.cat([t.flatten() for t in d.values()])


def torch_twin(model, name, **options):
    """torch's own optimizer (no lorakit step) over a copy of the model, with make_optimizer's groups."""
    twin = copy.deepcopy(model)
    groups = lorakit.make_optimizer(twin, name, **options).param_groups
    return twin, (torch.optim.AdamW if name == "adamw" else torch.optim.SGD)([dict(g) for g in groups], **options)


def preconditioned(params, grads):
    applied = dict(grads)  # g̃ of SPEC.md, computed independently
    applied["proj.A"] = inv(params["proj.B"].T @ params["proj.B"]) @ grads["proj.A"]
    applied["proj.B"] = grads["proj.B"] @ inv(params["proj.A"] @ params["proj.A"].T)
    return applied


def test_riemannian_sgd_step_respects_max_grad_norm_exactly():
    lr, bound = 0.1, 0.5
    model = near_zero_B_model()
    opt = lorakit.make_optimizer(model, "sgd", lr=lr, preconditioner="riemannian", damping=DELTA, max_grad_norm=bound)
    before = snapshot(model)
    grads = loss_and_grads(model, seed=1)
    applied = preconditioned(before, grads)
    applied_norm = flat(applied).norm()
    # clipping the raw gradient (g̃ is linear in it) would have left a step many times the bound
    raw_clipped_step = lr * min(1.0, bound / float(flat(grads).norm())) * applied_norm
    assert raw_clipped_step > 10 * lr * bound
    opt.step()
    update = flat(snapshot(model)) - flat(before)
    # clip_grad_norm_'s factor on g̃: bound / (‖g̃‖ + 1e-6), so the step is lr·bound to within 1e-6/‖g̃‖
    assert update.norm() <= lr * bound
    torch.testing.assert_close(update.norm(), torch.tensor(lr * bound, dtype=update.dtype), rtol=1e-8, atol=0)
    # and it is the preconditioned direction: θ ← θ − lr · g̃ · bound / (‖g̃‖ + 1e-6)
    torch.testing.assert_close(update, -lr * flat(applied) * bound / (applied_norm + 1e-6), rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(opt.grad_norm, applied_norm, rtol=1e-12, atol=0)
    torch.testing.assert_close(model.proj.A.grad, grads["proj.A"], rtol=0, atol=0)  # raw gradient restored


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_riemannian_adamw_and_sgd_moments_see_the_clipped_gradient(name):
    """Two optimizers fed the same clipped g̃: lorakit's clipped step and plain torch on hand-clipped g̃."""
    bound = 0.3
    model = near_zero_B_model()
    opt = lorakit.make_optimizer(model, name, lr=0.01, preconditioner="riemannian", damping=DELTA, max_grad_norm=bound)
    twin, reference = torch_twin(model, name, lr=0.01)
    for seed in (1, 2):
        grads = loss_and_grads(model, seed)
        applied = preconditioned(snapshot(model), grads)
        scale = min(1.0, bound / (float(flat(applied).norm()) + 1e-6))  # clip_grad_norm_'s factor
        for n, p in twin.named_parameters():
            if p.requires_grad:
                p.grad = applied[n] * scale
        opt.step()
        reference.step()
        expected = snapshot(twin)
        for n, p in snapshot(model).items():
            torch.testing.assert_close(p, expected[n], rtol=1e-10, atol=1e-14, msg=f"step {seed}: {n}")


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_without_preconditioner_equals_torch_clip_grad_norm(name):
    model = MODELS["llama"]()
    lorakit.adapt(model, lorakit.AdapterConfig(method="lora", rank=4))
    perturb_trainables(model)
    ours = lorakit.make_optimizer(model, name, lr=0.05, weight_decay=0.1, max_grad_norm=0.01)
    twin, theirs = torch_twin(model, name, lr=0.05, weight_decay=0.1)
    trainable = [p for g in theirs.param_groups for p in g["params"]]  # the same tensors, in the same order
    for seed in (1, 2, 3):
        for m in (model, twin):
            m.zero_grad()
            m(**batch_for("llama", seed=seed)).loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainable, 0.01)
        assert norm > 0.01  # the bound is active
        ours.step()
        theirs.step()
        assert torch.equal(ours.grad_norm, norm)
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p, q), n
            if p.grad is not None:
                assert torch.equal(p.grad, q.grad), n  # clipped in place, as clip_grad_norm_ does


@pytest.mark.parametrize("preconditioner", [None, "riemannian"])
def test_non_finite_applied_gradient_raises_before_changing_anything(preconditioner):
    model = one_adapter_model()
    opt = lorakit.make_optimizer(model, "adamw", lr=0.01, preconditioner=preconditioner, max_grad_norm=1.0)
    before = snapshot(model)
    grads = loss_and_grads(model, seed=1)
    model.head.bias.grad[0] = float("nan")
    with pytest.raises(NonFiniteGradient, match="not finite"):
        opt.step()
    assert all(torch.equal(p, before[n]) for n, p in snapshot(model).items())
    assert not opt.state  # no moment was written
    torch.testing.assert_close(model.proj.A.grad, grads["proj.A"], rtol=0, atol=0)


@pytest.mark.parametrize("bad", [-1.0, 0, float("nan"), float("inf"), "1", True])
def test_max_grad_norm_must_be_positive_or_none(bad):
    model = one_adapter_model()
    with pytest.raises(LorakitError, match=r"max_grad_norm must be a finite number > 0.*or None"):
        lorakit.make_optimizer(model, max_grad_norm=bad)
    with pytest.raises(LorakitError, match=r"^optim: max_grad_norm must be"):
        RunConfig(optim=OptimSection(max_grad_norm=bad))
    assert RunConfig(optim=OptimSection(max_grad_norm=None)).optim.max_grad_norm is None


def test_trainer_clipping_moves_into_the_preconditioned_optimizer(tmp_path):
    """optimizer_from_args: with a preconditioner the optimizer clips to args.max_grad_norm and the
    Trainer's own (raw-gradient) clipping is switched off; without one the Trainer keeps clipping."""
    from transformers import TrainingArguments

    from lorakit.integrations.transformers import optimizer_from_args

    model = one_adapter_model()
    args = TrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.7, report_to=[])
    opt = optimizer_from_args(model, args, preconditioner="riemannian")
    assert opt.max_grad_norm == 0.7 and args.max_grad_norm == 0.0
    args = TrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.7, report_to=[])
    opt = optimizer_from_args(model, args)
    assert opt.max_grad_norm is None and args.max_grad_norm == 0.7


def test_adamw_is_fused_and_equals_torchs_per_tensor_loop():
    """The default fused AdamW kernel against torch's per-tensor loop (foreach=False), float64."""
    model = MODELS["llama"]()
    lorakit.adapt(model, lorakit.AdapterConfig(method="lora", rank=4))
    perturb_trainables(model)
    ours = lorakit.make_optimizer(model, lr=0.05, weight_decay=0.1)
    assert all(g["fused"] for g in ours.param_groups)
    twin, loop = torch_twin(model, "adamw", lr=0.05, weight_decay=0.1, foreach=False)
    assert not any(g["fused"] for g in loop.param_groups)
    for seed in (1, 2, 3):
        for m, opt in ((model, ours), (twin, loop)):
            m.zero_grad()
            m(**batch_for("llama", seed=seed)).loss.backward()
            opt.step()
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15, msg=n)


def test_grad_scaler_unscales_before_clipping_and_skips_an_overflowed_step():
    """float16 loss scaling: the fused optimizer is stepped as an unfused one (unscale_, then step or skip)."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 3), torch.randn(5, 4)
    twin = copy.deepcopy(model)
    opt = lorakit.make_optimizer(model, lr=0.1, max_grad_norm=0.01)
    reference = lorakit.make_optimizer(twin, lr=0.1, max_grad_norm=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaler.scale(model(x).square().mean()).backward()
    twin(x).square().mean().backward()
    scaler.step(opt)  # unscales, then clips the true gradient
    scaler.update()
    reference.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(model(x).square().mean()).backward()
    model.bias.grad[0] = float("inf")  # an overflowed scaled gradient: the scaler skips the step, no error
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() < 2.0 ** 12
