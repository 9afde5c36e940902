"""What estimation hands to the initialisers: per layer, G itself or its top singular triplets."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from lorakit.errors import LorakitError
from lorakit.linalg import TopSVD, compute_dtype, top_svd


@dataclass
class LayerStats:
    """Gradient statistics of one target layer (W: out × in).

    ``grad``: G = ∂L/∂W (out × in, float32+) from the exact estimators; or
    ``svd``: G ≈ U diag(S) Vᵀ from the sketch (U: out × l, S: l, V: in × l), of which the
    first ``rank`` triplets are the ones the sketch was sized for (l = rank + oversampling).
    ``of``: the matrix ``svd`` decomposes — ``"gradient"`` (G), or ``"first-update"`` (lora-sb's
    ΔW₁, when ``lorakit.adapt`` compacts G as soon as its layer group is estimated; see
    ``Initialisation.compact``).
    """

    grad: Tensor | None = None
    svd: TopSVD | None = None
    rank: int = 0
    of: str = "gradient"

    @property
    def kind(self) -> str:
        return "exact" if self.grad is not None else "sketch"

    @property
    def shape(self) -> tuple[int, int]:
        if self.grad is not None:
            return tuple(self.grad.shape)  # type: ignore[return-value]
        return (self.svd.U.shape[0], self.svd.V.shape[0])

    def gradient(self) -> Tensor:
        """G itself (exact estimators only)."""
        if self.of != "gradient":
            raise LorakitError(f"these statistics hold the top singular triplets of {self.of!r}, not G; re-estimate")
        if self.grad is None:
            raise LorakitError(
                "these statistics come from the sketch estimator and hold no full gradient; re-estimate with "
                "estimator='exact' (memory_budget= bounds its memory)"
            )
        return self.grad

    def top_svd(
        self,
        k: int,
        method: str = "auto",
        oversample: int = 16,
        power_iters: int = 4,
        generator: torch.Generator | None = None,
    ) -> TopSVD:
        """Top-k singular triplets in float32+ (of G from G, or the first k of the sketch or compacted form)."""
        if self.grad is not None:
            return top_svd(self.grad, k, method, oversample, power_iters, generator)
        if k > self.rank:
            raise LorakitError(
                f"the sketch was sized for {self.rank} singular directions but {k} are needed; re-estimate with "
                "this config (lora-ga needs 2·rank, lora-sb rank)"
            )
        U, S, V = self.svd
        dtype = compute_dtype(U.dtype)
        return TopSVD(U[:, :k].to(dtype), S[:k].to(dtype), V[:, :k].to(dtype))


@dataclass
class EstimationReport:
    """What an estimation did: estimator, examples used (over all ranks), passes over the data."""

    estimator: str
    samples: int
    passes: int
    layers: int
    groups: int = 1
    world_size: int = 1
    seconds: float = 0.0
    rank: int = 0  # singular directions the sketch was sized for (0 for exact)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        detail = f", {self.groups} layer groups" if self.groups > 1 else ""
        ranks = f" on {self.world_size} ranks" if self.world_size > 1 else ""
        return (
            f"estimated gradients of {self.layers} layers from {self.samples} examples{ranks} with the "
            f"{self.estimator} estimator in {self.passes} passes{detail} ({self.seconds:.1f} s)"
        )


class GradientStatistics(dict):
    """Layer name -> LayerStats, with the ``report`` of the estimation that made them."""

    def __init__(self, *args, report: EstimationReport | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.report = report

    def __repr__(self) -> str:
        return f"GradientStatistics({len(self)} layers; {self.report})"

