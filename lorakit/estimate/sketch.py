"""Randomized SVD of G without forming G (Halko, Martinsson & Tropp, 2011, alg. 4.4).

G = Σ_tokens δᵀ x is never built: its products with thin matrices are sums over batches,

    G · M  = Σ δᵀ (x M)      (M: in × l)     Gᵀ · M = Σ xᵀ (δ M)      (M: out × l)

so each pass over the kept examples yields one product, and a layer costs O((out + in)·l)
memory with l = k + oversample. Passes (2q + 2):
    1.            Y = G Ω,   Q = orth(Y)         (Ω Gaussian, seeded per layer: the same on every rank)
    2..2q+1:      P = orth(Gᵀ Q),  Q = orth(G P)  (q power iterations, two passes each)
    2q+2:         Z = Gᵀ Q  →  SVD(Zᵀ) = Ũ Σ Vᵀ,  U = Q Ũ
Single-pass sketches capture only ~0.8 of the optimal rank-8 energy on real, flat gradient
spectra (SPEC.md); q ≥ 1 is the default.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from lorakit.estimate.exact import layer_shape
from lorakit.estimate.hooks import as_rows
from lorakit.linalg import TopSVD, compute_dtype, gaussian, layer_generator, one_thread_for, orthonormal_basis, svd_of_projection


class ProductAccumulator:
    """Σ_batches of G·M ("right": δᵀ(x M), out × l) or Gᵀ·M ("left": xᵀ(δ M), in × l)."""

    def __init__(self, M: Tensor, side: str, rows: int) -> None:
        self.M, self.side = M, side
        self.P = torch.zeros(rows, M.shape[1], dtype=M.dtype, device=M.device)

    def add(self, x: Tensor, delta: Tensor) -> None:
        x2, d2 = as_rows(x, delta, self.M.dtype, self.M.device)
        if self.side == "right":
            self.P.addmm_(d2.T, x2 @ self.M)
        else:
            self.P.addmm_(x2.T, d2 @ self.M)

    def tensors(self) -> list[Tensor]:
        return [self.P]


# Runs one pass over the data feeding these accumulators; returns them finished (summed over ranks, averaged).
RunPass = Callable[[dict[str, ProductAccumulator]], None]


def sketch_width(layer: nn.Module, k: int, oversample: int) -> int:
    return min(k + oversample, *layer_shape(layer))


def sketch_bytes(layer: nn.Module, k: int, oversample: int) -> int:
    """Peak bytes of one layer's sketch: two thin matrices, (out + in) × l, in float32+."""
    element = torch.empty((), dtype=compute_dtype(layer.weight.dtype)).element_size()
    return 2 * sum(layer_shape(layer)) * sketch_width(layer, k, oversample) * element


def sketch_svd(
    layers: dict[str, nn.Module], k: int, oversample: int, power_iters: int, seed: int, run_pass: RunPass
) -> dict[str, TopSVD]:
    """Top-l singular triplets (l = min(k + oversample, out, in)) of every layer's G, in 2q + 2 passes.

    At most two thin matrices per layer are alive (the pass's test basis and its product),
    plus one layer's transient while it is orthonormalised.
    """
    shapes = {n: layer_shape(m) for n, m in layers.items()}
    basis: dict[str, Tensor] = {}
    for name, layer in layers.items():
        like = torch.empty(0, dtype=compute_dtype(layer.weight.dtype), device=layer.weight.device)
        width = sketch_width(layer, k, oversample)
        basis[name] = gaussian((shapes[name][1], width), layer_generator(seed, "sketch:" + name), like)
    sides = ["right"] + ["left", "right"] * power_iters + ["left"]
    result: dict[str, TopSVD] = {}
    for step, side in enumerate(sides):
        rows = 0 if side == "right" else 1
        accs = {n: ProductAccumulator(basis.pop(n), side, shapes[n][rows]) for n in layers}
        run_pass(accs)
        for name in layers:
            acc = accs.pop(name)
            if step < len(sides) - 1:
                basis[name] = _orth(acc.P)  # Q = orth(G·P) or P = orth(Gᵀ·Q)
            else:  # acc.M is Q, acc.P is Gᵀ Q = (Qᵀ G)ᵀ
                with one_thread_for(acc.P):
                    result[name] = svd_of_projection(acc.M, acc.P.T, acc.M.shape[1])
            del acc
    return result


def _orth(Y: Tensor) -> Tensor:
    with one_thread_for(Y):
        return orthonormal_basis(Y)
