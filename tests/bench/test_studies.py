"""bench/studies.py (issue 18): the study computations on synthetic results (no training) and the
report's study sections rendered from synthetic result JSON."""

from __future__ import annotations

import itertools
import json
import random
import statistics
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
import quality  # noqa: E402
import report  # noqa: E402
import studies  # noqa: E402

ENV = {"date": "2030-01-02T03:04:05+00:00", "machine": "m", "cpu_count": 2, "python": "3.99", "torch": "9",
       "transformers": "6", "peft": "3", "lorakit_commit": "abc", "command": "python bench/quality.py"}


def point(family: str, params: int, per_seed: list[float], **axis) -> dict:
    return {"family": family, "params": params, "per_seed": per_seed, "mean": statistics.fmean(per_seed),
            "std": statistics.stdev(per_seed), **axis}


def lora_params(r: int) -> int:  # MiniLM all-linear: r * sum(in + out) over 37 layers, + the head
    return 42240 * r + 770


def sb_params(r: int) -> int:  # an r x r matrix per layer
    return 37 * r * r + 770


# -- the 27x check --------------------------------------------------------------------------
def frontier_points(sb16_seeds: list[float]) -> dict:
    return {"lora@r1": point("lora", lora_params(1), [0.70, 0.71, 0.72], rank=1),
            "lora@r8": point("lora", lora_params(8), [0.78, 0.79, 0.80], rank=8),
            "lora@r16": point("lora", lora_params(16), [0.80, 0.81, 0.82], rank=16),
            "lora-sb@r16": point("lora-sb", sb_params(16), sb16_seeds, rank=16),
            "lora-sb@r96": point("lora-sb", sb_params(96), [0.85, 0.85, 0.86], rank=96)}


def test_ratio_check_finds_the_pairs_an_exhaustive_search_finds():
    pts = frontier_points([0.79, 0.80, 0.80])  # sb16 beats lora r8 (33x) but not lora r16 (66x)
    check = studies.ratio_check(pts)
    brute = {(a, b) for a, b in itertools.product(pts, pts)
             if pts[a]["family"] == "lora-sb" and pts[b]["family"] == "lora"
             and pts[b]["params"] >= 27 * pts[a]["params"] and pts[a]["mean"] >= pts[b]["mean"]}
    assert {(h["cheap"], h["reference"]) for h in check["hits"]} == brute == {("lora-sb@r16", "lora@r8")}
    assert check["best"]["ratio"] == pytest.approx(lora_params(8) / sb_params(16))
    # sb96 beats every lora point but has more parameters than lora r1 and < 27x fewer than r16: never a candidate
    assert all(c["cheap"] != "lora-sb@r96" for c in check["candidates"])
    outcome, _ = studies.frontier_verdict(check, pts)
    assert outcome == "reproduced"


def test_ratio_check_finds_no_pair_when_the_cheap_point_is_worse():
    pts = frontier_points([0.60, 0.61, 0.62])
    check = studies.ratio_check(pts)
    assert check["hits"] == [] and check["best"] is None and len(check["candidates"]) == 2
    assert all(c["difference"] < 0 for c in check["candidates"])
    outcome, sentence = studies.frontier_verdict(check, pts)
    assert outcome == "not reproduced"  # worse by far more than the spreads
    closest = max(check["candidates"], key=lambda c: c["difference"])  # the sentence names the family and its nearest pair
    assert "lora-sb is below LoRA" in sentence and f"{closest['cheap']} vs {closest['reference']} ({closest['ratio']:.1f}×)" in sentence
    close = frontier_points([0.775, 0.785, 0.795])  # below lora r8's mean, within the two standard deviations
    assert studies.frontier_verdict(studies.ratio_check(close), close)[0] == "inconclusive"
    only_big = {k: v for k, v in pts.items() if k != "lora-sb@r16"}
    assert studies.frontier_verdict(studies.ratio_check(only_big), only_big)[0] == "inconclusive"  # no candidates


# -- the lr-range width ------------------------------------------------------------------------
def brute_width(means: dict[float, float], within: float) -> float:
    """The widest contiguous run of grid lrs containing the best, all within ``within`` of it."""
    rates = sorted(means)
    b = max(range(len(rates)), key=lambda i: means[rates[i]])
    best = 0.0
    for lo in range(b + 1):
        for hi in range(b, len(rates)):
            if all(means[rates[i]] >= means[rates[b]] - within for i in range(lo, hi + 1)):
                best = max(best, rates[hi] / rates[lo])
    return best


def test_lr_range_width_is_the_contiguous_run_within_one_point_of_the_best():
    grid = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 3e-3]  # 30x
    means = dict(zip(grid, [0.70, 0.795, 0.80, 0.805, 0.60, 0.80]))  # 3e-3 is within but past a collapse
    r = studies.lr_range(means)
    assert (r["low"], r["high"], r["best_lr"]) == (2e-4, 1e-3, 1e-3)
    assert r["width"] == pytest.approx(5.0) and r["grid_width"] == pytest.approx(30.0)
    rng = random.Random(0)
    for _ in range(200):
        means = {lr: rng.uniform(0.5, 0.8) for lr in grid}
        assert studies.lr_range(means)["width"] == pytest.approx(brute_width(means, 0.01))


def test_lr_width_verdict_thresholds():
    assert studies.lr_width_verdict({"lora": 3.0, "riemannian": 6.0}, "riemannian") == "reproduced"  # exactly 2x
    assert studies.lr_width_verdict({"lora": 3.0, "riemannian": 5.9}, "riemannian") == "inconclusive"
    assert studies.lr_width_verdict({"lora": 3.0, "riemannian": 3.0}, "riemannian") == "not reproduced"
    assert studies.lr_width_verdict({"lora": 3.0}, "riemannian") == "inconclusive"
    # seeds that scatter more than the 1-point window make any width noise: no verdict either way
    assert studies.lr_width_verdict({"lora": 3.0, "riemannian": 3.0}, "riemannian", spread=0.0099) == "not reproduced"
    assert studies.lr_width_verdict({"lora": 3.0, "riemannian": 3.0}, "riemannian", spread=0.011) == "inconclusive"
    assert studies.lr_width_verdict({"lora": 3.0, "riemannian": 9.0}, "riemannian", spread=0.011) == "inconclusive"


# -- paired differences and verdicts ---------------------------------------------------------
def test_paired_differences_match_an_independent_computation():
    a, b = [0.81, 0.79, 0.83], [0.80, 0.80, 0.80]
    d = studies.paired(a, b)
    assert d["differences"] == pytest.approx([x - y for x, y in zip(a, b)])
    assert d["mean"] == pytest.approx(statistics.fmean(a) - statistics.fmean(b))
    assert d["std"] == pytest.approx(statistics.stdev([0.01, -0.01, 0.03]))
    assert d["wins"] == 2 and d["n"] == 3
    with pytest.raises(studies.StudyError, match="same seeds"):
        studies.paired([0.1, 0.2], [0.1])


def test_verdict_thresholds():
    assert studies.verdict(0.0, 0.02) == "reproduced"
    assert studies.verdict(-0.01, 0.02) == "inconclusive"
    assert studies.verdict(-0.02, 0.02) == "inconclusive"
    assert studies.verdict(-0.021, 0.02) == "not reproduced"
    assert studies.speedup_verdict(100, 50) == "reproduced"
    assert studies.speedup_verdict(100, 51) == "inconclusive"
    assert studies.speedup_verdict(100, 101) == "not reproduced"
    assert studies.speedup_verdict(100, None) == "not reproduced"


def test_gap_trend_thresholds():
    g = lambda m, s: {"mean": m, "std": s}  # noqa: E731
    assert studies.gap_trend({125: g(-0.02, 0.005), 1000: g(0.02, 0.005)}) == "reverses"
    assert studies.gap_trend({125: g(-0.02, 0.005), 1000: g(-0.009, 0.005)}) == "shrinks"
    assert studies.gap_trend({125: g(-0.02, 0.005), 1000: g(-0.011, 0.005)}) == "persists"
    assert studies.gap_trend({125: g(-0.02, 0.005), 1000: g(0.009, 0.02)}) == "shrinks"  # flipped, but within its spread
    # no gap beyond the spread at the short budget: nothing to persist, shrink or reverse
    assert studies.gap_trend({125: g(-0.02, 0.03), 1000: g(0.02, 0.005)}) == "appears"
    assert studies.gap_trend({125: g(-0.0034, 0.0143), 1000: g(-0.0055, 0.0082)}) == "none at either budget"
    assert studies.gap_trend({125: g(-0.02, 0.005)}) == "one budget only"
    # three budgets: the trend runs from the shortest to the longest, and a gap that counts only between them is named
    none = g(-0.001, 0.01)
    assert studies.gap_trend({125: none, 500: none, 1000: none}) == "none at any budget"
    assert studies.gap_trend({125: none, 500: g(0.011, 0.003), 1000: none}) == "only at 500 steps"
    assert studies.gap_trend({125: none, 500: g(0.011, 0.003), 1000: g(0.009, 0.003)}) == "appears"
    assert studies.gap_trend({125: g(-0.02, 0.005), 500: none, 1000: g(-0.011, 0.005)}) == "persists"


# -- configs --------------------------------------------------------------------------------
def test_a_study_config_expands_its_points_and_inherits_the_protocol():
    spec = studies.expand({"name": "s", "study": "frontier", "inherit": "bench/configs/quality_minilm.yaml",
                           "points": {"lora": {"rank": [1, 4]}, "riemannian": {"lr": [1e-3, 3e-3]}}})
    parent = quality.yaml.safe_load((BENCH / "configs" / "quality_minilm.yaml").read_text())
    assert spec["base"] == parent["base"] and spec["budgets"] == parent["budgets"]
    assert list(spec["methods"]) == ["lora@r1", "lora@r4", "riemannian@lr0.001", "riemannian@lr0.003"]
    assert spec["methods"]["lora@r4"]["overrides"]["adapter"] == {**parent["methods"]["lora"]["overrides"]["adapter"], "rank": 4}
    assert spec["methods"]["lora@r4"]["grid"] == parent["methods"]["lora"]["grid"]
    fixed = spec["methods"]["riemannian@lr0.003"]
    assert fixed["lr"] == 3e-3 and fixed["lr_search"] is False and "grid" not in fixed
    assert fixed["overrides"] == parent["methods"]["riemannian"]["overrides"]
    with pytest.raises(studies.StudyError, match="nope"):
        studies.expand({"study": "frontier", "inherit": "bench/configs/quality_minilm.yaml", "points": {"nope": {"rank": [1]}}})
    with pytest.raises(studies.StudyError, match="not one of"):
        studies.expand({"study": "frontiers"})


@pytest.mark.parametrize("config", sorted(p.name for p in (BENCH / "configs").glob("study_*.yaml")))
def test_every_study_config_loads(config):
    spec, budget = quality.load(BENCH / "configs" / config, "full")
    assert spec["study"] in studies.STUDIES and spec["methods"]


def test_fixed_lr_points_train_every_seed_at_their_lr_without_a_search(tmp_path, monkeypatch):
    config = tmp_path / "s.yaml"
    config.write_text(json.dumps({"name": "s", "study": "lr-robustness", "inherit": "bench/configs/quality_minilm.yaml",
                                  "points": {"lora": {"lr": [1e-3, 3e-3]}}}))
    launched = []

    def fake_launch(mode, cfg, run_dir, gather=False, ledger=None):
        launched.append((cfg["optim"]["lr"], cfg["train"]["seed"]))
        return {"test": {"accuracy": 0.5}, "validation": {"accuracy": 0.5}, "trainable_params": 10, "total_params": 100,
                "init_seconds": 1.0, "train_seconds": 2.0, "peak_memory_mb": 3.0, "steps": 1, "train_loss": [0.5]}

    saved: dict = {}
    monkeypatch.setattr(quality, "launch", fake_launch)
    monkeypatch.setattr(quality, "write_result", lambda name, figures, status: saved.update(figures=figures))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--config", str(config), "--budget", "full", "--workdir", str(tmp_path)])
    quality.main()
    assert sorted(launched) == sorted(itertools.product([1e-3, 3e-3], [0, 1, 2]))  # no grid runs
    assert "lr_grid" not in saved["figures"]["methods"]["lora@lr0.003"]
    assert saved["figures"]["study"]["points"]["lora@lr0.003"] == {"family": "lora", "lr": 3e-3}


def test_reuse_takes_a_point_only_from_the_same_protocol(tmp_path):
    spec = studies.expand({"name": "s", "study": "frontier", "inherit": "bench/configs/quality_minilm.yaml",
                           "points": {"lora": {"rank": [16, 8]}},
                           "reuse": {"result": "old", "points": {"lora@r16": "lora", "lora@r8": "lora"}}})
    base = quality.deep_merge(spec["base"], spec["budgets"]["full"]["overrides"])
    figures = {"seeds": [0, 1, 2], "lr_search": True, "extend_grid": 2, "metric": "accuracy",
               "select": spec["select"]}
    old = {**figures, "config": "bench/configs/quality_minilm.yaml", "base_config": base,
           "methods": {"lora": {"status": "ok", "mean": 0.8}}}
    (tmp_path / "old.json").write_text(json.dumps({"figures": old}))
    at = lambda name: quality.deep_merge(base, spec["methods"][name]["overrides"])  # noqa: E731
    got = studies.reused(spec, "lora@r16", at("lora@r16"), figures, tmp_path, quality.deep_merge)
    assert got["mean"] == 0.8 and got["reused_from"] == "old:lora"
    assert studies.reused(spec, "lora@r8", at("lora@r8"), figures, tmp_path, quality.deep_merge) is None  # rank 8 != 16
    assert studies.reused(spec, "lora@r16", at("lora@r16"), {**figures, "seeds": [0]}, tmp_path, quality.deep_merge) is None


# -- the report -----------------------------------------------------------------------------
def entry(per_seed: list[float], params: int, lr: float, losses: list[float] | None = None) -> dict:
    return {"status": "ok", "lr": lr, "test_per_seed": per_seed, "mean": statistics.fmean(per_seed),
            "std": statistics.stdev(per_seed), "trainable_params": params, "steps": 6,
            "train_loss": {str(s): losses or [1.0] * 6 for s in range(len(per_seed))}}


def write_result(directory: Path, name: str, figures: dict, status: str = "ok") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps({"benchmark": name, "status": status, "environment": ENV,
                                                        "figures": figures}))


def study_figures(kind: str, methods: dict, points: dict, **extra) -> dict:
    return {"experiment": f"study_{kind}", "config": f"bench/configs/study_{kind}.yaml", "budget": "full",
            "budget_description": "d", "seeds": [0, 1, 2], "metric": "accuracy", "reference": "lora", "smooth_window": 2,
            "base_config": {"train": {"max_steps": 6}}, "methods": methods,
            "study": {"kind": kind, "inherit": "bench/configs/quality_minilm.yaml", "points": points, **extra}}


def test_report_renders_a_frontier_section_whose_verdict_follows_the_numbers(tmp_path):
    pts = frontier_points([0.79, 0.80, 0.80])
    methods = {n: entry(p["per_seed"], p["params"], 1e-3) for n, p in pts.items()}
    facts = {n: {"family": p["family"], "rank": p["rank"]} for n, p in pts.items()}
    facts["lora-sb@r32"] = {"family": "lora-sb", "rank": 32}  # declared, not measured yet
    write_result(tmp_path / "r", "study_frontier_full", study_figures("frontier", methods, facts), status="partial")
    text = report.write(tmp_path / "r", tmp_path / "docs").read_text()
    section = text[text.index("## Study: parameter-efficiency frontier"):]
    assert (tmp_path / "docs" / "study_frontier_full_frontier.png").stat().st_size > 0
    outcome, sentence = studies.frontier_verdict(studies.ratio_check(pts, cheap=("lora-sb",)), pts)
    assert f"**Verdict (lora-sb): {outcome}** — {sentence}" in section and outcome == "reproduced"
    assert "Verdict (lora-xs)" not in section  # no lora-xs point measured
    assert "lora-sb@r32" in section.split("not yet measured:")[1].split("\n")[0]
    assert "Other result: study_frontier_full" not in text
    for name, p in pts.items():  # every measured point's row carries its own parameter count and mean
        row = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
        assert f"{p['params']:,}" in row and f"{p['mean']:.4f}" in row


def test_report_renders_lr_robustness_widths_and_combination_differences(tmp_path):
    grid = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 3e-3]
    means = {"lora": [0.70, 0.792, 0.80, 0.795, 0.60, 0.50], "riemannian": [0.791, 0.795, 0.80, 0.80, 0.795, 0.791]}
    methods, facts = {}, {}
    for fam, ms in means.items():
        for lr, m in zip(grid, ms):
            name = studies.point_name(fam, "lr", lr)
            methods[name] = entry([m - 0.001, m, m + 0.001], 100, lr)
            facts[name] = {"family": fam, "lr": lr}
    write_result(tmp_path / "r", "study_lr_full", study_figures("lr-robustness", methods, facts))
    combo = {"pissa": entry([0.80, 0.81, 0.82], 10, 1e-3), "riemannian": entry([0.79, 0.80, 0.81], 10, 1e-3),
             "pissa+riemannian": entry([0.80, 0.815, 0.82], 10, 1e-3)}
    write_result(tmp_path / "r", "study_combo_full", study_figures(
        "combinations", combo, {n: {"family": n} for n in combo}, pairs={"pissa+riemannian": ["pissa", "riemannian"]}))
    text = report.write(tmp_path / "r", tmp_path / "docs").read_text()
    widths = {fam: studies.lr_range(dict(zip(grid, ms)))["width"] for fam, ms in means.items()}
    assert widths["riemannian"] >= 2 * widths["lora"]
    for fam, w in widths.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {fam} | ") and "×" in line)
        assert f"{w:.1f}×" in row
    assert "**Verdict (riemannian vs lora): reproduced**" in text
    headline = next(line for line in text.splitlines() if line.startswith("- Learning-rate robustness (study_lr_full)"))
    assert f"riemannian {widths['riemannian']:.1f}× vs lora {widths['lora']:.1f}× (reproduced)" in headline
    assert (tmp_path / "docs" / "study_lr_full_lr.png").is_file()
    # a family with a rate still unmeasured gets no verdict: a width on part of the grid is not the family's width
    partial = {n: e for n, e in methods.items() if n != studies.point_name("riemannian", "lr", 3e-3)}
    write_result(tmp_path / "r", "study_lr_full", study_figures("lr-robustness", partial, facts), status="partial")
    text = report.write(tmp_path / "r", tmp_path / "docs").read_text()
    assert "**Verdict (riemannian vs lora): pending** — not yet measured: 1 of 6 riemannian rates." in text
    assert "Verdict (riemannian vs lora): reproduced" not in text
    assert "riemannian" not in next((line for line in text.splitlines() if line.startswith("- Learning-rate")), "")
    # the same means with seeds 3 points apart: the width is below the seeds' noise, so inconclusive
    noisy = {n: entry([e["mean"] - 0.03, e["mean"], e["mean"] + 0.03], 100, facts[n]["lr"]) for n, e in methods.items()}
    f = study_figures("lr-robustness", noisy, facts)
    f["base_config"] = {"model": {"name": "minilm"}, "data": {"source": "bench/data/second.csv"}}
    write_result(tmp_path / "r", "study_lr_full", f)
    text = report.write(tmp_path / "r", tmp_path / "docs").read_text()
    assert "**Verdict (riemannian vs lora): inconclusive**" in text and "std at the best rates up to 3.0 points" in text
    assert "model `minilm` on data `bench/data/second.csv`, " in text  # a second dataset names itself
    # a rate at which the classifier predicts one class for everything is marked as such
    stuck = studies.point_name("lora", "lr", 3e-3)
    f["methods"][stuck]["test_other_mean"] = {"mcc": 0.0}
    write_result(tmp_path / "r", "study_lr_full", f)
    text = report.write(tmp_path / "r", tmp_path / "docs").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| lora | ") and "lr" not in line)
    assert row.count("†") == 1 and row.rstrip(" |").endswith("†") and "1 of 12 points" in text
    row = studies.combination_rows(study_figures("combinations", combo, {}, pairs={"pissa+riemannian": ["pissa", "riemannian"]}))[0]
    d = row["differences"]["pissa"]
    assert row["best_part"] == "pissa" and d["mean"] == pytest.approx(0.005 / 3) and row["outcome"] == "no better"
    assert f"pissa: {d['mean'] * 100:+.2f} ± {d['std'] * 100:.2f}" in text
    assert "**Verdict: 0 of 1 combinations better than their better part** — no better: pissa+riemannian." in text
    assert (tmp_path / "docs" / "study_combo_full_combinations.png").is_file()


def test_report_renders_convergence_and_long_budget_from_the_runner_figures(tmp_path):
    fast, slow = [1.0, 0.5, 0.3, 0.2, 0.2, 0.2], [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    methods = {"lora": entry([0.8, 0.8, 0.81], 10, 1e-3, slow), "lora-ga": entry([0.8, 0.81, 0.81], 10, 1e-4, fast)}
    quality.add_convergence(methods, "lora", 2)
    write_result(tmp_path / "r", "study_conv_full", study_figures("convergence", methods, {n: {"family": n} for n in methods}))
    for steps, gap in ((125, -0.02), (500, -0.005)):
        ms = {"lora": entry([0.80, 0.81, 0.82], 10, 1e-3), "pissa": entry([0.80 + gap, 0.81 + gap, 0.82 + gap], 10, 1e-3)}
        if steps == 125:
            ms["dora"] = entry([0.80, 0.81, 0.82], 10, 1e-3)  # not measured at 500 steps yet
        f = study_figures("long-budget", ms, {n: {"family": n} for n in ms})
        f["metric"] = "exact_match"
        f["base_config"] = {"train": {"max_steps": steps}}
        f["experiment"] = "study_long"
        write_result(tmp_path / "r", f"study_long_{steps}", f)
    text = report.write(tmp_path / "r", tmp_path / "docs").read_text()
    own = methods["lora"]["steps_to_reference_loss"]["mean"]
    ga = methods["lora-ga"]["steps_to_reference_loss"]["mean"]
    assert f"**Verdict (lora-ga, training loss): {studies.speedup_verdict(own, ga)}**" in text and own / ga >= 2
    row = next(line for line in text.splitlines() if line.startswith("| pissa | "))
    assert "-2.00 ± 0.00" in row and "-0.50 ± 0.00" in row and row.rstrip(" |").endswith("shrinks")
    assert ("- Long budget (study_long), paired gap to lora in points at 125, 500 steps: "
            "pissa -2.00 ± 0.00 → -0.50 ± 0.00 (shrinks); not yet measured past 125 steps: dora.") in text.splitlines()
    assert next(line for line in text.splitlines() if line.startswith("| dora | ")).rstrip(" |").endswith("one budget only")
    assert "**Verdict (gap to lora, 125 to 500 steps):** one budget only: dora; shrinks: pissa." in text
    assert ("lora's own change between budgets, paired over seeds: 125 → 500 steps +0.00 ± 0.00 points "
            "(within its spread). A budget's gaps are measured against lora at that budget") in text
    setting = next(line for line in text.split("## Study: long budget")[1].splitlines() if line.startswith("**Setting here.**"))
    assert "in points of test exact_match." in text  # the study's own metric, not always accuracy
    assert setting.count("budget full: d") == 2  # every budget's own description (both synthetic ones say "d")
    assert (tmp_path / "docs" / "study_conv_full_convergence.png").is_file()
    assert (tmp_path / "docs" / "study_long_gaps.png").is_file()


def test_steps_to_the_reference_validation_metric_follow_the_curves_and_are_reported(tmp_path):
    """Validation curves (eval.every_steps): each method's first evaluated step at or above lora's final value
    on the same seed, a verdict on that measure beside the training loss's, and the curves' plot."""
    ref_curves = {"0": [[2, 0.70], [4, 0.78], [6, 0.80]], "1": [[2, 0.60], [4, 0.79], [6, 0.81]], "2": [[2, 0.7], [4, 0.8], [6, 0.8]]}
    fast = {"0": [[2, 0.80], [4, 0.81], [6, 0.81]], "1": [[2, 0.70], [4, 0.82], [6, 0.82]], "2": [[2, 0.8], [4, 0.8], [6, 0.8]]}
    slow = {"0": [[2, 0.50], [4, 0.60], [6, 0.79]], "1": [[2, 0.50], [4, 0.70], [6, 0.81]], "2": [[2, 0.5], [4, 0.7], [6, 0.8]]}
    methods = {"lora": entry([0.8, 0.8, 0.81], 10, 1e-3), "lora-ga": entry([0.8, 0.81, 0.81], 10, 1e-4),
               "pissa": entry([0.8, 0.81, 0.81], 10, 1e-4)}
    for m, curves in (("lora", ref_curves), ("lora-ga", fast), ("pissa", slow)):
        methods[m]["validation_curve"] = curves
        methods[m]["lr_from"] = f"quality_x:{m}"
    quality.add_convergence(methods, "lora", 2, {"metric": "accuracy", "mode": "max"})
    brute = {m: {s: next((st for st, v in c if v >= ref_curves[s][-1][1]), None) for s, c in methods[m]["validation_curve"].items()}
             for m in methods}
    for m in methods:
        assert methods[m]["steps_to_reference_metric"]["per_seed"] == brute[m]
    assert brute["lora-ga"] == {"0": 2, "1": 4, "2": 2} and brute["pissa"]["0"] is None
    assert methods["lora"]["steps_to_reference_metric"]["mean"] == pytest.approx(16 / 3)
    assert methods["pissa"]["steps_to_reference_metric"]["mean"] is None  # never on seed 0
    write_result(tmp_path / "r", "study_conv_full", study_figures("convergence", methods, {n: {"family": n} for n in methods}))
    text = report.write(tmp_path / "r", tmp_path / "docs").read_text()
    own, ga = (methods[m]["steps_to_reference_metric"]["mean"] for m in ("lora", "lora-ga"))
    assert f"**Verdict (lora-ga, validation accuracy): {studies.speedup_verdict(own, ga)}**" in text
    assert "**Verdict (pissa, validation accuracy): not reproduced**" in text
    assert "Each method trains at the lr quality_x chose for it on validation" in text
    assert "Convergence (study_conv_full), steps to lora's final value:" in text
    assert (tmp_path / "docs" / "study_conv_full_validation.png").stat().st_size > 0


def test_lr_from_takes_the_source_choice_only_under_the_same_protocol(tmp_path):
    spec = studies.expand({"name": "s", "study": "convergence", "inherit": "bench/configs/quality_minilm.yaml",
                           "from_parent": ["lora", "pissa"], "lr_from": "old"})
    base = quality.deep_merge(spec["base"], spec["budgets"]["full"]["overrides"])
    figures = {"seeds": [0, 1, 2], "lr_search": True, "extend_grid": 2, "metric": "accuracy", "select": spec["select"]}
    grid = {"0.0005": 0.7, "0.001": 0.8, "0.002": 0.75}
    old = {**figures, "config": "bench/configs/quality_minilm.yaml", "base_config": base,
           "methods": {"lora": {"status": "ok", "lr": 1e-3, "lr_grid": grid}, "pissa": {"status": "failed"}}}
    (tmp_path / "old.json").write_text(json.dumps({"figures": old}))
    at = lambda name, extra=None: quality.deep_merge(quality.deep_merge(base, spec["methods"][name]["overrides"]), extra)  # noqa: E731
    periodic = at("lora", {"eval": {"every_steps": 10}})  # evaluating more often leaves the training as it was
    assert studies.chosen_lr(spec, "lora", periodic, figures, tmp_path, quality.deep_merge) == \
        {"lr": 1e-3, "lr_grid": grid, "lr_from": "old:lora"}
    for name, method_base in (("lora", at("lora", {"adapter": {"rank": 8}})), ("pissa", at("pissa"))):
        with pytest.raises(studies.StudyError, match=f"old has no finished '{name}' chosen on validation"):
            studies.chosen_lr(spec, name, method_base, figures, tmp_path, quality.deep_merge)
    with pytest.raises(studies.StudyError):
        studies.chosen_lr(spec, "lora", periodic, {**figures, "seeds": [0]}, tmp_path, quality.deep_merge)
    assert studies.chosen_lr({**spec, "lr_from": None}, "lora", periodic, figures, tmp_path, quality.deep_merge) is None


def test_the_runner_trains_an_lr_from_study_on_every_seed_at_the_source_lr_and_keeps_its_curves(tmp_path, monkeypatch):
    grid = {"0.0005": 0.7, "0.001": 0.8, "0.002": 0.75}
    spec = studies.expand({"name": "s", "study": "convergence", "inherit": "bench/configs/quality_minilm.yaml",
                           "from_parent": ["lora"]})
    base = quality.deep_merge(spec["base"], spec["budgets"]["full"]["overrides"])
    results = tmp_path / "results"
    results.mkdir()
    (results / "old.json").write_text(json.dumps({"figures": {
        "seeds": [0, 1, 2], "lr_search": True, "extend_grid": 2, "metric": "accuracy", "select": spec["select"],
        "config": "bench/configs/quality_minilm.yaml", "base_config": base,
        "methods": {"lora": {"status": "ok", "lr": 1e-3, "lr_grid": grid}}}}))
    config = tmp_path / "s.yaml"
    config.write_text(json.dumps({"name": "s", "study": "convergence", "inherit": "bench/configs/quality_minilm.yaml",
                                  "base_overrides": {"eval": {"every_steps": 2}}, "lr_from": "old", "from_parent": ["lora"]}))
    launched = []

    def fake_launch(mode, cfg, run_dir, gather=False, ledger=None):
        launched.append((cfg["optim"]["lr"], cfg["train"]["seed"], cfg["eval"]["every_steps"]))
        curve = [{"step": s, "accuracy": 0.1 * s} for s in (2, 4)]
        return {"test": {"accuracy": 0.5}, "validation": curve[-1], "validation_curve": curve, "trainable_params": 10,
                "total_params": 100, "init_seconds": 1.0, "train_seconds": 2.0, "peak_memory_mb": 3.0, "steps": 4,
                "train_loss": [0.5] * 4}

    saved: dict = {}
    monkeypatch.setattr(quality, "launch", fake_launch)
    monkeypatch.setattr(quality, "RESULTS", results)
    monkeypatch.setattr(quality, "write_result", lambda name, figures, status: saved.update(figures=figures))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--config", str(config), "--budget", "full", "--workdir", str(tmp_path)])
    quality.main()
    assert sorted(launched) == [(1e-3, 0, 2), (1e-3, 1, 2), (1e-3, 2, 2)]  # no grid: the source chose on validation
    lora = saved["figures"]["methods"]["lora"]
    assert lora["lr"] == 1e-3 and lora["lr_grid"] == grid and lora["lr_from"] == "old:lora"
    assert lora["validation_curve"] == {str(s): [[2, 0.2], [4, 0.4]] for s in range(3)}
    assert lora["steps_to_reference_metric"]["per_seed"] == {"0": 4, "1": 4, "2": 4}


def test_a_study_config_without_a_result_is_a_missed_target_and_a_partial_one_names_its_pending_points(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("study_frontier_x", "study_lr_x"):
        (configs / f"{name}.yaml").write_text(json.dumps({"name": name, "study": name.split("_")[1].replace("lr", "lr-robustness")}))
    pts = frontier_points([0.79, 0.80, 0.80])
    facts = {**{n: {"family": p["family"], "rank": p["rank"]} for n, p in pts.items()}, "lora@r2": {"family": "lora", "rank": 2}}
    f = study_figures("frontier", {n: entry(p["per_seed"], p["params"], 1e-3) for n, p in pts.items()}, facts)
    f["experiment"] = "study_frontier_x"
    rep = report.Report(tmp_path)
    rendered = studies.render_all(rep, report, {"study_frontier_x_full": {"status": "partial", "environment": ENV, "figures": f}},
                                  configs)
    assert rendered == {"study_frontier_x_full"}
    assert any(m.startswith("issue 18: study_lr_x not run yet") for m in rep.missed)
    pending = [m for m in rep.missed if "partial" in m]
    assert len(pending) == 1 and "lora@r2" in pending[0] and "lora@r8" not in pending[0]


def test_readme_headline_block_states_the_frontier_and_combination_verdicts_and_nothing_else_changes(tmp_path):
    pts = frontier_points([0.79, 0.80, 0.80])
    facts = {**{n: {"family": p["family"], "rank": p["rank"]} for n, p in pts.items()}, "lora-sb@r32": {"family": "lora-sb", "rank": 32}}
    frontier = study_figures("frontier", {n: entry(p["per_seed"], p["params"], 1e-3) for n, p in pts.items()}, facts)
    frontier["base_config"] = {"model": {"name": "minilm"}, "data": {"source": "rotten-tomatoes"}}
    write_result(tmp_path / "r", "study_frontier_full", frontier, status="partial")
    readme = tmp_path / "README.md"
    before, after = "# title\n\nintro line\n\n", "\n\n## rest\ntext\n"
    readme.write_text(f"{before}{report.README_BEGIN}\nstale sentence\n{report.README_END}{after}")
    report.write(tmp_path / "r", tmp_path / "docs", readme)
    text = readme.read_text()
    assert text.startswith(before + report.README_BEGIN) and text.endswith(report.README_END + after)
    block = text.split(report.README_BEGIN)[1].split(report.README_END)[0].strip().splitlines()
    outcome, sentence = studies.frontier_verdict(studies.ratio_check(pts, cheap=("lora-sb",)), pts)
    assert len(block) == 2 and "stale" not in text
    # below 27x: the largest ratio at equal or better mean is lora-sb@r16 against lora r1 (4.2x; sb96 beats r16 at 2x)
    near = pts["lora-sb@r16"]["mean"] - pts["lora@r1"]["mean"]
    ratio = pts["lora@r1"]["params"] / pts["lora-sb@r16"]["params"]
    assert (f"{outcome} on minilm / rotten-tomatoes ({sentence}; below 27×, lora-sb@r16 vs lora@r1 ({ratio:.1f}×) at "
            f"equal or better mean, {near * 100:+.2f} points; 1 of {len(pts) + 1} points not yet measured)") in block[0]
    assert block[1].startswith("- Combinations") and "not measured yet" in block[1]
    combo = {"lora": entry([0.80, 0.81, 0.82], 10, 1e-3), "lora+neftune": entry([0.83, 0.84, 0.845], 10, 1e-3)}
    f = study_figures("combinations", combo, {n: {"family": n} for n in combo},
                      pairs={"lora+neftune": ["lora"], "dora+pissa": ["dora", "pissa"]})
    f["base_config"] = {"model": {"name": "smollm2"}, "data": {"source": "reasoning-gym:chain_sum"}}
    write_result(tmp_path / "r", "study_combo_full", f)
    report.write(tmp_path / "r", tmp_path / "docs", readme)
    block = readme.read_text().split(report.README_BEGIN)[1].split(report.README_END)[0].strip().splitlines()
    assert ("on smollm2 / reasoning-gym:chain_sum, 1 of 1 measured combinations beat their better part by more than the "
            "seed spread (lora+neftune), 1 of 2 not yet measured") in block[1]
    again = readme.read_text()
    report.write(tmp_path / "r", tmp_path / "docs", readme)
    assert readme.read_text() == again  # idempotent
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no block here\n")
    report.write(tmp_path / "r", tmp_path / "docs", plain)
    assert plain.read_text() == "no block here\n"


def test_closest_matches_below_the_claims_ratio_equal_an_exhaustive_search():
    """A lora-sb@r32 point as good as lora r8 (8.8x more parameters), within the spread of lora r16 (17.5x)."""
    pts = frontier_points([0.60, 0.61, 0.62])
    pts["lora-sb@r32"] = point("lora-sb", sb_params(32), [0.79, 0.80, 0.81], rank=32)
    close = studies.closest_matches(pts, "lora-sb")
    pairs = [(a, b, pts[b]["params"] / pts[a]["params"], pts[a]["mean"] - pts[b]["mean"], pts[a]["std"] + pts[b]["std"])
             for a, b in itertools.product(pts, pts) if pts[a]["family"] == "lora-sb" and pts[b]["family"] == "lora"
             and pts[a]["params"] < pts[b]["params"] < 27 * pts[a]["params"]]
    better = max((p for p in pairs if p[3] >= 0), key=lambda p: p[2])
    within = max((p for p in pairs if p[3] < 0 and -p[3] <= p[4]), key=lambda p: p[2])
    assert (close["better"]["cheap"], close["better"]["reference"]) == better[:2] == ("lora-sb@r32", "lora@r8")
    assert (close["within"]["cheap"], close["within"]["reference"]) == within[:2]
    assert close["within"]["ratio"] == pytest.approx(within[2])
    assert studies.closest_matches({k: v for k, v in pts.items() if k.startswith("lora@")}, "lora-sb") == {"better": None, "within": None}


def test_a_budgets_lr_from_takes_another_budgets_choice_differing_only_in_the_keys_it_names(tmp_path):
    """The long budgets' compute cut: 8x trains at the rate 4x chose on validation. The source may differ in the
    listed keys (train.max_steps) and nothing else; a study-level lr_from stays the same-protocol check."""
    spec = studies.expand({"name": "s", "study": "long-budget", "inherit": "bench/configs/quality_minilm.yaml",
                           "from_parent": ["lora"]})
    full = spec["budgets"]["full"]
    at = lambda steps: quality.deep_merge(quality.deep_merge(spec["base"], full["overrides"]),  # noqa: E731
                                          {**spec["methods"]["lora"]["overrides"], "train": {"max_steps": steps}})
    figures = {"seeds": [0, 1, 2], "lr_search": True, "extend_grid": 2, "metric": "accuracy", "select": spec["select"]}
    grid = {"0.0005": 0.8, "0.001": 0.7, "0.002": 0.6, "0.00025": 0.75}
    x4 = {**figures, "config": "bench/configs/study_long_budget_minilm.yaml", "base_config": at(500),  # a study's own
          "methods": {"lora": {"status": "ok", "lr": 5e-4, "lr_grid": grid}}}
    (tmp_path / "x4.json").write_text(json.dumps({"figures": x4}))
    budget = {"lr_from": {"result": "x4", "differs": ["train.max_steps"]}}
    assert studies.chosen_lr(spec, "lora", at(1000), figures, tmp_path, quality.deep_merge, budget) == \
        {"lr": 5e-4, "lr_grid": grid, "lr_from": "x4:lora"}
    with pytest.raises(studies.StudyError, match="x4 has no finished 'lora'"):  # max_steps not allowed to differ
        studies.chosen_lr({**spec, "lr_from": "x4"}, "lora", at(1000), figures, tmp_path, quality.deep_merge)
    other = quality.deep_merge(at(1000), {"train": {"batch_size": 16}})  # a key it does not name
    with pytest.raises(studies.StudyError):
        studies.chosen_lr(spec, "lora", other, figures, tmp_path, quality.deep_merge, budget)
    with pytest.raises(studies.StudyError, match="neither a result name"):
        studies.chosen_lr(spec, "lora", at(1000), figures, tmp_path, quality.deep_merge, {"lr_from": {"differs": []}})
    assert studies.chosen_lr(spec, "lora", at(1000), figures, tmp_path, quality.deep_merge, {}) is None


def test_the_long_budget_points_table_gives_each_budgets_metric_and_lr_and_where_a_rate_came_from():
    rep = report.Report(None)
    e = lambda mean, lr, **k: {"status": "ok", "mean": mean, "std": 0.01, "lr": lr, **k}  # noqa: E731
    by_steps = {125: {"metric": "accuracy", "methods": {"lora": e(0.78, 2e-3), "pissa": e(0.79, 5e-4)}},
                1000: {"metric": "accuracy", "methods": {"lora": e(0.80, 1e-3, lr_from="x4:lora"),
                                                          "pissa": {"status": "failed"}}}}
    studies._long_budget_points(rep, report, by_steps, ["lora", "pissa"])
    text = "\n".join(rep.lines)
    assert "| lora | 0.7800 ± 0.0100 (lr 0.002) | 0.8000 ± 0.0100 (lr 0.001) |" in text
    assert "| pissa | 0.7900 ± 0.0100 (lr 0.0005) | – |" in text
    assert "At 1000 steps each method trains at the lr x4 chose for it on validation" in text
    assert "At 125 steps" not in text


def test_the_frontier_gives_each_points_start_loss_and_names_the_points_that_start_away_from_the_base(tmp_path):
    pts = frontier_points([0.79, 0.80, 0.80])
    methods = {n: entry(p["per_seed"], p["params"], 1e-3) for n, p in pts.items()}
    moved = next(n for n, p in pts.items() if p["family"] == "lora-sb")
    methods[moved] = entry(pts[moved]["per_seed"], pts[moved]["params"], 2.5e-3, losses=[2.2] + [1.0] * 5)
    methods[moved]["train_loss"]["1"] = [2.0] + [1.0] * 5  # seeds differ: the column is their mean
    near = next(n for n, p in pts.items() if p["family"] == "lora-sb" and n != moved)
    methods[near]["train_loss"] = {s: [1.05] + [1.0] * 5 for s in methods[near]["train_loss"]}  # within 10 %: not named
    facts = {n: {"family": p["family"], "rank": p["rank"]} for n, p in pts.items()}
    write_result(tmp_path / "r", "study_frontier_full", study_figures("frontier", methods, facts))
    section = report.write(tmp_path / "r", tmp_path / "docs").read_text().split("## Study: parameter-efficiency frontier")[1]
    row = lambda name: next(line for line in section.splitlines() if line.startswith(f"| {name} |")).split(" | ")  # noqa: E731
    start = row(moved)[-2]
    assert abs(float(start) - (2.2 + 2.0 + 2.2) / 3) < 0.006 and row(near)[-2] == "1.05"
    assert all(row(n)[-2] == "1.00" for n, p in pts.items() if p["family"] == "lora")
    note = next(line for line in section.splitlines() if line.startswith("Loss at the start"))
    assert "the lora points 1.00" in note and f"1 point(s) start more than 10% away: {moved} {start} at lr 0.0025." in note
    assert near not in note


def test_the_frontier_shows_each_points_grid_and_names_a_point_where_no_rate_of_its_grid_learned(tmp_path):
    pts = frontier_points([0.79, 0.80, 0.80])
    methods = {n: {**entry(p["per_seed"], p["params"], 1e-3), "lr_grid": {"0.0005": 0.7, "0.001": 0.8, "0.002": 0.75}}
               for n, p in pts.items()}
    methods["lora-sb@r96"]["lr_grid"] = {"0.0005": 0.0, "0.001": 0.07, "0.002": 0.0}  # below 0.1 x the best (0.8)
    methods["lora@r1"]["lr_grid"] = {"0.0005": 0.0, "0.001": 0.081, "0.002": 0.0}  # 0.081 >= 0.08: it learned a little
    facts = {n: {"family": p["family"], "rank": p["rank"]} for n, p in pts.items()}
    write_result(tmp_path / "r", "study_frontier_full", study_figures("frontier", methods, facts))
    section = report.write(tmp_path / "r", tmp_path / "docs").read_text().split("## Study: parameter-efficiency frontier")[1]
    assert "| lora-sb@r96 | 0.0005: 0.0000, **0.001: 0.0700**, 0.002: 0.0000 |" in section
    note = next(line for line in section.splitlines() if line.startswith("No rate of the grid"))
    assert "(0.8000): lora-sb@r96 (best 0.0700);" in note and "lora@r1" not in note
    top, failed = report.unlearned_grids({"mode": "max"}, {n: m["lr_grid"] for n, m in methods.items()})
    assert top == 0.8 and failed == {"lora-sb@r96": 0.07}
    assert report.unlearned_grids({"mode": "min"}, {n: m["lr_grid"] for n, m in methods.items()}) == (None, {})


def test_the_studies_compute_sums_each_results_own_runs_and_names_what_was_not_timed():
    seconds = {"a": (10, 5400.0, []), "b": (7, 1800.0, ["lora@r1"])}  # 1.5 h, 0.5 h
    results = {k: {"figures": {"run_count": n, "run_seconds": s, "methods_without_run_time": m,
                               "methods": {"lora": {"status": "ok"}}}} for k, (n, s, m) in seconds.items()}
    results["reused"] = {"figures": {"methods": {"lora": {"reused_from": "a:lora"}, "dora": {"reused_from": "a:dora"}}}}
    results["old"] = {"figures": {"methods": {"lora": {"status": "ok"}}}}  # written before runs were counted
    rep = report.Report(None)
    studies.compute(rep, report, results)
    rows = {line.split(" | ")[0].strip("| *"): line for line in "\n".join(rep.lines).splitlines() if line.startswith("| ")}
    assert rows["a"].split(" | ")[1:3] == ["10", "1.5"] and rows["reused"].split(" | ")[1:3] == ["0", "0.0"]
    assert "old" not in rows
    total = rows["total"].split(" | ")
    assert total[1:3] == [str(10 + 7), "**2.0**"] and "b:lora@r1" in total[3] and "old" in total[3]
    assert rep.headlines == ["Studies' compute: 17 runs, 2.0 h of runner time, about 1.0 h of wall clock with 2 runners "
                             "on this 2-core machine (not timed: b:lora@r1, old)."]


def test_the_long_budget_headline_gives_every_budgets_gap_in_order():
    g = lambda m: {"mean": m, "std": 0.001}  # noqa: E731
    gaps = {"full": {1000: g(0.009), 125: g(-0.0008), 500: g(0.011)}, "pissa": {125: g(0.002), 1000: g(-0.015)},
            "dora": {125: g(0.001)}}
    rep = report.Report(None)
    studies._long_budget_headline(rep, "study_long", "lora", gaps, ["dora", "full", "pissa"])
    assert rep.headlines == [
        "Long budget (study_long), paired gap to lora in points at 125, 500, 1000 steps: "
        "full -0.08 ± 0.10 → +1.10 ± 0.10 → +0.90 ± 0.10 (appears); pissa +0.20 ± 0.10 → – → -1.50 ± 0.10 (reverses); "
        "not yet measured past 125 steps: dora."]


def test_the_long_budget_gives_the_references_own_paired_change_between_consecutive_budgets():
    ok = lambda per_seed: {"status": "ok", "test_per_seed": per_seed}  # noqa: E731
    by_steps = {1000: {"methods": {"lora": ok([0.819, 0.822, 0.815])}}, 125: {"methods": {"lora": ok([0.78, 0.79, 0.79])}},
                500: {"methods": {"lora": ok([0.818, 0.823, 0.831])}}, 250: {"methods": {"lora": {"status": "failed"}}}}
    drift = studies.reference_drift(by_steps, "lora")
    assert list(drift) == [(125, 500), (500, 1000)]  # sorted, the failed budget skipped
    assert drift[(500, 1000)]["differences"] == pytest.approx([0.819 - 0.818, 0.822 - 0.823, 0.815 - 0.831])
    assert drift[(125, 500)]["mean"] == pytest.approx((0.038 + 0.033 + 0.041) / 3)
    assert studies.reference_drift({125: by_steps[125]}, "lora") == {}


def test_by_outcome_groups_names_in_the_order_their_outcomes_first_occur():
    assert studies.by_outcome({"dora": "appears", "lora-sb": "persists", "full": "appears"}) == \
        "appears: dora, full; persists: lora-sb"
    assert studies.by_outcome({}) == ""


def test_a_budgets_rate_check_is_reported_and_a_rate_validation_would_move_makes_its_gaps_provisional():
    check = lambda prefers, **v: {"seed": 0, "metric": "accuracy", "validation": v, "prefers": prefers}  # noqa: E731
    e = lambda lr, **k: {"status": "ok", "mean": 0.8, "std": 0.01, "lr": lr, "lr_from": "x4:m", **k}  # noqa: E731
    f = {"metric": "accuracy", "methods": {"lora": e(2e-3, lr_check=check("0.001", **{"0.001": 0.8407, "0.002": 0.8376})),
                                           "dora": e(1e-3, lr_check=check("0.001", **{"0.0005": 0.82, "0.001": 0.83})),
                                           "full": e(2e-4), "pissa": {"status": "failed"}}}
    assert list(studies.rate_checks(f)) == ["lora", "dora"] and studies.rates_validation_moves(f) == ["lora"]
    rep = report.Report(None)
    studies._long_budget_points(rep, report, {1000: f}, ["lora", "dora", "full"])
    text = "\n".join(rep.lines)
    assert ("Check of those rates at 1000 steps, validation accuracy at seed 0 (the taken rate beside multiples of it; "
            "a check, not a choice): lora 0.001 0.8407, 0.002 0.8376 (prefers 0.001); dora 0.0005 0.8200, 0.001 0.8300 "
            "(prefers 0.001). Validation at this budget prefers another rate than the taken one for lora: the gaps at "
            "1000 steps are provisional until that budget's own grid is run.") in text
    f["methods"]["lora"]["lr_check"]["prefers"] = "0.002"
    rep = report.Report(None)
    studies._long_budget_points(rep, report, {1000: f}, ["lora", "dora"])
    assert "prefers the taken rate for every checked method." in "\n".join(rep.lines)
    g = {"mean": 0.01, "std": 0.001}
    rep = report.Report(None)
    studies._long_budget_headline(rep, "s", "lora", {"dora": {125: g, 1000: g}}, ["dora"], ["lora"])
    assert rep.headlines[0].endswith("(persists); provisional at 1000 steps, where validation prefers another rate "
                                     "than the taken one for lora.")


def test_a_budget_that_chooses_among_its_checked_rates_says_so_and_names_the_methods_whose_rate_moved():
    check = lambda prefers, **v: {"seed": 0, "metric": "accuracy", "validation": v, "prefers": prefers}  # noqa: E731
    e = lambda lr, taken, c: {"status": "ok", "mean": 0.8, "std": 0.01, "lr": lr, "lr_taken": taken,  # noqa: E731
                              "lr_from": "x4:m", "lr_check": c}
    f = {"methods": {"lora": e(1e-3, 2e-3, check("0.001", **{"0.001": 0.8407, "0.002": 0.8376})),
                     "dora": e(2e-3, 2e-3, check("0.002", **{"0.001": 0.8423, "0.002": 0.8439}))}}
    assert studies.rates_validation_moves(f) == []  # each trains at the rate its validation prefers: nothing provisional
    assert studies.rate_sentences(1000, f) == [
        "At 1000 steps each method trains at the rate validation accuracy prefers at seed 0 between the one x4 chose for "
        "it and multiples of it (a grid of a few rates: the compute cut its budget's description states): lora 0.001 "
        "0.8407, 0.002 0.8376 (prefers 0.001); dora 0.001 0.8423, 0.002 0.8439 (prefers 0.002). The rate moved from the "
        "borrowed one for lora."]
    f["methods"]["lora"]["lr"] = 2e-3
    assert studies.rate_sentences(1000, f)[0].endswith("Every method kept the borrowed rate.")
    assert studies.rate_sentences(125, {"methods": {"lora": {"status": "ok", "lr": 1e-3}}}) == []
