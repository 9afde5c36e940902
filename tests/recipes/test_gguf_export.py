"""A decoder converted from GGUF (a tiny Llama written with the gguf package) trains, and its
merged export — `output.merged: true` and `lorakit export --format merged` — reloads with
AutoModelForCausalLM as a plain model that gives lorakit's logits and generations."""

from __future__ import annotations

import json

import pytest
import torch

import assets
from lorakit.cli import main
from lorakit.recipes import train as train_recipe
from lorakit.recipes.models import convert_gguf

pytest.importorskip("gguf")


def test_gguf_converted_llama_exports_a_merged_model_that_reloads_with_our_outputs(tmp_path):
    from transformers import AutoModelForCausalLM

    gguf_file = assets.gguf_llama_file(tmp_path / "tiny.gguf")
    folder = convert_gguf(gguf_file, tmp_path / "tiny-hf")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    rows = [{"q": r["q"], "a": r["a"].split(" #### ")[-1]} for r in assets.addition_rows(40)]
    config = assets.causal_config(tmp_path, model={"name": str(folder), "max_length": 48},
                                  data={"source": str(assets.write_jsonl(tmp_path / "add.jsonl", rows))},
                                  train={"epochs": 1}, eval={"max_new_tokens": 4},
                                  output={"plot": False, "peft": False, "merged": True})
    assert main(["train", "--config", str(assets.write_yaml(tmp_path / "c.yaml", config)), "--quiet"]) == 0
    run = tmp_path / "run"
    assert main(["export", str(run), "--format", "merged", "--out", str(tmp_path / "exported")]) == 0

    _, s = train_recipe.load_run(run)
    batch = {k: v for k, v in s.loaded.tokenizer(["what is 3 plus 4 ?", "what is 9 plus 1 ?"], return_tensors="pt").items()
             if k != "token_type_ids"}
    with torch.no_grad():
        ours = s.model(**batch).logits
        ours_gen = s.model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=s.pad_id)
        base = AutoModelForCausalLM.from_pretrained(folder).eval()(**batch).logits
    assert ((base - ours).norm() / ours.norm()).item() > 1e-3  # the trained adapter changes the model
    for merged_dir in (run / "merged", tmp_path / "exported"):
        assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        assert getattr(merged, "hf_quantizer", None) is None
        with torch.no_grad():
            theirs = merged(**batch).logits
            theirs_gen = merged.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=s.pad_id)
        assert ((theirs - ours).norm() / ours.norm()).item() < 1e-5
        assert torch.equal(theirs_gen, ours_gen)
