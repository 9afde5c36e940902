"""Initialisations, registered by name in one table.

An initialiser is ``fn(adapter, config, generator, stats) -> None``: it fills the adapter's
factors (and may set a base offset) for one layer. ``stats`` is the layer's entry of the
estimated gradient statistics for data-driven methods, None otherwise.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from lorakit.adapters import LowRankAdapter

Initialiser = Callable[[LowRankAdapter, Any, torch.Generator, Any], None]
INITIALISERS: dict[str, Initialiser] = {}


def set_factor(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy an initial value into an adapter tensor (its device and dtype, no autograd)."""
    with torch.no_grad():
        param.copy_(value.to(device=param.device, dtype=param.dtype))


def register(name: str) -> Callable[[Initialiser], Initialiser]:
    def add(fn: Initialiser) -> Initialiser:
        INITIALISERS[name] = fn
        return fn

    return add


from lorakit.init import data_free  # noqa: E402,F401  (fills the table)

from lorakit.init import gradient  # noqa: E402,F401
