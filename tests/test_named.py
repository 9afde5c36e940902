"""Several named adapters on one model (lorakit.named): each active one computes exactly what the
single-adapter model computes, only it trains, one merges, each saves and reloads, and the
adapters that would share moved base weights or a trained head are refused."""

import pytest
import torch
from conftest import batch_for, logits, perturb_trainables, tiny_bert, tiny_llama

import lorakit
from lorakit import AdapterConfig, LorakitError, adapters_of

BATCH = batch_for("llama")
DATA = [batch_for("llama", 3, 9, seed=1), batch_for("llama", 2, 7, seed=2)]
# name -> (config, perturbation seed, data): different structures, targets and ranks
ADAPTERS = {
    "default": (AdapterConfig(method="lora", rank=4, targets=["q_proj", "v_proj"]), 1, None),
    "xs": (AdapterConfig(method="lora-xs", rank=3, targets=["o_proj", "down_proj"], seed=5), 2, None),
    "dora": (AdapterConfig(method="dora", rank=2, targets=["q_proj", "up_proj"]), 3, None),
    "sb": (AdapterConfig(method="lora-sb", rank=2, svd="exact", lr=2e-3, targets=["k_proj", "v_proj"]), 4, DATA),
}


def single(name: str):
    """The single-adapter model of ADAPTERS[name], trained (perturbed) away from its init."""
    config, seed, data = ADAPTERS[name]
    model = lorakit.adapt(tiny_llama(), config, data=data, progress=False)
    perturb_trainables(model, seed=seed)
    return model


def several():
    """One model holding every adapter of ADAPTERS, each perturbed as its single model is; 'default' active."""
    model = single("default")
    for name, (config, seed, data) in list(ADAPTERS.items())[1:]:
        lorakit.add_adapter(model, name, config, data=data, progress=False)
        assert lorakit.active_adapter(model) == "default"  # added, not activated (as PEFT's add_adapter)
        lorakit.set_adapter(model, name)
        perturb_trainables(model, seed=seed)
        lorakit.set_adapter(model, "default")
    return model


def factors(model) -> dict[str, dict[str, torch.Tensor]]:
    """Every adapter's tensors (factors, magnitudes) by adapter name, cloned."""
    out = {}
    for name in lorakit.adapter_names(model):
        with lorakit.named.activated(model, name):
            out[name] = {f"{layer}.{key}": p.detach().clone() for layer, a in adapters_of(model).items()
                         for key, p in a.named_parameters(recurse=False)}
    return out


def test_each_active_adapter_computes_its_single_adapter_model_exactly_and_disabled_the_base():
    model = several()
    assert lorakit.adapter_names(model) == list(ADAPTERS)
    for name in ADAPTERS:
        lorakit.set_adapter(model, name)
        assert model.active_adapter == name
        assert torch.equal(logits(model, BATCH), logits(single(name), BATCH)), name
        with lorakit.adapters_disabled(model):
            assert torch.equal(logits(model, BATCH), logits(tiny_llama(), BATCH)), name
    assert lorakit.parameter_report(model).trainable == lorakit.parameter_report(single("sb")).trainable


def test_switching_then_training_one_step_changes_only_the_active_adapters_factors():
    model = several()
    base = {k: v.clone() for k, v in tiny_llama().state_dict().items()}
    before = factors(model)
    lorakit.set_adapter(model, "xs")
    model.train()
    optimizer = lorakit.make_optimizer(model, "adamw", lr=1e-2)
    model(**BATCH).loss.backward()
    optimizer.step()
    after = factors(model)
    assert lorakit.active_adapter(model) == "xs"
    for name in ADAPTERS:
        for key, value in before[name].items():
            changed = not torch.equal(after[name][key], value)
            assert changed == (name == "xs" and key.endswith(".R")), (name, key)  # lora-xs trains R only
    with lorakit.adapters_disabled(model):
        plain = {n: a.base_layer for n, a in adapters_of(model).items()}
        for layer, module in plain.items():
            assert torch.equal(module.weight, base[f"{layer}.weight"])


def test_merging_one_named_adapter_gives_that_adapter_active_unmerged():
    for name in ("xs", "dora"):
        model = several()
        lorakit.set_adapter(model, name)
        expected = logits(model, BATCH)
        lorakit.set_adapter(model, "default")
        merged = lorakit.merge(model, adapter_name=name) if name == "xs" else model.merge_and_unload(adapter_names=[name])
        assert not adapters_of(merged) and "active_adapter" not in vars(merged) and "lorakit_adapters" not in vars(merged)
        assert torch.allclose(logits(merged, BATCH), expected, rtol=0, atol=1e-10), name


def test_each_named_adapter_saves_and_loads_beside_the_others(tmp_path):
    model = several()
    for name in ADAPTERS:  # saved by name while 'default' stays active
        lorakit.save_adapter(model, tmp_path / name, adapter_name=name)
        assert lorakit.active_adapter(model) == "default"
    lorakit.export_peft(model, tmp_path / "peft-xs", adapter_name="xs")
    reloaded = lorakit.load(tiny_llama(), tmp_path / "default")
    assert lorakit.adapter_names(reloaded) == ["default"]
    for name in list(ADAPTERS)[1:]:
        lorakit.load(reloaded, tmp_path / name, adapter_name=name)
    reloaded.load_adapter(tmp_path / "peft-xs", adapter_name="peft-xs")  # PEFT's call; xs exported as plain LoRA
    assert lorakit.adapter_names(reloaded) == [*ADAPTERS, "peft-xs"] and reloaded.active_adapter == "default"
    for name in ADAPTERS:
        lorakit.set_adapter(model, name)
        reloaded.set_adapter(name)
        assert torch.equal(logits(reloaded, BATCH), logits(model, BATCH)), name
    reloaded.set_adapter("peft-xs")
    assert torch.allclose(logits(reloaded, BATCH), logits(single("xs"), BATCH), rtol=0, atol=1e-10)
    named = lorakit.load(tiny_llama(), tmp_path / "xs", adapter_name="math")
    assert named.active_adapter == "math" and lorakit.adapter_names(named) == ["math"]


def test_peft_style_calls_add_switch_delete():
    model = single("default")
    model.add_adapter("xs", ADAPTERS["xs"][0])
    model.set_adapter("xs")
    assert model.active_adapter == "xs" and lorakit.get_config(model) is ADAPTERS["xs"][0]
    model.delete_adapter("xs")  # the active one: the first remaining becomes active (as PEFT)
    assert model.active_adapter == "default" and lorakit.adapter_names(model) == ["default"]
    assert torch.equal(logits(model, BATCH), logits(single("default"), BATCH))
    with pytest.raises(LorakitError, match="'default' is the model's only adapter; fold it in with lorakit.merge"):
        model.delete_adapter("default")


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, lorakit.adapter_names(model), lorakit.active_adapter(model)


def _unchanged(model, state):
    tensors, names, active = state
    now = model.state_dict()
    assert set(now) == set(tensors) and all(torch.equal(now[k], v) for k, v in tensors.items())
    assert lorakit.adapter_names(model) == names and lorakit.active_adapter(model) == active


@pytest.mark.parametrize("first, second, message", [
    ("lora", "pissa", r"init 'pissa' moves the base weights \(W − s·B₀A₀\), which the model's other adapters \(default\) share"),
    ("lora", "lora-ga", r"init 'lora-ga' moves the base weights"),
    ("pissa", "lora", r"adapter 'default' \(init 'pissa'\) moved the base weights .* merge it first"),
])
def test_adapters_that_would_share_moved_base_weights_are_refused(first, second, message):
    model = lorakit.adapt(tiny_llama(), AdapterConfig(method=first, rank=2, targets=["q_proj"]))
    state = _state(model)
    with pytest.raises(LorakitError, match=message):
        lorakit.add_adapter(model, "b", AdapterConfig(method=second, rank=2, targets=["q_proj"]), data=DATA)
    _unchanged(model, state)


def test_loading_a_saved_base_moving_adapter_beside_another_is_refused(tmp_path):
    lorakit.save_adapter(lorakit.adapt(tiny_llama(), AdapterConfig(method="pissa", rank=2, targets=["q_proj"])), tmp_path / "p")
    model = single("default")
    state = _state(model)
    with pytest.raises(LorakitError, match=r"the adapter in .*p moves the base weights"):
        lorakit.load(model, tmp_path / "p", adapter_name="p")
    _unchanged(model, state)
    with pytest.raises(LorakitError, match=r"the model has adapters already \(default\); pass adapter_name="):
        lorakit.load(model, tmp_path / "p")


def test_a_trained_head_is_not_shared_between_adapters():
    model = lorakit.adapt(tiny_bert(), AdapterConfig(rank=2, targets=["query"]))  # trains 'classifier' by default
    with pytest.raises(LorakitError, match=r"adapter 'default' trains module 'classifier' fully .*modules_to_save=\[\]"):
        lorakit.add_adapter(model, "b", AdapterConfig(rank=2, targets=["value"], modules_to_save=[]))
    model = lorakit.adapt(tiny_bert(), AdapterConfig(rank=2, targets=["query"], modules_to_save=[]))
    with pytest.raises(LorakitError, match=r"init 'lora' trains module 'classifier' fully"):
        lorakit.add_adapter(model, "b", AdapterConfig(rank=2, targets=["value"]))
    lorakit.add_adapter(model, "b", AdapterConfig(rank=2, targets=["value"], modules_to_save=[]))
    assert lorakit.adapter_names(model) == ["default", "b"]


def test_unknown_duplicate_and_blocked_switches_are_one_line_errors():
    model = several()
    state = _state(model)
    with pytest.raises(LorakitError, match=r"no adapter named 'dorа'.*its adapters: default, xs, dora, sb$"):
        lorakit.set_adapter(model, "dorа")  # a Cyrillic 'а'
    with pytest.raises(LorakitError, match=r"already has an adapter named 'xs'"):
        lorakit.add_adapter(model, "xs", ADAPTERS["xs"][0])
    with lorakit.adapters_disabled(model), pytest.raises(LorakitError, match="while adapters are disabled"):
        lorakit.set_adapter(model, "xs")
    _unchanged(model, state)
    next(iter(adapters_of(model).values())).merge()
    with pytest.raises(LorakitError, match="'default' is merged into the base weights; call unmerge"):
        lorakit.set_adapter(model, "xs")


def test_a_failed_add_leaves_the_model_as_it_was():
    model = several()
    state = _state(model)
    with pytest.raises(LorakitError, match="target 'nope' matched no module"):
        lorakit.add_adapter(model, "new", AdapterConfig(rank=2, targets=["nope"]))
    with pytest.raises(LorakitError, match="initialises from gradients: pass data="):
        lorakit.add_adapter(model, "new", AdapterConfig(method="lora-sb", rank=2))
    _unchanged(model, state)
    assert torch.equal(logits(model, BATCH), logits(single("default"), BATCH))


def test_two_peft_folders_switch_as_in_peft(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    for name, targets in (("a", ["q_proj", "v_proj"]), ("b", ["o_proj", "up_proj"])):
        peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        peft_model.save_pretrained(tmp_path / name)
    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a", adapter_name="a")
    theirs.load_adapter(tmp_path / "b", adapter_name="b")
    ours = lorakit.load(tiny_llama(), tmp_path / "a", adapter_name="a")
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    for name in ("b", "a"):
        theirs.set_adapter(name)
        ours.set_adapter(name)
        expected = logits(theirs, BATCH)
        assert (logits(ours, BATCH) - expected).abs().max() <= 1e-6 * expected.abs().max(), name
