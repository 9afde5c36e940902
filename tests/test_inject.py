"""Target selection, freezing, modules_to_save and the parameter report."""

import pytest
import torch
from conftest import MODELS

import lorakit
from lorakit.adapters import LoRA
from lorakit.inject import find_targets


def test_suffix_list_regex_and_all_linear_select_the_same_layers():
    model = MODELS["llama"]()
    by_suffix = find_targets(model, lorakit.AdapterConfig(targets=["q_proj", "v_proj"]))
    by_regex = find_targets(model, lorakit.AdapterConfig(targets=r".*\.(q|v)_proj"))
    assert by_suffix == by_regex and len(by_suffix) == 4
    every = find_targets(model, lorakit.AdapterConfig(targets="all-linear"))
    assert "lm_head" not in every and len(every) == 2 * 7  # q k v o gate up down per layer


def test_all_linear_excludes_classifier_head_which_trains_fully():
    model = MODELS["bert"]()
    lorakit.adapt(model, lorakit.AdapterConfig(method="lora", rank=2))
    assert not isinstance(model.classifier, LoRA)
    assert all(p.requires_grad for p in model.classifier.parameters())
    frozen_base = [p for n, p in model.named_parameters() if "base_layer" in n or "embeddings" in n]
    assert frozen_base and not any(p.requires_grad for p in frozen_base)


def test_everything_but_adapters_and_saved_modules_is_frozen_and_report_counts():
    model = MODELS["gpt2"]()
    total_before = sum(p.numel() for p in model.parameters())
    lorakit.adapt(model, lorakit.AdapterConfig(method="lora", rank=2, targets=["c_attn"]))
    adapters = lorakit.adapters_of(model)
    expected_trainable = sum(2 * (a.in_features + a.out_features) for a in adapters.values())
    report = lorakit.parameter_report(model)
    assert report.trainable == expected_trainable
    assert report.total == total_before + expected_trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {f"{n}.{f}" for n in adapters for f in "AB"}


@pytest.mark.parametrize(
    "targets, message",
    [
        (["q_prj"], r"target 'q_prj' matched no module \(did you mean 'q_proj'\?\)"),
        (r"nothing.*", "matched no module name"),
        (["input_layernorm"], "is a LlamaRMSNorm; lorakit adapts nn.Linear, transformers Conv1D, nn.Conv2d and nn.Embedding"),
        (["self_attn"], "is a LlamaAttention"),
    ],
)
def test_bad_targets_are_clear_errors(targets, message):
    with pytest.raises(lorakit.LorakitError, match=message):
        lorakit.adapt(MODELS["llama"](), lorakit.AdapterConfig(targets=targets))


def test_rank_larger_than_layer_and_double_adapt_are_errors():
    with pytest.raises(lorakit.LorakitError, match=r"layer '.*q_proj': rank 64 exceeds the layer's size"):
        lorakit.adapt(MODELS["llama"](), lorakit.AdapterConfig(rank=64, targets=["q_proj"]))
    model = lorakit.adapt(MODELS["llama"](), lorakit.AdapterConfig(rank=2))
    with pytest.raises(lorakit.LorakitError, match="already has lorakit adapters"):
        lorakit.adapt(model, lorakit.AdapterConfig(rank=2))


def test_unsupported_layer_passed_directly_is_an_error():
    from lorakit.adapters import LoRA

    with pytest.raises(lorakit.LorakitError, match="cannot adapt a LayerNorm"):
        LoRA(torch.nn.LayerNorm(4), rank=2, scale=1.0)
