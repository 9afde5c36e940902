"""One autograd node for a frozen ``nn.Linear`` plus its low-rank path (lora, lora-fa, lora-xs/sb).

    y = x Wᵀ + b + s·(h Mᵀ)   with  h = x Aᵀ (T × r),  and M = B (LoRA) or the pair (B, R) of
                              B·R·A (LoRA-XS/SB: y += s·((h Rᵀ) Bᵀ)).

Autograd's own graph for this (two linears, a scaling, an addition) allocates the scaled
low-rank output and the sum as new T × out tensors and runs their element-wise backward; the
node below writes the low-rank product into the base output with one in-place ``addmm_``
(``alpha = s``), and its backward does only the GEMMs the trainable factors need:

    u = g B (T × r)                         [always: every factor and x need it]
    R:   ∇R = s·uᵀ h                        v = u R       (else v = u)
    B:   ∇B = s·gᵀ (h Rᵀ)                   (lora only; frozen in lora-fa's sibling xs)
    A:   ∇A = s·vᵀ x                        (lora only; frozen in lora-fa and xs)
    x:   ∇x = g W + s·v A                   (one GEMM into the base's input gradient, in place)

Measured on one 384 → 1536 layer of MiniLM's size (2,048 tokens, r = 16, one thread, interleaved):
forward + backward 1.15× the frozen layer's own (was 1.40× through autograd's graph).

It applies only where it is exactly the layer's function: a plain ``nn.Linear`` (not a subclass,
not quantized) whose weight is frozen, with no dropout on the adapter's input, and with no
forward hooks on the base layer or globally (the hooks would not see a call that never happens,
e.g. lorakit's own gradient taps during estimation). Everything else takes the general path.

Under autocast (GPU mixed precision; CPU autocast alike) the node does what autocast does for the
layer's linears: every operand in the autocast dtype, computed with autocast off inside (as
``torch.amp.custom_fwd(cast_inputs=...)`` would), so the output has the dtype ``nn.Linear`` gives
under autocast and float32 factors get float32 gradients through the casts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module


AUTOCASTABLE = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts (never float64)


def autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype autocast computes ``x``'s device's matmuls in, or None when autocast is off there."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


def applies(adapter: nn.Module, x: Tensor) -> bool:
    """True when the fused node computes exactly what ``adapter``'s general path would."""
    base = adapter.base_layer
    cast = autocast_dtype(x) is not None
    return (
        type(base) is nn.Linear
        and adapter.quantization is None
        and isinstance(adapter.dropout, nn.Identity)
        and not base.weight.requires_grad
        and (x.dtype == base.weight.dtype if not cast else x.dtype in AUTOCASTABLE and base.weight.dtype in AUTOCASTABLE)
        and not (base._forward_hooks or base._forward_pre_hooks)
        and not (_module._global_forward_hooks or _module._global_forward_pre_hooks)
    )


def linear_low_rank(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None,
                    scale: float) -> Tensor:
    """x Wᵀ + b + s·(x Aᵀ)Bᵀ, or with R: x Wᵀ + b + s·((x Aᵀ) Rᵀ) Bᵀ; W and b get no gradient."""
    return autocast_apply(_LinearLowRank, x, W, b, A, B, R, scale)


def autocast_apply(node: type[torch.autograd.Function], x: Tensor, *args):
    """``node.apply(x, *args)``; under autocast with every floating tensor cast to autocast's dtype
    first and autocast off inside the node (its backward then runs in that dtype too)."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return node.apply(x, *args)
    cast = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() else a for a in (x, *args)]
    with torch.autocast(x.device.type, enabled=False):
        return node.apply(*cast)


class _LinearLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None,
                scale: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        h_a = x2 @ A.T
        h = h_a if R is None else h_a @ R.T
        y = x2 @ W.T if b is None else torch.addmm(b, x2, W.T)
        y.addmm_(h, B.T, alpha=scale)
        # only what the needed gradients read, as autograd's own graph does: when the input needs no gradient
        # (the first layer's q/k/v), neither W nor A is kept (both are parameters, so this costs no memory, but
        # the saved-tensor count of bench/qlora.py sees them), and x only when A trains
        need_x, _, _, need_A, need_B, need_R, _ = ctx.needs_input_grad
        keep = {"x": need_A, "W": need_x, "A": need_x, "B": need_x or need_A or need_R,
                "R": R is not None and (need_x or need_A or need_B), "h": need_B or need_R}
        ctx.save_for_backward(*(t if keep[k] else None for k, t in
                                zip(keep, (x2, W, A, B, R, h_a))))
        ctx.scale = scale
        ctx.in_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, W, A, B, R, h_a = ctx.saved_tensors
        need_x, _, _, need_A, need_B, need_R, _ = ctx.needs_input_grad
        s = ctx.scale
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = grad_A = grad_B = grad_R = None
        if need_B:
            h = h_a if R is None else h_a @ R.T
            grad_B = (g2.T @ h).mul_(s)
        if need_x or need_A or need_R:
            v = g2 @ B  # T × r
            if need_R:
                grad_R = (v.T @ h_a).mul_(s)
            if R is not None:  # kept when A or x needs v = (g B) R
                v = v @ R
            if need_A:
                grad_A = (v.T @ x2).mul_(s)
            if need_x:
                grad_x = (g2 @ W).addmm_(v, A, alpha=s).view(ctx.in_shape)
        return grad_x, None, None, grad_A, grad_B, grad_R, None


def linear_dora(x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor, norm: Tensor,
                scale: float) -> Tensor:
    """DoRA's layer in one node: b + (m/‖V‖) ⊙ (x Wᵀ + s·(x Aᵀ)Bᵀ), ‖V‖ (out,) a constant (the paper's
    detached norm, computed by the caller once per call); W, b and ‖V‖ get no gradient.

    With z = x Wᵀ + s·h Bᵀ (h = x Aᵀ) and r = m/‖V‖, the backward reads g_r = g ⊙ r once:
    ∇m = Σ_T (g ⊙ z) / ‖V‖,  ∇B = s·g_rᵀ h,  ∇A = s·(g_r B)ᵀ x,  ∇x = g_r W + s·(g_r B) A.
    Autograd's graph of the same forward (base output, addmm with the scaled B, addcmul with r and a
    bias correction) runs two more T × out passes each way and keeps the same T × out tensor.
    """
    return autocast_apply(_LinearDoRA, x, W, b, A, B, magnitude, norm, scale)


class _LinearDoRA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, b: Tensor | None, A: Tensor, B: Tensor, magnitude: Tensor, norm: Tensor,
                scale: float) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        h = x2 @ A.T
        z = x2 @ W.T
        z.addmm_(h, B.T, alpha=scale)
        r = magnitude / norm
        y = z * r if b is None else torch.addcmul(b, z, r)
        need_x, _, _, need_A, need_B, need_m, _, _ = ctx.needs_input_grad
        keep = {"x": need_A, "W": need_x, "A": need_x, "B": need_x or need_A, "h": need_B, "z": need_m,
                "r": need_x or need_A or need_B, "norm": need_m}
        ctx.save_for_backward(*(t if keep[k] else None for k, t in zip(keep, (x2, W, A, B, h, z, r, norm))))
        ctx.scale = scale
        ctx.in_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, W, A, B, h, z, r, norm = ctx.saved_tensors
        need_x, _, _, need_A, need_B, need_m, _, _ = ctx.needs_input_grad
        s = ctx.scale
        g2 = g.reshape(-1, g.shape[-1])
        grad_x = grad_A = grad_B = grad_m = None
        if need_m:
            grad_m = (g2 * z).sum(0).div_(norm)
        if need_x or need_A or need_B:
            g_r = g2 * r
            if need_B:
                grad_B = (g_r.T @ h).mul_(s)
            if need_x or need_A:
                v = g_r @ B  # T × r
                if need_A:
                    grad_A = (v.T @ x2).mul_(s)
                if need_x:
                    grad_x = (g_r @ W).addmm_(v, A, alpha=s).view(ctx.in_shape)
        return grad_x, None, None, grad_A, grad_B, grad_m, None, None
