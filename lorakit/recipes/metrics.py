"""Evaluation metrics: accuracy, macro and per-class F1, Matthews correlation, exact match (final
number, normalised whole answer, or reasoning-gym's own scorer), multiple-choice accuracy, perplexity."""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import torch

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def confusion_matrix(preds: Sequence[int], labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """C[i, j] = number of examples with true class i predicted as j."""
    C = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    for y, p in zip(labels, preds):
        C[int(y), int(p)] += 1
    return C


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    return sum(int(p) == int(y) for p, y in zip(preds, labels)) / max(len(labels), 1)


def per_class_f1(preds: Sequence[int], labels: Sequence[int], num_classes: int) -> torch.Tensor:
    """F1 of each class k, 2·TP_k / (2·TP_k + FP_k + FN_k); 0 for a class neither true nor predicted."""
    C = confusion_matrix(preds, labels, num_classes)
    tp = C.diag()
    den = C.sum(0) + C.sum(1)  # (TP + FP) + (TP + FN)
    return torch.where(den > 0, 2 * tp / den.clamp_min(1), torch.zeros_like(tp))


def f1(preds: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """Macro F1: the unweighted mean of the classes' F1 (two classes included: no class is 'positive')."""
    return float(per_class_f1(preds, labels, num_classes).mean())


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """Matthews correlation (Gorodkin's K-class form; the usual MCC for two classes); 0 when undefined.

    MCC = (c·s − Σ_k p_k t_k) / √((s² − Σ p_k²)(s² − Σ t_k²)), c correct, s total,
    p_k predicted and t_k true counts of class k.
    """
    C = confusion_matrix(preds, labels, num_classes)
    c, s = C.trace(), C.sum()
    p, t = C.sum(0), C.sum(1)
    denominator = ((s * s - (p * p).sum()) * (s * s - (t * t).sum())).sqrt()
    return float((c * s - (p * t).sum()) / denominator) if denominator > 0 else 0.0


def classification_metrics(preds: Sequence[int], labels: Sequence[int], num_classes: int,
                           label_names: Sequence[Any] | None = None) -> dict[str, float]:
    """accuracy, ``f1`` (macro), mcc, and ``f1_<label name>`` per class (``f1_<k>`` without names)."""
    names = list(label_names) if label_names is not None else list(range(num_classes))
    per_class = per_class_f1(preds, labels, num_classes).tolist()
    return {
        "accuracy": accuracy(preds, labels),
        "f1": sum(per_class) / num_classes,
        "mcc": matthews_corrcoef(preds, labels, num_classes),
        **{f"f1_{name}": value for name, value in zip(names, per_class)},
    }


def final_number(text: str) -> str | None:
    """The answer number of a GSM-style solution: the one after the last '####' if any, else the
    last number in the text; commas and a trailing '.0' are dropped ('1,000.00' -> '1000')."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = _NUMBER.findall(tail)
    if not found:
        return None
    number = found[0] if "####" in text else found[-1]
    number = number.replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".") or "0"
    return number


def normalise(text: str) -> str:
    """Case folded, whitespace collapsed, trailing punctuation dropped: 'Yes.' == ' yes'."""
    return " ".join(text.split()).casefold().rstrip(".!?;:,").strip()


def is_correct(prediction: str, reference: str, scorer: str = "number", source: Any = None) -> bool:
    """``number``: the final numbers agree; ``text``: the normalised whole answers agree;
    ``reasoning-gym``: the dataset's own ``score_answer`` gives full marks (``source`` is
    (dataset name, entry))."""
    if scorer == "reasoning-gym":
        from lorakit.recipes.data import score_reasoning_gym

        return score_reasoning_gym(prediction, source)
    if scorer == "text":
        return normalise(prediction) == normalise(reference)
    return final_number(prediction) is not None and final_number(prediction) == final_number(reference)


def exact_match(predictions: Sequence[str], references: Sequence[str], scorer: str = "number",
                sources: Sequence[Any] | None = None) -> float:
    """Fraction of predictions that match their reference under ``scorer`` (see is_correct)."""
    sources = sources if sources is not None else [None] * len(references)
    hits = sum(is_correct(p, r, scorer, src) for p, r, src in zip(predictions, references, sources))
    return hits / max(len(references), 1)


def choice_accuracy(scores: Sequence[Sequence[tuple[float, int]]], answers: Sequence[int]) -> dict[str, float]:
    """Multiple choice as lm-eval-harness scores it: per question, options' (log-likelihood,
    length in characters); ``accuracy`` picks the highest log-likelihood, ``accuracy_norm`` the
    highest log-likelihood per character."""
    raw = [max(range(len(q)), key=lambda i: q[i][0]) for q in scores]
    norm = [max(range(len(q)), key=lambda i: q[i][0] / max(q[i][1], 1)) for q in scores]
    return {"accuracy": accuracy(raw, answers), "accuracy_norm": accuracy(norm, answers)}


def perplexity(mean_loss: float) -> float:
    return math.exp(min(mean_loss, 700.0))
