"""Tiny config-built models (seconds to build, no download) shared by the tests."""

from __future__ import annotations

import logging
import socket

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
