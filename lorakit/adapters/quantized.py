"""Quantized base layers (QLoRA): the backends lorakit can wrap, and how to read their weight.

An adapter wraps a quantized Linear exactly as it wraps ``nn.Linear``: the base layer keeps
its own class and quantized storage, stays frozen, and computes ``base(x)`` with its own
kernels; the low-rank path s·B·A runs beside it with the factors in float32 (or
``adapter_dtype``). Whatever reads W (SVD inits such as lora-xs, DoRA's row norms, the
save fingerprint, shapes) reads the dequantized weight (out × in) from the backend's own
dequantization routine. Merging in place is refused with an error naming the backend.

Initialisations that move W (pissa, svd-fa, lora-ga; lora-sb with ``preserve_init``: the QPiSSA
recipe of Meng et al., 2024) compute the residual W − s·B₀A₀ from the dequantized weight in
float32 and store it re-quantized by the same backend with the layer's own settings
(``QuantizedBackend.quantize``: bitsandbytes' ``Params4bit`` / ``Int8Params``, torchao's
``quantize_``). The new base then holds Q(W − s·B₀A₀), so the adapted model at init computes the
loaded model's function up to that quantization error, ‖W − s·B₀A₀ − Q(W − s·B₀A₀)‖ / ‖W‖,
reported per layer (``QuantizationError``) beside ‖W − Q(W)‖ / ‖W‖. Here W is the weight lorakit
reads, the dequantized base: re-quantizing it unchanged is (almost) exact, so the plain figure is
near 0 and the residual's figure is what the init changed.

The PiSSA paper's QPiSSA starts from the full-precision W instead: its principal components and the
residual W − s·B₀A₀ come from the unquantized checkpoint, and only the residual is quantized.
``FullPrecisionWeights`` supplies those weights from the safetensors checkpoint the model was
quantized from (``AdapterConfig(full_precision_checkpoint=PATH)``, or ``with
lorakit.full_precision_weights(model, PATH):``), matched by module name: the SVD (pissa, svd-fa,
lora-xs), LoftQ's alternation and the residual then use that W, and the report's W is it too, so
``plain`` is the loaded model's real quantization error ‖W − Q(W)‖ / ‖W‖. Measured on SmolLM2-135M's
layer-0 q_proj (nf4, r = 16): residual 0.055 against Q(W)'s 0.101; the same init from the
dequantized weight ends 0.115 away from the full-precision W.

Backends (each a small class, one table):
- ``bnb-nf4`` / ``bnb-fp4``: bitsandbytes ``Linear4bit`` (``bnb.functional.dequantize_4bit``);
- ``bnb-int8``: bitsandbytes ``Linear8bitLt`` with int8 weights (``int8_vectorwise_dequant``);
- ``torchao-int8``: an ``nn.Linear`` whose weight is torchao's ``Int8Tensor`` (int8
  weight-only; ``weight.dequantize()``).
A backend's library is never imported here unless it is already loaded: a layer of that
library cannot exist otherwise.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError


class QuantizedBackend:
    """One kind of quantized Linear: how to recognise it and how to dequantize its weight."""

    package: ClassVar[str]  # the import name of its library

    def matches(self, layer: nn.Module) -> bool:
        raise NotImplementedError

    def label(self, layer: nn.Module) -> str:
        """The backend's name for this layer (e.g. 'bnb-nf4')."""
        raise NotImplementedError

    def prepare(self, layer: nn.Module) -> None:
        """Called once when an adapter wraps the layer."""

    def dequantize(self, layer: nn.Module) -> Tensor:
        """The layer's weight (out × in), dequantized, as a new floating-point tensor."""
        return self.dequantize_weight(layer, layer.weight)

    def dequantize_weight(self, layer: nn.Module, weight: Tensor) -> Tensor:
        """A weight of this layer's kind (the layer's own or one ``quantize`` made), dequantized."""
        raise NotImplementedError

    def check_quantizable(self, layer: nn.Module) -> None:
        """Raise LorakitError when ``quantize`` cannot re-quantize this layer's weight (its settings)."""

    def quantize(self, layer: nn.Module, W: Tensor) -> nn.Parameter:
        """Q(W): a new frozen weight holding W (out × in) quantized by this backend with the layer's own
        settings; the layer is not changed (``store`` installs it)."""
        raise NotImplementedError

    def store(self, layer: nn.Module, weight: nn.Parameter) -> None:
        """Make ``weight`` (from ``quantize``) the layer's weight."""
        layer.weight = weight

    def roundtrip(self, layer: nn.Module, W: Tensor) -> Tensor:
        """Q(W) dequantized, in float32 (the layer is not changed)."""
        return self.dequantize_weight(layer, self.quantize(layer, W)).float()

    @classmethod
    def loaded(cls) -> bool:
        return cls.package in sys.modules


class BitsAndBytes4bit(QuantizedBackend):
    package = "bitsandbytes"

    def matches(self, layer: nn.Module) -> bool:
        import bitsandbytes as bnb

        return isinstance(layer, bnb.nn.Linear4bit)

    def label(self, layer: nn.Module) -> str:
        return f"bnb-{layer.weight.quant_type}"

    def prepare(self, layer: nn.Module) -> None:
        """Turn off bitsandbytes' CPU inference repacking. On a CPU with AVX512-BF16, an eval-mode
        forward without grad rewrites the 4-bit weight in place into another layout with its scales
        rounded to bf16: the layer then computes a different function in eval than in training, and
        its weight no longer dequantizes (nor repacks for shapes not divisible by 32). The adapted layer
        keeps the standard layout, so train, eval, the dequantized W and PEFT on the saved base agree."""
        if getattr(layer.weight.quant_state, "packing_format_for_cpu", False):
            raise LorakitError(
                f"this {self.label(layer)} layer was repacked for CPU inference by an eval-mode forward; "
                "adapt the model before running it in eval mode (load it again)"
            )
        layer.support_avx512bf16_for_cpu = False

    def dequantize_weight(self, layer: nn.Module, weight: Tensor) -> Tensor:
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)

    def quantize(self, layer: nn.Module, W: Tensor) -> nn.Parameter:
        import bitsandbytes as bnb

        old = layer.weight  # the same block size, double quantization, 4-bit type, storage and float dtype
        new = bnb.nn.Params4bit(W.detach().to(old.quant_state.dtype).contiguous(), requires_grad=False,
                                blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                quant_type=old.quant_type, quant_storage=old.quant_storage)
        return new._quantize(old.device)  # bitsandbytes' quantize_4bit

    def store(self, layer: nn.Module, weight: nn.Parameter) -> None:
        weight.module = layer
        layer.weight = weight
        layer.quant_state = weight.quant_state


class BitsAndBytes8bit(QuantizedBackend):
    package = "bitsandbytes"

    def matches(self, layer: nn.Module) -> bool:
        import bitsandbytes as bnb

        return isinstance(layer, bnb.nn.Linear8bitLt) and not layer.weight.is_floating_point()

    def label(self, layer: nn.Module) -> str:
        return "bnb-int8"

    def dequantize(self, layer: nn.Module) -> Tensor:
        import bitsandbytes as bnb

        # the row scales move from the weight to the layer's state at the first forward
        scales = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
        return bnb.functional.int8_vectorwise_dequant(layer.weight.data, scales.to(layer.weight.device))

    def dequantize_weight(self, layer: nn.Module, weight: Tensor) -> Tensor:
        import bitsandbytes as bnb

        return bnb.functional.int8_vectorwise_dequant(weight.data, weight.SCB.to(weight.device))

    def quantize(self, layer: nn.Module, W: Tensor) -> nn.Parameter:
        import bitsandbytes as bnb

        new = bnb.nn.Int8Params(W.detach().contiguous(), requires_grad=False, has_fp16_weights=False)
        return new._quantize(layer.weight.device)  # bitsandbytes' int8_vectorwise_quant (from fp16, as at load)

    def store(self, layer: nn.Module, weight: nn.Parameter) -> None:
        layer.weight = weight
        layer.state.CB = layer.state.SCB = None  # the next forward takes the new weight's (init_8bit_state)


class TorchAOInt8(QuantizedBackend):
    package = "torchao"

    def matches(self, layer: nn.Module) -> bool:
        from torchao.quantization import Int8Tensor

        return isinstance(layer, nn.Linear) and isinstance(layer.weight, Int8Tensor)

    def label(self, layer: nn.Module) -> str:
        return "torchao-int8"

    def dequantize_weight(self, layer: nn.Module, weight: Tensor) -> Tensor:
        return weight.dequantize()

    def granularity(self, layer: nn.Module):
        """torchao's granularity of the layer's int8 weight-only quantization, None for another scheme."""
        from torchao.quantization import PerGroup, PerRow, PerTensor

        weight = layer.weight
        out, inp = weight.shape
        block = list(weight.block_size)
        if weight.act_quant_kwargs is not None:
            return None
        return PerRow() if block == [1, inp] else PerTensor() if block == [out, inp] else PerGroup(block[1]) if block[0] == 1 else None

    def check_quantizable(self, layer: nn.Module) -> None:
        if self.granularity(layer) is None:
            raise LorakitError(
                f"the torchao-int8 layer's weight (block size {list(layer.weight.block_size)}, activation quantization "
                f"{layer.weight.act_quant_kwargs is not None}) is not int8 weight-only per row, group or tensor, which "
                "lorakit re-quantizes; use an init that keeps W (lora, lora-xs, lora-sb) on this base"
            )

    def quantize(self, layer: nn.Module, W: Tensor) -> nn.Parameter:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        self.check_quantizable(layer)
        old = layer.weight
        out, inp = old.shape
        granularity = self.granularity(layer)
        fresh = torch.nn.utils.skip_init(nn.Linear, inp, out, bias=False, device=old.device, dtype=old.dtype)
        with torch.no_grad():
            fresh.weight.copy_(W)
        quantize_(fresh, Int8WeightOnlyConfig(granularity=granularity, set_inductor_config=False))
        return fresh.weight


BACKENDS: tuple[QuantizedBackend, ...] = (BitsAndBytes4bit(), BitsAndBytes8bit(), TorchAOInt8())
KNOWN = "bitsandbytes Linear4bit (nf4, fp4), Linear8bitLt (int8) and torchao int8 weight-only"


def quantization_of(layer: nn.Module) -> QuantizedBackend | None:
    """The backend of a quantized Linear, None for a plain floating-point layer.

    Raises LorakitError for a Linear whose weight is quantized in a way lorakit does not know
    (reading its storage as W would be wrong)."""
    for backend in BACKENDS:
        if backend.loaded() and backend.matches(layer):
            return backend
    weight = getattr(layer, "weight", None)
    if isinstance(layer, nn.Linear) and isinstance(weight, Tensor) and _foreign_storage(weight):
        raise LorakitError(
            f"cannot adapt a {type(layer).__name__} with a {type(weight).__name__} weight ({weight.dtype}): lorakit knows "
            f"the quantized layers of {KNOWN}; quantize with one of those"
        )
    return None


def _foreign_storage(weight: Tensor) -> bool:
    """A weight that is not plain floating-point values: packed integers, or a torchao tensor subclass."""
    if not weight.is_floating_point():
        return True
    if "torchao" in sys.modules:
        from torchao.utils import TorchAOBaseTensor

        return isinstance(weight, TorchAOBaseTensor)
    return False


def quantization_label(layer: nn.Module) -> str | None:
    """'bnb-nf4', 'bnb-fp4', 'bnb-int8', 'torchao-int8', or None for an unquantized layer."""
    backend = quantization_of(layer)
    return None if backend is None else backend.label(layer)


@dataclass
class QuantizationError:
    """Relative quantization errors of one re-quantized base (W: the weight before the change, dequantized or
    the full-precision checkpoint's): ``plain`` = ‖W − Q(W)‖ / ‖W‖, ``residual`` = ‖W' − Q(W')‖ / ‖W‖ for
    the new base W' = W − s·B₀A₀, ``own`` = ‖W' − Q(W')‖ / ‖W'‖ (the format's error on the matrix it
    quantized). ``reference`` is what Q(W) costs: ``plain``, or for a dequantized W (which re-quantizes
    to itself) the format's error ``own``."""

    backend: str
    plain: float
    residual: float
    own: float | None = None
    full_precision: bool = False  # W was the full-precision checkpoint's weight

    @property
    def reference(self) -> float:
        return max(self.plain, self.own or 0.0)


# an init whose re-quantized bases lose more than this many times Q(W)'s error is warned about
REQUANTIZATION_MARGIN = 1.5


def requantization_warning(report: dict[str, QuantizationError], init: str) -> str | None:
    """One line when ``init`` re-quantized bases whose error exceeds REQUANTIZATION_MARGIN × Q(W)'s (e.g.
    lora-ga on 4 bits, whose offset s·B₀A₀ is not small next to W), else None."""
    worse = {name: e for name, e in report.items() if e.residual > REQUANTIZATION_MARGIN * e.reference}
    if not worse:
        return None
    worst_name, worst = max(worse.items(), key=lambda item: item[1].residual / max(item[1].reference, 1e-30))
    backends = ", ".join(sorted({e.backend for e in worse.values()}))
    return (f"lorakit: {init} re-quantized {len(worse)} of {len(report)} {backends} bases as W − s·B₀A₀ with a "
            f"quantization error over {REQUANTIZATION_MARGIN:g}× Q(W)'s (worst {worst_name}: {worst.residual:.3f} of "
            f"‖W‖ against {worst.reference:.3f}): the model at init is that far from the loaded one; use lora-sb, or an "
            "init that keeps W (lora, lora-xs), on this base")


def relative_error(W: Tensor, approximation: Tensor, reference: Tensor) -> float:
    """‖W − approximation‖ / ‖reference‖ in float32+."""
    difference, reference = (W - approximation).detach().double(), reference.detach().double()
    return float(torch.linalg.norm(difference) / torch.linalg.norm(reference).clamp_min(1e-30))


def quantization_report(model: nn.Module) -> dict[str, QuantizationError]:
    """The quantization errors of the bases an initialisation re-quantized (QPiSSA), by layer name."""
    from lorakit.inject import adapters_of

    return {name: a.quantization_error for name, a in adapters_of(model).items() if a.quantization_error is not None}


def quantization_summary(model: nn.Module) -> dict[str, float | int | str] | None:
    """Mean and worst of ``quantization_report`` (what a run records in run.json and prints); None when no
    initialisation re-quantized a base."""
    report = quantization_report(model)
    if not report:
        return None
    plain = [e.plain for e in report.values()]
    residual = [e.residual for e in report.values()]
    return {"backend": ", ".join(sorted({e.backend for e in report.values()})), "layers": len(report),
            "mean_plain": sum(plain) / len(plain), "mean_residual": sum(residual) / len(residual),
            "max_residual": max(residual), "from_full_precision": all(e.full_precision for e in report.values())}


FULL_PRECISION_ATTR = "lorakit_full_precision"  # the model's FullPrecisionWeights inside full_precision_weights


class FullPrecisionWeights:
    """The full-precision weights of a quantized model, read lazily from its safetensors checkpoint (a
    ``.safetensors`` file or a folder of them, as ``save_pretrained`` writes; never pickles).

    ``weight(name, shape)`` is module ``name``'s ``weight`` in float32 (tried as ``name.weight``, then
    without the model's ``base_model_prefix``); ``check(name, shape)`` checks it exists with that shape
    (out × in) without reading it. Both raise a one-line LorakitError naming the module."""

    def __init__(self, checkpoint: str | os.PathLike, prefix: str = "") -> None:
        path = Path(checkpoint)
        if path.is_dir():
            files = sorted(path.glob("*.safetensors"))
            if not files:
                others = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
                found = f" (it has {others[0]}: lorakit reads only safetensors, never pickles)" if others else ""
                raise LorakitError(f"full-precision checkpoint folder {path} holds no .safetensors file{found}; "
                                   "save the unquantized model with save_pretrained (safetensors) and give that folder")
        elif path.is_file():
            if path.suffix != ".safetensors":
                raise LorakitError(f"full-precision checkpoint {path} is not a .safetensors file; lorakit reads only "
                                   "safetensors, never pickles: save the unquantized model with save_pretrained")
            files = [path]
        else:
            raise LorakitError(f"full-precision checkpoint {path} does not exist; give the safetensors file or folder "
                               "of the unquantized model")
        from safetensors import safe_open

        self.path, self.prefix, self._where = path, prefix, {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in f.keys():
                        self._where[key] = (file, tuple(f.get_slice(key).get_shape()))
            except Exception as exc:  # safetensors raises several types for garbled files
                raise LorakitError(f"full-precision checkpoint {file} is not a readable safetensors file "
                                   f"({type(exc).__name__}); give the unquantized model's safetensors") from None

    def key(self, name: str) -> str:
        for key in (f"{name}.weight", f"{name.removeprefix(self.prefix + '.')}.weight" if self.prefix else None):
            if key in self._where:
                return key
        raise LorakitError(f"full-precision checkpoint {self.path} has no tensor {name}.weight for module {name!r}; "
                           "give the checkpoint this model was quantized from")

    def check(self, name: str, shape: tuple[int, ...]) -> None:
        key = self.key(name)
        found = self._where[key][1]
        if found != tuple(shape):
            raise LorakitError(f"full-precision checkpoint {self.path}: {key} is {' × '.join(map(str, found))} but module "
                               f"{name!r} is {' × '.join(map(str, shape))}; give the checkpoint this model was quantized from")

    def weight(self, name: str, shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
        from safetensors import safe_open

        self.check(name, shape)
        key = self.key(name)
        with safe_open(str(self._where[key][0]), framework="pt") as f:
            return f.get_tensor(key).to(device=device, dtype=torch.float32)


def full_precision_source(model: nn.Module, checkpoint: str | os.PathLike | None) -> FullPrecisionWeights | None:
    """The full-precision weights to use for ``model``: those of an enclosing ``full_precision_weights``,
    else ``checkpoint``'s (a config's ``full_precision_checkpoint``), else None."""
    active = model.__dict__.get(FULL_PRECISION_ATTR)
    if active is not None:
        return active
    if checkpoint is None:
        return None
    return FullPrecisionWeights(checkpoint, getattr(model, "base_model_prefix", "") or "")


def check_full_precision(source: FullPrecisionWeights | None, layers: dict[str, nn.Module]) -> None:
    """Check before anything changes that ``source`` has every quantized layer's weight, with its shape."""
    if source is None:
        return
    for name, layer in layers.items():
        backend = quantization_of(layer) if isinstance(layer, nn.Linear) else None
        if backend is not None:
            source.check(name, (layer.out_features, layer.in_features))


@contextmanager
def full_precision_weights(model: nn.Module, checkpoint: str | os.PathLike) -> Iterator[FullPrecisionWeights]:
    """Inside, ``lorakit.adapt`` and ``lorakit.load_adapter`` on ``model`` read each quantized target's
    full-precision W from ``checkpoint`` (safetensors, matched by module name) for the SVD and the
    residual W − s·B₀A₀ (QPiSSA as in the PiSSA paper)::

        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(...))
        with lorakit.full_precision_weights(model, path):
            lorakit.adapt(model, AdapterConfig(method="pissa"))

    The same as ``AdapterConfig(full_precision_checkpoint=path)``, which a saved adapter remembers; the
    context overrides it (e.g. to load an adapter whose checkpoint moved)."""
    if not isinstance(model, nn.Module):
        raise LorakitError(f"full_precision_weights takes the quantized model, got {type(model).__name__}")
    source = FullPrecisionWeights(checkpoint, getattr(model, "base_model_prefix", "") or "")
    previous = model.__dict__.get(FULL_PRECISION_ATTR)
    model.__dict__[FULL_PRECISION_ATTR] = source
    try:
        yield source
    finally:
        if previous is None:
            model.__dict__.pop(FULL_PRECISION_ATTR, None)
        else:
            model.__dict__[FULL_PRECISION_ATTR] = previous


def plain_linear(layer: nn.Module, W: Tensor, dtype: torch.dtype) -> nn.Linear:
    """An nn.Linear computing x Wᵀ + b with W (out × in, any precision) and the layer's bias cast once to ``dtype``."""
    linear = torch.nn.utils.skip_init(nn.Linear, W.shape[1], W.shape[0], bias=layer.bias is not None, device=W.device,
                                      dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(W)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    linear.requires_grad_(False)
    return linear


def dequantize_model(model: nn.Module, dtype: torch.dtype) -> int:
    """Replace every quantized Linear left in ``model`` by an nn.Linear holding its dequantized weight in ``dtype``,
    and drop transformers' quantization state (``hf_quantizer``, ``config.quantization_config``) so that
    ``save_pretrained`` writes a plain model. Returns how many layers it replaced."""
    replaced = 0
    for name, module in list(model.named_modules()):
        backend = quantization_of(module) if isinstance(module, nn.Linear) else None
        if backend is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain_linear(module, backend.dequantize(module).float(), dtype))
        replaced += 1
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)  # transformers' own: the model is plain again
    if getattr(getattr(model, "config", None), "dtype", None) is not None:
        model.config.dtype = dtype
    return replaced
