"""Initialisations that need no data: lora, gaussian, pissa (also svd-fa), lora-xs."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lorakit.adapters import LowRankAdapter
from lorakit.init import Initialisation, register, set_factor
from lorakit.adapters.quantized import relative_error
from lorakit.errors import LorakitError
from lorakit.linalg import TopSVD, top_svd

logger = logging.getLogger("lorakit")

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
    """SVD_r of the adapter's base weight (a quantized base's full-precision W when its checkpoint is supplied),
    by ``config.svd``'s options."""
    svd = config.svd
    return top_svd(adapter.original_weight, adapter.rank, method=svd.method, oversample=svd.oversample,
                   power_iters=svd.power_iters, generator=generator)


@dataclass
class PiSSAOptions:
    """pissa / svd-fa: ``loftq_iters`` rounds of LoftQ's alternation on a quantized base (0: QPiSSA as is).
    Flat name: loftq_iters."""

    loftq_iters: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.loftq_iters, int) or isinstance(self.loftq_iters, bool) or self.loftq_iters < 0:
            raise LorakitError(f"pissa.loftq_iters (loftq_iters) must be a non-negative integer, got {self.loftq_iters!r}")


def pissa_factors(svd: TopSVD, scale: float) -> tuple[Tensor, Tensor]:
    """(B, A) = (U√(Σ/s), √(Σ/s)Vᵀ): s·BA = U Σ Vᵀ."""
    U, S, V = svd
    root = torch.sqrt(S / scale)
    return U * root, root[:, None] * V.T


def loftq(adapter: LowRankAdapter, config, generator: torch.Generator, B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """LoftQ's alternation (Li et al., 2023, arXiv 2310.08659) from PiSSA's (B, A), on the dequantized W of a
    quantized base (the full-precision W when its checkpoint is supplied): ``loftq_iters`` times,
    Q = Q(W − s·BA) by the layer's backend, then (B, A) from SVD_r(W − Q). Returns the iterate (the start
    included) whose new base is nearest its target, i.e. with the least ‖W − s·BA − Q(W − s·BA)‖ / ‖W‖, so
    the iterations never increase the error."""
    W = adapter.original_weight.float()
    layer, backend, s = adapter.base_layer, adapter.backend, adapter.scale
    best, errors = None, []
    for step in range(config.pissa.loftq_iters + 1):
        target = W - s * (B @ A)
        Q = backend.roundtrip(layer, target)
        errors.append(relative_error(target, Q, W))
        if best is None or errors[-1] < best[0]:
            best = (errors[-1], B, A)
        if step == config.pissa.loftq_iters:
            break
        svd = config.svd
        B, A = pissa_factors(top_svd(W - Q, adapter.rank, method=svd.method, oversample=svd.oversample,
                                     power_iters=svd.power_iters, generator=generator), s)
    logger.debug("lorakit: loftq errors %s", ", ".join(f"{e:.5f}" for e in errors))
    return best[1], best[2]


@register
class PiSSAInit(Initialisation):
    """PiSSA (Meng et al., 2024, arXiv 2404.02948): SVD_r(W) = UΣVᵀ, B = U√(Σ/s), A = √(Σ/s)Vᵀ,
    base W − s·BA (computed in float32+ from the cast factors): the function is unchanged.
    On a quantized base (QPiSSA) the base becomes Q(W − s·BA) (``lorakit.adapters.quantized``);
    ``pissa.loftq_iters`` > 0 refines (B, A) by LoftQ's alternation (``loftq``) first."""

    name = "pissa"
    structures = ZERO_B
    changes_base = True
    option_groups = ("svd", "pissa")

    def initialise(self, adapter: LowRankAdapter, config, generator: torch.Generator, stats=None) -> None:
        B, A = pissa_factors(svd_of_base(adapter, config, generator), adapter.scale)
        if adapter.backend is not None and config.pissa.loftq_iters:
            B, A = loftq(adapter, config, generator, B, A)
        set_factor(adapter.B, B)
        set_factor(adapter.A, A)
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
