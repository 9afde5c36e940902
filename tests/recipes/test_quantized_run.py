"""lorakit train on a quantized base (model.quantization), end to end on a tiny Llama folder: the
run trains (its loss falls), evaluates, and its PEFT adapter on the same quantized base gives the
run's logits."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402

from lorakit.cli import main  # noqa: E402
from lorakit.inject import adapters_of  # noqa: E402
from lorakit.recipes import data as D  # noqa: E402
from lorakit.recipes import train as train_recipe  # noqa: E402
from lorakit.recipes.rundir import read_metrics  # noqa: E402
from lorakit.recipes.models import quantization_config  # noqa: E402

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")


@pytest.mark.parametrize("quant, method", [("nf4", "lora-sb"), ("int8", "lora")])
def test_train_on_a_quantized_base_and_peft_loads_it_on_the_same_base(tmp_path, quant, method):
    config = assets.causal_config(tmp_path, model={"quantization": quant}, adapter={"method": method, "num_samples": 16},
                                  optim={"lr": 3e-2}, train={"epochs": 2}, output={"plot": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", "--config", str(assets.write_yaml(tmp_path / "c.yaml", config)), "--quiet"]) == 0
        run_dir = tmp_path / "run"
        losses = [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]
        assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
        _, s = train_recipe.load_run(run_dir)
        assert {a.quantization for a in adapters_of(s.model).values()} == {f"bnb-{quant}"}
        batch = {k: v for k, v in D.collate(s.features["test"][:8], s.pad_id).items() if k != "labels"}
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32, device_map="cpu",
                                                    quantization_config=quantization_config(quant, torch.float32))
        base.config.pad_token_id = s.pad_id
        theirs = peft.PeftModel.from_pretrained(base, str(run_dir / "peft"))
        s.model.train(), theirs.train()  # Llama has no dropout; training mode keeps bitsandbytes' layout (see test_quantized)
        with torch.no_grad():
            ours, peft_logits = s.model(**batch).logits, theirs(**batch).logits
    assert ((ours - peft_logits).norm() / ours.norm()).item() < 1e-5


def _reference_with_peft_weights(tmp_path, s, quant: str) -> torch.nn.Module:
    """An fp32 copy of the tiny Llama whose adapted weights are the loaded quantized base's dequantized W̃ plus
    the PEFT export's ΔW (what PEFT on that base computes, independently of PEFT)."""
    from transformers import AutoModelForCausalLM

    from lorakit.adapters.quantized import quantization_of

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32, device_map="cpu",
                                                  quantization_config=quantization_config(quant, torch.float32))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    adapters = adapters_of(s.model)
    with torch.no_grad():
        for name, module in loaded.named_modules():
            backend = quantization_of(module) if isinstance(module, torch.nn.Linear) else None
            if backend is None:
                continue
            W = backend.dequantize(module).float()
            if name in adapters:
                W = W + adapters[name].delta_weight().float() + adapters[name].base_offset().float()
            reference.get_submodule(name).weight.copy_(W)
    reference.config.pad_token_id = s.pad_id
    return reference


@pytest.mark.parametrize("full_precision", [None, "model"])
def test_qpissa_run_exports_a_merged_model_and_a_peft_adapter_for_the_loaded_base(tmp_path, full_precision):
    """lorakit train model.quantization=nf4 adapter.method=pissa, then lorakit export RUN --format merged: the
    merged folder (dequantized, fp32) reloads with AutoModelForCausalLM and gives the run's logits (the
    dequantizing merge's tolerance); the PEFT adapter loads on the base the README names (the same folder
    with the same nf4 config) and computes W̃ + s·(BA − B₀A₀) (≤ 1e-5 against an fp32 model holding those
    weights), which is the run's model up to the reported quantization error. With
    adapter.full_precision_checkpoint=model the run reports the real ‖W − Q(W)‖ of the loaded base, and the
    PEFT adapter is nearer the run's model on the unquantized checkpoint than on the nf4 base."""
    from transformers import AutoModelForCausalLM

    adapter = {"method": "pissa"} if full_precision is None else {"method": "pissa", "full_precision_checkpoint": "model"}
    config = assets.causal_config(tmp_path, model={"quantization": "nf4"}, adapter=adapter, optim={"lr": 1e-2},
                                  train={"epochs": 1}, output={"plot": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", "--config", str(assets.write_yaml(tmp_path / "c.yaml", config)), "--quiet"]) == 0
        run_dir = tmp_path / "run"
        info = json.loads((run_dir / "run.json").read_text())["quantization_error"]
        assert info["backend"] == "bnb-nf4" and info["layers"] == 14 and info["from_full_precision"] == (full_precision is not None)
        if full_precision is None:
            assert info["mean_plain"] < 1e-6  # the dequantized weight re-quantizes to itself
        else:
            assert info["mean_plain"] > 1e-3 and info["mean_residual"] > 0
        assert main(["export", str(run_dir), "--format", "merged", "--out", str(tmp_path / "merged")]) == 0
        _, s = train_recipe.load_run(run_dir)
        batch = {k: v for k, v in D.collate(s.features["test"][:8], s.pad_id).items() if k != "labels"}
        s.model.train()  # Llama has no dropout; training mode keeps bitsandbytes' layout (see test_quantized)
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert not any(type(m).__name__ == "Linear4bit" for m in merged.modules())
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32, device_map="cpu",
                                                    quantization_config=quantization_config("nf4", torch.float32))
        base.config.pad_token_id = s.pad_id
        theirs = peft.PeftModel.from_pretrained(base, str(run_dir / "peft")).train()
        with torch.no_grad():
            ours = s.model(**batch).logits
            merged_logits = merged(**batch).logits
            peft_logits = theirs(**batch).logits
            reference = _reference_with_peft_weights(tmp_path, s, "nf4").eval()(**batch).logits

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(merged_logits, ours) < 1e-5
    assert rel(peft_logits, reference) < 1e-5
    if full_precision is None:
        assert rel(peft_logits, ours) < 0.1  # W̃ + s·(BA − B₀A₀) against Q(W̃ − s·B₀A₀) + s·BA: the residual's error
        return
    # from the full-precision W, lorakit's model is Q(W − s·B₀A₀) + s·BA: on the unquantized checkpoint the same
    # PEFT adapter computes W + s·(BA − B₀A₀), off by the residual's error only; on the nf4 base W̃ − W adds up
    # (measured 0.061 against 0.132 of the logits here)
    unquantized = AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.float32)
    unquantized.config.pad_token_id = s.pad_id
    with torch.no_grad():
        on_full = peft.PeftModel.from_pretrained(unquantized, str(run_dir / "peft")).eval()(**batch).logits
    assert rel(on_full, ours) < 0.1 and rel(on_full, ours) < rel(peft_logits, ours) < 0.2
