"""TRL's SFTTrainer on a conversational dataset with lorakit's data-driven inits: no pre-pass, the init
equals lorakit.adapt's on the trainer's own batches, the loss falls, the saved adapter reloads."""

import random

import pytest
import torch

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from tokenizers.models import WordLevel  # noqa: E402
from tokenizers.pre_tokenizers import Whitespace  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import lorakit  # noqa: E402
from lorakit import AdapterConfig, LorakitError  # noqa: E402
from lorakit.integrations.trl import prepare  # noqa: E402
from lorakit.io import adapter_tensors  # noqa: E402

WORDS = ["[PAD]", "[UNK]", "</s>", "user", "assistant", "what", "is", "plus", "?"] + [str(i) for i in range(20)]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] + ' ' + m['content'] + ' </s> ' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'assistant ' }}{% endif %}")


def chat_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def conversations(n: int = 32) -> Dataset:
    rng = random.Random(0)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"prompt": [{"role": "user", "content": f"what is {a} plus {b} ?"}],  # conversational
                     "completion": [{"role": "assistant", "content": str(a + b)}]})  # prompt-completion
    return Dataset.from_list(rows)


def tiny_chat_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=2, bos_token_id=2))


def sft_trainer(tmp_path, **overrides):
    args = dict(output_dir=str(tmp_path), max_steps=10, per_device_train_batch_size=8, learning_rate=1e-2,
                logging_steps=1, report_to="none", use_cpu=True, save_strategy="steps", save_steps=10,
                disable_tqdm=True, seed=0, bf16=False)  # fp32 (accelerate's bf16 autocast stays on model.forward)
    args.update(overrides)
    return trl.SFTTrainer(model=tiny_chat_llama(), args=trl.SFTConfig(**args), train_dataset=conversations(),
                          processing_class=chat_tokenizer())


class Recording:
    """The trainer's dataloader, keeping every batch it hands out."""

    def __init__(self, loader):
        self.loader, self.batches = loader, []

    def __iter__(self):
        for batch in self.loader:
            self.batches.append({k: v.clone() for k, v in batch.items()})
            yield batch

    def __len__(self):
        return len(self.loader)


@pytest.mark.parametrize("method", ["lora-ga", "lora-sb"])
def test_sft_trainer_runs_a_data_driven_init_from_its_own_batches(tmp_path, method):
    trainer = sft_trainer(tmp_path)
    recorded = []
    own_loader = trainer.get_train_dataloader

    def recording_loader():
        recorded.append(Recording(own_loader()))
        return recorded[-1]

    trainer.get_train_dataloader = recording_loader
    prepare(trainer, AdapterConfig(method=method, rank=4, num_samples=16))
    trainer.get_train_dataloader = own_loader
    config = lorakit.get_config(trainer.model)
    batches = recorded[0].batches
    assert sum(b["input_ids"].shape[0] for b in batches) >= 16 and (batches[0]["labels"] == -100).any()  # prompt masked

    # the same init as lorakit.adapt on those batches, by a separate call on a fresh copy of the model
    reference = lorakit.adapt(tiny_chat_llama(), config, data=batches, progress=False)
    ours, theirs = lorakit.adapters_of(trainer.model), lorakit.adapters_of(reference)
    assert set(ours) == set(theirs)
    for name, adapter in ours.items():
        expected = adapter_tensors(theirs[name])
        for key, value in adapter_tensors(adapter).items():
            assert torch.allclose(value, expected[key], rtol=1e-5, atol=1e-7), (name, key)
        assert torch.allclose(adapter.base_weight, theirs[name].base_weight, rtol=1e-6, atol=1e-7), name

    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses

    saved = tmp_path / "checkpoint-10" / "lorakit_adapter"
    reloaded = lorakit.load(tiny_chat_llama(), saved)
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_a_trainer_built_with_peft_config_is_refused(tmp_path):
    trainer = trl.SFTTrainer(model=tiny_chat_llama(), args=trl.SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                             train_dataset=conversations(8), processing_class=chat_tokenizer(),
                             peft_config=LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(LorakitError, match="built with peft_config"):
        prepare(trainer, AdapterConfig(rank=4))


@pytest.mark.parametrize("method", ["lora", "lora-sb"])
def test_sft_trainer_with_bf16_mixed_precision_trains_lorakit_adapters(tmp_path, method):
    """bf16=True: accelerate runs the float32 model's forward under bf16 autocast (the usual GPU
    setting; CPU autocast here). lorakit's layers compute under it and the loss falls; the factors
    and their optimizer state stay float32."""
    trainer = sft_trainer(tmp_path, bf16=True, learning_rate=3e-2)
    prepare(trainer, AdapterConfig(method=method, rank=4, num_samples=16))
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 10 and all(l == l for l in losses) and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(v.dtype == torch.float32 for p in trainable for v in trainer.optimizer.state[p].values() if v.dim())
