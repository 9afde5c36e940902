"""lorakit train on a quantized base (model.quantization), end to end on a tiny Llama folder: the
run trains (its loss falls), evaluates, and its PEFT adapter on the same quantized base gives the
run's logits."""

from __future__ import annotations

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
