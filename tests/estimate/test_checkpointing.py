"""estimation.checkpointing: the same statistics and factors as without it (float64), with the
blocks really recomputed, each (x, δ) counted once, and the model left as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_exact import ragged_batches
from torch import nn

import lorakit
from lorakit import AdapterConfig, LorakitError
from lorakit.estimate import estimate
from lorakit.linalg import truncate

CASES = [  # (method, options): lora-ga exact and sketch, lora-sb (sign(G): exact)
    ("lora-ga", {"estimator": "exact"}),
    ("lora-ga", {"estimator": "sketch", "power_iters": 1}),
    ("lora-sb", {}),
]


def _config(method: str, on: bool, **options) -> AdapterConfig:
    return AdapterConfig(method=method, rank=2, num_samples=6, estimate_checkpointing=on, **options)


def _dense(stats) -> dict[str, torch.Tensor]:
    """G, or the sketch's U·S·Vᵀ (invariant to the singular vectors' signs)."""
    return {n: s.grad if s.grad is not None else truncate(s.svd) for n, s in stats.items()}


def _model_state(model: nn.Module) -> list:
    """Everything checkpointing or the taps could leave behind: per module its mode, its hooks and
    the attributes transformers' enable sets; per parameter requires_grad."""
    state = []
    for name, m in model.named_modules():
        own = {k: v for k, v in vars(m).items() if "checkpoint" in k or "require_grads" in k}
        state.append((name, type(m).__name__, m.training, len(m._forward_hooks), len(m._forward_pre_hooks),
                      len(m._backward_hooks), sorted(own), [id(c) for c in m.children()]))
    return state + [(n, p.requires_grad) for n, p in model.named_parameters()]


@pytest.mark.parametrize("method,options", CASES, ids=["lora-ga-exact", "lora-ga-sketch", "lora-sb"])
def test_checkpointed_estimation_gives_the_same_statistics_and_factors(method, options):
    batches = ragged_batches("llama")
    model = tiny_llama()
    before = _model_state(model)
    calls = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *_: calls.append(1))
    plain = estimate(model, _config(method, False, **options), batches, progress=False)
    plain_calls, calls[:] = len(calls), []
    stats = estimate(model, _config(method, True, **options), batches, progress=False)
    assert len(calls) == 2 * plain_calls > 0  # every block really ran again in the backward pass
    model.model.layers[0].mlp.down_proj._forward_hooks.clear()
    assert _model_state(model) == before  # flags, modes, hooks, requires_grad: as it was
    assert not model.is_activation_checkpointing
    G, G_plain = _dense(stats), _dense(plain)
    assert G.keys() == G_plain.keys() and len(G) == 14
    for name in G:
        assert G_plain[name].abs().max() > 0, name
        torch.testing.assert_close(G[name], G_plain[name], rtol=0, atol=1e-10, msg=name)

    factors = []
    for on in (False, True):
        adapted = tiny_llama()
        lorakit.adapt(adapted, _config(method, on, **options), data=batches, progress=False)
        factors.append({n: t.detach().clone() for n, t in adapted.state_dict().items()})
    assert factors[0].keys() == factors[1].keys()
    for name in factors[0]:
        torch.testing.assert_close(factors[1][name], factors[0][name], rtol=0, atol=1e-10, msg=name)


def test_no_layer_input_outlives_the_forward_of_a_checkpointed_block():
    """What checkpointing saves: when the forward ends (the loss is computed, backward has not
    started), every target layer's input from that forward is freed — the taps hold none of them —
    while without checkpointing the taps keep them all."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from lorakit.estimate.loss import example_loss_fn

    model = tiny_llama()
    targets = [m for n, m in model.named_modules() if n.endswith(("q_proj", "o_proj", "up_proj", "down_proj"))]
    inputs: list[StorageWeakRef] = []

    def keep(module, args):
        if torch._C._current_graph_task_id() == -1:  # the forward, not the recomputation in backward
            inputs.append(StorageWeakRef(args[0].untyped_storage()))

    for layer in targets:
        layer.register_forward_pre_hook(keep)
    default = example_loss_fn(model)
    alive = []

    def loss_fn(outputs, batch):
        alive.append(sum(not ref.expired() for ref in inputs))
        inputs.clear()
        return default(outputs, batch)

    batches = ragged_batches("llama")
    for on in (False, True):
        estimate(model, _config("lora-ga", on, estimator="exact"), batches, loss_fn=loss_fn, progress=False)
    assert alive == [len(targets)] * len(batches) + [0] * len(batches)


def test_checkpointing_the_user_already_enabled_is_kept():
    model = tiny_llama()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    func = model.model.layers[0]._gradient_checkpointing_func
    hooks = list(model._require_grads_hooks)
    before = _model_state(model)
    batches = ragged_batches("llama")
    plain = estimate(tiny_llama(), _config("lora-ga", False, estimator="exact"), batches, progress=False)
    stats = estimate(model, _config("lora-ga", True, estimator="exact"), batches, progress=False)
    assert _model_state(model) == before and model.model.layers[0]._gradient_checkpointing_func is func
    assert model._require_grads_hooks == hooks and model.is_activation_checkpointing
    for name in plain:
        torch.testing.assert_close(stats[name].grad, plain[name].grad, rtol=0, atol=1e-10, msg=name)


class Blocks(nn.Module):
    """A plain residual MLP stack (no transformers): the generic route checkpoints each block."""

    def __init__(self, width: int = 12, depth: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(inplace=True), nn.Linear(2 * width, width)) for _ in range(depth)
        ).double()
        self.head = nn.Linear(width, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


def _blocks_loss(outputs, batch):
    return torch.nn.functional.cross_entropy(outputs, batch["labels"], reduction="none"), torch.ones(len(batch["labels"]), dtype=torch.float64)


def test_a_plain_module_has_its_blocks_checkpointed():
    model = Blocks()
    g = torch.Generator().manual_seed(1)
    data = [{"x": torch.randn(5, 12, generator=g, dtype=torch.float64), "labels": torch.randint(0, 3, (5,), generator=g)}]
    calls = []
    model.blocks[1][0].register_forward_hook(lambda *_: calls.append(1))
    before = _model_state(model)
    results = []
    for on in (False, True):
        config = AdapterConfig(method="lora-ga", rank=2, num_samples=5, estimator="exact", targets=r"blocks\.\d\.[02]",
                               estimate_checkpointing=on)
        results.append(estimate(model, config, data, loss_fn=_blocks_loss, progress=False))
    assert calls == [1] * 3  # once without, twice with checkpointing
    assert _model_state(model) == before  # the blocks are back in place
    assert len(results[0]) == 6
    for name in results[0]:
        torch.testing.assert_close(results[1][name].grad, results[0][name].grad, rtol=0, atol=1e-10, msg=name)


def test_a_module_without_blocks_is_refused_and_left_as_it_was():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).double()
    before = _model_state(model)
    data = [{"x": torch.randn(3, 4, dtype=torch.float64), "labels": torch.tensor([0, 1, 1])}]
    config = AdapterConfig(method="lora-ga", rank=1, num_samples=3, estimate_checkpointing=True)
    with pytest.raises(LorakitError, match="no nn.ModuleList of blocks to checkpoint; set estimate_checkpointing=false"):
        estimate(model, config, data, loss_fn=_blocks_loss, progress=False)
    assert _model_state(model) == before


def test_the_recipe_estimates_checkpointed_when_training_is():
    from lorakit.recipes.config import RunConfig

    config = RunConfig()
    config.adapter = {"method": "lora-ga"}
    assert not config.adapter_config().estimation.checkpointing
    config.train.gradient_checkpointing = True
    assert config.adapter_config().estimation.checkpointing
    config.adapter = {"method": "lora-ga", "estimate_checkpointing": False}
    assert not config.adapter_config().estimation.checkpointing
