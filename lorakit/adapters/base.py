"""The common part of every adapter: a Module wrapping one frozen base layer.

    x ──► base_layer (frozen W, out × in) ──────────────┐
    │                                                    (+) ──► y
    └──► dropout ──► low-rank path (s·B·A or s·B·R·A) ───┘

Subclasses define the low-rank path, which factors train, and how they merge. The base
layer keeps its own class (``nn.Linear`` or transformers' GPT-2 ``Conv1D``, whose weight
is stored transposed), so unwrapping gives back a plain model.

Base-weight offsets: initialisations such as PiSSA and LoRA-GA replace W by
``W − s·B₀A₀``. The adapter keeps B₀ and A₀ (``offset_B``, ``offset_A``) so the change can
be saved, re-applied to a fresh copy of the base model, undone on the fly while the adapter
is disabled (y = base(x) + s·(x A₀ᵀ) B₀ᵀ: the original layer's function), and expressed
relative to the original W at export.

Quantized bases (``lorakit.adapters.quantized``): a bitsandbytes 4-/8-bit or torchao int8
Linear is wrapped as it is; ``base_weight`` is then its dequantized weight (a new tensor, read
only), and merging in place is refused: a 4-bit weight cannot take W + ΔW and give it back. An
offset is stored re-quantized: the base holds Q(W − s·B₀A₀) (computed from the dequantized W in
float32, quantized by the layer's backend with its own settings), and ``quantization_error``
records how far that is from W − s·B₀A₀ (QPiSSA). Disabled, the adapter then computes the
original layer up to that error. With the full-precision checkpoint supplied
(``full_precision``, set only while initialising or loading), W is that checkpoint's weight instead.

Dtype: the factors are ordinary parameters, so ``model.to(dtype)`` casts them with the rest
of the model. At construction they take ``dtype`` if given, else float32 on a half-precision
(bf16/fp16) base — so that optimizer updates are not rounded away in bf16's 8 significant
bits — else the base weight's dtype. The low-rank matmuls run in the dtype of the layer's
input (the base's compute dtype), like autocast: the small factors are cast to it when they
differ (nothing is cast when dtypes match), the activations never are. Measured on
SmolLM2-135M in bf16 (bench/adapter_dtype.py): fp32 factors computed this way hold the same
activations as bf16 factors, while casting the input to fp32 as PEFT does adds an fp32 copy
of every adapted layer's input (+31 % of the step's memory at 64 tokens, growing with them).
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
from torch import Tensor, nn

from lorakit.adapters import fused
from lorakit.adapters.layers import KINDS, NAMES, Conv1D, kind_of
from lorakit.adapters.quantized import quantization_of
from lorakit.errors import LorakitError
from lorakit.linalg import compute_dtype

logger = logging.getLogger("lorakit")
SUPPORTED_LAYERS: tuple[type, ...] = tuple(t for kind in KINDS for t in kind.types)


def is_supported_layer(module: nn.Module) -> bool:
    """True for the layers lorakit can adapt (see ``lorakit.adapters.layers``)."""
    return kind_of(module) is not None


def is_linear_layer(module: nn.Module) -> bool:
    """True for nn.Linear and Conv1D (quantized or not): what targets='all-linear' selects."""
    kind = kind_of(module)
    return kind is not None and kind.linear


HALF_DTYPES = (torch.bfloat16, torch.float16)


def default_adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """float32 for a half-precision base weight (bf16, fp16), else the base weight's dtype."""
    return torch.float32 if base_dtype in HALF_DTYPES else base_dtype


def weight_out_in(layer: nn.Module) -> Tensor:
    """The layer's weight seen as (out, in) (see ``lorakit.adapters.layers``): a view of the weight,
    or for a quantized layer its dequantized weight (a new tensor)."""
    kind = kind_of(layer)
    if kind is None:
        raise LorakitError(f"cannot read the weight of a {type(layer).__name__}: lorakit adapts {NAMES} layers")
    return kind.weight_out_in(layer)


class LowRankAdapter(nn.Module):
    """Base class. ``factor_names`` lists the low-rank factors, ``trainable_names`` those that train."""

    structure: ClassVar[str]
    factor_names: ClassVar[tuple[str, ...]]
    trainable_names: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        base_layer: nn.Module,
        rank: int,
        scale: float,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kind = kind_of(base_layer)
        if kind is None:
            raise LorakitError(f"cannot adapt a {type(base_layer).__name__}: lorakit adapts {NAMES} layers")
        kind.check(base_layer)
        self.kind = kind
        self.base_layer = base_layer
        backend = quantization_of(base_layer)
        self.backend = backend
        self.quantization = None if backend is None else backend.label(base_layer)  # e.g. 'bnb-nf4'
        self.quantization_error = None  # a QuantizationError once an offset re-quantized the base
        self.original_fingerprint = None  # a quantized base's original weight, sampled before re-quantizing it
        # the full-precision W of a quantized base (out × in, float32), set only while initialising or loading
        # (lorakit.adapters.quantized.FullPrecisionWeights); from_full_precision: the offset base came from it
        self.full_precision: Tensor | None = None
        self.from_full_precision = False
        if backend is not None:
            backend.prepare(base_layer)
        self.fan_in_fan_out = Conv1D is not None and isinstance(base_layer, Conv1D)
        weight = self.base_weight
        self.out_features, self.in_features = weight.shape
        if rank > min(self.out_features, self.in_features):
            raise LorakitError(
                f"rank {rank} exceeds the layer's size ({self.out_features} × {self.in_features}); "
                f"use rank ≤ {min(self.out_features, self.in_features)}"
            )
        self.rank = rank
        self.scale = float(scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 and kind.takes_dropout else nn.Identity()
        self.enabled = True
        self.merged = False
        self._init_options = {"device": weight.device, "dtype": dtype or default_adapter_dtype(weight.dtype)}
        self.register_buffer("offset_A", None)
        self.register_buffer("offset_B", None)

    # -- base weight, always seen as (out, in) ----------------------------------------------
    @property
    def base_weight(self) -> Tensor:
        return weight_out_in(self.base_layer)

    @property
    def original_weight(self) -> Tensor:
        """The W an initialisation reads (SVD, residual): the full-precision checkpoint's weight of a
        quantized base when one is supplied, else ``base_weight``."""
        return self.base_weight if self.full_precision is None else self.full_precision

    def _write_base_weight(self, new: Tensor) -> None:
        """Set the base weight to ``new`` (out × in); a quantized base stores Q(new) (its backend, its settings)."""
        if self.backend is not None:
            self.backend.store(self.base_layer, self.backend.quantize(self.base_layer, new))
            return
        with torch.no_grad():
            self.base_weight.copy_(new)  # a view for Conv1D: writes through the transpose

    def check_writable_base(self, action: str) -> None:
        """Raise LorakitError when the base weight cannot take ``action`` in place (a quantized base)."""
        if self.quantization is not None:
            raise LorakitError(
                f"cannot {action} the {self.quantization} quantized base weight in place; export a PEFT adapter "
                "(lorakit export) to use it on this base, or load the base unquantized to merge"
            )

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype the factors are stored and updated in, read at call time."""
        return self.A.dtype

    def factor_as(self, name: str, dtype: torch.dtype) -> Tensor:
        """Factor ``name`` in the compute dtype (no copy when it already is)."""
        return as_dtype(getattr(self, name), dtype)

    def tensor_options(self) -> dict[str, torch.device | torch.dtype]:
        """Device and dtype of the factors now (for new adapter tensors such as offsets)."""
        return {"device": self.A.device, "dtype": self.A.dtype}

    def _zeros(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.zeros(*shape, **self._init_options))

    # -- structure ----------------------------------------------------------------------------
    def factors(self) -> dict[str, Tensor]:
        """The low-rank factors by role ('A', 'B', and 'R' for B·R·A)."""
        return {name: getattr(self, name) for name in self.factor_names}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {name: getattr(self, name) for name in self.trainable_names}

    def low_rank_pair(self) -> tuple[nn.Parameter, nn.Parameter] | None:
        """(A, B) when both train, the pair Riemannian preconditioning acts on; else None."""
        if "A" in self.trainable_names and "B" in self.trainable_names:
            return self.A, self.B
        return None

    def set_trainable(self) -> None:
        for name, param in self.named_parameters(recurse=False):
            param.requires_grad_(name in self.trainable_names)

    # -- maths: subclasses define these ------------------------------------------------------
    def delta_weight(self) -> Tensor:
        """ΔW (out × in) of the low-rank path, in float32+."""
        raise NotImplementedError

    def low_rank_output(self, x: Tensor) -> Tensor:
        """The low-rank path applied to the (dropped-out) input, before any rescaling, in the compute dtype."""
        raise NotImplementedError

    def fused_factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """(A, B, R or None) in ``dtype`` for ``lorakit.adapters.fused``'s single node, None for a
        structure that does not fit it (the general path then runs)."""
        return None

    def compute_dtype_for(self, x: Tensor) -> torch.dtype:
        """The dtype the low-rank path runs in: the input's (the base's compute dtype); for token ids, the factors'."""
        return x.dtype if x.is_floating_point() else self.A.dtype

    def project(self, x: Tensor, A: Tensor) -> Tensor:
        """The first factor applied to the input (x Aᵀ for a Linear; see ``lorakit.adapters.layers``)."""
        return self.kind.project(self.base_layer, x, A)

    def export_factors(self) -> tuple[Tensor, Tensor]:
        """(lora_B, lora_A) with s·lora_B·lora_A = the change to the ORIGINAL base weight."""
        raise NotImplementedError

    def finish_init(self) -> None:
        """Called once the factors and any base offset are set (DoRA derives its magnitude here)."""

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.enabled and not self.merged and fused.applies(self, x):
            factors = self.fused_factors(x.dtype)
            if factors is not None:
                return fused.linear_low_rank(x, self.base_layer.weight, self.base_layer.bias, *factors, self.scale)
        out = self.base_layer(x)
        if self.merged:
            return out
        if not self.enabled:
            return self.without_adapter(x, out)
        low = self.scale * self.low_rank_output(self.dropout(x))
        return out + as_dtype(low, out.dtype)

    def without_adapter(self, x: Tensor, out: Tensor) -> Tensor:
        """The original layer's output from the base output ``out``: base(x) + s·(x A₀ᵀ) B₀ᵀ
        when an initialisation moved the base weight, else ``out`` itself."""
        if not self.has_offset:
            return out
        dtype = self.compute_dtype_for(x)
        restored = self.kind.mix(self.project(x, as_dtype(self.offset_A, dtype)), as_dtype(self.offset_B, dtype))
        return out + as_dtype(self.scale * restored, out.dtype)

    # -- merge ----------------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the adapter into the base weight (idempotent; ``unmerge`` is its inverse)."""
        if self.merged:
            return
        self._check_enabled("merge")
        self.check_writable_base("merge into")
        W = self.base_weight
        self._write_base_weight(self.merged_weight(W.to(compute_dtype(W.dtype))))
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        W = self.base_weight
        self._write_base_weight(self.unmerged_weight(W.to(compute_dtype(W.dtype))))
        self.merged = False

    def merged_weight(self, W: Tensor) -> Tensor:
        return W + self.delta_weight().to(W.dtype)

    def unmerged_weight(self, W: Tensor) -> Tensor:
        return W - self.delta_weight().to(W.dtype)

    def set_enabled(self, enabled: bool) -> None:
        if self.merged and not enabled:
            raise LorakitError("cannot disable a merged adapter; call unmerge() first")
        self.enabled = enabled

    def _check_enabled(self, action: str) -> None:
        if not self.enabled:
            raise LorakitError(f"cannot {action} a disabled adapter; enable it first")

    # -- base-weight offsets --------------------------------------------------------------------
    @property
    def has_offset(self) -> bool:
        return self.offset_A is not None

    def base_offset(self) -> Tensor:
        """−s·B₀A₀ in float32+: what the initialisation added to W."""
        cdtype = compute_dtype(self.offset_A.dtype)
        return -self.scale * (self.offset_B.to(cdtype) @ self.offset_A.to(cdtype))

    def set_base_offset(self, B0: Tensor, A0: Tensor) -> None:
        """Replace the base W by W − s·B₀A₀ (computed in float32+, cast or re-quantized once)."""
        if self.merged:
            raise LorakitError("cannot change the base of a merged adapter; call unmerge() first")
        W = self.original_weight.to(compute_dtype(self.base_weight.dtype))
        if self.has_offset and self.full_precision is None:  # back to the original first (quantized: up to its error)
            W = W - self.base_offset()
        self.offset_B = B0.detach().clone().to(**self.tensor_options())
        self.offset_A = A0.detach().clone().to(**self.tensor_options())
        self._write_offset_base(W)

    def apply_base_offset(self) -> None:
        """Add the stored offset to the base weight (after loading the offset from disk)."""
        self._write_offset_base(self.original_weight.to(compute_dtype(self.base_weight.dtype)))

    def _write_offset_base(self, W: Tensor) -> None:
        """Write W − s·B₀A₀ over the original weight ``W``; for a quantized base, record its quantization error
        (relative to ``W``: the full-precision weight when one was supplied, else the dequantized one)."""
        new = W + self.base_offset().to(W.device)
        if self.backend is None:
            self._write_base_weight(new)
            return
        from lorakit.adapters.quantized import QuantizationError, relative_error
        from lorakit.io import base_fingerprint  # io imports the adapters: imported here, at call time

        if self.original_fingerprint is None:
            self.original_fingerprint = base_fingerprint(W)
        layer = self.base_layer
        quantized = self.backend.quantize(layer, new)
        residual = relative_error(new, self.backend.dequantize_weight(layer, quantized).to(new.dtype), W)
        plain = relative_error(W, self.backend.roundtrip(layer, W).to(W.dtype), W)
        self.backend.store(layer, quantized)
        own = relative_error(new, self.backend.dequantize_weight(layer, quantized).to(new.dtype), new)
        self.from_full_precision = self.full_precision is not None
        self.quantization_error = QuantizationError(self.quantization, plain, residual, own, self.from_full_precision)
        logger.info("lorakit: re-quantized a %s base (%d × %d) as W − s·B₀A₀%s: quantization error %.4f of ‖W‖ "
                    "(re-quantizing W unchanged: %.4f)", self.quantization, *new.shape,
                    " (W: the full-precision checkpoint's)" if self.from_full_precision else "", residual, plain)

    def extra_repr(self) -> str:
        return (
            f"{self.structure}: in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"scale={self.scale:g}, merged={self.merged}, enabled={self.enabled}"
        )


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``, without a copy (or a graph node) when it already is."""
    return t if t.dtype == dtype else t.to(dtype)
