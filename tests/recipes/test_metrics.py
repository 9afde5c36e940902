"""Metrics against independent computations written here."""

from __future__ import annotations

import math
import random

import pytest

from lorakit.recipes import metrics as M


def _binary_counts(preds, labels):
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    tn = sum(p == 0 and y == 0 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    return tp, tn, fp, fn


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_the_textbook_formulas(seed):
    rng = random.Random(seed)
    labels = [rng.randrange(2) for _ in range(57)]
    preds = [y if rng.random() < 0.7 else 1 - y for y in labels]
    tp, tn, fp, fn = _binary_counts(preds, labels)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert M.accuracy(preds, labels) == pytest.approx((tp + tn) / len(labels))
    assert M.matthews_corrcoef(preds, labels, 2) == pytest.approx(mcc)
    f1_pos = 2 * precision * recall / (precision + recall)
    precision_neg, recall_neg = tn / (tn + fn), tn / (tn + fp)
    f1_neg = 2 * precision_neg * recall_neg / (precision_neg + recall_neg)
    assert M.f1(preds, labels, 2) == pytest.approx((f1_pos + f1_neg) / 2)  # macro, not the class that sorts second
    named = M.classification_metrics(preds, labels, 2, ["neg", "pos"])
    assert named["f1_neg"] == pytest.approx(f1_neg) and named["f1_pos"] == pytest.approx(f1_pos)
    assert named["f1"] == pytest.approx((f1_pos + f1_neg) / 2)


def test_mcc_limits_and_multiclass_macro_f1():
    labels = [0, 1, 2, 2, 1, 0, 2]
    assert M.matthews_corrcoef(labels, labels, 3) == pytest.approx(1.0)
    assert M.matthews_corrcoef([1 - y for y in [0, 1, 1, 0]], [0, 1, 1, 0], 2) == pytest.approx(-1.0)
    assert M.matthews_corrcoef([1, 1, 1], [0, 1, 0], 2) == 0.0  # constant prediction: undefined -> 0
    preds = [0, 2, 2, 2, 1, 1, 0]
    per_class = []
    for k in range(3):
        tp = sum(p == k and y == k for p, y in zip(preds, labels))
        fp = sum(p == k and y != k for p, y in zip(preds, labels))
        fn = sum(p != k and y == k for p, y in zip(preds, labels))
        per_class.append(2 * tp / (2 * tp + fp + fn))
    assert M.f1(preds, labels, 3) == pytest.approx(sum(per_class) / 3)


def test_per_class_f1_by_label_name_on_a_small_confusion_case():
    # true cat cat cat dog dog bird; predicted cat dog cat dog bird bird
    names = ["bird", "cat", "dog"]
    labels = [1, 1, 1, 2, 2, 0]
    preds = [1, 2, 1, 2, 0, 0]
    # by hand: cat TP 2 FP 0 FN 1 -> 4/5; dog TP 1 FP 1 FN 1 -> 1/2; bird TP 1 FP 1 FN 0 -> 2/3
    got = M.classification_metrics(preds, labels, 3, names)
    assert got["f1_cat"] == pytest.approx(4 / 5) and got["f1_dog"] == pytest.approx(1 / 2)
    assert got["f1_bird"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx((4 / 5 + 1 / 2 + 2 / 3) / 3)
    assert set(got) == {"accuracy", "f1", "mcc", "f1_bird", "f1_cat", "f1_dog"}
    # a class never true nor predicted scores 0 and still counts in the macro mean
    assert M.classification_metrics([0, 0], [0, 0], 2)["f1"] == pytest.approx(0.5)


@pytest.mark.parametrize("text, number", [
    ("so 3 + 4 = 7.\n#### 7", "7"),
    ("#### 1,250", "1250"),
    ("the answer is 12.50 dollars", "12.5"),
    ("first 3, then -4", "-4"),
    ("#### 18 (not 20)", "18"),
    ("3.0", "3"),
    ("no digits here", None),
])
def test_final_number(text, number):
    assert M.final_number(text) == number


def test_exact_match_and_perplexity():
    refs = ["... #### 42", "#### 7", "#### 1,000"]
    assert M.exact_match(["it is 42", "#### 8", "1000.0"], refs) == pytest.approx(2 / 3)
    assert M.exact_match(["nothing", "", ""], refs) == 0.0
    assert M.perplexity(math.log(17.0)) == pytest.approx(17.0)
