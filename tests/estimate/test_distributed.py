"""Two gloo ranks × m examples initialise exactly as one process on the 2·m examples."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import batch_for, tiny_llama
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterConfig, adapters_of

CONFIGS = {
    "ga-exact": AdapterConfig(method="lora-ga", rank=2, estimator="exact", num_samples=4),
    "ga-sketch": AdapterConfig(method="lora-ga", rank=2, estimator="sketch", oversample=8, num_samples=4),
    "sb-exact": AdapterConfig(method="lora-sb", rank=2, estimator="exact", lr=1e-3, num_samples=4),
    "sb-sketch": AdapterConfig(method="lora-sb", rank=2, estimator="sketch", update="gradient", oversample=8, lr=1e-3, num_samples=4),
}


def shards() -> list[list[dict]]:
    """Rank r's data: two examples each, in batches of different sizes."""
    return [[batch_for("llama", 2, 9, seed=1)], [batch_for("llama", 1, 9, seed=2), batch_for("llama", 1, 9, seed=3)]]


def factors(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone() for n, a in adapters_of(model).items() for k, v in a.factors().items()}


def run_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        for key, config in CONFIGS.items():
            model = lorakit.adapt(tiny_llama(), config, data=shards()[rank])
            save_file(factors(model), os.path.join(out_dir, f"{key}-rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_equal_one_process_on_all_samples(tmp_path):
    mp.spawn(run_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for key, config in CONFIGS.items():
        single = factors(lorakit.adapt(tiny_llama(), config, data=shards()[0] + shards()[1]))
        ranks = [load_file(str(tmp_path / f"{key}-rank{r}.safetensors")) for r in range(2)]
        for name, expected in single.items():
            assert torch.equal(ranks[0][name], ranks[1][name]), (key, name)  # every rank ends identical
            error = ((ranks[0][name] - expected).norm() / expected.norm().clamp_min(1e-300)).item()
            assert error <= 1e-6, (key, name, error)
