"""Classification labels are numbered from the training data; every row's text is checked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import assets
from lorakit.errors import LorakitError
from lorakit.recipes import data as D
from lorakit.recipes.config import DataSection



def _rows(labels, n=24):
    rows = assets.sentiment_rows(n)
    for i, row in enumerate(rows):
        row["sentiment"] = labels[i % len(labels)]
    return rows


def _load(tmp_path, rows, saved=None, **options):
    path = assets.write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataSection(source=str(path), text_column="sentence", label_column="sentiment", **options)
    return D.load_splits(cfg, "classification", saved)


def test_integer_labels_are_renumbered_in_numeric_order(tmp_path):
    rows = _rows([100000, 0, 7, "7"])  # JSON 7 and CSV-like "7" are one class
    splits = _load(tmp_path, rows)
    assert splits.label_names == ["0", "7", "100000"]
    by_text = {r["sentence"]: str(r["sentiment"]) for r in rows}
    for ex in splits.train + splits.validation + splits.test:
        assert splits.label_names[ex["label"]] == by_text[ex["text"]]


def test_negative_integer_labels_are_classes_too(tmp_path):
    assert _load(tmp_path, _rows([-1, 1])).label_names == ["-1", "1"]


def test_a_saved_mapping_numbers_the_data(tmp_path):
    rows = _rows([0, 100000])
    splits = _load(tmp_path, rows, saved=["100000", "0"])
    by_text = {r["sentence"]: r["sentiment"] for r in rows}
    assert all(by_text[ex["text"]] == (100000, 0)[ex["label"]] for ex in splits.train)
    with pytest.raises(LorakitError, match="label '0', which the training data does not have"):
        _load(tmp_path, rows, saved=["100000", "5"])


def test_a_single_training_class_is_refused(tmp_path):
    with pytest.raises(LorakitError, match="at least 2 classes, the training data has only the label '3'"):
        _load(tmp_path, _rows([3]))


def test_an_evaluation_label_unseen_in_training_is_refused(tmp_path):
    assets.write_jsonl(tmp_path / "test.jsonl", _rows(["pos", "meh"], 4))
    with pytest.raises(LorakitError, match="test split has the label 'meh'"):
        _load(tmp_path, _rows(["pos", "neg"]), test=str(tmp_path / "test.jsonl"))


@pytest.mark.parametrize("value, what", [(None, "missing"), ("  ", "empty"), (17, "a int, not text"), (["a"], "a list")])
def test_every_row_text_is_checked(tmp_path, value, what):
    rows = _rows(["pos", "neg"])
    rows[13]["sentence"] = value  # not the first row: every row is read
    with pytest.raises(LorakitError, match=rf"row 14 has column 'sentence' {what}"):
        _load(tmp_path, rows)
    del rows[13]["sentence"]
    with pytest.raises(LorakitError, match="row 14 has column 'sentence' missing"):
        _load(tmp_path, rows)


def test_causal_prompts_are_checked_and_numeric_answers_kept(tmp_path):
    rows = [{"q": f"what is {i} plus 1 ?", "a": i + 1} for i in range(20)]
    path = assets.write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = DataSection(source=str(path), prompt_column="q", answer_column="a")
    splits = D.load_splits(cfg, "causal-lm")
    assert all(ex["answer"] == str(int(ex["prompt"].split()[2]) + 1) for ex in splits.train)
    rows[5]["q"] = None
    assets.write_jsonl(path, rows)
    with pytest.raises(LorakitError, match="row 6 has column 'q' missing"):
        D.load_splits(cfg, "causal-lm")


def test_a_run_keeps_its_label_mapping_for_eval(tmp_path):
    from lorakit.cli import main
    from lorakit.recipes import train as train_recipe

    rows = assets.sentiment_rows(96)
    for row in rows:
        row["sentiment"] = 100000 if row["sentiment"] == "pos" else 0
    assets.write_jsonl(tmp_path / "sentiment.jsonl", rows)
    config = assets.classification_config(tmp_path, train={"epochs": 2}, output={"plot": False, "peft": False})
    assert main(["train", "--config", str(assets.write_yaml(tmp_path / "c.yaml", config)), "--quiet"]) == 0
    run = tmp_path / "run"
    assert json.loads((run / "run.json").read_text())["label_names"] == ["0", "100000"]
    results = json.loads((run / "results.json").read_text())
    path, s = train_recipe.load_run(run)
    assert s.model.config.num_labels == 2
    assert train_recipe.evaluate_run(run, quiet=True)["accuracy"] == pytest.approx(results["test"]["accuracy"])
