"""data.group_column: rows sharing a group (a document) never straddle train / validation / test;
without it the split is the seeded shuffle it always was."""

from __future__ import annotations

import random

import pytest

import assets
from lorakit.errors import LorakitError
from lorakit.recipes.config import DataSection
from lorakit.recipes.data.splits import load_splits


def _rows(n_docs: int = 23, seed: int = 0) -> list[dict]:
    """Passages cut from documents of uneven length (1 to 9 passages each), documents interleaved."""
    rng = random.Random(seed)
    rows = [{"q": f"what is {d} plus {k} ?", "a": str(d + k), "doc": f"doc-{d}"}
            for d in range(n_docs) for k in range(rng.randrange(1, 10))]
    rng.shuffle(rows)
    return rows


def _doc_of(ex: dict) -> str:
    return "doc-" + ex["prompt"].split()[2]


@pytest.mark.parametrize("seed", range(4))
def test_no_group_appears_in_two_splits(tmp_path, seed):
    rows = _rows(seed=seed)
    data = assets.write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataSection(source=str(data), prompt_column="q", answer_column="a", group_column="doc", split_seed=seed,
                      validation_fraction=0.2, test_fraction=0.2)
    splits = load_splits(cfg, "causal-lm")
    docs = {name: {_doc_of(ex) for ex in part} for name, part in splits.parts().items()}
    assert not docs["train"] & docs["validation"] and not docs["train"] & docs["test"] and not docs["validation"] & docs["test"]
    # every row is in exactly one split, and each split is at least its share
    assert sorted(ex["prompt"] for part in splits.parts().values() for ex in part) == sorted(r["q"] for r in rows)
    assert len(splits.test) >= round(0.2 * len(rows)) and len(splits.validation) >= round(0.2 * len(rows))
    assert splits.train
    ungrouped = load_splits(DataSection(**{**vars(cfg), "group_column": None}), "causal-lm")
    loose = {name: {_doc_of(ex) for ex in part} for name, part in ungrouped.parts().items()}
    assert loose["train"] & (loose["validation"] | loose["test"])  # what the option prevents does happen without it


def test_without_group_column_the_split_is_the_seeded_shuffle(tmp_path):
    rows = _rows()
    data = assets.write_jsonl(tmp_path / "d.jsonl", rows)
    splits = load_splits(DataSection(source=str(data), prompt_column="q", answer_column="a", split_seed=3), "causal-lm")
    order = list(range(len(rows)))
    random.Random(3).shuffle(order)  # test first, then validation, then train (independent of the code)
    n_test, n_val = round(0.1 * len(rows)), round(0.1 * len(rows))
    assert [ex["prompt"] for ex in splits.test] == [rows[i]["q"] for i in order[:n_test]]
    assert [ex["prompt"] for ex in splits.validation] == [rows[i]["q"] for i in order[n_test:n_test + n_val]]
    assert [ex["prompt"] for ex in splits.train] == [rows[i]["q"] for i in order[n_test + n_val:]]


def test_group_column_on_an_embedded_source_is_refused():
    with pytest.raises(LorakitError, match="data.group_column needs a data file"):
        load_splits(DataSection(source="rotten-tomatoes", group_column="doc"), "classification")
