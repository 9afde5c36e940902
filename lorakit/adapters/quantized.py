"""Quantized base layers (QLoRA): the backends lorakit can wrap, and how to read their weight.

An adapter wraps a quantized Linear exactly as it wraps ``nn.Linear``: the base layer keeps
its own class and quantized storage, stays frozen, and computes ``base(x)`` with its own
kernels; the low-rank path s·B·A runs beside it with the factors in float32 (or
``adapter_dtype``). Whatever reads W (SVD inits such as lora-xs, DoRA's row norms, the
save fingerprint, shapes) reads the dequantized weight (out × in) from the backend's own
dequantization routine. Nothing writes W: merging in place, and initialisations that move
W (``Initialisation.moves_base``), are refused with an error naming the backend.

Backends (each a small class, one table):
- ``bnb-nf4`` / ``bnb-fp4``: bitsandbytes ``Linear4bit`` (``bnb.functional.dequantize_4bit``);
- ``bnb-int8``: bitsandbytes ``Linear8bitLt`` with int8 weights (``int8_vectorwise_dequant``);
- ``torchao-int8``: an ``nn.Linear`` whose weight is torchao's ``Int8Tensor`` (int8
  weight-only; ``weight.dequantize()``).
A backend's library is never imported here unless it is already loaded: a layer of that
library cannot exist otherwise.
"""

from __future__ import annotations

import sys
from typing import ClassVar

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
        raise NotImplementedError

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

    def dequantize(self, layer: nn.Module) -> Tensor:
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


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


class TorchAOInt8(QuantizedBackend):
    package = "torchao"

    def matches(self, layer: nn.Module) -> bool:
        from torchao.quantization import Int8Tensor

        return isinstance(layer, nn.Linear) and isinstance(layer.weight, Int8Tensor)

    def label(self, layer: nn.Module) -> str:
        return "torchao-int8"

    def dequantize(self, layer: nn.Module) -> Tensor:
        return layer.weight.dequantize()


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
