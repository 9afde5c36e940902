"""DoRA: weight-decomposed low-rank adaptation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.adapters.lora import LoRA
from lorakit.linalg import compute_dtype


class DoRA(LoRA):
    """DoRA (Liu et al., 2024, arXiv 2402.09353): W' = m ⊙ V / ‖V‖, V = W + s·B·A.

    ``magnitude`` m (out,) starts at the row norms ‖W + s·BA‖₂ (over the input dimension),
    so the function is unchanged at init. The norm is detached in backward, as in the paper.
    Bias is not rescaled: y = b + (m / ‖V‖) ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ).
    Shapes: A (r × in), B (out × r), magnitude (out,); all three train.
    """

    structure = "dora"
    factor_names = ("A", "B")
    trainable_names = ("A", "B", "magnitude")

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0, dtype=None) -> None:
        super().__init__(base_layer, rank, scale, dropout, dtype)
        self.magnitude = self._zeros(self.out_features)
        self.register_buffer("_merge_norm", None, persistent=False)

    def direction_norm(self) -> Tensor:
        """‖W + s·BA‖₂ per output row, in float32+."""
        W = self.base_weight
        V = W.to(compute_dtype(W.dtype)) + self.delta_weight().to(W.device)
        return torch.linalg.vector_norm(V, dim=1)

    def finish_init(self) -> None:
        with torch.no_grad():
            self.magnitude.copy_(self.direction_norm())

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged or not self.enabled:
            return out
        bias = self.base_layer.bias
        if bias is not None:
            out = out - bias
        low = self.scale * self.low_rank_output(self.dropout(x.to(self.adapter_dtype)))
        # ‖V‖ is built from the live B, A (for autograd) but detached, as in the paper
        W = self.base_weight.to(self.adapter_dtype)
        norm = torch.linalg.vector_norm(W + self.scale * (self.B @ self.A), dim=1).detach()
        ratio = self.magnitude / norm
        result = ratio * (out.to(self.adapter_dtype) + low)
        if bias is not None:
            result = result + bias.to(result.dtype)
        return result.to(out.dtype)

    def merged_weight(self, W: Tensor) -> Tensor:
        V = W + self.delta_weight().to(W.dtype)
        norm = torch.linalg.vector_norm(V, dim=1)
        self._merge_norm = norm
        return (self.magnitude.to(W.dtype) / norm)[:, None] * V

    def unmerged_weight(self, W: Tensor) -> Tensor:
        V = W * (self._merge_norm / self.magnitude.to(W.dtype))[:, None]
        self._merge_norm = None
        return V - self.delta_weight().to(W.dtype)
