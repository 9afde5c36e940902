"""Raw rows (a file's or a hub split's) into the examples of a task, checked row by row.

    classification      {"text", "label"}
    causal-lm           {"prompt", "answer"} (template, prompt-completion) or {"messages", "answer"} (chat)
    multiple-choice     {"prompt", "choices", "label", "answer"}: ``answer`` is the right option's text

``answer`` is always the reference that evaluation compares a generation with.
"""

from __future__ import annotations

from typing import Any

from lorakit.errors import LorakitError
from lorakit.recipes.config import DataSection
from lorakit.recipes.data import chat

PROMPT, COMPLETION = "prompt", "completion"  # TRL's prompt-completion columns


def resolve_format(cfg: DataSection, rows: list[dict[str, Any]], where: str) -> str:
    """``data.format``, or for 'auto' what the columns of the first row say."""
    if cfg.format != "auto":
        return cfg.format
    columns = set(rows[0]) if rows and isinstance(rows[0], dict) else set()
    has_chat, has_completion = cfg.messages_column in columns, {PROMPT, COMPLETION} <= columns
    if has_chat and has_completion:
        raise LorakitError(f"{where} has both a {cfg.messages_column!r} column and prompt/completion columns; "
                           "set data.format=chat or data.format=prompt-completion")
    return "chat" if has_chat else "prompt-completion" if has_completion else "template"


def column(rows: list[dict[str, Any]], name: str, option: str, where: str) -> list[Any]:
    if rows and name not in rows[0]:
        columns = ", ".join(map(str, rows[0].keys()))
        raise LorakitError(f"column {name!r} is not in {where} (columns: {columns}); set data.{option}=<one of them>")
    return [row.get(name) if isinstance(row, dict) else None for row in rows]


def texts(rows: list[dict[str, Any]], name: str, option: str, where: str, numbers: bool = False) -> list[str]:
    """Column ``name`` of every row as text; a row where it is missing, null, empty or not a
    string (``numbers``: a number is fine too) is one line naming the row and the column."""
    values = column(rows, name, option, where)
    for number, value in enumerate(values, 1):
        ok = isinstance(value, str) and value.strip() or numbers and isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            what = "missing" if value is None else "empty" if isinstance(value, str) else f"a {type(value).__name__}, not text"
            raise LorakitError(f"{where}: row {number} has column {name!r} {what}; fix or remove that row (or set data.{option})")
    return [str(v) for v in values]


def to_task(rows: list[dict[str, Any]], cfg: DataSection, task: str, where: str, fmt: str) -> list[dict[str, Any]]:
    """The examples of ``task`` in format ``fmt`` (see the module docstring)."""
    if task == "classification":
        return [{"text": t, "label": y} for t, y in zip(texts(rows, cfg.text_column, "text_column", where),
                                                        column(rows, cfg.label_column, "label_column", where))]
    if task == "multiple-choice":
        return choice_examples(rows, cfg, where)
    if fmt == "chat" and rows and cfg.messages_column in rows[0]:
        conversations = column(rows, cfg.messages_column, "messages_column", where)
        return [chat.example(m, cfg.system_prompt, f"{where}: row {i}") for i, m in enumerate(conversations, 1)]
    if fmt == "prompt-completion":
        prompts, answers = texts(rows, PROMPT, "format", where), texts(rows, COMPLETION, "format", where, numbers=True)
    else:
        prompts = texts(rows, cfg.prompt_column, "prompt_column", where)
        answers = texts(rows, cfg.answer_column, "answer_column", where, numbers=True)
    return [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]


def as_chat(examples: list[dict[str, Any]], cfg: DataSection) -> list[dict[str, Any]]:
    """Prompt/answer examples (a reasoning-gym task, prompt/answer columns) as one user turn and
    one assistant turn each, for ``data.format=chat``; other fields (``source``, ``choices``) are kept."""
    out = []
    for ex in examples:
        if "messages" in ex:
            out.append(ex)
            continue
        turns = [{"role": "user", "content": ex["prompt"]}, {"role": "assistant", "content": ex["answer"]}]
        out.append({**ex, **chat.example(turns, cfg.system_prompt, "an example")})
    return out


def choice_examples(rows: list[dict[str, Any]], cfg: DataSection, where: str) -> list[dict[str, Any]]:
    """Question / options / index of the right option, each row checked."""
    questions = texts(rows, cfg.prompt_column, "prompt_column", where)
    options = column(rows, cfg.choices_column, "choices_column", where)
    answers = column(rows, cfg.answer_column, "answer_column", where)
    out = []
    for number, (question, choices, answer) in enumerate(zip(questions, options, answers), 1):
        out.append(choice_example(question, choices, answer, f"{where}: row {number}"))
    return out


def choice_example(question: str, choices: Any, answer: Any, where: str) -> dict[str, Any]:
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
        raise LorakitError(f"{where}: the options must be a list of at least two non-empty strings, got {str(choices)[:60]}")
    if isinstance(answer, str) and answer.strip().isdigit():
        answer = int(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise LorakitError(f"{where}: the answer must be the index of the right option (0 to {len(choices) - 1}), got {answer!r}")
    return {"prompt": question, "choices": list(choices), "label": answer, "answer": choices[answer]}


def label_key(value: Any) -> str:
    """A label's name: integers (1, "1") by their decimal form, anything else as text."""
    as_int = _as_int(value)
    return str(as_int) if as_int is not None else str(value)


def number_labels(splits: dict[str, list[dict[str, Any]]], label_names: list[str] | None = None) -> list[str]:
    """Map the labels found in the training split to 0..K-1 in place and return the names
    (integers in numeric order, else strings sorted); ``label_names`` (a saved run's) fixes the
    mapping instead. A label of another split that the mapping lacks is an error."""
    for part in splits.values():
        if any(ex["label"] is None or str(ex["label"]).strip() == "" for ex in part):
            raise LorakitError("some rows have an empty label; remove them or fix data.label_column")
    if label_names is None:
        values = {label_key(ex["label"]) for ex in splits["train"]}
        if len(values) < 2:
            found = f"only the label {next(iter(values))!r}" if values else "no labels"
            raise LorakitError(f"classification needs at least 2 classes, the training data has {found}; check data.label_column")
        numeric = all(_as_int(v) is not None for v in values)
        label_names = sorted(values, key=int) if numeric else sorted(values)
    index = {name: i for i, name in enumerate(label_names)}
    for name, part in splits.items():
        for ex in part:
            key = label_key(ex["label"])
            if key not in index:
                raise LorakitError(f"the {name} split has the label {key!r}, which the training data does not have "
                                   f"(labels: {', '.join(label_names)}); remove those rows")
            ex["label"] = index[key]
    return list(label_names)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None
