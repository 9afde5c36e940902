"""Conversational data (``data.format: chat``): ``messages`` of {role, content} turns rendered
by the tokenizer's own chat template (``apply_chat_template``), the loss on assistant turns only.

Which tokens are an assistant turn's is read off the template itself: the conversation is
rendered once, and assistant turn i spans the characters from the end of the rendering of
turns 0..i−1 with the generation prompt (the template's assistant header) to the end of the
rendering of turns 0..i, trailing whitespace excluded — its content and the template's
end-of-turn marker, so the model learns to stop. The rendered text is tokenised once with
offsets and a token is supervised when it starts inside such a span. Every assistant turn of a
multi-turn conversation is trained. A template that does not render a conversation's prefixes
as prefixes of the whole (it rewrites earlier turns) is refused rather than guessed.

For generation the prompt is the rendering of the turns before the last assistant turn with
the generation prompt, and the reference is that turn's content.
"""

from __future__ import annotations

from typing import Any

from lorakit.errors import LorakitError
from lorakit.estimate.loss import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")


def example(messages: Any, system_prompt: str | None, where: str) -> dict[str, Any]:
    """{"messages", "answer"} after checking the turns; ``system_prompt`` leads when the
    conversation has no system turn. ``answer`` is the last assistant turn's content."""
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise LorakitError(f"{where}: messages must be a list of {{\"role\", \"content\"}} turns, got {str(messages)[:60]}")
    turns = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise LorakitError(f"{where}: unknown role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise LorakitError(f"{where}: a {role} turn's content must be text, got {type(content).__name__}")
        turns.append({"role": role, "content": content})
    assistant = [i for i, m in enumerate(turns) if m["role"] == "assistant"]
    if not assistant:
        raise LorakitError(f"{where}: the conversation has no assistant turn; there is nothing to train on")
    if assistant[0] == 0:
        raise LorakitError(f"{where}: the conversation starts with an assistant turn; start with a user (or system) turn")
    answer = turns[assistant[-1]]["content"]
    if system_prompt and turns[0]["role"] != "system":
        turns.insert(0, {"role": "system", "content": system_prompt})
    return {"messages": turns, "answer": answer}


def check_template(tokenizer, model_name: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise LorakitError(f"the tokenizer of {model_name!r} has no chat template, so data.format=chat cannot render "
                           "the conversations; use data.format=template with data.template (e.g. 'Question: {prompt}\\nAnswer:')")


def render(tokenizer, messages: list[dict[str, str]], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn."""
    text = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before, through = render(tokenizer, messages[:i], True), render(tokenizer, messages[:i + 1])
        if not (text.startswith(before) and text.startswith(through) and through.startswith(before)):
            raise LorakitError("the tokenizer's chat template renders a conversation's first turns differently from the "
                               "whole conversation, so the assistant turns cannot be located; use data.format=template")
        spans.append((len(before), len(before) + len(through[len(before):].rstrip())))
    return text, spans


def encode(ex: dict[str, Any], tokenizer) -> dict[str, list[int]]:
    """input_ids of the rendered conversation; labels equal to them on assistant turns, -100 elsewhere."""
    text, spans = assistant_spans(tokenizer, ex["messages"])
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, starts = enc["input_ids"], [start for start, _ in enc["offset_mapping"]]
        inside = [any(a <= s < b for a, b in spans) for s in starts]
        return {"input_ids": ids, "labels": [i if keep else IGNORE_INDEX for i, keep in zip(ids, inside)]}
    ids, labels, position = [], [], 0  # a slow tokenizer: tokenise the pieces between span ends
    for a, b in spans + [(len(text), len(text))]:
        for piece, trained in ((text[position:a], False), (text[a:b], True)):
            piece_ids = tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
            ids += piece_ids
            labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
        position = b
    return {"input_ids": ids, "labels": labels}


def end_of_turn(tokenizer) -> int | None:
    """The template's end-of-turn token (ChatML's <|im_end|>): the single token that follows an
    assistant reply's content in its rendering, or None when there is no such one token."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "lorakit"}]
    text, [(start, end)] = assistant_spans(tokenizer, probe)
    reply = text[start:end]
    tail = reply[reply.find("lorakit") + len("lorakit"):] if "lorakit" in reply else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail.strip() else []
    return ids[0] if len(ids) == 1 else None


def generation_prompt(ex: dict[str, Any], tokenizer) -> list[int]:
    """Token ids of the turns before the last assistant turn, ending with the assistant header."""
    messages = ex["messages"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return tokenizer(render(tokenizer, messages[:last], True), add_special_tokens=False)["input_ids"]
