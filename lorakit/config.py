"""AdapterConfig: what to adapt, with which structure, initialised how.

A *method* is a named preset pairing an adapter structure with an initialisation
(``svd-fa`` = the LoRA-FA structure + the PiSSA initialisation). ``adapter=`` and
``init=`` override either half, so any compatible initialisation composes with any
structure (e.g. ``method="dora", init="pissa"``). What an initialisation needs, changes and
works with is stated by its class in ``lorakit.init`` (``config.initialisation``).

Options come in small typed groups: ``svd`` (the SVD of W or G), ``estimation`` (gradient
statistics for lora-ga / lora-sb) and one group per method that has options (``pissa``, ``lora_xs``,
``lora_ga``, ``lora_sb``). Pass a group as a dataclass or a dict, or use the flat keywords
(``AdapterConfig(method="lora-sb", num_samples=32, lr=1e-3)``), which go to their group.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from lorakit import defaults
from lorakit.errors import LorakitError
from lorakit.init import INITIALISATIONS, Initialisation, initialisation, suggest
from lorakit.init.data_free import PiSSAOptions, XSOptions
from lorakit.init.gradient import GAOptions, SBOptions
from lorakit.linalg import DTYPES

# method -> (adapter structure, initialisation)
METHODS: dict[str, tuple[str, str]] = {
    "lora": ("lora", "lora"),
    "gaussian": ("lora", "gaussian"),
    "pissa": ("lora", "pissa"),
    "lora-fa": ("lora-fa", "lora"),
    "svd-fa": ("lora-fa", "pissa"),
    "dora": ("dora", "lora"),
    "lora-xs": ("xs", "lora-xs"),
    "lora-ga": ("lora", "lora-ga"),
    "lora-sb": ("xs", "lora-sb"),
}
ADAPTERS = ("lora", "lora-fa", "xs", "dora")
ADAPTER_DTYPES = (None, *DTYPES)
__all__ = ["AdapterConfig", "EstimationOptions", "GAOptions", "METHODS", "PiSSAOptions", "SBOptions", "SVDOptions", "XSOptions",
           "suggest"]


def parse_bytes(value: int | float | str | None) -> int | None:
    """Parse a memory size: bytes as a number, or a string such as '2GB', '512MiB'."""
    if value is None or isinstance(value, (int, float)):
        return None if value is None else int(value)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B?)\s*", value, flags=re.IGNORECASE)
    if not m:
        raise LorakitError(f"memory_budget {value!r} is not a size; write bytes or e.g. '2GB', '512MiB'")
    unit = m.group(2).upper().rstrip("B").rstrip("I")
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit]
    base = 1024 if "I" in m.group(2).upper() else 1000
    return int(float(m.group(1)) * base**power)


def _count(group: str, key: str, value: Any, least: int, why: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise LorakitError(f"{group}.{key} must be an integer >= {least}{why}, got {value!r}")


@dataclass
class SVDOptions:
    """The SVD of W (pissa, svd-fa, lora-xs) or of G (lora-ga, lora-sb with the exact estimator):
    ``method`` 'exact', 'randomized' or 'auto' (randomized when much thinner than the matrix),
    ``oversample`` and ``power_iters`` of the randomized one. Flat names: svd, svd_oversample,
    svd_power_iters."""

    method: str = "auto"
    oversample: int = 16
    power_iters: int = 4

    def __post_init__(self) -> None:
        if self.method not in ("auto", "exact", "randomized"):
            raise LorakitError(f"svd.method (svd)={self.method!r} is not valid{suggest(self.method, ('auto', 'exact', 'randomized'))}; "
                               "choose one of auto, exact, randomized")
        _count("svd", "oversample", self.oversample, 8, " (randomized SVD needs oversampling)")
        _count("svd", "power_iters", self.power_iters, 0)


ESTIMATORS = ("auto", "exact", "sketch")


@dataclass
class EstimationOptions:
    """Gradient statistics for the data-driven inits: ``num_samples`` examples, ``estimator``
    (auto / exact / sketch), ``memory_budget`` (bytes or '2GB'), the sketch's ``power_iters`` and
    ``oversample``, ``device`` (where exact gradients accumulate, e.g. 'cpu'), ``dropout``
    (keep dropout on while estimating), ``weighting`` of a sequence model's tokens: 'token'
    (G of the mean over all supervised tokens — the loss transformers' LMs and lorakit's recipe
    train on) or 'example' (every example weighs the same), and ``checkpointing`` (recompute each
    block's activations in the backward pass: the estimate's added memory is its own state plus
    one block's activations; the statistics are the same). Flat names: num_samples, estimator,
    memory_budget, power_iters, oversample, estimate_device, estimate_dropout, estimate_weighting,
    estimate_checkpointing."""

    num_samples: int = 64
    estimator: str = "auto"
    memory_budget: int | str | None = None
    power_iters: int = 1
    oversample: int = 16
    device: str | None = None
    dropout: bool = False
    weighting: str = "token"
    checkpointing: bool = False

    def __post_init__(self) -> None:
        _count("estimation", "num_samples", self.num_samples, 1)
        if self.estimator not in ESTIMATORS:
            raise LorakitError(f"estimation.estimator (estimator)={self.estimator!r} is not valid"
                               f"{suggest(str(self.estimator), ESTIMATORS)}; choose one of {', '.join(ESTIMATORS)}")
        _count("estimation", "power_iters", self.power_iters, 0)
        _count("estimation", "oversample", self.oversample, 8, " (randomized SVD needs oversampling)")
        parse_bytes(self.memory_budget)
        if self.weighting not in ("token", "example"):
            raise LorakitError(f"estimation.weighting={self.weighting!r} is not valid; choose 'token' (the training loss) or 'example'")
        if not isinstance(self.checkpointing, bool):
            raise LorakitError(f"estimation.checkpointing (estimate_checkpointing)={self.checkpointing!r} is not valid; "
                               "choose true or false")

    @property
    def memory_budget_bytes(self) -> int | None:
        return parse_bytes(self.memory_budget)


# option group -> its class; flat keyword -> (group, option)
GROUPS: dict[str, type] = {"svd": SVDOptions, "estimation": EstimationOptions, "pissa": PiSSAOptions, "lora_xs": XSOptions,
                           "lora_ga": GAOptions, "lora_sb": SBOptions}
FLAT: dict[str, tuple[str, str]] = {
    "svd": ("svd", "method"), "svd_oversample": ("svd", "oversample"), "svd_power_iters": ("svd", "power_iters"),
    "num_samples": ("estimation", "num_samples"), "estimator": ("estimation", "estimator"),
    "memory_budget": ("estimation", "memory_budget"), "power_iters": ("estimation", "power_iters"),
    "oversample": ("estimation", "oversample"), "estimate_device": ("estimation", "device"),
    "estimate_dropout": ("estimation", "dropout"), "estimate_weighting": ("estimation", "weighting"),
    "estimate_checkpointing": ("estimation", "checkpointing"),
    "loftq_iters": ("pissa", "loftq_iters"), "xs_init_std": ("lora_xs", "init_std"),
    "direction": ("lora_ga", "direction"), "ga_scale": ("lora_ga", "scale"), "stable_gamma": ("lora_ga", "stable_gamma"),
    "update": ("lora_sb", "update"), "lr": ("lora_sb", "lr"), "warmup_steps": ("lora_sb", "warmup_steps"),
    "eta": ("lora_sb", "eta"), "preserve_init": ("lora_sb", "preserve_init"),
}
CORE = ("method", "rank", "alpha", "targets", "use_rslora", "dropout", "modules_to_save", "adapter", "init", "seed",
        "adapter_dtype", "full_precision_checkpoint")


@dataclass(init=False)
class AdapterConfig:
    """Validated description of an adapter.

    Core: ``method`` (a key of ``METHODS``), ``rank`` r (default ``lorakit.defaults.RANK``),
    ``alpha`` α (default r), ``targets`` (a list of module-name suffixes, a regular expression
    matched against the full module name, or ``"all-linear"``), ``use_rslora`` (s = α/√r
    instead of α/r; default: the init's, on for lora-ga as in its paper), ``dropout`` on the
    adapter input, ``modules_to_save`` (modules trained fully, e.g. a classifier head; default
    the head of a sequence-classification model), ``seed`` for random initialisations,
    ``adapter_dtype``, the dtype the factors are stored and updated in (default: float32 on a
    bf16/fp16 base, else the base layer's; the low-rank matmuls run in the layer's compute dtype),
    ``adapter`` / ``init`` to override either half of the method, ``full_precision_checkpoint``: on a
    quantized base, the safetensors file or folder of the unquantized model it was quantized from;
    inits that read W (pissa, svd-fa, lora-xs, LoftQ) and the re-quantized residual W − s·B₀A₀ then use
    its full-precision weights (QPiSSA as in the PiSSA paper; ``lorakit.adapters.quantized``).

    Option groups (see the module doc): ``svd``, ``estimation``, ``pissa``, ``lora_xs``, ``lora_ga``,
    ``lora_sb``; ``AdapterConfig.options()`` lists every flat keyword.
    """

    method: str = "lora"
    rank: int = defaults.RANK
    alpha: float | None = None
    targets: str | list[str] = "all-linear"
    use_rslora: bool | None = None
    dropout: float = 0.0
    modules_to_save: list[str] | None = None
    adapter: str | None = None
    init: str | None = None
    seed: int = 0
    adapter_dtype: str | None = None
    full_precision_checkpoint: str | None = None
    svd: SVDOptions = field(default_factory=SVDOptions)
    estimation: EstimationOptions = field(default_factory=EstimationOptions)
    pissa: PiSSAOptions = field(default_factory=PiSSAOptions)
    lora_xs: XSOptions = field(default_factory=XSOptions)
    lora_ga: GAOptions = field(default_factory=GAOptions)
    lora_sb: SBOptions = field(default_factory=SBOptions)

    def __init__(self, **options: Any) -> None:
        groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
        for key, value in options.items():
            if key in GROUPS and (key not in FLAT or isinstance(value, (dict, GROUPS[key]))):  # 'svd': a group or svd.method
                if isinstance(value, GROUPS[key]):
                    value = dataclasses.asdict(value)
                if not isinstance(value, dict):
                    raise LorakitError(f"AdapterConfig option group {key!r} must be a mapping or {GROUPS[key].__name__}")
                unknown = [k for k in value if k not in {f.name for f in dataclasses.fields(GROUPS[key])}]
                if unknown:
                    valid = [f.name for f in dataclasses.fields(GROUPS[key])]
                    raise LorakitError(f"AdapterConfig has no option {key}.{unknown[0]}{suggest(unknown[0], valid)}; "
                                       f"{key} holds: {', '.join(valid)}")
                groups[key].update(value)
            elif key in FLAT:
                group, name = FLAT[key]
                groups[group][name] = value
            elif key in CORE:
                setattr(self, key, value)
            else:
                valid = self.options()
                raise LorakitError(f"AdapterConfig has no option {key!r}{suggest(key, valid)}; valid options: {', '.join(valid)}")
        for key in CORE:
            if key not in options:
                default = next(f for f in dataclasses.fields(self) if f.name == key)
                setattr(self, key, default.default)
        for name, cls in GROUPS.items():
            try:
                setattr(self, name, cls(**groups[name]))
            except TypeError as exc:
                raise LorakitError(f"AdapterConfig {name}: {exc}") from None
        self._validate()

    @staticmethod
    def options() -> list[str]:
        """Every keyword AdapterConfig accepts: core options, option groups and flat group options."""
        return [*CORE, *GROUPS, *FLAT]

    def _validate(self) -> None:
        if self.method not in METHODS:
            raise LorakitError(
                f"unknown method {self.method!r}{suggest(self.method, METHODS)}; valid: {', '.join(METHODS)}"
            )
        if self.adapter is not None and self.adapter not in ADAPTERS:
            raise LorakitError(f"unknown adapter {self.adapter!r}{suggest(self.adapter, ADAPTERS)}; valid: {', '.join(ADAPTERS)}")
        init = initialisation(self.init_method)
        if self.adapter_type not in init.structures:
            raise LorakitError(
                f"init {init.name!r} cannot initialise the {self.adapter_type!r} structure; "
                f"it works with: {', '.join(init.structures)}"
            )
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise LorakitError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < math.inf):
            raise LorakitError(f"alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or isinstance(self.dropout, bool) or not 0.0 <= self.dropout < 1.0:
            raise LorakitError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise LorakitError(f"seed must be an integer, got {self.seed!r}")
        self._validate_targets()
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise LorakitError(f"adapter_dtype={self.adapter_dtype!r} is not valid; choose None (float32 on a half-precision base, else the base layer's) or one of "
                               f"{', '.join(ADAPTER_DTYPES[1:])}")
        if isinstance(self.full_precision_checkpoint, os.PathLike):
            self.full_precision_checkpoint = os.fspath(self.full_precision_checkpoint)
        if self.full_precision_checkpoint is not None and (not isinstance(self.full_precision_checkpoint, str)
                                                           or not self.full_precision_checkpoint):
            raise LorakitError(f"full_precision_checkpoint must be the path of a safetensors file or folder, got "
                               f"{self.full_precision_checkpoint!r}")
        init.check(self)

    def _validate_targets(self) -> None:
        bad = "targets must be a non-empty list of module-name suffixes, a regex, or 'all-linear'"
        if isinstance(self.targets, (list, tuple)):
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise LorakitError(bad)
            self.targets = list(self.targets)
        elif not isinstance(self.targets, str) or not self.targets:
            raise LorakitError(bad)
        elif self.targets != "all-linear":
            try:
                re.compile(self.targets)
            except re.error as exc:
                raise LorakitError(f"target regex {self.targets!r} is not a valid regular expression ({exc}); "
                                   "give a regex, a list of name suffixes, or 'all-linear'") from None
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str):  # one name, not a sequence of letters
                self.modules_to_save = [self.modules_to_save]
            if not all(isinstance(m, str) and m for m in self.modules_to_save):
                raise LorakitError("modules_to_save must be a list of module names (or one name)")
            self.modules_to_save = list(self.modules_to_save)

    # -- resolved views -------------------------------------------------------------------
    @property
    def adapter_type(self) -> str:
        return self.adapter or METHODS[self.method][0]

    @property
    def init_method(self) -> str:
        return self.init or METHODS[self.method][1]

    @property
    def initialisation(self) -> Initialisation:
        """The initialisation's strategy object: its facts and ``initialise``."""
        return INITIALISATIONS[self.init_method]

    @property
    def rslora(self) -> bool:
        return bool(self.use_rslora) if self.use_rslora is not None else self.initialisation.rslora

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        """s = α/r, or α/√r under rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def needs_data(self) -> bool:
        return self.initialisation.data_driven

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The core options and the option groups this method reads (others keep their defaults)."""
        out: dict[str, Any] = {key: getattr(self, key) for key in CORE}
        for group in self.initialisation.option_groups:
            out[group] = dataclasses.asdict(getattr(self, group))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        """From ``to_dict``'s nested form or the flat keyword form (files written before the groups)."""
        return cls(**data)

    def replace(self, **changes: Any) -> "AdapterConfig":
        full = {key: getattr(self, key) for key in CORE}
        full.update({group: dataclasses.asdict(getattr(self, group)) for group in GROUPS})
        for key, value in changes.items():
            if key in FLAT:
                group, name = FLAT[key]
                full[group] = {**full[group], name: value}
            else:
                full[key] = value
        return type(self)(**full)


def config_keys() -> list[str]:
    """The flat keywords a recipe's ``adapter`` section accepts (the option groups too)."""
    return AdapterConfig.options()
