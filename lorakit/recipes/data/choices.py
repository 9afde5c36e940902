"""Multiple-choice data (``task: multiple-choice``): a question, its options, the right one's index.

Sources: rows with ``prompt_column`` / ``choices_column`` / ``answer_column`` (defaults
question / choices / answer), or a BIG-bench JSON task — a ``task.json`` or its folder (a
folder of subtask folders is read subtask by subtask, in name order). A BIG-bench example's
question is the task's ``task_prefix`` (if any), a newline, and its ``input``; its options are
the keys of ``target_scores`` and the right one is the first with the highest score.

Training is causal-LM on the right option (the example's ``answer``). Evaluation scores every
option by its log-likelihood given the prompt: :func:`option_features` gives, per option, the
prompt + option ids with labels on the option's tokens only (no EOS: the option is scored as a
continuation, as lm-eval-harness does).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.estimate.loss import IGNORE_INDEX
from lorakit.recipes.data import chat, template

TASK_FILE = "task.json"


def is_bigbench(source: str) -> bool:
    path = Path(source)
    return path.name == TASK_FILE or path.is_dir() and ((path / TASK_FILE).is_file() or any(path.glob(f"*/{TASK_FILE}")))


def read_bigbench(source: str) -> list[dict[str, Any]]:
    """{"question", "choices", "answer"} rows of a BIG-bench task (file or folder)."""
    path = Path(source)
    files = [path] if path.is_file() else [path / TASK_FILE] if (path / TASK_FILE).is_file() and \
        "examples" in _load(path / TASK_FILE) else sorted(path.glob(f"*/{TASK_FILE}"))
    rows: list[dict[str, Any]] = []
    for file in files:
        task = _load(file)
        if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
            raise LorakitError(f"{file} is not a BIG-bench JSON task (no 'examples' list)")
        prefix = str(task.get("task_prefix") or "").strip()
        for number, ex in enumerate(task["examples"], 1):
            scores = ex.get("target_scores") if isinstance(ex, dict) else None
            if not isinstance(scores, dict) or not scores:
                raise LorakitError(f"{file}: example {number} has no target_scores; lorakit reads multiple-choice "
                                   "BIG-bench tasks only (generative tasks with 'target' are not multiple choice)")
            choices = list(scores)
            best = max(scores.values())
            question = f"{prefix}\n{ex.get('input', '')}" if prefix else str(ex.get("input", ""))
            rows.append({"question": question, "choices": choices, "answer": [scores[c] for c in choices].index(best)})
    if not rows:
        raise LorakitError(f"{source} holds no BIG-bench task ({TASK_FILE} with examples)")
    return rows


def _load(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LorakitError(f"{file} is not valid JSON ({exc}); give a BIG-bench task.json") from None


def option_features(ex: dict[str, Any], tokenizer, max_length: int, fmt: str, prompt_template: str) -> list[dict[str, Any]]:
    """Per option: input_ids = prompt + option, labels = the option's ids (prompt masked), and
    ``chars`` (the option's length in characters, for the length-normalised score). Over-long
    prompts lose their start, so that every option is scored after the same prompt end."""
    out = []
    for choice in ex["choices"]:
        if fmt == "chat":
            messages = ex["messages"][:-1] if "messages" in ex else [{"role": "user", "content": ex["prompt"]}]
            prompt = chat.generation_prompt({"messages": messages + [{"role": "assistant", "content": choice}]}, tokenizer)
            option = tokenizer(choice, add_special_tokens=False)["input_ids"]
        else:
            prompt, option = template.split_ids(ex, tokenizer, prompt_template, choice)
        option = option[:max_length - 1]
        prompt = prompt[-(max_length - len(option)):]
        out.append({"input_ids": prompt + option, "labels": [IGNORE_INDEX] * len(prompt) + option, "chars": len(choice)})
    return out
