"""Frozen factors (lora-fa's A; lora-xs's A and B) get no gradient and no optimizer state."""

import pytest
import torch
from conftest import MODELS, batch_for, perturb_trainables

import lorakit


@pytest.mark.parametrize("method, frozen", [("lora-fa", {"A"}), ("lora-xs", {"A", "B"}), ("lora", set())])
def test_frozen_factors_get_no_gradient_and_no_state(method, frozen):
    model = MODELS["llama"]()
    lorakit.adapt(model, lorakit.AdapterConfig(method=method, rank=4))
    perturb_trainables(model)
    adapters = lorakit.adapters_of(model).values()
    opt = lorakit.make_optimizer(model, lr=1e-2, max_grad_norm=1.0)
    before = {id(t): t.detach().clone() for a in adapters for t in a.factors().values()}
    for seed in (1, 2):
        opt.zero_grad(set_to_none=True)
        model(**batch_for("llama", seed=seed)).loss.backward()
        for a in adapters:
            for name, factor in a.factors().items():
                assert (factor.grad is None) == (name in frozen), (method, name)
        opt.step()
    optimised = {id(p) for p in opt.state}
    for a in adapters:
        for name, factor in a.factors().items():
            assert (id(factor) in optimised) != (name in frozen), (method, name)
            assert torch.equal(factor, before[id(factor)]) == (name in frozen), (method, name)
