"""Initialisations that need no data: lora, gaussian, pissa (also svd-fa), lora-xs."""

from __future__ import annotations

import math

import torch

from lorakit.adapters import LowRankAdapter
from lorakit.init import register, set_factor
from lorakit.linalg import top_svd



@register("lora")
def init_lora(adapter: LowRankAdapter, config, generator: torch.Generator, stats=None) -> None:
    """A ~ Kaiming-uniform(a = √5) (nn.Linear's default), B = 0: ΔW = 0 at init."""
    A = torch.empty(adapter.A.shape, dtype=torch.float32)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
    set_factor(adapter.A, A)
    set_factor(adapter.B, torch.zeros(adapter.B.shape))


@register("gaussian")
def init_gaussian(adapter: LowRankAdapter, config, generator: torch.Generator, stats=None) -> None:
    """A ~ N(0, 1/r) (variance 1/r; PEFT's 'gaussian' uses standard deviation 1/r), B = 0."""
    set_factor(adapter.A, torch.randn(adapter.A.shape, generator=generator) / math.sqrt(adapter.rank))
    set_factor(adapter.B, torch.zeros(adapter.B.shape))


def svd_of_base(adapter: LowRankAdapter, config, generator: torch.Generator):
    return top_svd(
        adapter.base_weight,
        adapter.rank,
        method=config.svd,
        oversample=config.svd_oversample,
        power_iters=config.svd_power_iters,
        generator=generator,
    )


@register("pissa")
def init_pissa(adapter: LowRankAdapter, config, generator: torch.Generator, stats=None) -> None:
    """PiSSA (Meng et al., 2024, arXiv 2404.02948): SVD_r(W) = UΣVᵀ, B = U√(Σ/s), A = √(Σ/s)Vᵀ,
    base W − s·BA (computed in float32+ from the cast factors): the function is unchanged."""
    U, S, V = svd_of_base(adapter, config, generator)
    root = torch.sqrt(S / adapter.scale)
    set_factor(adapter.B, U * root)
    set_factor(adapter.A, root[:, None] * V.T)
    adapter.set_base_offset(adapter.B, adapter.A)


@register("lora-xs")
def init_lora_xs(adapter: LowRankAdapter, config, generator: torch.Generator, stats=None) -> None:
    """LoRA-XS: SVD_r(W) = UΣVᵀ, B = U, A = ΣVᵀ (both frozen), R ~ N(0, σ²) with σ = xs_init_std."""
    U, S, V = svd_of_base(adapter, config, generator)
    set_factor(adapter.B, U)
    set_factor(adapter.A, S[:, None] * V.T)
    set_factor(adapter.R, torch.randn(adapter.R.shape, generator=generator, dtype=torch.float64) * config.xs_init_std)
