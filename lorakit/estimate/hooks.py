"""Capture each target layer's input x and output gradient δ = ∂L/∂y, weights frozen.

    forward:  x ──► layer (W frozen) ──► y ──► tap ──► y   (forward hook: the tap saves x)
    backward:                 δ = ∂L/∂y ◄──────── δ        (the tap's backward hands (x, δ) to the sink)

The tap is an identity autograd node that keeps x as a saved tensor of the graph, so activation
checkpointing treats x like any activation: it is dropped after a checkpointed block's forward and
recomputed with the block in backward. The forward hooks of a checkpointed block run twice (the
forward, then the recomputation inside backward), but only the first graph's taps are
backpropagated (non-reentrant checkpointing; under reentrant checkpointing the first forward runs
without grad and only the recomputed taps exist), so each (x, δ) pair reaches the sink once.

For ``y = x Wᵀ (+ b)`` (nn.Linear, or Conv1D's ``x W + b``), ∂L/∂W = Σ_tokens δᵀ x, so the
pair (x, δ) is all any estimator needs; W never requires grad and no ``.grad`` buffer is
created for it. Backward must still reach the layers: like transformers'
``enable_input_require_grads`` the input embeddings' output is made to require grad, and as
a fallback (models without input embeddings) each target's own input is.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from lorakit.adapters.layers import kind_of
from lorakit.inject import input_embeddings

# (layer name, x (..., in), δ (..., out)) -> None
Sink = Callable[[str, Tensor, Tensor], None]


def _embeddings_require_grad(module: nn.Module, args, output) -> None:
    if torch.is_grad_enabled() and isinstance(output, Tensor) and output.is_floating_point() and not output.requires_grad:
        output.requires_grad_(True)


def _input_requires_grad(module: nn.Module, args):
    x = args[0] if args else None
    if torch.is_grad_enabled() and isinstance(x, Tensor) and x.is_floating_point() and not x.requires_grad:
        return (x.detach().requires_grad_(True),) + tuple(args[1:])
    return None


class _Tap(torch.autograd.Function):
    """y ↦ y whose backward calls ``on_grad(x, δ)``; x is a saved tensor (freed with the graph, or
    recomputed by activation checkpointing)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, on_grad: Callable[[Tensor, Tensor], None]) -> Tensor:
        ctx.save_for_backward(x)
        ctx.on_grad = on_grad
        return y.clone()  # not y itself: an output returned as-is would be a view, which in-place ops may not modify

    @staticmethod
    def backward(ctx, delta: Tensor):
        (x,) = ctx.saved_tensors
        ctx.on_grad(x, delta)
        return None, delta, None


@contextmanager
def tap_gradients(model: nn.Module, layers: dict[str, nn.Module], sink: Sink) -> Iterator[set[str]]:
    """While active, every backward through a layer calls ``sink(name, x, δ)``.

    Yields the set of layer names that received a gradient (filled during backward). All
    hooks are removed on exit.
    """
    reached: set[str] = set()
    handles = []

    def watch(name: str, layer: nn.Module):
        rows = kind_of(layer).rows

        def on_grad(x: Tensor, delta: Tensor) -> None:
            reached.add(name)
            sink(name, *rows(layer, x, delta))  # as matrices (tokens × in, tokens × out): a Conv2d's input unfolded

        def forward_hook(module: nn.Module, args, output) -> Tensor | None:
            # Under no_grad (e.g. the first forward of reentrant checkpointing) nothing to watch.
            if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
                return None
            return _Tap.apply(args[0].detach(), output, on_grad)

        return forward_hook

    try:
        embeddings = input_embeddings(model)
        if embeddings is not None:
            handles.append(embeddings.register_forward_hook(_embeddings_require_grad))
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(_input_requires_grad))
            handles.append(layer.register_forward_hook(watch(name, layer)))
        yield reached
    finally:
        for handle in handles:
            handle.remove()


def as_rows(x: Tensor, delta: Tensor, dtype: torch.dtype, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """Flatten tokens: x (tokens × in) and δ (tokens × out) in the accumulation dtype."""
    device = device or delta.device
    return (
        x.reshape(-1, x.shape[-1]).to(device=device, dtype=dtype),
        delta.reshape(-1, delta.shape[-1]).to(device=device, dtype=dtype),
    )
