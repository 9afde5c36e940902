"""Adapters over quantized bases (QLoRA): a tiny Llama loaded through transformers' own
quantization configs (bitsandbytes nf4 / fp4 / int8, torchao int8 weight-only), on the CPU.

Relations: the adapted model at init computes the quantized base's function; the gradients of
A and B (and of the layer input) equal an independent computation on the dequantized weight;
a few training steps lower the loss; save → load gives identical logits; estimated G equals
autograd's gradient w.r.t. the dequantized weights; merging in place is refused (inits that move
W: test_qpissa.py; the dequantizing merge: test_merge_dequantized.py)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_for, perturb_trainables, rel, tiny_llama
from torch import nn

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

import lorakit  # noqa: E402
from lorakit import AdapterConfig, LorakitError  # noqa: E402
from lorakit.adapters.base import weight_out_in  # noqa: E402
from lorakit.adapters.quantized import quantization_label  # noqa: E402
from lorakit.estimate import estimate  # noqa: E402
from lorakit.inject import adapters_of  # noqa: E402
from lorakit.recipes.models import quantization_config  # noqa: E402

QUANTS = ["nf4", "fp4", "int8", "torchao-int8"]
LABELS = {"nf4": "bnb-nf4", "fp4": "bnb-fp4", "int8": "bnb-int8", "torchao-int8": "torchao-int8"}
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(seed=0, dtype=torch.float32).save_pretrained(path)
    return path


def load(base_dir, quant: str | None) -> nn.Module:
    from transformers import AutoModelForCausalLM

    options = {} if quant is None else {"quantization_config": quantization_config(quant, torch.float32), "device_map": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' "inputs will be cast to float16" notes
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, **options).eval()


def logits(model, batch) -> torch.Tensor:
    """Logits in training mode (Llama has no dropout): in eval mode bitsandbytes repacks every 4-bit
    layer for CPU inference (with its scales rounded to bf16; see BitsAndBytes4bit.prepare), which
    fails on the tiny model's shapes and changes the function of the layers lorakit does not wrap."""
    model.train()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return model(input_ids=batch["input_ids"]).logits
    finally:
        model.eval()


def config(method: str = "lora", **kw) -> AdapterConfig:
    return AdapterConfig(method=method, rank=4, alpha=8, targets=TARGETS, **kw)


@pytest.mark.parametrize("quant", QUANTS)
def test_targets_are_quantized_and_read_as_their_dequantized_weight(base_dir, quant):
    model = load(base_dir, quant)
    layer = model.model.layers[0].self_attn.q_proj
    assert quantization_label(layer) == LABELS[quant]
    W = weight_out_in(layer).float()
    x = torch.randn(5, W.shape[1], generator=torch.Generator().manual_seed(0))
    layer.train()  # see base_logits
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rel(layer(x), x @ W.T) < 1e-5  # the dequantized weight is the one the layer computes with
    plain = load(base_dir, None).model.layers[0].self_attn.q_proj.weight
    assert 0 < rel(W, plain) < 0.2  # ... and it is W up to the quantization error


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("method", ["lora", "lora-fa", "dora", "lora-xs"])
def test_adapted_quantized_model_at_init_is_the_quantized_base(base_dir, quant, method):
    model = load(base_dir, quant)
    batch = batch_for("llama")
    before = logits(model, batch)
    extra = {"xs_init_std": 0.0} if method == "lora-xs" else {}
    lorakit.adapt(model, config(method, **extra))
    assert all(a.quantization == LABELS[quant] for a in adapters_of(model).values())
    assert all(a.A.dtype == torch.float32 for a in adapters_of(model).values())
    assert rel(logits(model, batch), before) < 1e-6


def reference_grads(layer: nn.Module, adapter, x: torch.Tensor):
    """∂/∂(A, B, x) of Σ y², y = x Wᵀ + b + s·(x Aᵀ) Bᵀ with W the dequantized weight: independent of lorakit."""
    W = weight_out_in(layer).float()
    A = adapter.A.detach().clone().requires_grad_(True)
    B = adapter.B.detach().clone().requires_grad_(True)
    xr = x.detach().clone().requires_grad_(True)
    y = F.linear(xr, W, layer.bias) + adapter.scale * (xr @ A.T) @ B.T
    return torch.autograd.grad((y**2).sum(), [A, B, xr])


@pytest.mark.parametrize("quant", QUANTS)
def test_gradients_of_a_and_b_match_the_dequantized_computation(base_dir, quant):
    model = load(base_dir, quant)
    lorakit.adapt(model, config())
    perturb_trainables(model, scale=0.2)  # B ≠ 0: the gradient of A is not zero
    adapter = adapters_of(model)["model.layers.0.mlp.down_proj"]
    x = torch.randn(2, 3, adapter.in_features, generator=torch.Generator().manual_seed(1), requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = adapter(x)
    gA, gB, gx = torch.autograd.grad((y**2).sum(), [adapter.A, adapter.B, x])
    rA, rB, rx = reference_grads(adapter.base_layer, adapter, x)
    tol = 1e-3 if quant == "int8" else 1e-5  # LLM.int8 computes from the activations cast to float16
    assert rel(gA, rA) < tol and rel(gB, rB) < tol and rel(gx, rx) < tol


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_under_bf16_autocast_gradients_match_the_dequantized_computation_to_rounding(base_dir, quant, method):
    """QLoRA's usual GPU setting (a Trainer with bf16=True: autocast over the quantized model): the
    adapted layer's factor and input gradients equal the float32 ones to bf16 rounding, in float32."""
    model = load(base_dir, quant)
    lorakit.adapt(model, config(method))
    perturb_trainables(model, scale=0.2)
    adapter = adapters_of(model)["model.layers.0.mlp.down_proj"]
    x = torch.randn(2, 3, adapter.in_features, generator=torch.Generator().manual_seed(1), requires_grad=True)
    params = [adapter.A, adapter.B, x]
    grads = []
    for autocast in (True, False):
        with warnings.catch_warnings(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            warnings.simplefilter("ignore")
            y = adapter(x)
        grads.append(torch.autograd.grad((y.float() ** 2).sum(), params))
    for mixed, full in zip(*grads):
        assert mixed.dtype == torch.float32 and rel(mixed, full) < 5e-2


def train_steps(model, batch, steps: int = 3) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(steps + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = model(**batch).loss
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return losses


@pytest.mark.parametrize("quant", QUANTS)
@pytest.mark.parametrize("method", ["lora", "dora", "lora-sb"])
def test_training_lowers_the_loss_and_save_load_is_identical(base_dir, quant, method, tmp_path):
    model = load(base_dir, quant)
    batch = batch_for("llama")
    lorakit.adapt(model, config(method), data=[batch])
    losses = train_steps(model, batch)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    lorakit.save_adapter(model, tmp_path / "adapter")
    fresh = lorakit.load_adapter(load(base_dir, quant), tmp_path / "adapter")
    assert torch.equal(logits(fresh, batch), logits(model, batch))


@pytest.mark.parametrize("quant", QUANTS)
def test_estimated_gradient_is_autograds_on_the_dequantized_weights(base_dir, quant):
    quantized = load(base_dir, quant)
    batch = batch_for("llama")
    cfg = config("lora-sb")
    stats = estimate(quantized, cfg, [batch], progress=False)
    reference = load(base_dir, None)  # the same model with every quantized layer's dequantized weight
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if quantization_label(module) is not None:
                reference.get_submodule(name).weight.copy_(weight_out_in(module))
    layers = {n: reference.get_submodule(n) for n in stats}
    grads = torch.autograd.grad(reference(**batch).loss, [m.weight for m in layers.values()])
    tol = 2e-2 if quant == "int8" else 1e-5  # int8: every layer's activations cast to float16
    for name, g in zip(layers, grads):
        assert rel(stats[name].grad, g) < tol, name


@pytest.mark.parametrize("quant", ["nf4", "torchao-int8"])
def test_merge_in_place_is_refused_and_leaves_the_model(base_dir, quant):
    model = load(base_dir, quant)
    batch = batch_for("llama")
    lorakit.adapt(model, config())
    perturb_trainables(model)
    before = logits(model, batch)
    for adapter in adapters_of(model).values():
        with pytest.raises(LorakitError, match=f"cannot merge into the {LABELS[quant]} quantized base weight in place"):
            adapter.merge()
    assert len(adapters_of(model)) == 6 and not any(a.merged for a in adapters_of(model).values())
    assert torch.equal(logits(model, batch), before)


def test_an_unknown_quantized_linear_is_named():
    class PackedLinear(nn.Linear):  # some other library's int8 storage
        pass

    model = nn.Sequential(PackedLinear(16, 16))
    model[0].weight = nn.Parameter(torch.zeros(16, 16, dtype=torch.int8), requires_grad=False)
    with pytest.raises(LorakitError, match=r"layer '0': cannot adapt a PackedLinear with a Parameter weight \(torch.int8\)"):
        lorakit.adapt(model, AdapterConfig(rank=2, targets="all-linear"))
    assert isinstance(model[0], PackedLinear)


@pytest.mark.parametrize("quant", ["nf4", "int8", "torchao-int8"])
@pytest.mark.parametrize("method", ["lora", "lora-sb"])
def test_peft_export_on_the_same_quantized_base_gives_lorakits_logits(base_dir, quant, method, tmp_path):
    """The PEFT adapter is relative to the base as the user loads it: the same checkpoint with the
    same quantization config (no init here moves W, so there is nothing else to carry)."""
    peft = pytest.importorskip("peft")
    model = load(base_dir, quant)
    batch = batch_for("llama")
    lorakit.adapt(model, config(method), data=[batch])
    train_steps(model, batch, steps=2)
    expected = logits(model, batch)
    lorakit.export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(load(base_dir, quant), tmp_path / "peft")
    assert rel(logits(loaded, batch), expected) < 1e-5


def test_every_recipe_quantization_has_a_loader_and_a_missing_backend_names_its_pip_command(monkeypatch):
    import importlib.util

    from lorakit.recipes.config import QUANTIZATIONS
    from lorakit.recipes.models import QUANTIZERS

    assert tuple(QUANTIZERS) == QUANTIZATIONS
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(LorakitError, match=r"model.quantization='torchao-int8' needs torchao; run `pip install 'torchao>=0.18.0'`"):
        quantization_config("torchao-int8", torch.float32)
