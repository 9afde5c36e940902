"""Initialisations that need no data: lora, gaussian, pissa (also svd-fa), lora-xs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorakit.adapters import LowRankAdapter
from lorakit.init import Initialisation, register, set_factor
from lorakit.linalg import TopSVD, top_svd

ZERO_B = ("lora", "lora-fa", "dora")  # the structures with a B factor that starts at 0


@register
class LoRAInit(Initialisation):
    """A ~ Kaiming-uniform(a = √5) (nn.Linear's default), B = 0: ΔW = 0 at init (Hu et al., 2021)."""

    name = "lora"
    structures = ZERO_B

    def initialise(self, adapter: LowRankAdapter, config, generator: torch.Generator, stats=None) -> None:
        A = torch.empty(adapter.A.shape, dtype=torch.float32)
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        set_factor(adapter.A, A)
        set_factor(adapter.B, torch.zeros(adapter.B.shape))


@register
class GaussianInit(Initialisation):
    """A ~ N(0, 1/r) (variance 1/r; PEFT's 'gaussian' uses standard deviation 1/r), B = 0."""

    name = "gaussian"
    structures = ZERO_B

    def initialise(self, adapter: LowRankAdapter, config, generator: torch.Generator, stats=None) -> None:
        set_factor(adapter.A, torch.randn(adapter.A.shape, generator=generator) / math.sqrt(adapter.rank))
        set_factor(adapter.B, torch.zeros(adapter.B.shape))


def svd_of_base(adapter: LowRankAdapter, config, generator: torch.Generator) -> TopSVD:
    """SVD_r of the adapter's base weight, by ``config.svd``'s options."""
    svd = config.svd
    return top_svd(adapter.base_weight, adapter.rank, method=svd.method, oversample=svd.oversample,
                   power_iters=svd.power_iters, generator=generator)


@register
class PiSSAInit(Initialisation):
    """PiSSA (Meng et al., 2024, arXiv 2404.02948): SVD_r(W) = UΣVᵀ, B = U√(Σ/s), A = √(Σ/s)Vᵀ,
    base W − s·BA (computed in float32+ from the cast factors): the function is unchanged."""

    name = "pissa"
    structures = ZERO_B
    changes_base = True
    on_quantized = ("use method 'lora' (or 'lora-xs', an SVD init that keeps W; 'lora-fa' for svd-fa), "
                    "or load the base unquantized")
    option_groups = ("svd",)

    def initialise(self, adapter: LowRankAdapter, config, generator: torch.Generator, stats=None) -> None:
        U, S, V = svd_of_base(adapter, config, generator)
        root = torch.sqrt(S / adapter.scale)
        set_factor(adapter.B, U * root)
        set_factor(adapter.A, root[:, None] * V.T)
        adapter.set_base_offset(adapter.B, adapter.A)


@dataclass
class XSOptions:
    """lora-xs: ``init_std`` σ of R (0 = exact function preservation; the paper's 1e-5 otherwise)."""

    init_std: float = 1e-5

    def __post_init__(self) -> None:
        if not isinstance(self.init_std, (int, float)) or not self.init_std >= 0:
            from lorakit.errors import LorakitError

            raise LorakitError(f"lora_xs.init_std (xs_init_std) must be >= 0, got {self.init_std!r}")


@register
class LoRAXSInit(Initialisation):
    """LoRA-XS (Bałazy et al., 2024, arXiv 2405.17604): SVD_r(W) = UΣVᵀ, B = U, A = ΣVᵀ (both
    frozen), R ~ N(0, σ²) with σ = ``lora_xs.init_std``; the base is unchanged."""

    name = "lora-xs"
    structures = ("xs",)
    option_groups = ("svd", "lora_xs")
    training_lr = 1e-2  # only the r × r core R trains: it takes a larger step

    def initialise(self, adapter: LowRankAdapter, config, generator: torch.Generator, stats=None) -> None:
        U, S, V = svd_of_base(adapter, config, generator)
        set_factor(adapter.B, U)
        set_factor(adapter.A, S[:, None] * V.T)
        set_factor(adapter.R, torch.randn(adapter.R.shape, generator=generator, dtype=torch.float64) * config.lora_xs.init_std)
