"""Initialisations from gradient statistics (``lorakit.estimate``): lora-ga and lora-sb."""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor

from lorakit.adapters import LowRankAdapter
from lorakit.errors import LorakitError
from lorakit.init import register, set_factor
from lorakit.linalg import TopSVD, compute_dtype, top_svd

logger = logging.getLogger("lorakit")

# η when neither eta nor lr is configured: the training recipe's default learning rate
# (lorakit.recipes OptimSection.lr), which the recipe passes as lr= anyway.
DEFAULT_LR = 1e-3



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
    return top_svd(M, k, config.svd, config.svd_oversample, config.svd_power_iters, generator)


def _top_svd_of_gradient(layer, k: int, config, generator: torch.Generator) -> TopSVD:
    if layer.grad is None:  # a sketch: its SVD is already done
        return layer.top_svd(k)
    return _svd_of(layer.grad, k, config, generator)


def ga_factors(svd: TopSVD, rank: int, direction: str) -> tuple[Tensor, Tensor]:
    """(A: r × in, B: out × r) from the top 2r triplets of G, per LoRA-GA's ``direction``."""
    U, V = svd.U, svd.V
    if direction == "ArB2r":
        return V[:, :rank].T, U[:, rank : 2 * rank]
    if direction == "A2rBr":
        return V[:, rank : 2 * rank].T, U[:, :rank]
    if direction == "ArBr":  # interleaved: B from the even directions, A from the odd ones
        return V[:, 1 : 2 * rank : 2].T, U[:, 0 : 2 * rank : 2]
    raise LorakitError(f"unknown lora-ga direction {direction!r}; choose ArB2r, ArBr or A2rBr")


def ga_scale_factor(config, out_features: int, scale: float) -> float:
    """The factor applied to both A and B: ζ = out^¼/√γ (stable), 1 (unit) or 1/s (gd)."""
    if config.ga_scale == "stable":
        return out_features**0.25 / config.stable_gamma**0.5
    if config.ga_scale == "gd":
        return 1.0 / scale
    return 1.0


@register("lora-ga")
def init_lora_ga(adapter: LowRankAdapter, config, generator: torch.Generator, stats=None) -> None:
    """LoRA-GA (Wang et al., 2024, arXiv 2407.05000): G ≈ U Σ Vᵀ (top 2r);
    ArB2r: A = V[:, :r]ᵀ, B = U[:, r:2r] (or ArBr / A2rBr), both times ζ (see ``ga_scale_factor``);
    base W − s·BA in float32+ from the cast factors, so the function is unchanged at init."""
    layer = _layer_stats(adapter, stats, "lora-ga")
    svd = _top_svd_of_gradient(layer, 2 * adapter.rank, config, generator)
    A, B = ga_factors(svd, adapter.rank, config.direction)
    zeta = ga_scale_factor(config, adapter.out_features, adapter.scale)
    set_factor(adapter.A, A * zeta)
    set_factor(adapter.B, B * zeta)
    adapter.set_base_offset(adapter.B, adapter.A)


@functools.lru_cache(maxsize=None)
def _announce_default_lr(warmup_steps: int) -> None:
    logger.warning(
        "lorakit: lora-sb's first-step size η defaults to lr=%g / max(1, warmup_steps=%d); set lr= (your training "
        "learning rate) and warmup_steps=, or eta=, in AdapterConfig",
        DEFAULT_LR,
        warmup_steps,
    )


def first_step_size(config) -> float:
    """η of the approximated first update: ``eta``, else lr / max(1, warmup_steps) (lr defaults to DEFAULT_LR)."""
    if config.eta is not None:
        return float(config.eta)
    if config.lr is None:
        _announce_default_lr(config.warmup_steps)
    lr = DEFAULT_LR if config.lr is None else config.lr
    return float(lr) / max(1, config.warmup_steps)


def first_update_svd(layer, config, rank: int, generator: torch.Generator) -> TopSVD:
    """SVD_r(ΔW₁) with ΔW₁ = −η·sign(G) (update='sign') or −η·G (update='gradient')."""
    eta = first_step_size(config)
    if config.update == "sign":
        G = layer.gradient()
        return _svd_of(-eta * torch.sign(G.to(compute_dtype(G.dtype))), rank, config, generator)
    U, S, V = _top_svd_of_gradient(layer, rank, config, generator)
    return TopSVD(U, eta * S, -V)  # −ηG = U (ηΣ) (−V)ᵀ


@register("lora-sb")
def init_lora_sb(adapter: LowRankAdapter, config, generator: torch.Generator, stats=None) -> None:
    """LoRA-SB (Ponkshe et al., 2024, arXiv 2411.19557): SVD_r(ΔW₁) = U Σ Vᵀ, B = U, A = Vᵀ
    (frozen), R = Σ/s (trains), so s·B·R·A = trunc_r(ΔW₁) and training starts from
    W + trunc_r(ΔW₁). With ``preserve_init`` the base becomes W − s·B·R₀·A instead (offset
    stored as B₀ = B, A₀ = R₀·A, so export stays rank r)."""
    layer = _layer_stats(adapter, stats, "lora-sb")
    U, S, V = first_update_svd(layer, config, adapter.rank, generator)
    set_factor(adapter.B, U)
    set_factor(adapter.A, V.T)
    set_factor(adapter.R, torch.diag(S / adapter.scale))
    if config.preserve_init:
        cdtype = compute_dtype(adapter.R.dtype)
        adapter.set_base_offset(adapter.B, adapter.R.detach().to(cdtype) @ adapter.A.detach().to(cdtype))
