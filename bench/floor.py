"""A training step against its physical floor, measured side by side in one run (issue 19).

    python bench/floor.py [--model minilm|smollm2] [--methods lora,dora,lora-fa,lora-xs]
                          [--batch 32] [--length 64] [--repeats 9] [--threads 2] [--compile] [--general]
                          [--output NAME]

The floor of a LoRA step is the frozen model's forward plus the backward that propagates
input gradients only (no weight-gradient GEMM for a frozen weight): here, the base model
with every parameter frozen, fed its input embeddings as a leaf that requires grad, so the
backward runs through every layer down to the input. A lorakit step is forward + backward +
the optimizer step (lorakit.make_optimizer: fused AdamW, max_grad_norm 1.0, as the recipe
trains). Every variant gets the same batch (Rotten Tomatoes padded to ``--length`` tokens for
MiniLM, GSM-style problems for SmolLM2), all run interleaved in one process; the ratios are
medians over repeats of the ratio within a repeat (machine drifts cancel), on wall time and
on process CPU time (steadier on a shared machine). lora-xs trains R only, the structure
lora-sb trains. ``--compile`` adds lora with ``torch.compile`` (inductor with ``fallback_random``, as
``train.compile`` runs it; forward and backward; the first call compiles, outside the timing); ``--general`` adds lora through the adapters' general
autograd path instead of the fused Linear + low-rank node. Each variant's FLOPs per step (torch's
FlopCounterMode) give the ratio no implementation can beat without less arithmetic: the floor
of the floor ratio. A torch profiler summary compares one lora step
with one floor step per operator: where the extra time goes. ``--gemm-bound`` times, in the same
interleaved repeats, the GEMMs alone: the frozen layers' own two (x Wᵀ, g W) and, for lora, lora-fa and
lora-xs, the low-rank GEMMs the fused node adds (written out per layer on buffers of the step's sizes):
their FLOP rates show the thin rank-r GEMMs' efficiency against the frozen ones', and floor + those GEMMs +
the variant's optimizer step estimates the step of an implementation that adds nothing else with these
GEMM kernels (an estimate, not a bound: in the step the GEMMs' operands may sit warmer in cache).
Every run also times the floor a second time, last in each repeat ("floor, again"): its ratio to the
floor, 1 on an ideal machine, is the run's own resolution.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from unittest import mock

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import minilm_padded, profile_compare, write_result  # noqa: E402

import lorakit  # noqa: E402
from lorakit.adapters import fused  # noqa: E402
from lorakit.adapters.base import LowRankAdapter  # noqa: E402
from lorakit.recipes.loop import INDUCTOR_OPTIONS  # noqa: E402

PHASES = ("forward", "backward", "optimizer")


def smollm2_causal(batch: int, length: int):
    import reasoning_gym
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.recipes.models import smollm2_path

    path = smollm2_path()  # the GGUF converted once into a cached folder
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    rows = reasoning_gym.create_dataset("gsm_symbolic", size=batch, seed=0)
    enc = tokenizer([f"{r['question']}\n{r['answer']}" for r in rows], padding="max_length", truncation=True,
                    max_length=length, return_tensors="pt")
    enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return model, dict(enc)


class Timed:
    """One training step split into its phases; ``run()`` appends each phase's wall and CPU seconds."""

    def __init__(self, forward: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer | None) -> None:
        self.forward, self.optimizer = forward, optimizer
        self.times: dict[str, dict[str, list[float]]] = {c: {p: [] for p in (*PHASES, "step")} for c in ("wall", "cpu")}

    def step(self) -> None:
        loss = self.forward()
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    def run(self) -> None:
        marks = [(time.perf_counter(), time.process_time())]
        loss = self.forward()
        marks.append((time.perf_counter(), time.process_time()))
        loss.backward()
        marks.append((time.perf_counter(), time.process_time()))
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        marks.append((time.perf_counter(), time.process_time()))
        for c, clock in enumerate(("wall", "cpu")):
            for k, phase in enumerate(PHASES):
                self.times[clock][phase].append(marks[k + 1][c] - marks[k][c])
            self.times[clock]["step"].append(marks[-1][c] - marks[0][c])


COMPILE_OPTIONS = INDUCTOR_OPTIONS  # lorakit.recipes.loop.compiled's: aten's dropout masks, not inductor's


def floor_variant(base: nn.Module, batch: dict[str, torch.Tensor]) -> Timed:
    model = copy.deepcopy(base).train()
    model.requires_grad_(False)
    embed = model.get_input_embeddings()
    inputs = {k: v for k, v in batch.items() if k != "input_ids"}

    def forward() -> torch.Tensor:
        x = embed(batch["input_ids"]).detach().requires_grad_(True)  # input gradients only
        return model(inputs_embeds=x, **inputs).loss

    return Timed(forward, None)


def lorakit_variant(base: nn.Module, batch: dict[str, torch.Tensor], method: str, rank: int, compiled: bool = False,
                    general: bool = False) -> Timed:
    """``general``: the adapters' general autograd path (base layer, then the scaled low-rank sum), not the
    fused node of lorakit.adapters.fused, to show what the fusion gains in the same run."""
    model = copy.deepcopy(base)
    lorakit.adapt(model, lorakit.AdapterConfig(method=method, rank=rank, alpha=2 * rank))
    model.train()
    optimizer = lorakit.make_optimizer(model, lr=1e-8, max_grad_norm=1.0)  # tiny lr: the weights stay put
    engine = torch.compile(model, options=COMPILE_OPTIONS) if compiled else model  # inductor, as train.compile

    def forward() -> torch.Tensor:
        if not general:
            return engine(**batch).loss
        with mock.patch.object(fused, "applies", lambda adapter, x: False):
            return engine(**batch).loss

    return Timed(forward, optimizer)


# -- the GEMMs alone (--gemm-bound) ------------------------------------------------------------
ADAPTER_GEMMS = ("lora", "lora-fa", "lora-xs")  # the structures whose low-rank GEMMs gemm_block writes out
FROZEN = "frozen"  # gemm_block's name for the frozen layers' own GEMMs (the floor's x Wᵀ and g W)


def adapted_shapes(base: nn.Module, method: str, rank: int) -> list[tuple[int, int]]:
    """(in, out) of every layer lorakit adapts in ``base`` for ``method``, in module order."""
    model = copy.deepcopy(base)
    lorakit.adapt(model, lorakit.AdapterConfig(method=method, rank=rank, alpha=2 * rank))
    return [(m.base_layer.in_features, m.base_layer.out_features) for m in model.modules()
            if isinstance(m, LowRankAdapter) and isinstance(m.base_layer, nn.Linear)]


def gemm_block(shapes: list[tuple[int, int]], tokens: int, rank: int, method: str) -> Timed:
    """One step's GEMMs of ``method`` (``FROZEN``: the frozen layers' x Wᵀ and g W; else the low-rank GEMMs the
    fused node of lorakit.adapters.fused adds for that structure, its scalings included), per layer of
    ``shapes``, with per-layer weights on activations and output gradients of ``tokens`` rows, one set per
    shape (as warm as in the step, where the base GEMM has just read them): a ``Timed`` with forward and
    backward."""
    scale, buffers, layers = 0.5, {}, []
    for d_in, d_out in shapes:
        if (d_in, d_out) not in buffers:
            buffers[(d_in, d_out)] = {"x": torch.randn(tokens, d_in), "y": torch.randn(tokens, d_out),
                                      "g": torch.randn(tokens, d_out), "gx": torch.randn(tokens, d_in)}
        io = buffers[(d_in, d_out)]
        w = ({"W": torch.randn(d_out, d_in)} if method == FROZEN else
             {"A": torch.randn(rank, d_in), "B": torch.randn(d_out, rank), "R": torch.randn(rank, rank)})
        layers.append({**io, **w})
    step = {FROZEN: (_frozen_forward, _frozen_backward), "lora": (_lora_forward, _lora_backward),
            "lora-fa": (_lora_forward, _lora_fa_backward), "lora-xs": (_xs_forward, _xs_backward)}[method]

    def forward() -> Any:
        saved = [step[0](layer, scale) for layer in layers]
        return SimpleNamespace(backward=lambda: [step[1](layer, h, scale) for layer, h in zip(layers, saved)])

    return Timed(forward, None)


def _frozen_forward(L: dict[str, torch.Tensor], s: float) -> None:
    torch.mm(L["x"], L["W"].T, out=L["y"])


def _frozen_backward(L: dict[str, torch.Tensor], h: None, s: float) -> None:
    torch.mm(L["g"], L["W"], out=L["gx"])


def _lora_forward(L: dict[str, torch.Tensor], s: float) -> torch.Tensor:
    h = L["x"] @ L["A"].T
    L["y"].addmm_(h, L["B"].T, alpha=s)
    return h


def _lora_backward(L: dict[str, torch.Tensor], h: torch.Tensor, s: float) -> None:
    (L["g"].T @ h).mul_(s)  # ∇B
    v = L["g"] @ L["B"]
    (v.T @ L["x"]).mul_(s)  # ∇A
    L["gx"].addmm_(v, L["A"], alpha=s)


def _lora_fa_backward(L: dict[str, torch.Tensor], h: torch.Tensor, s: float) -> None:
    (L["g"].T @ h).mul_(s)  # ∇B; A is frozen
    L["gx"].addmm_(L["g"] @ L["B"], L["A"], alpha=s)


def _xs_forward(L: dict[str, torch.Tensor], s: float) -> torch.Tensor:
    h_a = L["x"] @ L["A"].T
    L["y"].addmm_(h_a @ L["R"].T, L["B"].T, alpha=s)
    return h_a


def _xs_backward(L: dict[str, torch.Tensor], h_a: torch.Tensor, s: float) -> None:
    v = L["g"] @ L["B"]
    (v.T @ h_a).mul_(s)  # ∇R; A and B are frozen
    L["gx"].addmm_(v @ L["R"], L["A"], alpha=s)


def gemm_bound_ratios(variants: dict[str, Timed]) -> dict[str, float]:
    """Per structure timed with its GEMMs alone: (floor + its adapter GEMMs + its optimizer step) / floor, paired
    per repeat (the step of an implementation adding nothing else, estimated), and the frozen GEMMs' share of
    the floor step."""
    floor_steps = variants["floor"].times["cpu"]["step"]
    ratios = {}
    frozen = variants.get(f"{FROZEN} GEMMs")
    if frozen is not None:
        ratios["frozen GEMMs / floor step (cpu)"] = paired(frozen.times["cpu"]["step"], floor_steps)
    for method in ADAPTER_GEMMS:
        block, step = variants.get(f"{method} GEMMs"), variants.get(method)
        if block is None or step is None:
            continue
        bound = [(f + g + o) / f for f, g, o in zip(floor_steps, block.times["cpu"]["step"], step.times["cpu"]["optimizer"])]
        ratios[f"{method}: (floor + its GEMMs alone + optimizer) / floor (cpu)"] = statistics.median(bound)
    return ratios


def inplace_mm_flop(self_shape, a_shape, b_shape, out_shape=None, **kwargs) -> int:
    """addmm_ / baddbmm_: what their out-of-place forms count (torch's FlopCounterMode counts a bare call as 0)."""
    return 2 * math.prod(a_shape) * b_shape[-1]


def counted_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of ``fn()``'s matmuls, convolutions and attention, counted by torch's
    FlopCounterMode, a bare in-place GEMM included (the counter leaves one out outside autograd; inside the
    fused node's autograd.Function it sees them already, and tests/bench/test_floor.py checks nothing is
    counted twice)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    with FlopCounterMode(display=False, custom_mapping={aten.addmm_: inplace_mm_flop, aten.baddbmm_: inplace_mm_flop}) as counter:
        fn()
    return counter.get_total_flops()


def step_flops(variant: Timed) -> int:
    """Floating-point operations of one step, forward and backward (``counted_flops``): the ratio to the floor's
    is the lowest step-time ratio reachable without doing less arithmetic."""
    return counted_flops(variant.step)


def paired(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


TARGETS = {"lora step / floor (cpu)": "<= 1.10", "lora-xs step / floor (cpu)": "<= 1.05",
           "lora-fa step / floor (cpu)": "<= 1.05", "dora step / lora step (cpu)": "<= 1.15",
           "compiled lora step / eager lora step (cpu)": "<= 0.85"}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    parser.add_argument("--methods", default="lora,dora,lora-fa,lora-xs")
    parser.add_argument("--batch", type=int, default=None, help="default 32 (minilm) / 8 (smollm2)")
    parser.add_argument("--length", type=int, default=None, help="tokens; default 64 (minilm) / 256 (smollm2)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time lora under torch.compile")
    parser.add_argument("--general", action="store_true",
                        help="also time lora through the adapters' general autograd path (no fused node)")
    parser.add_argument("--gemm-bound", action="store_true",
                        help="also time the frozen layers' GEMMs and each structure's low-rank GEMMs alone")
    parser.add_argument("--output", default=None, help="result name (default floor_<model>)")
    return parser.parse_args()


CONTROL = "floor, again"  # the A/A control: a second copy of the floor, timed last in every repeat


def build_variants(args: argparse.Namespace, base: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Timed]:
    """The floor, each method's step, the optional variants and GEMM blocks, and last the floor again (its ratio
    to the floor is this run's own resolution: two identical steps measured side by side)."""
    variants = {"floor": floor_variant(base, batch)}
    for method in args.methods.split(","):
        variants[method] = lorakit_variant(base, batch, method, args.rank)
    if args.general:
        variants["lora general path"] = lorakit_variant(base, batch, "lora", args.rank, general=True)
    if args.compile:
        variants["lora compiled"] = lorakit_variant(base, batch, "lora", args.rank, compiled=True)
    if args.gemm_bound:
        tokens = math.prod(batch["input_ids"].shape)
        for method in (FROZEN, *(m for m in args.methods.split(",") if m in ADAPTER_GEMMS)):
            shapes = adapted_shapes(base, "lora" if method == FROZEN else method, args.rank)
            variants[f"{method} GEMMs"] = gemm_block(shapes, tokens, args.rank, method)
    variants[CONTROL] = floor_variant(base, batch)
    return variants


def measure(variants: dict[str, Timed], repeats: int) -> dict[str, float]:
    """One untimed call each (compilation included), then ``repeats`` interleaved timed steps; the first
    calls' seconds are returned."""
    first_call = {}
    for name, v in variants.items():
        start = time.perf_counter()
        v.step()
        first_call[name] = time.perf_counter() - start
    for _ in range(repeats):
        for v in variants.values():
            v.run()
    return first_call


def step_ratios(variants: dict[str, Timed], flops: dict[str, int]) -> dict[str, float]:
    """Each variant against the floor (per phase, both clocks, and in FLOPs) and the side-by-side pairs."""
    floor = variants["floor"].times
    ratios: dict[str, float] = {}
    for name, v in variants.items():
        if name == "floor" or name.endswith(" GEMMs"):
            continue
        for clock in ("cpu", "wall"):
            ratios[f"{name} step / floor ({clock})"] = paired(v.times[clock]["step"], floor[clock]["step"])
            ratios[f"{name} forward / floor forward ({clock})"] = paired(v.times[clock]["forward"], floor[clock]["forward"])
            ratios[f"{name} backward / floor backward ({clock})"] = paired(v.times[clock]["backward"], floor[clock]["backward"])
    for name, n in flops.items():
        if name != "floor" and not name.endswith(" GEMMs"):
            ratios[f"{name} step / floor (FLOPs)"] = n / flops["floor"]
    if "dora" in flops and "lora" in flops:
        ratios["dora step / lora step (FLOPs)"] = flops["dora"] / flops["lora"]
    pairs = {"fused lora step / general-path lora step": ("lora", "lora general path"),
             "dora step / lora step": ("dora", "lora"),
             "compiled lora step / eager lora step": ("lora compiled", "lora")}
    for clock in ("cpu", "wall"):
        for label, (a, b) in pairs.items():
            if a in variants and b in variants:
                ratios[f"{label} ({clock})"] = paired(variants[a].times[clock]["step"], variants[b].times[clock]["step"])
    return ratios


def print_summary(title: str, medians: dict[str, dict[str, dict[str, float]]], ratios: dict[str, float],
                  profile: list[dict[str, Any]]) -> None:
    print(title)
    for name, m in medians.items():
        parts = "  ".join(f"{p} {1000 * m['cpu'][p]:8.1f}" for p in PHASES)
        print(f"{name:14s} cpu ms: step {1000 * m['cpu']['step']:8.1f}  {parts}   wall step {1000 * m['wall']['step']:8.1f}")
    for k, v in ratios.items():
        print(f"{k:52s} {v:.3f}x")
    if profile:
        print("profile, self CPU ms of one step (lora vs floor), largest differences:")
        for row in profile:
            print(f"  {row['op'][:40]:40s} lora {row['lora']:8.2f} ({row['calls lora']:4d})  floor {row['floor']:8.2f} "
                  f"({row['calls floor']:4d})  extra {row['extra']:+8.2f}")


def main() -> None:
    args = arguments()
    torch.set_num_threads(args.threads)
    batch_size = args.batch or (32 if args.model == "minilm" else 8)
    length = args.length or (64 if args.model == "minilm" else 256)
    base, batch = (minilm_padded if args.model == "minilm" else smollm2_causal)(batch_size, length)
    base.eval()

    variants = build_variants(args, base, batch)
    flops = {name: step_flops(v) for name, v in variants.items() if name != "lora compiled"}
    load_before = os.getloadavg()
    first_call = measure(variants, args.repeats)
    medians = {name: {clock: {p: statistics.median(t) for p, t in v.times[clock].items()} for clock in ("wall", "cpu")}
               for name, v in variants.items()}
    ratios = {**step_ratios(variants, flops), **gemm_bound_ratios(variants)}
    profile = (profile_compare({"lora": variants["lora"].step, "floor": variants["floor"].step})
               if "lora" in variants else [])

    shape = tuple(batch["input_ids"].shape)
    print_summary(f"{args.model}, batch {shape[0]} x {shape[1]} tokens, rank {args.rank}, {args.threads} threads, "
                  f"{args.repeats} repeats, load {load_before[0]:.1f}", medians, ratios, profile)
    write_result(
        args.output or f"floor_{args.model}",
        {
            "model": {"minilm": "all-MiniLM-L6-v2 (sequence classification)", "smollm2": "SmolLM2-135M-Instruct (causal LM)"}[args.model],
            "batch": shape[0],
            "tokens": shape[1],
            "rank": args.rank,
            "targets": "all-linear",
            "optimizer": "lorakit.make_optimizer: fused AdamW, max_grad_norm 1.0",
            "floor": "frozen forward + input-gradient backward (inputs_embeds a leaf requiring grad)",
            "repeats": args.repeats,
            "torch_threads": args.threads,
            "load_average": {"before": load_before, "after": os.getloadavg()},
            "first_call_seconds": first_call,
            "compile": {"backend": "inductor", "options": COMPILE_OPTIONS} if args.compile else None,
            "step_flops": flops,
            "seconds_median": medians,
            "ratios": ratios,
            "profile_lora_vs_floor_ms": profile,
            "target": TARGETS,
        },
    )


if __name__ == "__main__":
    main()
