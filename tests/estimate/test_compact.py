"""``lorakit.adapt`` compacts each layer group's G to what its init needs as soon as the group is
estimated (``Initialisation.compact``): the factors are those of the uncompacted statistics, and no
layer's G outlives its own compaction, so ``memory_budget`` bounds the estimation's peak."""

from __future__ import annotations

import weakref

import pytest
import torch
from conftest import batch_for, tiny_llama

import lorakit
from lorakit import AdapterConfig, LorakitError
from lorakit.adaptation import compactor
from lorakit.estimate import choose_estimator, estimate, save_stats
from lorakit.inject import adapters_of, find_targets

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
CASES = {
    "lora-ga": dict(method="lora-ga"),
    "lora-sb-sign": dict(method="lora-sb", eta=1e-3),
    "lora-sb-gradient": dict(method="lora-sb", eta=1e-3, update="gradient"),
}


def data() -> list[dict]:
    return [batch_for("llama", 2, 7, seed=s) for s in (1, 2)]


def config(case: str, budget: int | None = None) -> AdapterConfig:
    return AdapterConfig(rank=2, targets=TARGETS, num_samples=4, estimator="exact", memory_budget=budget, **CASES[case])


def small_budget(model) -> int:
    """Room for the largest G only: one layer per group (several passes)."""
    return max(m.weight.numel() for n, m in model.named_modules() if n.endswith(tuple(TARGETS))) * 8


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_compacted_budgeted_adapt_equals_the_uncompacted_init(case):
    budget = small_budget(tiny_llama())
    compacted = tiny_llama()
    cfg = config(case, budget)
    assert len(choose_estimator(cfg, {n: compacted.get_submodule(n) for n in find_targets(compacted, cfg)})[1]) > 1
    lorakit.adapt(compacted, cfg, data=data(), progress=False)
    reference = tiny_llama()
    stats = estimate(reference, config(case), data(), progress=False)  # every G, nothing compacted
    assert all(s.grad is not None for s in stats.values())
    lorakit.adapt(reference, config(case), stats=stats, progress=False)
    got, want = state(compacted), state(reference)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], rtol=0, atol=1e-12), key
    batch = batch_for("llama", 2, 6, seed=9)
    assert torch.allclose(compacted(**batch).logits, reference(**batch).logits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_gradient_outlives_its_compaction(case):
    model = tiny_llama()
    cfg = config(case, small_budget(model))
    compact = compactor(cfg)
    seen: list[weakref.ref] = []

    def spy(name, layer_stats):
        assert all(ref() is None for ref in seen), "an earlier layer's G is still alive"
        seen.append(weakref.ref(layer_stats.grad))
        return compact(name, layer_stats)

    stats = estimate(model, cfg, data(), progress=False, compact=spy)
    assert len(seen) == len(stats) == len(find_targets(model, cfg))
    for layer_stats in stats.values():
        assert layer_stats.grad is None
        U, S, V = layer_stats.svd
        assert U.shape[1] == S.shape[0] == V.shape[1] == layer_stats.rank  # O((out + in)·k), not out × in
    assert {s.of for s in stats.values()} == {"first-update" if case.startswith("lora-sb") else "gradient"}


def test_compacted_statistics_are_not_saved(tmp_path):
    model = tiny_llama()
    cfg = config("lora-sb-sign")
    stats = estimate(model, cfg, data(), progress=False, compact=compactor(cfg))
    with pytest.raises(LorakitError, match="compacted"):
        save_stats(stats, tmp_path / "g.safetensors")
    assert not list(tmp_path.iterdir())
    with pytest.raises(LorakitError, match="not G"):
        next(iter(stats.values())).gradient()


def test_adapt_frees_every_gradient(monkeypatch):
    """Through adapt itself: the statistics it estimated never hold a full G when the init runs."""
    held: list[bool] = []
    original = lorakit.adaptation.initialise_adapter

    def watch(adapter, name, config, layer_stats=None):
        held.append(layer_stats.grad is not None)
        return original(adapter, name, config, layer_stats)

    monkeypatch.setattr(lorakit.adaptation, "initialise_adapter", watch)
    model = tiny_llama()
    lorakit.adapt(model, config("lora-ga", small_budget(model)), data=data(), progress=False)
    assert held and not any(held) and len(held) == len(adapters_of(model))
