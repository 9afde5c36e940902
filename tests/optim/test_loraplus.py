"""LoRA+ groups from the adapters' declared factors: effective learning rates through one SGD step."""

import pytest
import torch
from conftest import MODELS, batch_for, perturb_trainables

import lorakit
from lorakit.optim import LORAPLUS_DEFAULT_RATIO, param_groups


def adapted(kind: str, method: str = "lora"):
    model = MODELS[kind]()
    lorakit.adapt(model, lorakit.AdapterConfig(method=method, rank=4))
    perturb_trainables(model, scale=0.2)
    return model


@pytest.mark.parametrize("ratio, expected", [(True, LORAPLUS_DEFAULT_RATIO), (4.0, 4.0), (None, 1.0)])
def test_effective_learning_rates_of_one_sgd_step(model_kind, ratio, expected):
    model = adapted(model_kind)
    lr = 1e-2
    opt = lorakit.make_optimizer(model, "sgd", lr=lr, loraplus_ratio=ratio)
    before = {id(p): p.detach().clone() for p in model.parameters() if p.requires_grad}
    model.zero_grad()
    model(**batch_for(model_kind)).loss.backward()
    opt.step()
    B_ids = {id(a.B) for a in lorakit.adapters_of(model).values()}
    checked = 0
    for p in model.parameters():
        if not p.requires_grad or p.grad is None or not p.grad.any():
            continue
        step = before[id(p)] - p.detach()
        effective = (step.norm() / p.grad.norm()).item()  # SGD without momentum: step = lr_eff · ∇
        want = lr * expected if id(p) in B_ids else lr
        assert effective == pytest.approx(want, rel=1e-10)
        torch.testing.assert_close(step, want * p.grad, rtol=1e-10, atol=1e-14)
        checked += 1
    assert checked >= 2 * len(B_ids)  # every A and B (and the head of BERT)


def test_groups_come_from_declared_factors_not_names():
    """LoRA-FA's B, XS's R and DoRA's magnitude are not (A, B) pairs: they stay at lr."""
    for method, role_of in [
        ("lora", {"A": "lora_A", "B": "lora_B"}),
        ("dora", {"A": "lora_A", "B": "lora_B", "magnitude": "no_decay"}),
        ("lora-fa", {"B": "decay"}),
        ("lora-xs", {"R": "decay"}),
    ]:
        model = MODELS["bert"]()
        lorakit.adapt(model, lorakit.AdapterConfig(method=method, rank=4))
        ratio = 16.0 if method in ("lora", "dora") else None
        groups = {g["role"]: g for g in param_groups(model, lr=1.0, weight_decay=0.5, loraplus_ratio=ratio)}
        for adapter in lorakit.adapters_of(model).values():
            for name, param in adapter.trainable_parameters().items():
                group = groups[role_of[name]]
                assert any(p is param for p in group["params"]), (method, name)
        if "lora_B" in groups:
            assert groups["lora_B"]["lr"] == 16.0 and groups["lora_A"]["lr"] == 1.0
        assert groups["no_decay"]["weight_decay"] == 0.0  # biases (classifier head), magnitudes
        assert all(p.dim() < 2 for p in groups["no_decay"]["params"])
        n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
        assert sum(len(g["params"]) for g in groups.values()) == n_trainable


def test_loraplus_ratio_survives_an_lr_scheduler():
    model = adapted("llama")
    opt = lorakit.make_optimizer(model, "adamw", lr=1e-3, loraplus_ratio=8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        opt.step()
        sched.step()
    lrs = {g["role"]: g["lr"] for g in opt.param_groups}
    assert lrs["lora_B"] == pytest.approx(8 * lrs["lora_A"]) and lrs["lora_A"] == pytest.approx(1e-3 / 4)


def test_lora_fa_trains_only_b_with_every_optimizer():
    for kwargs in [dict(name="sgd"), dict(name="adamw"), dict(name="adamw", weight_decay=0.1)]:
        model = adapted("gpt2", method="lora-fa")
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        opt = lorakit.make_optimizer(model, lr=1e-2, **kwargs)
        model(**batch_for("gpt2")).loss.backward()
        opt.step()
        for adapter in lorakit.adapters_of(model).values():
            assert not adapter.A.requires_grad and adapter.B.requires_grad
        for n, p in model.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, frozen[n]), n
