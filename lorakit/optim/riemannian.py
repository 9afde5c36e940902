"""Riemannian preconditioning of LoRA factors: scaled GD and scaled AdamW.

Zhang & Pilanci (2024), "Riemannian Preconditioned LoRA for Fine-Tuning Foundation Models",
arXiv 2402.02347. For each trainable pair A (r × in), B (out × r):

    P_A = (BᵀB + δI)⁻¹,   P_B = (AAᵀ + δI)⁻¹        (r × r, fp32+, from A and B before the step)
    g̃_A = P_A ∇_A,        g̃_B = ∇_B P_B

Scaled GD takes plain SGD steps on g̃; scaled AdamW feeds g̃ into Adam's moments and keeps
AdamW's decoupled weight decay. Every other tensor takes the plain update. The optimizers
below ARE torch's AdamW / SGD (same state, state_dict and param groups, so any LR scheduler
and checkpoint code works); only the gradient they see for A and B is replaced, and restored
after the step. ``max_grad_norm`` clips the preconditioned gradient (lorakit.optim.clipping).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.linalg import compute_dtype
from lorakit.optim.clipping import ClippedAdamW, ClippedSGD


class PairPreconditioner:
    """Computes g̃_A = (BᵀB + δI)⁻¹∇_A and g̃_B = ∇_B(AAᵀ + δI)⁻¹ for many (A, B) pairs.

    Pairs of equal rank, dtypes and device are batched whatever their layers' widths: one
    Cholesky factorisation and inverse for all their r × r Gram matrices (fp32, or fp64 for
    fp64 factors). The Gram matrices and the products with P are per pair (stacking the
    factors for batched products copies them: about as fast on CPU at r = 16, slower
    at r = 64: those products are bound by their FLOPs, 4r²(in + out) per pair). A Gram
    matrix whose factorisation fails (or whose inverse is not finite) falls back to the
    identity: that factor takes its plain gradient.
    """

    def __init__(self, pairs: Iterable[tuple[nn.Parameter, nn.Parameter]], damping: float = 1e-6) -> None:
        if not (isinstance(damping, (int, float)) and damping >= 0):
            raise LorakitError(f"damping must be a non-negative number (default 1e-6), got {damping!r}")
        self.damping = float(damping)
        self.pairs = list(pairs)
        buckets: dict[tuple, list[tuple[nn.Parameter, nn.Parameter]]] = {}
        for A, B in self.pairs:
            if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
                raise LorakitError(f"a low-rank pair needs A (r × in) and B (out × r); got {tuple(A.shape)} and {tuple(B.shape)}")
            key = (A.shape[0], A.dtype, B.dtype, A.device)
            buckets.setdefault(key, []).append((A, B))
        self._buckets = list(buckets.values())

    @torch.no_grad()
    def preconditioned_gradients(self) -> list[tuple[nn.Parameter, Tensor]]:
        """(parameter, g̃) for every factor of every pair that has a gradient."""
        out: list[tuple[nn.Parameter, Tensor]] = []
        for bucket in self._buckets:
            out += self._bucket_gradients(bucket)
        return out

    def _bucket_gradients(self, bucket: list[tuple[nn.Parameter, nn.Parameter]]) -> list[tuple[nn.Parameter, Tensor]]:
        if all(A.grad is None and B.grad is None for A, B in bucket):
            return []
        cdtype = compute_dtype(bucket[0][0].dtype)
        A = [a.detach().to(cdtype) for a, _ in bucket]
        B = [b.detach().to(cdtype) for _, b in bucket]
        # 2n Gram matrices (r × r): BᵀB for P_A, then AAᵀ for P_B; one batched factorisation for all
        grams = torch.stack([b.T @ b for b in B] + [a @ a.T for a in A])
        grams.diagonal(dim1=-2, dim2=-1).add_(self.damping)
        L, info = torch.linalg.cholesky_ex(grams)
        # identity where the factorisation failed or the inverse overflowed (no host sync: fine on GPUs)
        eye = torch.eye(L.shape[-1], dtype=cdtype, device=L.device)
        P = torch.cholesky_inverse(torch.where((info == 0)[:, None, None], L, eye))
        P = torch.where(torch.isfinite(P).all(dim=-1, keepdim=True).all(dim=-2, keepdim=True), P, eye)
        n = len(bucket)
        result = []
        # applying P per pair (not stacked) avoids copying every gradient into one tensor and back
        for (a, b), P_A, P_B in zip(bucket, P[:n].unbind(), P[n:].unbind()):
            if a.grad is not None:
                result.append((a, (P_A @ a.grad.to(cdtype)).to(a.grad.dtype)))
            if b.grad is not None:
                result.append((b, (b.grad.to(cdtype) @ P_B).to(b.grad.dtype)))
        return result


class _Preconditioned:
    """Mixin over a ``ClippedStep`` optimizer: the applied gradients of the pairs are g̃ (clipped
    after preconditioning, so ``max_grad_norm`` bounds the step actually taken)."""

    preconditioner: PairPreconditioner

    def __init__(self, params: Any, pairs: Iterable[tuple[nn.Parameter, nn.Parameter]], damping: float = 1e-6,
                 **kwargs: Any) -> None:
        self.preconditioner = PairPreconditioner(pairs, damping)
        super().__init__(params, **kwargs)  # type: ignore[call-arg]

    def applied_gradients(self) -> list[tuple[nn.Parameter, Tensor]]:
        return self.preconditioner.preconditioned_gradients()

    @property
    def damping(self) -> float:
        return self.preconditioner.damping

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "preconditioner": self.preconditioner}  # type: ignore[misc]


class RiemannianAdamW(_Preconditioned, ClippedAdamW):
    """Scaled AdamW: AdamW whose moments accumulate g̃_A = P_A∇_A and g̃_B = ∇_B P_B.

    m ← β₁m + (1−β₁)g̃,  v ← β₂v + (1−β₂)g̃²,  p ← p(1 − ηλ) − η·m̂/(√v̂ + ε)
    (λ decoupled weight decay, m̂, v̂ bias-corrected). Tensors outside ``pairs`` take plain AdamW.
    """


class RiemannianSGD(_Preconditioned, ClippedSGD):
    """Scaled GD: A ← A − η P_A∇_A, B ← B − η ∇_B P_B; plain SGD for every other tensor.

    Momentum, if set, accumulates g̃; SGD's (coupled) weight decay is added after preconditioning.
    """
