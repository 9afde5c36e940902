"""Capture each target layer's input x and output gradient δ = ∂L/∂y, weights frozen.

    forward:  x ──► layer (W frozen) ──► y      (forward hook keeps x, puts a hook on y)
    backward:                 δ = ∂L/∂y ◄──     (tensor hook hands (x, δ) to the sink)

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


@contextmanager
def tap_gradients(model: nn.Module, layers: dict[str, nn.Module], sink: Sink) -> Iterator[set[str]]:
    """While active, every backward through a layer calls ``sink(name, x, δ)``.

    Yields the set of layer names that received a gradient (filled during backward). All
    hooks are removed on exit.
    """
    reached: set[str] = set()
    handles = []

    def watch(name: str, layer: nn.Module):
        def forward_hook(module: nn.Module, args, output) -> None:
            # Under no_grad (e.g. the first forward of activation checkpointing) nothing to watch.
            if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
                return
            held = [args[0].detach()]  # dropped once used: x must not outlive this layer's backward

            def on_grad(delta: Tensor) -> None:
                reached.add(name)
                if held:  # as matrices (tokens × in, tokens × out): a Conv2d's input unfolded (LayerKind.rows)
                    sink(name, *kind_of(layer).rows(layer, held.pop(), delta))

            output.register_hook(on_grad)

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
