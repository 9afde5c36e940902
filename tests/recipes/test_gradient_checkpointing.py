"""train.gradient_checkpointing: the loss and every trainable gradient are those without it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

import assets
import lorakit
from lorakit.errors import LorakitError
from lorakit.recipes import data as D
from lorakit.recipes.loop import gradient_checkpointing


def _loss_and_grads(folder, method: str, checkpointing: bool, batch):
    model = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float64)
    lorakit.adapt(model, lorakit.AdapterConfig(method=method, rank=4, seed=0, dropout=0.1), progress=False)
    for p in model.parameters():  # a nonzero start, so that every factor gets a gradient
        if p.requires_grad:
            torch.manual_seed(p.numel())
            p.data.add_(0.01 * torch.randn_like(p))
    gradient_checkpointing(model, checkpointing)
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    model.train()
    torch.manual_seed(0)  # dropout: the checkpoint's recomputation replays the same masks
    loss = model(**batch).loss
    loss.backward()
    assert len(calls) == (2 if checkpointing else 1)  # checkpointed blocks run again in the backward pass
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "dora", "lora-xs"])
def test_checkpointing_gives_the_same_loss_and_gradients(tmp_path, method):
    folder = assets.llama_folder(tmp_path / "llama")
    tok = assets.tokenizer(causal=True)
    examples = [{"prompt": r["q"], "answer": r["a"]} for r in assets.addition_rows(4)]
    features, _, _ = D.encode_causal(examples, tok, 32, "template", "Question: {prompt}\nAnswer:")
    batch = D.collate(features, pad_id=0)
    plain_loss, plain = _loss_and_grads(folder, method, False, batch)
    loss, grads = _loss_and_grads(folder, method, True, batch)
    assert loss == pytest.approx(plain_loss, abs=1e-12)
    assert grads.keys() == plain.keys() and plain
    for name in plain:
        assert plain[name].abs().max() > 0, name
        torch.testing.assert_close(grads[name], plain[name], rtol=0, atol=1e-10, msg=name)


def test_a_model_without_checkpointing_support_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(LorakitError, match="Sequential does not support gradient checkpointing"):
        gradient_checkpointing(model, True)


def test_a_checkpointed_run_follows_the_same_losses(tmp_path):
    import json

    from lorakit.cli import main

    losses = []
    for on in (False, True):
        config = assets.causal_config(tmp_path, train={"gradient_checkpointing": on, "epochs": 1},
                                      output={"dir": str(tmp_path / f"run-{on}"), "plot": False, "peft": False})
        assert main(["train", "--config", str(assets.write_yaml(tmp_path / "c.yaml", config)), "--quiet"]) == 0
        records = [json.loads(line) for line in (tmp_path / f"run-{on}" / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in records if r["type"] == "train"])
    assert len(losses[0]) > 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)
