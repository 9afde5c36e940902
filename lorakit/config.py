"""AdapterConfig: what to adapt, with which structure, initialised how.

A *method* is a named preset pairing an adapter structure with an initialisation
(``svd-fa`` = the LoRA-FA structure + the PiSSA initialisation). ``adapter=`` and
``init=`` override either half, so any compatible initialisation composes with any
structure (e.g. ``method="dora", init="pissa"``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
from dataclasses import dataclass
from typing import Any

from lorakit.errors import LorakitError

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
# initialisation -> the structures it can initialise
INITS: dict[str, tuple[str, ...]] = {
    "lora": ("lora", "lora-fa", "dora"),
    "gaussian": ("lora", "lora-fa", "dora"),
    "pissa": ("lora", "lora-fa", "dora"),
    "lora-ga": ("lora", "lora-fa", "dora"),
    "lora-xs": ("xs",),
    "lora-sb": ("xs",),
}
DATA_DRIVEN_INITS = ("lora-ga", "lora-sb")
ADAPTER_DTYPES = (None, "float32", "float64", "bfloat16", "float16")

_CHOICES: dict[str, tuple[str, ...]] = {
    "svd": ("auto", "exact", "randomized"),
    "direction": ("ArB2r", "ArBr", "A2rBr"),
    "ga_scale": ("stable", "unit", "gd"),
    "update": ("sign", "gradient"),
    "estimator": ("auto", "exact", "sketch"),
}


def suggest(name: str, valid: list[str] | tuple[str, ...]) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


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


@dataclass
class AdapterConfig:
    """Validated description of an adapter.

    Core: ``method`` (a key of ``METHODS``), ``rank`` r, ``alpha`` α (default r),
    ``targets`` (a list of module-name suffixes, a regular expression matched against
    the full module name, or ``"all-linear"``), ``use_rslora`` (s = α/√r instead of
    α/r; default on for lora-ga as in its paper), ``dropout`` on the adapter input,
    ``modules_to_save`` (modules trained fully, e.g. a classifier head; defaults to the
    head of a sequence-classification model), ``seed`` for random initialisations,
    ``adapter_dtype`` (default: the base layer's; 'float32' keeps bf16 models' adapters in fp32).

    Initialisation options: ``svd`` / ``svd_oversample`` / ``svd_power_iters`` (the SVD
    of W for pissa, svd-fa, lora-xs), ``xs_init_std`` (σ of R for lora-xs; 0 = exact
    function preservation), lora-ga's ``direction``, ``ga_scale``, ``stable_gamma``,
    lora-sb's ``update``, ``lr``/``warmup_steps`` (η = lr / max(1, warmup_steps)) or
    ``eta`` directly, ``preserve_init``.

    Gradient estimation (lora-ga, lora-sb): ``num_samples``, ``estimator``,
    ``memory_budget`` (bytes or '2GB'), ``power_iters`` and ``oversample`` (sketch),
    ``estimate_device`` (where exact gradients accumulate, e.g. 'cpu'),
    ``estimate_dropout`` (keep dropout on while estimating).
    """

    method: str = "lora"
    rank: int = 8
    alpha: float | None = None
    targets: str | list[str] = "all-linear"
    use_rslora: bool | None = None
    dropout: float = 0.0
    modules_to_save: list[str] | None = None
    adapter: str | None = None
    init: str | None = None
    seed: int = 0
    adapter_dtype: str | None = None
    # SVD of the base weight (pissa, svd-fa, lora-xs)
    svd: str = "auto"
    svd_oversample: int = 16
    svd_power_iters: int = 4
    # lora-xs
    xs_init_std: float = 1e-5
    # lora-ga
    direction: str = "ArB2r"
    ga_scale: str = "stable"
    stable_gamma: float = 16.0
    # lora-sb
    update: str = "sign"
    lr: float | None = None
    warmup_steps: int = 0
    eta: float | None = None
    preserve_init: bool = False
    # gradient estimation
    num_samples: int = 64
    estimator: str = "auto"
    memory_budget: int | str | None = None
    power_iters: int = 1
    oversample: int = 16
    estimate_device: str | None = None
    estimate_dropout: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise LorakitError(
                f"unknown method {self.method!r}{suggest(self.method, METHODS)}; valid: {', '.join(METHODS)}"
            )
        if self.adapter is not None and self.adapter not in ADAPTERS:
            raise LorakitError(f"unknown adapter {self.adapter!r}{suggest(self.adapter, ADAPTERS)}; valid: {', '.join(ADAPTERS)}")
        if self.init is not None and self.init not in INITS:
            raise LorakitError(f"unknown init {self.init!r}{suggest(self.init, INITS)}; valid: {', '.join(INITS)}")
        if self.init_method not in INITS or self.adapter_type not in INITS[self.init_method]:
            raise LorakitError(
                f"init {self.init_method!r} cannot initialise the {self.adapter_type!r} structure; "
                f"it works with: {', '.join(INITS[self.init_method])}"
            )
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LorakitError(f"rank must be a positive integer, got {self.rank!r}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise LorakitError(f"alpha must be a positive number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LorakitError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, (list, tuple)):
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise LorakitError("targets must be a non-empty list of module-name suffixes, a regex, or 'all-linear'")
            self.targets = list(self.targets)
        elif not isinstance(self.targets, str) or not self.targets:
            raise LorakitError("targets must be a non-empty list of module-name suffixes, a regex, or 'all-linear'")
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        for key, valid in _CHOICES.items():
            value = getattr(self, key)
            if value not in valid:
                raise LorakitError(f"{key}={value!r} is not valid{suggest(str(value), valid)}; choose one of {', '.join(valid)}")
        for key in ("svd_power_iters", "power_iters", "warmup_steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise LorakitError(f"{key} must be a non-negative integer, got {getattr(self, key)!r}")
        for key in ("svd_oversample", "oversample"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 8:
                raise LorakitError(f"{key} must be an integer >= 8 (randomized SVD needs oversampling), got {getattr(self, key)!r}")
        if not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise LorakitError(f"num_samples must be a positive integer, got {self.num_samples!r}")
        if self.xs_init_std < 0 or self.stable_gamma <= 0:
            raise LorakitError("xs_init_std must be >= 0 and stable_gamma > 0")
        for key in ("lr", "eta"):
            if getattr(self, key) is not None and not getattr(self, key) > 0:
                raise LorakitError(f"{key} must be positive, got {getattr(self, key)!r}")
        parse_bytes(self.memory_budget)
        if self.adapter_dtype not in ADAPTER_DTYPES:
            raise LorakitError(f"adapter_dtype={self.adapter_dtype!r} is not valid; choose None (the base layer's) or one of {', '.join(ADAPTER_DTYPES[1:])}")
        if self.estimator == "sketch" and self.init_method == "lora-sb" and self.update == "sign":
            raise LorakitError(
                "lora-sb's update='sign' needs the exact gradient; use estimator='exact' (with memory_budget "
                "to bound memory) or update='gradient' with the sketch"
            )

    # -- resolved views -------------------------------------------------------------------
    @property
    def adapter_type(self) -> str:
        return self.adapter or METHODS[self.method][0]

    @property
    def init_method(self) -> str:
        return self.init or METHODS[self.method][1]

    @property
    def rslora(self) -> bool:
        if self.use_rslora is not None:
            return bool(self.use_rslora)
        return self.init_method == "lora-ga"

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        """s = α/r, or α/√r under rsLoRA."""
        return self.lora_alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def needs_data(self) -> bool:
        return self.init_method in DATA_DRIVEN_INITS

    @property
    def memory_budget_bytes(self) -> int | None:
        return parse_bytes(self.memory_budget)

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "AdapterConfig":
        return cls(**data)

    def replace(self, **changes: Any) -> "AdapterConfig":
        return type(self)(**{**self.to_dict(), **changes})


def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(AdapterConfig) if not f.name.startswith("_")]


def _checked_init(init):
    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        valid = config_keys()
        for key in kwargs:
            if key not in valid:
                raise LorakitError(f"AdapterConfig has no option {key!r}{suggest(key, valid)}; valid options: {', '.join(valid)}")
        init(self, *args, **kwargs)

    return __init__


AdapterConfig.__init__ = _checked_init(AdapterConfig.__init__)  # type: ignore[method-assign]
