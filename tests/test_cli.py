"""End-to-end `lorakit` CLI runs on tiny on-disk models and JSONL data: run-directory contents,
falling loss, PEFT export equivalence, bit-exact resume, compare outputs, and bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent / "recipes"))
import assets  # noqa: E402

from lorakit.cli import main  # noqa: E402
from lorakit.recipes import train as train_recipe  # noqa: E402
from lorakit.recipes.rundir import read_metrics  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_FILES = ["config.yaml", "run.json", "metrics.jsonl", "results.json", "training_curves.png",
             "adapter/adapter.safetensors", "adapter/lorakit_adapter.json",
             "peft/adapter_config.json", "peft/adapter_model.safetensors"]


def _train(tmp_path: Path, config: dict, *overrides: str) -> int:
    path = assets.write_yaml(tmp_path / "config.yaml", config)
    return main(["train", "--config", str(path), "--quiet", *overrides])


def _train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]


def _falls(losses: list[float]) -> bool:
    k = max(2, len(losses) // 4)
    return sum(losses[-k:]) / k < sum(losses[:k]) / k - 0.02


def _batch(run_dir: Path):
    _, s = train_recipe.load_run(run_dir)
    from lorakit.recipes import data as D

    batch = D.collate(s.features["test"][:8], s.pad_id)
    return s, {k: v for k, v in batch.items() if k != "labels"}


def _peft_logits(base_dir: Path, peft_dir: Path, task: str, batch) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    base = cls.from_pretrained(base_dir)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = assets.VOCAB.index("</s>")
    model = PeftModel.from_pretrained(base, str(peft_dir)).eval()
    with torch.no_grad():
        return model(**batch).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- end to end --------------------------------------------------------------------------------
def test_train_classification_end_to_end(tmp_path):
    config = assets.classification_config(tmp_path, output={"merged": True})
    assert _train(tmp_path, config) == 0
    run_dir = tmp_path / "run"
    for name in RUN_FILES + ["merged/config.json"]:
        assert (run_dir / name).is_file(), name
    assert (run_dir / "training_curves.png").read_bytes()[:8] == PNG_MAGIC
    assert _falls(_train_losses(run_dir))
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert all({"loss", "lr", "grad_norm", "examples_per_s", "tokens_per_s"} <= set(r) for r in steps)
    assert sum(r.get("split") == "validation" for r in records) == config["train"]["epochs"]
    results = json.loads((run_dir / "results.json").read_text())
    assert {"accuracy", "f1", "mcc", "loss"} <= set(results["test"])
    # trainable parameters: r·(in + out) per adapted Linear (all-linear) + the classifier head, counted here
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert")
    linears = [m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith("classifier")]
    head = sum(p.numel() for p in base.classifier.parameters())
    assert results["trainable_params"] == sum(4 * (m.in_features + m.out_features) for m in linears) + head
    # the PEFT export and the merged model compute what the lorakit run computes
    s, batch = _batch(run_dir)
    with torch.no_grad():
        ours = s.model(**batch).logits
    assert _rel(_peft_logits(tmp_path / "bert", run_dir / "peft", "classification", batch), ours) < 1e-5
    merged = AutoModelForSequenceClassification.from_pretrained(run_dir / "merged").eval()
    with torch.no_grad():
        assert _rel(merged(**batch).logits, ours) < 1e-5


def test_train_causal_lm_end_to_end_with_lora_sb(tmp_path):
    tok = assets.tokenizer(causal=True)
    assert tok.pad_token is None  # the recipe must handle a tokenizer without a pad token
    config = assets.causal_config(tmp_path, adapter={"method": "lora-sb", "num_samples": 16}, optim={"lr": 3e-2})
    assert _train(tmp_path, config) == 0
    run_dir = tmp_path / "run"
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    assert _falls(_train_losses(run_dir))
    results = json.loads((run_dir / "results.json").read_text())
    assert {"loss", "perplexity", "exact_match"} <= set(results["test"])
    assert results["test"]["perplexity"] == pytest.approx(torch.tensor(results["test"]["loss"]).exp().item(), rel=1e-6)
    assert results["trainable_params"] == 4 * 4 * 14  # lora-sb: r² per layer, 7 linears × 2 layers
    s, batch = _batch(run_dir)
    with torch.no_grad():
        ours = s.model(**batch).logits
    assert _rel(_peft_logits(tmp_path / "llama", run_dir / "peft", "causal-lm", batch), ours) < 1e-5


def test_full_finetuning_trains_every_parameter_and_saves_the_model(tmp_path):
    config = assets.classification_config(tmp_path, adapter={"method": "full"}, optim={"lr": 1e-3})
    assert _train(tmp_path, config) == 0
    run_dir = tmp_path / "run"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["trainable_params"] == results["total_params"]
    assert (run_dir / "model" / "model.safetensors").is_file() and not (run_dir / "adapter").exists()
    assert main(["eval", str(run_dir), "--quiet"]) == 0
    assert train_recipe.evaluate_run(run_dir, quiet=True)["accuracy"] == pytest.approx(results["test"]["accuracy"])


def test_eval_and_export_reproduce_the_run(tmp_path, capsys):
    config = assets.classification_config(tmp_path, output={"peft": False})
    assert _train(tmp_path, config) == 0
    run_dir = tmp_path / "run"
    assert not (run_dir / "peft").exists()
    results = json.loads((run_dir / "results.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(run_dir), "--quiet"]) == 0
    assert f"accuracy {results['test']['accuracy']:.4f}" in capsys.readouterr().out
    again = train_recipe.evaluate_run(run_dir, quiet=True)
    assert again == pytest.approx(results["test"], rel=1e-6)
    assert main(["export", str(run_dir), "--format", "peft"]) == 0
    assert main(["export", str(run_dir), "--format", "merged", "--out", str(tmp_path / "m")]) == 0
    s, batch = _batch(run_dir)
    with torch.no_grad():
        ours = s.model(**batch).logits
    assert _rel(_peft_logits(tmp_path / "bert", run_dir / "peft", "classification", batch), ours) < 1e-5
    from transformers import AutoModelForSequenceClassification

    with torch.no_grad():
        assert _rel(AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()(**batch).logits, ours) < 1e-5


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    # no dropout: 2 accumulated micro-batches of 4 take the same steps as batches of 8
    assets.bert_folder(tmp_path / "bert", dropout=0.0)
    common = dict(optim={"max_grad_norm": None}, output={"peft": False, "plot": False})
    big = assets.classification_config(tmp_path, train={"batch_size": 8, "epochs": 1}, **common)
    assert _train(tmp_path, big, f"output.dir={tmp_path / 'big'}") == 0
    small = assets.classification_config(tmp_path, train={"batch_size": 4, "grad_accum": 2, "epochs": 1}, **common)
    assert _train(tmp_path, small, f"output.dir={tmp_path / 'small'}") == 0
    a = load_file(tmp_path / "big" / "adapter" / "adapter.safetensors")
    b = load_file(tmp_path / "small" / "adapter" / "adapter.safetensors")
    assert len(_train_losses(tmp_path / "big")) == len(_train_losses(tmp_path / "small")) == 10
    for key in a:
        assert _rel(b[key], a[key]) < 1e-4, key
    assert _train_losses(tmp_path / "small") == pytest.approx(_train_losses(tmp_path / "big"), rel=1e-4)


def test_quiet_shows_no_progress_bars(tmp_path, capfd):
    config = assets.classification_config(tmp_path, adapter={"method": "lora-ga", "num_samples": 8},
                                          train={"epochs": 1}, output={"peft": False, "plot": False})
    assert _train(tmp_path, config) == 0
    captured = capfd.readouterr()
    assert "estimate" not in captured.err and "train lora-ga" not in captured.err and "eval" not in captured.err
    test = json.loads((tmp_path / "run" / "results.json").read_text())["test"]
    assert captured.out.splitlines() == [captured.out.strip()]  # one line: the test metric
    assert captured.out.startswith(f"test accuracy: {test['accuracy']:.4f}  (") and f"f1 {test['f1']:.4f}" in captured.out


def test_neftune_noise_acts_in_training_only(tmp_path):
    assets.bert_folder(tmp_path / "bert", dropout=0.0)
    common = dict(train={"epochs": 1}, output={"peft": False, "plot": False})
    assert _train(tmp_path, assets.classification_config(tmp_path, **common), f"output.dir={tmp_path / 'plain'}") == 0
    noisy = assets.classification_config(tmp_path, optim={"neftune_alpha": 5.0}, **common)
    assert _train(tmp_path, noisy, f"output.dir={tmp_path / 'noisy'}") == 0
    plain_losses, noisy_losses = _train_losses(tmp_path / "plain"), _train_losses(tmp_path / "noisy")
    assert plain_losses[0] != noisy_losses[0]  # the very first forward already sees the noise
    results = json.loads((tmp_path / "noisy" / "results.json").read_text())
    assert train_recipe.evaluate_run(tmp_path / "noisy", quiet=True) == pytest.approx(results["test"], rel=1e-6)


# -- kill / resume -----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["lora", "full"])
def test_interrupted_run_resumes_bit_exactly(tmp_path, method):
    # dropout stays on (BERT's 0.1) so the RNG state must be restored too; 10 steps per epoch
    sections = dict(adapter={"method": method}, train={"epochs": 2, "checkpoint_every": 5},
                    optim={"lr": 1e-2 if method == "lora" else 1e-3, "warmup_steps": 3},
                    output={"peft": False, "plot": False})
    config = assets.classification_config(tmp_path, **sections)
    assert _train(tmp_path, config, f"output.dir={tmp_path / 'whole'}") == 0

    with assets.interrupted_at_step(12):  # checkpoint at step 10 = the end of epoch 1, before its evaluation
        assert _train(tmp_path, config, f"output.dir={tmp_path / 'cut'}") == 130
    from lorakit.recipes import checkpoint as ckpt

    state = json.loads((ckpt.latest(tmp_path / "cut") / "state.json").read_text())
    assert state["position"]["step"] == 10
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0

    name = "adapter/adapter.safetensors" if method == "lora" else "model/model.safetensors"
    whole, resumed = load_file(tmp_path / "whole" / name), load_file(tmp_path / "cut" / name)
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert _train_losses(tmp_path / "whole") == _train_losses(tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "results.json").read_text())["test"] == \
        json.loads((tmp_path / "whole" / "results.json").read_text())["test"]


# -- compare -----------------------------------------------------------------------------------
def test_compare_writes_tables_and_plots(tmp_path):
    base = assets.classification_config(tmp_path, train={"epochs": 1}, output={"dir": str(tmp_path / "cmp"), "peft": False, "plot": False})
    base["compare"] = {"seeds": [0, 1], "methods": {
        "full": {"adapter": {"method": "full"}, "optim": {"lr": 1e-3}},
        "lora": {"adapter": {"method": "lora"}},
        "lora+": {"adapter": {"method": "lora"}, "optim": {"loraplus_ratio": 16}},
        "lora-xs": {"adapter": {"method": "lora-xs"}},
    }}
    path = assets.write_yaml(tmp_path / "compare.yaml", base)
    assert main(["compare", "--config", str(path), "--quiet"]) == 0
    out = tmp_path / "cmp"
    for png in ("loss_curves.png", "metric_vs_params.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    import csv

    rows = {r["method"]: r for r in csv.DictReader(open(out / "results.csv"))}
    assert list(rows) == ["full", "lora", "lora+", "lora-xs"]
    for name, row in rows.items():
        runs = [json.loads((out / "runs" / f"{assets_slug(name)}-seed{s}" / "results.json").read_text()) for s in (0, 1)]
        accs = [r["test"]["accuracy"] for r in runs]
        assert float(row["accuracy_mean"]) == pytest.approx(sum(accs) / 2)
        assert float(row["accuracy_std"]) == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
        assert int(row["trainable_params"]) == runs[0]["trainable_params"]
    assert int(rows["full"]["trainable_params"]) > int(rows["lora"]["trainable_params"]) > int(rows["lora-xs"]["trainable_params"])
    assert rows["lora"]["trainable_params"] == rows["lora+"]["trainable_params"]
    markdown = (out / "results.md").read_text()
    assert "| lora+ |" in markdown and "±" in markdown


def assets_slug(name: str) -> str:
    from lorakit.recipes.compare import _slug

    return _slug(name)


# -- bad input ---------------------------------------------------------------------------------
def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("lorakit: error:"), err
    for needle in needles:
        assert needle in err, err
    return err


def test_unknown_config_key_suggests_the_right_one(tmp_path, capsys):
    config = assets.classification_config(tmp_path)
    path = assets.write_yaml(tmp_path / "c.yaml", config)
    _fails(capsys, ["train", "--config", str(path), "optim.lrr=1e-3"], "optim.lrr", "optim.lr")
    _fails(capsys, ["train", "--config", str(path), "lr=1e-3"], "'optim.lr'")
    _fails(capsys, ["train", "--config", str(path), "adapter.rnak=4"], "adapter.rank")
    config["trian"] = {"epochs": 1}
    _fails(capsys, ["train", "--config", str(assets.write_yaml(tmp_path / "d.yaml", config))], "trian", "train")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case", ["missing config", "missing data", "missing column", "empty data", "missing model",
                                  "bad value", "bad method"])
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, capsys, case):
    config = assets.classification_config(tmp_path)
    extra: list[str] = []
    if case == "missing data":
        extra = [f"data.source={tmp_path / 'nope.jsonl'}"]
        needle = "does not exist"
    elif case == "missing column":
        extra = ["data.text_column=review"]
        needle = "column 'review'"
    elif case == "empty data":
        (tmp_path / "empty.jsonl").write_text("")
        extra = [f"data.source={tmp_path / 'empty.jsonl'}"]
        needle = "no rows"
    elif case == "missing model":
        extra = [f"model.name={tmp_path / 'no-model'}"]
        needle = "does not exist"
    elif case == "bad value":
        extra = ["train.batch_size=many"]
        needle = "train.batch_size"
    elif case == "bad method":
        extra = ["adapter.method=lora-gb"]
        needle = "lora-ga"
    path = assets.write_yaml(tmp_path / "c.yaml", config)
    argv = ["train", "--config", str(tmp_path / "absent.yaml") if case == "missing config" else str(path), *extra]
    _fails(capsys, argv, "does not exist" if case == "missing config" else needle)
    assert not (tmp_path / "run").exists()


def test_not_a_run_directory(tmp_path, capsys):
    (tmp_path / "some").mkdir()
    for argv in (["eval", str(tmp_path / "some")], ["export", str(tmp_path / "some"), "--format", "peft"],
                 ["train", "--resume", str(tmp_path / "some")], ["eval", str(tmp_path / "absent")]):
        _fails(capsys, argv, "run directory")
    assert list((tmp_path / "some").iterdir()) == []


def test_existing_run_directory_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    path = assets.write_yaml(tmp_path / "c.yaml", assets.classification_config(tmp_path))
    _fails(capsys, ["train", "--config", str(path)], "already exists")
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["keep.txt"]
