"""Statistics cached to safetensors: estimate → save → load → initialise gives the same adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODELS, batch_for

import lorakit
from lorakit import AdapterConfig, LorakitError, adapters_of
from lorakit.estimate import estimate, load_stats, save_stats

DATA = [batch_for("gpt2", 3, 9, seed=1), batch_for("gpt2", 2, 9, seed=2)]


def adapter_state(model) -> dict[str, torch.Tensor]:
    """Every factor, offset and (possibly offset) base weight of every adapter."""
    state = {}
    for name, adapter in adapters_of(model).items():
        for key, tensor in adapter.state_dict().items():
            state[f"{name}.{key}"] = tensor
    return state


@pytest.mark.parametrize("estimator", ["exact", "sketch"])
def test_cache_round_trip_gives_the_same_adapter(tmp_path, estimator):
    model = MODELS["gpt2"]()
    update = "sign" if estimator == "exact" else "gradient"
    config = AdapterConfig(method="lora-ga", rank=2, estimator=estimator, num_samples=5)
    stats = estimate(model, config, DATA, progress=False)
    path = save_stats(stats, tmp_path / "cache" / "grads.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["grads.safetensors"]  # no temporary left behind
    loaded = load_stats(path)
    assert list(loaded) == list(stats) and loaded.report == stats.report
    # the same statistics serve lora-ga and lora-sb (a 2r sketch covers r)
    for method_config in (config, AdapterConfig(method="lora-sb", rank=2, estimator=estimator, update=update, lr=1e-3)):
        fresh, cached = copy.deepcopy(model), copy.deepcopy(model)
        lorakit.adapt(fresh, method_config, stats=stats)
        lorakit.adapt(cached, method_config, stats=loaded)
        a, b = adapter_state(fresh), adapter_state(cached)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sketch_sized_for_lora_sb_cannot_serve_lora_ga(tmp_path):
    model = MODELS["gpt2"]()
    config = AdapterConfig(method="lora-sb", rank=2, estimator="sketch", update="gradient", num_samples=5)
    path = save_stats(estimate(model, config, DATA, progress=False), tmp_path / "sb.safetensors")
    with pytest.raises(LorakitError, match="sized for 2 singular directions but 4"):
        lorakit.adapt(model, AdapterConfig(method="lora-ga", rank=2), stats=load_stats(path))


def test_bad_cache_files_are_clear_errors(tmp_path):
    with pytest.raises(LorakitError, match="no gradient statistics at"):
        load_stats(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LorakitError, match="not a readable safetensors file"):
        load_stats(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(LorakitError, match="does not hold lorakit gradient statistics"):
        load_stats(tmp_path / "other.safetensors")
