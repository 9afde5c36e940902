"""Shared by the benchmarks: machine facts, interleaved timing, real model/data, JSON results."""

from __future__ import annotations

import gc
import json
import os
import platform
import re
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
        "command": this_command(),
    }


def this_command() -> str:
    """The command line of this process, as results record it (``python bench/x.py --flag``)."""
    return " ".join([Path(sys.executable).name] + sys.argv)


def write_result(name: str, figures: dict[str, Any], status: str = "ok") -> Path:
    path = RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)  # a runner's --output parts/<name> on a fresh checkout
    from lorakit.files import atomic_file  # fsync'd temporary + rename; the format stays json.dumps's own

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps({"benchmark": name, "status": status, "environment": environment(), "figures": figures}, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def interleaved_medians(fns: dict[str, Callable[[], None]], repeats: int, warmup: int = 1,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each fn, the fns taking turns so machine noise hits all alike
    (``clock``: wall time by default; ``time.process_time`` counts only this process's CPU time)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = clock()
            fn()
            times[key].append(clock() - start)
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


def minilm_padded(batch_size: int, length: int):
    """The MiniLM classifier and a Rotten Tomatoes batch padded to exactly ``length`` tokens."""
    model, tokenizer = minilm_classifier()
    enc = rotten_tomatoes_batch(tokenizer, batch_size, max_length=length)
    if enc["input_ids"].shape[1] < length:
        enc = dict(tokenizer.pad(enc, padding="max_length", max_length=length, return_tensors="pt"))
    return model, enc


def profile_compare(runs: dict[str, Callable[[], Any]], calls: int = 1, warmup: int = 0,
                    top: int = 12) -> list[dict[str, Any]]:
    """Self CPU ms per operator of one call of each of two runs (mean over ``calls``), keyed by the runs'
    labels, with ``extra`` = first − second; the ``top`` largest differences first."""
    from torch.profiler import ProfilerActivity, profile

    (first, second) = runs
    per_op: dict[str, dict[str, Any]] = {}
    for label, run in runs.items():
        for _ in range(warmup):
            run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                run()
        for event in prof.key_averages():
            row = per_op.setdefault(event.key, {first: 0.0, second: 0.0, f"calls {first}": 0, f"calls {second}": 0})
            row[label] += event.self_cpu_time_total / 1000 / calls
            row[f"calls {label}"] += event.count // calls
    rows = [{"op": k, **v, "extra": v[first] - v[second]} for k, v in per_op.items()]
    return sorted(rows, key=lambda r: -abs(r["extra"]))[:top]


# -- added memory of one call, measured in a fresh worker process (bench/estimation.py, bench/scaling.py) --
# Every block over 64 KiB gets its own mmap and goes back to the OS when freed, so the resident
# set follows the live allocations (glibc otherwise keeps freed heap and the peak stops meaning much).
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
MEMORY_METHOD = ("peak RSS (VmHWM after clear_refs=5) minus RSS after loading and a warm-up forward, fresh subprocess "
                 "per run, MALLOC_MMAP_THRESHOLD_=65536")


def proc_status(key: str) -> int:
    """A /proc/self/status field in bytes (Linux)."""
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure_added(fn: Callable[[], Any]) -> dict[str, float]:
    """Seconds and added peak resident memory of ``fn()``: the kernel's peak-RSS counter is reset
    (``/proc/self/clear_refs`` ← 5) after a gc, the RSS then is the baseline, and the peak during
    the call minus it is what the call added (tensors, autograd buffers, everything)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    baseline = proc_status("VmRSS")
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "added_bytes": proc_status("VmHWM") - baseline, "baseline_bytes": baseline}


def run_worker(command: list[str]) -> dict[str, Any]:
    """Run a measurement in a fresh process (with WORKER_ENV); its last stdout line is its JSON result."""
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=WORKER_ENV).stdout
    return json.loads(out.strip().splitlines()[-1])


def lora_ga_init(method: str, model, batches: list[dict], rank: int, targets: list[str], budget: int | None = None) -> None:
    """One LoRA-GA estimation + initialisation of ``model`` by ``method``:
    - ``peft``: PEFT's ``preprocess_loraga`` (target weights require grad, one forward/backward per
      batch, gradients kept in ``.grad``), then ``get_peft_model``;
    - ``lorakit-exact`` / ``lorakit-sketch``: ``lorakit.adapt`` with that estimator; a ``-budget``
      suffix passes ``memory_budget=budget`` bytes, a ``-ckpt`` suffix ``estimate_checkpointing``;
    - ``floor``: a forward/backward over the same batches with every weight frozen and no
      estimator — the activation memory every backward-based estimator pays."""
    if method == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        handle = model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.requires_grad_(True))
        for batch in batches:
            model(**batch, use_cache=False).loss.backward()
        handle.remove()
    elif method == "peft":
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraGAConfig, preprocess_loraga

        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

        def train_step() -> None:
            for batch in batches:
                model(**batch, use_cache=False).loss.backward()

        preprocess_loraga(model, config, train_step)
        get_peft_model(model, config)
    else:
        import lorakit

        parts = method.split("-")
        options = {"estimator": parts[1], "estimate_checkpointing": "ckpt" in parts}
        if "budget" in parts:
            options["memory_budget"] = budget
        samples = sum(int(b["input_ids"].shape[0]) for b in batches)
        config = lorakit.AdapterConfig(method="lora-ga", rank=rank, targets=targets, num_samples=samples, **options)
        lorakit.adapt(model, config, data=batches, progress=False)
