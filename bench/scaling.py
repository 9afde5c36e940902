"""Scaling curves of LoRA-GA estimation: added memory and time against model size (issue 16).

    nice python bench/scaling.py [--sizes 0,1,3,2] [--samples 2] [--length 64] [--rank 16] [--refit]

Config-built Llama models (random weights, float32, vocabulary 32,000, multi-head attention,
MLP width ≈ 8/3·hidden) of growing width and depth, from ~45M to ~1.1B parameters; every
linear layer of every block targeted (q, k, v, o, gate, up, down), rank 16, the same random
token sequences as causal-LM text (labels = input ids), one sequence per batch (2 by default: on a
shared 2-core machine the largest size is minutes per method). Per size and
method one fresh worker process builds the model, runs a warm-up forward, and measures one
LoRA-GA estimation + initialisation exactly as bench/estimation.py does (bench/common.py:
peak RSS above the post-load baseline, MALLOC_MMAP_THRESHOLD_=65536, wall time on one thread):
- ``peft``: PEFT's ``preprocess_loraga`` + ``get_peft_model`` (a full gradient per target);
- ``lorakit-exact``: G per layer in one pass; ``lorakit-exact-budget``: the same under
  ``memory_budget`` = a quarter of all G (layer groups, one pass each);
- ``lorakit-sketch``: the randomized sketch (q = 1: four passes, O((out+in)·k) per layer);
  ``lorakit-sketch-ckpt``: the sketch with ``estimate_checkpointing`` (block activations
  recomputed in backward);
- ``floor``: the frozen forward/backward passes alone (activations).
Each curve is fitted against parameter count (a power law, added ≈ c·Pᵉ) and, linearly,
against the quantity it should grow with: Σ m·n (full gradients: PEFT, exact) or Σ (m+n)
(the sketch's thin matrices and, with checkpointing, the blocks' inputs). The fits are
extrapolated to Llama-2-7B's and Llama-2-70B's shapes (marked as extrapolation in the report).
Targets (issue 16): at the largest size, sketch + checkpointing ≤ 0.10× PEFT's added memory
at ≤ 3× its time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MEMORY_METHOD, lora_ga_init, measure_added, run_worker, write_result  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ("peft", "lorakit-exact", "lorakit-exact-budget", "lorakit-sketch", "lorakit-sketch-ckpt", "floor")
VOCAB = 32000
# (hidden, MLP width, layers, heads): ~45M, ~141M, ~536M, ~1.1B parameters
SIZES = [(512, 1376, 4, 4), (1024, 2752, 6, 8), (2048, 5504, 8, 16), (3072, 8256, 8, 24)]
# the shapes extrapolated to (hidden, MLP width, layers, heads, key/value heads)
EXTRAPOLATE = {"Llama-2-7B": (4096, 11008, 32, 32, 32), "Llama-2-70B": (8192, 28672, 80, 64, 8)}
TARGET = {"method": "lorakit-sketch-ckpt", "memory": 0.10, "time": 3.0}
SKETCH_METHODS = ("lorakit-sketch", "lorakit-sketch-ckpt")


def shapes(hidden: int, mlp: int, layers: int, heads: int, kv_heads: int | None = None) -> list[tuple[int, int]]:
    """(out, in) of every target layer of a Llama of these dimensions."""
    kv = hidden // heads * (kv_heads or heads)
    block = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden), (mlp, hidden), (hidden, mlp)]
    return block * layers


def size_facts(hidden: int, mlp: int, layers: int, heads: int, kv_heads: int | None = None) -> dict[str, int]:
    layer_shapes = shapes(hidden, mlp, layers, heads, kv_heads)
    targets = sum(m * n for m, n in layer_shapes)
    return {
        "hidden": hidden, "mlp": mlp, "layers": layers, "heads": heads, "kv_heads": kv_heads or heads,
        "parameters": targets + 2 * VOCAB * hidden + (2 * layers + 1) * hidden,  # + embeddings, head, norms
        "target_parameters": targets,  # Σ m·n: what a full gradient per target holds
        "target_rows_cols": sum(m + n for m, n in layer_shapes),  # Σ (m+n): what a sketch per target grows with
    }


def build(size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, mlp, layers, heads = SIZES[size]
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.float32).eval()


def batches(samples: int, length: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (samples, length), generator=g)
    return [{"input_ids": ids[i : i + 1], "attention_mask": torch.ones_like(ids[i : i + 1]), "labels": ids[i : i + 1].clone()}
            for i in range(samples)]


def worker(method: str, size: int, samples: int, length: int, rank: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import peft  # noqa: F401  (imported before the measurement)

    import lorakit  # noqa: F401

    model = build(size)
    data = batches(samples, length)
    with torch.no_grad():
        model(input_ids=data[0]["input_ids"], use_cache=False)  # one-time allocations
    budget = math.ceil(size_facts(*SIZES[size])["target_parameters"] * 4 / 4)  # a quarter of every fp32 G
    result = measure_added(lambda: lora_ga_init(method, model, data, rank, TARGETS, budget=budget))
    return {**result, "memory_budget": budget if "budget" in method else None}


def power_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """y ≈ c·xᵉ by least squares in log-log."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    e = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    return {"exponent": e, "coefficient": math.exp(my - e * mx)}


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """y ≈ intercept + slope·x by least squares, with the worst relative residual."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)
    intercept = my - slope * mx
    worst = max(abs(intercept + slope * x - y) / y for x, y in zip(xs, ys))
    return {"slope": slope, "intercept": intercept, "worst_relative_residual": worst}


RANKS = (1, 8, 64)


def per_rank(extrapolated: dict, dims: tuple) -> dict[str, dict[str, float]]:
    """Extrapolated per-rank memory (GiB, float32) with N FSDP ranks: the rank's shard of the weights,
    one block gathered at a time, plus the estimate's added memory, which every rank holds in full
    (each keeps every layer's sketch or G; its activations are those of its own batch). PEFT has no
    multi-device path: all weights and its added memory on one device, whatever N."""
    hidden, mlp, layers, heads, kv_heads = dims
    block = sum(m * n for m, n in shapes(hidden, mlp, 1, heads, kv_heads)) * 4 / 2**30
    weights = extrapolated["weights_MiB_fp32"] / 2**10
    added = {m: v / 2**10 for m, v in extrapolated["added_MiB"].items()}
    out = {}
    for n in RANKS:
        out[str(n)] = {m: (weights + a if m == "peft" else weights / n + (block if n > 1 else 0.0) + a) for m, a in added.items()
                       if m in ("peft", "lorakit-exact", "lorakit-sketch-ckpt")}
    return out


def predictor(method: str) -> str:
    return "target_rows_cols" if method in SKETCH_METHODS else "target_parameters"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1,3,2", help="indices into SIZES, in the order run (the largest early: a run cut short still has it)")
    parser.add_argument("--budget-sizes", default="0,1", help="sizes at which lorakit-exact-budget runs (its passes cost most)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--refit", action="store_true", help="recompute the fits and extrapolation from bench/results/scaling.json")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.samples, args.length, args.rank, args.threads)))
        return

    if args.refit:  # recompute fits, ratios and extrapolation from the measured sizes in the result file
        figures = json.loads((Path(__file__).resolve().parent / "results" / "scaling.json").read_text())["figures"]
        summarise(figures["sizes"], list(dict.fromkeys(m for r in figures["sizes"] for m in r["runs"])), figures)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = [m for m in args.methods.split(",")]
    rows = []
    for size in sizes:
        facts = size_facts(*SIZES[size])
        runs = {}
        for method in methods:
            if method == "lorakit-exact-budget" and str(size) not in args.budget_sizes.split(","):
                continue
            command = [sys.executable, __file__, "--worker", method, "--size", str(size), "--samples", str(args.samples),
                       "--length", str(args.length), "--rank", str(args.rank), "--threads", str(args.threads)]
            run = run_worker(command)
            runs[method] = {"seconds": run["seconds"], "added_MiB": run["added_bytes"] / 2**20,
                            "baseline_MiB": run["baseline_bytes"] / 2**20, "memory_budget": run["memory_budget"]}
            print(f"{facts['parameters'] / 1e6:7.0f}M {method:22s} {run['seconds']:8.1f} s  +{run['added_bytes'] / 2**20:8.0f} MiB", flush=True)
        rows.append({**facts, "runs": runs})
        write_result("scaling", {**settings(args), "sizes": rows}, status="partial")  # keep what is measured
    summarise(rows, methods, settings(args))


def summarise(rows: list[dict], methods: list[str], settings: dict) -> None:
    """Ratios to PEFT per size, fits of every curve, the target at the largest size, the extrapolation."""
    rows.sort(key=lambda r: r["parameters"])
    fits = {}
    for method in methods:
        points = [(r[predictor(method)], r["parameters"], r["runs"][method]["added_MiB"], r["runs"][method]["seconds"])
                  for r in rows if method in r["runs"]]
        if len(points) >= 2:
            fits[method] = {
                "memory_vs_parameters": power_fit([p[1] for p in points], [p[2] for p in points]),
                "time_vs_parameters": power_fit([p[1] for p in points], [p[3] for p in points]),
                "memory_vs_predictor": {"predictor": predictor(method),
                                        **linear_fit([p[0] for p in points], [p[2] for p in points])},
            }
    for r in rows:
        peft = r["runs"].get("peft")
        r["ratios_vs_peft"] = {m: {"memory": r["runs"][m]["added_MiB"] / peft["added_MiB"], "time": r["runs"][m]["seconds"] / peft["seconds"]}
                               for m in methods if m != "peft" and m in r["runs"]} if peft else {}
    met = None
    largest = size_facts(*SIZES[-1])["parameters"]
    if rows and rows[-1]["parameters"] == largest and TARGET["method"] in rows[-1]["ratios_vs_peft"]:
        last = rows[-1]["ratios_vs_peft"][TARGET["method"]]
        met = last["memory"] <= TARGET["memory"] and last["time"] <= TARGET["time"]
    extrapolation = {}
    for name, dims in EXTRAPOLATE.items():
        facts = size_facts(*dims)
        extrapolation[name] = {
            **facts,
            "added_MiB": {m: f["memory_vs_predictor"]["intercept"] + f["memory_vs_predictor"]["slope"] * facts[predictor(m)]
                          for m, f in fits.items()},
            "weights_MiB_fp32": facts["parameters"] * 4 / 2**20,
        }
        extrapolation[name]["per_rank_GiB"] = per_rank(extrapolation[name], dims)
    status = "partial" if not rows or rows[-1]["parameters"] != largest else "ok" if met else "targets-missed"
    keep = {k: settings[k] for k in settings if k not in ("sizes", "fits", "target", "target_met", "extrapolation", "fsdp")}
    write_result("scaling", {**keep, "sizes": rows, "fits": fits, "target": TARGET, "target_met": met,
                             "extrapolation": extrapolation}, status=status)
    for r in rows:
        cells = "  ".join(f"{m}: {x['memory']:.3f}× mem {x['time']:.2f}× time" for m, x in r["ratios_vs_peft"].items())
        print(f"{r['parameters'] / 1e6:7.0f}M  {cells}")
    for m, f in fits.items():
        print(f"{m:22s} memory ∝ P^{f['memory_vs_parameters']['exponent']:.2f}, time ∝ P^{f['time_vs_parameters']['exponent']:.2f}")
    print(f"target ({TARGET}): {'met' if met else 'NOT met' if met is not None else 'not measured'}")


def settings(args) -> dict:
    return {
        "model": f"config-built Llama, random weights, float32, vocabulary {VOCAB}, all 7 linear projections per block",
        "samples": args.samples, "tokens_per_sample": args.length, "batch_size": 1, "rank": args.rank,
        "threads": args.threads, "repeats": 1, "memory_method": MEMORY_METHOD,
        "memory_budget": f"a quarter of all target G (fp32), for lorakit-exact-budget (run at sizes {args.budget_sizes} only)",
    }


if __name__ == "__main__":
    main()
