"""``save_pretrained`` on an adapted model refuses (its keys do not load), except in Trainer checkpoints,
which the same adapted model reloads to resume."""

import pytest
import torch
from conftest import VOCAB, batch_for, logits, perturb_trainables, tiny_llama
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import lorakit
from lorakit import AdapterConfig, LorakitError
from lorakit.integrations.transformers import prepare


@pytest.mark.parametrize("method", ["lora", "pissa"])
def test_save_pretrained_refuses_until_merged(tmp_path, method):
    model = lorakit.adapt(tiny_llama(), AdapterConfig(method=method, rank=4))
    perturb_trainables(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LorakitError, match=r"save_pretrained would write lorakit adapter keys.*lorakit.merge") as err:
        model.save_pretrained(tmp_path / "raw")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "raw").exists()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    batch = batch_for("llama")
    expected = logits(model, batch)
    lorakit.merge(model).save_pretrained(tmp_path / "merged")  # a plain model again: its own save_pretrained
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float64)
    assert torch.allclose(logits(reloaded, batch), expected, rtol=0, atol=1e-10)


def test_a_loaded_adapter_guards_save_pretrained_too(tmp_path):
    model = lorakit.adapt(tiny_llama(), AdapterConfig(rank=4))
    lorakit.save_adapter(model, tmp_path / "adapter")
    fresh = lorakit.load_adapter(tiny_llama(), tmp_path / "adapter")
    with pytest.raises(LorakitError, match="save_pretrained would write"):
        fresh.save_pretrained(tmp_path / "raw")


def causal_dataset(n: int = 16, length: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    return [{"input_ids": ids[i], "labels": ids[i].clone()} for i in range(n)]


def trainer_for(tmp_path, **overrides) -> Trainer:
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2,
                save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
                warmup_steps=0, logging_steps=1)
    args.update(overrides)
    trainer = Trainer(model=tiny_llama(dtype=torch.float32).train(), args=TrainingArguments(**args),
                      train_dataset=causal_dataset())
    return prepare(trainer, AdapterConfig(method="lora-ga", rank=4, num_samples=8), preconditioner="riemannian")


def test_trainer_checkpoints_save_and_resume(tmp_path):
    whole = trainer_for(tmp_path / "whole")
    whole.train()
    assert (tmp_path / "whole" / "checkpoint-2" / "model.safetensors").is_file()
    resumed = trainer_for(tmp_path / "whole", save_strategy="no")  # a fresh model, prepared the same way
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    end, again = whole.model.state_dict(), resumed.model.state_dict()
    assert set(end) == set(again)
    for key, value in end.items():
        assert torch.allclose(again[key], value, rtol=1e-5, atol=1e-7), key
    with pytest.raises(LorakitError, match="save_pretrained would write"):  # outside the Trainer: refused again
        whole.model.save_pretrained(tmp_path / "raw")


def test_a_trainer_on_a_model_adapted_by_hand_saves_checkpoints(tmp_path):
    from safetensors import safe_open

    from lorakit.integrations.transformers import optimizer_from_args

    model = lorakit.adapt(tiny_llama(dtype=torch.float32).train(), AdapterConfig(rank=4))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, save_steps=2,
                             report_to="none", use_cpu=True, disable_tqdm=True, learning_rate=1e-2)
    trainer = Trainer(model=model, args=args, train_dataset=causal_dataset(),
                      optimizers=(optimizer_from_args(model, args), None))  # no prepare(): Trainer._save itself
    trainer.train()
    with safe_open(str(tmp_path / "checkpoint-2" / "model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    factors = {k: v for k, v in model.state_dict().items() if k.endswith((".A", ".B"))}
    assert factors and all(torch.equal(saved[k], v) for k, v in factors.items())
