"""Leaving lorakit: merged plain models and PEFT adapters relative to the original base."""

import json

import pytest
import torch
from conftest import MODELS, batch_for, logits, perturb_trainables, rel

import lorakit

peft = pytest.importorskip("peft")

EXPORTED = ["lora", "lora-fa", "pissa", "svd-fa", "lora-xs", "dora", "gaussian"]


@pytest.mark.parametrize("method", EXPORTED)
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_export_loads_in_peft_with_same_logits(tmp_path, model_kind, method, rslora):
    model = lorakit.adapt(MODELS[model_kind](), lorakit.AdapterConfig(method=method, rank=4, alpha=6, use_rslora=rslora))
    perturb_trainables(model, scale=0.05)
    batch = batch_for(model_kind)
    expected = logits(model, batch)
    lorakit.export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(MODELS[model_kind](), tmp_path / "peft").eval()
    assert rel(logits(loaded, batch), expected) < 1e-10
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    base_moved = method in ("pissa", "svd-fa")
    assert config["r"] == (8 if base_moved else 4)
    assert config["use_dora"] == (method == "dora")


def test_peft_export_of_merged_adapters_uses_the_same_factors(tmp_path):
    model = lorakit.adapt(MODELS["llama"](), lorakit.AdapterConfig(method="pissa", rank=4))
    perturb_trainables(model, scale=0.05)
    batch = batch_for("llama")
    expected = logits(model, batch)
    for adapter in lorakit.adapters_of(model).values():
        adapter.merge()
    lorakit.export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path / "peft").eval()
    assert rel(logits(loaded, batch), expected) < 1e-10


def test_lora_xs_exports_at_rank_r_through_r_times_a(tmp_path):
    model = lorakit.adapt(MODELS["gpt2"](), lorakit.AdapterConfig(method="lora-xs", rank=3))
    perturb_trainables(model)
    lorakit.export_peft(model, tmp_path / "peft")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    for name, adapter in lorakit.adapters_of(model).items():
        lora_A = tensors[f"base_model.model.{name}.lora_A.weight"]
        assert lora_A.shape == (3, adapter.in_features)
        assert torch.allclose(lora_A, adapter.R @ adapter.A, rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", ["lora", "pissa", "dora", "lora-xs"])
def test_merge_gives_plain_model_that_save_pretrained_round_trips(tmp_path, model_kind, method):
    model = lorakit.adapt(MODELS[model_kind](), lorakit.AdapterConfig(method=method, rank=4))
    perturb_trainables(model, scale=0.05)
    batch = batch_for(model_kind)
    expected = logits(model, batch)
    merged = lorakit.merge(model)
    assert not lorakit.adapters_of(merged)
    assert rel(logits(merged, batch), expected) < 1e-12
    assert set(merged.state_dict()) == set(MODELS[model_kind]().state_dict())
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(merged).from_pretrained(tmp_path / "merged", dtype=torch.float64).eval()
    assert rel(logits(reloaded, batch), expected) < 1e-12
