"""LoRA and LoRA-FA: ΔW = s·B·A."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.adapters.base import LowRankAdapter
from lorakit.linalg import compute_dtype


class LoRA(LowRankAdapter):
    """LoRA (Hu et al., 2021, arXiv 2106.09685): y = base(x) + s·(x Aᵀ) Bᵀ.

    Shapes: A (r × in), B (out × r); both train, W is frozen.
    """

    structure = "lora"
    factor_names = ("A", "B")
    trainable_names = ("A", "B")

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0, dtype=None) -> None:
        super().__init__(base_layer, rank, scale, dropout, dtype)
        self.A = self._zeros(rank, self.in_features)
        self.B = self._zeros(self.out_features, rank)

    def low_rank_output(self, x: Tensor) -> Tensor:
        dtype = self.compute_dtype_for(x)
        return self.kind.mix(self.project(x, self.factor_as("A", dtype)), self.factor_as("B", dtype))

    def fused_factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, None]:
        return self.factor_as("A", dtype), self.factor_as("B", dtype), None

    def delta_weight(self) -> Tensor:
        cdtype = compute_dtype(self.A.dtype)
        return self.scale * (self.B.to(cdtype) @ self.A.to(cdtype))

    def export_factors(self) -> tuple[Tensor, Tensor]:
        B, A = self.B.detach(), self.A.detach()
        if not self.has_offset:
            return B, A
        # W_now = W_orig − s·B₀A₀, so the change to W_orig is s·[B, −B₀]·[A; A₀] (rank 2r)
        return torch.cat([B, -self.offset_B], dim=1), torch.cat([A, self.offset_A], dim=0)


class LoRAFA(LoRA):
    """LoRA-FA (Zhang et al., 2023, arXiv 2308.03303): LoRA with A frozen, only B (out × r) trains."""

    structure = "lora-fa"
    trainable_names = ("B",)
