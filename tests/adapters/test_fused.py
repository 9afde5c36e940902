"""The fused Linear + low-rank node (lorakit.adapters.fused) computes the layer's function and the
gradients of exactly the trainable factors, equal to the straightforward computation in float64."""

import pytest
import torch
from conftest import rel
from torch import nn

from lorakit.adapters import ADAPTER_CLASSES, fused

STRUCTURES = ["lora", "lora-fa", "xs"]


def adapter_for(structure, bias=True, dropout=0.0, dtype=torch.float64):
    torch.manual_seed(0)
    base = nn.Linear(7, 5, bias=bias).to(dtype).requires_grad_(False)
    adapter = ADAPTER_CLASSES[structure](base, rank=3, scale=0.7, dropout=dropout)
    with torch.no_grad():
        for p in adapter.factors().values():
            p.normal_()
    adapter.set_trainable()
    return adapter


def reference(adapter, x, mask=None):
    """base(x) + s·(x Aᵀ)[Rᵀ]Bᵀ written out, on detached copies of every tensor."""
    f = {k: v.detach().clone().requires_grad_(k in adapter.trainable_names) for k, v in adapter.factors().items()}
    W, b = adapter.base_layer.weight, adapter.base_layer.bias
    xr = x.detach().clone().requires_grad_(True)
    xd = xr if mask is None else xr * mask
    h = xd @ f["A"].T
    if "R" in f:
        h = h @ f["R"].T
    y = xr @ W.T + (0 if b is None else b) + adapter.scale * (h @ f["B"].T)
    return y, xr, f


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("bias", [True, False])
def test_fused_output_and_gradients_equal_the_written_out_computation(structure, bias):
    adapter = adapter_for(structure, bias)
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    assert fused.applies(adapter, x)
    g = torch.randn(2, 4, 5, dtype=torch.float64)
    y = adapter(x)
    y.backward(g)
    ref, xr, f = reference(adapter, x)
    ref.backward(g)
    assert rel(y, ref) < 1e-13
    assert rel(x.grad, xr.grad) < 1e-12
    for name, factor in adapter.factors().items():
        if name in adapter.trainable_names:
            assert rel(factor.grad, f[name].grad) < 1e-12, name
        else:
            assert factor.grad is None, name  # a frozen factor: no gradient, none computed
    assert adapter.base_layer.weight.grad is None


def test_fused_node_without_input_gradient_and_without_grad_mode():
    adapter = adapter_for("lora")
    x = torch.randn(3, 7, dtype=torch.float64)  # a first layer: its input needs no gradient
    adapter(x).sum().backward()
    ref, _, f = reference(adapter, x)
    ref.sum().backward()
    assert rel(adapter.A.grad, f["A"].grad) < 1e-12 and rel(adapter.B.grad, f["B"].grad) < 1e-12
    with torch.no_grad():
        assert rel(adapter(x), ref) < 1e-13


@pytest.mark.parametrize("structure", STRUCTURES)
def test_dropout_takes_the_general_path_with_the_same_mask_in_its_gradients(structure):
    adapter = adapter_for(structure, dropout=0.5).train()
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert not fused.applies(adapter, x)
    torch.manual_seed(5)
    y = adapter(x)
    y.sum().backward()
    torch.manual_seed(5)
    mask = nn.functional.dropout(torch.ones_like(x), 0.5, training=True)
    ref, xr, f = reference(adapter, x, mask)
    ref.sum().backward()
    assert rel(y, ref) < 1e-13 and rel(x.grad, xr.grad) < 1e-12
    for name in adapter.trainable_names:
        assert rel(getattr(adapter, name).grad, f[name].grad) < 1e-12


def test_a_hooked_or_trainable_base_layer_takes_the_general_path_and_its_hooks_run():
    adapter = adapter_for("lora")
    x = torch.randn(4, 7, dtype=torch.float64)
    seen = []
    handle = adapter.base_layer.register_forward_hook(lambda m, a, out: seen.append(out))
    assert not fused.applies(adapter, x)
    y = adapter(x)
    handle.remove()
    assert len(seen) == 1 and rel(y, reference(adapter, x)[0]) < 1e-13
    adapter.base_layer.weight.requires_grad_(True)
    assert not fused.applies(adapter, x)
    adapter(x).sum().backward()
    assert adapter.base_layer.weight.grad is not None


def test_half_precision_input_with_float32_factors_keeps_factor_gradients_in_float32():
    adapter = adapter_for("lora", dtype=torch.bfloat16)
    assert adapter.A.dtype == torch.float32
    x = torch.randn(2, 3, 7, dtype=torch.bfloat16)
    assert fused.applies(adapter, x)
    y = adapter(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert adapter.A.grad.dtype == torch.float32 and adapter.B.grad.dtype == torch.float32
    # the same node in float64 on the same values: bf16 rounding only
    W = adapter.base_layer.weight.double()
    A, B = adapter.A.detach().bfloat16().double(), adapter.B.detach().bfloat16().double()
    expected = x.double() @ W.T + adapter.base_layer.bias.double() + 0.7 * (x.double() @ A.T) @ B.T
    assert rel(y.double(), expected) < 2e-2


@pytest.mark.parametrize("method", ["lora", "lora-xs", "dora"])
def test_an_adapted_decoder_compiles_without_graph_breaks(method):
    import lorakit
    from conftest import MODELS, batch_for

    model = MODELS["llama"]()
    lorakit.adapt(model, lorakit.AdapterConfig(method=method, rank=4))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(lambda **b: model(**b).loss)(**batch_for("llama"))
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_dora_output_and_gradients_equal_the_written_out_computation(bias, dropout):
    """y = b + (m/‖V‖)⊙(x Wᵀ + s·(x' Aᵀ)Bᵀ), ‖V‖ = row norms of W + s·BA taken as a constant (the paper's
    detached norm), x' the dropped-out input: DoRA's rearranged forward gives it and its gradients."""
    torch.manual_seed(0)
    base = nn.Linear(7, 5, bias=bias).double().requires_grad_(False)
    adapter = ADAPTER_CLASSES["dora"](base, rank=3, scale=0.7, dropout=dropout).train()
    with torch.no_grad():
        adapter.A.normal_()
        adapter.B.normal_()
    adapter.finish_init()
    with torch.no_grad():
        adapter.magnitude.mul_(torch.linspace(0.5, 1.5, 5, dtype=torch.float64))
    adapter.set_trainable()
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 4, 5, dtype=torch.float64)
    torch.manual_seed(3)
    y = adapter(x)
    y.backward(g)
    torch.manual_seed(3)
    mask = nn.functional.dropout(torch.ones_like(x), dropout, training=True)
    A, B, m = (adapter.A.detach().clone().requires_grad_(True), adapter.B.detach().clone().requires_grad_(True),
               adapter.magnitude.detach().clone().requires_grad_(True))
    xr = x.detach().clone().requires_grad_(True)
    W = base.weight
    norm = (W + 0.7 * B @ A).detach().norm(dim=1)
    b = 0 if base.bias is None else base.bias
    ref = b + (m / norm) * (xr @ W.T + 0.7 * ((xr * mask) @ A.T) @ B.T)
    ref.backward(g)
    assert rel(y, ref) < 1e-13
    for got, want in ((x.grad, xr.grad), (adapter.A.grad, A.grad), (adapter.B.grad, B.grad), (adapter.magnitude.grad, m.grad)):
        assert rel(got, want) < 1e-12


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("input_grad", [True, False])
def test_the_fused_node_saves_what_autograds_graph_saves(structure, input_grad):
    """The tensors kept for backward are those the written-out computation keeps (by storage): a layer whose
    input needs no gradient keeps neither W nor A."""

    def saved(run) -> set[tuple[int, tuple[int, ...]]]:
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), tuple(sorted(t.shape)))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return sorted(kept.values())

    adapter = adapter_for(structure)
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=input_grad)

    def general():
        f = {k: v for k, v in adapter.factors().items()}
        h = x @ f["A"].T
        if "R" in f:
            h = h @ f["R"].T
        return torch.nn.functional.linear(x, adapter.base_layer.weight, adapter.base_layer.bias) + (h @ f["B"].T) * adapter.scale

    ours, theirs = saved(lambda: adapter(x)), saved(general)
    assert ours == theirs, (ours, theirs)
    assert (adapter.base_layer.weight.numel() * 8, (5, 7)) in ours if input_grad else all(s != (5, 7) for _, s in ours)


def dora_for(bias=True, dtype=torch.float64):
    torch.manual_seed(0)
    base = nn.Linear(7, 5, bias=bias).to(dtype).requires_grad_(False)
    adapter = ADAPTER_CLASSES["dora"](base, rank=3, scale=0.7)
    with torch.no_grad():
        adapter.A.normal_()
        adapter.B.normal_()
    adapter.finish_init()
    with torch.no_grad():
        adapter.magnitude.mul_(torch.linspace(0.5, 1.5, 5, dtype=dtype))
    adapter.set_trainable()
    return adapter


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("input_grad", [True, False])
@pytest.mark.parametrize("frozen", [None, "magnitude", "B"])
def test_dora_fused_node_equals_the_general_path(bias, input_grad, frozen):
    """DoRA's single node (plain frozen Linear, no dropout) against its general path (forced by a forward hook
    on the base layer): outputs and the gradients of exactly the tensors that need one, float64."""
    adapter = dora_for(bias)
    if frozen:
        getattr(adapter, frozen).requires_grad_(False)
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=input_grad)
    g = torch.randn(2, 4, 5, dtype=torch.float64)
    assert fused.applies(adapter, x) and adapter._fits_fused_node(x)
    results = []
    for hooked in (False, True):
        handle = adapter.base_layer.register_forward_hook(lambda m, a, out: None) if hooked else None
        assert fused.applies(adapter, x) != hooked
        adapter.zero_grad(set_to_none=True)
        x.grad = None
        y = adapter(x)
        y.backward(g)
        results.append((y.detach(), x.grad, {n: p.grad for n, p in adapter.named_parameters(recurse=False)}))
        if handle:
            handle.remove()
    (y, gx, grads), (y_ref, gx_ref, grads_ref) = results
    assert rel(y, y_ref) < 1e-13
    assert (gx is None) == (not input_grad) and (gx is None or rel(gx, gx_ref) < 1e-12)
    assert set(n for n, v in grads.items() if v is not None) == set(n for n, v in grads_ref.items() if v is not None)
    for name, grad in grads.items():
        assert (grad is None) == (name == frozen), name
        if grad is not None:
            assert rel(grad, grads_ref[name]) < 1e-12, name
    assert adapter.base_layer.weight.grad is None


def test_dora_fused_node_keeps_no_more_for_backward_than_autograds_graph():
    adapter = dora_for()
    x = torch.randn(64, 7, dtype=torch.float64, requires_grad=True)

    def saved_bytes(run) -> int:
        kept = {}

        def pack(t):
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        return sum(kept.values())

    ours = saved_bytes(lambda: adapter(x))
    handle = adapter.base_layer.register_forward_hook(lambda m, a, out: None)
    theirs = saved_bytes(lambda: adapter(x))
    handle.remove()
    assert ours <= theirs, (ours, theirs)


def test_dora_in_bfloat16_or_with_dropout_takes_the_general_path():
    adapter = dora_for(dtype=torch.bfloat16)
    x = torch.randn(3, 7, dtype=torch.bfloat16)
    assert not adapter._fits_fused_node(x)  # the general path runs its product in float32
    dropped = ADAPTER_CLASSES["dora"](nn.Linear(7, 5).double().requires_grad_(False), rank=3, scale=0.7, dropout=0.1)
    assert not fused.applies(dropped, torch.randn(3, 7, dtype=torch.float64))


def test_dora_norm_stays_float32_under_autocast():
    """‖W + s·BA‖ is computed in float32 even under bf16 autocast (not rounded through bfloat16)."""
    adapter = dora_for(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        V, norm = adapter.direction()
    assert V.dtype == norm.dtype == torch.float32
    W, A, B = (t.detach().double() for t in (adapter.base_layer.weight, adapter.A, adapter.B))
    assert rel(norm.double(), (W + 0.7 * B @ A).norm(dim=1)) < 1e-6
