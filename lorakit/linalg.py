"""The one place lorakit decomposes matrices.

Every decomposition runs in float32 at least (float64 stays float64), whatever the model's
dtype; callers cast the results back once.

Randomized SVD follows Halko, Martinsson & Tropp (2011): a Gaussian test matrix with
``oversample`` extra columns, ``power_iters`` re-orthonormalised power iterations, then an
exact SVD of the small projected matrix. ``torch.svd_lowrank`` without oversampling is
10-20 % off the exact truncation on gradient-like spectra, so it is never used bare.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

# Exact CPU SVDs up to this smaller side run on one thread (see ``one_thread_for``).
EXACT_SVD_MAX_DIM = 1024


class TopSVD(NamedTuple):
    """Top-k singular triplets: M ≈ U diag(S) Vᵀ with U (m × k), S (k,), V (n × k)."""

    U: Tensor
    S: Tensor
    V: Tensor


# the floating dtypes lorakit accepts by name (configs, recipes): one table
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                                  "float64": torch.float64}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_generator(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from (seed, layer name): identical on every process and run."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))


def gaussian(shape: tuple[int, ...], generator: torch.Generator, like: Tensor) -> Tensor:
    """Standard normal samples drawn on the CPU generator, moved to ``like``'s device and dtype."""
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


_SINGLE_THREAD = {"enabled": False}
_THREADS_LOCK = threading.RLock()


@contextmanager
def single_thread_decompositions() -> Iterator[None]:
    """Let ``one_thread_for`` switch the process to one intra-op thread while it decomposes.

    For a caller that owns the process's threading (the ``lorakit`` recipes): torch's thread
    count is process-wide, so a library call never changes it unless asked to, and other
    threads of a user's program never see it change behind their back.
    """
    previous = _SINGLE_THREAD["enabled"]
    _SINGLE_THREAD["enabled"] = True
    try:
        yield
    finally:
        _SINGLE_THREAD["enabled"] = previous


@contextmanager
def one_thread_for(tensor: Tensor, max_side: int | None = None) -> Iterator[None]:
    """One intra-op thread while decomposing ``tensor`` on the CPU (if its smaller side ≤ ``max_side``),
    inside ``single_thread_decompositions()`` only.

    LAPACK's QR/SVD take many small parallel steps, each ending at a thread barrier; on shared
    cores every barrier can wait for a time slice. Measured on a busy 2-core machine: the SVD
    of a 1536 × 384 matrix took 7.6 s on 2 threads and 0.06 s on one (4.7 s vs 0.26 s on
    another day). The decompositions here are thin or small, so one thread costs little on an
    idle machine. GPU tensors are left alone; concurrent callers are serialised so that the
    count always comes back to what it was.
    """
    small = max_side is None or min(tensor.shape) <= max_side
    if not _SINGLE_THREAD["enabled"] or tensor.device.type != "cpu" or not small:
        yield
        return
    with _THREADS_LOCK:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def auto_svd_method(shape: tuple[int, ...], k: int, oversample: int) -> str:
    """'randomized' when its width k + oversample is under half the smaller side (far cheaper
    and, with power iterations, as accurate), else 'exact'."""
    return "randomized" if k + oversample < min(shape) / 2 else "exact"


def orthonormal_basis(Y: Tensor) -> Tensor:
    """An orthonormal basis of the columns of Y (reduced QR)."""
    return torch.linalg.qr(Y, mode="reduced").Q


def svd_of_projection(Q: Tensor, QtM: Tensor, k: int) -> TopSVD:
    """Finish a randomized SVD: given an orthonormal basis Q (m × l) of M's range and QᵀM (l × n)."""
    Ub, S, Vh = torch.linalg.svd(QtM, full_matrices=False)
    return TopSVD((Q @ Ub)[:, :k], S[:k], Vh[:k].T)


def exact_svd(M: Tensor, k: int) -> TopSVD:
    M = M.to(compute_dtype(M.dtype))
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    return TopSVD(U[:, :k], S[:k], Vh[:k].T)


def randomized_svd(
    M: Tensor, k: int, oversample: int = 16, power_iters: int = 4, generator: torch.Generator | None = None
) -> TopSVD:
    """Top-k SVD of M by randomized range finding with oversampling and power iterations."""
    M = M.to(compute_dtype(M.dtype))
    m, n = M.shape
    width = min(k + oversample, m, n)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    Q = orthonormal_basis(M @ gaussian((n, width), generator, M))
    for _ in range(power_iters):
        Q = orthonormal_basis(M @ orthonormal_basis(M.T @ Q))
    return svd_of_projection(Q, Q.T @ M, k)


def top_svd(
    M: Tensor,
    k: int,
    method: str = "auto",
    oversample: int = 16,
    power_iters: int = 4,
    generator: torch.Generator | None = None,
) -> TopSVD:
    """Top-k singular triplets of M in float32+ (``method``: 'exact', 'randomized' or 'auto',
    see ``auto_svd_method``)."""
    if k > min(M.shape):
        raise ValueError(f"cannot take {k} singular triplets of a {tuple(M.shape)} matrix")
    if method == "auto":
        method = auto_svd_method(tuple(M.shape), k, oversample)
    if method == "exact":
        with one_thread_for(M, EXACT_SVD_MAX_DIM):
            return exact_svd(M, k)
    if method == "randomized":
        with one_thread_for(M):
            return randomized_svd(M, k, oversample, power_iters, generator)
    raise ValueError(f"unknown SVD method {method!r}; use 'auto', 'exact' or 'randomized'")


def truncate(svd: TopSVD) -> Tensor:
    """The rank-k matrix U diag(S) Vᵀ."""
    return (svd.U * svd.S) @ svd.V.T
