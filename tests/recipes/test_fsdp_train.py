"""`lorakit train` with train.parallel=fsdp (FSDP2, 2 gloo processes on loopback): the model is
sharded over the processes, and N sharded processes × batch b train the same adapter as one
unsharded process on batch N·b."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from conftest import free_port  # noqa: E402
from test_distributed_train import _resume_worker, adapter_of, launch, max_relative_error, torchrun, train_records  # noqa: E402

from lorakit.cli import main  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

# (adapter, model dtype, tolerance): float32 and no dropout, the runs differ only in summation order
# (FSDP2's reduce-scatter of the halves, the estimate's all-reduce); lora-ga's SVD of an fp32 G turns
# those roundings into 4e-6 of its factors (measured), so it runs in float64
ADAPTERS = {
    "lora": ({"method": "lora", "rank": 2}, "float32", 1e-6),
    "dora": ({"method": "dora", "rank": 2}, "float32", 1e-6),
    "lora-sb": ({"method": "lora-sb", "rank": 2, "num_samples": 6}, "float32", 1e-6),
    # moves the base weight: W − s·B₀A₀ written to each shard
    "lora-ga": ({"method": "lora-ga", "rank": 2, "num_samples": 6}, "float64", 1e-9),
    # activations recomputed inside each sharded block's backward (train.gradient_checkpointing, both runs)
    "lora-checkpointing": ({"method": "lora", "rank": 2}, "float32", 1e-6),
}


@pytest.mark.parametrize("method", list(ADAPTERS))
def test_fsdp_two_processes_equal_one_process_on_the_doubled_batch(tmp_path, method):
    adapter, dtype, tol = ADAPTERS[method]
    config = assets.causal_config(tmp_path, adapter=adapter, model={"dtype": dtype}, data={"train_size": 24},
                                  train={"epochs": 1, "max_steps": 3, "batch_size": 8,
                                         "gradient_checkpointing": method.endswith("checkpointing")},
                                  eval={"max_new_tokens": 2}, output={"peft": False, "plot": False})
    path = assets.write_yaml(tmp_path / "config.yaml", config)
    assert main(["train", "--config", str(path), "--quiet", f"output.dir={tmp_path / 'one'}"]) == 0
    proc = torchrun(2, path, f"output.dir={tmp_path / 'two'}", "train.batch_size=4", "train.parallel=fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = adapter_of(tmp_path / "one"), adapter_of(tmp_path / "two")
    assert max_relative_error(two, one) <= tol
    steps_one, steps_two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert [r["step"] for r in steps_two] == [r["step"] for r in steps_one] == [1, 2, 3]
    for a, b in zip(steps_two, steps_one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # evaluation with the sharded model (every process runs the whole split, generation in step)
    results_one, results_two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert results_two["world_size"] == 2 and set(results_two["test"]) == set(results_one["test"])
    for key, value in results_one["test"].items():
        assert results_two["test"][key] == pytest.approx(value, rel=1e-5, abs=1e-12), key


def test_interrupted_fsdp_run_resumes_bit_exactly(tmp_path):
    """Both processes stop at step 7 (the checkpoint of step 6 survives) and resume sharded."""
    config = assets.classification_config(tmp_path, train={"epochs": 2, "batch_size": 4, "checkpoint_every": 3,
                                                           "parallel": "fsdp"},
                                          output={"peft": False, "plot": False})
    path = assets.write_yaml(tmp_path / "config.yaml", config)
    mp.spawn(_resume_worker, args=(2, free_port(), str(path), str(tmp_path)), nprocs=2, join=True)

    whole, resumed = adapter_of(tmp_path / "whole"), adapter_of(tmp_path / "cut")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert [r["loss"] for r in train_records(tmp_path / "whole")] == [r["loss"] for r in train_records(tmp_path / "cut")]


def test_fsdp_run_resumes_bit_exactly_after_kill_9_of_one_rank(tmp_path):
    """Rank 1 is SIGKILLed at step 8 (after the checkpoint of step 6); torchrun stops the run; the
    resumed run ends with the adapter and the losses of an uninterrupted run (one thread per process)."""
    # adapter dropout on: each rank's random stream must come back from the checkpoint
    config = assets.causal_config(tmp_path, adapter={"method": "lora-sb", "rank": 2, "num_samples": 4, "dropout": 0.1},
                                  data={"train_size": 40}, eval={"max_new_tokens": 2},
                                  train={"max_steps": 10, "batch_size": 2, "checkpoint_every": 3, "parallel": "fsdp"},
                                  output={"peft": False, "plot": False})
    path = assets.write_yaml(tmp_path / "config.yaml", config)
    worker = ("tests/recipes/fsdp_kill_worker.py",)
    whole = launch(2, ["train", "--config", str(path), "--quiet", f"output.dir={tmp_path / 'whole'}"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = launch(2, ["train", "--config", str(path), "--quiet", f"output.dir={tmp_path / 'cut'}"], worker,
                 env={"KILL_RANK": "1", "KILL_AT_STEP": "8"})
    assert cut.returncode != 0
    from lorakit.recipes import checkpoint as ckpt

    assert ckpt.latest(tmp_path / "cut").name == "step-00000006"
    resumed = launch(2, ["train", "--resume", str(tmp_path / "cut"), "--quiet"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = adapter_of(tmp_path / "whole"), adapter_of(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in train_records(tmp_path / "whole")] == [r["loss"] for r in train_records(tmp_path / "cut")]


# -- a rank killed (SIGKILL) mid-run: the survivor stops with one line instead of waiting ------------
def _killed_rank_worker(rank: int, port: int, config: str, stage: str, timeout: float, out: str) -> None:
    import contextlib
    import io
    import json
    import os
    import signal
    import time
    from datetime import timedelta

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=timeout))
    if rank == 1:
        estimation = sys.modules["lorakit.estimate"]  # (lorakit.estimate is also the function's name)

        def die(*_args, **_kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        if stage == "estimation":
            estimation.run_pass = die  # the first pass over the estimation examples
        else:  # the second step's backward, where FSDP2 reduce-scatters the gradients
            from lorakit.recipes.loop import Optimization

            calls = {"n": 0}
            real_backward = Optimization.backward

            def backward(self, loss):
                calls["n"] += 1
                if calls["n"] == 2:
                    die()
                return real_backward(self, loss)

            Optimization.backward = backward
    err, start = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err):
        code = main(["train", "--config", config, "--quiet"])
    Path(out).write_text(json.dumps({"code": code, "stderr": err.getvalue(), "seconds": time.perf_counter() - start}))
    os._exit(0)  # do not wait for the dead peer in the process group's teardown


@pytest.mark.parametrize("stage", ["estimation", "training"])
def test_a_killed_rank_stops_the_other_with_one_line(tmp_path, stage):
    timeout = 10.0
    config = assets.causal_config(tmp_path, adapter={"method": "lora-sb", "rank": 2, "num_samples": 4},
                                  data={"train_size": 24}, train={"max_steps": 4, "batch_size": 4, "parallel": "fsdp",
                                                                  "dist_timeout": timeout},
                                  output={"peft": False, "plot": False})
    path = assets.write_yaml(tmp_path / "config.yaml", config)
    ctx = mp.get_context("spawn")
    port, out = free_port(), tmp_path / "rank0.json"
    ranks = [ctx.Process(target=_killed_rank_worker, args=(r, port, str(path), stage, timeout, str(tmp_path / f"rank{r}.json")))
             for r in range(2)]
    for p in ranks:
        p.start()
    ranks[0].join(timeout=timeout + 60)
    for p in ranks:
        if p.is_alive():
            p.terminate()
        p.join()
    report = json.loads(out.read_text())
    assert report["code"] == 2
    lines = report["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorakit: error: rank 0: the other processes stopped answering while "), lines
    assert ("estimating" if stage == "estimation" else "training") in lines[0]
    assert report["seconds"] < timeout + 30
    assert not (tmp_path / "run" / "adapter").exists()  # nothing half written


def test_an_accelerate_fsdp_config_without_train_parallel_fsdp_is_one_line(tmp_path, monkeypatch, capsys):
    # `accelerate launch --use_fsdp` (or an FSDP config file) sets ACCELERATE_USE_FSDP; lorakit's own loop
    # shards only with train.parallel=fsdp, so the mismatch is refused before any work
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    path = assets.write_yaml(tmp_path / "config.yaml", assets.classification_config(tmp_path))
    capsys.readouterr()  # the tiny model's save_pretrained progress bar
    assert main(["train", "--config", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lorakit: error: accelerate launch was given an FSDP config but train.parallel is ddp; "
                   "add train.parallel=fsdp (lorakit shards with FSDP2 itself)"]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override,message", [
    ({"adapter": {"method": "full"}}, "train.parallel=fsdp trains adapters; full fine-tuning"),
    ({"optim": {"preconditioner": "riemannian"}}, "optim.preconditioner=riemannian is not supported with train.parallel=fsdp"),
])
def test_what_fsdp_does_not_do_is_refused_before_any_work(tmp_path, override, message):
    from lorakit.errors import LorakitError
    from lorakit.recipes.config import deep_merge, from_dict
    from lorakit.recipes.distributed import Context
    from lorakit.recipes.fsdp import check_config

    cfg = from_dict(deep_merge(assets.classification_config(tmp_path, train={"parallel": "fsdp"}), override))
    check_config(cfg, Context())  # one process: nothing to shard, nothing refused
    with pytest.raises(LorakitError, match=message):
        check_config(cfg, Context(rank=0, world=2))
