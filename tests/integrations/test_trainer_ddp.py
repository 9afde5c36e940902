"""transformers.Trainer under torchrun (2 gloo processes): prepare() estimates lora-ga on each
process's shard of the Trainer's dataloader, all-reduces, and every rank gets the same adapter,
which stays identical through DDP training."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import free_port
from safetensors.torch import load_file

WORKER = Path(__file__).resolve().parent / "trainer_ddp_worker.py"
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_prepare_under_torchrun_gives_every_rank_the_same_adapter(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(WORKER), str(tmp_path)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(tmp_path / f"world-rank{r}.txt").read_text() for r in range(2)] == ["2", "2"]
    first = [load_file(tmp_path / f"first-batch-rank{r}.safetensors")["input_ids"] for r in range(2)]
    assert not torch.equal(first[0], first[1])  # the Trainer's dataloader is sharded per process
    init = [load_file(tmp_path / f"init-rank{r}.safetensors") for r in range(2)]
    trained = [load_file(tmp_path / f"trained-rank{r}.safetensors") for r in range(2)]
    assert init[0].keys() == init[1].keys() and any(".B" in k or "lora_B" in k or k.endswith("B") for k in init[0])
    for key in init[0]:
        # ranks estimated on different shards: only the all-reduce makes these equal
        assert torch.equal(init[0][key], init[1][key]), key
        assert torch.equal(trained[0][key], trained[1][key]), key
    assert any(not torch.equal(init[0][k], trained[0][k]) for k in init[0])  # training moved the weights
