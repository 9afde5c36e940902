"""The shared SVD helpers against torch.linalg.svd in float64."""

import pytest
import torch

from lorakit.linalg import exact_svd, randomized_svd, top_svd, truncate


def decaying_matrix(m: int, n: int, decay: float = 0.9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64)).Q
    S = decay ** torch.arange(min(m, n), dtype=torch.float64)
    return (U * S) @ V.T


@pytest.mark.parametrize("shape", [(300, 200), (150, 400)])
@pytest.mark.parametrize("rank", [8, 16])
def test_randomized_truncation_matches_exact(shape, rank):
    M = decaying_matrix(*shape)
    exact = truncate(exact_svd(M, rank))
    approx = truncate(randomized_svd(M, rank, oversample=16, power_iters=4))
    assert ((approx - exact).norm() / exact.norm()).item() < 1e-3


def test_exact_svd_is_torch_svd_and_computes_in_float32_for_bf16():
    M = decaying_matrix(40, 30).to(torch.bfloat16)
    U, S, V = exact_svd(M, 5)
    assert U.dtype == torch.float32
    ref = torch.linalg.svdvals(M.float())[:5]
    assert torch.allclose(S, ref, rtol=1e-5)


def test_top_svd_rejects_rank_above_size_and_auto_picks_exact_for_small():
    M = decaying_matrix(20, 10)
    with pytest.raises(ValueError, match="cannot take 11"):
        top_svd(M, 11)
    assert torch.allclose(top_svd(M, 4).S, exact_svd(M, 4).S, rtol=1e-12)
