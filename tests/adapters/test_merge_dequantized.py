"""``lorakit.merge`` on a quantized base: a plain model in the requested dtype, W̃ + ΔW (the dequantized
weight plus the adapter's change, added in float32, cast once), every other quantized layer dequantized,
without transformers' quantization state, so that save_pretrained → AutoModelForCausalLM reloads it."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import batch_for, perturb_trainables, rel
from torch import nn

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

import lorakit  # noqa: E402
from lorakit.adapters.quantized import quantization_of  # noqa: E402
from lorakit.inject import adapters_of  # noqa: E402
from test_quantized import TARGETS, base_dir, load, logits  # noqa: E402,F401  (base_dir: a fixture)


def quantized_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and quantization_of(m) is not None]


@pytest.mark.parametrize("quant, tolerance", [("nf4", 1e-5), ("fp4", 1e-5), ("int8", 2e-2), ("torchao-int8", 1e-5)])
@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "lora-sb"])
def test_merged_dequantized_model_computes_the_adapted_quantized_models_logits_and_reloads(
        base_dir, quant, tolerance, method, tmp_path, caplog):
    """Tolerance (relative, logits): 1e-5 for the 4-bit and torchao bases (float32 rounding of W̃ + ΔW
    against base(x) + s·BAx); 2e-2 for bitsandbytes int8, whose layers compute in float16 (the merged model
    computes in float32)."""
    from transformers import AutoModelForCausalLM

    batch = batch_for("llama")
    model = lorakit.adapt(load(base_dir, quant), lorakit.AdapterConfig(method=method, rank=4, alpha=8, targets=TARGETS),
                          data=[batch])
    perturb_trainables(model)
    expected = logits(model, batch)
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        merged = lorakit.merge(model, dtype=torch.float32)
    assert "merged into the dequantized" in caplog.text and "a plain float32 model" in caplog.text
    assert not adapters_of(merged) and not quantized_layers(merged)
    assert all(p.dtype == torch.float32 for p in merged.parameters())
    assert getattr(merged, "hf_quantizer", None) is None and not hasattr(merged.config, "quantization_config")
    assert rel(logits(merged, batch), expected) < tolerance
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not quantized_layers(reloaded)
    assert torch.equal(logits(reloaded, batch), logits(merged, batch))


def test_merged_dequantized_model_takes_the_requested_dtype(base_dir):
    """W̃ + ΔW is computed in float32 and cast once: the bf16 merged weight is its rounding."""
    model = lorakit.adapt(load(base_dir, "nf4"), lorakit.AdapterConfig(rank=4, alpha=8, targets=TARGETS))
    perturb_trainables(model)
    name, adapter = next(iter(adapters_of(model).items()))
    expected = (adapter.base_weight.float() + adapter.delta_weight().float()).to(torch.bfloat16)
    merged = lorakit.merge(model, dtype=torch.bfloat16)
    weight = merged.get_submodule(name).weight
    assert type(merged.get_submodule(name)) is nn.Linear and weight.dtype == torch.bfloat16
    assert torch.equal(weight, expected)
