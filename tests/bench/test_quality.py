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
    (tmp_path / "exp.json").write_text(json.dumps({"figures": earlier}))
    assert quality.resume_from("exp", figures) == 100.0
    assert list(figures["methods"]) == ["lora"] and figures["sittings"] == ["w1", "w2"]

    other = {**figures, "methods": {}, "seeds": [0]}
    with pytest.raises(SystemExit, match="another seeds"):
        quality.resume_from("exp", other)
