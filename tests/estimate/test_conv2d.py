"""Gradient estimation on nn.Conv2d: G from the unfolded input patches equals autograd's weight
gradient reshaped (out, in·kh·kw) (PEFT's layout), in float64, for the exact and sketch estimators,
with stride, padding, dilation and a non-square kernel; lora-ga and lora-sb initialise on it."""

from __future__ import annotations

import pytest
import torch
from conftest import rel
from torch import nn

import lorakit
from lorakit import AdapterConfig, LorakitError
from lorakit.estimate import estimate
from lorakit.inject import adapters_of


class Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.tanh(self.a(pixels)))
        return self.head(torch.tanh(h).mean(dim=(2, 3)))


def loss_fn(outputs: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    terms = ((outputs - batch["target"]) ** 2).sum(dim=1)
    return terms, torch.ones_like(terms)


def data(batches: int = 2, size: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"pixels": torch.randn(size, 3, 9, 8, generator=g, dtype=torch.float64),
             "target": torch.randn(size, 4, generator=g, dtype=torch.float64)} for _ in range(batches)]


def autograd_gradients(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """∂/∂W of Σℓ / Σw over every example (what estimate's G is), reshaped (out, in·kh·kw)."""
    terms = torch.cat([loss_fn(model(b["pixels"]), b)[0] for b in batches])
    weights = [model.a.weight, model.b.weight]
    grads = torch.autograd.grad(terms.sum() / terms.numel(), weights)
    return {"a": grads[0].reshape(8, -1), "b": grads[1].reshape(6, -1)}


def model() -> nn.Module:
    torch.manual_seed(0)
    return Convs().double()


@pytest.mark.parametrize("estimator", ["exact", "sketch"])
def test_estimated_g_of_conv2d_layers_is_autograds_weight_gradient_reshaped(estimator):
    batches = data()
    m = model()
    config = AdapterConfig(method="lora-ga", rank=2, targets=["a", "b"], estimator=estimator, num_samples=6,
                           power_iters=2, oversample=8)
    stats = estimate(m, config, batches, loss_fn=loss_fn, progress=False)
    expected = autograd_gradients(model(), batches)
    for name in ("a", "b"):
        if estimator == "exact":
            assert stats[name].grad.shape == expected[name].shape
            assert rel(stats[name].grad, expected[name]) < 1e-12, name
        else:  # the sketch's top-2r truncation of G, against the exact one's
            U, S, Vh = torch.linalg.svd(expected[name])
            best = (U[:, :4] * S[:4]) @ Vh[:4]
            svd = stats[name].top_svd(4)
            assert rel((svd.U * svd.S) @ svd.V.T, best) < 1e-6, name


@pytest.mark.parametrize("method", ["lora-ga", "lora-sb"])
def test_data_driven_inits_adapt_conv2d_layers(method):
    """lora-ga keeps the function (base W − s·BA); lora-sb starts from W + trunc_r(ΔW₁) of the reshaped G."""
    batches = data()
    m = model()
    x = batches[0]["pixels"]
    before = m(x).detach()
    stats = estimate(m, AdapterConfig(method=method, rank=2, targets=["a", "b"], num_samples=6, lr=1e-3), batches,
                     loss_fn=loss_fn, progress=False)
    lorakit.adapt(m, AdapterConfig(method=method, rank=2, targets=["a", "b"], num_samples=6, lr=1e-3), stats=stats)
    assert set(adapters_of(m)) == {"a", "b"}
    if method == "lora-ga":
        assert rel(m(x), before) < 1e-12
    else:
        G = stats["a"].grad
        U, S, Vh = torch.linalg.svd(-1e-3 * torch.sign(G))
        assert rel(adapters_of(m)["a"].delta_weight(), (U[:, :2] * S[:2]) @ Vh[:2]) < 1e-10


def test_an_embedding_target_of_a_data_driven_init_is_one_line():
    m = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    with pytest.raises(LorakitError, match=r"^init 'lora-ga' estimates G from nn.Linear, Conv1D and Conv2d layers, but target "
                                           r"'0' is a Embedding; leave it out of targets") as err:
        lorakit.adapt(m, AdapterConfig(method="lora-ga", rank=2, targets=["0"]), data=[{"input_ids": torch.ones(1, 3).long()}])
    assert "\n" not in str(err.value)
