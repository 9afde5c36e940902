"""Tiny on-disk models, tokenizers and JSONL datasets for recipe and CLI tests (no download).

A word-level tokenizer over a fixed vocabulary, a 2-layer BERT classifier and a 2-layer
Llama saved with ``save_pretrained``; a sentiment-like classification set whose label is
decided by the words it contains (so the loss can fall), and "a plus b" problems.
"""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import yaml
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

POSITIVE = ["good", "great", "fine", "superb", "lovely", "brilliant"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring", "terrible"]
FILLER = ["the", "movie", "was", "a", "plot", "and", "acting", "very", "really", "film"]
PROMPT_WORDS = ["Question", "Answer", ":", "?", "plus", "what", "is", "####"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + FILLER + PROMPT_WORDS + [str(i) for i in range(40)]


def tokenizer(causal: bool) -> PreTrainedTokenizerFast:
    """Word-level tokenizer. The causal one has an EOS but no pad token (the recipe must add one)."""
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    if causal:
        return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="</s>", bos_token="</s>")
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def bert_folder(path: Path, seed: int = 0, dropout: float = 0.1) -> Path:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=64, num_labels=2, pad_token_id=0,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer(causal=False).save_pretrained(path)
    return path


def llama_folder(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    eos = VOCAB.index("</s>")
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer(causal=True).save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    """{"sentence", "sentiment"}: 'pos' rows contain positive words, 'neg' rows negative ones."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if positive else NEGATIVE, 2)
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "sentiment": "pos" if positive else "neg"})
    return rows


def addition_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"q": f"what is {a} plus {b} ?", "a": f"{a} plus {b} is {a + b} #### {a + b}"})
    return rows


def classification_config(tmp: Path, **sections) -> dict:
    """A small train config (as a dict) on the tiny BERT and the sentiment JSONL."""
    model = bert_folder(tmp / "bert") if not (tmp / "bert").exists() else tmp / "bert"
    data = tmp / "sentiment.jsonl"
    if not data.exists():
        write_jsonl(data, sentiment_rows(96))
    config = {
        "task": "classification",
        "model": {"name": str(model), "max_length": 16},
        "data": {"source": str(data), "text_column": "sentence", "label_column": "sentiment"},
        "adapter": {"method": "lora", "rank": 4},
        "optim": {"lr": 3e-2, "warmup_steps": 2},
        "train": {"epochs": 4, "max_steps": None, "batch_size": 8, "progress": False, "threads": 1},
        "eval": {"batch_size": 32},
        "output": {"dir": str(tmp / "run"), "tensorboard": False},
    }
    return _merge(config, sections)


def causal_config(tmp: Path, **sections) -> dict:
    model = llama_folder(tmp / "llama") if not (tmp / "llama").exists() else tmp / "llama"
    data = tmp / "addition.jsonl"
    if not data.exists():
        write_jsonl(data, addition_rows(60))
    config = {
        "task": "causal-lm",
        "model": {"name": str(model), "max_length": 32},
        "data": {"source": str(data), "prompt_column": "q", "answer_column": "a"},
        "adapter": {"method": "lora", "rank": 4},
        "optim": {"lr": 1e-2},
        "train": {"epochs": 3, "max_steps": None, "batch_size": 8, "progress": False, "threads": 1},
        "eval": {"batch_size": 16, "max_new_tokens": 8},
        "output": {"dir": str(tmp / "run"), "tensorboard": False},
    }
    return _merge(config, sections)


def _merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """The causal word-level tokenizer with ChatML's turn markers and a ChatML chat template."""
    tok = tokenizer(causal=True)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.add_tokens(["system", "user", "assistant"])
    tok.chat_template = CHATML
    return tok


def chat_llama_folder(path: Path, seed: int = 0) -> Path:
    """The tiny Llama with the chat tokenizer (its embeddings sized to it)."""
    torch.manual_seed(seed)
    tok = chat_tokenizer()
    eos = VOCAB.index("</s>")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=eos, eos_token_id=eos, pad_token_id=None, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def gguf_llama_file(path: Path, seed: int = 0) -> Path:
    """A tiny Llama written as a GGUF file with the gguf package (fp32 tensors, a byte-level BPE
    vocabulary: every byte, one merge, '<|endoftext|>' as EOS), as llama.cpp lays one out."""
    import gguf
    import numpy as np
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, inner, layers, heads, kv_heads = 32, 48, 2, 4, 2
    tokens = ["<|endoftext|>", *bytes_to_unicode().values(), "\u0120t"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(inner)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["\u0120 t"])
    writer.add_token_types([3] + [1] * (len(tokens) - 1))  # 3: control
    writer.add_eos_token_id(0)
    writer.add_bos_token_id(0)
    rng = np.random.default_rng(seed)
    kv = kv_heads * hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for b in range(layers):
        shapes |= {f"blk.{b}.{name}.weight": shape for name, shape in [
            ("attn_norm", (hidden,)), ("ffn_norm", (hidden,)), ("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)),
            ("attn_v", (kv, hidden)), ("attn_output", (hidden, hidden)), ("ffn_gate", (inner, hidden)),
            ("ffn_up", (inner, hidden)), ("ffn_down", (hidden, inner))]}
    for name, shape in shapes.items():
        values = np.ones(shape) if len(shape) == 1 else rng.normal(0.0, 0.1, shape)
        writer.add_tensor(name, values.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@contextmanager
def interrupted_at_step(n: int) -> Iterator[None]:
    """Inside, the n-th AdamW step (counted from entering) raises KeyboardInterrupt before it applies:
    a user pressing Ctrl-C during a run. AdamW's own step is back on exit."""
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        yield
    finally:
        torch.optim.AdamW.step = real_step
