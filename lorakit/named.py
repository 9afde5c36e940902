"""Several named adapters on one model, one active at a time: PEFT's ``add_adapter``,
``set_adapter``, ``delete_adapter``, ``active_adapter`` and ``load_adapter(dir, adapter_name=...)``.

    model ─┬─ q_proj: LoRA "math"  ─► base_layer (W)        active: in the module tree
           │                             ▲
    registry: "chat" ─ q_proj: LoRA ─────┘                  inactive: outside the tree,
                                                            wrapping the same base layer

The active adapter is the one in the model: its layers sit in the module tree exactly as a
single adapter's do, so the forward costs nothing more, and the optimizer, save, export,
merge, ``adapters_disabled`` and the parameter report act on it alone. The other adapters wait
in a registry on the model (name → config and layers), wrapping the very same base layers;
``set_adapter(name)`` swaps the layer modules in the tree (one setattr per layer, no tensor is
copied). A single-adapter model is the case of one name, "default" unless named otherwise.

What follows from it:
- Only the active adapter trains: the inactive ones are not in ``model.parameters()`` and their
  factors are frozen. Build the optimizer after ``set_adapter``.
- ``model.to(...)`` moves the active adapter only; ``set_adapter`` moves the one it activates to
  its base layers' device.
- ``lorakit.merge(model, adapter_name=...)`` folds one adapter into the base and drops the others
  (they were relative to the unmerged base), as PEFT's ``merge_and_unload`` does.
- Shared base weights: an initialisation that moves W (pissa, svd-fa, lora-ga, lora-sb with
  ``preserve_init``: W ← W − s·B₀A₀) would change every other adapter's function, and undoing it
  on each switch is not exact in floating point, so such an adapter is refused beside another
  (in either order). Likewise ``modules_to_save`` (a head trained fully would be trained by
  every adapter): named adapters train low-rank factors only.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from torch import nn

from lorakit.adaptation import ACTIVE_ATTR, DEFAULT_ADAPTER, REGISTRY_ATTR, adapt, get_config, mark_adapted
from lorakit.adapters import LowRankAdapter
from lorakit.config import AdapterConfig, suggest
from lorakit.errors import LorakitError
from lorakit.inject import _set_submodule, adapters_of, resolve_modules_to_save, unwrap


@dataclass
class NamedAdapter:
    config: AdapterConfig
    layers: dict[str, LowRankAdapter]


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter in the model (the one that computes, trains, saves and exports)."""
    get_config(model)
    return model.__dict__.get(ACTIVE_ATTR, DEFAULT_ADAPTER)


def _entries(model: nn.Module) -> dict[str, NamedAdapter]:
    """Every adapter by name, in the order added; the active one's entry read from the module tree."""
    config = get_config(model)
    registry = model.__dict__.setdefault(REGISTRY_ATTR, {})
    registry[active_adapter(model)] = NamedAdapter(config, adapters_of(model))
    return registry


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the model's adapters, in the order they were added."""
    return list(_entries(model))


def _known(entries: dict[str, NamedAdapter], name: str) -> NamedAdapter:
    if name not in entries:
        raise LorakitError(f"this model has no adapter named {name!r}{suggest(name, entries)}; "
                           f"its adapters: {', '.join(entries)}")
    return entries[name]


def _check_switchable(model: nn.Module, entry: NamedAdapter) -> None:
    name = active_adapter(model)
    if any(layer.merged for layer in entry.layers.values()):
        raise LorakitError(f"adapter {name!r} is merged into the base weights; call unmerge() on its layers before "
                           "switching or adding adapters")
    if not all(layer.enabled for layer in entry.layers.values()):
        raise LorakitError("cannot switch or add adapters while adapters are disabled; leave the "
                           "adapters_disabled() / disable_adapter() block first")


def _swap(model: nn.Module, old: NamedAdapter, new_name: str, new: NamedAdapter) -> None:
    """Put ``new``'s layers in the tree in place of ``old``'s (the base layers in between)."""
    for layer in old.layers.values():
        layer.requires_grad_(False)
    unwrap(model)
    for name, layer in new.layers.items():
        device = next(layer.base_layer.parameters()).device
        if layer.A.device != device:
            layer.to(device)
        _set_submodule(model, name, layer)
        layer.set_trainable()
    mark_adapted(model, new.config)
    model.__dict__[ACTIVE_ATTR] = new_name


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make adapter ``name`` the active one: it computes, trains (its trainable factors only),
    saves, exports and merges; the others wait unchanged."""
    entries = _entries(model)
    target = _known(entries, name)
    current = active_adapter(model)
    if name != current:
        _check_switchable(model, entries[current])
        _swap(model, entries[current], name, target)
    return model


@contextmanager
def activated(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """``with activated(model, name):`` adapter ``name`` active inside, the previous one after
    (``None``: the active one, nothing switched)."""
    if name is None:
        yield model
        return
    previous = active_adapter(model)
    set_adapter(model, name)
    try:
        yield model
    finally:
        set_adapter(model, previous)


def _check_name(name: Any, entries: dict[str, NamedAdapter]) -> None:
    if not isinstance(name, str) or not name:
        raise LorakitError(f"an adapter name must be a non-empty string, got {name!r}")
    if name in entries:
        raise LorakitError(f"the model already has an adapter named {name!r}; pick another name "
                           f"(its adapters: {', '.join(entries)}) or delete_adapter({name!r}) first")


def _refuse_shared_base(model: nn.Module, entries: dict[str, NamedAdapter], name: str, moves_base: bool, what: str,
                        saved: list[str]) -> None:
    """The one-line refusals of a new adapter ``name`` beside ``entries`` (see the module doc)."""
    _check_name(name, entries)
    for other, entry in entries.items():
        if any(layer.has_offset for layer in entry.layers.values()):
            raise LorakitError(f"adapter {other!r} (init {entry.config.init_method!r}) moved the base weights (W − s·B₀A₀), "
                               "which other adapters would share; merge it first (lorakit.merge) or add adapters to a "
                               "fresh copy of the base model")
        shared = resolve_modules_to_save(model, entry.config)
        if shared:
            raise LorakitError(f"adapter {other!r} trains module {shared[0]!r} fully (modules_to_save), which named adapters "
                               "cannot share; adapt with modules_to_save=[] to hold several adapters")
    if moves_base:
        raise LorakitError(f"{what} moves the base weights (W − s·B₀A₀), which the model's other adapters "
                           f"({', '.join(entries)}) share; use it on a fresh copy of the base model, or an init that "
                           "leaves W alone (lora, lora-xs, lora-sb without preserve_init)")
    if saved:
        raise LorakitError(f"{what} trains module {saved[0]!r} fully (modules_to_save), which named adapters cannot "
                           "share; use modules_to_save=[] to hold several adapters")


def _add(model: nn.Module, name: str, build: Callable[[nn.Module], Any]) -> nn.Module:
    """Run ``build`` (which adds adapters to a model with none) on the bare base model, then put the
    active adapter back and keep the new one, inactive and frozen, under ``name``. On failure the
    model is as it was."""
    entries = _entries(model)
    current_name = active_adapter(model)
    current = entries[current_name]
    _check_switchable(model, current)
    unwrap(model)
    try:
        build(model)
        new = NamedAdapter(get_config(model), adapters_of(model))
    finally:  # the new adapter's layers out, the active one's back in
        _swap(model, NamedAdapter(current.config, {}), current_name, current)
    for layer in new.layers.values():
        layer.requires_grad_(False)
    entries[name] = new
    return model


def add_adapter(model: nn.Module, name: str, config: AdapterConfig, data: Any = None, stats: Any = None,
                progress: bool = True) -> nn.Module:
    """Add a new adapter ``name`` beside the model's adapters, initialised as ``lorakit.adapt``
    would initialise it on the bare base model (data-driven inits estimate on the base model);
    it is not made active (PEFT's ``add_adapter``): call ``set_adapter(model, name)``."""
    entries = _entries(model)
    _refuse_shared_base(model, entries, name, config.initialisation.moves_base(config), f"init {config.init_method!r}",
                        resolve_modules_to_save(model, config))
    return _add(model, name, lambda bare: adapt(bare, config, data=data, stats=stats, progress=progress))


def load_beside(model: nn.Module, directory: str | os.PathLike, adapter_name: str, **options: Any) -> nn.Module:
    """Add the adapter saved in ``directory`` (lorakit or PEFT format) under ``adapter_name``,
    inactive, beside the model's adapters (PEFT's ``load_adapter(dir, adapter_name)``)."""
    from lorakit.io import CONFIG_FILE, load_adapter, read_adapter_meta
    from lorakit.peft_format import import_peft, read_peft_config

    entries = _entries(model)
    if os.path.isfile(os.path.join(directory, CONFIG_FILE)):
        meta = read_adapter_meta(directory)
        moves = any(layer.get("has_offset") for layer in meta["layers"].values())
        saved = list(meta.get("modules_to_save") or [])
        build = lambda bare: load_adapter(bare, directory, **options)  # noqa: E731
    else:
        if options:
            raise LorakitError(f"options {sorted(options)} apply to lorakit adapters only, not to the PEFT folder {directory}")
        moves, saved = False, list(read_peft_config(directory).get("modules_to_save") or [])
        build = lambda bare: import_peft(bare, directory)  # noqa: E731
    _refuse_shared_base(model, entries, adapter_name, moves, f"the adapter in {directory}", saved)
    return _add(model, adapter_name, build)


def rename_active(model: nn.Module, name: str) -> nn.Module:
    """Name the model's only adapter ``name`` (``lorakit.load(..., adapter_name=name)`` on a bare model)."""
    entries = _entries(model)
    current = active_adapter(model)
    if name != current:
        others = {n: e for n, e in entries.items() if n != current}
        _check_name(name, others)
        entries[name] = entries.pop(current)
        model.__dict__[ACTIVE_ATTR] = name
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove adapter ``name``; deleting the active one activates the first remaining (as PEFT)."""
    entries = _entries(model)
    _known(entries, name)
    if len(entries) == 1:
        raise LorakitError(f"adapter {name!r} is the model's only adapter; fold it in with lorakit.merge(model) "
                           "or reload the base model instead")
    if name == active_adapter(model):
        set_adapter(model, next(n for n in entries if n != name))
    del entries[name]
    return model
