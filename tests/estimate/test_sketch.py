"""The sketch estimator: randomized SVD of G from products accumulated over batches."""

from __future__ import annotations

import pytest
import torch
from conftest import MODELS
from test_exact import ragged_batches
from torch import nn

from lorakit import AdapterConfig, LorakitError
from lorakit.estimate import estimate
from lorakit.linalg import truncate


def test_full_width_sketch_recovers_G_exactly(model_kind):
    """With l = min(out, in) test vectors, Q spans G's range, so U·S·Vᵀ = G: checks every product."""
    model = MODELS[model_kind]()
    batches = ragged_batches(model_kind)
    exact = estimate(model, AdapterConfig(method="lora-ga", rank=2, estimator="exact", num_samples=6), batches, progress=False)
    config = AdapterConfig(method="lora-ga", rank=2, estimator="sketch", oversample=200, num_samples=6)
    sketch = estimate(model, config, batches, progress=False)
    assert (sketch.report.estimator, sketch.report.passes, sketch.report.rank) == ("sketch", 4, 4)
    for name, layer in sketch.items():
        G = exact[name].grad
        assert layer.svd.U.shape[1] == min(G.shape)
        assert ((truncate(layer.svd) - G).norm() / G.norm()).item() <= 1e-10
        with pytest.raises(LorakitError, match="no full gradient"):
            layer.gradient()


class OneLayer(nn.Module):
    """y = x Wᵀ: with the loss Σ_t c_t · y_t the gradient is G = Σ_t c_tᵀ x_t = Cᵀ X."""

    def __init__(self, out_f: int, in_f: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_f, out_f, bias=False, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def planted_gradient(out_f: int, in_f: int, decay: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out_f, out_f, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(in_f, in_f, generator=g, dtype=torch.float64)).Q[:, :out_f]
    return (U * decay ** torch.arange(out_f, dtype=torch.float64)) @ V.T


def linear_loss(outputs: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    per_example = (outputs * batch["c"]).sum(dim=(1, 2))
    return per_example, torch.ones_like(per_example, dtype=torch.bool)


@pytest.mark.parametrize("power_iters", [0, 1, 2])
def test_sketch_finds_the_top_singular_triplets_of_a_planted_gradient(power_iters):
    out_f, in_f = 30, 40
    G = planted_gradient(out_f, in_f, decay=0.5)
    # one example whose tokens are the unit vectors e_t, with c_t = G[:, t]: G = Σ_t c_tᵀ e_t
    batch = {"x": torch.eye(in_f, dtype=torch.float64)[None], "c": G.T[None]}
    config = AdapterConfig(method="lora-ga", rank=2, estimator="sketch", oversample=8, power_iters=power_iters, num_samples=1)
    stats = estimate(OneLayer(out_f, in_f), config, [batch], targets=["proj"], loss_fn=linear_loss, progress=False)
    assert stats.report.passes == 2 * power_iters + 2
    U, S, V = stats["proj"].top_svd(4)
    Ue, Se, Ve = torch.linalg.svd(G)[0][:, :4], torch.linalg.svdvals(G)[:4], torch.linalg.svd(G)[2][:4].T
    # error of the range finder ~ (σ_{l+1}/σ_k)^(2q+1): 2^-9, 2^-27, 2^-45
    tolerance = {0: 1e-2, 1: 1e-7, 2: 1e-12}[power_iters]
    assert ((S - Se).abs() / Se).max().item() <= tolerance
    assert (torch.abs(U.T @ Ue).diagonal() - 1).abs().max().item() <= tolerance  # same vectors up to sign
    assert (torch.abs(V.T @ Ve).diagonal() - 1).abs().max().item() <= tolerance
    with pytest.raises(LorakitError, match="sized for 4 singular directions"):
        stats["proj"].top_svd(5)


def test_sketch_is_deterministic_for_a_seed():
    """Same seed, same test matrices: what makes ranks agree under torch.distributed."""
    model = MODELS["gpt2"]()
    batches = ragged_batches("gpt2")
    config = AdapterConfig(method="lora-ga", rank=2, estimator="sketch", num_samples=6)
    first, second = (estimate(model, config, batches, progress=False) for _ in range(2))
    for name in first:
        assert all(torch.equal(a, b) for a, b in zip(first[name].svd, second[name].svd))
