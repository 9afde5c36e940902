"""Prompt/answer pairs as one token sequence, the loss on the answer only.

- ``data.format: template``: ``data.template`` around the prompt, then the answer (stripped),
  after a space unless the filled template already ends in whitespace, then EOS;
- ``data.format: prompt-completion`` (TRL's columns): prompt and completion joined as they
  are, then EOS.

Over-long pairs keep at least half the window for the prompt's end and cut the answer's tail.
"""

from __future__ import annotations

from typing import Any

from lorakit.estimate.loss import IGNORE_INDEX

VERBATIM = "{prompt}"  # the prompt-completion "template": the prompt as it is


def prompt_text(example: dict[str, Any], template: str) -> str:
    return template.format(prompt=example["prompt"])


def answer_text(prompt: str, answer: str, template: str) -> str:
    """What follows the prompt: the completion as it is, or the answer after one separating space."""
    if template == VERBATIM:
        return answer
    return answer.strip() if prompt[-1:].isspace() else " " + answer.strip()


def split_ids(ex: dict[str, Any], tokenizer, template: str, answer: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids without EOS) of ``ex`` (or of another ``answer``: an option)."""
    prompt = prompt_text(ex, template)
    answer = answer_text(prompt, ex["answer"] if answer is None else answer, template)
    return tokenizer(prompt)["input_ids"], tokenizer(answer, add_special_tokens=False)["input_ids"]


def encode(ex: dict[str, Any], tokenizer, max_length: int, template: str) -> tuple[dict[str, list[int]], bool]:
    """(input_ids + labels, whether the pair was cut at max_length)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt, answer = split_ids(ex, tokenizer, template)
    answer = answer + eos
    cut = len(prompt) + len(answer) > max_length
    answer = answer[: max_length - min(len(prompt), max_length // 2)]
    prompt = prompt[-(max_length - len(answer)):] if cut else prompt
    return {"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer}, cut


def generation_prompt(ex: dict[str, Any], tokenizer, template: str) -> list[int]:
    return tokenizer(prompt_text(ex, template))["input_ids"]
