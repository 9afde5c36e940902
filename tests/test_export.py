"""Leaving lorakit: merged plain models and PEFT adapters relative to the original base."""

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import MODELS, batch_for, logits, perturb_trainables, rel

import lorakit

peft = pytest.importorskip("peft")

EXPORTED = ["lora", "lora-fa", "pissa", "svd-fa", "lora-xs", "dora", "gaussian"]


@pytest.mark.parametrize("method", EXPORTED)
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_export_loads_in_peft_with_same_logits(tmp_path, model_kind, method, rslora):
    model = lorakit.adapt(MODELS[model_kind](), lorakit.AdapterConfig(method=method, rank=4, alpha=6, use_rslora=rslora))
    perturb_trainables(model, scale=0.05)
    batch = batch_for(model_kind)
    expected = logits(model, batch)
    lorakit.export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(MODELS[model_kind](), tmp_path / "peft").eval()
    assert rel(logits(loaded, batch), expected) < 1e-10
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    base_moved = method in ("pissa", "svd-fa")
    assert config["r"] == (8 if base_moved else 4)
    assert config["use_dora"] == (method == "dora")


def test_peft_export_of_merged_adapters_uses_the_same_factors(tmp_path):
    model = lorakit.adapt(MODELS["llama"](), lorakit.AdapterConfig(method="pissa", rank=4))
    perturb_trainables(model, scale=0.05)
    batch = batch_for("llama")
    expected = logits(model, batch)
    for adapter in lorakit.adapters_of(model).values():
        adapter.merge()
    lorakit.export_peft(model, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path / "peft").eval()
    assert rel(logits(loaded, batch), expected) < 1e-10


def test_lora_xs_exports_at_rank_r_through_r_times_a(tmp_path):
    model = lorakit.adapt(MODELS["gpt2"](), lorakit.AdapterConfig(method="lora-xs", rank=3))
    perturb_trainables(model)
    lorakit.export_peft(model, tmp_path / "peft")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    for name, adapter in lorakit.adapters_of(model).items():
        lora_A = tensors[f"base_model.model.{name}.lora_A.weight"]
        assert lora_A.shape == (3, adapter.in_features)
        assert torch.allclose(lora_A, adapter.R @ adapter.A, rtol=0, atol=1e-14)


@pytest.mark.parametrize("method", ["lora", "pissa", "dora", "lora-xs"])
def test_merge_gives_plain_model_that_save_pretrained_round_trips(tmp_path, model_kind, method):
    model = lorakit.adapt(MODELS[model_kind](), lorakit.AdapterConfig(method=method, rank=4))
    perturb_trainables(model, scale=0.05)
    batch = batch_for(model_kind)
    expected = logits(model, batch)
    merged = lorakit.merge(model)
    assert not lorakit.adapters_of(merged)
    assert rel(logits(merged, batch), expected) < 1e-12
    assert set(merged.state_dict()) == set(MODELS[model_kind]().state_dict())
    merged.save_pretrained(tmp_path / "merged")
    reloaded = type(merged).from_pretrained(tmp_path / "merged", dtype=torch.float64).eval()
    assert rel(logits(reloaded, batch), expected) < 1e-12


# -- vLLM ---------------------------------------------------------------------------------------
def _vllm_validates(folder) -> None:
    """vLLM's own check of the adapter config, when vllm is importable (bench/vllm_check.py runs vLLM for real)."""
    try:
        from vllm.config.lora import LoRAConfig
        from vllm.lora.peft_helper import PEFTHelper
    except ImportError:
        return
    from lorakit.export import vllm_max_lora_rank

    config = json.loads((folder / "adapter_config.json").read_text())
    rank = max([config["r"], *config["rank_pattern"].values()])
    PEFTHelper.from_local_dir(str(folder), None).validate_legal(LoRAConfig(max_lora_rank=vllm_max_lora_rank(rank)))


@pytest.mark.parametrize("method, rslora", [("lora", False), ("lora", True), ("pissa", False), ("lora-xs", False),
                                            ("gaussian", False), ("svd-fa", False)])
def test_vllm_export_is_a_peft_adapter_of_the_original_base(tmp_path, method, rslora):
    model = lorakit.adapt(MODELS["llama"](), lorakit.AdapterConfig(method=method, rank=4, use_rslora=rslora))
    perturb_trainables(model, scale=0.05)
    batch = batch_for("llama")
    expected = logits(model, batch)
    lorakit.export_vllm(model, tmp_path / "vllm")
    loaded = peft.PeftModel.from_pretrained(MODELS["llama"](), tmp_path / "vllm").eval()
    assert rel(logits(loaded, batch), expected) < 1e-10
    config = json.loads((tmp_path / "vllm" / "adapter_config.json").read_text())
    assert not config["use_dora"] and not config["modules_to_save"] and config["init_lora_weights"] is True
    _vllm_validates(tmp_path / "vllm")


def _big_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=520, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=16)
    return LlamaForCausalLM(config).to(torch.float64)


@pytest.mark.parametrize("build, config, message", [
    (MODELS["llama"], dict(method="dora"), "vLLM does not serve DoRA adapters; export the merged model"),
    (MODELS["bert"], dict(method="lora"), "trains module 'classifier' fully .* export the merged model"),
    (_big_llama, dict(method="pissa", rank=260, targets=["q_proj"]), "rank as plain LoRA is 520, above vLLM's largest"),
])
def test_vllm_export_refuses_what_vllm_cannot_serve(tmp_path, build, config, message):
    model = lorakit.adapt(build(), lorakit.AdapterConfig(**{"rank": 4, **config}))
    with pytest.raises(lorakit.LorakitError, match=message):
        lorakit.export_vllm(model, tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


def test_vllm_max_lora_rank_is_the_smallest_allowed_value_that_fits():
    from lorakit.export import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank

    for rank in range(1, 513):
        chosen = vllm_max_lora_rank(rank)
        assert chosen in VLLM_MAX_LORA_RANKS and chosen >= rank
        assert all(r < rank for r in VLLM_MAX_LORA_RANKS if r < chosen)
    with pytest.raises(lorakit.LorakitError, match="above vLLM's largest max_lora_rank 512"):
        vllm_max_lora_rank(513)


def test_cli_vllm_export_prints_the_serve_line(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "recipes"))
    import assets

    from lorakit.cli import main

    config = assets.causal_config(tmp_path, adapter={"method": "pissa", "rank": 4}, train={"max_steps": 2}, output={"plot": False})
    assert main(["train", "--config", str(assets.write_yaml(tmp_path / "c.yaml", config)), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--format", "vllm"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "run" / "vllm"
    assert f"--max-lora-rank 8 --lora-modules adapter={folder.resolve()}" in out  # pissa: rank 2r = 8
    assert json.loads((folder / "adapter_config.json").read_text())["r"] == 8
    _vllm_validates(folder)


@pytest.mark.parametrize("method, rank", [("lora", 5), ("pissa", 4), ("lora-xs", 12)])
def test_vllm_serve_hint_gives_both_server_forms_with_the_rank_of_the_written_tensors(tmp_path, method, rank):
    import shlex

    from safetensors.torch import load_file

    from lorakit.export import vllm_max_lora_rank, vllm_serve_hint

    model = lorakit.adapt(MODELS["llama"](), lorakit.AdapterConfig(method=method, rank=rank))
    folder = tmp_path / "an adapter"  # a space: the lines must stay copy-pasteable
    lorakit.export_vllm(model, folder, base_model_name_or_path="org/base model")
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    written = max(t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight"))
    serve, module = vllm_serve_hint(folder).splitlines()
    first = shlex.split(serve.rsplit("  (", 1)[0])
    second = shlex.split(module.split(": ", 1)[1])
    assert first[:3] == ["vllm", "serve", "org/base model"]
    assert second[:5] == ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "org/base model"]
    assert first[3:] == second[5:]  # the same server options in both forms
    options = first[3:]
    assert "--enable-lora" in options
    assert int(options[options.index("--max-lora-rank") + 1]) == vllm_max_lora_rank(written)
    assert options[options.index("--lora-modules") + 1] == f"adapter={folder.resolve()}"
    assert f"(adapter rank {written})" in serve


@pytest.mark.parametrize("key, dtype", [("dtype", "float32"), ("torch_dtype", "bfloat16"), (None, None)])
def test_vllm_serve_hint_names_the_dtype_of_a_local_base_folder(tmp_path, key, dtype):
    """vLLM's default dtype (auto) serves a float32 base in bfloat16, whose greedy tokens are not the merged float32
    model's; the hint names the local base folder's own dtype (none for a hub name or a config without one)."""
    import shlex

    from lorakit.export import vllm_serve_hint

    base = tmp_path / "base model"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama", **({key: dtype} if key else {})}))
    model = lorakit.adapt(MODELS["llama"](), lorakit.AdapterConfig(method="lora", rank=4))
    for name, expected in ((str(base), dtype), ("org/base", None)):
        folder = lorakit.export_vllm(model, tmp_path / f"adapter-{len(name)}", base_model_name_or_path=name)
        serve, module = vllm_serve_hint(folder).splitlines()
        for options in (shlex.split(serve.rsplit("  (", 1)[0])[3:], shlex.split(module.split(": ", 1)[1])[5:]):
            assert (options[options.index("--dtype") + 1] if "--dtype" in options else None) == expected


VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"  # made by bench/vllm_check.py
VLLM_LOADER = """
import json, sys
import torch
from safetensors.torch import load_file
from vllm.config.lora import LoRAConfig
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper

report = {}
for name, folder, max_rank, smaller in json.loads(sys.argv[1]):
    helper = PEFTHelper.from_local_dir(folder, None)
    try:
        helper.validate_legal(LoRAConfig(max_lora_rank=max_rank))
    except ValueError as error:
        report[name] = {"refused": str(error)}
        continue
    try:
        helper.validate_legal(LoRAConfig(max_lora_rank=smaller))
        refused_smaller = False
    except ValueError:
        refused_smaller = True
    modules = {t.rsplit(".", 1)[-1] for t in helper.target_modules}
    model = LoRAModel.from_local_checkpoint(folder, modules, helper, device="cpu", dtype=torch.float64)
    expected = load_file(folder + ".delta.safetensors")
    errors = {}
    for module, weights in model.loras.items():
        delta = weights.scaling * weights.lora_b.double() @ weights.lora_a.double()
        errors[module] = ((delta - expected[module]).norm() / expected[module].norm()).item()
    report[name] = {"refused_smaller": refused_smaller, "modules": sorted(expected), "errors": errors}
print(json.dumps(report))
"""


@pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason="no .venv-vllm (bench/vllm_check.py builds it)")
def test_vllms_own_loader_accepts_our_vllm_exports_with_the_merged_delta_and_refuses_dora(tmp_path):
    """In vLLM's environment: PEFTHelper.validate_legal passes at the --max-lora-rank we name (and fails one
    allowed value lower), LoRAModel.from_local_checkpoint loads every module, and its scaling·B·A equals
    the change lorakit's merge makes to the original base weight; a DoRA PEFT export is refused by vLLM too."""
    import subprocess

    from safetensors.torch import save_file

    from lorakit.export import VLLM_MAX_LORA_RANKS, vllm_max_lora_rank

    batch = batch_for("llama")
    data = [{k: v for k, v in batch.items()}]
    jobs = []
    for method, rslora in [("lora", False), ("lora", True), ("pissa", False), ("lora-xs", False), ("svd-fa", False),
                           ("lora-ga", False), ("lora-sb", False)]:
        name = method + ("-rs" if rslora else "")
        model = lorakit.adapt(MODELS["llama"](), lorakit.AdapterConfig(method=method, rank=4, use_rslora=rslora), data=data,
                              progress=False)
        perturb_trainables(model, scale=0.05)
        folder = tmp_path / name
        lorakit.export_vllm(model, folder)
        rank = json.loads((folder / "adapter_config.json").read_text())["r"]
        original = dict(MODELS["llama"]().named_parameters())
        merged = dict(lorakit.merge(model).named_parameters())
        targets = json.loads((folder / "adapter_config.json").read_text())["target_modules"]
        save_file({t: (merged[f"{t}.weight"] - original[f"{t}.weight"]).detach().contiguous() for t in targets},
                  str(folder) + ".delta.safetensors")
        allowed = vllm_max_lora_rank(rank)
        jobs.append([name, str(folder), allowed, VLLM_MAX_LORA_RANKS[VLLM_MAX_LORA_RANKS.index(allowed) - 1]])
    dora = lorakit.adapt(MODELS["llama"](), lorakit.AdapterConfig(method="dora", rank=4))
    lorakit.export_peft(dora, tmp_path / "dora")  # what export_vllm refuses: vLLM must refuse it as well
    jobs.append(["dora", str(tmp_path / "dora"), 8, 1])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(VLLM_PYTHON), "-c", VLLM_LOADER, json.dumps(jobs)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "DoRA" in report.pop("dora")["refused"]
    assert set(report) == {j[0] for j in jobs[:-1]}
    for name, row in report.items():
        assert "refused" not in row, (name, row)
        assert row["refused_smaller"], name
        assert sorted(row["errors"]) == row["modules"], name  # every adapted module loaded, none extra
        assert max(row["errors"].values()) < 1e-12, (name, row["errors"])
