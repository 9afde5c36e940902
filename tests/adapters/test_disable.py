"""``adapters_disabled`` gives the ORIGINAL base model, also for inits that moved W, touches no
weight, and restores each adapter's previous state however the block ends."""

from __future__ import annotations

import pytest
import torch
from conftest import MODELS, batch_for, logits, rel

import lorakit

# the initialisations that replace W by W − s·B₀A₀
MOVES_BASE = {
    "pissa": dict(method="pissa"),
    "svd-fa": dict(method="svd-fa"),
    "lora-ga": dict(method="lora-ga"),
    "lora-sb+preserve_init": dict(method="lora-sb", preserve_init=True, eta=1e-2),
    "dora+pissa": dict(method="dora", init="pissa"),
}


def adapted_with_reference(kind: str, options: dict) -> tuple[torch.nn.Module, torch.Tensor, dict]:
    model = MODELS[kind]()
    batch = batch_for(kind)
    base = logits(model, batch)
    config = lorakit.AdapterConfig(rank=2, **options)
    data = [batch_for(kind, 3, 9, seed=1), batch_for(kind, 2, 7, seed=2)] if config.needs_data else None
    lorakit.adapt(model, config, data=data)
    assert all(a.has_offset for a in lorakit.adapters_of(model).values())
    perturb_adapters(model)
    return model, base, batch


def perturb_adapters(model: torch.nn.Module) -> None:
    """Move the adapters' trainable tensors (not modules_to_save, which disabling keeps)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for adapter in lorakit.adapters_of(model).values():
            for p in adapter.trainable_parameters().values():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


@pytest.mark.parametrize("name", sorted(MOVES_BASE))
def test_disabled_adapters_give_the_untouched_base_model(model_kind, name):
    model, base, batch = adapted_with_reference(model_kind, MOVES_BASE[name])
    adapted = logits(model, batch)
    assert rel(adapted, base) > 1e-4
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with lorakit.adapters_disabled(model):
        assert rel(logits(model, batch), base) <= 1e-12
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # no weight mutated
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert rel(logits(model, batch), adapted) == 0.0


def test_a_single_disabled_adapter_computes_its_original_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(7, 5).double()
    original = torch.nn.Linear(7, 5).double()
    original.load_state_dict(layer.state_dict())
    model = torch.nn.Sequential(layer)
    lorakit.adapt(model, lorakit.AdapterConfig(method="pissa", rank=2, targets=["0"]))
    adapter = lorakit.adapters_of(model)["0"]
    perturb_adapters(model)
    adapter.set_enabled(False)
    x = torch.randn(4, 7, dtype=torch.float64)
    assert rel(model(x), original(x)) <= 1e-13


def test_previous_enabled_state_is_restored_also_after_an_exception():
    model, base, batch = adapted_with_reference("llama", MOVES_BASE["pissa"])
    adapters = list(lorakit.adapters_of(model).values())
    adapters[1].set_enabled(False)
    before = [a.enabled for a in adapters]
    assert before.count(False) == 1
    with lorakit.adapters_disabled(model):
        assert not any(a.enabled for a in adapters)
    assert [a.enabled for a in adapters] == before
    with pytest.raises(ValueError, match="inside"):
        with lorakit.adapters_disabled(model):
            raise ValueError("raised inside the block")
    assert [a.enabled for a in adapters] == before
    with lorakit.adapters_disabled(model):  # nested: the inner exit keeps the outer's state
        with lorakit.adapters_disabled(model):
            pass
        assert not any(a.enabled for a in adapters)
    assert [a.enabled for a in adapters] == before


def test_a_merged_adapter_refuses_and_leaves_every_adapter_as_it_was():
    model, base, batch = adapted_with_reference("llama", MOVES_BASE["pissa"])
    adapters = list(lorakit.adapters_of(model).values())
    adapters[-1].merge()  # the last one: a loop that disables in order would fail halfway
    with pytest.raises(lorakit.LorakitError, match="unmerge"):
        with lorakit.adapters_disabled(model):
            pass
    assert all(a.enabled for a in adapters)
