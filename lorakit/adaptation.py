"""``adapt``: config → targets → (estimate →) inject → initialise, in place."""

from __future__ import annotations

import functools
import logging
import sys
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from torch import nn

from lorakit.adapters import LowRankAdapter
from lorakit.adapters.quantized import (FullPrecisionWeights, check_full_precision, full_precision_source,
                                        requantization_warning)
from lorakit.config import AdapterConfig
from lorakit.errors import LorakitError
from lorakit.inject import adapters_of, find_targets, inject, parameter_report
from lorakit.linalg import layer_generator

logger = logging.getLogger("lorakit")
CONFIG_ATTR = "lorakit_config"
# Named adapters (lorakit.named): the active one's name, and every adapter by name.
ACTIVE_ATTR = "active_adapter"
REGISTRY_ATTR = "lorakit_adapters"
DEFAULT_ADAPTER = "default"


def adapt(
    model: nn.Module,
    config: AdapterConfig | None = None,
    data: Any = None,
    stats: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Add adapters to ``model`` in place and initialise them; returns the model.

    ``data`` (batches of the training data) feeds the data-driven methods (lora-ga,
    lora-sb); alternatively pass ``stats`` from ``lorakit.estimate`` (e.g. loaded from a
    cache). Everything but the adapters' trainable factors and ``modules_to_save`` is frozen.
    ``progress``: show the estimation progress bar (rank 0 only).
    """
    config = config or AdapterConfig()
    names = find_targets(model, config)
    config.initialisation.check_layers(config, {n: model.get_submodule(n) for n in names})
    full_precision = full_precision_source(model, config.full_precision_checkpoint)
    check_full_precision(full_precision, {n: model.get_submodule(n) for n in names})
    estimated_here = config.needs_data and stats is None
    if estimated_here:
        if data is None:
            raise LorakitError(
                f"method {config.method!r} initialises from gradients: pass data=<batches of training data> "
                "(or stats=lorakit.estimate(...))"
            )
        from lorakit.estimate import estimate

        stats = estimate(model, config, data, targets=names, progress=progress, compact=compactor(config))
    if config.needs_data:
        missing = [n for n in names if n not in stats]
        if missing:
            raise LorakitError(f"the gradient statistics have no entry for layer {missing[0]!r}; re-run lorakit.estimate for these targets")
    adapters = inject(model, config, names)
    for name, adapter in adapters.items():
        with full_precision_of(adapter, name, full_precision):
            initialise_adapter(adapter, name, config, stats[name] if config.needs_data else None)
        if estimated_here:
            del stats[name]  # free each layer's statistics once used
    warning = requantization_warning({n: a.quantization_error for n, a in adapters.items() if a.quantization_error},
                                     config.init_method)
    if warning is not None:
        logger.warning(warning)
    mark_adapted(model, config)
    return model


def mark_adapted(model: nn.Module, config: AdapterConfig) -> None:
    """Record ``config`` on the model and bind ``AdaptedModelCalls`` on it (a guarded
    ``save_pretrained`` and the calls a PEFT user expects on the model)."""
    setattr(model, CONFIG_ATTR, config)
    model.__dict__.setdefault(ACTIVE_ATTR, DEFAULT_ADAPTER)  # PEFT's model.active_adapter
    for name in AdaptedModelCalls.names(model):
        setattr(model, name, functools.partial(getattr(AdaptedModelCalls, name), model))


def unmark_adapted(model: nn.Module) -> None:
    """Undo ``mark_adapted`` (the adapters are gone: the model's own methods are right again)."""
    for attr in (CONFIG_ATTR, ACTIVE_ATTR, REGISTRY_ATTR, *AdaptedModelCalls.names(model)):
        model.__dict__.pop(attr, None)


class AdaptedModelCalls:
    """Methods bound on each adapted model (as partials: the model still pickles and deep-copies).
    PEFT's ``disable_adapter()``, ``merge_and_unload()``,
    ``print_trainable_parameters()`` (= ``lorakit.adapters_disabled`` / ``merge`` /
    ``parameter_report``), ``add_adapter``, ``set_adapter``, ``delete_adapter`` and
    ``load_adapter(dir, adapter_name)`` (``lorakit.named``; ``model.active_adapter`` is the active
    adapter's name), and a ``save_pretrained`` that refuses: an adapted model's state holds
    ``base_layer``/``A``/``B`` keys that ``from_pretrained`` cannot load (allowed only when
    ``transformers.Trainer._save`` calls it: checkpoints that the same adapted model reloads)."""

    @staticmethod
    def names(model: nn.Module) -> list[str]:
        guarded = ["save_pretrained"] if callable(getattr(type(model), "save_pretrained", None)) else []
        return [*guarded, "disable_adapter", "merge_and_unload", "print_trainable_parameters",
                "add_adapter", "set_adapter", "delete_adapter", "load_adapter"]

    @staticmethod
    def save_pretrained(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if _called_by_trainer_save(sys._getframe(1)):
            return type(model).save_pretrained(model, *args, **kwargs)
        raise LorakitError(
            f"{type(model).__name__}.save_pretrained would write lorakit adapter keys (base_layer, A, B) that from_pretrained "
            "cannot load; use lorakit.save_adapter(model, dir), lorakit.export_peft(model, dir) or "
            "lorakit.merge(model).save_pretrained(dir)"
        )

    @staticmethod
    def disable_adapter(model: nn.Module) -> Any:
        return adapters_disabled(model)

    @staticmethod
    def merge_and_unload(model: nn.Module, adapter_name: str | None = None, adapter_names: list[str] | None = None) -> nn.Module:
        from lorakit.export import merge  # export imports this module

        if adapter_names is not None:  # PEFT's spelling; lorakit folds one adapter in
            if len(adapter_names) != 1 or adapter_name not in (None, adapter_names[0]):
                raise LorakitError(f"merge_and_unload folds one adapter into the base, got {adapter_names!r}; "
                                   "name one (adapter_name='...')")
            adapter_name = adapter_names[0]
        return merge(model, adapter_name=adapter_name)

    @staticmethod
    def add_adapter(model: nn.Module, adapter_name: str, config: AdapterConfig, **options: Any) -> nn.Module:
        from lorakit.named import add_adapter  # named imports this module

        return add_adapter(model, adapter_name, config, **options)

    @staticmethod
    def set_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
        from lorakit.named import set_adapter

        return set_adapter(model, adapter_name)

    @staticmethod
    def delete_adapter(model: nn.Module, adapter_name: str) -> nn.Module:
        from lorakit.named import delete_adapter

        return delete_adapter(model, adapter_name)

    @staticmethod
    def load_adapter(model: nn.Module, directory: Any, adapter_name: str, **options: Any) -> nn.Module:
        from lorakit.peft_format import load

        return load(model, directory, adapter_name=adapter_name, **options)

    @staticmethod
    def print_trainable_parameters(model: nn.Module) -> None:
        print(parameter_report(model))


def _called_by_trainer_save(frame: Any) -> bool:
    """Whether ``frame`` is ``transformers.Trainer._save`` (any Trainer subclass): its checkpoints are
    reloaded by the same adapted model on ``resume_from_checkpoint``."""
    trainer_module = sys.modules.get("transformers.trainer")  # not imported: no Trainer is saving
    trainer_class = getattr(trainer_module, "Trainer", None)
    return (trainer_class is not None and frame.f_code.co_name == "_save"
            and isinstance(frame.f_locals.get("self"), trainer_class))


def compactor(config: AdapterConfig):
    """``estimate(compact=...)`` for statistics that ``initialise_adapter`` consumes at once: each layer's
    G reduced to what its init needs (``Initialisation.compact``), with the generator the init gets."""
    return lambda name, stats: config.initialisation.compact(config, layer_generator(config.seed, name), stats)


@contextmanager
def full_precision_of(adapter: LowRankAdapter, name: str, source: FullPrecisionWeights | None) -> Iterator[None]:
    """Inside, a quantized ``adapter``'s ``original_weight`` is its full-precision W from ``source`` (one
    layer's weight in memory at a time); nothing for a plain layer or no source."""
    if source is None or adapter.backend is None:
        yield
        return
    adapter.full_precision = source.weight(name, (adapter.out_features, adapter.in_features), adapter.base_weight.device)
    try:
        yield
    finally:
        adapter.full_precision = None


def initialise_adapter(adapter: LowRankAdapter, name: str, config: AdapterConfig, layer_stats: Any = None) -> None:
    """Initialise one injected adapter (from its layer's gradient statistics for lora-ga / lora-sb)."""
    config.initialisation.initialise(adapter, config, layer_generator(config.seed, name), layer_stats)
    adapter.finish_init()


def get_config(model: nn.Module) -> AdapterConfig:
    """The AdapterConfig the model was adapted with."""
    config = getattr(model, CONFIG_ATTR, None)
    if config is None or not adapters_of(model):
        raise LorakitError("this model has no lorakit adapters; call lorakit.adapt(model, config) first")
    return config


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the original base model: ``with lorakit.adapters_disabled(model): ref = model(x)``.

    Inside, every adapter computes its base layer's ORIGINAL function, also for
    initialisations that moved the base weight (pissa, svd-fa, lora-ga, lora-sb with
    ``preserve_init``): their stored offset is added back on the fly (y = base(x) + s·(x A₀ᵀ) B₀ᵀ),
    no weight is touched. On exit each adapter gets back the enabled state it had before,
    also when the body raises. Merged adapters cannot be disabled: unmerge them first.
    ``modules_to_save`` (e.g. a classifier head trained fully) are not adapters and keep
    their trained weights.
    """
    adapters = list(adapters_of(model).values())
    merged = [a for a in adapters if a.merged]
    if merged:
        raise LorakitError("cannot disable merged adapters; call unmerge() on them first")
    previous = [a.enabled for a in adapters]
    try:
        for adapter in adapters:
            adapter.set_enabled(False)
        yield model
    finally:
        for adapter, enabled in zip(adapters, previous):
            adapter.enabled = enabled
