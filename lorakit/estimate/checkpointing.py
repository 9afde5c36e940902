"""Activation checkpointing during the estimation passes (``estimation.checkpointing``).

Each block's activations are recomputed in the backward pass instead of being kept from the
forward, so an estimate adds its own state (G, or the sketch's O((out + in)·k) per layer) plus
one block's activations and the blocks' inputs, not every layer's activations. The statistics
are unchanged: the taps (``lorakit.estimate.hooks``) keep x as a saved tensor of the graph,
which checkpointing drops and recomputes like any activation, and each (x, δ) pair is counted
once although a checkpointed block's forward hooks run twice.

- transformers models that support it: transformers' own API
  (``activation_checkpointing_enable``, ``gradient_checkpointing_enable`` before 5.x;
  non-reentrant ``torch.utils.checkpoint``). transformers checkpoints a layer only in training
  mode, so with dropout off (the default) only the checkpointed layers themselves are put in
  training mode — their submodules (dropout, attention) stay in eval mode. A layer whose own
  forward applies dropout from a float attribute (e.g. BART's) would then drop out: such models
  are estimated without checkpointing, with a warning.
- any other module: each child of an ``nn.ModuleList`` that holds a target layer is wrapped in
  ``torch.utils.checkpoint`` (non-reentrant) for the estimation, then put back.
Afterwards the model is as it was: checkpointing flags and functions, the input-embedding hooks
``enable_input_require_grads`` registers, and the swapped blocks are all restored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakit.errors import LorakitError

logger = logging.getLogger("lorakit")

_MISSING = object()
# what transformers' enable sets on the model and its modules (restored exactly afterwards)
_MODEL_ATTRS = ("_require_grads_hooks", "_require_grads_hook")
_MODULE_ATTRS = ("gradient_checkpointing", "_gradient_checkpointing_func")


class _Checkpointed(nn.Module):
    """A block whose forward is recomputed in backward (non-reentrant torch.utils.checkpoint)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.block(*args, **kwargs)
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


@contextmanager
def activation_checkpointing(model: nn.Module, layers: dict[str, nn.Module], on: bool, dropout: bool = False) -> Iterator[None]:
    """While active, the model's blocks recompute their activations in backward (see module doc).
    ``layers``: the target layers (the generic route checkpoints the blocks holding them);
    ``dropout``: the estimation runs in training mode (``estimation.dropout``)."""
    if not on:
        yield
        return
    if getattr(model, "supports_gradient_checkpointing", False):
        with _transformers_checkpointing(model, dropout) as active:
            if not active:
                logger.warning("lorakit: %s applies dropout inside its checkpointed layers; estimating without "
                               "activation checkpointing (set estimate_dropout=true to estimate with both)", type(model).__name__)
            yield
        return
    with _checkpointed_blocks(model, layers):
        yield


def _saved(obj: object, names: tuple[str, ...]) -> dict[str, object]:
    return {n: obj.__dict__.get(n, _MISSING) for n in names}


def _restore(obj: object, saved: dict[str, object]) -> None:
    for name, value in saved.items():
        if value is _MISSING:
            obj.__dict__.pop(name, None)
        else:
            obj.__dict__[name] = value


def _own_dropout(layer: nn.Module) -> bool:
    """A float attribute named like dropout, > 0: the layer's forward applies dropout itself."""
    return any("dropout" in k and isinstance(v, float) and v > 0 for k, v in vars(layer).items())


@contextmanager
def _transformers_checkpointing(model: nn.Module, dropout: bool) -> Iterator[bool]:
    flagged = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    model_state = _saved(model, _MODEL_ATTRS)
    module_state = [(m, _saved(m, _MODULE_ATTRS)) for m in flagged]
    embedding_hooks = list(getattr(model, "_require_grads_hooks", None) or [])
    modes = [(m, m.training) for m in model.modules()]
    enable = getattr(model, "activation_checkpointing_enable", None)
    try:
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:  # transformers < 5
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        try:
            from transformers.modeling_layers import GradientCheckpointingLayer
        except ImportError:  # older transformers: the flagged modules check the mode themselves
            GradientCheckpointingLayer = nn.Module
        checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
                        and isinstance(m, GradientCheckpointingLayer)]
        active = dropout or not any(_own_dropout(m) for m in checkpointed)
        if active and not dropout:
            for m in checkpointed:  # transformers checkpoints in training mode only; submodules stay in eval
                m.training = True
        elif not active:
            _undo(model, model_state, module_state, embedding_hooks)
        yield active
    finally:
        for m, training in modes:
            m.training = training
        _undo(model, model_state, module_state, embedding_hooks)


def _undo(model: nn.Module, model_state: dict, module_state: list, embedding_hooks: list) -> None:
    for hook in list(getattr(model, "_require_grads_hooks", None) or []):
        if hook not in embedding_hooks:
            hook.remove()
    _restore(model, model_state)
    for m, saved in module_state:
        _restore(m, saved)


@contextmanager
def _checkpointed_blocks(model: nn.Module, layers: dict[str, nn.Module]) -> Iterator[None]:
    targets = set(map(id, layers.values()))
    swaps, inside = [], set()  # the outermost blocks only: no checkpoint within a checkpoint
    for parent in model.modules():
        if isinstance(parent, nn.ModuleList) and id(parent) not in inside:
            for index, block in enumerate(parent):
                if any(id(m) in targets for m in block.modules()):
                    swaps.append((parent, index, block))
                    inside.update(map(id, block.modules()))
    if not swaps:
        raise LorakitError(f"estimation.checkpointing: {type(model).__name__} is no transformers model with gradient "
                           "checkpointing and holds its target layers in no nn.ModuleList of blocks to checkpoint; "
                           "set estimate_checkpointing=false")
    try:
        for parent, index, block in swaps:
            parent[index] = _Checkpointed(block)
        yield
    finally:
        for parent, index, block in swaps:
            parent[index] = block
