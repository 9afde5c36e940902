"""``make_optimizer``: one call from an adapted model to a standard torch optimizer."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lorakit.config import suggest
from lorakit.errors import LorakitError
from lorakit.optim.clipping import ClippedAdamW, ClippedSGD
from lorakit.optim.groups import pair_needed_error, param_groups, resolve_loraplus_ratio, trainable_layout
from lorakit.optim.riemannian import RiemannianAdamW, RiemannianSGD

OPTIMIZERS = ("adamw", "sgd")
PRECONDITIONERS = ("riemannian",)
FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW kernel runs (one kernel over all tensors)


def _positive(name: str, value: Any, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise LorakitError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def optimizer_options(
    name: str = "adamw",
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    momentum: float | None = None,
    loraplus_ratio: float | bool | None = None,
    preconditioner: str | None = None,
    damping: float = 1e-6,
    max_grad_norm: float | None = None,
    **optimizer_kwargs: Any,
) -> dict[str, Any]:
    """Check ``make_optimizer``'s options without a model; returns torch's keyword arguments."""
    if name not in OPTIMIZERS:
        raise LorakitError(f"unknown optimizer {name!r}{suggest(str(name), OPTIMIZERS)}; choose one of {', '.join(OPTIMIZERS)}")
    if preconditioner not in (None, *PRECONDITIONERS):
        raise LorakitError(
            f"unknown preconditioner {preconditioner!r}{suggest(str(preconditioner), PRECONDITIONERS)}; "
            f"use None or one of {', '.join(PRECONDITIONERS)}"
        )
    lr = _positive("lr", lr)
    weight_decay = _positive("weight_decay", weight_decay, allow_zero=True)
    kwargs: dict[str, Any] = dict(optimizer_kwargs, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        if momentum is not None:
            raise LorakitError("momentum applies to name='sgd'; AdamW's moments are set by betas")
        betas = (0.9, 0.999) if betas is None else tuple(betas)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise LorakitError(f"betas must be two numbers in [0, 1), got {betas!r}")
        kwargs.update(betas=betas, eps=_positive("eps", 1e-8 if eps is None else eps))
    else:
        if betas is not None or eps is not None:
            raise LorakitError("betas and eps apply to name='adamw'; for sgd set momentum")
        kwargs["momentum"] = _positive("momentum", 0.0 if momentum is None else momentum, allow_zero=True)

    if max_grad_norm is not None:  # a negative bound would reverse the step, 0 would freeze it
        try:
            kwargs["max_grad_norm"] = _positive("max_grad_norm", max_grad_norm)
        except LorakitError as exc:
            raise LorakitError(f"{exc} (or None / null: no clipping)") from None
    resolve_loraplus_ratio(loraplus_ratio)
    if preconditioner is not None and not (isinstance(damping, (int, float)) and damping >= 0):
        raise LorakitError(f"damping must be a non-negative number (default 1e-6), got {damping!r}")
    return kwargs


def _fused_runs_on(params: list[nn.Parameter]) -> bool | None:
    """torch's fused AdamW (4× faster than its per-tensor loop on CPU for adapter factors) where its
    kernel runs; None (torch's own choice) elsewhere."""
    # plain tensors only: sharded (DTensor) parameters are left to torch's own choice
    ok = all(p.device.type in FUSED_DEVICES and p.is_floating_point() and type(p.data) is torch.Tensor for p in params)
    return True if ok else None


def make_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    betas: tuple[float, float] | None = None,
    eps: float | None = None,
    momentum: float | None = None,
    loraplus_ratio: float | bool | None = None,
    preconditioner: str | None = None,
    damping: float = 1e-6,
    max_grad_norm: float | None = None,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """A torch optimizer over the model's trainable tensors.

    ``name``: "adamw" (``betas``, default (0.9, 0.999), and ``eps``, default 1e-8) or "sgd"
    (``momentum``, default 0). ``weight_decay`` applies to matrices, not to biases, norms
    or DoRA magnitudes (decoupled for AdamW). ``loraplus_ratio``: LoRA+ — B of every
    trainable (A, B) pair at λ·lr; ``True`` means λ = 16. ``preconditioner="riemannian"``:
    scaled GD / scaled AdamW with ``damping`` δ. It needs adapters whose A and B both train
    (lora, gaussian, pissa, lora-ga, dora); on lora-fa, lora-xs and lora-sb it is an error,
    not a silent no-op. LoRA-FA needs nothing special: its A is frozen, so only B is
    optimised, with any choice above. ``max_grad_norm`` (> 0, or None: off) clips the total
    norm of the gradient ``step()`` applies — after preconditioning, so it bounds the step
    taken; without a preconditioner it equals ``torch.nn.utils.clip_grad_norm_`` before the
    step. AdamW uses torch's fused kernel on CPU and CUDA unless ``fused`` or ``foreach`` is
    given. Extra keyword arguments go to torch's optimizer (e.g. ``foreach=True``, ``nesterov=True``).

    The result is a subclass of ``torch.optim.AdamW`` / ``SGD`` (lorakit.optim.clipping): its
    state_dict round-trips and it works with any LR scheduler and ``transformers.Trainer``;
    ``opt.grad_norm`` holds the last applied gradient's norm before clipping, and a step whose
    applied gradient is not finite raises ``NonFiniteGradient`` before changing any parameter.
    """
    kwargs = optimizer_options(name, lr, weight_decay, betas, eps, momentum, loraplus_ratio, preconditioner, damping,
                               max_grad_norm, **optimizer_kwargs)
    layout = trainable_layout(model)
    groups = param_groups(model, kwargs["lr"], kwargs["weight_decay"], loraplus_ratio, layout=layout)
    if name == "adamw" and "fused" not in kwargs and "foreach" not in kwargs:
        kwargs["fused"] = _fused_runs_on([p for g in groups for p in g["params"]])
    if preconditioner is None:
        return (ClippedAdamW if name == "adamw" else ClippedSGD)(groups, **kwargs)
    if not layout.has_adapters:
        raise LorakitError("preconditioner='riemannian' acts on lorakit adapters, but the model has none; call lorakit.adapt(model, config) first")
    if not layout.pairs:
        raise pair_needed_error("preconditioner='riemannian'", layout.structures)
    cls = RiemannianAdamW if name == "adamw" else RiemannianSGD
    return cls(groups, pairs=layout.pairs, damping=damping, **kwargs)
