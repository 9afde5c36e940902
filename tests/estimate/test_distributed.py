"""Two gloo ranks × m examples initialise exactly as one process on the 2·m examples, sketch mode
sends sketches (not out×in gradients) between them, and the data-free inits that draw random
numbers draw the same ones on every rank."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import batch_for, free_port, tiny_llama
from safetensors.torch import load_file, save_file

import lorakit
from lorakit import AdapterConfig, adapters_of

CONFIGS = {
    "ga-exact": AdapterConfig(method="lora-ga", rank=2, estimator="exact", num_samples=4),
    "ga-sketch": AdapterConfig(method="lora-ga", rank=2, estimator="sketch", oversample=8, num_samples=4),
    "sb-exact": AdapterConfig(method="lora-sb", rank=2, estimator="exact", lr=1e-3, num_samples=4),
    "sb-sketch": AdapterConfig(method="lora-sb", rank=2, estimator="sketch", update="gradient", oversample=8, lr=1e-3, num_samples=4),
}
# random A, random R, randomized SVD of W: seeded per layer, whatever each process's global RNG did before
DATA_FREE = {
    "lora": AdapterConfig(method="lora", rank=2),
    "gaussian": AdapterConfig(method="gaussian", rank=2),
    "lora-xs": AdapterConfig(method="lora-xs", rank=2, svd="randomized"),
    "pissa-randomized": AdapterConfig(method="pissa", rank=2, svd="randomized", svd_power_iters=1),
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
        sent: dict[str, list[int]] = {}
        real_all_reduce = dist.all_reduce

        def recording_all_reduce(tensor, *args, **kwargs):
            sent[key].append(tensor.numel())
            return real_all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = recording_all_reduce
        try:
            for key, config in CONFIGS.items():
                sent[key] = []
                model = lorakit.adapt(tiny_llama(), config, data=shards()[rank])
                save_file(factors(model), os.path.join(out_dir, f"{key}-rank{rank}.safetensors"))
        finally:
            dist.all_reduce = real_all_reduce
        Path(out_dir, f"sent-rank{rank}.json").write_text(json.dumps(sent))
        for key, config in DATA_FREE.items():
            model = tiny_llama()
            torch.manual_seed(1000 + rank)  # each process's global generator in a different state
            torch.rand(17 * (rank + 1))
            save_file(factors(lorakit.adapt(model, config)), os.path.join(out_dir, f"{key}-rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def rank_outputs(tmp_path_factory):
    """Each rank's factors for every config, from one 2-process run."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(run_rank, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return out


def test_two_ranks_equal_one_process_on_all_samples(rank_outputs):
    tmp_path = rank_outputs
    for key, config in CONFIGS.items():
        single = factors(lorakit.adapt(tiny_llama(), config, data=shards()[0] + shards()[1]))
        ranks = [load_file(str(tmp_path / f"{key}-rank{r}.safetensors")) for r in range(2)]
        for name, expected in single.items():
            assert torch.equal(ranks[0][name], ranks[1][name]), (key, name)  # every rank ends identical
            error = ((ranks[0][name] - expected).norm() / expected.norm().clamp_min(1e-300)).item()
            assert error <= 1e-6, (key, name, error)


def test_random_data_free_inits_are_identical_on_every_rank(rank_outputs):
    tmp_path = rank_outputs
    for key, config in DATA_FREE.items():
        single = factors(lorakit.adapt(tiny_llama(), config))
        ranks = [load_file(str(tmp_path / f"{key}-rank{r}.safetensors")) for r in range(2)]
        assert ranks[0].keys() == single.keys()
        for name, expected in single.items():
            assert torch.equal(ranks[0][name], ranks[1][name]), (key, name)
            assert torch.equal(ranks[0][name], expected), (key, name)
        assert any(not torch.equal(v, torch.zeros_like(v)) for v in single.values())


def test_sketch_mode_sends_sketches_not_gradients(rank_outputs):
    """Per layer and pass, sketch mode all-reduces out·l or in·l numbers (l = k + oversample), never out·in."""
    sent = json.loads((rank_outputs / "sent-rank0.json").read_text())
    shapes = [(m.out_features, m.in_features) for m in tiny_llama().modules()
              if isinstance(m, torch.nn.Linear) and m.out_features != tiny_llama().config.vocab_size]
    assert sorted(n for n in sent["ga-exact"] if n > 2) == sorted(o * i for o, i in shapes)
    for key in ("ga-sketch", "sb-sketch"):
        config = CONFIGS[key]
        k = (2 if config.method == "lora-ga" else 1) * config.rank
        allowed = {d * min(k + config.estimation.oversample, o, i) for o, i in shapes for d in (o, i)}
        sizes = {n for n in sent[key] if n > 2}  # 2: the total weight and the example count
        assert sizes and sizes <= allowed, (key, sizes - allowed)
        assert max(sizes) < max(o * i for o, i in shapes)
