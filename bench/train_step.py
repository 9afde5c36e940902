"""Training-step time, measured side by side in one run (issue 6).

    python bench/train_step.py [--repeats 7] [--steps 3] [--rank 16] [--batch 16] [--threads 1]

Pairs on the real all-MiniLM-L6-v2 classifier, Rotten Tomatoes batches, all linear layers
targeted, AdamW: lorakit lora vs PEFT lora, lorakit dora vs PEFT dora, lorakit lora-sb vs
lorakit lora. A step is forward + backward + optimizer step. Figures are medians over
interleaved repeats; the ratios are the result (these machines are noisy).

``floor`` is the frozen model's forward plus the backward that only propagates input gradients
(bench/floor.py's floor, no optimizer): no LoRA step can take less, so ``floor / peft lora`` is the
lowest ``lorakit lora / peft lora`` any implementation could reach on this machine.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from common import interleaved_medians, minilm_classifier, rotten_tomatoes_batch, write_result
from floor import floor_variant

import lorakit


def stepper(model, batch, steps: int):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run() -> None:
        for _ in range(steps):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 keeps a shared machine's timing steady)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    base, tokenizer = minilm_classifier()
    batch = rotten_tomatoes_batch(tokenizer, args.batch)
    r = args.rank

    def ours(method: str, **extra):
        model = copy.deepcopy(base)
        if method == "lora-sb":
            extra["data"] = [rotten_tomatoes_batch(tokenizer, 16, offset=1000 + 16 * i) for i in range(4)]
        lorakit.adapt(model, lorakit.AdapterConfig(method=method, rank=r, alpha=2 * r, num_samples=64), data=extra.get("data"))
        return model

    def theirs(use_dora: bool):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", use_dora=use_dora, task_type="SEQ_CLS")
        return get_peft_model(copy.deepcopy(base), config)

    models = {
        "lorakit lora": ours("lora"),
        "peft lora": theirs(False),
        "lorakit dora": ours("dora"),
        "peft dora": theirs(True),
        "lorakit lora-sb": ours("lora-sb"),
    }
    trainable = {k: lorakit.parameter_report(m).trainable if k.startswith("lorakit") else sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    fns = {k: stepper(m, batch, args.steps) for k, m in models.items()}
    floor = floor_variant(base, batch)
    fns["floor"] = lambda: [floor.step() for _ in range(args.steps)]
    medians = interleaved_medians(fns, args.repeats, clock=time.process_time)  # CPU time: steadier on a shared machine
    per_step = {k: v / args.steps for k, v in medians.items()}
    ratios = {
        "lorakit lora / peft lora": per_step["lorakit lora"] / per_step["peft lora"],
        "lorakit dora / peft dora": per_step["lorakit dora"] / per_step["peft dora"],
        "lorakit lora-sb / lorakit lora": per_step["lorakit lora-sb"] / per_step["lorakit lora"],
        "lorakit lora / floor": per_step["lorakit lora"] / per_step["floor"],
        "peft lora / floor": per_step["peft lora"] / per_step["floor"],
        "floor / peft lora": per_step["floor"] / per_step["peft lora"],
    }
    for k, v in per_step.items():
        print(f"{k:18s} {1000 * v:8.1f} ms/step   trainable {trainable.get(k, 0):,}")
    for k, v in ratios.items():
        print(f"{k:32s} {v:.3f}x")
    write_result(
        "train_step",
        {
            "model": "all-MiniLM-L6-v2 (sequence classification)",
            "data": "Rotten Tomatoes",
            "rank": r,
            "batch": args.batch,
            "targets": "all-linear",
            "repeats": args.repeats,
            "steps_per_repeat": args.steps,
            "seconds_per_step_median": per_step,
            "trainable_parameters": trainable,
            "ratios": ratios,
            "torch_threads": args.threads,
            "clock": "process CPU time",
            "target": {"lorakit lora / peft lora": "<= 0.75", "lorakit dora / peft dora": "<= 1.0"},  # issue 19; issue 6 asked <= 1.0
        },
    )


if __name__ == "__main__":
    main()
