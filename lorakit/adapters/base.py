"""The common part of every adapter: a Module wrapping one frozen base layer.

    x ──► base_layer (frozen W, out × in) ──────────────┐
    │                                                    (+) ──► y
    └──► dropout ──► low-rank path (s·B·A or s·B·R·A) ───┘

Subclasses define the low-rank path, which factors train, and how they merge. The base
layer keeps its own class (``nn.Linear`` or transformers' GPT-2 ``Conv1D``, whose weight
is stored transposed), so unwrapping gives back a plain model.

Base-weight offsets: initialisations such as PiSSA and LoRA-GA replace W by
``W − s·B₀A₀``. The adapter keeps B₀ and A₀ (``offset_B``, ``offset_A``) so the change can
be saved, re-applied to a fresh copy of the base model, and expressed relative to the
original W at export.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.linalg import compute_dtype

try:  # transformers' GPT-2 style layer: y = x W + b with W stored (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = None  # type: ignore[assignment, misc]

SUPPORTED_LAYERS: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if Conv1D is not None else ())


def is_supported_layer(module: nn.Module) -> bool:
    return isinstance(module, SUPPORTED_LAYERS)


def weight_out_in(layer: nn.Module) -> Tensor:
    """The layer's weight data seen as (out, in): a view, transposed for Conv1D (stored (in, out))."""
    w = layer.weight.data
    return w.T if Conv1D is not None and isinstance(layer, Conv1D) else w


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
        if not is_supported_layer(base_layer):
            raise LorakitError(
                f"cannot adapt a {type(base_layer).__name__}: lorakit adapts nn.Linear and transformers Conv1D layers"
            )
        self.base_layer = base_layer
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
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True
        self.merged = False
        self._factory = {"device": weight.device, "dtype": dtype or weight.dtype}
        self.register_buffer("offset_A", None)
        self.register_buffer("offset_B", None)

    # -- base weight, always seen as (out, in) ----------------------------------------------
    @property
    def base_weight(self) -> Tensor:
        return weight_out_in(self.base_layer)

    def _write_base_weight(self, new: Tensor) -> None:
        with torch.no_grad():
            self.base_weight.copy_(new)  # a view for Conv1D: writes through the transpose

    @property
    def adapter_dtype(self) -> torch.dtype:
        return self._factory["dtype"]

    def _zeros(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.zeros(*shape, **self._factory))

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
        """The low-rank path applied to the (dropped-out) input, before any rescaling."""
        raise NotImplementedError

    def export_factors(self) -> tuple[Tensor, Tensor]:
        """(lora_B, lora_A) with s·lora_B·lora_A = the change to the ORIGINAL base weight."""
        raise NotImplementedError

    def finish_init(self) -> None:
        """Called once the factors and any base offset are set (DoRA derives its magnitude here)."""

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged or not self.enabled:
            return out
        low = self.low_rank_output(self.dropout(x.to(self.adapter_dtype)))
        return out + (self.scale * low).to(out.dtype)

    # -- merge ----------------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold the adapter into the base weight (idempotent; ``unmerge`` is its inverse)."""
        if self.merged:
            return
        self._check_enabled("merge")
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
        """Replace the base W by W − s·B₀A₀ (computed in float32+, cast once)."""
        if self.merged:
            raise LorakitError("cannot change the base of a merged adapter; call unmerge() first")
        if self.has_offset:
            self._write_base_weight(self.base_weight.to(compute_dtype(self.base_weight.dtype)) - self.base_offset())
        self.offset_B = B0.detach().clone().to(**self._factory)
        self.offset_A = A0.detach().clone().to(**self._factory)
        self.apply_base_offset()

    def apply_base_offset(self) -> None:
        """Add the stored offset to the base weight (after loading the offset from disk)."""
        W = self.base_weight
        self._write_base_weight(W.to(compute_dtype(W.dtype)) + self.base_offset().to(W.device))

    def extra_repr(self) -> str:
        return (
            f"{self.structure}: in={self.in_features}, out={self.out_features}, rank={self.rank}, "
            f"scale={self.scale:g}, merged={self.merged}, enabled={self.enabled}"
        )
