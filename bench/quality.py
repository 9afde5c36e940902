"""Quality of every method on real data, with one step budget for all.

    nice python bench/quality.py --config bench/configs/quality_minilm.yaml --budget quick
    nice python bench/quality.py --config bench/configs/quality_minilm.yaml --budget full
    nice python bench/quality.py --config bench/configs/quality_smollm2_reasoning.yaml --budget short --threads 1
    ... [--methods lora,pissa] [--workdir runs/bench] [--threads 1] [--resume]

A config (bench/configs/*.yaml) holds a lorakit train config (`base`), per-method overrides
with a quick-budget learning rate and a validation grid, and named budgets (seeds, whether to
search the lr, config overrides such as the step budget). For each method:

1. budgets with ``lr_search``: train each grid lr at the first seed and keep the one with the
   best validation ``select.metric`` (the run's end-of-training validation evaluation); with
   ``extend_grid: n``, a choice at an edge of the grid tries up to n more lrs past that edge; a
   budget whose lr comes from another result (a study's ``lr_from``) can check it with
   ``lr_check: [factor, ...]`` (those multiples trained at the first seed, scored on validation;
   with ``lr_check_choose: true`` the rate validation prefers among them is the one trained);
2. train the kept lr at every seed; record test metrics, trainable parameters, init time,
   train time and peak memory (lorakit's recipe measures them: peak RSS, or CUDA peak);
3. from the per-step training losses, the steps each method needs to reach the reference
   method's final training loss (both as trailing means over ``smooth`` steps, same seed).

Every training run is a fresh subprocess (``lorakit.recipes.run``) so peak memory is the run's
own. Run directories are stable (``<workdir>/<config name>_<budget>/<method>-lr<lr>-seed<seed>``):
a finished run whose spec is unchanged is read back instead of retrained, so several runner
processes can split the methods of one experiment (``--methods``, ``--output``) and a last
pass without ``--methods`` gathers every run into one result. Results go to bench/results/<name>[_<budget>].json after every method, so a stopped run
keeps what it finished ("status": "partial" until the end); ``--resume`` reads that file back
and trains only the methods it does not hold yet (same budget and config), so a run several
hours long can be spread over several sittings. Every finished run is also recorded in
bench/results/runs/<config name>_<budget>/<run>.json (its spec and what it returned): committed with
the results, it lets a later sitting on a fresh machine, where runs/ is gone, pick up a method
half-way instead of training its finished runs again.

A study config (issue 18, ``study:`` and ``inherit:``) is expanded by bench/studies.py into the
same methods (its points), with points taken from an identical-protocol result when it says ``reuse``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
import yaml

from lorakit.files import write_json  # atomic (temporary sibling, then rename), strict JSON

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, this_command, write_result  # noqa: E402
import studies  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


# -- one training run, in its own process ----------------------------------------------------
def single(spec_path: str) -> None:
    """Child process: train the run config in SPEC_PATH (JSON) with lorakit's recipe."""
    from lorakit.recipes.config import from_dict
    from lorakit.recipes.train import run

    run(from_dict(json.loads(Path(spec_path).read_text())), quiet=True)


def baseline(spec_path: str) -> None:
    """Child process: evaluate the untrained model on the test split (the 'before' row)."""
    from lorakit.files import atomic_file, json_text
    from lorakit.recipes.config import from_dict
    from lorakit.recipes.rundir import write_json
    from lorakit.recipes.evaluation import evaluate
    from lorakit.recipes.setup import setup

    data = json.loads(Path(spec_path).read_text())
    cfg = from_dict(data)
    s = setup(cfg)
    s.model.eval()
    start = time.perf_counter()
    test = evaluate(s, "test", progress=False)
    out = Path(cfg.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    if s.samples.get("test"):  # the base model's first generations, as a trained run writes them
        with atomic_file(out / "samples.jsonl") as tmp:
            tmp.write_text("".join(json_text(sample) + "\n" for sample in s.samples["test"]))
    write_json(out / "results.json", {"test": test, "eval_seconds": time.perf_counter() - start})  # last: the run is done


class NotFinished(Exception):
    """--gather met a run that has not finished yet."""


def launch(mode: str, config: dict[str, Any], run_dir: Path, gather: bool = False, ledger: Path | None = None
           ) -> dict[str, Any]:
    """Run ``mode`` (single | baseline) on ``config`` in a fresh interpreter; its results.json + losses.
    A finished run of the same spec in ``run_dir`` is read back instead (its wall time kept), or else, when it
    is there, the ledger's record of it (``ledger``: a folder of one JSON per finished run, which a sitting
    commits so the next one, on a machine without ``run_dir``, does not train the run again)."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(config))
    config.setdefault("output", {})["dir"] = str(run_dir)
    spec = run_dir.parent / f"{run_dir.name}.spec.json"
    text = json.dumps(config, indent=1)
    wall_file = run_dir.parent / f"{run_dir.name}.wall"
    recorded = ledger_record(ledger, run_dir.name, config)
    if (run_dir / "results.json").is_file() and spec.is_file() and same_run(json.loads(spec.read_text()), config):
        print(f"   (finished earlier: {run_dir})", flush=True)
        wall = float(wall_file.read_text()) if wall_file.is_file() else None
    elif recorded is not None:
        print(f"   (finished in an earlier sitting: {ledger / run_dir.name}.json)", flush=True)
        return recorded
    elif gather:
        raise NotFinished(str(run_dir))
    else:
        if run_dir.exists():  # an unfinished run: start it again
            shutil.rmtree(run_dir)
        spec.write_text(text)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, f"--{mode}", str(spec)], capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
            raise RuntimeError(lines[-1] if lines else f"exit code {proc.returncode}")
        wall_file.write_text(f"{wall}\n")
    result = json.loads((run_dir / "results.json").read_text())
    result["wall_seconds"] = wall
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    result["train_loss"] = [r["loss"] for r in records if r.get("type") == "train"]
    curve = [r for r in records if r.get("type") == "eval" and r.get("split") == "validation"]
    result["validation"] = curve[-1] if curve else None
    result["validation_curve"] = curve  # every validation evaluation, in step order (eval.every_steps)
    if ledger is not None and recorded is None:
        ledger.mkdir(parents=True, exist_ok=True)
        write_json(ledger / f"{run_dir.name}.json", {"spec": config, "result": result})
    return result


def ledger_record(ledger: Path | None, run_name: str, config: dict[str, Any]) -> dict[str, Any] | None:
    """What a finished run of ``config`` named ``run_name`` returned, from the ledger; None if it holds no run of
    that name and spec."""
    path = ledger / f"{run_name}.json" if ledger is not None else None
    if path is None or not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record["result"] if same_run(record["spec"], config) else None


def same_run(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Two run specs train the same thing (where the run directory is does not matter)."""
    strip = lambda c: {**c, "output": {k: v for k, v in c.get("output", {}).items() if k != "dir"}}  # noqa: E731
    return strip(a) == strip(b)


# -- the config ------------------------------------------------------------------------------
def deep_merge(base: dict[str, Any], changes: dict[str, Any] | None) -> dict[str, Any]:
    from lorakit.recipes.config import deep_merge as merge

    return merge(base, changes or {})


def load(path: Path, budget: str) -> tuple[dict[str, Any], dict[str, Any]]:
    if not path.is_file():
        raise SystemExit(f"{path}: no such experiment config; the configs are bench/configs/*.yaml")
    spec = yaml.safe_load(path.read_text())
    try:
        spec = studies.expand(spec or {}, where=str(path))  # a study config: its inherited protocol and points
    except studies.StudyError as exc:
        raise SystemExit(str(exc)) from None
    for key in ("name", "base", "budgets", "methods"):
        if key not in (spec or {}):
            raise SystemExit(f"{path}: missing key {key!r} (see bench/configs/quality_minilm.yaml)")
    if budget not in spec["budgets"]:
        raise SystemExit(f"{path}: no budget {budget!r}; budgets: {', '.join(spec['budgets'])}")
    return spec, spec["budgets"][budget]


def search_lr(grid: list[float], validation_at: Callable[[float], float], mode: str = "max", extend: int = 0
              ) -> tuple[float, dict[float, float], list[float]]:
    """The grid lr with the best validation score. While the best sits at an edge of the grid,
    up to ``extend`` times, one more lr past that edge (the edge's own ratio) is tried, so a grid
    that was placed too low or too high does not decide the comparison. Returns the chosen lr,
    every lr's score (ascending lr) and the lrs added."""
    scores = {lr: validation_at(lr) for lr in sorted({float(r) for r in grid})}
    added: list[float] = []
    for _ in range(extend):
        rates = list(scores)
        best = best_rate(scores, mode)
        if len(rates) < 2 or best not in (rates[0], rates[-1]):
            break
        edge, inner = (rates[-1], rates[-2]) if best == rates[-1] else (rates[0], rates[1])
        new = float(f"{edge * edge / inner:.3g}")
        added.append(new)
        scores[new] = validation_at(new)
        scores = dict(sorted(scores.items()))
    return best_rate(scores, mode), scores, added


def best_rate(scores: dict[float, float], mode: str = "max") -> float:
    """The rate with the best validation score (highest for ``mode`` max, lowest for min)."""
    return (max if mode == "max" else min)(scores, key=scores.__getitem__)


# -- figures ---------------------------------------------------------------------------------
def trailing_means(losses: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` losses at each step (fewer at the start)."""
    return [statistics.fmean(losses[max(0, i + 1 - window) : i + 1]) for i in range(len(losses))]


def steps_to_reach(losses: list[float], target: float, window: int) -> int | None:
    """First step (1-based) whose trailing mean is at or below ``target``; None if never."""
    for i, value in enumerate(trailing_means(losses, window)):
        if value <= target:
            return i + 1
    return None


def summarise(runs: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    values = [r["test"][metric] for r in runs]
    mean = lambda key: statistics.fmean(r[key] for r in runs) if all(r.get(key) is not None for r in runs) else None  # noqa: E731
    return {
        "metric": metric,
        "test_per_seed": values,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "test_other_mean": {k: statistics.fmean(r["test"][k] for r in runs) for k in runs[0]["test"] if k != metric},
        "trainable_params": runs[0]["trainable_params"],
        "total_params": runs[0]["total_params"],
        "init_seconds": mean("init_seconds"),
        "train_seconds": mean("train_seconds"),
        "peak_memory_mb": max((r["peak_memory_mb"] for r in runs if r.get("peak_memory_mb") is not None), default=None),
        "steps": runs[0]["steps"],
    }


def runner_time(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """How many runs a method took (grid, widened grid and seeds) and their wall seconds summed: the compute it
    cost, whichever runner trained each run (None when a run's time was not recorded)."""
    walls = [r.get("wall_seconds") for r in runs]
    return {"run_count": len(runs), "run_seconds": None if None in walls else sum(walls)}


def study_runner_time(methods: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The experiment's own runs (points reused from another result not counted) and their summed wall seconds."""
    own = {n: e for n, e in methods.items() if e.get("status") == "ok" and not e.get("reused_from")}
    timed = {n: e for n, e in own.items() if e.get("run_seconds") is not None}
    return {"run_count": sum(e["run_count"] for e in timed.values()), "run_seconds": sum(e["run_seconds"] for e in timed.values()),
            "methods_without_run_time": sorted(set(own) - set(timed))}


def runner_commands(experiment: str, budget: str, exclude: str) -> list[str]:
    """The commands of the runner results (bench/results/parts/*.json) of the same experiment and budget, in the
    order they were written: what a --gather collects runs from."""
    found = []
    for path in sorted((RESULTS / "parts").glob("*.json"), key=lambda p: p.stat().st_mtime):
        if path.stem == exclude:
            continue
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        figures = document.get("figures") or {}
        if figures.get("experiment") == experiment and figures.get("budget") == budget:
            found += figures.get("commands") or [(document.get("environment") or {}).get("command")]
    return [c for c in found if c]


def steps_to_metric(curve: list[list[float]], target: float, mode: str) -> int | None:
    """First evaluated step (curve: [step, value] pairs) whose value reaches ``target`` (>= for max, <= for min)."""
    for step, value in curve:
        if (value >= target) if mode == "max" else (value <= target):
            return int(step)
    return None


def reached_summary(per_seed: dict[str, int | None]) -> dict[str, Any]:
    """Steps to a target per seed (None: never): them, their mean when every seed got there, and how many did."""
    reached = [v for v in per_seed.values() if v is not None]
    return {"per_seed": per_seed, "mean": statistics.fmean(reached) if len(reached) == len(per_seed) and reached else None,
            "reached_in": f"{len(reached)}/{len(per_seed)} seeds"}


def add_metric_convergence(methods: dict[str, dict[str, Any]], reference: str, select: dict[str, Any]) -> None:
    """From the validation curves (eval.every_steps): the first evaluated step at which each method reaches the
    reference's final validation metric, per seed, same seed."""
    ref = methods.get(reference)
    if not ref or ref.get("status") != "ok" or not ref.get("validation_curve"):
        return
    mode = select.get("mode", "max")
    targets = {seed: curve[-1][1] for seed, curve in ref["validation_curve"].items() if curve}
    for entry in methods.values():
        if entry.get("status") != "ok" or not entry.get("validation_curve"):
            continue
        per_seed = {seed: steps_to_metric(curve, targets[seed], mode)
                    for seed, curve in entry["validation_curve"].items() if seed in targets}
        entry["steps_to_reference_metric"] = {
            "reference": reference, "metric": select.get("metric"), **reached_summary(per_seed),
            "final_mean": statistics.fmean(curve[-1][1] for curve in entry["validation_curve"].values()),
        }


def add_convergence(methods: dict[str, dict[str, Any]], reference: str, window: int,
                    select: dict[str, Any] | None = None) -> None:
    """Steps to reach the reference's final (trailing-mean) training loss, per seed, same seed; with validation
    curves, also the steps to its final validation metric (``select``'s metric and mode)."""
    ref = methods.get(reference)
    if not ref or ref.get("status") != "ok":
        return
    add_metric_convergence(methods, reference, select or {"metric": "accuracy", "mode": "max"})
    targets = {seed: trailing_means(loss, window)[-1] for seed, loss in ref["train_loss"].items() if loss}
    for entry in methods.values():
        if entry.get("status") != "ok":
            continue
        per_seed = {seed: steps_to_reach(entry["train_loss"][seed], targets[seed], window)
                    for seed in entry["train_loss"] if seed in targets}
        entry["steps_to_reference_loss"] = {
            "reference": reference,
            **reached_summary(per_seed),
            "final_loss_trailing_mean": statistics.fmean(trailing_means(v, window)[-1] for v in entry["train_loss"].values()),
        }


def resume_from(result_name: str, figures: dict[str, Any]) -> float:
    """Copy the finished methods (and baseline) of an earlier sitting of the same experiment into
    ``figures``; returns the seconds that sitting took. Refuses a file made with another budget or config."""
    path = RESULTS / f"{result_name}.json"
    if not path.is_file():
        print(f"nothing to resume in {path}; starting afresh", flush=True)
        return 0.0
    document = json.loads(path.read_text())
    earlier = document["figures"]
    defaults = {"extend_grid": 0}  # results written before the key existed did not widen their grids
    for key in ("budget", "seeds", "lr_search", "extend_grid", "base_config"):
        if earlier.get(key, defaults.get(key)) != figures.get(key, defaults.get(key)):
            raise SystemExit(f"{path} was made with another {key} ({earlier.get(key)!r}); "
                             "rerun without --resume or pass --output to start a new result")
    kept = {n: e for n, e in earlier.get("methods", {}).items() if e.get("status") == "ok"}
    figures["methods"].update(kept)
    if earlier.get("baseline", {}).get("status") == "ok":
        figures["baseline"] = earlier["baseline"]
    figures["sittings"] = earlier.get("sittings", [earlier.get("workdir")]) + [figures["workdir"]]
    figures["commands"] = earlier.get("commands", [(document.get("environment") or {}).get("command")]) + [this_command()]
    print(f"resuming {path}: keeping {', '.join(kept) or 'no methods'}", flush=True)
    return float(earlier.get("elapsed_seconds") or 0.0)  # None after a --gather: that pass's runners' time is unknown


class Experiment(NamedTuple):
    """What every method of one experiment shares: the budget, seeds, the selection rule, the test metric
    and where the runs go."""
    budget: dict[str, Any]
    seeds: list[int]
    select: dict[str, Any]
    metric: str
    workdir: Path
    gather: bool
    ledger: Path | None = None  # the finished runs' records, kept with the results (see launch)


def train_method(name: str, method: dict[str, Any], method_base: dict[str, Any], ex: Experiment) -> dict[str, Any]:
    """One method: its lr from the grid on validation at the first seed (budgets with ``lr_search``), then every
    seed at that lr (the grid's own run reused for the first); the entry of the result file."""
    entry: dict[str, Any] = {"status": "ok"}
    lr = float(method["lr"])
    grid_runs: dict[float, dict[str, Any]] = {}
    first = ex.seeds[0]
    if ex.budget.get("lr_search") and method.get("lr_search", True):  # a study's fixed-lr point: no search
        def validation_at(candidate: float) -> float:
            print(f"== {name} lr {candidate:g} (grid, seed {first})", flush=True)
            out = train_run(name, candidate, first, method_base, ex)
            if not out["validation"]:
                raise RuntimeError("no validation evaluation to choose the lr on; set eval.every_epoch: true")
            grid_runs[candidate] = out
            return out["validation"].get(ex.select["metric"])

        lr, scores, added = search_lr(method.get("grid") or [lr], validation_at, ex.select.get("mode", "max"),
                                      int(ex.budget.get("extend_grid", 0)))
        entry["lr_grid"] = {f"{k:g}": v for k, v in scores.items()}
        if added:
            entry["lr_grid_extended"] = [f"{k:g}" for k in added]
    if method.get("chosen"):  # the lr another result of this protocol chose on validation (a study's lr_from)
        entry.update({k: v for k, v in method["chosen"].items() if k != "lr"})  # its grid's scores and where from
        if ex.budget.get("lr_check"):
            entry["lr_check"], preferred = check_rate(name, lr, method_base, ex, grid_runs)
            if ex.budget.get("lr_check_choose"):  # the check's rates are this budget's grid
                entry["lr_taken"], lr = lr, preferred
    entry["lr"] = lr
    runs, launched = [], list(grid_runs.values())  # launched: every run this method took, each once
    for seed in ex.seeds:
        if seed == first and lr in grid_runs:
            runs.append(grid_runs[lr])  # the grid already trained this (lr, seed)
            continue
        print(f"== {name} lr {lr:g} seed {seed}", flush=True)
        runs.append(train_run(name, lr, seed, method_base, ex))
        launched.append(runs[-1])
    entry.update(summarise(runs, ex.metric))
    entry.update(runner_time(launched))
    entry["train_loss"] = {str(seed): r["train_loss"] for seed, r in zip(ex.seeds, runs)}
    if (method_base.get("eval") or {}).get("every_steps"):  # learning curves of the validation metric
        entry["validation_curve"] = {str(seed): [[c["step"], c[ex.select["metric"]]] for c in r["validation_curve"]]
                                     for seed, r in zip(ex.seeds, runs)}
    print(f"   {name}: test {ex.metric} {entry['mean']:.4f} ± {entry['std']:.4f}, "
          f"train {entry['train_seconds']:.0f}s", flush=True)
    return entry


def train_run(name: str, lr: float, seed: int, method_base: dict[str, Any], ex: Experiment) -> dict[str, Any]:
    """One run of a method at ``lr`` and ``seed``, in its stable run directory (see launch)."""
    cfg = deep_merge(method_base, {"optim": {"lr": lr}, "train": {"seed": seed}})
    return launch("single", cfg, ex.workdir / f"{name}-lr{lr:g}-seed{seed}", ex.gather, ex.ledger)


def check_rate(name: str, lr: float, method_base: dict[str, Any], ex: Experiment, runs: dict[float, dict[str, Any]]
               ) -> tuple[dict[str, Any], float]:
    """A budget that takes each method's rate from another result (``lr_from``) with ``lr_check: [factor, ...]``:
    that rate and each factor x it trained at the first seed (into ``runs``, by rate) and scored on validation;
    the record (scores, the rate validation prefers) and that rate. With ``lr_check_choose`` the seeds train at
    the preferred rate (the check is the budget's grid); without, it only checks the taken one."""
    factors = ex.budget["lr_check"]
    if not isinstance(factors, list) or not all(isinstance(f, (int, float)) and f > 0 and f != 1 for f in factors):
        raise ValueError(f"lr_check: {factors!r} must be a list of positive factors other than 1, e.g. [0.5]")
    metric, first = ex.select["metric"], ex.seeds[0]
    for candidate in [lr] + [lr * f for f in factors]:
        print(f"== {name} lr {candidate:g} (check of the taken lr {lr:g}, seed {first})", flush=True)
        runs[candidate] = train_run(name, candidate, first, method_base, ex)
    scores = {k: r["validation"][metric] for k, r in runs.items()}
    best = best_rate(scores, ex.select.get("mode", "max"))
    return {"seed": first, "metric": metric, "validation": {f"{k:g}": v for k, v in sorted(scores.items())},
            "prefers": f"{best:g}"}, best


# -- the experiment --------------------------------------------------------------------------
def describe(spec: dict[str, Any], budget_name: str, budget: dict[str, Any], config_path: Path, base: dict[str, Any],
             workdir: Path) -> dict[str, Any]:
    """The result file's figures before any run: the protocol every method of the experiment shares."""
    seeds = [int(s) for s in budget.get("seeds", [0])]
    metric = "exact_match" if base.get("task", "classification") == "causal-lm" else "accuracy"  # multiple-choice: accuracy
    figures: dict[str, Any] = {
        "experiment": spec["name"], "config": str(config_path), "budget": budget_name,
        "budget_description": budget.get("description", ""), "seeds": seeds, "lr_search": bool(budget.get("lr_search")),
        "extend_grid": int(budget.get("extend_grid", 0)),
        "select": spec.get("select", {"metric": "accuracy", "mode": "max"}), "metric": metric,
        "reference": spec.get("reference", "lora"), "smooth_window": int(budget.get("smooth", 8)),
        "base_config": base, "workdir": str(workdir), "methods": {},
    }
    if spec.get("study"):
        figures["study"] = studies.study_facts(spec)
    return figures


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="bench/configs/quality_minilm.yaml")
    parser.add_argument("--budget", default="quick", help="a budget named in the config (quick, full, ...)")
    parser.add_argument("--methods", help="comma-separated subset of the config's methods")
    parser.add_argument("--workdir", default="runs/bench", help="where the run directories go")
    parser.add_argument("--output", help="result name (default: <config name>_<budget>)")
    parser.add_argument("--threads", type=int, help="CPU threads per training run (train.threads; default: the idle cores)")
    parser.add_argument("--resume", action="store_true", help="keep the methods already in the result file; train the rest")
    parser.add_argument("--gather", action="store_true",
                        help="train nothing: collect the finished runs of the workdir, leaving out methods with unfinished runs")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    parser.add_argument("--baseline", help=argparse.SUPPRESS)
    return parser.parse_args()


def method_entry(name: str, spec: dict[str, Any], base: dict[str, Any], figures: dict[str, Any], ex: Experiment
                 ) -> dict[str, Any] | None:
    """The result entry of method ``name``: taken from an identical-protocol result (``reuse``), or trained at the
    lr another result chose (``lr_from``) or its grid chooses here; a failed method's error; None when a gather
    finds its runs unfinished."""
    method = spec["methods"][name]
    method_base = deep_merge(base, method.get("overrides") or {})
    earlier = studies.reused(spec, name, method_base, figures, RESULTS, deep_merge)
    if earlier is not None:  # a point another result measured by the same protocol
        print(f"== {name}: taken from {earlier['reused_from']}", flush=True)
        return earlier
    try:
        chosen = studies.chosen_lr(spec, name, method_base, figures, RESULTS, deep_merge, ex.budget)
    except studies.StudyError as exc:
        raise SystemExit(str(exc)) from None
    if chosen is not None:
        print(f"== {name}: lr {chosen['lr']:g}, chosen on validation in {chosen['lr_from']}", flush=True)
        method = {**method, "lr": chosen["lr"], "lr_search": False, "chosen": chosen}
    t0 = time.perf_counter()
    try:
        entry = train_method(name, method, method_base, ex)
    except NotFinished as exc:
        kept = figures["methods"].get(name, {}).get("status") == "ok"
        print(f"   {name}: not finished yet ({exc}); " + ("its earlier entry kept" if kept else "left out"), flush=True)
        return None
    except (RuntimeError, KeyError, ValueError) as exc:
        entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        print(f"!! {name} failed: {entry['error']}", flush=True)
    # a gathering pass reads runs back in no time: the method's wall time is then its runs' own
    entry["wall_seconds"] = entry.get("run_seconds") if ex.gather else time.perf_counter() - t0
    return entry


def gathered_commands(figures: dict[str, Any], experiment: str, budget: str, result_name: str) -> list[str]:
    """A gather's sittings: the earlier ones, the runners' it collects from and its own, each distinct command
    once, the training sittings first (in order), then the gathering passes."""
    commands = figures.get("commands", []) + runner_commands(experiment, budget, Path(result_name).name) + [this_command()]
    return sorted(dict.fromkeys(commands), key=lambda c: "--gather" in c.split())


def main() -> None:
    args = arguments()
    if args.single:
        return single(args.single)
    if args.baseline:
        return baseline(args.baseline)

    config_path = Path(args.config)
    spec, budget = load(config_path, args.budget)
    names = list(spec["methods"]) if not args.methods else [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in names if m not in spec["methods"]]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; the config has {', '.join(spec['methods'])}")
    base = deep_merge(spec["base"], budget.get("overrides") or {})
    if args.threads:
        base = deep_merge(base, {"train": {"threads": args.threads}})
        torch.set_num_threads(args.threads)  # what the result's environment records: the runs' threads
    result_name = args.output or f"{spec['name']}_{args.budget}"
    workdir = Path(args.workdir) / f"{spec['name']}_{args.budget}"
    figures = describe(spec, args.budget, budget, config_path, base, workdir)
    ledger = RESULTS / "runs" / workdir.name  # committed with the results: runs survive the machine
    ex = Experiment(budget, figures["seeds"], figures["select"], figures["metric"], workdir, args.gather, ledger)
    convergence = lambda: add_convergence(figures["methods"], figures["reference"], figures["smooth_window"], ex.select)  # noqa: E731
    earlier_seconds = resume_from(result_name, figures) if args.resume else 0.0
    started = time.perf_counter()
    if args.gather:
        figures["gathered"] = True  # from finished runs, possibly trained by several runners side by side
        figures["commands"] = gathered_commands(figures, spec["name"], args.budget, result_name)

    def save(status: str) -> None:
        # a gathering pass trains nothing: its own seconds say nothing of the experiment's
        figures["elapsed_seconds"] = None if args.gather else earlier_seconds + time.perf_counter() - started
        figures.update(study_runner_time(figures["methods"]))
        write_result(result_name, figures, status=status)

    if spec.get("baseline") and figures.get("baseline", {}).get("status") != "ok":
        print("== baseline (untrained model)", flush=True)
        try:
            figures["baseline"] = {"status": "ok", **launch("baseline", base, workdir / "baseline", args.gather, ledger)}
        except NotFinished:
            pass
        except RuntimeError as exc:
            figures["baseline"] = {"status": "failed", "error": str(exc)}
        save("partial")

    for name in names:
        if figures["methods"].get(name, {}).get("status") == "ok" and not args.gather:  # a gather reads every run again
            print(f"== {name}: kept from the earlier sitting", flush=True)
            continue
        entry = method_entry(name, spec, base, figures, ex)
        if entry is not None:
            figures["methods"][name] = entry
            convergence()
            save("partial")
    convergence()  # methods kept by --resume included
    failed = [n for n, e in figures["methods"].items() if e["status"] != "ok"]
    missing = [n for n in names if n not in figures["methods"]]
    save("partial" if missing else "ok" if not failed else "failed-methods")


if __name__ == "__main__":
    main()
