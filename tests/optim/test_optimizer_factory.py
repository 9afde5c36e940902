"""make_optimizer: state_dict round trip, checkpoint files, bad input."""

import copy
import io

import pytest
import torch
from conftest import MODELS, batch_for, perturb_trainables

import lorakit
from lorakit import LorakitError


def train_steps(model, opt, sched, kind, seeds):
    for seed in seeds:
        opt.zero_grad()
        model(**batch_for(kind, seed=seed)).loss.backward()
        opt.step()
        sched.step()


OPTIONS = [
    dict(name="adamw", weight_decay=0.1),
    dict(name="adamw", weight_decay=0.1, loraplus_ratio=True, preconditioner="riemannian"),
    dict(name="sgd", momentum=0.9, preconditioner="riemannian", loraplus_ratio=4),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_state_dict_resume_equals_uninterrupted_run(options):
    kind = "llama"
    model = MODELS[kind]()
    lorakit.adapt(model, lorakit.AdapterConfig(method="lora", rank=4))
    perturb_trainables(model)
    model.train()

    def build(m):
        opt = lorakit.make_optimizer(m, lr=1e-2, **options)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)

    opt, sched = build(model)
    train_steps(model, opt, sched, kind, seeds=[1, 2])
    # checkpoint: tensors through a file, loaded without unpickling arbitrary objects
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = copy.deepcopy(model)
    opt2, sched2 = build(resumed)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])

    train_steps(model, opt, sched, kind, seeds=[3])
    train_steps(resumed, opt2, sched2, kind, seeds=[3])
    changed = 0
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
        changed += p.requires_grad
    assert changed > 0
    assert type(opt2) is type(opt) and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_resume_without_state_differs():
    """Guard for the test above: a fresh optimizer (no loaded state) takes a different step."""
    model = MODELS["llama"]()
    lorakit.adapt(model, lorakit.AdapterConfig(method="lora", rank=4))
    perturb_trainables(model)
    opt = lorakit.make_optimizer(model, lr=1e-2, preconditioner="riemannian")
    sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    train_steps(model, opt, sched, "llama", seeds=[1, 2])
    fresh = copy.deepcopy(model)
    opt2 = lorakit.make_optimizer(fresh, lr=1e-2, preconditioner="riemannian")
    sched2 = torch.optim.lr_scheduler.ConstantLR(opt2, factor=1.0)
    train_steps(model, opt, sched, "llama", seeds=[3])
    train_steps(fresh, opt2, sched2, "llama", seeds=[3])
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))


def adapted(method="lora"):
    model = MODELS["bert"]()
    return lorakit.adapt(model, lorakit.AdapterConfig(method=method, rank=4))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="adam"), "unknown optimizer 'adam'.*did you mean 'adamw'"),
        (dict(name="lion"), "unknown optimizer 'lion'"),
        (dict(lr=0.0), "lr must be a finite number > 0"),
        (dict(lr=-1e-3), "lr must be a finite number > 0"),
        (dict(lr=float("nan")), "lr must be"),
        (dict(weight_decay=-0.1), "weight_decay must be"),
        (dict(preconditioner="riemann"), "unknown preconditioner 'riemann'.*did you mean 'riemannian'"),
        (dict(loraplus_ratio=-2), "loraplus_ratio must be True"),
        (dict(name="sgd", betas=(0.9, 0.99)), "betas and eps apply to name='adamw'"),
        (dict(name="adamw", momentum=0.9), "momentum applies to name='sgd'"),
        (dict(betas=(0.9, 1.5)), "betas must be two numbers"),
        (dict(preconditioner="riemannian", damping=-1.0), "damping must be a non-negative number"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs, message):
    with pytest.raises(LorakitError, match=message):
        lorakit.make_optimizer(adapted(), **kwargs)


def test_preconditioner_without_adapters_is_an_error():
    model = MODELS["bert"]()  # fully trainable, no adapters
    with pytest.raises(LorakitError, match="the model has none; call lorakit.adapt"):
        lorakit.make_optimizer(model, preconditioner="riemannian")
    assert isinstance(lorakit.make_optimizer(model), torch.optim.AdamW)  # plain optimizers still work


@pytest.mark.parametrize("method", ["lora-fa", "lora-xs", "svd-fa"])
def test_riemannian_and_loraplus_need_a_trainable_pair(method):
    model = adapted(method)
    with pytest.raises(LorakitError, match="preconditioner='riemannian' needs adapters whose A and B both train"):
        lorakit.make_optimizer(model, preconditioner="riemannian")
    with pytest.raises(LorakitError, match="loraplus_ratio needs adapters whose A and B both train"):
        lorakit.make_optimizer(model, loraplus_ratio=True)


def test_no_trainable_parameters_is_an_error():
    model = MODELS["bert"]()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(LorakitError, match="no trainable parameters"):
        lorakit.make_optimizer(model)


def test_extra_options_reach_torch():
    opt = lorakit.make_optimizer(adapted(), "sgd", lr=0.1, momentum=0.9, nesterov=True)
    assert opt.param_groups[0]["nesterov"] is True and opt.param_groups[0]["momentum"] == 0.9


def test_step_hooks_run_once_per_step():
    """torch wraps each optimizer class's step with its hook runner; the preconditioned step must not run them twice."""
    model = adapted()
    lorakit.make_optimizer(model, "adamw")  # a plain AdamW instance: AdamW.step is now hook-wrapped too
    for name in ("adamw", "sgd"):
        opt = lorakit.make_optimizer(model, name, preconditioner="riemannian")
        calls = []
        opt.register_step_pre_hook(lambda *_: calls.append("pre"))
        opt.register_step_post_hook(lambda *_: calls.append("post"))
        opt.step()
        assert calls == ["pre", "post"]
