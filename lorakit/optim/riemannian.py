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


def _stacked(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """(k, …) stack of equal-shaped tensors in ``dtype``; a single tensor is a view, not a copy."""
    out = tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)
    return out if out.dtype == dtype else out.to(dtype)


class PairPreconditioner:
    """Computes g̃_A = (BᵀB + δI)⁻¹∇_A and g̃_B = ∇_B(AAᵀ + δI)⁻¹ for many (A, B) pairs.

    Pairs of equal rank, dtypes and device form a bucket whatever their layers' widths: one
    Cholesky factorisation and inverse for all their r × r Gram matrices (fp32, or fp64 for
    fp64 factors). Inside a bucket, pairs of equal shape (the q, k, v, o projections of every
    block) are stacked: their Gram matrices and their products with P are one ``bmm`` each
    instead of one small GEMM per pair (the stacking copies the factors and gradients once, a
    small price next to the GEMMs' 4r²(in + out) multiply-adds per pair, and it saves the
    per-call overhead that dominates at r = 16). A Gram matrix whose factorisation fails (or
    whose inverse is not finite) falls back to the identity: that factor takes its plain gradient.
    No host synchronisation: the fallback is a ``torch.where`` on the device.
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
            key = (A.shape[0], A.dtype, B.dtype, A.device, B.device)
            buckets.setdefault(key, []).append((A, B))
        self._buckets = list(buckets.values())

    @torch.no_grad()
    def preconditioned_gradients(self) -> list[tuple[nn.Parameter, Tensor]]:
        """(parameter, g̃) for every factor of every pair that has a gradient."""
        out: list[tuple[nn.Parameter, Tensor]] = []
        for bucket in self._buckets:
            live = [(a, b) for a, b in bucket if a.grad is not None or b.grad is not None]
            if live:
                out += self._bucket_gradients(live)
        return out

    def _bucket_gradients(self, bucket: list[tuple[nn.Parameter, nn.Parameter]]) -> list[tuple[nn.Parameter, Tensor]]:
        a0, b0 = bucket[0]
        cdtype = torch.promote_types(compute_dtype(a0.dtype), compute_dtype(b0.dtype))
        shapes: dict[tuple[int, int], list[tuple[nn.Parameter, nn.Parameter]]] = {}
        for a, b in bucket:
            shapes.setdefault((a.shape[1], b.shape[0]), []).append((a, b))
        groups = list(shapes.values())
        # 2n Gram matrices (r × r), in group order: BᵀB for every P_A, then AAᵀ for every P_B (no_grad: no detach)
        gram_B, gram_A = [], []
        for group in groups:
            A, B = _stacked([a for a, _ in group], cdtype), _stacked([b for _, b in group], cdtype)
            gram_B.append(torch.bmm(B.mT, B))
            gram_A.append(torch.bmm(A, A.mT))
        grams = torch.cat(gram_B + gram_A)
        grams.diagonal(dim1=-2, dim2=-1).add_(self.damping)
        L, info = torch.linalg.cholesky_ex(grams)
        # identity where the factorisation failed or the inverse overflowed (no host sync: fine on GPUs)
        eye = torch.eye(L.shape[-1], dtype=cdtype, device=L.device)
        P = torch.cholesky_inverse(torch.where((info == 0)[:, None, None], L, eye))
        # amax propagates NaN and keeps inf: one reduction decides whether each inverse is finite
        P = torch.where(torch.isfinite(P.abs().amax(dim=(-2, -1)))[:, None, None], P, eye)
        n, start, result = len(bucket), 0, []
        for group in groups:
            stop = start + len(group)
            for side, P_side in ((0, P[start:stop]), (1, P[n + start:n + stop])):
                keep = [k for k, pair in enumerate(group) if pair[side].grad is not None]
                if not keep:
                    continue
                params = [group[k][side] for k in keep]
                grads = _stacked([p.grad for p in params], cdtype)
                if len(keep) < len(group):  # a stack of views, not an index tensor (no host-to-device copy)
                    P_side = torch.stack([P_side[k] for k in keep])
                applied = torch.bmm(P_side, grads) if side == 0 else torch.bmm(grads, P_side)  # P_A ∇_A, ∇_B P_B
                if applied.dtype != params[0].grad.dtype:
                    applied = applied.to(params[0].grad.dtype)
                result += zip(params, applied.unbind())
            start = stop
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
