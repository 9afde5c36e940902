"""The LoRA-XS structure (also LoRA-SB's): ΔW = s·B·R·A with only R training."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.adapters.base import LowRankAdapter
from lorakit.linalg import compute_dtype


class LoRAXS(LowRankAdapter):
    """LoRA-XS (Bałazy et al., 2024, arXiv 2405.17604) and LoRA-SB (Ponkshe et al., 2024,
    arXiv 2411.19557): y = base(x) + s·((x Aᵀ) Rᵀ) Bᵀ.

    Shapes: A (r × in) and B (out × r) frozen, R (r × r) trains: r² parameters per layer.
    A base offset (lora-sb with ``preserve_init``) is stored as B₀ = B, A₀ = R₀·A.
    """

    structure = "xs"
    factor_names = ("A", "B", "R")
    trainable_names = ("R",)

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0, dtype=None) -> None:
        super().__init__(base_layer, rank, scale, dropout, dtype)
        self.A = self._zeros(rank, self.in_features)
        self.B = self._zeros(self.out_features, rank)
        self.R = self._zeros(rank, rank)

    def low_rank_output(self, x: Tensor) -> Tensor:
        A, R, B = (self.factor_as(n, self.compute_dtype_for(x)) for n in ("A", "R", "B"))
        return self.kind.mix(self.kind.mix(self.project(x, A), R), B)

    def fused_factors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        return self.factor_as("A", dtype), self.factor_as("B", dtype), self.factor_as("R", dtype)

    def delta_weight(self) -> Tensor:
        cdtype = compute_dtype(self.R.dtype)
        return self.scale * (self.B.to(cdtype) @ (self.R.to(cdtype) @ self.A.to(cdtype)))

    def export_factors(self) -> tuple[Tensor, Tensor]:
        B, RA = self.B.detach(), (self.R @ self.A).detach()
        if not self.has_offset:
            return B, RA
        if torch.equal(self.offset_B, B):  # offset s·B·R₀·A: the change is s·B·(R − R₀)·A, still rank r
            return B, RA - self.offset_A
        return torch.cat([B, -self.offset_B], dim=1), torch.cat([RA, self.offset_A], dim=0)
