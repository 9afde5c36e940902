"""Gradient clipping on what the optimizer applies.

lorakit's optimizers clip inside ``step()``, after the gradient they apply is known: for
Riemannian preconditioning that is g̃_A = (BᵀB + δI)⁻¹∇_A and g̃_B = ∇_B(AAᵀ + δI)⁻¹, whose
norm can be about 1/δ times the raw gradient's while B ≈ 0 (clipping the raw gradient would
leave the step unbounded). Without a preconditioner the applied gradient is the raw one and
the step equals ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm)`` followed by torch's
``step()``. Every step records ``grad_norm``, the applied gradient's total 2-norm before
clipping, and refuses a non-finite one before any parameter changes.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from lorakit.errors import LorakitError


class NonFiniteGradient(LorakitError):
    """The gradient an optimizer step would apply is not finite; no parameter was changed."""

    def __init__(self, norm: float) -> None:
        self.norm = norm
        super().__init__(
            f"the gradient the optimizer would apply has norm {norm} (not finite); no parameter was changed: "
            "lower the learning rate, clip (max_grad_norm) or train in bfloat16/float32 rather than float16"
        )


def _unhooked(step: Callable) -> Callable:
    """torch wraps an optimizer class's ``step`` with its hook runner; call the inner one so hooks run once."""
    return inspect.unwrap(step, stop=lambda f: not getattr(f, "hooked", False))


class ClippedStep:
    """Mixin for a torch optimizer class: swap in the applied gradients (``applied_gradients``,
    none by default), clip their total norm to ``max_grad_norm`` (None: no clipping), run the
    parent class's step, restore the raw gradients of swapped tensors.

    ``p.grad`` after the step: tensors whose gradient was swapped keep their raw gradient;
    the others hold the clipped one (as after ``clip_grad_norm_``).
    """

    _parent: type[torch.optim.Optimizer]
    max_grad_norm: float | None = None
    grad_norm: Tensor | None = None  # the last step's applied-gradient norm, before clipping

    def __init__(self, params: Any, max_grad_norm: float | None = None, **kwargs: Any) -> None:
        self.max_grad_norm = max_grad_norm
        super().__init__(params, **kwargs)  # type: ignore[call-arg]
        # a GradScaler then unscales before step() and skips the step on overflow (as for torch's
        # unfused optimizers) rather than leaving both to a fused kernel, so clipping sees true gradients
        self._step_supports_amp_scaling = False

    def applied_gradients(self) -> list[tuple[nn.Parameter, Tensor]]:
        """(parameter, gradient to apply) for tensors whose applied gradient is not ``p.grad``."""
        return []

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        swapped = []
        try:
            for param, grad in self.applied_gradients():
                swapped.append((param, param.grad))
                param.grad = grad
            self._clip()
            _unhooked(self._parent.step)(self)
        finally:
            for param, grad in swapped:
                param.grad = grad
        return loss

    @torch.no_grad()
    def _clip(self) -> None:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = get_total_norm([p.grad for p in params])
        self.grad_norm = norm
        if not bool(torch.isfinite(norm)):
            raise NonFiniteGradient(float(norm))
        if self.max_grad_norm is not None:
            clip_grads_with_norm_(params, self.max_grad_norm, norm)

    def __getstate__(self) -> dict[str, Any]:  # torch's keeps only defaults, state and groups
        return {**super().__getstate__(), "max_grad_norm": self.max_grad_norm}  # type: ignore[misc]


class ClippedAdamW(ClippedStep, torch.optim.AdamW):
    """torch's AdamW; ``step()`` clips the gradient's total norm to ``max_grad_norm`` first."""

    _parent = torch.optim.AdamW


class ClippedSGD(ClippedStep, torch.optim.SGD):
    """torch's SGD; ``step()`` clips the gradient's total norm to ``max_grad_norm`` first."""

    _parent = torch.optim.SGD
