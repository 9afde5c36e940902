"""Examples into token ids, per task and format: what training, loss evaluation, generation and
option scoring read.

    features     {"input_ids", "label"} (classification) or {"input_ids", "labels"} (-100 off the answer)
    prompts      {"input_ids"} per evaluation example: the generation prompt (causal-lm)
    options      per evaluation example, a list of option features (multiple-choice, see choices.py)

Causal sequences longer than ``model.max_length`` are cut (chat: the end of the conversation;
template: see template.py); how many were cut is reported, and a training example left with no
supervised token is dropped (and counted), never trained on with zero loss tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import LorakitError
from lorakit.estimate.loss import IGNORE_INDEX
from lorakit.recipes.config import DataSection
from lorakit.recipes.data import chat, choices, template
from lorakit.recipes.data.splits import Splits
from lorakit.recipes.data.template import VERBATIM


@dataclass
class Encoded:
    features: dict[str, list[dict[str, Any]]]
    prompts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    options: dict[str, list[list[dict[str, Any]]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # truncation and dropped examples, one line each


def encode_classification(examples: list[dict[str, Any]], tokenizer, max_length: int) -> list[dict[str, Any]]:
    ids = tokenizer([ex["text"] for ex in examples], truncation=True, max_length=max_length)["input_ids"]
    return [{"input_ids": list(i), "label": int(ex["label"])} for i, ex in zip(ids, examples)]


def pattern(cfg: DataSection, fmt: str) -> str:
    """The prompt pattern of the pair formats: data.template, or the prompt as it is."""
    return VERBATIM if fmt == "prompt-completion" else cfg.template


def encode_causal(examples: list[dict[str, Any]], tokenizer, max_length: int, fmt: str, prompt_pattern: str
                  ) -> tuple[list[dict[str, Any]], int, int]:
    """(features, how many were cut at max_length, how many kept no supervised token and were dropped)."""
    out, cut, dropped = [], 0, 0
    for ex in examples:
        if fmt == "chat":
            full = chat.encode(ex, tokenizer)
            feature, was_cut = {k: v[:max_length] for k, v in full.items()}, len(full["input_ids"]) > max_length
        else:
            feature, was_cut = template.encode(ex, tokenizer, max_length, prompt_pattern)
        cut += was_cut
        if all(label == IGNORE_INDEX for label in feature["labels"][1:]):
            dropped += 1
            continue
        out.append(feature)
    return out, cut, dropped


def encode_prompts(examples: list[dict[str, Any]], tokenizer, max_length: int, fmt: str, prompt_pattern: str
                   ) -> list[dict[str, Any]]:
    """Generation prompt ids only (left-truncated)."""
    if fmt == "chat":
        return [{"input_ids": chat.generation_prompt(ex, tokenizer)[-max_length:]} for ex in examples]
    return [{"input_ids": template.generation_prompt(ex, tokenizer, prompt_pattern)[-max_length:]} for ex in examples]


def encode_splits(splits: Splits, cfg: DataSection, task: str, tokenizer, max_length: int, model_name: str) -> Encoded:
    parts = splits.parts()
    if task == "classification":
        return Encoded({k: encode_classification(v, tokenizer, max_length) for k, v in parts.items()})
    fmt, prompt_pattern = splits.format, pattern(cfg, splits.format)
    if fmt == "chat":
        chat.check_template(tokenizer, model_name)
    encoded = Encoded({})
    for name, examples in parts.items():
        features, cut, dropped = encode_causal(examples, tokenizer, max_length, fmt, prompt_pattern)
        if name == "train" and not features:
            raise LorakitError(f"every training example lost its whole answer to truncation at model.max_length={max_length}; "
                               "raise model.max_length")
        encoded.features[name] = features  # evaluation: the loss over what remains; every example is generated
        if cut:
            encoded.notes.append(f"{cut} of {len(examples)} {name} examples were cut at model.max_length={max_length}"
                                 + (f"; {dropped} lost their whole answer and were dropped" if dropped else ""))
        if name == "train":
            continue
        if task == "multiple-choice":
            encoded.options[name] = [choices.option_features(ex, tokenizer, max_length, fmt, prompt_pattern) for ex in examples]
        else:
            encoded.prompts[name] = encode_prompts(examples, tokenizer, max_length, fmt, prompt_pattern)
    return encoded
