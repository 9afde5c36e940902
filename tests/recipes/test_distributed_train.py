"""`lorakit train` over several processes (gloo on loopback): N processes × batch b equal one
process on batch N·b, only rank 0 writes, an interrupted run resumes bit-exactly, and a rank
that fails or hangs makes the others stop with a clear error instead of hanging."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from conftest import free_port  # noqa: E402

from lorakit.cli import main  # noqa: E402
from lorakit.errors import LorakitError  # noqa: E402
from lorakit.recipes.rundir import read_metrics  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
ROOT = Path(__file__).resolve().parents[2]


def torchrun(nproc: int, config: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N -m lorakit train ...`, as a user would type it."""
    return launch(nproc, ["train", "--config", str(config), "--quiet", *overrides])


def launch(nproc: int, args: list[str], program: tuple[str, ...] = ("-m", "lorakit"),
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node N <program> <args>` on loopback, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *program, *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def adapter_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter.safetensors")


def max_relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-300)) for k in a)


def train_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]


def deterministic(config: dict) -> dict:
    """float64 and no dropout: the only difference left between the runs is summation order."""
    config["model"]["dtype"] = "float64"
    return config


CASES = {
    # lora-ga: sharded estimation (7 samples: ranks hold 4 + 3) then DDP training; 77 train
    # examples in global batches of 8 leave a last batch of 5 (3 + 2 per rank)
    "classification-lora-ga": dict(
        task="classification", adapter={"method": "lora-ga", "rank": 2, "num_samples": 7},
        data={"train_size": 77}, train={"epochs": 2, "batch_size": 8}, optim={"lr": 1e-2}),
    # causal-lm: the loss is a mean over tokens, so micro-batches are weighted by their token counts;
    # 41 examples in global micro-batches of 4 leave a last one of 1 example: rank 1 holds none
    "causal-lm-lora-sb-accum": dict(
        task="causal-lm", adapter={"method": "lora-sb", "rank": 2, "num_samples": 6},
        data={"train_size": 41}, train={"epochs": 1, "batch_size": 4, "grad_accum": 2}, optim={"lr": 1e-2}),
}


def case_config(tmp_path: Path, case: str) -> dict:
    spec = dict(CASES[case])
    task = spec.pop("task")
    sections = {**spec, "output": {"peft": False, "plot": False}}
    if task == "classification":
        assets.bert_folder(tmp_path / "bert", dropout=0.0)
        return deterministic(assets.classification_config(tmp_path, **sections))
    return deterministic(assets.causal_config(tmp_path, **sections))


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_process_on_the_doubled_batch(tmp_path, case):
    config = case_config(tmp_path, case)
    path = assets.write_yaml(tmp_path / "config.yaml", config)
    batch = config["train"]["batch_size"]
    assert main(["train", "--config", str(path), "--quiet", f"output.dir={tmp_path / 'one'}"]) == 0
    proc = torchrun(2, path, f"output.dir={tmp_path / 'two'}", f"train.batch_size={batch // 2}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = tmp_path / "one", tmp_path / "two"
    assert max_relative_error(adapter_of(two), adapter_of(one)) <= 1e-9
    # rank 0 alone wrote the log: one record per step, the global loss of each step
    # transformers computes the causal-LM loss on float32 logits, even in a float64 model
    tol = 1e-9 if config["task"] == "classification" else 1e-6
    steps_one, steps_two = train_records(one), train_records(two)
    assert [r["step"] for r in steps_two] == [r["step"] for r in steps_one]
    for a, b in zip(steps_two, steps_one):
        assert a["loss"] == pytest.approx(b["loss"], rel=tol)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=tol)
    results_one, results_two = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert results_two["world_size"] == 2 and results_one["world_size"] == 1
    for key, value in results_one["test"].items():  # sharded evaluation, gathered
        assert results_two["test"][key] == pytest.approx(value, rel=tol, abs=1e-12), key
    assert "lorakit: error" not in proc.stderr


# -- resume, in processes launched like torchrun (env://) -------------------------------------
def _resume_worker(rank: int, world: int, port: int, config: str, root: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # the caller's process group is adopted by the recipe (as under accelerate)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        assert main(["train", "--config", config, "--quiet", f"output.dir={root}/whole"]) == 0
        import assets

        with assets.interrupted_at_step(7):  # the checkpoint of step 6 survives
            assert main(["train", "--config", config, "--quiet", f"output.dir={root}/cut"]) == 130
        dist.barrier()
        from lorakit.recipes import checkpoint as ckpt

        state = json.loads((ckpt.latest(Path(f"{root}/cut")) / "state.json").read_text())
        assert state["world_size"] == 2 and state["position"]["step"] == 6, state
        assert main(["train", "--resume", f"{root}/cut", "--quiet"]) == 0
    finally:
        dist.destroy_process_group()


def test_interrupted_two_process_run_resumes_bit_exactly(tmp_path):
    # dropout stays on: each rank's own random state must come back from the checkpoint
    config = assets.classification_config(tmp_path, train={"epochs": 2, "batch_size": 4, "checkpoint_every": 3},
                                          output={"peft": False, "plot": False})
    path = assets.write_yaml(tmp_path / "config.yaml", config)
    mp.spawn(_resume_worker, args=(2, free_port(), str(path), str(tmp_path)), nprocs=2, join=True)

    from lorakit.recipes import checkpoint as ckpt

    state = json.loads((ckpt.latest(tmp_path / "cut") / "state.json").read_text())
    whole, resumed = adapter_of(tmp_path / "whole"), adapter_of(tmp_path / "cut")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
    assert train_records(tmp_path / "whole") == [
        {**r, "examples_per_s": w["examples_per_s"], "tokens_per_s": w["tokens_per_s"]}
        for r, w in zip(train_records(tmp_path / "cut"), train_records(tmp_path / "whole"))]

    # resuming with another number of processes is refused with the right command
    with pytest.raises(LorakitError, match="resume with torchrun --nproc_per_node 2"):
        ckpt.check_world_size(state, 1)


# -- a rank that fails or hangs mid-estimation ---------------------------------------------------
def _estimation_worker(rank: int, port: int, failure: str, timeout: float, out: str) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import batch_for, tiny_llama

    import lorakit

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=timeout))
    model = tiny_llama()
    if rank == 1:
        def fail(*_):
            if failure == "crash":
                raise RuntimeError("simulated device failure on rank 1")
            time.sleep(60)  # alive but not answering

        model.model.layers[0].register_forward_hook(fail)
    start = time.perf_counter()
    try:
        lorakit.adapt(model, lorakit.AdapterConfig(method="lora-ga", rank=2, num_samples=4, estimator="exact"),
                      data=[batch_for("llama", 2, 9, seed=rank + 1)])
        message = "no error"
    except LorakitError as exc:
        message = f"LorakitError: {exc}"
    Path(out).write_text(json.dumps({"message": message, "seconds": time.perf_counter() - start}))
    os._exit(0)  # do not wait for the failed peer in the process group's teardown


@pytest.mark.parametrize("failure", ["crash", "hang"])
def test_a_failing_rank_stops_the_other_with_a_clear_error(tmp_path, failure):
    timeout = 4.0
    ctx = mp.get_context("spawn")
    port, out = free_port(), tmp_path / "rank0.json"
    ranks = [ctx.Process(target=_estimation_worker, args=(r, port, failure, timeout, str(out if r == 0 else tmp_path / "rank1.json")))
             for r in range(2)]
    for p in ranks:
        p.start()
    ranks[0].join(timeout=120)
    for p in ranks:
        if p.is_alive():
            p.terminate()
        p.join()
    report = json.loads(out.read_text())
    assert report["message"].startswith("LorakitError: rank 0: the other processes stopped answering while summing gradient statistics"), report
    assert "\n" not in report["message"]
    assert report["seconds"] < 60  # a hang is cut at the timeout, a crash at once


# -- the recipe's process context, without processes ----------------------------------------------
@pytest.mark.parametrize("n,world", [(0, 2), (1, 2), (7, 2), (10, 3), (5, 8)])
def test_shards_partition_the_items_in_order(n, world):
    from lorakit.recipes.distributed import Context

    items = list(range(n))
    shards = [Context(rank=r, world=world).shard(items) for r in range(world)]
    assert [x for s in shards for x in s] == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_a_half_set_launcher_environment_is_a_clear_error(monkeypatch):
    from lorakit.recipes.distributed import start

    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(LorakitError, match="RANK, MASTER_ADDR, MASTER_PORT not set; launch with torchrun --nproc_per_node 2"):
        start("cpu", 5.0)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(LorakitError, match="WORLD_SIZE='two' is not a number"):
        start("cpu", 5.0)
