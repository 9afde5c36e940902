"""NEFTune: bounded uniform noise on the input embeddings in training, nothing in eval."""

import math

import pytest
import torch
from conftest import MODELS, batch_for, logits

import lorakit
from lorakit import LorakitError


@pytest.mark.parametrize("alpha", [5.0, 15.0])
def test_noise_bound_in_training(model_kind, alpha):
    model = MODELS[model_kind]()
    ids = batch_for(model_kind, batch=4, length=13)["input_ids"]
    embeddings = model.get_input_embeddings()
    clean = embeddings(ids)
    with lorakit.enable_neftune(model, alpha):
        model.train()
        noise = embeddings(ids) - clean
        again = embeddings(ids) - clean
    L, d = ids.shape[1], clean.shape[-1]
    bound = alpha / math.sqrt(L * d)
    assert noise.abs().max() <= bound * (1 + 1e-12)
    assert noise.abs().max() >= 0.95 * bound  # uniform over the whole interval, not a smaller one
    assert noise.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # U(−b, b) has std b/√3
    assert not torch.equal(noise, again)  # fresh noise each forward
    model.train()
    assert torch.equal(embeddings(ids), clean)  # removed on leaving the block


def test_eval_outputs_identical_and_training_outputs_change():
    model = MODELS["llama"]()
    batch = batch_for("llama")
    reference = logits(model, batch)
    handle = lorakit.enable_neftune(model, 10.0)
    model.eval()
    assert torch.equal(logits(model, batch), reference)
    model.train()  # tiny llama has no dropout: any change is the noise
    assert not torch.allclose(logits(model, batch), reference)
    handle.remove()
    assert not handle.active
    assert torch.equal(logits(model, batch), reference)


def test_bad_input():
    model = MODELS["bert"]()
    for alpha in (0, -1.0, float("inf"), True):
        with pytest.raises(LorakitError, match="neftune alpha must be a positive number"):
            lorakit.enable_neftune(model, alpha)
    handle = lorakit.enable_neftune(model, 5.0)
    with pytest.raises(LorakitError, match="already enabled"):
        lorakit.enable_neftune(model, 5.0)
    handle.remove()
    lorakit.enable_neftune(model, 5.0).remove()  # allowed again after removal
    with pytest.raises(LorakitError, match="cannot find the input embeddings"):
        lorakit.enable_neftune(torch.nn.Linear(3, 3), 5.0)
