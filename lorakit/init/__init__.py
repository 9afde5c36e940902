"""Initialisations: one small strategy class each, registered by name in one table.

An ``Initialisation`` states its facts — which adapter structures it initialises, whether it
needs gradient statistics from training data and how many singular directions of G, whether
it replaces the base weight W by W − s·B₀A₀, its rsLoRA default, which option groups of
``AdapterConfig`` it reads, and what it refuses — and fills one adapter's factors in
``initialise(adapter, config, generator, stats)``. Nothing outside this package compares
method names: adding a method is one class here plus, for a named preset, one line of
``lorakit.config.METHODS``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from lorakit import defaults
from lorakit.adapters import LowRankAdapter
from lorakit.adapters.layers import kind_of
from lorakit.adapters.quantized import quantization_of
from lorakit.errors import LorakitError


def suggest(name: str, valid: Any) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    import difflib

    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Initialisation:
    """The interface and the defaults of every initialisation (see the module doc)."""

    name: ClassVar[str]
    structures: ClassVar[tuple[str, ...]]  # adapter structures it can initialise
    data_driven: ClassVar[bool] = False  # initialises from gradient statistics (lorakit.estimate)
    changes_base: ClassVar[bool] = False  # sets W ← W − s·B₀A₀ (so export is relative to the original W)
    rslora: ClassVar[bool] = False  # the default of use_rslora (s = α/√r)
    uses_training_lr: ClassVar[bool] = False  # its start depends on the training lr and warm-up
    option_groups: ClassVar[tuple[str, ...]] = ()  # AdapterConfig option groups it reads
    training_lr: ClassVar[float] = defaults.LR  # the learning rate lorakit train uses when optim.lr is not set

    def moves_base(self, config: Any) -> bool:
        """True when, with these options, it replaces W by W − s·B₀A₀."""
        return self.changes_base

    def check_layers(self, config: Any, layers: dict[str, nn.Module]) -> None:
        """Raise LorakitError when it would move the weight of a quantized layer its backend cannot re-quantize,
        or estimate gradients on a layer kind the estimator does not handle (Embedding)."""
        if self.data_driven:
            for name, layer in layers.items():
                kind = kind_of(layer)
                if kind is not None and not kind.estimable:
                    raise LorakitError(
                        f"init {self.name!r} estimates G from nn.Linear, Conv1D and Conv2d layers, but target {name!r} is a "
                        f"{type(layer).__name__}; leave it out of targets or use a data-free init (lora, pissa, lora-xs)"
                    )
        if not self.moves_base(config):
            return
        for layer in layers.values():  # the base becomes Q(W − s·B₀A₀): every quantized layer must re-quantize
            backend = quantization_of(layer)
            if backend is not None:
                backend.check_quantizable(layer)

    def directions(self, config: Any) -> int:
        """Singular directions of G a data-driven init uses (its estimator needs that many)."""
        return config.rank

    def needs_exact_gradient(self, config: Any) -> bool:
        """True when it needs G itself, which the sketch estimator never forms."""
        return False

    def check(self, config: Any) -> None:
        """Raise LorakitError for option combinations it cannot honour."""

    def compact(self, config: Any, generator: torch.Generator, stats: Any) -> Any:
        """What ``initialise`` needs of one layer's gradient statistics, as small as it can be held
        (``lorakit.adapt`` calls it as each layer group is estimated, with the generator ``initialise``
        will get, so the factors are the same). Default: the statistics themselves."""
        return stats

    def initialise(self, adapter: LowRankAdapter, config: Any, generator: torch.Generator, stats: Any) -> None:
        raise NotImplementedError


INITIALISATIONS: dict[str, Initialisation] = {}


def register(cls: type[Initialisation]) -> type[Initialisation]:
    INITIALISATIONS[cls.name] = cls()
    return cls


def initialisation(name: str) -> Initialisation:
    try:
        return INITIALISATIONS[name]
    except KeyError:
        raise LorakitError(f"unknown init {name!r}{suggest(name, INITIALISATIONS)}; valid: {', '.join(INITIALISATIONS)}") from None


def set_factor(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy an initial value into an adapter tensor (its device and dtype, no autograd)."""
    with torch.no_grad():
        param.copy_(value.to(device=param.device, dtype=param.dtype))


from lorakit.init import data_free  # noqa: E402,F401  (fills the table)

from lorakit.init import gradient  # noqa: E402,F401
