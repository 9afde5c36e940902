"""`lorakit train` with train.parallel=fsdp (FSDP2, 2 gloo processes on loopback): the model is
sharded over the processes, and N sharded processes × batch b train the same adapter as one
unsharded process on batch N·b."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import assets  # noqa: E402
from conftest import free_port  # noqa: E402
from test_distributed_train import _resume_worker, adapter_of, max_relative_error, torchrun, train_records  # noqa: E402

from lorakit.cli import main  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

ADAPTERS = {
    "lora": {"method": "lora", "rank": 2},
    "dora": {"method": "dora", "rank": 2},
    "lora-sb": {"method": "lora-sb", "rank": 2, "num_samples": 6},
}


@pytest.mark.parametrize("method", list(ADAPTERS))
def test_fsdp_two_processes_equal_one_process_on_the_doubled_batch(tmp_path, method):
    # float32, no dropout: the runs differ only in summation order (FSDP2's reduce-scatter of the halves)
    config = assets.causal_config(tmp_path, adapter=ADAPTERS[method], data={"train_size": 24},
                                  train={"epochs": 1, "max_steps": 3, "batch_size": 8},
                                  eval={"max_new_tokens": 2}, output={"peft": False, "plot": False})
    path = assets.write_yaml(tmp_path / "config.yaml", config)
    assert main(["train", "--config", str(path), "--quiet", f"output.dir={tmp_path / 'one'}"]) == 0
    proc = torchrun(2, path, f"output.dir={tmp_path / 'two'}", "train.batch_size=4", "train.parallel=fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = adapter_of(tmp_path / "one"), adapter_of(tmp_path / "two")
    assert max_relative_error(two, one) <= 1e-6
    steps_one, steps_two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert [r["step"] for r in steps_two] == [r["step"] for r in steps_one] == [1, 2, 3]
    for a, b in zip(steps_two, steps_one):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


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
