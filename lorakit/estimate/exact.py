"""Exact estimators: G itself per layer, all at once or in layer groups under a memory budget."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.adapters import weight_out_in
from lorakit.errors import LorakitError
from lorakit.estimate.hooks import as_rows
from lorakit.linalg import compute_dtype


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(out, in) of an nn.Linear or a Conv1D (whose weight is stored (in, out))."""
    return tuple(weight_out_in(layer).shape)  # type: ignore[return-value]


def gradient_bytes(layer: nn.Module) -> int:
    """Bytes of this layer's G (out × in in the accumulation dtype: float32, float64 for float64 models)."""
    out_f, in_f = layer_shape(layer)
    return out_f * in_f * torch.empty((), dtype=compute_dtype(layer.weight.dtype)).element_size()


class GradientAccumulator:
    """G = Σ_batches Σ_tokens δᵀ x (out × in), accumulated in float32+ on ``device``.

    The product is formed on the activations' device and added to G (which may live
    elsewhere, e.g. on the CPU with ``estimate_device='cpu'``). G is allocated by the first
    backward that reaches the layer, as autograd allocates ``.grad``: the layers' G do not
    all sit next to the activations of the first batch.
    """

    def __init__(self, layer: nn.Module, device: torch.device | str | None = None) -> None:
        self.shape = layer_shape(layer)
        self.dtype = compute_dtype(layer.weight.dtype)
        self.device = torch.device(device) if device is not None else layer.weight.device
        self._G: Tensor | None = None

    @property
    def G(self) -> Tensor:
        if self._G is None:
            self._G = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return self._G

    def add(self, x: Tensor, delta: Tensor) -> None:
        x2, d2 = as_rows(x, delta, self.dtype)
        if self._G is None:
            self._G = (d2.T @ x2).to(self.device)
        elif x2.device == self._G.device:
            self._G.addmm_(d2.T, x2)  # in place: no out × in temporary
        else:
            self._G.add_((d2.T @ x2).to(self._G.device))

    def tensors(self) -> list[Tensor]:
        return [self.G]


def plan_groups(layers: dict[str, nn.Module], budget: int | None) -> list[list[str]]:
    """Consecutive layer groups whose G fit ``budget`` bytes together (one group without a budget)."""
    names = list(layers)
    if budget is None:
        return [names]
    largest = max(names, key=lambda n: gradient_bytes(layers[n]))
    if gradient_bytes(layers[largest]) > budget:
        raise LorakitError(
            f"memory_budget of {budget:,} bytes is smaller than the gradient of layer {largest!r} "
            f"({gradient_bytes(layers[largest]):,} bytes); raise memory_budget to at least that, or use "
            "estimator='sketch'"
        )
    groups: list[list[str]] = [[]]
    used = 0
    for name in names:
        size = gradient_bytes(layers[name])
        if used + size > budget and groups[-1]:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups
