"""DoRA: weight-decomposed low-rank adaptation."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.adapters import fused
from lorakit.adapters.base import as_dtype
from lorakit.adapters.lora import LoRA
from lorakit.errors import LorakitError
from lorakit.linalg import compute_dtype


class DoRA(LoRA):
    """DoRA (Liu et al., 2024, arXiv 2402.09353): W' = m ⊙ V / ‖V‖, V = W + s·B·A.

    ``magnitude`` m (out,) starts at the row norms ‖W + s·BA‖₂ (over the input dimension),
    so the function is unchanged at init. The norm is detached in backward, as in the paper,
    and computed in one place (``direction``) in float32+ for the forward, the init and the
    merge alike, so merged and unmerged outputs agree to the rounding of the weight dtype.
    Bias is not rescaled: y = b + (m / ‖V‖) ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ).
    Shapes: A (r × in), B (out × r), magnitude (out,); all three train.
    """

    structure = "dora"
    factor_names = ("A", "B")
    trainable_names = ("A", "B", "magnitude")

    def __init__(self, base_layer: nn.Module, rank: int, scale: float, dropout: float = 0.0, dtype=None) -> None:
        super().__init__(base_layer, rank, scale, dropout, dtype)
        if not self.kind.linear:
            raise LorakitError(f"DoRA adapts nn.Linear and Conv1D layers, not {type(base_layer).__name__}; "
                               "use adapter 'lora' for it or leave it out of targets")
        self.magnitude = self._zeros(self.out_features)
        self.register_buffer("_merge_norm", None, persistent=False)

    def direction(self, W: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """V = W + s·BA (out × in) and its row norms ‖V‖₂ (out,), in float32+, without gradient.

        ``W`` defaults to the (unmerged) base weight."""
        W = self.base_weight if W is None else W
        # autocast off: the addmm would otherwise round V (W included) to autocast's half-precision dtype
        with torch.no_grad(), torch.autocast(W.device.type, enabled=False):
            cdtype = torch.promote_types(compute_dtype(W.dtype), compute_dtype(self.A.dtype))
            A, B = (t.to(device=W.device, dtype=cdtype) for t in (self.A, self.B))
            # V = W + s·BA in one addmm: no separate out × in product, scaling and sum (once per forward)
            V = torch.addmm(W.to(cdtype), B, A, alpha=self.scale)
            return V, torch.linalg.vector_norm(V, dim=1)

    def finish_init(self) -> None:
        with torch.no_grad():
            self.magnitude.copy_(self.direction()[1])

    def forward(self, x: Tensor) -> Tensor:
        if self.enabled and not self.merged and fused.applies(self, x) and self._fits_fused_node(x):
            # one autograd node (lorakit.adapters.fused.linear_dora): the same function, leaner backward
            return fused.linear_dora(x, self.base_layer.weight, self.base_layer.bias, self.A, self.B, self.magnitude,
                                     self.direction()[1], self.scale)
        out = self.base_layer(x)
        if self.merged:
            return out
        if not self.enabled:
            return self.without_adapter(x, out)
        # y = r ⊙ (out − b + s·h Bᵀ) + b  with r = m / ‖V‖, written as  r ⊙ out + h (s·r ⊙ B)ᵀ + (1 − r) ⊙ b:
        # the scaling moves onto B (out × r) and the bias, so the T × out work is one addmm and one
        # multiply-add (not a scaled low-rank output, a sum, a bias subtraction and a product)
        ratio = self.magnitude / self.direction()[1]  # float32+; gradient reaches m only
        dtype = self.compute_dtype_for(x)
        h = self.project(self.dropout(x), self.factor_as("A", dtype))
        h2, out2 = h.reshape(-1, h.shape[-1]), out.reshape(-1, out.shape[-1])
        cdtype = ratio.dtype  # the product runs in float32+ (as the norm), cast back once
        B = self.factor_as("B", cdtype) * (self.scale * ratio)[:, None]
        bias = self.base_layer.bias
        h2 = as_dtype(h2, cdtype)
        low = h2 @ B.T if bias is None else torch.addmm((1 - ratio) * as_dtype(bias, cdtype), h2, B.T)
        result = low.addcmul_(as_dtype(out2, cdtype), ratio)
        return as_dtype(result, out.dtype).view(out.shape)

    def _fits_fused_node(self, x: Tensor) -> bool:
        """The fused node computes in the input's dtype: exact where the general path's float32+ product is
        that dtype too (float32 or float64 input, weight and DoRA tensors all of it)."""
        return x.dtype in (torch.float32, torch.float64) and self.A.dtype == self.B.dtype == self.magnitude.dtype == x.dtype

    def merged_weight(self, W: Tensor) -> Tensor:
        V, norm = self.direction(W)
        self._merge_norm = norm
        return (self.magnitude.to(V.dtype) / norm)[:, None] * V

    def unmerged_weight(self, W: Tensor) -> Tensor:
        norm = self._merge_norm.to(W.dtype)
        V = W * (norm / self.magnitude.to(W.dtype))[:, None]
        self._merge_norm = None
        return V - self.delta_weight().to(W.dtype)
