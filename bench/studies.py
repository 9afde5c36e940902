"""Studies of issue 18: configs that test one paper claim each, run by bench/quality.py and
published by bench/report.py.

A study config (bench/configs/study_*.yaml) names its ``study`` kind and takes the protocol
(``base``, ``budgets``, ``select``, ``reference`` and each family's overrides and lr grid) from
the quality config it ``inherits``; its ``points`` expand into the methods quality.py trains:

    frontier       points: {lora: {rank: [1, 2, 4]}}  -> methods lora@r1, lora@r2, lora@r4
                   (each point's lr chosen on validation from the family's grid, as in quality.py)
    lr-robustness  points: {lora: {lr: [...]}}        -> methods lora@lr0.0005, ... with that lr
                   fixed: every point on every seed, no selection
    convergence, long-budget, combinations: ``methods`` as in a quality config, or ``from_parent``
                   (a list of the inherited config's methods); combinations also ``pairs``.

``reuse`` takes points from another result of the same protocol (same base config, budget,
seeds, grid and overrides, checked) instead of training them again.

Every fact about a study kind (its claim, the paper's setting, how a verdict follows from the
numbers and at which threshold) is in STUDIES; the pure computations (the 27x check, the lr-range
width, paired differences, the verdicts) are functions here so tests can check them on synthetic
results without training.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
SEP = "@"  # family@r16, family@lr0.001

# -- thresholds the verdicts use (stated in the report's text) ---------------------------------
PARAM_RATIO = 27.0       # LoRA-SB's claim: equal or better accuracy with >= 27x fewer parameters
WITHIN = 0.01            # lr robustness: the lrs whose mean test metric is within 1 point of the best
ROBUST_RATIO = 2.0       # a method is "more robust" when its lr range is >= 2x another's
CONVERGENCE_SPEEDUP = 2.0  # LoRA-GA's claim: LoRA's final loss in 2-4x fewer steps


STUDIES: dict[str, dict[str, str]] = {
    "frontier": {
        "title": "Study: parameter-efficiency frontier",
        "claim": "LoRA-SB matches or beats LoRA with 27-90x fewer trainable parameters (Ponkshe et al. 2024).",
        "paper": "7B decoders, LoRA-SB r = 96 against LoRA r = 32, alpha = r.",
        "axis": "rank",
    },
    "lr-robustness": {
        "title": "Study: learning-rate robustness",
        "claim": "Riemannian preconditioning makes LoRA robust to the learning rate (Zhang & Pilanci 2024); "
                 "LoRA-SB needs no hyper-parameter tuning (Ponkshe et al. 2024).",
        "paper": "Riemannian: GPT-2 / Mistral 7B over lr grids spanning 10-100x; LoRA-SB: one lr per task family.",
        "axis": "lr",
    },
    "convergence": {
        "title": "Study: convergence",
        "claim": "LoRA-GA reaches LoRA's final loss in 2-4x fewer steps at full-fine-tuning learning rates (Wang et al. 2024); "
                 "PiSSA converges faster than LoRA (Meng et al. 2024).",
        "paper": "LoRA-GA: T5-base / Llama 2 7B, lr of full fine-tuning; PiSSA: 7B decoders.",
        "axis": None,
    },
    "long-budget": {
        "title": "Study: long budget",
        "claim": "The survey's open question 2: do the gaps between methods at a short budget persist, shrink or reverse "
                 "when training runs long enough to fit the data?",
        "paper": "(an open question, no paper setting)",
        "axis": "budget",
    },
    "combinations": {
        "title": "Study: combinations",
        "claim": "The survey's open question 3: does combining several successors of LoRA help further?",
        "paper": "(an open question, no paper setting)",
        "axis": None,
    },
}


class StudyError(ValueError):
    """A study config that cannot be expanded; the message names the key."""


# -- configs --------------------------------------------------------------------------------
def point_name(family: str, axis: str, value: float) -> str:
    return f"{family}{SEP}{'r' if axis == 'rank' else 'lr'}{int(value) if axis == 'rank' else f'{float(value):g}'}"


def expand(spec: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """A study config with its inherited protocol and its points as methods; a config without
    ``study`` is returned unchanged (quality configs keep working as before)."""
    kind = spec.get("study")
    if kind is None:
        return spec
    if kind not in STUDIES:
        raise StudyError(f"{where}: study {kind!r} is not one of {', '.join(STUDIES)}")
    spec = dict(spec)
    parent: dict[str, Any] = {}
    if spec.get("inherit"):
        parent_path = ROOT / spec["inherit"]
        if not parent_path.is_file():
            raise StudyError(f"{where}: inherit: {spec['inherit']!r} does not exist")
        parent = yaml.safe_load(parent_path.read_text())
        for key in ("base", "budgets", "select", "reference", "baseline"):
            if key in parent and key not in spec:
                spec[key] = parent[key]
        for name, budget in (spec.pop("budget_overrides", None) or {}).items():  # e.g. long budgets
            spec.setdefault("budgets", {})
            spec["budgets"] = {**spec["budgets"], name: budget}
    families = {**(parent.get("methods") or {}), **(spec.get("families") or {})}
    methods: dict[str, Any] = {}
    for name in spec.get("from_parent") or []:
        if name not in families:
            raise StudyError(f"{where}: from_parent: {name!r} is not a method of {spec.get('inherit')}")
        methods[name] = {**families[name], "family": name}
    for family, axes in (spec.get("points") or {}).items():
        if family not in families:
            raise StudyError(f"{where}: points: {family!r} is not a method of {spec.get('inherit')} or families")
        for axis, values in axes.items():
            if axis not in ("rank", "lr"):
                raise StudyError(f"{where}: points.{family}: axis {axis!r} is not rank or lr")
            for value in values:
                m = json.loads(json.dumps(families[family]))
                m["family"], m["point"] = family, {axis: value}
                if axis == "rank":
                    m["overrides"] = {**m.get("overrides", {}),
                                      "adapter": {**m.get("overrides", {}).get("adapter", {}), "rank": int(value)}}
                else:
                    m["lr"], m["lr_search"] = float(value), False
                    m.pop("grid", None)
                methods[point_name(family, axis, value)] = m
    methods.update(spec.get("methods") or {})
    if not methods:
        raise StudyError(f"{where}: a study needs points, from_parent or methods")
    spec["methods"] = methods
    spec.setdefault("reference", "lora")
    return spec


def study_facts(spec: dict[str, Any]) -> dict[str, Any]:
    """What the result file records about its study (the report reads it back)."""
    if not spec.get("study"):
        return {}
    return {"kind": spec["study"], "inherit": spec.get("inherit"), "pairs": spec.get("pairs"),
            "points": {n: {"family": m.get("family", n), **(m.get("point") or {})} for n, m in spec["methods"].items()}}


def reused(spec: dict[str, Any], name: str, method_base: dict[str, Any], figures: dict[str, Any],
           results: Path, deep_merge: Any) -> dict[str, Any] | None:
    """The entry of ``name`` from the result named in ``reuse`` when it was made by the same protocol
    (base config, budget facts, the method's resolved config and grid); else None (train it)."""
    reuse = spec.get("reuse") or {}
    source = (reuse.get("points") or {}).get(name)
    if not source:
        return None
    path = results / f"{reuse['result']}.json"
    if not path.is_file():
        return None
    earlier = json.loads(path.read_text())["figures"]
    entry = earlier.get("methods", {}).get(source)
    if not entry or entry.get("status") != "ok":
        return None
    for key in ("seeds", "lr_search", "extend_grid", "metric", "select"):
        if earlier.get(key) != figures.get(key):
            return None
    other = yaml.safe_load((ROOT / earlier["config"]).read_text())["methods"].get(source, {})
    other_base = deep_merge(earlier["base_config"], other.get("overrides") or {})
    mine = spec["methods"][name]
    if other_base != method_base or sorted(other.get("grid") or []) != sorted(mine.get("grid") or []):
        return None
    return {**entry, "reused_from": f"{reuse['result']}:{source}"}


# -- computations on results ----------------------------------------------------------------
def ok_points(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> {family, rank|lr, mean, std, per_seed, params} for the finished points."""
    facts = (figures.get("study") or {}).get("points") or {}
    out = {}
    for name, e in (figures.get("methods") or {}).items():
        if e.get("status") != "ok":
            continue
        out[name] = {**facts.get(name, {"family": name}), "mean": e["mean"], "std": e["std"],
                     "per_seed": e["test_per_seed"], "params": e["trainable_params"]}
    return out


def ratio_check(points: dict[str, dict[str, Any]], cheap: tuple[str, ...] = ("lora-sb", "lora-xs"),
                reference: str = "lora", ratio: float = PARAM_RATIO) -> dict[str, Any]:
    """Pairs (cheap point, reference point) with params(ref) >= ratio * params(cheap) and the cheap
    point's mean >= the reference point's. ``candidates``: every pair at the ratio (whatever the
    accuracy); ``hits``: those where the cheap one is as good; ``best``: the hit with the largest ratio."""
    refs = {n: p for n, p in points.items() if p["family"] == reference}
    cands, hits = [], []
    for n, p in points.items():
        if p["family"] not in cheap:
            continue
        for m, q in refs.items():
            r = q["params"] / p["params"]
            if r >= ratio:
                pair = {"cheap": n, "reference": m, "ratio": r, "difference": p["mean"] - q["mean"]}
                cands.append(pair)
                if p["mean"] >= q["mean"]:
                    hits.append(pair)
    return {"ratio": ratio, "candidates": cands, "hits": hits,
            "best": max(hits, key=lambda h: h["ratio"]) if hits else None}


def lr_range(lr_means: dict[float, float], within: float = WITHIN) -> dict[str, Any]:
    """The lrs whose mean metric is within ``within`` of the best one, and the width of that range as
    max/min lr. The range is the contiguous run of grid lrs around the best that all stay within
    (a lucky isolated lr past a collapse does not widen it)."""
    rates = sorted(lr_means)
    best_i = max(range(len(rates)), key=lambda i: lr_means[rates[i]])
    floor = lr_means[rates[best_i]] - within
    lo = hi = best_i
    while lo > 0 and lr_means[rates[lo - 1]] >= floor:
        lo -= 1
    while hi < len(rates) - 1 and lr_means[rates[hi + 1]] >= floor:
        hi += 1
    return {"best_lr": rates[best_i], "best": lr_means[rates[best_i]], "low": rates[lo], "high": rates[hi],
            "width": rates[hi] / rates[lo], "grid_width": rates[-1] / rates[0],
            "at_edge": lo == 0 or hi == len(rates) - 1}


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Per-seed differences a - b (same seeds), their mean and sample standard deviation."""
    if len(a) != len(b) or not a:
        raise StudyError(f"paired comparison needs the same seeds on both sides, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    return {"differences": d, "mean": statistics.fmean(d), "std": statistics.stdev(d) if len(d) > 1 else 0.0,
            "wins": sum(x > 0 for x in d), "n": len(d)}


def verdict(difference: float, spread: float, claim_holds_if_at_least: float = 0.0) -> str:
    """reproduced when difference - spread >= threshold, not reproduced when difference + spread <
    threshold, inconclusive otherwise (the spread straddles the threshold)."""
    if difference - spread >= claim_holds_if_at_least:
        return "reproduced"
    if difference + spread < claim_holds_if_at_least:
        return "not reproduced"
    return "inconclusive"


def frontier_verdict(check: dict[str, Any], points: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """(verdict, sentence) for the 27x claim from ratio_check: reproduced if a hit is as good with its
    spread included (cheap mean - its std >= reference mean); not reproduced if every candidate
    pair's cheap point is worse by more than the two spreads; inconclusive otherwise or without candidates."""
    if not check["candidates"]:
        return "inconclusive", f"no measured LoRA-SB/XS point has >= {check['ratio']:g}x fewer parameters than a measured LoRA point"
    scored = []
    for c in check["candidates"]:
        p, q = points[c["cheap"]], points[c["reference"]]
        scored.append((c, verdict(p["mean"] - q["mean"], p["std"] + q["std"])))
    if any(v == "reproduced" for _, v in scored):
        c = max((c for c, v in scored if v == "reproduced"), key=lambda c: c["ratio"])
        return "reproduced", (f"{c['cheap']} is within its spread of or above {c['reference']} "
                              f"({c['difference'] * 100:+.1f} points) with {c['ratio']:.0f}x fewer parameters")
    if all(v == "not reproduced" for _, v in scored):
        c = max(check["candidates"], key=lambda c: c["difference"])
        return "not reproduced", (f"every pair at >= {check['ratio']:g}x is below LoRA by more than the two seed spreads; "
                                  f"the closest, {c['cheap']} vs {c['reference']} ({c['ratio']:.0f}x), "
                                  f"differs by {c['difference'] * 100:+.1f} points")
    c = max(check["candidates"], key=lambda c: c["difference"])
    return "inconclusive", (f"the closest pair at >= {check['ratio']:g}x, {c['cheap']} vs {c['reference']} "
                            f"({c['ratio']:.0f}x), differs by {c['difference'] * 100:+.1f} points, within the seed spreads")


def lr_width_verdict(widths: dict[str, float], method: str, against: str = "lora", ratio: float = ROBUST_RATIO) -> str:
    """reproduced if ``method``'s lr range is >= ratio x ``against``'s, not reproduced if it is
    <= ``against``'s, inconclusive in between (or when either is missing)."""
    if method not in widths or against not in widths:
        return "inconclusive"
    if widths[method] >= ratio * widths[against]:
        return "reproduced"
    if widths[method] <= widths[against]:
        return "not reproduced"
    return "inconclusive"


def speedup_verdict(steps_ref: float | None, steps_method: float | None, ratio: float = CONVERGENCE_SPEEDUP) -> str:
    """reproduced when the method needs <= 1/ratio of the reference's steps to the reference's final
    loss, not reproduced when it needs more than the reference's (or never gets there), else inconclusive."""
    if steps_ref is None:
        return "inconclusive"
    if steps_method is None or steps_method > steps_ref:
        return "not reproduced"
    return "reproduced" if steps_method * ratio <= steps_ref else "inconclusive"


def log_mid(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))
