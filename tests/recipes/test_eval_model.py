"""`lorakit eval --model`: an untouched model scored on a config's test split, with nothing written."""

from __future__ import annotations

import pytest

import assets
from lorakit.cli import main
from lorakit.recipes import train as train_recipe
from lorakit.recipes.config import from_dict
from lorakit.recipes.evaluation import evaluate
from lorakit.recipes.setup import attach, setup


def _files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_eval_model_equals_the_recipes_evaluation_at_step_0_and_writes_nothing(tmp_path, monkeypatch, capsys, task):
    make = assets.causal_config if task == "causal-lm" else assets.classification_config
    config = make(tmp_path)
    model = config["model"].pop("name")
    config_file = assets.write_yaml(tmp_path / "c.yaml", config)
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path)
    assert main(["eval", "--model", model, "--config", str(config_file), "--quiet", "train.threads=1"]) == 0
    assert _files(tmp_path) == before  # no run directory, no samples, nothing
    line = capsys.readouterr().out.strip().splitlines()
    assert len(line) == 1 and line[0].startswith(f"{model}: test ")
    ours = train_recipe.evaluate_model(model, from_dict({**config, "model": {**config["model"], "name": model}}), quiet=True)

    # independent path: the training recipe's own setup, a LoRA attached at its (identity) init, evaluated at step 0
    s = setup(from_dict({**config, "model": {**config["model"], "name": model}}))
    attach(s, warmup=0, progress=False)
    step0 = evaluate(s, "test", progress=False)
    assert set(ours) == set(step0)
    assert ours == pytest.approx(step0, rel=1e-6, abs=1e-9)
    assert _files(tmp_path) == before

