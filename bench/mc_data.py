"""A multiple-choice task from reasoning-gym: chain_sum problems, each with its answer and three
numeric distractors, written as question / choices / answer (index) JSONL for ``task: multiple-choice``.

    python bench/mc_data.py   # -> bench/data/chain_sum_mc.jsonl

The problems are reasoning-gym's chain_sum (2 terms of 1-2 digits, + or -; seed 0), distinct
questions only. The distractors are the answer moved by three distinct offsets drawn from
{-10, -2, -1, +1, +2, +10} (a wrong units or tens digit), so the right option's rank among the
four is not fixed; the options are shuffled (seeded). Lorakit's seeded split then makes train,
validation and test from the one file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "chain_sum_mc.jsonl"
OPTIONS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
OFFSETS = (-10, -2, -1, 1, 2, 10)
SIZE = 2000


def rows(size: int = SIZE, seed: int = 0) -> list[dict]:
    import reasoning_gym

    rng = random.Random(seed)
    seen: set[str] = set()
    out = []
    for item in reasoning_gym.create_dataset("chain_sum", size=2 * size, seed=seed, **OPTIONS):
        if item["question"] in seen:
            continue
        seen.add(item["question"])
        answer = int(item["answer"])
        choices = [answer] + [answer + d for d in rng.sample(OFFSETS, 3)]
        rng.shuffle(choices)
        out.append({"question": item["question"], "choices": [str(c) for c in choices], "answer": choices.index(answer)})
        if len(out) == size:
            break
    return out


def main() -> None:
    data = rows()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps(r) + "\n" for r in data))
    print(f"wrote {len(data)} problems to {OUT}")


if __name__ == "__main__":
    main()
