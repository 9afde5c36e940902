"""Tiny config-built models (seconds to build, no download) shared by the tests."""

from __future__ import annotations

import json
import logging
import socket
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

logging.getLogger("transformers").setLevel(logging.ERROR)

VOCAB = 128


def tiny_bert(seed: int = 0, dtype: torch.dtype = torch.float64) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=48, num_labels=2, max_position_embeddings=64,
    )
    return BertForSequenceClassification(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float64) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def batch_for(kind: str, batch: int = 3, length: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    """A batch with labels: class labels for BERT, next-token labels for the decoders."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    if kind == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (batch,), generator=g)}
    return {"input_ids": ids, "labels": ids.clone()}


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def perturb_trainables(model, seed: int = 123, scale: float = 0.1) -> None:
    """Move every trainable tensor away from its init so adapters change the function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


@pytest.fixture(params=sorted(MODELS))
def model_kind(request) -> str:
    return request.param


def free_port() -> int:
    """A free TCP port on the loopback interface, for a torch.distributed rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- bench/results/ is left as it was --------------------------------------------------------
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
TMP = str(Path(tempfile.gettempdir()).resolve())


def _results_listing() -> dict[Path, int]:
    """Every file under bench/results/ but parts/ (the runners' files) with its modification time."""
    return {p: p.stat().st_mtime_ns for p in RESULTS.rglob("*") if p.is_file() and "parts" not in p.relative_to(RESULTS).parts}


def _a_tests(path: Path) -> bool:
    """A changed file a test made: a result, or a ledger record of a run trained under the temporary directory (a
    test's tmp_path). A runner process writes ledger records of its own runs while tests run: not a test's doing."""
    if not path.is_file() or path.relative_to(RESULTS).parts[0] != "runs":
        return True
    try:
        return str(json.loads(path.read_text())["spec"]["output"]["dir"]).startswith(TMP)
    except (OSError, ValueError, KeyError, TypeError):
        return True


@pytest.fixture(autouse=True)
def results_left_alone(request):
    """The bench tests write only under their own tmp_path: bench/results/ (the committed results and their run
    ledger) comes out of each test as it went in."""
    if "bench" not in Path(str(request.node.fspath)).relative_to(Path(__file__).parent).parts[:1]:
        yield
        return
    before = _results_listing()
    yield
    after = _results_listing()
    changed = sorted(str(p.relative_to(RESULTS)) for p in set(before) | set(after)
                     if before.get(p) != after.get(p) and _a_tests(p))
    assert not changed, f"a test wrote into bench/results/: {changed[:5]}; point quality.RESULTS at tmp_path"
