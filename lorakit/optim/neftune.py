"""NEFTune: uniform noise on the input embeddings while training.

Jain et al. (2023), "NEFTune: Noisy Embeddings Improve Instruction Finetuning", arXiv 2310.05914.
In training mode the embedding output e (batch × L × d) becomes

    e + U(−1, 1) · α / √(L·d)

(L the sequence length, d the embedding size); in eval mode it is untouched.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.inject import input_embeddings

# embedding modules that currently carry a NEFTune hook (to refuse stacking two)
_ACTIVE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _input_embeddings(model: nn.Module) -> nn.Module:
    embeddings = model if isinstance(model, nn.Embedding) else input_embeddings(model)
    if embeddings is None:
        raise LorakitError(
            f"cannot find the input embeddings of a {type(model).__name__}: pass a transformers model "
            "(with get_input_embeddings()) or the nn.Embedding itself"
        )
    return embeddings


class NEFTuneHandle:
    """Returned by ``enable_neftune``; ``remove()`` (or leaving a ``with`` block) switches the noise off."""

    def __init__(self, embeddings: nn.Module, alpha: float) -> None:
        self.alpha = alpha
        self._embeddings = weakref.ref(embeddings)
        self._hook = embeddings.register_forward_hook(self._add_noise)
        _ACTIVE.add(embeddings)

    def _add_noise(self, module: nn.Module, args: Any, output: Tensor) -> Tensor | None:
        if not module.training:
            return None
        length, dim = (output.shape[-2], output.shape[-1]) if output.dim() >= 2 else (1, output.shape[-1])
        bound = self.alpha / math.sqrt(length * dim)
        return output + torch.empty_like(output).uniform_(-bound, bound)

    @property
    def active(self) -> bool:
        return self._hook is not None

    def remove(self) -> None:
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        embeddings = self._embeddings()
        if embeddings is not None:
            _ACTIVE.discard(embeddings)

    def __enter__(self) -> "NEFTuneHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def enable_neftune(model: nn.Module, alpha: float) -> NEFTuneHandle:
    """Add NEFTune noise of strength ``alpha`` (the paper uses 5–15) to ``model``'s input embeddings.

    Acts only while the embedding module is in training mode (``model.train()``); returns a
    handle whose ``remove()`` restores the plain model.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise LorakitError(f"neftune alpha must be a positive number (the paper uses 5 to 15), got {alpha!r}")
    embeddings = _input_embeddings(model)
    if embeddings in _ACTIVE:
        raise LorakitError("NEFTune is already enabled on this model; remove() the first handle before enabling it again")
    return NEFTuneHandle(embeddings, float(alpha))
