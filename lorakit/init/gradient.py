"""Initialisations from gradient statistics (``lorakit.estimate``): lora-ga and lora-sb."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from lorakit import defaults
from lorakit.adapters import LowRankAdapter
from lorakit.errors import LorakitError
from lorakit.init import Initialisation, register, set_factor, suggest
from lorakit.linalg import TopSVD, compute_dtype, top_svd

logger = logging.getLogger("lorakit")


def _choice(group: str, key: str, value, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise LorakitError(f"{group}.{key}={value!r} is not valid{suggest(str(value), valid)}; choose one of {', '.join(valid)}")


def _layer_stats(adapter: LowRankAdapter, stats, method: str):
    if stats is None:
        raise LorakitError(f"{method} initialises from gradient statistics: pass data= to lorakit.adapt (or stats=)")
    shape = (adapter.out_features, adapter.in_features)
    if tuple(stats.shape) != shape:
        raise LorakitError(
            f"the gradient statistics are for a {stats.shape[0]} × {stats.shape[1]} layer but the adapted layer is "
            f"{shape[0]} × {shape[1]}; re-run lorakit.estimate on this model"
        )
    return stats


def _svd_of(M: Tensor, k: int, config, generator: torch.Generator) -> TopSVD:
    svd = config.svd
    return top_svd(M, k, svd.method, svd.oversample, svd.power_iters, generator)


def _top_svd_of_gradient(layer, k: int, config, generator: torch.Generator) -> TopSVD:
    if layer.grad is None:  # a sketch: its SVD is already done
        return layer.top_svd(k)
    return _svd_of(layer.grad, k, config, generator)


# -- LoRA-GA ----------------------------------------------------------------------------------------
DIRECTIONS = ("ArB2r", "ArBr", "A2rBr")
GA_SCALES = ("stable", "unit", "gd")


@dataclass
class GAOptions:
    """lora-ga: ``direction`` (which singular directions go to A and B), ``scale`` ('stable': ζ =
    out^¼/√γ; 'unit'; 'gd': 1/s) and ``stable_gamma`` γ. Flat names: direction, ga_scale, stable_gamma."""

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: float = 16.0

    def __post_init__(self) -> None:
        _choice("lora_ga", "direction", self.direction, DIRECTIONS)
        _choice("lora_ga", "scale", self.scale, GA_SCALES)
        if not isinstance(self.stable_gamma, (int, float)) or not self.stable_gamma > 0:
            raise LorakitError(f"lora_ga.stable_gamma must be > 0, got {self.stable_gamma!r}")


def ga_factors(svd: TopSVD, rank: int, direction: str) -> tuple[Tensor, Tensor]:
    """(A: r × in, B: out × r) from the top 2r triplets of G, per LoRA-GA's ``direction``."""
    U, V = svd.U, svd.V
    if direction == "ArB2r":
        return V[:, :rank].T, U[:, rank : 2 * rank]
    if direction == "A2rBr":
        return V[:, rank : 2 * rank].T, U[:, :rank]
    if direction == "ArBr":  # interleaved: B from the even directions, A from the odd ones
        return V[:, 1 : 2 * rank : 2].T, U[:, 0 : 2 * rank : 2]
    raise LorakitError(f"unknown lora-ga direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")


def ga_scale_factor(options: GAOptions, out_features: int, scale: float) -> float:
    """The factor applied to both A and B: ζ = out^¼/√γ (stable), 1 (unit) or 1/s (gd)."""
    if options.scale == "stable":
        return out_features**0.25 / options.stable_gamma**0.5
    if options.scale == "gd":
        return 1.0 / scale
    return 1.0


@register
class LoRAGAInit(Initialisation):
    """LoRA-GA (Wang et al., 2024, arXiv 2407.05000): G ≈ U Σ Vᵀ (top 2r);
    ArB2r: A = V[:, :r]ᵀ, B = U[:, r:2r] (or ArBr / A2rBr), both times ζ (see ``ga_scale_factor``);
    base W − s·BA in float32+ from the cast factors, so the function is unchanged at init.
    rsLoRA scaling by default, as in the paper."""

    name = "lora-ga"
    structures = ("lora", "lora-fa", "dora")
    data_driven = True
    changes_base = True
    rslora = True
    option_groups = ("svd", "estimation", "lora_ga")
    training_lr = 1e-4  # the paper trains at full fine-tuning's rates: its first step matches full FT's

    def directions(self, config) -> int:
        return 2 * config.rank

    def compact(self, config, generator: torch.Generator, stats):
        k = self.directions(config)  # the top 2r triplets of G are all it uses
        return dataclasses.replace(stats, grad=None, svd=_top_svd_of_gradient(stats, k, config, generator), rank=k)

    def initialise(self, adapter: LowRankAdapter, config, generator: torch.Generator, stats=None) -> None:
        layer = _layer_stats(adapter, stats, self.name)
        svd = _top_svd_of_gradient(layer, 2 * adapter.rank, config, generator)
        A, B = ga_factors(svd, adapter.rank, config.lora_ga.direction)
        zeta = ga_scale_factor(config.lora_ga, adapter.out_features, adapter.scale)
        set_factor(adapter.A, A * zeta)
        set_factor(adapter.B, B * zeta)
        adapter.set_base_offset(adapter.B, adapter.A)


# -- LoRA-SB ----------------------------------------------------------------------------------------
UPDATES = ("sign", "gradient")


@dataclass
class SBOptions:
    """lora-sb: the approximated first update ΔW₁ = −η·sign(G) (``update='sign'``, Adam's first
    step) or −η·G ('gradient'); η = ``eta``, else ``lr`` / max(1, ``warmup_steps``) (lr defaults
    to ``lorakit.defaults.LR``); ``preserve_init`` subtracts trunc_r(ΔW₁) from the base instead
    of starting from W + trunc_r(ΔW₁). Flat names: update, lr, warmup_steps, eta, preserve_init."""

    update: str = "sign"
    lr: float | None = None
    warmup_steps: int = 0
    eta: float | None = None
    preserve_init: bool = False

    def __post_init__(self) -> None:
        _choice("lora_sb", "update", self.update, UPDATES)
        for key in ("lr", "eta"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and 0 < value < float("inf")):
                raise LorakitError(f"lora_sb.{key} ({key}) must be a positive finite number, got {value!r}")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 0:
            raise LorakitError(f"lora_sb.warmup_steps (warmup_steps) must be a non-negative integer, got {self.warmup_steps!r}")


@functools.lru_cache(maxsize=None)
def _announce_default_lr(warmup_steps: int) -> None:
    logger.warning(
        "lorakit: lora-sb's first-step size η defaults to lr=%g / max(1, warmup_steps=%d); set lr= (your training "
        "learning rate) and warmup_steps=, or eta=, in AdapterConfig",
        defaults.LR,
        warmup_steps,
    )


def first_step_size(options: SBOptions) -> float:
    """η of the approximated first update: ``eta``, else lr / max(1, warmup_steps) (lr defaults to defaults.LR)."""
    if options.eta is not None:
        return float(options.eta)
    if options.lr is None:
        _announce_default_lr(options.warmup_steps)
    lr = defaults.LR if options.lr is None else options.lr
    return float(lr) / max(1, options.warmup_steps)


def first_update_svd(layer, config, rank: int, generator: torch.Generator) -> TopSVD:
    """SVD_r(ΔW₁) with ΔW₁ = −η·sign(G) (update='sign') or −η·G (update='gradient')."""
    if layer.of == "first-update":  # compacted by LoRASBInit.compact
        return layer.top_svd(rank)
    eta = first_step_size(config.lora_sb)
    if config.lora_sb.update == "sign":
        G = layer.gradient()
        return _svd_of(-eta * torch.sign(G.to(compute_dtype(G.dtype))), rank, config, generator)
    U, S, V = _top_svd_of_gradient(layer, rank, config, generator)
    return TopSVD(U, eta * S, -V)  # −ηG = U (ηΣ) (−V)ᵀ


@register
class LoRASBInit(Initialisation):
    """LoRA-SB (Ponkshe et al., 2024, arXiv 2411.19557): SVD_r(ΔW₁) = U Σ Vᵀ, B = U, A = Vᵀ
    (frozen), R = Σ/s (trains), so s·B·R·A = trunc_r(ΔW₁) and training starts from
    W + trunc_r(ΔW₁). With ``preserve_init`` the base becomes W − s·B·R₀·A instead (offset
    stored as B₀ = B, A₀ = R₀·A, so export stays rank r)."""

    name = "lora-sb"
    structures = ("xs",)
    data_driven = True
    uses_training_lr = True
    option_groups = ("svd", "estimation", "lora_sb")
    training_lr = 1e-2  # the LoRA-XS structure: only the r × r core R trains

    def moves_base(self, config) -> bool:
        return config.lora_sb.preserve_init

    def needs_exact_gradient(self, config) -> bool:
        return config.lora_sb.update == "sign"  # sign(G) needs G itself

    def check(self, config) -> None:
        if config.estimation.estimator == "sketch" and self.needs_exact_gradient(config):
            raise LorakitError(
                "lora-sb's update='sign' needs the exact gradient; use estimator='exact' (with memory_budget "
                "to bound memory) or update='gradient' with the sketch"
            )

    def compact(self, config, generator: torch.Generator, stats):
        # SVD_r(ΔW₁) is all it uses (for update='sign' not a function of G's own top triplets)
        svd = first_update_svd(stats, config, config.rank, generator)
        return dataclasses.replace(stats, grad=None, svd=svd, rank=config.rank, of="first-update")

    def initialise(self, adapter: LowRankAdapter, config, generator: torch.Generator, stats=None) -> None:
        layer = _layer_stats(adapter, stats, self.name)
        U, S, V = first_update_svd(layer, config, adapter.rank, generator)
        set_factor(adapter.B, U)
        set_factor(adapter.A, V.T)
        set_factor(adapter.R, torch.diag(S / adapter.scale))
        if config.lora_sb.preserve_init:
            cdtype = compute_dtype(adapter.R.dtype)
            adapter.set_base_offset(adapter.B, adapter.R.detach().to(cdtype) @ adapter.A.detach().to(cdtype))
