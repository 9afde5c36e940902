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

``base_overrides`` changes the inherited base (another dataset), ``extra_budgets`` adds budgets
(the long budgets). ``reuse`` takes points from another result of the same protocol (same base config, budget,
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
from collections import Counter
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


STUDIES: dict[str, dict[str, str]] = {  # kind -> its title, the claim and the paper's setting (sections: SECTIONS_BY_KIND)
    "frontier": {
        "title": "Study: parameter-efficiency frontier",
        "claim": "LoRA-SB matches or beats LoRA with 27-90x fewer trainable parameters (Ponkshe et al. 2024).",
        "paper": "7B decoders, LoRA-SB r = 96 against LoRA r = 32, alpha = r.",
    },
    "lr-robustness": {
        "title": "Study: learning-rate robustness",
        "claim": "Riemannian preconditioning makes LoRA robust to the learning rate (Zhang & Pilanci 2024); "
                 "LoRA-SB needs no hyper-parameter tuning (Ponkshe et al. 2024).",
        "paper": ("Riemannian: GPT-2 and Mistral 7B fine-tuning and diffusion models, final quality across learning-rate "
                  "sweeps (the paper's grids); LoRA-SB: one learning rate per task family."),
    },
    "convergence": {
        "title": "Study: convergence",
        "claim": "LoRA-GA reaches LoRA's final loss in 2-4x fewer steps at full-fine-tuning learning rates (Wang et al. 2024); "
                 "PiSSA converges faster than LoRA (Meng et al. 2024).",
        "paper": "LoRA-GA: T5-base / Llama 2 7B, lr of full fine-tuning; PiSSA: 7B decoders.",
    },
    "long-budget": {
        "title": "Study: long budget",
        "claim": "The survey's open question 2: do the gaps between methods at a short budget persist, shrink or reverse "
                 "when training runs long enough to fit the data?",
        "paper": "(an open question, no paper setting)",
    },
    "combinations": {
        "title": "Study: combinations",
        "claim": "The survey's open question 3: does combining several successors of LoRA help further?",
        "paper": "(an open question, no paper setting)",
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
    if spec.get("base_overrides"):  # e.g. another dataset under the same protocol
        from lorakit.recipes.config import deep_merge

        spec["base"] = deep_merge(spec["base"], spec.pop("base_overrides"))
    if spec.get("extra_budgets"):  # e.g. the long budgets, next to the inherited ones
        spec["budgets"] = {**spec.get("budgets", {}), **spec.pop("extra_budgets")}
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


def _same_protocol_entry(result: str, source: str, name: str, spec: dict[str, Any], method_base: dict[str, Any],
                         figures: dict[str, Any], results: Path, deep_merge: Any, ignore: tuple[str, ...] = ()
                         ) -> dict[str, Any] | None:
    """Method ``source``'s finished entry in result ``result`` when that result was made by this experiment's
    protocol (budget facts, the method's resolved config and its grid), else None. ``ignore``: dotted config
    keys left out of the comparison (settings that do not change the training, e.g. eval.every_steps)."""
    path = results / f"{result}.json"
    if not path.is_file():
        return None
    earlier = json.loads(path.read_text())["figures"]
    entry = earlier.get("methods", {}).get(source)
    if not entry or entry.get("status") != "ok":
        return None
    for key in ("seeds", "lr_search", "extend_grid", "metric", "select"):
        if earlier.get(key) != figures.get(key):
            return None
    other = expand(yaml.safe_load((ROOT / earlier["config"]).read_text()), earlier["config"])["methods"].get(source, {})
    other_base = deep_merge(earlier["base_config"], other.get("overrides") or {})
    mine = spec["methods"][name]
    if _without(other_base, ignore) != _without(method_base, ignore) or \
            sorted(other.get("grid") or []) != sorted(mine.get("grid") or []):
        return None
    return entry


def _without(config: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    out = json.loads(json.dumps(config))
    for key in keys:
        *parents, last = key.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def reused(spec: dict[str, Any], name: str, method_base: dict[str, Any], figures: dict[str, Any],
           results: Path, deep_merge: Any) -> dict[str, Any] | None:
    """The entry of ``name`` from the result named in ``reuse`` when it was made by the same protocol
    (base config, budget facts, the method's resolved config and grid); else None (train it)."""
    reuse = spec.get("reuse") or {}
    source = (reuse.get("points") or {}).get(name)
    if not source:
        return None
    entry = _same_protocol_entry(reuse["result"], source, name, spec, method_base, figures, results, deep_merge)
    return None if entry is None else {**entry, "reused_from": f"{reuse['result']}:{source}"}


LR_FROM_IGNORES = ("eval.every_steps",)  # what a run may add to the source's protocol: it leaves the training unchanged


def lr_source(spec: dict[str, Any], budget: dict[str, Any] | None = None) -> tuple[str, tuple[str, ...]] | None:
    """(result, config keys it may differ in) of the lr choice a study takes from another result, or None.
    A study's ``lr_from: RESULT`` takes the choice of the same protocol; a budget's ``lr_from: {result: RESULT,
    differs: [train.max_steps]}`` takes it from a budget that differs from this one in those keys alone (the long
    budgets: 8x trains at the rate 4x chose on validation, a compute cut the budget's description states)."""
    source = (budget or {}).get("lr_from") or spec.get("lr_from")
    if not source:
        return None
    if isinstance(source, str):
        return source, LR_FROM_IGNORES
    if not isinstance(source, dict) or not isinstance(source.get("result"), str):
        raise StudyError(f"lr_from: {source!r} is neither a result name nor {{result: NAME, differs: [KEY, ...]}}")
    return source["result"], LR_FROM_IGNORES + tuple(source.get("differs") or ())


def chosen_lr(spec: dict[str, Any], name: str, method_base: dict[str, Any], figures: dict[str, Any],
              results: Path, deep_merge: Any, budget: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """For a study (or budget) with ``lr_from``: the lr that result chose on validation for method ``name`` (its
    validation scores too), when it ran the same protocol up to the keys lr_source allows; None without
    ``lr_from``. Raises StudyError when the source cannot give it (no silent grid search in its place)."""
    found = lr_source(spec, budget)
    if found is None:
        return None
    source, ignore = found
    entry = _same_protocol_entry(source, name, name, spec, method_base, figures, results, deep_merge, ignore)
    if entry is None or "lr_grid" not in entry:
        raise StudyError(f"lr_from: {source} has no finished {name!r} chosen on validation by this study's protocol "
                         f"(bench/results/{source}.json); run it first or drop lr_from to search the grid here")
    return {"lr": float(entry["lr"]), "lr_grid": entry["lr_grid"], "lr_from": f"{source}:{name}"}


# -- computations on results ----------------------------------------------------------------
def ok_points(figures: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> {family, rank|lr, mean, std, per_seed, params} for the finished points."""
    facts = (figures.get("study") or {}).get("points") or {}
    out = {}
    for name, e in (figures.get("methods") or {}).items():
        if e.get("status") != "ok":
            continue
        out[name] = {"lr": e.get("lr"), **facts.get(name, {"family": name}), "mean": e["mean"], "std": e["std"],
                     "per_seed": e["test_per_seed"], "params": e["trainable_params"],
                     "mcc": (e.get("test_other_mean") or {}).get("mcc"), "start": _start_loss(e)}
    return out


def _start_loss(entry: dict[str, Any]) -> float | None:
    """The training loss at step 1, before any update, averaged over seeds: the loss where training starts (every
    point of a study sees the same first batch at a seed)."""
    firsts = [losses[0] for losses in (entry.get("train_loss") or {}).values() if losses]
    return statistics.fmean(firsts) if firsts else None


CHEAP = ("lora-sb", "lora-xs")  # the families whose points the 27x check sets against lora's


def ratio_check(points: dict[str, dict[str, Any]], cheap: tuple[str, ...] = CHEAP,
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


def closest_matches(points: dict[str, dict[str, Any]], family: str, reference: str = "lora") -> dict[str, Any]:
    """At parameter ratios from 1 to below the claim's 27x (the frontier's shape): the pair of a ``family``
    point and a cheaper-by-that-ratio ``reference`` point with the largest ratio at equal or better mean
    (``better``), and the one with the largest ratio whose mean is below by less than the two seed standard
    deviations (``within``); None where no pair qualifies."""
    check = ratio_check(points, cheap=(family,), reference=reference, ratio=1.0)
    below = [c for c in check["candidates"] if c["ratio"] < PARAM_RATIO]  # the claim's own pairs have the verdict
    spread = lambda c: points[c["cheap"]]["std"] + points[c["reference"]]["std"]  # noqa: E731
    better = [c for c in below if c["difference"] >= 0]
    within = [c for c in below if c["difference"] < 0 and -c["difference"] <= spread(c)]
    return {"better": max(better, key=lambda c: c["ratio"]) if better else None,
            "within": max(within, key=lambda c: c["ratio"]) if within else None}


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


def verdict(difference: float, spread: float) -> str:
    """For an "equal or better" claim, from the difference of means (claimed side minus the other) and
    the spread (the sum of the two seed standard deviations): reproduced when the difference is >= 0,
    not reproduced when it is below -spread, inconclusive in between (worse, but within the spread)."""
    if difference >= 0:
        return "reproduced"
    if difference < -spread:
        return "not reproduced"
    return "inconclusive"


def frontier_verdict(check: dict[str, Any], points: dict[str, dict[str, Any]]) -> tuple[str, str]:
    """(verdict, sentence) for the 27x claim from ratio_check, each candidate pair judged by ``verdict``
    with the two points' seed standard deviations: reproduced when some pair is, not reproduced when
    every pair is not, inconclusive otherwise or when no pair at the ratio is measured."""
    ratio = f"≥ {check['ratio']:g}×"
    if not check["candidates"]:
        return "inconclusive", f"no measured LoRA-SB/XS point has {ratio} fewer parameters than a measured LoRA point"
    judged = [(c, verdict(c["difference"], points[c["cheap"]]["std"] + points[c["reference"]]["std"]))
              for c in check["candidates"]]
    closest = max(check["candidates"], key=lambda c: c["difference"])
    cheap = "/".join(sorted({points[c["cheap"]]["family"] for c in check["candidates"]}))
    pair = f"{closest['cheap']} vs {closest['reference']} ({closest['ratio']:.1f}×)"
    if any(v == "reproduced" for _, v in judged):
        c = max((c for c, v in judged if v == "reproduced"), key=lambda c: c["ratio"])
        return "reproduced", (f"{c['cheap']} has an equal or better mean test metric than {c['reference']} "
                              f"({c['difference'] * 100:+.2f} points) with {c['ratio']:.1f}× fewer parameters")
    if all(v == "not reproduced" for _, v in judged):
        return "not reproduced", (f"in every measured pair at {ratio}, {cheap} is below LoRA by more than the two seed "
                                  f"standard deviations; the closest, {pair}, by {closest['difference'] * 100:+.2f} points")
    return "inconclusive", (f"no measured pair at {ratio} has {cheap} at equal or better mean; the closest, {pair}, "
                            f"differs by {closest['difference'] * 100:+.2f} points, within the two seed standard deviations")


def lr_width_verdict(widths: dict[str, float], method: str, against: str = "lora", ratio: float = ROBUST_RATIO,
                     spread: float = 0.0) -> str:
    """reproduced if ``method``'s lr range is >= ratio x ``against``'s, not reproduced if it is
    <= ``against``'s, inconclusive in between (or when either is missing, or when ``spread``, the seeds'
    std at the best rates, exceeds the window WITHIN the widths are measured in: then they measure noise)."""
    if method not in widths or against not in widths or spread > WITHIN:
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


# -- the report's sections (called by bench/report.py) --------------------------------------
def is_study(result: dict[str, Any]) -> bool:
    return bool((result.get("figures") or {}).get("study"))


def experiment_groups(results: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    """Study experiment -> its result keys (several budgets of one study, e.g. long budget)."""
    groups: dict[str, list[str]] = {}
    for key in sorted(results):
        if is_study(results[key]):
            groups.setdefault(results[key]["figures"].get("experiment", key), []).append(key)
    return groups


def render_all(rep: Any, kit: Any, results: dict[str, dict[str, Any]], configs: Path = ROOT / "bench" / "configs") -> set[str]:
    """Every study result into ``rep``, and a "not run yet" section (and a missed target) for each
    study config without a result; returns the result keys rendered."""
    groups = experiment_groups(results)
    for name, keys in groups.items():
        render(rep, kit, name, {k: results[k] for k in keys})
    if groups:
        compute(rep, kit, {k: results[k] for keys in groups.values() for k in keys})
    for path in sorted(configs.glob("study_*.yaml")):
        spec = yaml.safe_load(path.read_text()) or {}
        if spec.get("name") in groups or spec.get("study") not in STUDIES:
            continue
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        command = f"nice python bench/quality.py --config {shown} --budget full --threads 1"
        rep.add(f"## {STUDIES[spec['study']]['title']} ({spec.get('name')})", "",
                f"**Claim.** {STUDIES[spec['study']]['claim']}", "", f"**Not run yet.** Command: `{command}`.", "")
        rep.missed.append(f"issue 18: {spec.get('name')} not run yet (`{command}`).")
    return {k for keys in groups.values() for k in keys}


RUNNERS = 2  # runner processes side by side, one per core of the 2-core machine the studies were sized for


def compute(rep: Any, kit: Any, results: dict[str, dict[str, Any]]) -> None:
    """The studies' compute, one row per result and the total: the issue keeps it within about a day of a
    2-core machine. Only each result's own runs count; points taken from other results are theirs."""
    rows, runs, hours, untimed = [], 0, 0.0, []
    for key, result in results.items():
        g = result["figures"]
        methods = g.get("methods") or {}
        if methods and all(e.get("reused_from") for e in methods.values()):
            rows.append([key, 0, "0.0", "– (every point taken from another result)"])
        elif g.get("run_count") is None:
            untimed.append(key)
        else:
            missing = g.get("methods_without_run_time") or []
            rows.append([key, g["run_count"], f"{g['run_seconds'] / 3600:.1f}", ", ".join(missing) or "–"])
            runs, hours = runs + g["run_count"], hours + g["run_seconds"] / 3600
            untimed += [f"{key}:{m}" for m in missing]
    rep.add("## Studies: compute", "",
            f"Each study result's own runs (grid and seeds) and their wall times summed, whichever runner trained them; "
            f"points taken from another result count there. Wall clock with {RUNNERS} runners side by side is about the "
            f"runner time / {RUNNERS}.", "",
            kit.table(["result", "runs", "runner h", "not timed (kept from a sitting that did not record run times)"],
                      rows + [["**total**", runs, f"**{hours:.1f}**", ", ".join(untimed) or "–"]]), "")
    rep.headlines.append(f"Studies' compute: {runs} runs, {hours:.1f} h of runner time, about {hours / RUNNERS:.1f} h "
                         f"of wall clock with {RUNNERS} runners on this 2-core machine"
                         + (f" (not timed: {', '.join(untimed)})" if untimed else "") + ".")


def _model_and_data(base: dict[str, Any]) -> str:
    """'model M on data D, ' from a result's base config (empty when it does not say), so a study on a
    second dataset says which one in its own setting line."""
    model, data = (base.get("model") or {}).get("name"), (base.get("data") or {}).get("source")
    return f"model `{model}` on data `{data}`, " if model and data else ""


def render(rep: Any, kit: Any, name: str, results: dict[str, dict[str, Any]]) -> None:
    """One study (all its result files) into ``rep``; ``kit`` is bench/report.py (table, fmt, environment,
    colours) so the formatting is the report's own."""
    first = results[next(iter(results))]
    kind = first["figures"]["study"]["kind"]
    facts = STUDIES[kind]
    rep.add(f"## {facts['title']} ({name})", "")
    f = first["figures"]
    budgets = (f.get("budget_description", "") if len(results) == 1 else  # several budgets: each one's own protocol
               "; ".join(f"budget {r['figures'].get('budget')}: {r['figures'].get('budget_description', '')}" for r in results.values()))
    rep.add(f"**Claim.** {facts['claim']}", "", f"**Paper's setting.** {facts['paper']}", "",
            f"**Setting here.** Config `{f.get('config')}` (protocol inherited from `{f['study'].get('inherit')}`): "
            f"{_model_and_data(f.get('base_config') or {})}{budgets}; seeds {f.get('seeds')}; metric test {f.get('metric')}."
            + (" Here every point trains at its own fixed learning rate on every seed: no selection on validation."
               if kind == "lr-robustness" else ""), "")
    for key, result in results.items():
        g = result["figures"]
        pending = [p for p in g["study"]["points"] if g.get("methods", {}).get(p, {}).get("status") != "ok"]
        note = (f" **Partial: not yet measured: {', '.join(pending)}.**" if pending else "")
        took = (f" Training time of this result {g['elapsed_seconds'] / 60:.0f} min." if (g.get("elapsed_seconds") or 0) >= 60 else "")
        taken = sorted({e["reused_from"].split(":")[0] for e in g.get("methods", {}).values() if e.get("reused_from")})
        reuse = (f" Points {', '.join(n for n, e in g['methods'].items() if e.get('reused_from'))} are taken from "
                 f"{', '.join(taken)} (same protocol, checked)." if taken else "")
        rep.add(f"`{key}`: status {result['status']}.{took}{kit.run_time(g)}{reuse}{note}", "", kit.environment(result), "")
        if pending:
            rep.missed.append(f"issue 18: {key} is partial; not yet measured: {', '.join(pending)} "
                              f"(`nice python bench/quality.py --config {g.get('config')} --budget {g.get('budget')} --threads 1 --resume`).")
    if kind == "long-budget":
        spec = expand(yaml.safe_load((ROOT / f["config"]).read_text()), where=f["config"]) if (ROOT / f["config"]).is_file() else {}
        have = {r["figures"].get("budget") for r in results.values()}
        for budget in [b for b in spec.get("budgets", {}) if b != "quick" and b not in have]:
            rep.missed.append(f"issue 18: {name} budget {budget} not run yet "
                              f"(`nice python bench/quality.py --config {f['config']} --budget {budget} --threads 1`).")
    SECTIONS_BY_KIND[kind](rep, kit, name, results)


def _log_x_axes(ax: Any, title: str, against: str, metric: Any, ticks: list[float] | None = None) -> None:
    """The frontier's and the lr study's axes: log x, the metric's mean ± std over seeds on y, a legend;
    ``ticks``: label exactly these x values (the lr grid), no minor labels to overlap them."""
    ax.set_xscale("log")
    if ticks:
        from matplotlib.ticker import NullFormatter

        ax.set_xticks(ticks, [f"{t:g}" for t in ticks], fontsize=7)
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"{against.removeprefix('the ')} (log)")
    ax.set_ylabel(f"test {metric} (mean ± std over seeds)")
    ax.set_title(f"{title} against {against}", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _colours(kit: Any, names: list[str]) -> dict[str, Any]:
    """tab10's distinct colours for a study's few lines (the report's tab20 pairs light and dark shades)."""
    if len(names) > 10:
        return kit.colours(names)
    import matplotlib

    return {n: matplotlib.colormaps["tab10"](i) for i, n in enumerate(names)}


CONSTANT_MCC = 0.1  # mean test MCC below this: the classifier gives (nearly) every example one class


def _constant(p: dict[str, Any]) -> bool:
    return p.get("mcc") is not None and p["mcc"] < CONSTANT_MCC


def _score(p: dict[str, Any]) -> str:
    mark = " †" if _constant(p) else ""
    return (f"{p['mean']:.4f} ± {p['std']:.4f}" if len(p["per_seed"]) > 1 else f"{p['mean']:.4f} (1 seed)") + mark


def _constant_note(rep: Any, points: dict[str, dict[str, Any]]) -> None:
    """The footnote of the † marks: how many points did not train the classifier at all."""
    stuck = sum(_constant(p) for p in points.values())
    if stuck:
        rep.add(f"† mean test MCC below {CONSTANT_MCC:g}: near-constant predictions (the model gives every example "
                f"one class, so its accuracy is that class's share of the test split); {stuck} of {len(points)} "
                "points.", "")


START_MOVED = 0.10  # a start loss this far (relative) from LoRA's, whose B = 0 starts at the base model, moved the model


def _start_note(rep: Any, points: dict[str, dict[str, Any]]) -> None:
    """Which points start training away from the base model (their initialisation changes the function), with
    the lr each trained at: an initialisation that takes a step sized by the lr couples the two."""
    base = [p["start"] for p in points.values() if p["family"] == "lora" and p.get("start") is not None]
    if not base:
        return
    at = statistics.fmean(base)
    moved = {n: p for n, p in points.items() if p.get("start") is not None and abs(p["start"] / at - 1) > START_MOVED}
    if moved:
        rep.add(f"Loss at the start (step 1's training loss, before any update; mean over seeds): the lora points "
                f"{at:.2f} (the base model's, B = 0); {len(moved)} point(s) start more than {START_MOVED:.0%} away: "
                + ", ".join(f"{n} {p['start']:.2f} at lr {p['lr']:g}" for n, p in sorted(moved.items())) + ".", "")


def _frontier(rep: Any, kit: Any, name: str, results: dict[str, dict[str, Any]]) -> None:
    for key, result in results.items():
        f = result["figures"]
        points = ok_points(f)
        rows = []
        for n, p in sorted(points.items(), key=lambda kv: (kv[1]["family"], kv[1]["params"])):
            e = f["methods"][n]
            rows.append([n, p["family"], str(p.get("rank", "–")), p["params"], f"{e['lr']:g}", _score(p),
                         ", ".join(f"{v:.4f}" for v in p["per_seed"]),
                         "–" if p["start"] is None else f"{p['start']:.2f}", e.get("reused_from", "–")])
        rep.add(kit.table(["point", "family", "rank", "trainable params", "lr (validation)", f"test {f.get('metric')}",
                           "per seed", "loss at start", "taken from"], rows), "")
        _constant_note(rep, points)
        _start_note(rep, points)
        failed = kit.lr_search_notes(rep, f, f["methods"], {n: f["methods"][n] for n in points})
        check = ratio_check(points)
        pairs = sorted(check["candidates"], key=lambda c: -c["ratio"])
        rep.add(f"The {PARAM_RATIO:g}× check: pairs of a LoRA-SB/XS point and a LoRA point with at least {PARAM_RATIO:g}× "
                f"more parameters, and the difference of their mean test {f.get('metric')} (SB/XS minus LoRA): "
                + ("; ".join(f"{c['cheap']} vs {c['reference']} {c['ratio']:.1f}× {c['difference'] * 100:+.2f} points"
                             for c in pairs) or "none measured") + ". "
                + (f"The pair with the largest ratio at equal or better mean {f.get('metric')}: {check['best']['cheap']} vs "
                   f"{check['best']['reference']} ({check['best']['ratio']:.1f}×)." if check["best"] else
                   f"No measured pair at ≥ {PARAM_RATIO:g}× has the SB/XS point at equal or better mean {f.get('metric')}."), "")
        verdicts, closest = [], {}
        for family in CHEAP:  # one verdict per family: LoRA-SB's claim is LoRA-SB's, LoRA-XS is measured beside it
            if any(p["family"] == family for p in points.values()):
                outcome, sentence = frontier_verdict(ratio_check(points, cheap=(family,)), points)
                verdicts.append((family, outcome, sentence))
                rep.add(f"**Verdict ({family}): {outcome}** — {sentence}.", "")
                close = closest[family] = closest_matches(points, family)
                parts = [f"{label} {c['cheap']} vs {c['reference']} ({c['ratio']:.1f}×, {c['difference'] * 100:+.2f} points)"
                         for label, c in (("at equal or better mean,", close["better"]),
                                          ("within the two seed standard deviations,", close["within"])) if c]
                if parts:
                    rep.add(f"Below {PARAM_RATIO:g}× ({family}; outside the claim, the frontier's shape): the largest "
                            "parameter ratio " + "; ".join(parts) + ".", "")
        rep.add(f"Thresholds: a pair at ≥ {PARAM_RATIO:g}× reproduces the claim when the SB/XS mean is ≥ the LoRA mean, does "
                "not when it is below by more than the sum of the two seed standard deviations, and is inconclusive between; "
                "a family reproduces the claim when some pair does, does not when every pair does not, and is inconclusive "
                "otherwise. Only measured points count: an unmeasured point can change the verdict.", "")
        unmeasured = [n for n in (f.get("study") or {}).get("points") or {} if n not in points]
        sb = next(((o, sen) for fam, o, sen in verdicts if fam == "lora-sb"), None)
        if sb is not None:
            near = max((c for c in closest["lora-sb"].values() if c), key=lambda c: c["ratio"], default=None)
            rep.readme.setdefault("frontier", []).append(
                f"{sb[0]} on {setting(f)} ({sb[1]}"
                + (f"; below {PARAM_RATIO:g}×, {near['cheap']} vs {near['reference']} ({near['ratio']:.1f}×) "
                   + ("at equal or better mean" if near["difference"] >= 0 else "within the seed spread")
                   + f", {near['difference'] * 100:+.2f} points" if near else "")
                + (f"; {len(unmeasured)} of {len(unmeasured) + len(points)} points not yet measured" if unmeasured else "") + ")")
        if verdicts:
            rep.headlines.append(f"Frontier ({key}), the {PARAM_RATIO:g}× claim: "
                                 + "; ".join(f"{fam} {outcome} ({sentence})" for fam, outcome, sentence in verdicts) + ".")
        if not points:
            continue

        def draw(ax, points=points, f=f, failed=failed):
            fams = sorted({p["family"] for p in points.values()})
            colour = _colours(kit, fams)
            for fam in fams:
                ps = sorted(((n, p) for n, p in points.items() if p["family"] == fam), key=lambda np_: np_[1]["params"])
                ax.errorbar([p["params"] for _, p in ps], [p["mean"] for _, p in ps], yerr=[p["std"] for _, p in ps],
                            fmt="o-", capsize=3, color=colour[fam], label=fam)
                for n, p in ps:
                    ax.annotate(f"r{p.get('rank', '?')}" + (" (no rate of its grid learned)" if n in failed else ""),
                                (p["params"], p["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            _log_x_axes(ax, f"{key}: test {f.get('metric')}", "trainable parameters", f.get("metric"))

        rep.plot(f"{key}_frontier.png", draw, "test metric against trainable parameters, one line per family")


def lr_table(points: dict[str, dict[str, Any]]) -> dict[str, dict[float, dict[str, Any]]]:
    """family -> lr -> point, for the lr-robustness points."""
    out: dict[str, dict[float, dict[str, Any]]] = {}
    for p in points.values():
        if "lr" in p:
            out.setdefault(p["family"], {})[float(p["lr"])] = p
    return {fam: dict(sorted(v.items())) for fam, v in out.items()}


def _lr_robustness(rep: Any, kit: Any, name: str, results: dict[str, dict[str, Any]]) -> None:
    for key, result in results.items():
        f = result["figures"]
        points = ok_points(f)
        fams = lr_table(points)
        ranges = {fam: lr_range({lr: p["mean"] for lr, p in by.items()}) for fam, by in fams.items() if len(by) >= 2}
        lrs = sorted({lr for by in fams.values() for lr in by})
        rep.add(kit.table(["family"] + [f"lr {lr:g}" for lr in lrs],
                          [[fam] + [(_score(by[lr]) if lr in by else "–") for lr in lrs] for fam, by in fams.items()]), "")
        _constant_note(rep, points)
        rep.add(kit.table(["family", "best lr", f"best test {f.get('metric')}", f"lrs within {WITHIN * 100:g} point",
                           "width (max/min lr)", "grid width"],
                          [[fam, f"{r['best_lr']:g}", f"{r['best']:.4f}", f"{r['low']:g} – {r['high']:g}",
                            f"{r['width']:.1f}×" + (" (reaches the grid's edge)" if r["at_edge"] else ""),
                            f"{r['grid_width']:.0f}×"] for fam, r in ranges.items()]), "")
        widths = {fam: r["width"] for fam, r in ranges.items()}
        planned = Counter(facts.get("family") for facts in ((f.get("study") or {}).get("points") or {}).values())
        verdicts = []
        for method in ("riemannian", "lora-sb"):
            missing = {fam: planned.get(fam, 0) - len(fams.get(fam, {})) for fam in (method, "lora")}
            if any(n > 0 for n in missing.values()) and method in planned:  # a width on part of the grid is no width
                rep.add(f"**Verdict ({method} vs lora): pending** — not yet measured: "
                        + ", ".join(f"{n} of {planned[fam]} {fam} rates" for fam, n in missing.items() if n > 0) + ".", "")
                continue
            if method in widths and "lora" in widths:
                spread = max(fams[fam][ranges[fam]["best_lr"]]["std"] for fam in (method, "lora"))
                v = lr_width_verdict(widths, method, spread=spread)
                verdicts.append(f"{method} {widths[method]:.1f}× vs lora {widths['lora']:.1f}× ({v})")
                rep.add(f"**Verdict ({method} vs lora): {v}** — lr range within {WITHIN * 100:g} point of the best: "
                        f"{method} {widths[method]:.1f}×, lora {widths['lora']:.1f}×; seeds' std at the best rates "
                        f"up to {spread * 100:.1f} points. Thresholds: reproduced when {method}'s width is ≥ "
                        f"{ROBUST_RATIO:g}× lora's, not reproduced when it is ≤ lora's, inconclusive between or when "
                        f"that std exceeds the {WITHIN * 100:g}-point window.", "")
        if verdicts:
            rep.headlines.append(f"Learning-rate robustness ({key}), width of the lr range within {WITHIN * 100:g} point "
                                 "of the best: " + "; ".join(verdicts) + ".")
        if not fams:
            continue

        def draw(ax, fams=fams, f=f):
            colour = _colours(kit, list(fams))
            for fam, by in fams.items():
                ax.errorbar(list(by), [p["mean"] for p in by.values()], yerr=[p["std"] for p in by.values()],
                            fmt="o-", capsize=3, color=colour[fam], label=fam)
            _log_x_axes(ax, f"{key}: test {f.get('metric')}", "the learning rate", f.get("metric"),
                        ticks=sorted({lr for by in fams.values() for lr in by}))

        rep.plot(f"{key}_lr.png", draw, "test metric against the learning rate, every point on every seed")


CONVERGENCE_CLAIMS = {"lora-ga": CONVERGENCE_SPEEDUP, "pissa": 1.25}  # method -> speed-up the verdict requires


CONVERGENCE_MEASURES = {  # what "steps to reach" counts against: key of the runner's figure -> its words
    "loss": {"key": "steps_to_reference_loss", "final": "final_loss_trailing_mean", "what": "training loss",
             "target": "final training loss"},
    "metric": {"key": "steps_to_reference_metric", "final": "final_mean", "what": "validation {metric}",
               "target": "final validation {metric}"},
}


def _convergence(rep: Any, kit: Any, name: str, results: dict[str, dict[str, Any]]) -> None:
    for key, result in results.items():
        f = result["figures"]
        ok = {m: e for m, e in f["methods"].items() if e.get("status") == "ok"}
        ref = f.get("reference", "lora")
        sources = lr_sources(ok)
        if sources:
            rep.add(f"Each method trains at the lr {sources} chose for it on validation (same protocol, checked).", "")
        outcomes = []
        for measure, words in CONVERGENCE_MEASURES.items():
            if any(e.get(words["key"]) for e in ok.values()):
                outcomes += _convergence_measure(rep, kit, f, ok, ref, words)
        if outcomes:
            rep.headlines.append(f"Convergence ({key}), steps to {ref}'s final value: " + "; ".join(outcomes) + ".")
        _convergence_plots(rep, kit, key, f, ok, ref)


def _convergence_measure(rep: Any, kit: Any, f: dict[str, Any], ok: dict[str, dict[str, Any]], ref: str,
                         words: dict[str, str]) -> list[str]:
    """One measure's table (steps to the reference's final value, per seed) and each claim's verdict; returns
    the verdicts as short phrases for the headline."""
    what, target = (words[k].format(metric=f.get("metric")) for k in ("what", "target"))
    own = ((ok.get(ref) or {}).get(words["key"]) or {}).get("mean")
    rows = []
    for m, e in ok.items():
        conv = e.get(words["key"]) or {}
        steps = conv.get("mean")
        rows.append([m, f"{e['lr']:g}", kit.fmt(conv.get(words["final"]), 4),
                     ", ".join(str(v) if v is not None else "never" for v in (conv.get("per_seed") or {}).values()),
                     kit.fmt(steps, 1), f"{own / steps:.2f}×" if own and steps else "–", _score(ok_points(f)[m])])
    rep.add(kit.table(["method", "lr", f"final {what}", f"steps to {ref}'s {target}, per seed", "mean",
                       f"speed-up vs {ref}", f"test {f.get('metric')}"], rows), "")
    phrases = []
    for m, need_ratio in CONVERGENCE_CLAIMS.items():
        if m in ok:
            steps = (ok[m].get(words["key"]) or {}).get("mean")
            v = speedup_verdict(own, steps, need_ratio)
            phrases.append(f"{m} ({what}) {v}")
            rep.add(f"**Verdict ({m}, {what}): {v}** — {ref} first reaches its own {target} at step {kit.fmt(own, 1)}, "
                    f"{m} at {kit.fmt(steps, 1) if steps else 'never (on some seed)'}. Thresholds: reproduced at ≥ "
                    f"{need_ratio:g}× fewer steps than {ref}, not reproduced at more steps than {ref} or never, "
                    "inconclusive between.", "")
    return phrases


def _convergence_plots(rep: Any, kit: Any, key: str, f: dict[str, Any], ok: dict[str, dict[str, Any]], ref: str) -> None:
    """The training-loss curves (trailing mean) and, when evaluated periodically, the validation-metric curves:
    mean over seeds, band min-max."""
    window = int(f.get("smooth_window") or 8)
    losses = {m: {s: (list(range(1, len(v) + 1)), trailing(v, window)) for s, v in e["train_loss"].items()}
              for m, e in ok.items() if e.get("train_loss")}
    curves = {m: {s: ([c[0] for c in v], [c[1] for c in v]) for s, v in e["validation_curve"].items()}
              for m, e in ok.items() if e.get("validation_curve")}
    for series, file, ylabel, caption in (
            (losses, "convergence", f"training loss (trailing mean of {window}; band: min–max over seeds)",
             "training loss per step, mean and min-max band over seeds"),
            (curves, "validation", f"validation {f.get('metric')} (band: min–max over seeds)",
             f"validation {f.get('metric')} every few steps, mean and min-max band over seeds")):
        if not series:
            continue

        def draw(ax, series=series, ylabel=ylabel):
            colour = _colours(kit, list(series))
            for m, per_seed in series.items():
                n = min(len(ys) for _, ys in per_seed.values())
                xs = next(iter(per_seed.values()))[0][:n]
                at = [[ys[i] for _, ys in per_seed.values()] for i in range(n)]
                ax.plot(xs, [statistics.fmean(v) for v in at], color=colour[m], label=m, linewidth=2.2 if m == ref else 1.0)
                ax.fill_between(xs, [min(v) for v in at], [max(v) for v in at], color=colour[m], alpha=0.15)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_title(f"{key}: {ylabel.split(' (')[0]}, mean over seeds", fontsize=9)
            ax.legend(fontsize=7, ncol=2)
            ax.grid(alpha=0.3)

        rep.plot(f"{key}_{file}.png", draw, caption, (7.0, 4.5))


def trailing(losses: list[float], window: int) -> list[float]:
    return [statistics.fmean(losses[max(0, i + 1 - window): i + 1]) for i in range(len(losses))]


def budget_steps(f: dict[str, Any]) -> int:
    return int((f.get("base_config") or {}).get("train", {}).get("max_steps") or 0)


def gap_trend(gaps: dict[int, dict[str, Any]]) -> str:
    """The trend of the paired gap (method - reference) from the shortest to the longest budget. A gap counts
    when its mean exceeds its spread (std over seeds): with no gap at the shortest budget there is nothing to
    persist or shrink, so the verdict is "none at any budget" ("either" for two), "appears" when the longest's
    counts, or "only at N steps" when a budget between them is the only one where it does; otherwise reverses
    when the sign flips and the longest's gap counts too, shrinks when the longest's |gap| is below half the
    shortest's, persists otherwise."""
    if len(gaps) < 2:
        return "one budget only"
    short, long = gaps[min(gaps)], gaps[max(gaps)]

    def counts(gap: dict[str, Any]) -> bool:
        return abs(gap["mean"]) > gap["std"]

    if not counts(short):
        if counts(long):
            return "appears"
        between = [s for s in sorted(gaps)[1:-1] if counts(gaps[s])]
        if between:
            return f"only at {', '.join(map(str, between))} steps"
        return "none at either budget" if len(gaps) == 2 else "none at any budget"
    if short["mean"] * long["mean"] < 0 and counts(long):
        return "reverses"
    if abs(long["mean"]) < abs(short["mean"]) / 2:
        return "shrinks"
    return "persists"


def _long_budget(rep: Any, kit: Any, name: str, results: dict[str, dict[str, Any]]) -> None:
    by_steps = {budget_steps(r["figures"]): r["figures"] for r in results.values()}
    first = next(iter(by_steps.values()))
    ref, metric = first.get("reference", "lora"), first.get("metric", "accuracy")
    shortest = min(by_steps)
    methods = sorted({m for f in by_steps.values() for m, e in f["methods"].items() if e.get("status") == "ok" and m != ref})
    gaps: dict[str, dict[int, dict[str, Any]]] = {}
    for steps, f in sorted(by_steps.items()):
        r = f["methods"].get(ref, {})
        for m in methods:
            e = f["methods"].get(m, {})
            if e.get("status") == "ok" and r.get("status") == "ok":
                gaps.setdefault(m, {})[steps] = paired(e["test_per_seed"], r["test_per_seed"])
    cols = sorted(by_steps)
    moved = rates_validation_moves(by_steps[cols[-1]])
    _long_budget_headline(rep, name, ref, gaps, methods, moved)
    if gaps:
        rep.add(f"**Verdict (gap to {ref}, {cols[0]} to {cols[-1]} steps):** "
                + by_outcome({m: gap_trend(g) for m, g in gaps.items()}) + "."
                + (f" Provisional at {cols[-1]} steps: validation there prefers another rate than the taken one for "
                   f"{', '.join(moved)} (the check below)." if moved else ""), "")
    rep.add(kit.table(["method"] + [f"{s} steps ({s / shortest:g}×): gap to {ref}, points" for s in cols] + ["trend"],
                      [[m] + [points_text(g[s]) if s in g else "–" for s in cols]
                       + [gap_trend(g)] for m, g in gaps.items()]), "")
    rep.add(f"Gaps are paired per seed (method minus {ref}, same seed), mean ± standard deviation over seeds, in points of "
            f"test {metric}. A gap counts when its mean exceeds its spread. Trend, from the shortest to the longest "
            "budget: none at any budget when no gap counts; appears when the longest's does and the shortest's not; "
            "only at N steps when a budget between them is the only one where it counts; reverses "
            "when the sign flips and both count; shrinks when the longest budget's |gap| is below half the shortest's; "
            "persists otherwise.", "")
    _long_budget_points(rep, kit, by_steps, [ref] + methods)
    drift = reference_drift(by_steps, ref)
    if drift:
        def change(d: dict[str, Any]) -> str:
            return f"{points_text(d)} points ({'counts' if abs(d['mean']) > d['std'] else 'within its spread'})"

        rep.add(f"{ref}'s own change between budgets, paired over seeds: "
                + "; ".join(f"{a} → {b} steps {change(d)}" for (a, b), d in drift.items())
                + f". A budget's gaps are measured against {ref} at that budget, so they include this change.", "")

    def draw(ax):
        colour = _colours(kit, list(gaps))
        for m, g in gaps.items():
            xs = sorted(g)
            ax.errorbar([x / shortest for x in xs], [g[x]["mean"] * 100 for x in xs], yerr=[g[x]["std"] * 100 for x in xs],
                        fmt="o-", capsize=3, color=colour[m], label=m)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"budget (× {shortest} steps)")
        ax.set_ylabel(f"gap to {ref} (points, paired over seeds)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)

    if gaps:
        rep.plot(f"{name}_gaps.png", draw, "gap to the reference against the budget")


def lr_sources(methods: dict[str, dict[str, Any]]) -> str:
    """The results the methods took their rates from (``lr_from``), for a sentence; "" when none did."""
    return ", ".join(sorted({e["lr_from"].split(":")[0] for e in methods.values() if e.get("lr_from")}))


def rate_checks(f: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each finished method's check of the rate its budget took from another result (quality.py's lr_check)."""
    return {m: e["lr_check"] for m, e in f["methods"].items() if e.get("status") == "ok" and e.get("lr_check")}


def rates_validation_moves(f: dict[str, Any]) -> list[str]:
    """The methods whose validation, at this budget, prefers a rate other than the one taken."""
    return [m for m, c in rate_checks(f).items() if c["prefers"] != f"{f['methods'][m]['lr']:g}"]


def reference_drift(by_steps: dict[int, dict[str, Any]], ref: str) -> dict[tuple[int, int], dict[str, Any]]:
    """The reference's own paired change (longer minus shorter, same seeds) between consecutive budgets
    where it ran at both."""
    ok = {s: f["methods"][ref] for s, f in sorted(by_steps.items()) if f["methods"].get(ref, {}).get("status") == "ok"}
    steps = list(ok)
    return {(a, b): paired(ok[b]["test_per_seed"], ok[a]["test_per_seed"]) for a, b in zip(steps, steps[1:])}


def by_outcome(outcomes: dict[str, str]) -> str:
    """Names grouped by their outcome, in the order outcomes first occur: "appears: dora, full; persists: lora-sb"."""
    groups: dict[str, list[str]] = {}
    for name, outcome in outcomes.items():
        groups.setdefault(outcome, []).append(name)
    return "; ".join(f"{outcome}: {', '.join(names)}" for outcome, names in groups.items())


def points_text(difference: dict[str, Any]) -> str:
    """A paired difference (mean and std over seeds, as fractions) in points: "+1.12 ± 0.30"."""
    return f"{difference['mean'] * 100:+.2f} ± {difference['std'] * 100:.2f}"


def _long_budget_headline(rep: Any, name: str, ref: str, gaps: dict[str, dict[int, dict[str, Any]]],
                          methods: list[str], moved: list[str] | None = None) -> None:
    measured = {m: g for m, g in gaps.items() if len(g) >= 2}
    if not measured:
        return
    pending = [m for m in methods if m not in measured]
    budgets = sorted({s for g in measured.values() for s in g})
    rep.headlines.append(
        f"Long budget ({name}), paired gap to {ref} in points at {', '.join(map(str, budgets))} steps: "
        + "; ".join(f"{m} {' → '.join(points_text(g[s]) if s in g else '–' for s in budgets)} ({gap_trend(g)})"
                    for m, g in measured.items())
        + (f"; not yet measured past {budgets[0]} steps: {', '.join(pending)}" if pending else "")
        + (f"; provisional at {budgets[-1]} steps, where validation prefers another rate than the taken one for "
           f"{', '.join(moved)}" if moved else "") + ".")


def _long_budget_points(rep: Any, kit: Any, by_steps: dict[int, dict[str, Any]], methods: list[str]) -> None:
    """Each method's test metric and learning rate at every budget, and where a budget's lr was chosen."""
    cols = sorted(by_steps)

    def cell(e: dict[str, Any]) -> str:
        return f"{e['mean']:.4f} ± {e['std']:.4f} (lr {e['lr']:g})" if e.get("status") == "ok" else "–"

    metric = next(iter(by_steps.values())).get("metric")
    rep.add(kit.table(["method"] + [f"{s} steps: test {metric} (lr)" for s in cols],
                      [[m] + [cell(by_steps[s]["methods"].get(m, {})) for s in cols] for m in methods]), "")
    for steps in cols:
        for sentence in rate_sentences(steps, by_steps[steps]):
            rep.add(sentence, "")


def rate_sentences(steps: int, f: dict[str, Any]) -> list[str]:
    """Where a budget's rates came from when it borrowed them (``lr_from``): taken as they are, checked
    against multiples of them on validation (``lr_check``), or chosen among those (``lr_check_choose``)."""
    ok = {m: e for m, e in f["methods"].items() if e.get("status") == "ok"}
    sources = lr_sources(ok)
    if not sources:
        return []
    checks = rate_checks(f)
    listing = "; ".join(f"{m} " + ", ".join(f"{lr} {v:.4f}" for lr, v in c["validation"].items())
                        + f" (prefers {c['prefers']})" for m, c in checks.items())
    c = next(iter(checks.values()), {})
    if any("lr_taken" in e for e in ok.values()):
        moved = [m for m, e in ok.items() if "lr_taken" in e and e["lr_taken"] != e["lr"]]
        return [f"At {steps} steps each method trains at the rate validation {c['metric']} prefers at seed {c['seed']} "
                f"between the one {sources} chose for it and multiples of it (a grid of a few rates: the compute cut "
                f"its budget's description states): {listing}. "
                + (f"The rate moved from the borrowed one for {', '.join(moved)}." if moved
                   else "Every method kept the borrowed rate.")]
    text = [f"At {steps} steps each method trains at the lr {sources} chose for it on validation "
            "(no grid of its own: the compute cut its budget's description states)."]
    if checks:
        moved = rates_validation_moves(f)
        text.append(f"Check of those rates at {steps} steps, validation {c['metric']} at seed {c['seed']} (the taken rate "
                    f"beside multiples of it; a check, not a choice): {listing}. "
                    + (f"Validation at this budget prefers another rate than the taken one for {', '.join(moved)}: "
                       f"the gaps at {steps} steps are provisional until that budget's own grid is run."
                       if moved else "Validation at this budget prefers the taken rate for every checked method."))
    return text


def setting(f: dict[str, Any]) -> str:
    """The model and data a study ran on, for a sentence: "minilm / rotten-tomatoes"."""
    base = f.get("base_config") or {}
    return f"{(base.get('model') or {}).get('name', '?')} / {(base.get('data') or {}).get('source', '?')}"


def combination_rows(f: dict[str, Any]) -> list[dict[str, Any]]:
    """For each declared pair: the paired difference (combination - part) per part, and the verdict
    against the better part: better when mean - std > 0, worse when mean + std < 0, else no better."""
    ok = {m: e for m, e in f["methods"].items() if e.get("status") == "ok"}
    rows = []
    for combo, parts in ((f.get("study") or {}).get("pairs") or {}).items():
        if combo not in ok or any(p not in ok for p in parts):
            continue
        diffs = {p: paired(ok[combo]["test_per_seed"], ok[p]["test_per_seed"]) for p in parts}
        best = max(parts, key=lambda p: ok[p]["mean"])
        d = diffs[best]
        outcome = "better" if d["mean"] - d["std"] > 0 else "worse" if d["mean"] + d["std"] < 0 else "no better"
        rows.append({"combination": combo, "parts": parts, "differences": diffs, "best_part": best, "outcome": outcome})
    return rows


def _combinations(rep: Any, kit: Any, name: str, results: dict[str, dict[str, Any]]) -> None:
    for key, result in results.items():
        f = result["figures"]
        rows = combination_rows(f)
        rep.add(kit.table(["combination", "test (mean ± std)", "vs each part (paired, points)", "better part", "outcome"], [
            [r["combination"], _score(ok_points(f)[r["combination"]]),
             "; ".join(f"{p}: {points_text(d)}" for p, d in r["differences"].items()),
             r["best_part"], r["outcome"]] for r in rows]), "")
        rep.add("Differences are per seed (combination minus part, same seed), mean ± standard deviation over seeds. "
                "Outcome against the better part: better when mean − std > 0, worse when mean + std < 0, no better otherwise.", "")
        declared = (f.get("study") or {}).get("pairs") or {}
        if rows:
            better = [r["combination"] for r in rows if r["outcome"] == "better"]
            rep.add(f"**Verdict: {len(better)} of {len(rows)} combinations better than their better part** — "
                    + by_outcome({r["combination"]: r["outcome"] for r in rows}) + ".", "")
            rep.readme.setdefault("combinations", []).append(
                f"on {setting(f)}, {len(better)} of {len(rows)} measured combinations beat their better part by more than "
                f"the seed spread" + (f" ({', '.join(better)})" if better else "")
                + (f", {len(declared) - len(rows)} of {len(declared)} not yet measured" if len(rows) < len(declared) else ""))
            plain = [r["combination"] for r in rows if r["outcome"] != "better"]
            rep.headlines.append(f"Combinations ({key}): {len(better)} of {len(rows)} "
                                 "beat their better part by more than the seed spread"
                                 + (f"; no better: {', '.join(plain)}." if plain else "."))

            def draw(ax, rows=rows):
                labels = [r["combination"] for r in rows]
                d = [r["differences"][r["best_part"]] for r in rows]
                ax.barh(labels, [x["mean"] * 100 for x in d], xerr=[x["std"] * 100 for x in d], color="#4878a8", capsize=3)
                ax.axvline(0, color="grey", linewidth=0.8)
                ax.set_xlabel("combination minus its better part (points, paired over seeds)")
                ax.grid(alpha=0.3)

            rep.plot(f"{key}_combinations.png", draw, "paired difference of each combination to its better part")


SECTIONS_BY_KIND = {"frontier": _frontier, "lr-robustness": _lr_robustness, "convergence": _convergence,
                    "long-budget": _long_budget, "combinations": _combinations}
