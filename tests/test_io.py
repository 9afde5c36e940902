"""save_adapter → fresh model → load_adapter reproduces the outputs; bad files are clear errors."""

import json

import pytest
import torch
from conftest import MODELS, batch_for, logits, perturb_trainables

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
    layers = [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    expected = [f"adapter.{n}.{k}" for n in layers for k in ("A", "B", "offset_A", "offset_B")] + [f"fingerprint.{n}" for n in layers]
    assert keys == sorted(expected)


def test_save_refuses_a_non_empty_directory_and_overwrite_keeps_other_files(tmp_path):
    model = lorakit.adapt(MODELS["bert"](), lorakit.AdapterConfig(rank=2))
    target = tmp_path / "a"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(lorakit.LorakitError, match="already exists and is not empty.*overwrite=True"):
        lorakit.save_adapter(model, target)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    lorakit.save_adapter(model, target, overwrite=True)
    perturb_trainables(model)
    lorakit.save_adapter(model, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in target.iterdir()) == sorted(["notes.txt", CONFIG_FILE, TENSOR_FILE])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left
    fresh = lorakit.load_adapter(MODELS["bert"](), target)
    assert torch.equal(logits(fresh, batch_for("bert")), logits(model, batch_for("bert")))


def test_save_into_an_empty_directory_and_refuses_a_file(tmp_path):
    model = lorakit.adapt(MODELS["bert"](), lorakit.AdapterConfig(rank=2))
    (tmp_path / "empty").mkdir()
    lorakit.save_adapter(model, tmp_path / "empty")
    assert (tmp_path / "empty" / TENSOR_FILE).is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(lorakit.LorakitError, match="is a file, not a directory"):
        lorakit.save_adapter(model, tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "x"


def test_saved_files_honour_the_umask(tmp_path):
    import os
    import stat

    model = lorakit.adapt(MODELS["bert"](), lorakit.AdapterConfig(rank=2))
    old = os.umask(0o022)
    try:
        lorakit.save_adapter(model, tmp_path / "a")
        lorakit.export_peft(model, tmp_path / "p")
    finally:
        os.umask(old)
    for directory in (tmp_path / "a", tmp_path / "p"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o755
        for f in directory.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_a_flipped_byte_in_the_tensor_file_is_refused(tmp_path):
    model = lorakit.adapt(MODELS["bert"](), lorakit.AdapterConfig(rank=2))
    perturb_trainables(model)
    lorakit.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / TENSOR_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # inside the last tensor's values: safetensors itself cannot notice
    path.write_bytes(bytes(data))
    with pytest.raises(lorakit.LorakitError, match="does not match the checksum"):
        lorakit.load_adapter(MODELS["bert"](), tmp_path / "a")


def test_non_finite_adapters_are_never_saved_or_exported(tmp_path):
    model = lorakit.adapt(MODELS["bert"](), lorakit.AdapterConfig(rank=2))
    adapter = next(iter(lorakit.adapters_of(model).values()))
    with torch.no_grad():
        adapter.B[0, 0] = float("nan")
    with pytest.raises(lorakit.LorakitError, match="NaN or infinite.*refusing to save"):
        lorakit.save_adapter(model, tmp_path / "a")
    with pytest.raises(lorakit.LorakitError, match="NaN or infinite"):
        lorakit.export_peft(model, tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("damage", ["missing tensor", "wrong shape", "unknown module", "bad config"])
def test_a_failed_load_leaves_the_model_as_it_was(tmp_path, damage):
    from safetensors.torch import load_file, save_file

    model = lorakit.adapt(MODELS["llama"](), lorakit.AdapterConfig(method="pissa", rank=2))
    lorakit.save_adapter(model, tmp_path / "a")
    meta_path, tensor_path = tmp_path / "a" / CONFIG_FILE, tmp_path / "a" / TENSOR_FILE
    meta, tensors = json.loads(meta_path.read_text()), load_file(str(tensor_path))
    last = sorted(k for k in tensors if k.startswith("adapter."))[-1]
    if damage == "missing tensor":
        del tensors[last]
    elif damage == "wrong shape":
        tensors[last] = torch.zeros(1, 1, dtype=tensors[last].dtype)
    elif damage == "unknown module":
        meta["modules_to_save"] = ["lm_head_that_is_not_there"]
    else:
        meta["config"]["rank"] = -1
    save_file(tensors, str(tensor_path))
    from lorakit.io import sha256_of

    meta["tensors_sha256"] = sha256_of(tensor_path)
    meta_path.write_text(json.dumps(meta))
    fresh = MODELS["llama"]()
    before = _state(fresh)
    flags = {n: p.requires_grad for n, p in fresh.named_parameters()}
    with pytest.raises(lorakit.LorakitError):
        lorakit.load_adapter(fresh, tmp_path / "a")
    after = _state(fresh)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p.requires_grad for n, p in fresh.named_parameters()} == flags
    assert not lorakit.adapters_of(fresh) and not hasattr(fresh, "lorakit_config")


def test_another_fine_tune_of_the_same_base_is_detected_and_another_dtype_is_not(tmp_path):
    model = lorakit.adapt(MODELS["llama"](), lorakit.AdapterConfig(rank=2))
    lorakit.save_adapter(model, tmp_path / "a")
    tuned = MODELS["llama"]()
    with torch.no_grad():  # a short fine-tune of one layer: its weights move by about 0.1 % of their values
        w = tuned.model.layers[1].mlp.down_proj.weight
        w.mul_(1 + 1e-3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=w.dtype))
    with pytest.raises(lorakit.LorakitError, match=r"layer 'model\.layers\.1\.mlp\.down_proj' has different base weights"):
        lorakit.load_adapter(tuned, tmp_path / "a")
    lorakit.load_adapter(tuned, tmp_path / "a", check_base=False)  # the user's override
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        lorakit.load_adapter(MODELS["llama"]().to(dtype), tmp_path / "a")  # the same weights, rounded


def test_fingerprint_tolerance_is_the_rounding_of_the_two_dtypes():
    from lorakit.io import base_fingerprint, fingerprint_differs

    W = torch.randn(64, 48, dtype=torch.float64)
    saved = base_fingerprint(W)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert fingerprint_differs(saved, torch.float64, base_fingerprint(W.to(dtype)), dtype) <= 0
    moved = W.clone()
    moved.view(-1)[0] += 0.05 * W.abs().max()  # position 0 is always sampled
    assert fingerprint_differs(saved, torch.float32, base_fingerprint(moved), torch.float32) > 0


def test_corrupted_tensor_file_is_a_clear_error(tmp_path):
    model = lorakit.adapt(MODELS["bert"](), lorakit.AdapterConfig(rank=2))
    lorakit.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / TENSOR_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(lorakit.LorakitError, match="does not match the checksum"):
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
    from lorakit.files import atomic_file

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
