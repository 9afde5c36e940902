"""Data-driven inits on a model sharded with FSDP2 (2 gloo processes): lora-ga and lora-sb
estimate on the sharded tiny Llama — no process holds more than its shard of a weight outside
the unit FSDP all-gathers — and find the same factors as one unsharded process on the same data."""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
from conftest import batch_for, free_port, tiny_llama  # noqa: E402

import lorakit  # noqa: E402
from lorakit.inject import adapters_of  # noqa: E402
from lorakit.io import ADAPTER_PREFIX, adapter_tensors  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

CASES = {
    "lora-ga-exact": dict(method="lora-ga", estimator="exact"),
    "lora-ga-exact-groups": dict(method="lora-ga", estimator="exact", memory_budget=4 * 32 * 40 * 8),
    "lora-ga-sketch": dict(method="lora-ga", estimator="sketch"),
    "lora-sb-exact": dict(method="lora-sb", estimator="exact"),
    "lora-sb-sketch": dict(method="lora-sb", estimator="sketch", update="gradient"),
}


def config(case: str) -> lorakit.AdapterConfig:
    return lorakit.AdapterConfig(rank=2, num_samples=6, targets="all-linear", **CASES[case])


def data(rank: int | None) -> list[dict[str, torch.Tensor]]:
    """Rank r's share (3 examples); None: all 6 examples for the single process."""
    return [batch_for("llama", 3, 9, seed=s + 1) for s in ([rank] if rank is not None else [0, 1])]


def _worker(rank: int, port: int, out: str) -> None:
    """Every case on the sharded model, in one pair of processes; rank 0 writes each case's gathered adapter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from lorakit.recipes import fsdp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    try:
        mesh = init_device_mesh("cpu", (2,))
        for case in CASES:
            model = tiny_llama()
            fsdp.adapt_sharded(model, config(case), data(rank), mesh, progress=False)
            # every weight, frozen or trainable, is a shard: this rank holds its ⌈rows / 2⌉ or ⌊rows / 2⌋ rows
            for name, p in model.named_parameters():
                assert isinstance(p, DTensor), name
                assert p.to_local().shape[0] == (p.shape[0] + 1) // 2 - rank * (p.shape[0] % 2), name
            tensors, _ = fsdp.adapter_entries(model, rank == 0)
            if rank == 0:
                save_file(tensors, f"{out}/{case}.safetensors")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return out


def orthonormal(M: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(M.double())[0]


def smallest_cosine(X: torch.Tensor, Y: torch.Tensor) -> float:
    """The smallest cosine of the principal angles between the column spaces of X and Y."""
    return float(torch.linalg.svdvals(orthonormal(X).T @ orthonormal(Y)).min())


@pytest.mark.parametrize("case", list(CASES))
def test_sharded_estimation_gives_the_factors_of_one_unsharded_process(sharded, case):
    sharded = load_file(sharded / f"{case}.safetensors")

    model = lorakit.adapt(tiny_llama(), config(case), data=data(None), progress=False)
    single = {f"{ADAPTER_PREFIX}{name}.{key}": value for name, adapter in adapters_of(model).items()
              for key, value in adapter_tensors(adapter).items()}
    factors = [k for k in single if k.rsplit(".", 1)[-1] in ("A", "B", "offset_A", "offset_B")]
    assert len(factors) >= 2 * 7 * 2  # A and B of the 7 linear layers of both blocks
    for key in factors:
        one, two = single[key].double(), sharded[key].double()
        rows = key.rsplit(".", 1)[-1].endswith("A")  # A: r × in (its row space), B: out × r (its columns)
        assert smallest_cosine(two.T if rows else two, one.T if rows else one) >= 0.9999, key
        assert two.norm() == pytest.approx(float(one.norm()), rel=1e-6), key
    # lora-sb's R: the same up to the bases' signs and order within equal singular values
    for key in single:
        if key.endswith(".R"):
            assert torch.linalg.svdvals(sharded[key].double()) == pytest.approx(torch.linalg.svdvals(single[key].double()), rel=1e-6), key
