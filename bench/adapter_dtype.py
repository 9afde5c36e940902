"""What fp32 adapters cost on a bf16 base (issue 13, item 1), measured side by side in one run.

    python bench/adapter_dtype.py [--repeats 9] [--tokens 512] [--batch 2] [--length 64] [--rank 16]

SmolLM2-135M in bf16, LoRA r=16 on all linear layers, AdamW; a step is forward + backward +
optimizer step on one batch of token ids. Three ways to run the low-rank path:
  bf16            factors stored and computed in bf16 (the base's dtype);
  fp32            factors stored in fp32, cast to the input's bf16 for the matmuls (lorakit's
                  default, autocast-style);
  fp32-input      factors stored in fp32, the input cast to fp32 (PEFT's default).
Time: forward + backward of one adapted SmolLM2 MLP projection (576 → 1536, bf16) on
``--tokens`` tokens, medians over interleaved repeats (whole-model bf16 steps take minutes
here: this CPU has no AVX512-BF16 and emulates bf16 matmuls, so read the ratios as this
machine's, not a GPU's). Memory: the
bytes autograd saves for the backward (unique storages, counted with saved_tensors_hooks)
plus the trainable factors and AdamW's two moments — exact and noise-free. Update loss: the
fraction of AdamW's first update (lr·sign(g)) that bf16 storage rounds away.
"""

from __future__ import annotations

import argparse
import copy
import torch
from common import interleaved_medians, write_result

import lorakit
from lorakit.adapters import LoRA
from lorakit.adapters.base import as_dtype

VARIANTS = ("bf16", "fp32", "fp32-input")


class CastInputLoRA(LoRA):
    """fp32-input: the input cast to the factors' dtype, as PEFT does."""

    def low_rank_output(self, x):
        return super().low_rank_output(as_dtype(x, self.adapter_dtype))


def build(base, variant: str, rank: int):
    model = copy.deepcopy(base)
    dtype = "bfloat16" if variant == "bf16" else "float32"
    lorakit.adapt(model, lorakit.AdapterConfig(method="lora", rank=rank, alpha=2 * rank, adapter_dtype=dtype))
    if variant == "fp32-input":
        for adapter in lorakit.adapters_of(model).values():
            adapter.__class__ = CastInputLoRA
    model.train()
    return model


def layer_step(model, tokens: int):
    """Forward + backward through the first gate_proj adapter of ``model``."""
    adapter = model.get_submodule("model.layers.0.mlp.gate_proj")
    x = torch.randn(tokens, adapter.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    x.requires_grad_(True)

    def run() -> None:
        adapter(x).float().square().mean().backward()
        adapter.zero_grad(set_to_none=True)

    return run


def batch_of(size: int, length: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 49152, (size, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids}


def step_memory(model, batch) -> int:
    """Bytes held through a step: tensors saved for backward, trainable factors, AdamW moments."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    frozen = {p.untyped_storage().data_ptr() for p in model.parameters() if not p.requires_grad}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    activations = sum(n for ptr, n in saved.items() if ptr not in frozen)  # frozen weights are held anyway
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return activations + 3 * trainable  # factors + exp_avg + exp_avg_sq (same dtype); grads freed at zero_grad


def rounded_away_fraction(model, batch) -> float:
    """Fraction of trainable elements whose first AdamW update (size ≈ lr) a bf16 copy drops."""
    model(**batch).loss.backward()
    lost = total = 0
    for p in (p for p in model.parameters() if p.requires_grad):
        before = p.detach().clone()
        update = -2e-4 * torch.sign(p.grad)  # Adam's first step is lr·sign(g)
        after = (before + update).to(torch.bfloat16).float()
        lost += int(((after == before.to(torch.bfloat16).float()) & (before != 0)).sum())
        total += int((before != 0).sum())
    model.zero_grad(set_to_none=True)
    return lost / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from lorakit.recipes.models import smollm2_path

    base = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.bfloat16)
    batch = batch_of(args.batch, args.length)
    models = {v: build(base, v, args.rank) for v in VARIANTS}
    memory = {v: step_memory(m, batch) for v, m in models.items()}
    print("step memory (MiB):", {v: round(n / 2**20, 1) for v, n in memory.items()}, flush=True)
    times = interleaved_medians({v: layer_step(models[v], args.tokens) for v in VARIANTS}, repeats=args.repeats)
    lost = rounded_away_fraction(models["fp32"], batch)
    figures = {
        "setup": {"model": "SmolLM2-135M bf16", "batch": args.batch, "length": args.length, "rank": args.rank, "layer_tokens": args.tokens},
        "layer_step_seconds": times,
        "step_memory_bytes": memory,
        "step_time_vs_bf16": {v: times[v] / times["bf16"] for v in VARIANTS},
        "memory_vs_bf16": {v: memory[v] / memory["bf16"] for v in VARIANTS},
        "first_update_rounded_away_in_bf16": lost,
    }
    for v in VARIANTS:
        print(f"{v:>11}: layer step {times[v] * 1e3:.1f} ms ({times[v] / times['bf16']:.2f}×), held {memory[v] / 2**20:.0f} MiB ({memory[v] / memory['bf16']:.2f}×)")
    print(f"bf16 storage rounds away {100 * lost:.1f} % of the first AdamW update's elements")
    write_result("adapter_dtype", figures)


if __name__ == "__main__":
    main()
