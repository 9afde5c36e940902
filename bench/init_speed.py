"""SVD-initialisation time and accuracy: lorakit pissa vs PEFT's pissa (issue 6).

    python bench/init_speed.py [--repeats 5] [--rank 16]

On the real SmolLM2-135M (all linear layers), measured side by side in one run:
lorakit pissa with the randomized SVD (oversampling 16, 4 power iterations) and with the
exact SVD, PEFT `init_lora_weights="pissa"` (exact SVD) and `"pissa_niter_4"`
(torch.svd_lowrank, no oversampling). Agreement with the exact SVD, averaged over layers:
the residual ratio ‖W − s·BA‖ / ‖W − trunc_r(W)‖ (1 = optimal), the captured energy
‖s·BA‖² / ‖trunc_r(W)‖², and the relative distance ‖s·BA − trunc_r(W)‖ / ‖trunc_r(W)‖ (large
even for near-optimal approximations when the spectrum is flat around σ_r, as in these weights).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
from common import interleaved_medians, write_result

import lorakit
from lorakit.linalg import exact_svd, truncate


def load_smollm2():
    from transformers import AutoModelForCausalLM

    from lorakit.recipes.models import smollm2_path

    return AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    from peft import LoraConfig, get_peft_model

    r = args.rank
    base = load_smollm2()
    weights = {n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    built = {}

    def ours(svd: str):
        def run():
            built[f"lorakit pissa ({svd})"] = lorakit.adapt(copy.deepcopy(base), lorakit.AdapterConfig(method="pissa", rank=r, svd=svd))

        return run

    def theirs(init: str):
        def run():
            config = LoraConfig(r=r, lora_alpha=r, target_modules="all-linear", init_lora_weights=init)
            built[f"peft {init}"] = get_peft_model(copy.deepcopy(base), config)

        return run

    def copy_only():
        copy.deepcopy(base)

    fns = {
        "deepcopy (subtracted)": copy_only,
        "lorakit pissa (randomized)": ours("randomized"),
        "lorakit pissa (exact)": ours("exact"),
        "peft pissa": theirs("pissa"),
        "peft pissa_niter_4": theirs("pissa_niter_4"),
    }
    medians = interleaved_medians(fns, args.repeats, warmup=0)
    copy_time = medians.pop("deepcopy (subtracted)")
    seconds = {k: v - copy_time for k, v in medians.items()}

    exact = {n: truncate(exact_svd(W, r)) for n, W in weights.items()}

    def agreement(key: str) -> dict[str, float]:
        model = built[key]
        rows = []
        for name, target in exact.items():
            W = weights[name]
            if key.startswith("lorakit"):
                module = model.get_submodule(name)
                approx = module.scale * module.B.detach() @ module.A.detach()
            else:
                module = model.base_model.model.get_submodule(name)
                approx = module.scaling["default"] * module.lora_B["default"].weight.detach() @ module.lora_A["default"].weight.detach()
            rows.append(
                (
                    ((W - approx).norm() / (W - target).norm()).item(),
                    (approx.norm() ** 2 / target.norm() ** 2).item(),
                    ((approx - target).norm() / target.norm()).item(),
                )
            )
        return {
            "residual_ratio": statistics.mean(r[0] for r in rows),
            "captured_energy": statistics.mean(r[1] for r in rows),
            "distance_to_exact_truncation": statistics.mean(r[2] for r in rows),
        }

    errors = {k: agreement(k) for k in seconds}
    ratios = {
        "lorakit randomized / peft pissa (exact)": seconds["lorakit pissa (randomized)"] / seconds["peft pissa"],
        "lorakit randomized / peft pissa_niter_4": seconds["lorakit pissa (randomized)"] / seconds["peft pissa_niter_4"],
    }
    for k in seconds:
        e = errors[k]
        print(f"{k:28s} {seconds[k]:7.2f} s   residual ratio {e['residual_ratio']:.5f}  energy {e['captured_energy']:.4f}  distance {e['distance_to_exact_truncation']:.3f}")
    for k, v in ratios.items():
        print(f"{k:42s} {v:.3f}x")
    write_result(
        "init_speed",
        {
            "model": "SmolLM2-135M-Instruct (fp32, dequantised GGUF)",
            "targets": "all-linear",
            "layers": len(weights),
            "rank": r,
            "repeats": args.repeats,
            "seconds_median": seconds,
            "agreement_with_exact_svd": errors,
            "ratios": ratios,
        },
    )


if __name__ == "__main__":
    main()
