"""Find target layers, wrap them in adapters, freeze the rest, report parameter counts."""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from lorakit.adapters import ADAPTER_CLASSES, LowRankAdapter, is_linear_layer, is_supported_layer
from lorakit.adapters.layers import NAMES
from lorakit.config import AdapterConfig, suggest
from lorakit.errors import LorakitError
from lorakit.linalg import DTYPES

# Sequence-classification heads trained fully unless modules_to_save says otherwise.
CLASSIFIER_HEADS = ("classifier", "score")


def _matches_suffix(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def resolve_modules_to_save(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Full names of the modules trained fully (config.modules_to_save, or the classifier head)."""
    names = [n for n, _ in model.named_modules() if n]
    if config.modules_to_save is None:
        if not type(model).__name__.endswith("ForSequenceClassification"):
            return []
        return [n for n in names if n in CLASSIFIER_HEADS]
    found = []
    for wanted in config.modules_to_save:
        hits = [n for n in names if _matches_suffix(n, wanted)]
        if not hits:
            raise LorakitError(f"modules_to_save entry {wanted!r} matched no module{suggest(wanted, _leaf_names(names))}")
        found += [h for h in hits if not _under(h, found)]
    return found


def _leaf_names(names: list[str]) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's input embedding module (transformers' get_input_embeddings), or None."""
    getter = getattr(model, "get_input_embeddings", None)
    if not callable(getter):
        return None
    try:
        embeddings = getter()
    except (NotImplementedError, AttributeError):
        return None
    return embeddings if isinstance(embeddings, nn.Module) else None


def _output_head_names(model: nn.Module) -> set[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n for n, m in model.named_modules() if head is not None and m is head} | {"lm_head"}


def find_targets(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Full names of the layers to adapt, checked to be layers lorakit adapts ('all-linear': every
    nn.Linear and Conv1D outside the output head; Conv2d and Embedding layers are adapted when named)."""
    saved = resolve_modules_to_save(model, config)
    modules = {n: m for n, m in model.named_modules() if n and not _under(n, saved)}
    if any(isinstance(m, LowRankAdapter) for m in modules.values()):
        raise LorakitError("model already has lorakit adapters; merge them (lorakit.merge), add another beside them "
                           "(lorakit.add_adapter(model, name, config)) or start from a fresh model")
    targets = config.targets
    if targets == "all-linear":
        heads = _output_head_names(model)
        names = [n for n, m in modules.items() if is_linear_layer(m) and n not in heads]
        if not names:
            raise LorakitError("targets='all-linear' found no nn.Linear or Conv1D layer outside the output head")
        return names
    if isinstance(targets, str):
        names = [n for n in modules if re.fullmatch(targets, n)]
        if not names:
            raise LorakitError(
                f"target regex {targets!r} matched no module name (it must match the full name, e.g. "
                f"'.*\\.(query|value)'); layer names end in: {', '.join(_leaf_names(list(modules))[:20])}"
            )
    else:
        for suffix in targets:
            if not any(_matches_suffix(n, suffix) for n in modules):
                raise LorakitError(
                    f"target {suffix!r} matched no module{suggest(suffix, _leaf_names(list(modules)))}; "
                    f"layer names end in: {', '.join(_leaf_names(list(modules))[:20])}"
                )
        names = [n for n in modules if any(_matches_suffix(n, t) for t in targets)]
    for n in names:
        if not is_supported_layer(modules[n]):
            raise LorakitError(
                f"target {n!r} is a {type(modules[n]).__name__}; lorakit adapts {NAMES}, "
                "so target those layers (e.g. by their name suffixes)"
            )
    return names


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def build_adapters(model: nn.Module, config: AdapterConfig, names: list[str]) -> dict[str, LowRankAdapter]:
    """A zero-initialised adapter around each named layer, built beside the model (not yet in it)."""
    cls = ADAPTER_CLASSES[config.adapter_type]
    dtype = DTYPES[config.adapter_dtype] if config.adapter_dtype else None
    adapters = {}
    for name in names:
        try:
            adapters[name] = cls(model.get_submodule(name), config.rank, config.scale, config.dropout, dtype=dtype)
        except LorakitError as exc:
            raise LorakitError(f"layer {name!r}: {exc}") from None
    return adapters


def install_adapters(model: nn.Module, config: AdapterConfig, adapters: dict[str, LowRankAdapter]) -> None:
    """Put built adapters in place of their layers; freeze everything but their trainable factors
    and ``modules_to_save``."""
    for param in model.parameters():
        param.requires_grad_(False)
    for name, adapter in adapters.items():
        _set_submodule(model, name, adapter)
        adapter.set_trainable()
    for name in resolve_modules_to_save(model, config):
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)


def inject(model: nn.Module, config: AdapterConfig, names: list[str] | None = None) -> dict[str, LowRankAdapter]:
    """Wrap each target layer in a zero-initialised adapter and freeze everything else.

    Returns the adapters by layer name. Initialisation is a separate step (``lorakit.adapt``).
    """
    names = find_targets(model, config) if names is None else names
    adapters = build_adapters(model, config, names)
    install_adapters(model, config, adapters)
    return adapters


def adapters_of(model: nn.Module) -> dict[str, LowRankAdapter]:
    """The model's adapters by the name of the layer they wrap."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LowRankAdapter)}


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every adapter by its base layer (as it is, merged or not)."""
    for name, adapter in adapters_of(model).items():
        _set_submodule(model, name, adapter.base_layer)
    return model


@dataclass(frozen=True)
class ParameterReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def parameter_report(model: nn.Module) -> ParameterReport:
    """Trainable vs total parameters (frozen adapter factors count in the total)."""
    params = list({id(p): p for p in model.parameters()}.values())
    return ParameterReport(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
