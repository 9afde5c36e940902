"""QLoRA memory and time on SmolLM2-135M: lorakit lora vs PEFT lora on the same quantized base (issue 15).

    nice python bench/qlora.py [--bases nf4,int8,fp32] [--repeats 5] [--tokens 64] [--rank 16] [--threads 1]

For each base (bitsandbytes nf4, bitsandbytes int8, unquantized fp32; loaded through
transformers' own quantization configs, as ``model.quantization`` does), two copies of the
model are adapted on every linear layer but the head: lorakit lora and PEFT lora, same rank,
α, targets. A step is forward + backward + AdamW step on one 64-token sequence. Figures, per
library, and the ratios lorakit / PEFT:
- ``saved_mb``: the bytes autograd saves for backward in one step (distinct storages, counted
  with ``torch.autograd.graph.saved_tensors_hooks``; the frozen base weights the layers keep
  for the input gradient included): the step's activation memory, exact and free of noise;
- ``peak_added_mb``: the peak bytes of tensors a step allocates beyond those live before it
  (torch.profiler's memory events; ``peak_tensor_mb``): exact, the same on every repeat;
- ``rss_added_mb``: peak resident set size during a timed step minus the resident size before it
  (Linux /proc), the median over the repeats: what the allocator kept from earlier steps and the other
  model makes it vary between repeats (10–105 MB for one step), so it is only shown beside the exact one;
- ``seconds_per_step``: the median over interleaved repeats (the libraries alternate which goes
  first in each repeat), timed first, with the allocator's defaults.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import warnings

import torch
from common import write_result

import lorakit
from lorakit.recipes.models import quantization_config, smollm2_path
from lorakit.recipes.rundir import peak_memory_mb, reset_peak_memory

TEXT = ("Question: A baker sells 14 loaves in the morning and twice as many in the afternoon. How many loaves "
        "does she sell in a day? Answer: In the afternoon she sells 2 × 14 = 28, so 14 + 28 = 42 loaves in all.")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load(path: str, base: str):
    from transformers import AutoModelForCausalLM

    options = {} if base == "fp32" else {"quantization_config": quantization_config(base, torch.float32), "device_map": "cpu"}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **options)


def peak_tensor_mb(step) -> float:
    """MiB: the peak, over one call of ``step``, of the bytes of the tensors allocated during it and still live
    (torch.profiler's memory events, summed in time order): what the step adds above the memory live before it,
    exact and the same on every repeat, unlike the resident set, which depends on what the allocator kept."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def current_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def saved_mb(model, batch) -> float:
    """MiB of the distinct storages autograd saves for backward in one forward + backward."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values()) / 2**20


def stepper(model, batch):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    device = torch.device("cpu")

    def run() -> tuple[float, float]:
        before = current_mb()
        reset_peak_memory(device)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, (peak_memory_mb(device) or float("nan")) - before

    return run


def ratio(row: dict, key: str) -> float | None:
    """lorakit / PEFT for one figure, None when PEFT's is not positive (the RSS figure can be 0 or negative)."""
    theirs = row["peft"][key]
    return row["lorakit"][key] / theirs if theirs > 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", default="nf4,int8,fp32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    path = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(TEXT, return_tensors="pt", truncation=True, max_length=args.tokens)["input_ids"]
    batch = {"input_ids": ids, "labels": ids.clone()}
    r = args.rank
    figures: dict = {"tokens": int(ids.shape[1]), "rank": r, "targets": TARGETS, "repeats": args.repeats,
                     "threads": args.threads, "bases": {}}
    bases = args.bases.split(",")

    def interleaved(base: str) -> tuple[dict[str, float], dict[str, list[tuple[float, float]]], dict[str, float]]:
        """Both libraries' models on ``base``: saved MiB, (seconds, peak added resident MiB) of each repeat, and
        the peak tensor MiB of a step (after the timed repeats)."""
        ours = lorakit.adapt(load(path, base), lorakit.AdapterConfig(method="lora", rank=r, alpha=2 * r, targets=TARGETS))
        theirs = get_peft_model(load(path, base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, task_type="CAUSAL_LM"))
        models = {"lorakit": ours, "peft": theirs}
        saved = {k: saved_mb(m, batch) for k, m in models.items()}
        runs = {k: stepper(m, batch) for k, m in models.items()}
        for run in runs.values():  # warm-up: optimizer state, first-call allocations
            run()
        seen: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        for repeat in range(args.repeats):
            for key in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
                seen[key].append(runs[key]())
        tensors = {k: peak_tensor_mb(run) for k, run in runs.items()}
        return saved, seen, tensors

    for base in bases:
        saved, times, tensors = interleaved(base)
        gc.collect()  # the models' reference cycles: one base's models in memory at a time
        row = {k: {"seconds_per_step": statistics.median(t for t, _ in times[k]), "peak_added_mb": tensors[k],
                   "rss_added_mb": statistics.median(m for _, m in times[k]), "saved_mb": saved[k],
                   "seconds": [t for t, _ in times[k]], "rss_added": [m for _, m in times[k]]} for k in times}
        row["saved_ratio"] = row["lorakit"]["saved_mb"] / row["peft"]["saved_mb"]
        row["time_ratio"] = row["lorakit"]["seconds_per_step"] / row["peft"]["seconds_per_step"]
        row["memory_ratio"] = ratio(row, "peak_added_mb")
        figures["bases"][base] = row
        print(f"{base:5s} lorakit {row['lorakit']['seconds_per_step']:7.2f} s {row['lorakit']['peak_added_mb']:8.1f} MB | "
              f"peft {row['peft']['seconds_per_step']:7.2f} s {row['peft']['peak_added_mb']:8.1f} MB | "
              f"time {row['time_ratio']:.3f}x memory {row['memory_ratio']}x saved {row['saved_ratio']:.3f}x "
              f"({row['lorakit']['saved_mb']:.1f} vs {row['peft']['saved_mb']:.1f} MB); resident set added "
              f"{row['lorakit']['rss_added_mb']:.1f} vs {row['peft']['rss_added_mb']:.1f} MB")
        write_result("qlora", figures, status="ok" if base == bases[-1] else "partial")


if __name__ == "__main__":
    main()
