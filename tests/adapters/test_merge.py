"""Every adapter: merged == unmerged output, unmerge restores W, merge is idempotent."""

import pytest
import torch
from conftest import MODELS, batch_for, logits, perturb_trainables, rel
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.adapters import ADAPTER_CLASSES, DoRA, LoRAXS

STRUCTURE_METHODS = {"lora": "lora", "lora-fa": "lora-fa", "xs": "lora-xs", "dora": "dora"}


@pytest.mark.parametrize("method", ["lora", "lora-fa", "lora-xs", "dora", "pissa"])
def test_merge_equals_unmerged_and_unmerge_restores(model_kind, method):
    model = MODELS[model_kind]()
    lorakit.adapt(model, lorakit.AdapterConfig(method=method, rank=4))
    perturb_trainables(model)
    batch = batch_for(model_kind)
    adapters = lorakit.adapters_of(model)
    before = {n: a.base_weight.clone() for n, a in adapters.items()}
    unmerged = logits(model, batch)
    for a in adapters.values():
        a.merge()
    merged = logits(model, batch)
    assert rel(merged, unmerged) < 1e-12
    changed = max(rel(a.base_weight, before[n]) for n, a in adapters.items())
    assert changed > 1e-3  # the merge really moved the weights
    once = {n: a.base_weight.clone() for n, a in adapters.items()}
    for a in adapters.values():
        a.merge()  # idempotent
    assert all(torch.equal(a.base_weight, once[n]) for n, a in adapters.items())
    for a in adapters.values():
        a.unmerge()
    assert max(rel(a.base_weight, before[n]) for n, a in adapters.items()) < 1e-13
    assert rel(logits(model, batch), unmerged) < 1e-12


@pytest.mark.parametrize("structure", sorted(ADAPTER_CLASSES))
@pytest.mark.parametrize("layer_type", ["linear", "conv1d"])
def test_delta_weight_matches_forward_on_non_square_layer(structure, layer_type):
    torch.manual_seed(0)
    base = nn.Linear(7, 5).double() if layer_type == "linear" else Conv1D(5, 7).double()
    adapter = ADAPTER_CLASSES[structure](base, rank=3, scale=0.7)
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_()
    if isinstance(adapter, DoRA):
        adapter.finish_init()
        with torch.no_grad():
            adapter.magnitude.mul_(1.5)
    x = torch.randn(4, 7, dtype=torch.float64)
    W = adapter.base_weight.clone()
    bias = base.bias
    if isinstance(adapter, DoRA):
        V = W + adapter.delta_weight()
        expected_W = adapter.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)
    else:
        B, A = adapter.B, adapter.A
        middle = adapter.R if isinstance(adapter, LoRAXS) else torch.eye(3, dtype=torch.float64)
        expected_W = W + 0.7 * B @ middle @ A
    expected = x @ expected_W.T + bias
    assert rel(adapter(x), expected) < 1e-13


def test_dropout_applies_to_adapter_input_only():
    torch.manual_seed(0)
    base = nn.Linear(6, 6).double()
    adapter = ADAPTER_CLASSES["lora"](base, rank=2, scale=1.0, dropout=0.5)
    with torch.no_grad():
        adapter.A.normal_()
        adapter.B.normal_()
    x = torch.randn(3, 6, dtype=torch.float64)
    adapter.train()
    torch.manual_seed(5)
    out = adapter(x)
    torch.manual_seed(5)
    mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    assert rel(out, base(x) + ((x * mask) @ adapter.A.T) @ adapter.B.T) < 1e-13
    adapter.eval()
    assert rel(adapter(x), base(x) + (x @ adapter.A.T) @ adapter.B.T) < 1e-13


def test_disable_gives_base_model_and_merged_adapter_cannot_be_disabled():
    model = MODELS["llama"]()
    batch = batch_for("llama")
    base = logits(model, batch)
    lorakit.adapt(model, lorakit.AdapterConfig(method="lora", rank=4))
    perturb_trainables(model)
    assert rel(logits(model, batch), base) > 1e-4
    with lorakit.adapters_disabled(model):
        assert rel(logits(model, batch), base) < 1e-14
    assert rel(logits(model, batch), base) > 1e-4
    adapter = next(iter(lorakit.adapters_of(model).values()))
    adapter.merge()
    with pytest.raises(lorakit.LorakitError, match="unmerge"):
        adapter.set_enabled(False)


@pytest.mark.parametrize("rslora", [False, True])
def test_scale_is_alpha_over_rank_or_its_root(rslora):
    model = MODELS["bert"]()
    lorakit.adapt(model, lorakit.AdapterConfig(method="lora", rank=4, alpha=8, use_rslora=rslora))
    expected = 8 / 2 if rslora else 8 / 4
    assert all(a.scale == expected for a in lorakit.adapters_of(model).values())


def test_adapter_dtype_float32_on_bfloat16_model_keeps_output_dtype():
    model = MODELS["llama"](dtype=torch.bfloat16)
    lorakit.adapt(model, lorakit.AdapterConfig(method="lora", rank=4, adapter_dtype="float32"))
    adapter = next(iter(lorakit.adapters_of(model).values()))
    assert adapter.A.dtype == torch.float32 and adapter.base_weight.dtype == torch.bfloat16
    out = model(input_ids=batch_for("llama")["input_ids"]).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
