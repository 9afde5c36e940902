"""Conv2d and Embedding adapters, on a tiny diffusers UNet2DConditionModel built from a config
and on a tiny Llama's token embeddings, in float64.

Relations: the low-rank path equals the layer op applied with ΔW (conv2d with ΔW reshaped to
the kernel; an embedding lookup of ΔWᵀ); merged == unmerged and unmerge restores W; pissa
keeps the function; save → load and export → PEFT load give the same outputs; a few
Riemannian AdamW steps lower a denoising loss; unsupported layers are one-line errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import batch_for, logits, perturb_trainables, rel, tiny_llama
from torch import nn

import lorakit
from lorakit import AdapterConfig, LorakitError
from lorakit.inject import adapters_of

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

UNET_TARGETS = ["conv_in", "conv1", "conv2", "conv_out", "to_q", "to_v"]


def tiny_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    )
    return unet.to(torch.float64).eval()


def unet_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64), "timestep": torch.tensor([3, 40]),
            "encoder_hidden_states": torch.randn(2, 5, 16, generator=g, dtype=torch.float64)}


def run_unet(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def unet_config(method: str = "lora", **kw) -> AdapterConfig:
    return AdapterConfig(method=method, rank=4, alpha=8, targets=UNET_TARGETS, **kw)


def test_unet_convolutions_are_adapted_with_peft_shapes():
    model = lorakit.adapt(tiny_unet(), unet_config())
    convs = {n: a for n, a in adapters_of(model).items() if isinstance(a.base_layer, nn.Conv2d)}
    assert len(convs) > 4 and any(isinstance(a.base_layer, nn.Linear) for a in adapters_of(model).values())
    for adapter in convs.values():
        W = adapter.base_layer.weight
        assert adapter.A.shape == (4, W[0].numel()) and adapter.B.shape == (W.shape[0], 4)


@pytest.mark.parametrize("method", ["lora", "lora-xs", "lora-fa"])
def test_conv_low_rank_path_is_the_convolution_with_delta_w(method):
    model = lorakit.adapt(tiny_unet(), unet_config(method))
    perturb_trainables(model)
    adapter = adapters_of(model)["down_blocks.0.resnets.0.conv1"]
    conv = adapter.base_layer
    x = torch.randn(2, conv.in_channels, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    delta = adapter.delta_weight().view(conv.weight.shape)
    expected = conv(x) + F.conv2d(x, delta, None, conv.stride, conv.padding, conv.dilation)
    assert rel(adapter(x), expected) < 1e-12


@pytest.mark.parametrize("method", ["lora", "pissa", "lora-xs"])
def test_conv_merge_equals_unmerged_and_unmerge_restores_w(method):
    model = lorakit.adapt(tiny_unet(), unet_config(method))
    perturb_trainables(model)
    inputs = unet_inputs()
    unmerged = run_unet(model, inputs)
    weights = {n: a.base_layer.weight.detach().clone() for n, a in adapters_of(model).items()}
    for adapter in adapters_of(model).values():
        adapter.merge()
    assert rel(run_unet(model, inputs), unmerged) < 1e-12
    for name, adapter in adapters_of(model).items():
        adapter.unmerge()
        scale = weights[name].norm() + adapter.delta_weight().norm()  # pissa at full rank leaves W_res ≈ 0
        assert (adapter.base_layer.weight - weights[name]).norm() <= 1e-14 * scale
    assert rel(run_unet(model, inputs), unmerged) < 1e-12


def test_pissa_on_conv_keeps_the_function_and_lora_is_zero_at_init():
    inputs = unet_inputs()
    base = run_unet(tiny_unet(), inputs)
    assert rel(run_unet(lorakit.adapt(tiny_unet(), unet_config("pissa")), inputs), base) < 1e-12
    assert torch.equal(run_unet(lorakit.adapt(tiny_unet(), unet_config("lora")), inputs), base)


@pytest.mark.parametrize("method", ["lora", "pissa", "lora-xs"])
def test_unet_save_load_and_peft_export_give_the_same_output(tmp_path, method):
    model = lorakit.adapt(tiny_unet(), unet_config(method))
    perturb_trainables(model, scale=0.05)
    inputs = unet_inputs()
    check_save_load_and_peft_export(model, tiny_unet, lambda m: run_unet(m, inputs), tmp_path)


def check_save_load_and_peft_export(model, fresh, run, tmp_path) -> None:
    """save → load onto ``fresh()`` and export → PEFT load onto ``fresh()`` give ``run(model)``."""
    expected = run(model)
    lorakit.save_adapter(model, tmp_path / "adapter")
    assert rel(run(lorakit.load_adapter(fresh(), tmp_path / "adapter")), expected) < 1e-14
    lorakit.export_peft(model, tmp_path / "peft")
    assert rel(run(peft.PeftModel.from_pretrained(fresh(), tmp_path / "peft").eval()), expected) < 1e-10


def test_unet_denoising_loss_falls_with_riemannian_adamw_then_merges():
    model = lorakit.adapt(tiny_unet(), unet_config())
    optimizer = lorakit.make_optimizer(model, lr=1e-2, preconditioner="riemannian")
    g = torch.Generator().manual_seed(3)
    clean = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(clean.shape, generator=g, dtype=torch.float64)
    context = torch.randn(4, 5, 16, generator=g, dtype=torch.float64)
    t = torch.tensor([10, 200, 500, 900])
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    noisy = scheduler.add_noise(clean, noise, t)
    losses = []
    model.train()
    for _ in range(6):
        loss = F.mse_loss(model(noisy, t, encoder_hidden_states=context).sample, noise)  # ε-prediction
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert losses[-1] < losses[0]
    inputs = {"sample": noisy, "timestep": t, "encoder_hidden_states": context}
    adapted = run_unet(model, inputs)
    merged = lorakit.merge(model)
    assert not adapters_of(merged) and rel(run_unet(merged, inputs), adapted) < 1e-12


def test_unsupported_convolutions_and_inits_are_one_line_errors():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 8, 3, groups=2)

    cases = [
        (Grouped(), AdapterConfig(rank=2, targets=["conv"]), r"layer 'conv': cannot adapt a Conv2d with groups=2"),
        (tiny_unet(), AdapterConfig(rank=40, targets=["conv_in"]), r"layer 'conv_in': rank 40 exceeds the layer's size \(16 × 36\)"),
        (tiny_unet(), AdapterConfig(method="dora", rank=2, targets=["conv_in"]), r"DoRA adapts nn.Linear and Conv1D layers, not Conv2d"),
        (tiny_llama(), AdapterConfig(method="lora-ga", rank=2, targets=["embed_tokens"]),
         r"init 'lora-ga' estimates G from nn.Linear, Conv1D and Conv2d layers, but target 'model.embed_tokens' is a Embedding"),
    ]
    for model, cfg, message in cases:
        with pytest.raises(LorakitError, match=message) as err:
            lorakit.adapt(model, cfg, data=[{}])
        assert "\n" not in str(err.value) and not adapters_of(model)


# -- Embedding --------------------------------------------------------------------------------------
EMBED_TARGETS = ["embed_tokens", "q_proj"]


def test_embedding_adapter_has_peft_layout_and_its_path_is_a_lookup_of_delta_w():
    model = lorakit.adapt(tiny_llama(), AdapterConfig(rank=3, targets=EMBED_TARGETS))
    perturb_trainables(model)
    adapter = adapters_of(model)["model.embed_tokens"]
    vocab, dim = adapter.base_layer.weight.shape
    assert adapter.A.shape == (3, vocab) and adapter.B.shape == (dim, 3)
    ids = batch_for("llama")["input_ids"]
    expected = F.embedding(ids, adapter.base_layer.weight + adapter.delta_weight().T)
    assert rel(adapter(ids), expected) < 1e-14


@pytest.mark.parametrize("method", ["lora", "pissa", "lora-xs"])
def test_embedding_merge_save_load_and_peft_export(tmp_path, method):
    batch = batch_for("llama")
    base = logits(tiny_llama(), batch)
    model = lorakit.adapt(tiny_llama(), AdapterConfig(method=method, rank=3, targets=EMBED_TARGETS, xs_init_std=0.0))
    assert rel(logits(model, batch), base) < 1e-12  # every one of these inits keeps the function
    perturb_trainables(model, scale=0.05)
    expected = logits(model, batch)
    embedding = adapters_of(model)["model.embed_tokens"]
    W = embedding.base_layer.weight.detach().clone()
    embedding.merge()
    assert rel(logits(model, batch), expected) < 1e-12
    embedding.unmerge()
    assert rel(embedding.base_layer.weight, W) < 1e-14
    check_save_load_and_peft_export(model, tiny_llama, lambda m: logits(m, batch), tmp_path)


def test_embedding_with_max_norm_is_refused():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4, max_norm=1.0)

    model = Model()
    with pytest.raises(LorakitError, match="cannot adapt an Embedding with max_norm"):
        lorakit.adapt(model, AdapterConfig(rank=2, targets=["embed"]))
    assert isinstance(model.embed, nn.Embedding)
