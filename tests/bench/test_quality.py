"""The quality runner's bookkeeping: finished runs are reused only for the same spec, and
--resume keeps an earlier sitting's methods only when it ran the same experiment."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import quality  # noqa: E402

SPEC = {"task": "classification", "optim": {"lr": 1e-3}, "train": {"seed": 0}, "output": {"peft": False}}


def finished_run(run_dir: Path, spec: dict, accuracy: float) -> None:
    run_dir.mkdir(parents=True)
    (run_dir.parent / f"{run_dir.name}.spec.json").write_text(json.dumps({**spec, "output": {**spec["output"], "dir": "elsewhere"}}))
    (run_dir / "results.json").write_text(json.dumps({"test": {"accuracy": accuracy}}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1, "loss": 0.5}) + "\n")


def test_a_finished_run_of_the_same_spec_is_read_back_not_retrained(tmp_path, monkeypatch):
    finished_run(tmp_path / "lora-lr0.001-seed0", SPEC, 0.8)
    monkeypatch.setattr(quality.subprocess, "run", lambda *a, **k: pytest.fail("retrained a finished run"))
    result = quality.launch("single", SPEC, tmp_path / "lora-lr0.001-seed0")
    assert result["test"] == {"accuracy": 0.8} and result["train_loss"] == [0.5]


def test_a_run_with_another_spec_is_trained_again(tmp_path, monkeypatch):
    finished_run(tmp_path / "lora-lr0.001-seed0", SPEC, 0.8)
    calls = []

    def fake_training(command, **kwargs):
        calls.append(command)
        run_dir = tmp_path / "lora-lr0.001-seed0"
        assert not run_dir.exists()  # the stale run was removed first
        finished_run(run_dir, json.loads(Path(command[-1]).read_text()), 0.7)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(quality.subprocess, "run", fake_training)
    changed = {**SPEC, "optim": {"lr": 2e-3}}
    assert quality.launch("single", changed, tmp_path / "lora-lr0.001-seed0")["test"]["accuracy"] == 0.7
    assert len(calls) == 1
    assert quality.same_run({**SPEC, "output": {"dir": "a", "peft": False}}, {**SPEC, "output": {"dir": "b", "peft": False}})


def test_resume_keeps_finished_methods_of_the_same_experiment_only(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    figures = {"budget": "full", "seeds": [0, 1, 2], "lr_search": True, "base_config": SPEC, "workdir": "w2", "methods": {}}
    earlier = {**figures, "workdir": "w1", "elapsed_seconds": 100.0,
               "methods": {"lora": {"status": "ok", "mean": 0.8}, "dora": {"status": "failed", "error": "x"}}}
    (tmp_path / "exp.json").write_text(json.dumps({"figures": earlier, "environment": {"command": "python first.py"}}))
    assert quality.resume_from("exp", figures) == 100.0
    assert list(figures["methods"]) == ["lora"] and figures["sittings"] == ["w1", "w2"]
    assert figures["commands"] == ["python first.py", quality.this_command()]  # every sitting's command, in order

    other = {**figures, "methods": {}, "seeds": [0]}
    with pytest.raises(SystemExit, match="another seeds"):
        quality.resume_from("exp", other)


def test_gather_reads_finished_runs_and_leaves_unfinished_methods_out(tmp_path, monkeypatch, capsys):
    """`--gather` trains nothing: a method with every run finished is summarised, the others are left out."""
    config = tmp_path / "exp.yaml"
    config.write_text(json.dumps({
        "name": "exp", "base": {"task": "classification", "train": {}},
        "budgets": {"b": {"seeds": [0], "lr_search": False}},
        "methods": {"lora": {"lr": 1e-3}, "dora": {"lr": 1e-3}}}))
    workdir = tmp_path / "runs"
    spec = {"task": "classification", "train": {"seed": 0}, "optim": {"lr": 1e-3}, "output": {}}
    finished_run(workdir / "exp_b" / "lora-lr0.001-seed0", spec, 0.8)
    (workdir / "exp_b" / "lora-lr0.001-seed0" / "results.json").write_text(json.dumps(
        {"test": {"accuracy": 0.8}, "trainable_params": 10, "total_params": 100, "init_seconds": 1.0,
         "train_seconds": 2.0, "peak_memory_mb": 3.0, "steps": 1}))
    monkeypatch.setattr(quality, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(quality, "write_result", lambda name, figures, status: saved.update(name=name, figures=figures, status=status))
    monkeypatch.setattr(quality.subprocess, "run", lambda *a, **k: pytest.fail("--gather trained a run"))
    saved: dict = {}
    monkeypatch.setattr(sys, "argv", ["quality.py", "--config", str(config), "--budget", "b", "--workdir", str(workdir), "--gather"])
    quality.main()
    assert saved["status"] == "partial" and list(saved["figures"]["methods"]) == ["lora"]
    assert saved["figures"]["methods"]["lora"]["mean"] == 0.8
    assert saved["figures"]["gathered"] is True and saved["figures"]["elapsed_seconds"] is None
    assert "dora: not finished yet" in capsys.readouterr().out
    # no run time recorded for this run (no .wall file): the method is named as untimed, not counted as 0 s
    assert saved["figures"]["methods"]["lora"]["run_seconds"] is None
    assert saved["figures"]["methods_without_run_time"] == ["lora"] and saved["figures"]["run_count"] == 0
    # a gathered result (elapsed_seconds None) can itself be resumed, by another gather or a training sitting
    # the gather recorded the finished run it read in the ledger, for a sitting on a machine without runs/
    assert json.loads((tmp_path / "results" / "runs" / "exp_b" / "lora-lr0.001-seed0.json").read_text())["result"]["test"] == {"accuracy": 0.8}
    (tmp_path / "results" / "exp_b.json").write_text(json.dumps({"status": saved["status"], "figures": saved["figures"]}))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--config", str(config), "--budget", "b", "--workdir", str(workdir),
                                      "--gather", "--resume"])
    quality.main()
    assert list(saved["figures"]["methods"]) == ["lora"] and saved["figures"]["methods"]["lora"]["mean"] == 0.8
    assert "resuming" in capsys.readouterr().out


def test_lr_search_widens_the_grid_past_an_edge_until_the_best_is_inside():
    curve = {2.5e-4: 0.70, 5e-4: 0.74, 1e-3: 0.78, 2e-3: 0.80, 4e-3: 0.79}  # peak at 2e-3, past the grid's top
    tried = []

    def validation_at(lr):
        tried.append(lr)
        return curve[lr]

    lr, scores, added = quality.search_lr([1e-3, 5e-4, 2.5e-4], validation_at, "max", extend=3)
    assert added == [2e-3, 4e-3] and lr == 2e-3  # stopped once the best (2e-3) had a worse rate past it
    assert list(scores) == sorted(scores) and len(tried) == len(set(tried)) == 5
    assert lr == max(scores, key=scores.get)
    # without extension the edge choice stands; the extension count is a hard limit
    assert quality.search_lr([2.5e-4, 5e-4, 1e-3], curve.__getitem__, "max", extend=0)[0] == 1e-3
    assert quality.search_lr([2.5e-4, 5e-4, 1e-3], curve.__getitem__, "max", extend=1)[2] == [2e-3]


def test_lr_search_widens_downwards_with_the_lower_edges_ratio_and_minimises_when_asked():
    losses = {1e-2: 0.30, 2e-2: 0.40, 4e-2: 0.50, 5e-3: 0.35}
    lr, scores, added = quality.search_lr([1e-2, 2e-2, 4e-2], losses.__getitem__, "min", extend=2)
    assert added == [5e-3] and lr == 1e-2 and len(scores) == 4


def test_an_extended_grid_is_trained_at_the_first_seed_once_and_recorded(tmp_path, monkeypatch):
    config = tmp_path / "exp.yaml"
    config.write_text(json.dumps({
        "name": "exp", "base": {"task": "classification", "train": {}},
        "budgets": {"b": {"seeds": [0, 1], "lr_search": True, "extend_grid": 2}},
        "methods": {"lora": {"lr": 1e-3, "grid": [5e-4, 1e-3]}}}))
    validation = {5e-4: 0.6, 1e-3: 0.7, 2e-3: 0.8, 4e-3: 0.75}
    launched = []

    def fake_launch(mode, cfg, run_dir, gather=False, ledger=None):
        lr, seed = cfg["optim"]["lr"], cfg["train"]["seed"]
        launched.append((lr, seed))
        return {"test": {"accuracy": validation[lr] + seed / 100}, "validation": {"accuracy": validation[lr]},
                "trainable_params": 10, "total_params": 100, "init_seconds": 1.0, "train_seconds": 2.0,
                "peak_memory_mb": 3.0, "steps": 1, "train_loss": [0.5]}

    saved: dict = {}
    monkeypatch.setattr(quality, "launch", fake_launch)
    monkeypatch.setattr(quality, "write_result", lambda name, figures, status: saved.update(figures=figures, status=status))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--config", str(config), "--budget", "b", "--workdir", str(tmp_path)])
    quality.main()
    entry = saved["figures"]["methods"]["lora"]
    assert sorted(launched) == [(5e-4, 0), (1e-3, 0), (2e-3, 0), (2e-3, 1), (4e-3, 0)]  # (2e-3, seed 0) reused
    assert entry["lr"] == 2e-3 and entry["lr_grid_extended"] == ["0.002", "0.004"]
    assert entry["lr_grid"] == {"0.0005": 0.6, "0.001": 0.7, "0.002": 0.8, "0.004": 0.75}
    assert entry["test_per_seed"] == [0.8, 0.81] and saved["figures"]["extend_grid"] == 2


@pytest.mark.parametrize("task, metric", [("multiple-choice", "accuracy"), ("causal-lm", "exact_match"),
                                          ("classification", "accuracy")])
def test_the_summarised_metric_follows_the_task(tmp_path, monkeypatch, task, metric):
    """Multiple choice is scored by accuracy (its runs have no exact_match); causal-LM by exact match."""
    config = tmp_path / "exp.yaml"
    config.write_text(json.dumps({"name": "exp", "base": {"task": task, "train": {}},
                                  "budgets": {"b": {"seeds": [0], "lr_search": False}}, "methods": {"lora": {"lr": 1e-3}}}))
    workdir = tmp_path / "runs"
    spec = {"task": task, "train": {"seed": 0}, "optim": {"lr": 1e-3}, "output": {}}
    finished_run(workdir / "exp_b" / "lora-lr0.001-seed0", spec, 0.0)
    test = {"accuracy": 0.6, "accuracy_norm": 0.5} if metric == "accuracy" else {"exact_match": 0.3, "loss": 1.0}
    (workdir / "exp_b" / "lora-lr0.001-seed0" / "results.json").write_text(json.dumps(
        {"test": test, "trainable_params": 10, "total_params": 100, "init_seconds": 1.0, "train_seconds": 2.0,
         "peak_memory_mb": 3.0, "steps": 1}))
    saved: dict = {}
    monkeypatch.setattr(quality, "RESULTS", tmp_path / "results")  # the run ledger goes there, not into bench/results
    monkeypatch.setattr(quality, "write_result", lambda name, figures, status: saved.update(figures=figures, status=status))
    monkeypatch.setattr(quality.subprocess, "run", lambda *a, **k: pytest.fail("--gather trained a run"))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--config", str(config), "--budget", "b", "--workdir", str(workdir), "--gather"])
    quality.main()
    entry = saved["figures"]["methods"]["lora"]
    assert saved["figures"]["metric"] == metric and entry["status"] == "ok" and entry["mean"] == test[metric]
    assert entry["test_other_mean"] == {k: v for k, v in test.items() if k != metric}


def test_the_baseline_writes_the_base_models_generations_and_its_scores(tmp_path, monkeypatch):
    """The 'before' row keeps the base model's first test generations (samples.jsonl, as a trained run
    does) next to its test metrics, so what the untouched model says can be read."""
    import lorakit.recipes.evaluation as evaluation
    import lorakit.recipes.setup as setup_module

    samples = [{"prompt": "<|im_start|>user\n2 + 3 =", "generation": "The answer is 5.", "reference": "5", "correct": False},
               {"prompt": "<|im_start|>user\n7 - 9 =", "generation": "-2", "reference": "-2", "correct": True}]

    class FakeSetup:
        model = type("M", (), {"eval": lambda self: None})()
        samples: dict = {}

    def fake_evaluate(s, split, progress=True):
        s.samples[split] = samples
        return {"exact_match": 0.5, "loss": 1.25}

    monkeypatch.setattr(setup_module, "setup", lambda cfg: FakeSetup())
    monkeypatch.setattr(evaluation, "evaluate", fake_evaluate)
    out = tmp_path / "baseline"
    spec = tmp_path / "baseline.spec.json"
    spec.write_text(json.dumps({"task": "causal-lm", "model": {"name": "tiny"}, "data": {"source": "x.jsonl"},
                                "output": {"dir": str(out)}}))
    quality.baseline(str(spec))
    written = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert written == samples
    assert json.loads((out / "results.json").read_text())["test"] == {"exact_match": 0.5, "loss": 1.25}


def test_gather_sums_every_runs_own_wall_time_and_names_the_runners_commands(tmp_path, monkeypatch):
    """A gathered study's compute is its runs' recorded wall times (grid runs included, each run once), and its
    commands are those of the runner results in bench/results/parts/ of the same experiment and budget, then the
    gather's own; another experiment's runner is not named."""
    config = tmp_path / "exp.yaml"
    config.write_text(json.dumps({
        "name": "exp", "base": {"task": "classification", "train": {}},
        "budgets": {"b": {"seeds": [0, 1], "lr_search": True}},
        "methods": {"lora": {"lr": 1e-3, "grid": [1e-3, 2e-3]}}}))
    workdir = tmp_path / "runs" / "exp_b"
    walls = {(1e-3, 0): 10.0, (2e-3, 0): 20.0, (2e-3, 1): 40.0}
    for (lr, seed), wall in walls.items():
        spec = {"task": "classification", "train": {"seed": seed}, "optim": {"lr": lr}, "output": {}}
        run = workdir / f"lora-lr{lr:g}-seed{seed}"
        finished_run(run, spec, 0.8)
        (run / "results.json").write_text(json.dumps(
            {"test": {"accuracy": 0.8}, "trainable_params": 10, "total_params": 100, "train_seconds": 1.0, "steps": 1}))
        (run / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1, "loss": 0.5}) + "\n"
                                           + json.dumps({"type": "eval", "split": "validation", "accuracy": lr}) + "\n")
        (workdir / f"{run.name}.wall").write_text(f"{wall}\n")
    parts = tmp_path / "results" / "parts"
    parts.mkdir(parents=True)
    for name, experiment, command in [("a", "exp", "python runner-a"), ("z", "other", "python other")]:
        (parts / f"{name}.json").write_text(json.dumps(
            {"figures": {"experiment": experiment, "budget": "b", "commands": [command]}}))
    monkeypatch.setattr(quality, "RESULTS", tmp_path / "results")
    saved: dict = {}
    monkeypatch.setattr(quality, "write_result", lambda name, figures, status: saved.update(figures=figures))
    monkeypatch.setattr(quality.subprocess, "run", lambda *a, **k: pytest.fail("--gather trained a run"))
    monkeypatch.setattr(sys, "argv", ["quality.py", "--config", str(config), "--budget", "b", "--workdir",
                                      str(tmp_path / "runs"), "--gather"])
    quality.main()
    lora = saved["figures"]["methods"]["lora"]
    assert lora["lr"] == 2e-3 and lora["run_count"] == 3 and lora["run_seconds"] == sum(walls.values())
    assert lora["wall_seconds"] == sum(walls.values())  # not the gather's own instant
    assert saved["figures"]["run_count"] == 3 and saved["figures"]["run_seconds"] == 70.0
    assert saved["figures"]["commands"] == ["python runner-a", quality.this_command()]


def test_a_runners_result_name_with_a_folder_is_written_on_a_fresh_checkout(tmp_path, monkeypatch):
    import common
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")  # no results/ and no parts/ yet
    path = common.write_result("parts/frontier_s_a", {"methods": {}}, status="partial")
    assert path == tmp_path / "results" / "parts" / "frontier_s_a.json"
    assert json.loads(path.read_text())["status"] == "partial"
    assert [p.name for p in path.parent.iterdir()] == ["frontier_s_a.json"]  # the temporary file renamed away


def test_a_run_recorded_in_the_ledger_is_not_trained_again_when_its_run_directory_is_gone(tmp_path, monkeypatch):
    """A later sitting on a fresh machine: runs/ is gone, the committed ledger holds the finished run."""
    calls = []

    def fake_training(command, **kwargs):
        calls.append(command)
        run_spec = json.loads(Path(command[-1]).read_text())
        finished_run(Path(run_spec["output"]["dir"]), run_spec, 0.7 + 0.01 * len(calls))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(quality.subprocess, "run", fake_training)
    ledger = tmp_path / "results" / "runs" / "exp_full"
    first = quality.launch("single", SPEC, tmp_path / "machine1" / "lora-lr0.001-seed0", ledger=ledger)
    assert len(calls) == 1 and (ledger / "lora-lr0.001-seed0.json").is_file()
    assert [p.name for p in ledger.iterdir()] == ["lora-lr0.001-seed0.json"]  # no temporary sibling left behind

    # another machine (another run directory root, nothing in it): read back from the ledger, equal to the first
    again = quality.launch("single", SPEC, tmp_path / "machine2" / "lora-lr0.001-seed0", ledger=ledger)
    assert len(calls) == 1 and again == first and again["test"]["accuracy"] == 0.71
    # a gathering pass finds it too, instead of calling it unfinished
    assert quality.launch("single", SPEC, tmp_path / "machine3" / "lora-lr0.001-seed0", gather=True, ledger=ledger) == first
    # another spec under the same name is trained, and its record replaces the stale one
    changed = {**SPEC, "optim": {"lr": 2e-3}}
    assert quality.launch("single", changed, tmp_path / "machine2" / "lora-lr0.001-seed0", ledger=ledger)["test"]["accuracy"] == 0.72
    assert len(calls) == 2
    assert json.loads((ledger / "lora-lr0.001-seed0.json").read_text())["spec"]["optim"] == {"lr": 2e-3}
    with pytest.raises(quality.NotFinished):  # without the ledger, a fresh machine has nothing to gather
        quality.launch("single", SPEC, tmp_path / "machine4" / "lora-lr0.001-seed0", gather=True)


def test_a_config_path_that_does_not_exist_is_one_line_naming_where_the_configs_are(tmp_path):
    with pytest.raises(SystemExit, match=r"nope\.yaml: no such experiment config; the configs are bench/configs/\*\.yaml"):
        quality.load(tmp_path / "nope.yaml", "x4")


def test_lr_check_trains_each_factor_of_the_taken_rate_at_the_first_seed_and_names_the_rate_validation_prefers(
        monkeypatch, tmp_path):
    """A budget taking its rate from another result (lr_from) with lr_check: the seeds train at the taken rate,
    the check's runs only at the first seed, their validation beside the taken rate's, counted in the runner time."""
    validation = {2e-3: 0.83, 1e-3: 0.84, 4e-3: 0.60}
    launched = []

    def fake_launch(mode, cfg, run_dir, gather=False, ledger=None):
        lr, seed = cfg["optim"]["lr"], cfg["train"]["seed"]
        launched.append((lr, seed, run_dir.name))
        return {"test": {"accuracy": 0.8 + seed / 100}, "validation": {"accuracy": validation[lr]}, "validation_curve": [],
                "trainable_params": 10, "total_params": 100, "init_seconds": 1.0, "train_seconds": 2.0,
                "peak_memory_mb": 3.0, "steps": 4, "train_loss": [0.5] * 4, "wall_seconds": 10.0}

    monkeypatch.setattr(quality, "launch", fake_launch)
    chosen = {"lr": 2e-3, "lr_grid": {"0.002": 0.8}, "lr_from": "x4:lora"}
    method = {"lr": 2e-3, "lr_search": False, "chosen": chosen}
    ex = quality.Experiment({"lr_search": True, "lr_check": [0.5, 2]}, [0, 1, 2], {"metric": "accuracy", "mode": "max"},
                            "accuracy", tmp_path, False)
    entry = quality.train_method("lora", method, {"optim": {}, "train": {}}, ex)
    assert [x[:2] for x in launched] == [(2e-3, 0), (1e-3, 0), (4e-3, 0), (2e-3, 1), (2e-3, 2)]
    assert launched[1][2] == "lora-lr0.001-seed0"  # the run a grid at this budget would name the same way
    assert entry["lr"] == 2e-3 and entry["test_per_seed"] == pytest.approx([0.80, 0.81, 0.82])
    assert entry["lr_check"] == {"seed": 0, "metric": "accuracy", "prefers": "0.001",
                                 "validation": {"0.001": 0.84, "0.002": 0.83, "0.004": 0.60}}
    assert entry["run_count"] == 5 and entry["run_seconds"] == pytest.approx(50.0)
    assert "lr_taken" not in entry
    # lr_check_choose: the check is the budget's grid; the seeds train at the rate validation prefers, seed 0 reused
    launched.clear()
    chose = quality.train_method("lora", method, {"optim": {}, "train": {}},
                                 ex._replace(budget={**ex.budget, "lr_check_choose": True}))
    assert [x[:2] for x in launched] == [(2e-3, 0), (1e-3, 0), (4e-3, 0), (1e-3, 1), (1e-3, 2)]
    assert chose["lr"] == 1e-3 and chose["lr_taken"] == 2e-3 and chose["lr_from"] == "x4:lora"
    assert chose["lr_check"] == entry["lr_check"] and chose["run_count"] == 5
    for bad in ([1], [0], "0.5"):
        with pytest.raises(ValueError, match="lr_check"):
            quality.train_method("lora", method, {"optim": {}, "train": {}}, ex._replace(budget={"lr_check": bad}))
    # without lr_from (a budget choosing on its own grid) there is nothing to check
    plain = quality.train_method("lora", {"lr": 2e-3}, {"optim": {}, "train": {}}, ex._replace(budget={"lr_check": [0.5]}))
    assert "lr_check" not in plain
