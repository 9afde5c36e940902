"""torch.compile over adapted models: one graph (no break) in training mode for every structure and
model family, and compiled training steps equal to eager ones (float32 tolerance).

The backend is "aot_eager": dynamo's capture and AOT autograd (what inductor compiles), no C++ build."""

import copy

import pytest
import torch
from conftest import MODELS, batch_for, perturb_trainables

import lorakit

# one method per structure: lora, lora-fa (frozen A), dora (magnitude), xs (frozen B, A; trained R)
STRUCTURE_METHODS = ["lora", "lora-fa", "dora", "lora-xs"]


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("method", STRUCTURE_METHODS)
def test_adapters_add_no_graph_break_in_training_mode(kind, method):
    """The adapted model's forward + loss is captured in as many graphs as the unadapted model's: one for
    BERT and Llama; GPT-2's own loss code (transformers) breaks once, with or without adapters."""

    def explained(model):
        model.train()
        torch._dynamo.reset()
        return torch._dynamo.explain(lambda **b: model(**b).loss)(**batch_for(kind))

    base = explained(MODELS[kind](dtype=torch.float32))
    model = MODELS[kind](dtype=torch.float32)
    lorakit.adapt(model, lorakit.AdapterConfig(method=method, rank=4, dropout=0.1))
    adapted = explained(model)
    assert adapted.graph_break_count == base.graph_break_count, adapted.break_reasons
    assert adapted.graph_count == base.graph_count
    if kind != "gpt2":
        assert adapted.graph_count == 1 and adapted.graph_break_count == 0
    assert all("modeling_gpt2" in str(r.user_stack) for r in adapted.break_reasons)  # none in lorakit's code


@pytest.mark.parametrize("kind", ["bert", "llama"])
@pytest.mark.parametrize("method, preconditioner", [("lora", None), ("lora", "riemannian"), ("dora", None), ("lora-xs", None)])
def test_compiled_steps_equal_eager_steps(kind, method, preconditioner):
    """Three AdamW steps (forward, backward, step) through torch.compile and eagerly from the same state:
    the same losses, gradients and parameters (float32, dropout 0 so both see the same function)."""
    eager = MODELS[kind](dtype=torch.float32)
    lorakit.adapt(eager, lorakit.AdapterConfig(method=method, rank=4))
    perturb_trainables(eager, scale=0.1)  # B ≠ 0: the adapters change the function and both Grams matter
    for module in eager.modules():  # the model's own dropout too (BERT's 0.1): both runs see one function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    twin = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    optimizers = [lorakit.make_optimizer(m, "adamw", lr=1e-2, preconditioner=preconditioner) for m in (eager, twin)]
    for m in (eager, twin):
        m.train()
    for step in range(3):
        batch = batch_for(kind, seed=step)
        losses = []
        for module, opt in zip((eager, compiled), optimizers):
            opt.zero_grad(set_to_none=True)
            loss = module(**batch).loss
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6, msg=f"step {step}: loss")
        named = dict(twin.named_parameters())
        for name, p in eager.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(named[name].grad, p.grad, rtol=1e-4, atol=1e-6, msg=f"step {step}: ∇{name}")
                torch.testing.assert_close(named[name], p, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")
    trained = sum(p.requires_grad for p in eager.parameters())
    assert trained > 0 and all(len(opt.state) == trained for opt in optimizers)
