"""Multiple choice: option scores equal an independent per-option float64 computation, whatever
the batching and padding; BIG-bench tasks are read as their target_scores say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

import assets
from lorakit.errors import LorakitError
from lorakit.recipes import data as D
from lorakit.recipes.config import DataSection
from lorakit.recipes.data import choices as C
from lorakit.recipes.evaluation import option_scores
from lorakit.recipes.metrics import choice_accuracy

NAVIGATE = Path(__file__).parents[2] / "configs" / "data" / "bigbench" / "navigate"
TEMPLATE = "Question: {prompt}\nAnswer:"


def _examples():
    questions = [("what is 3 plus 4 ?", ["7", "8 plus 1", "the movie was very good"], 0),
                 ("what is 1 plus 1 ?", ["3", "2"], 1), ("is the plot good ?", ["good", "bad", "dull", "superb"], 3)]
    return [{"prompt": q, "choices": c, "label": a, "answer": c[a]} for q, c, a in questions]


def _independent(model, tok, ex, choice):
    """log p(option | prompt) from one unpadded forward pass of prompt + option, in float64."""
    prompt = tok(TEMPLATE.format(prompt=ex["prompt"]))["input_ids"]
    option = tok(" " + choice, add_special_tokens=False)["input_ids"]
    logits = model(torch.tensor([prompt + option])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(prompt) + k - 1, t]) for k, t in enumerate(option))


def test_option_scores_equal_per_option_passes_whatever_the_batching(tmp_path):
    model = LlamaForCausalLM.from_pretrained(assets.llama_folder(tmp_path / "llama"), dtype=torch.float64).eval()
    tok = assets.tokenizer(causal=True)
    examples = _examples()
    options = [C.option_features(ex, tok, 64, "template", TEMPLATE) for ex in examples]
    with torch.no_grad():
        expected = [[_independent(model, tok, ex, c) for c in ex["choices"]] for ex in examples]
        for batch_size in (1, 2, 4, 9):  # 9 options in all: every batching pads differently
            scores = option_scores(model, options, batch_size, 0, torch.device("cpu"))
            for got, want, ex in zip(scores, expected, examples):
                assert [s for s, _ in got] == pytest.approx(want, abs=1e-10)
                assert [n for _, n in got] == [len(c) for c in ex["choices"]]


def test_options_continue_from_their_shared_prompt_and_unshared_ones_score_whole(tmp_path):
    """The prompt every option of a question begins with runs once (fewer tokens in all than the
    whole rows), and a question whose options were cut to different prompt starts (max_length)
    takes whole rows; every score still equals the independent per-option pass."""
    model = LlamaForCausalLM.from_pretrained(assets.llama_folder(tmp_path / "llama"), dtype=torch.float64).eval()
    tok = assets.tokenizer(causal=True)
    examples = _examples()
    options = [C.option_features(ex, tok, 64, "template", TEMPLATE) for ex in examples]
    cut = C.option_features(examples[0], tok, 12, "template", TEMPLATE)  # options of 1, 3 and 5 tokens
    assert len({f["input_ids"][0] for f in cut}) > 1  # their prompts start at different tokens
    options.append(cut)
    seen: list[int] = []
    forward = model.forward
    model.forward = lambda *a, **kw: seen.append(kw["input_ids"].numel()) or forward(*a, **kw)
    with torch.no_grad():
        scores = option_scores(model, options, 4, 0, torch.device("cpu"))
        model.forward = forward
        for got, ex, feats in zip(scores, examples, options):
            assert [s for s, _ in got] == pytest.approx([_independent(model, tok, ex, c) for c in ex["choices"]], abs=1e-10)
        for (got, _), f in zip(scores[-1], cut):
            logp = torch.log_softmax(model(torch.tensor([f["input_ids"]])).logits[0].double(), -1)
            scored = [k for k, t in enumerate(f["labels"]) if t != -100]
            assert got == pytest.approx(sum(float(logp[k - 1, f["input_ids"][k]]) for k in scored), abs=1e-10)
    whole = sum(len(f["input_ids"]) for q in options for f in q)
    assert sum(seen) < whole  # padded token slots processed, prompts once per question


def test_raw_and_length_normalised_accuracy():
    scores = [[(-2.0, 1), (-3.0, 10)], [(-4.0, 2), (-6.0, 6)]]
    assert choice_accuracy(scores, [1, 1]) == {"accuracy": 0.0, "accuracy_norm": 1.0}
    assert choice_accuracy(scores, [0, 0]) == {"accuracy": 1.0, "accuracy_norm": 0.0}


def test_bigbench_task_is_read_as_its_target_scores_say():
    raw = json.loads((NAVIGATE / "task.json").read_text())["examples"]
    rows = C.read_bigbench(str(NAVIGATE))
    assert len(rows) == len(raw) == 1000
    for row, ex in zip(rows, raw):
        assert row["choices"] == list(ex["target_scores"])
        assert ex["target_scores"][row["choices"][row["answer"]]] == max(ex["target_scores"].values())
        assert row["question"].endswith(ex["input"]) and row["question"].startswith("If you follow these instructions")
    splits = D.load_splits(DataSection(source=str(NAVIGATE / "task.json")), "multiple-choice")
    assert len(splits.train) + len(splits.validation) + len(splits.test) == 1000
    assert all(ex["choices"][ex["label"]] == ex["answer"] for ex in splits.test)


def test_a_folder_of_subtasks_is_read_subtask_by_subtask(tmp_path):
    for name, n in (("b_two", 2), ("a_one", 1)):
        (tmp_path / name).mkdir()
        examples = [{"input": f"{name} {i}", "target_scores": {"x": 0, "y": 1}} for i in range(n)]
        (tmp_path / name / "task.json").write_text(json.dumps({"examples": examples}))
    (tmp_path / "task.json").write_text(json.dumps({"name": "parent", "subtasks": []}))
    assert [r["question"] for r in C.read_bigbench(str(tmp_path))] == ["a_one 0", "b_two 0", "b_two 1"]
    assert {r["answer"] for r in C.read_bigbench(str(tmp_path))} == {1}


def test_chat_format_options_follow_the_assistant_header():
    tok = assets.chat_tokenizer()
    ex = {"prompt": "what is 1 plus 1 ?", "choices": ["2", "3"], "label": 0, "answer": "2"}
    [first, second] = C.option_features(ex, tok, 64, "chat", "")
    n = len(first["input_ids"]) - 1
    assert first["input_ids"][:n] == second["input_ids"][:n]
    assert tok.convert_ids_to_tokens(first["input_ids"][n - 2:n]) == ["<|im_start|>", "assistant"]
    assert first["labels"] == [D.IGNORE_INDEX] * n + [tok.convert_tokens_to_ids("2")]


def test_an_unknown_reasoning_gym_dataset_lists_close_names():
    with pytest.raises(LorakitError, match=r"no dataset 'chain_sums' \(close: chain_sum"):
        D.load_splits(DataSection(source="reasoning-gym:chain_sums"), "causal-lm")
