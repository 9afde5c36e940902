"""save_adapter → fresh model → load_adapter reproduces the outputs; bad files are clear errors."""

import json

import pytest
import torch
from conftest import MODELS, batch_for, logits, perturb_trainables, rel

import lorakit
from lorakit.io import CONFIG_FILE, TENSOR_FILE

DATA_FREE = ["lora", "gaussian", "pissa", "svd-fa", "lora-fa", "dora", "lora-xs"]


@pytest.mark.parametrize("method", DATA_FREE)
def test_save_then_load_on_fresh_model_gives_identical_outputs(tmp_path, model_kind, method):
    model = lorakit.adapt(MODELS[model_kind](), lorakit.AdapterConfig(method=method, rank=4))
    perturb_trainables(model)
    batch = batch_for(model_kind)
    expected = logits(model, batch)
    lorakit.save_adapter(model, tmp_path / "adapter")
    fresh = lorakit.load_adapter(MODELS[model_kind](), tmp_path / "adapter")
    assert torch.equal(logits(fresh, batch), expected)
    assert lorakit.get_config(fresh) == lorakit.get_config(model)
    trainable = lambda m: {n: p for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert trainable(fresh).keys() == trainable(model).keys()


def test_saved_files_hold_only_adapter_tensors(tmp_path):
    model = lorakit.adapt(MODELS["llama"](), lorakit.AdapterConfig(method="pissa", rank=2, targets=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / TENSOR_FILE), "pt") as f:
        keys = sorted(f.keys())
    assert keys == sorted(f"adapter.model.layers.{i}.self_attn.q_proj.{k}" for i in range(2) for k in ("A", "B", "offset_A", "offset_B"))


def test_save_overwrites_atomically_and_leaves_no_temporary(tmp_path):
    model = lorakit.adapt(MODELS["bert"](), lorakit.AdapterConfig(rank=2))
    lorakit.save_adapter(model, tmp_path / "a")
    perturb_trainables(model)
    lorakit.save_adapter(model, tmp_path / "a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    fresh = lorakit.load_adapter(MODELS["bert"](), tmp_path / "a")
    assert torch.equal(logits(fresh, batch_for("bert")), logits(model, batch_for("bert")))


def test_corrupted_tensor_file_is_a_clear_error(tmp_path):
    model = lorakit.adapt(MODELS["bert"](), lorakit.AdapterConfig(rank=2))
    lorakit.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / TENSOR_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(lorakit.LorakitError, match="corrupt or truncated"):
        lorakit.load_adapter(MODELS["bert"](), tmp_path / "a")


def test_corrupted_json_and_missing_directory_are_clear_errors(tmp_path):
    with pytest.raises(lorakit.LorakitError, match="is not a lorakit adapter directory"):
        lorakit.load_adapter(MODELS["bert"](), tmp_path / "nowhere")
    model = lorakit.adapt(MODELS["bert"](), lorakit.AdapterConfig(rank=2))
    lorakit.save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(lorakit.LorakitError, match="is corrupt"):
        lorakit.load_adapter(MODELS["bert"](), tmp_path / "a")


def test_mismatched_model_is_refused(tmp_path):
    model = lorakit.adapt(MODELS["llama"](), lorakit.AdapterConfig(method="pissa", rank=2))
    lorakit.save_adapter(model, tmp_path / "a")
    with pytest.raises(lorakit.LorakitError, match=r"adapter does not match the model: layer 'model\.layers\.\d\..*' is missing in this model"):
        lorakit.load_adapter(MODELS["gpt2"](), tmp_path / "a")
    with pytest.raises(lorakit.LorakitError, match="different base weights"):
        lorakit.load_adapter(MODELS["llama"](seed=7), tmp_path / "a")
    meta = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    meta["layers"]["model.layers.0.self_attn.q_proj"]["shape"] = [8, 8]
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(lorakit.LorakitError, match=r"is \(32, 32\) here but \(8, 8\) in the adapter"):
        lorakit.load_adapter(MODELS["llama"](), tmp_path / "a")


def test_atomic_file_replaces_on_success_and_keeps_the_old_file_on_failure(tmp_path):
    from lorakit.io import atomic_file

    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("interrupted")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    with atomic_file(path) as tmp:
        assert tmp.suffix == ".json" and tmp != path
        tmp.write_text("new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
