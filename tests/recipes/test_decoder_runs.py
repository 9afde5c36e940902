"""Chat and multiple-choice runs through the CLI on a tiny Llama: they train, write what they
measured, and a reloaded run measures the same."""

from __future__ import annotations

import json
import random

import pytest

import assets
from lorakit.cli import main
from lorakit.recipes import train as train_recipe
from lorakit.recipes.metrics import is_correct


def _run(tmp_path, config) -> dict:
    assert main(["train", "--config", str(assets.write_yaml(tmp_path / "c.yaml", config)), "--quiet"]) == 0
    return json.loads((tmp_path / "run" / "results.json").read_text())


def test_chat_run_writes_samples_that_agree_with_its_exact_match(tmp_path):
    model = assets.chat_llama_folder(tmp_path / "chat-llama")
    rows = [{"messages": [{"role": "user", "content": r["q"]}, {"role": "assistant", "content": r["a"]}]}
            for r in assets.addition_rows(60)]
    data = assets.write_jsonl(tmp_path / "chat.jsonl", rows)
    config = assets.causal_config(tmp_path, model={"name": str(model)}, data={"source": str(data)},
                                  eval={"max_new_tokens": 12}, output={"plot": False, "peft": False})
    results = _run(tmp_path, config)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6  # the whole test split (10 % of 60)
    assert all(s["prompt"].replace(" ", "").endswith("<|im_start|>assistant") for s in samples)  # word-level decode
    assert all(s["correct"] == is_correct(s["generation"], s["reference"], "number") for s in samples)
    assert results["test"]["exact_match"] == pytest.approx(sum(s["correct"] for s in samples) / len(samples))
    again = train_recipe.evaluate_run(tmp_path / "run", quiet=True)
    assert again["exact_match"] == results["test"]["exact_match"] and again["loss"] == pytest.approx(results["test"]["loss"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["type"] == "train"]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_multiple_choice_run_is_scored_by_option_likelihood(tmp_path):
    rng = random.Random(0)
    rows = []
    for _ in range(80):
        a, b = rng.randrange(10), rng.randrange(10)
        wrong = (a + b + rng.randrange(1, 9)) % 19
        choices = [str(a + b), str(wrong)] if rng.random() < 0.5 else [str(wrong), str(a + b)]
        rows.append({"q": f"what is {a} plus {b} ?", "choices": choices, "a": choices.index(str(a + b))})
    data = assets.write_jsonl(tmp_path / "mc.jsonl", rows)
    config = assets.causal_config(tmp_path, task="multiple-choice", data={"source": str(data)},
                                  output={"plot": False, "peft": False})
    results = _run(tmp_path, config)
    assert set(results["test"]) == {"loss", "accuracy", "accuracy_norm"}
    again = train_recipe.evaluate_run(tmp_path / "run", quiet=True)
    assert again == pytest.approx(results["test"])
