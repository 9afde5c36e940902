"""Trainable parameters of each method at equal rank (issue 6).

    python bench/param_count.py [--rank 16]

Counts come from the injected structure (they do not depend on the initialisation's
values), on the real MiniLM classifier and SmolLM2-135M, all linear layers targeted; the
classifier head of MiniLM trains fully in every method.
"""

from __future__ import annotations

import argparse

import torch
from common import minilm_classifier, write_result
from init_speed import load_smollm2

import lorakit
from lorakit.inject import inject

METHODS = ["lora", "dora", "lora-fa", "svd-fa", "pissa", "lora-ga", "lora-xs", "lora-sb"]


def count(model_factory, method: str, rank: int) -> int:
    model = model_factory()
    inject(model, lorakit.AdapterConfig(method=method, rank=rank))
    return lorakit.parameter_report(model).trainable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    factories = {"all-MiniLM-L6-v2": lambda: minilm_classifier()[0], "SmolLM2-135M": load_smollm2}
    table = {}
    for model_name, factory in factories.items():
        total = sum(p.numel() for p in factory().parameters())
        row = {"full fine-tuning": total}
        row.update({m: count(factory, m, args.rank) for m in METHODS})
        table[model_name] = row
        print(f"{model_name}: " + ", ".join(f"{k} {v:,}" for k, v in row.items()))
        print(f"  lora / lora-sb = {row['lora'] / row['lora-sb']:.1f}x")
    write_result("param_count", {"rank": args.rank, "targets": "all-linear", "trainable_parameters": table})


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
