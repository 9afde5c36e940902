"""Shared by the benchmarks: machine facts, interleaved timing, real model/data, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    import transformers

    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent).stdout.strip()
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft_version,
        "lorakit_commit": commit or None,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
    }


def write_result(name: str, figures: dict[str, Any], status: str = "ok") -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"benchmark": name, "status": status, "environment": environment(), "figures": figures}, indent=2) + "\n")
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, the fns taking turns so machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def minilm_classifier():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorakit.recipes.models import minilm_path

    path = minilm_path()
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2), AutoTokenizer.from_pretrained(path)


def rotten_tomatoes_batch(tokenizer, size: int, max_length: int = 64, offset: int = 0) -> dict[str, torch.Tensor]:
    from lorakit.recipes.data import rotten_tomatoes

    rows = rotten_tomatoes()[offset : offset + size]
    batch = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch["labels"] = torch.tensor([r["label"] for r in rows])
    return dict(batch)
