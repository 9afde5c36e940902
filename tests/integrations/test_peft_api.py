"""What a PEFT user expects: PEFT LoRA folders import into lorakit (same function, same optimizer step),
``lorakit.load`` takes either format, and the PeftModel calls exist on an adapted model."""

import contextlib
import io
import json

import pytest
import torch
from conftest import MODELS, batch_for, logits, perturb_trainables, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from peft.optimizers import create_riemannian_optimizer

import lorakit
from lorakit import AdapterConfig, LorakitError

CASES = {
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"),
    "llama-rslora": dict(target_modules=["q_proj", "o_proj"], use_rslora=True, lora_alpha=5, task_type="CAUSAL_LM"),
    "gpt2": dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, task_type="CAUSAL_LM"),  # Conv1D
    "bert-dora": dict(target_modules=["query", "value"], use_dora=True, task_type="SEQ_CLS"),  # + classifier head
}


def peft_folder(tmp_path, case: str):
    """A PEFT LoRA adapter with random (non-zero) factors, saved by PEFT; returns (folder, PeftModel)."""
    kind = case.split("-")[0]
    options = dict(r=4, lora_alpha=8, init_lora_weights=False) | CASES[case]
    peft_model = get_peft_model(MODELS[kind](), LoraConfig(**options))
    perturb_trainables(peft_model, scale=0.05)
    peft_model.save_pretrained(tmp_path / "peft")
    reloaded = PeftModel.from_pretrained(MODELS[kind](), tmp_path / "peft", is_trainable=True).eval()
    return tmp_path / "peft", reloaded, kind


@pytest.mark.parametrize("case", CASES)
def test_imported_peft_adapter_gives_peft_logits(tmp_path, case):
    folder, peft_model, kind = peft_folder(tmp_path, case)
    model = lorakit.import_peft(MODELS[kind](), folder).eval()
    batch = batch_for(kind)
    expected = logits(peft_model, batch)
    got = logits(model, batch)
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()
    base = MODELS[kind]()
    for name in lorakit.get_config(model).modules_to_save:  # trained heads stay when adapters are disabled
        base.get_submodule(name).load_state_dict(model.get_submodule(name).state_dict())
    with model.disable_adapter():  # the base function exactly
        assert torch.equal(logits(model, batch), logits(base, batch))
    # saved as a lorakit adapter and reloaded: still PEFT's function
    lorakit.save_adapter(model, tmp_path / "lorakit")
    again = lorakit.load(MODELS[kind](), tmp_path / "lorakit")
    assert torch.equal(logits(again, batch), got)


def test_riemannian_step_on_an_imported_adapter_equals_peft_riemannian_optimizer(tmp_path):
    folder, peft_model, kind = peft_folder(tmp_path, "llama")
    model = lorakit.import_peft(tiny_llama(), folder)
    peft_model.train(), model.train()
    lr, reg = 1e-2, 1e-3
    ours = lorakit.make_optimizer(model, "adamw", lr=lr, preconditioner="riemannian", damping=reg)
    theirs = create_riemannian_optimizer(peft_model, torch.optim.AdamW, lr=lr, reg=reg, weight_decay=0.0)
    batch = batch_for(kind)
    for m, opt in ((model, ours), (peft_model, theirs)):
        m(**batch).loss.backward()
        opt.step()
    peft_params = dict(peft_model.named_parameters())
    for name, adapter in lorakit.adapters_of(model).items():
        for role in ("A", "B"):
            theirs_now = peft_params[f"base_model.model.{name}.lora_{role}.default.weight"]
            assert torch.allclose(getattr(adapter, role), theirs_now, rtol=1e-9, atol=1e-12), (name, role)


def test_load_takes_a_model_folder_and_either_adapter_format(tmp_path):
    folder, peft_model, kind = peft_folder(tmp_path, "llama")
    tiny_llama().save_pretrained(tmp_path / "base")
    model = lorakit.load(str(tmp_path / "base"), folder)
    assert type(model).__name__ == "LlamaForCausalLM"
    batch = batch_for(kind)
    model = model.to(torch.float64)
    assert torch.allclose(logits(model, batch), logits(peft_model, batch), rtol=0, atol=1e-10)
    with pytest.raises(LorakitError, match="neither a lorakit adapter .* nor a PEFT adapter"):
        lorakit.load(tiny_llama(), tmp_path / "base")


def test_peft_style_calls_on_an_adapted_model():
    config = dict(rank=4, targets=["q_proj", "v_proj"])
    model = lorakit.adapt(tiny_llama(), AdapterConfig(**config))
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    printed = []
    for m in (model, peft_model):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            m.print_trainable_parameters()
        printed.append(out.getvalue())
    assert printed[0] == printed[1]  # PEFT's line, same counts
    perturb_trainables(model)
    batch = batch_for("llama")
    adapted = logits(model, batch)
    with model.disable_adapter():
        assert torch.equal(logits(model, batch), logits(tiny_llama(), batch))
    plain = model.merge_and_unload()
    assert plain is model and not lorakit.adapters_of(plain) and "merge_and_unload" not in vars(plain)
    assert torch.allclose(logits(plain, batch), adapted, rtol=0, atol=1e-10)


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.mark.parametrize("change, message", [
    (dict(peft_type="IA3"), "is a PEFT IA3 adapter; lorakit imports PEFT LoRA adapters"),
    (dict(lora_bias=True), "sets lora_bias=True, which lorakit adapters do not support"),
])
def test_unsupported_peft_adapters_are_named(tmp_path, change, message):
    folder, _, _ = peft_folder(tmp_path, "llama")
    _edit_config(folder, **change)
    model = tiny_llama()
    with pytest.raises(LorakitError, match=message):
        lorakit.import_peft(model, folder)
    assert not lorakit.adapters_of(model)


def test_a_peft_adapter_of_another_base_is_refused_naming_the_layer(tmp_path):
    folder, _, _ = peft_folder(tmp_path, "llama")
    other = tiny_llama()
    other.model.layers[1].mlp.down_proj = torch.nn.Linear(48, 32, bias=False, dtype=torch.float64)  # different shape
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(LorakitError, match=r"layer 'model.layers.1.mlp.down_proj' is 32 × 48 here"):
        lorakit.import_peft(other, folder)
    assert not lorakit.adapters_of(other) and all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())
