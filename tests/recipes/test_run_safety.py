"""A run never loses the user's files, never reports failure as success, and survives kills:
non-destructive exports, NaN stops, one process per run directory, resumable at any instant."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import assets
from lorakit.cli import main
from lorakit.files import RunLock
from lorakit.recipes import checkpoint as ckpt
from lorakit.recipes.rundir import read_metrics


def _train(tmp_path: Path, config: dict, *overrides: str) -> int:
    return main(["train", "--config", str(assets.write_yaml(tmp_path / "config.yaml", config)), "--quiet", *overrides])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("lorakit: error:"), err
    return err


# -- exports never delete -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("finished")
    config = assets.classification_config(tmp, train={"epochs": 1}, output={"plot": False})
    assert _train(tmp, config) == 0
    return tmp / "run"


@pytest.mark.parametrize("fmt", ["peft", "merged"])
def test_export_into_a_non_empty_folder_keeps_the_users_files(finished_run, tmp_path, capsys, fmt):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert main(["export", str(finished_run), "--format", fmt, "--out", str(out)]) == 2
    assert "--overwrite" in _one_line_error(capsys)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main(["export", str(finished_run), "--format", fmt, "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "my notes"
    assert (out / ("adapter_model.safetensors" if fmt == "peft" else "config.json")).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary left beside it


def test_export_to_a_file_path_is_refused_and_the_file_kept(finished_run, tmp_path, capsys):
    target = tmp_path / "adapter.bin"
    target.write_bytes(b"user data")
    assert main(["export", str(finished_run), "--format", "peft", "--out", str(target), "--overwrite"]) == 2
    assert "is a file" in _one_line_error(capsys)
    assert target.read_bytes() == b"user data"


def test_export_into_the_run_directory_refreshes_lorakits_own_folder(finished_run):
    before = (finished_run / "peft" / "adapter_model.safetensors").read_bytes()
    assert main(["export", str(finished_run), "--format", "peft"]) == 0
    assert (finished_run / "peft" / "adapter_model.safetensors").read_bytes() == before


# -- failures are failures ------------------------------------------------------------------------
def test_a_diverging_run_stops_at_the_first_non_finite_step_and_saves_nothing(tmp_path, capsys):
    config = assets.classification_config(tmp_path, adapter={"method": "lora"},
                                          optim={"name": "sgd", "lr": 1e30, "max_grad_norm": None, "warmup_steps": 0},
                                          train={"checkpoint_every": 1})
    assert _train(tmp_path, config) == 2
    err = _one_line_error(capsys)
    assert "training diverged at step" in err
    run_dir = tmp_path / "run"
    step = int(err.split("at step ")[1].split(":")[0])
    assert step >= 2
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "failed" and "diverged" in info["error"]
    assert not (run_dir / "adapter").exists() and not (run_dir / "peft").exists()
    records = read_metrics(run_dir / "metrics.jsonl")  # strict JSON: json.loads would reject NaN only if asked,
    text = (run_dir / "metrics.jsonl").read_text()      # so check the text too
    assert "NaN" not in text and "Infinity" not in text
    assert [r["step"] for r in records if r["type"] == "train"] == list(range(1, step))
    assert ckpt.latest(run_dir).name == f"step-{step - 1:08d}"  # the last good checkpoint is kept
    assert main(["eval", str(run_dir)]) == 2
    assert "training failed" in _one_line_error(capsys)


def test_metrics_log_writes_strict_json(tmp_path):
    from lorakit.recipes.rundir import MetricsLog

    log = MetricsLog(tmp_path / "m.jsonl", None)
    log.write({"type": "train", "step": 1, "loss": float("nan"), "grad_norm": float("inf")})
    line = (tmp_path / "m.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == \
        {"type": "train", "step": 1, "loss": None, "grad_norm": None}


# -- one process per run directory --------------------------------------------------------------------
def test_a_second_run_on_a_locked_directory_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    held = RunLock.acquire(run_dir)  # another lorakit process holds it (flock: per open file, so in-process too)
    try:
        config = assets.classification_config(tmp_path, train={"epochs": 1})
        assert _train(tmp_path, config) == 2
        assert f"in use by another lorakit process (pid {os.getpid()})" in _one_line_error(capsys)
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    finally:
        held.release()


def test_two_runs_racing_for_one_directory(tmp_path):
    from lorakit.errors import LorakitError
    from lorakit.recipes.rundir import create_run_dir

    first = create_run_dir(tmp_path / "run")  # both passed the early check; the first creates and locks
    try:
        with pytest.raises(LorakitError, match="in use by another lorakit process"):
            create_run_dir(tmp_path / "run")
        (tmp_path / "run" / "run.json").write_text("{}")
    finally:
        first.release()
    with pytest.raises(LorakitError, match="already exists"):  # and once it has written, it is a finished directory
        create_run_dir(tmp_path / "run")


def test_default_run_directories_started_in_the_same_second_differ():
    from lorakit.recipes.config import RunConfig
    from lorakit.recipes.rundir import default_run_dir

    cfg = RunConfig()
    names = {default_run_dir(cfg) for _ in range(200)}
    assert len(names) == 200


def test_default_run_directory_never_names_one_that_exists(tmp_path, monkeypatch):
    from lorakit.recipes import rundir
    from lorakit.recipes.config import RunConfig

    draws = iter(["aaaaaa", "aaaaaa", "bbbbbb", "cccccc"])
    monkeypatch.setattr(rundir.secrets, "token_hex", lambda n: next(draws))
    frozen = rundir.datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(rundir, "datetime", type("Frozen", (), {"now": staticmethod(lambda: frozen)}))
    monkeypatch.chdir(tmp_path)
    first = rundir.default_run_dir(RunConfig())
    first.mkdir(parents=True)
    second = rundir.default_run_dir(RunConfig())  # draws "aaaaaa" again (taken on disk), then "bbbbbb"
    assert first.name.endswith("-aaaaaa") and second.name.endswith("-bbbbbb")


# -- resumable whatever happened ------------------------------------------------------------------------
def test_resume_without_any_checkpoint_starts_over_and_matches_an_uninterrupted_run(tmp_path, capsys):
    config = assets.classification_config(tmp_path, adapter={"method": "lora"}, train={"epochs": 1, "checkpoint_every": 50},
                                          output={"peft": False, "plot": False})
    assert _train(tmp_path, config, f"output.dir={tmp_path / 'whole'}") == 0
    with assets.interrupted_at_step(3):
        assert _train(tmp_path, config, f"output.dir={tmp_path / 'cut'}") == 130
    err = capsys.readouterr().err
    assert f"--resume {tmp_path / 'cut'}" in err and "from the start" in err
    assert json.loads((tmp_path / "cut" / "run.json").read_text())["status"] == "interrupted"
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    from safetensors.torch import load_file

    whole, again = (load_file(tmp_path / d / "adapter" / "adapter.safetensors") for d in ("whole", "cut"))
    assert whole.keys() == again.keys() and all(torch.equal(whole[k], again[k]) for k in whole)
    train = lambda d: [r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if r["type"] == "train"]  # noqa: E731
    assert train("whole") == train("cut")


def _write_checkpoints_forever(run_dir: Path) -> None:
    """Child process: checkpoint after every 'step'; every tensor of step k holds the value k."""
    torch.set_num_threads(1)
    from conftest import tiny_bert

    import lorakit

    model = lorakit.adapt(tiny_bert(), lorakit.AdapterConfig(rank=2))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.fill_(float(step))
        position = ckpt.Position(step=step, epoch=0, batch=step, metrics_offset=0)
        ckpt.save_checkpoint(run_dir, model, False, optimizer, scheduler, position)


def test_kill_9_at_random_instants_always_leaves_a_resumable_checkpoint(tmp_path):
    from conftest import tiny_bert

    import lorakit

    rng = random.Random(0)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    last_step = 0
    for instant in range(20):
        pid = os.fork()
        if pid == 0:  # the child never returns to pytest
            try:
                _write_checkpoints_forever(run_dir)
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.05, 0.6))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        found = ckpt.read_state(run_dir)  # also removes the killed write's temporaries
        if found is None:  # only possible if no checkpoint ever completed
            assert last_step == 0
            continue
        directory, state = found
        step = state["position"]["step"]
        assert directory.name == f"step-{step:08d}"
        model = tiny_bert()
        ckpt.load_model_state(directory, model, full=False)  # loads, checksum and all
        for p in model.parameters():
            if p.requires_grad:
                assert torch.all(p == float(step)), (instant, step)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        assert ckpt.restore_training_state(directory, state, optimizer, scheduler).step == step
        leftovers = [p.name for p in (run_dir / ckpt.CHECKPOINT_DIR).iterdir() if not p.name.startswith("step-")]
        assert leftovers == [], leftovers
        last_step = step
    assert last_step > 0
    assert lorakit.adapters_of(model)


def test_cpu_threads_do_not_follow_the_machine_load(monkeypatch):
    from lorakit.recipes import runtime

    counts = set()
    for load in (0.0, 1.5, 7.0):
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        counts.add(runtime.cpu_threads(None))
    assert len(counts) == 1
    assert runtime.cpu_threads(3) == 3


# -- float16 ---------------------------------------------------------------------------------------
def test_float16_trains_with_loss_scaling_and_fp32_factors(tmp_path):
    from lorakit.recipes import loop
    from lorakit.recipes.config import load_config
    from lorakit.recipes.setup import attach, setup

    config = assets.causal_config(tmp_path, adapter={"method": "lora"}, model={"dtype": "float16"})
    cfg = load_config(assets.write_yaml(tmp_path / "c.yaml", config))
    s = setup(cfg)
    attach(s, 0, progress=False)
    opt = loop.Optimization.build(s.model, cfg, loop.Budget(4, 0), s.device)
    assert isinstance(opt.scaler, torch.amp.GradScaler)
    assert all(p.dtype == torch.float32 for p in s.model.parameters() if p.requires_grad)
    assert _train(tmp_path, config, f"output.dir={tmp_path / 'fp16'}", "train.checkpoint_every=2") == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "fp16" / "metrics.jsonl") if r["type"] == "train"]
    assert all(l == l and abs(l) < 1e4 for l in losses) and losses[-1] < losses[0]


def test_float16_full_finetuning_is_refused_before_anything_is_written(tmp_path, capsys):
    config = assets.causal_config(tmp_path, adapter={"method": "full"}, model={"dtype": "float16"})
    assert _train(tmp_path, config) == 2
    assert "model.dtype=bfloat16" in _one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_the_main_job_at_default_settings_gives_identical_numbers_twice(tmp_path):
    """The README's main job (MiniLM + Rotten Tomatoes + LoRA-SB, every default) run twice as a
    user runs it, the second time on a busy machine: the same losses and test metrics bit for bit.
    Only the budget is smaller (steps, split sizes) to keep CI short."""
    import subprocess
    import sys

    budget = ["train.max_steps=6", "data.train_size=256", "data.validation_size=64", "data.test_size=64",
              "output.plot=false", "output.tensorboard=false", "--quiet"]

    def run(name: str) -> tuple[list[float], dict]:
        out = tmp_path / name
        subprocess.run([sys.executable, "-m", "lorakit", "train", f"output.dir={out}", *budget], check=True)
        losses = [m["loss"] for m in read_metrics(out / "metrics.jsonl") if m["type"] == "train"]
        return losses, json.loads((out / "results.json").read_text())["test"]

    quiet = run("quiet")
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(3)]
    try:
        busy = run("busy")
    finally:
        for burner in burners:
            burner.kill()
    assert quiet[0] and quiet == busy
