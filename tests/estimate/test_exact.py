"""The exact estimators against autograd, in float64: G = ∇_W of the training loss (the mean over
supervised tokens for decoders; the mean over examples with estimation.weighting='example')."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import MODELS, batch_for
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import AdapterConfig, LorakitError
from lorakit.estimate import choose_estimator, estimate
from lorakit.estimate.exact import gradient_bytes


def ragged_batches(kind: str) -> list[dict]:
    """Batches of sizes 3, 1, 2 and different lengths; a padded batch; decoders mask prompt tokens with -100."""
    batches = [batch_for(kind, 3, 9, seed=1), batch_for(kind, 1, 5, seed=2), batch_for(kind, 2, 7, seed=3)]
    for b in batches:
        b["attention_mask"] = torch.ones_like(b["input_ids"])
        if kind != "bert":
            b["labels"][:, :2] = -100
    padded = batches[2]  # second example is 3 tokens shorter, padded on the right
    padded["attention_mask"][1, -3:] = 0
    if kind != "bert":
        padded["labels"][1, -3:] = -100
    return batches


def single_examples(batches: list[dict]) -> list[dict]:
    return [{k: v[i : i + 1] for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]


def example_loss(model: nn.Module, kind: str, example: dict) -> tuple[torch.Tensor, int] | None:
    """One example's summed loss and its number of terms, written independently of lorakit: class CE
    (one term), or next-token CE summed over the labels ≠ -100."""
    logits = model(**{k: v for k, v in example.items() if k != "labels"}).logits
    if kind == "bert":
        return F.cross_entropy(logits, example["labels"]), 1
    predicted, wanted = logits[0, :-1], example["labels"][0, 1:]
    keep = wanted != -100
    return (F.cross_entropy(predicted[keep], wanted[keep], reduction="sum"), int(keep.sum())) if keep.any() else None


def autograd_gradients(model: nn.Module, kind: str, batches: list[dict], names: list[str],
                       weighting: str = "token") -> dict[str, torch.Tensor]:
    """∇_W (out × in), each example run alone, of Σ losses / Σ terms ('token': every supervised token
    weighs the same, as in training) or of the mean of the per-example means ('example')."""
    layers = {n: model.get_submodule(n) for n in names}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        layer.weight.requires_grad_(True)
    terms = [t for e in single_examples(batches) if (t := example_loss(model, kind, e)) is not None]
    if weighting == "token":
        objective = sum(loss for loss, _ in terms) / sum(n for _, n in terms)
    else:
        objective = torch.stack([loss / n for loss, n in terms]).mean()
    grads = torch.autograd.grad(objective, [m.weight for m in layers.values()])
    for p, flag in flags.items():
        p.requires_grad_(flag)
    return {n: g.T if isinstance(layers[n], Conv1D) else g for n, g in zip(names, grads)}


def max_rel_error(stats, reference) -> float:
    return max(((stats[n].grad - g).norm() / g.norm()).item() for n, g in reference.items())


@pytest.mark.parametrize("weighting", ["token", "example"])
@pytest.mark.parametrize("budgeted", [False, True], ids=["one-pass", "memory-budget"])
def test_exact_gradient_equals_autograd(model_kind, budgeted, weighting):
    model = MODELS[model_kind]()
    batches = ragged_batches(model_kind)  # examples of different lengths, some tokens masked, one padded
    largest = max(gradient_bytes(m) for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)))
    config = AdapterConfig(method="lora-ga", rank=2, estimator="exact", num_samples=6,
                           memory_budget=largest if budgeted else None, estimate_weighting=weighting)
    stats = estimate(model, config, batches, progress=False)
    reference = autograd_gradients(model, model_kind, batches, list(stats), weighting)
    # Llama's RMSNorm computes in float32 even in a float64 model: its backward rounds δ to float32, at
    # a scale that differs between the two computations when they normalise differently (token weighting)
    tolerance = 1e-6 if model_kind == "llama" and weighting == "token" else 1e-8
    assert max_rel_error(stats, reference) <= tolerance
    if model_kind != "bert":  # on decoders the two objectives differ: the test tells them apart
        other = autograd_gradients(model, model_kind, batches, list(stats), "example" if weighting == "token" else "token")
        assert max_rel_error(stats, other) > 1e-3
    report = stats.report
    assert (report.estimator, report.samples) == ("exact", 6)
    assert report.passes == report.groups and (report.groups > 1) == budgeted
    if model_kind == "gpt2":  # Conv1D layers (weight stored in × out) are covered
        assert any(isinstance(model.get_submodule(n), Conv1D) for n in stats)


@pytest.mark.parametrize("weighting", ["token", "example"])
def test_the_batching_does_not_change_g(weighting):
    model = MODELS["llama"]()
    batches = ragged_batches("llama")
    config = AdapterConfig(method="lora-ga", rank=2, estimator="exact", num_samples=6, estimate_weighting=weighting)
    together = estimate(model, config, batches, progress=False)
    one_by_one = estimate(model, config, single_examples(batches), progress=False)  # six batches of one
    for name in together:
        assert torch.allclose(together[name].grad, one_by_one[name].grad, rtol=1e-10, atol=1e-14)


def test_num_samples_cuts_the_data_and_single_example_dicts_are_accepted():
    model = MODELS["bert"]()
    batches = [batch_for("bert", 4, 9, seed=s) for s in range(3)]
    config = AdapterConfig(method="lora-ga", rank=2, estimator="exact", num_samples=5)
    stats = estimate(model, config, iter(batches), progress=False)
    kept = [batches[0], {k: v[:1] for k, v in batches[1].items()}]
    reference = autograd_gradients(model, "bert", kept, list(stats))
    assert stats.report.samples == 5 and max_rel_error(stats, reference) <= 1e-8
    # a list of single examples (plain lists and ints) gives the same G
    examples = [{"input_ids": e["input_ids"][0].tolist(), "labels": int(e["labels"][0])} for e in single_examples(kept)]
    listed = estimate(model, config, examples, progress=False)
    assert max_rel_error(listed, reference) <= 1e-8


def test_examples_without_supervised_tokens_do_not_count():
    model = MODELS["gpt2"]()
    batches = ragged_batches("gpt2")
    batches[0]["labels"][1] = -100  # nothing to predict in this example
    config = AdapterConfig(method="lora-ga", rank=2, estimator="exact", num_samples=6)
    stats = estimate(model, config, batches, progress=False)
    assert stats.report.samples == 5
    assert max_rel_error(stats, autograd_gradients(model, "gpt2", batches, list(stats))) <= 1e-8


def test_model_state_is_restored_and_no_grad_buffers_are_made():
    model = MODELS["bert"]()
    model.train()
    model.bert.embeddings.eval()  # a mixed state must come back as it was
    model.classifier.weight.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    config = AdapterConfig(method="lora-ga", rank=2, estimator="exact", num_samples=3)
    stats = estimate(model, config, [batch_for("bert")], progress=False)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    # dropout was off: the result equals an estimate from the model in eval mode
    model.eval()
    again = estimate(model, config, [batch_for("bert")], progress=False)
    assert all(torch.equal(stats[n].grad, again[n].grad) for n in stats)


def test_estimate_dropout_keeps_dropout_on():
    model = MODELS["bert"]()
    model.config.hidden_dropout_prob = 0.5
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.5
    base = AdapterConfig(method="lora-ga", rank=2, estimator="exact", num_samples=3)
    plain = estimate(model, base, [batch_for("bert")], progress=False)
    noisy = estimate(model, base.replace(estimate_dropout=True), [batch_for("bert")], progress=False)
    name = next(iter(plain))
    assert not torch.allclose(plain[name].grad, noisy[name].grad)
    assert not model.training


def test_auto_estimator_rule():
    model = MODELS["llama"]()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    total = sum(gradient_bytes(m) for m in layers.values())
    largest = max(gradient_bytes(m) for m in layers.values())
    ga = AdapterConfig(method="lora-ga", rank=2)
    assert choose_estimator(ga, layers) == ("exact", [list(layers)])
    assert choose_estimator(ga.replace(memory_budget=total), layers) == ("exact", [list(layers)])
    assert choose_estimator(ga.replace(memory_budget=largest), layers)[0] == "sketch"
    sb = AdapterConfig(method="lora-sb", rank=2, memory_budget=largest)  # sign(G) needs G itself
    estimator, groups = choose_estimator(sb, layers)
    assert estimator == "exact" and len(groups) > 1 and sum(groups, []) == list(layers)
    assert all(sum(gradient_bytes(layers[n]) for n in g) <= largest for g in groups)
    assert choose_estimator(sb.replace(update="gradient"), layers)[0] == "sketch"


# -- bad input ----------------------------------------------------------------------------------
CONFIG = AdapterConfig(method="lora-ga", rank=2, estimator="exact", num_samples=4)


def test_empty_data_is_an_error():
    with pytest.raises(LorakitError, match="empty"):
        estimate(MODELS["bert"](), CONFIG, [], progress=False)
    with pytest.raises(LorakitError, match="no estimation data"):
        estimate(MODELS["bert"](), CONFIG, None, progress=False)


def test_batches_without_labels_are_an_error():
    batch = batch_for("bert")
    del batch["labels"]
    with pytest.raises(LorakitError, match="no 'labels'"):
        estimate(MODELS["bert"](), CONFIG, [batch], progress=False)


def test_non_finite_loss_is_an_error():
    model = MODELS["bert"]()
    with torch.no_grad():
        model.classifier.weight.fill_(float("inf"))
    with pytest.raises(LorakitError, match="not finite"):
        estimate(model, CONFIG, [batch_for("bert")], progress=False)


def test_target_without_gradient_is_named():
    model = MODELS["llama"]()
    model.unused = nn.Linear(32, 32, dtype=torch.float64)
    with pytest.raises(LorakitError, match="'unused' received no gradient"):
        estimate(model, CONFIG, [batch_for("llama")], targets=["model.layers.0.self_attn.q_proj", "unused"], progress=False)
    assert all(p.grad is None for p in model.parameters())


def test_budget_smaller_than_the_largest_layer_is_named():
    model = MODELS["llama"]()
    with pytest.raises(LorakitError, match=r"smaller than the gradient of layer 'model\.layers\.0\.mlp"):
        estimate(model, CONFIG.replace(memory_budget=1000), [batch_for("llama")], progress=False)


def test_rank_too_large_for_a_layer_is_named():
    with pytest.raises(LorakitError, match="needs 40 singular directions"):
        estimate(MODELS["bert"](), CONFIG.replace(rank=20), [batch_for("bert")], progress=False)



def test_a_dataloader_is_read_once_and_kept_for_every_pass():
    from torch.utils.data import DataLoader

    batch = batch_for("bert", 6, 9, seed=4)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(6)]
    loader = DataLoader(rows, batch_size=4)  # collates dicts: batches of 4 and 2
    model = MODELS["bert"]()
    largest = max(gradient_bytes(m) for m in model.modules() if isinstance(m, nn.Linear))
    config = AdapterConfig(method="lora-ga", rank=2, estimator="exact", num_samples=6, memory_budget=largest)
    stats = estimate(model, config, loader, progress=False)
    assert stats.report.passes > 1 and stats.report.samples == 6  # every pass saw all six examples
    assert max_rel_error(stats, autograd_gradients(model, "bert", [batch], list(stats))) <= 1e-8


def test_an_embedding_target_is_refused_by_name():
    model = MODELS["llama"]()  # an Embedding's weight is 2-D too, but no (out × in) map of an input
    with pytest.raises(LorakitError, match="'model.embed_tokens' is a Embedding; estimation needs nn.Linear"):
        estimate(model, CONFIG, [batch_for("llama")], targets=["model.embed_tokens"], progress=False)
