"""transformers.Trainer + lorakit: data-driven init on the Trainer's dataloader, lorakit optimizers, NEFTune."""

import pytest
import torch
from conftest import VOCAB, tiny_bert
from transformers import Trainer, TrainerCallback, TrainingArguments

import lorakit
from lorakit import AdapterConfig, LorakitError
from lorakit.integrations.transformers import optimizer_from_args, prepare
from lorakit.optim import RiemannianAdamW


def dataset(n: int = 32, length: int = 10, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A learnable rule: the label says whether the first token is in the upper half of the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    labels = (ids[:, 0] >= VOCAB // 2).long()
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels[i]} for i in range(n)]


def make_trainer(tmp_path, model=None, examples: int = 32, **overrides) -> Trainer:
    settings = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=20, learning_rate=5e-3,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
        weight_decay=0.0, warmup_steps=0,
    )
    settings.update(overrides)
    model = model if model is not None else tiny_bert(dtype=torch.float32)
    return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=dataset(examples))


def unwrapped_optimizer(trainer):
    opt = trainer.optimizer
    return getattr(opt, "optimizer", opt)  # accelerate wraps it


def test_lora_ga_with_riemannian_adamw_decreases_the_loss(tmp_path):
    trainer = make_trainer(tmp_path, examples=8)  # one full batch: every step sees the same 8 examples
    config = AdapterConfig(method="lora-ga", rank=4, num_samples=8)
    prepare(trainer, config, preconditioner="riemannian")
    model = trainer.model
    adapters = lorakit.adapters_of(model)
    # the gradient init ran before training: B is non-zero and the base carries the −s·B₀A₀ offset
    assert adapters and all(a.B.detach().any() and a.has_offset for a in adapters.values())
    assert isinstance(trainer.optimizer, RiemannianAdamW)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == trainable
    trainer.train()
    assert isinstance(unwrapped_optimizer(trainer), RiemannianAdamW)  # the Trainer kept ours
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.8 * first, losses


def test_optimizer_from_args_reads_training_arguments(tmp_path):
    model = lorakit.adapt(tiny_bert(dtype=torch.float32), AdapterConfig(rank=4))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, weight_decay=0.05, adam_beta1=0.8,
                             adam_beta2=0.99, adam_epsilon=1e-7, report_to="none", use_cpu=True)
    opt = optimizer_from_args(model, args, loraplus_ratio=4)
    groups = {g["role"]: g for g in opt.param_groups}
    assert groups["lora_A"]["lr"] == 3e-4 and groups["lora_B"]["lr"] == pytest.approx(12e-4)
    assert groups["lora_A"]["betas"] == (0.8, 0.99) and groups["lora_A"]["eps"] == 1e-7
    assert groups["lora_A"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0


def test_lora_sb_first_step_size_comes_from_the_trainer(tmp_path):
    trainer = make_trainer(tmp_path, learning_rate=2e-3, warmup_steps=4)
    prepare(trainer, AdapterConfig(method="lora-sb", rank=4, num_samples=8))
    config = lorakit.get_config(trainer.model)
    assert config.lora_sb.lr == 2e-3 and config.lora_sb.warmup_steps == 4
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == {
        id(a.R) for a in lorakit.adapters_of(trainer.model).values()
    } | {id(p) for p in trainer.model.classifier.parameters()}


class NoiseProbe(TrainerCallback):
    """Checks during training that two train-mode embedding passes differ (noise is on)."""

    def __init__(self) -> None:
        self.noisy_steps = 0

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        emb = model.get_input_embeddings()
        mode = emb.training
        ids = torch.arange(1, 9)[None]
        with torch.no_grad():
            emb.train()
            self.noisy_steps += int(not torch.equal(emb(ids), emb(ids)))
        emb.train(mode)


def test_neftune_is_on_during_training_only(tmp_path):
    trainer = make_trainer(tmp_path, max_steps=3)
    probe = NoiseProbe()
    trainer.add_callback(probe)
    prepare(trainer, AdapterConfig(method="lora", rank=4), neftune_alpha=5.0)
    trainer.train()
    assert probe.noisy_steps == 3
    emb = trainer.model.get_input_embeddings().train()
    ids = torch.arange(1, 9)[None]
    assert torch.equal(emb(ids), emb(ids))  # removed when train() ended


def test_prepare_refuses_a_prebuilt_optimizer_and_double_neftune(tmp_path):
    model = lorakit.adapt(tiny_bert(dtype=torch.float32), AdapterConfig(rank=4))
    opt = lorakit.make_optimizer(model)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                      train_dataset=dataset(), optimizers=(opt, None))
    with pytest.raises(LorakitError, match="already has an optimizer"):
        prepare(trainer)
    trainer = make_trainer(tmp_path, neftune_noise_alpha=5.0)
    with pytest.raises(LorakitError, match="NEFTune is set twice"):
        prepare(trainer, AdapterConfig(rank=4), neftune_alpha=5.0)


def test_prepare_keeps_a_model_adapted_earlier_and_accepts_explicit_data(tmp_path):
    model = lorakit.adapt(tiny_bert(dtype=torch.float32), AdapterConfig(method="pissa", rank=4))
    trainer = make_trainer(tmp_path, model=model, max_steps=2)
    prepare(trainer, preconditioner="riemannian", loraplus_ratio=2.0)
    groups = {g["role"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups["lora_B"] == pytest.approx(2 * groups["lora_A"]) and groups["lora_A"] == 5e-3
    trainer.train()

    other = make_trainer(tmp_path, max_steps=2)
    batches = [{k: torch.stack([ex[k] for ex in dataset(8, seed=7)]) for k in ("input_ids", "attention_mask", "labels")}]
    prepare(other, AdapterConfig(method="lora-ga", rank=4, num_samples=8), data=batches)
    assert all(a.has_offset for a in lorakit.adapters_of(other.model).values())


@pytest.mark.parametrize("method, options, message", [
    ("lora-fa", dict(preconditioner="riemannian"), "preconditioner='riemannian' needs adapters whose A and B both train"),
    ("lora-sb", dict(loraplus_ratio=True), "loraplus_ratio needs adapters whose A and B both train"),
    ("lora-ga", dict(optimizer="adam"), "unknown optimizer 'adam'"),
    ("lora-ga", dict(learning_rate=0.0), "lr must be a finite number > 0"),
])
def test_prepare_checks_the_optimizer_before_adapting(tmp_path, method, options, message):
    lr = options.pop("learning_rate", 5e-3)
    trainer = make_trainer(tmp_path, learning_rate=lr)
    with pytest.raises(LorakitError, match=message):
        prepare(trainer, AdapterConfig(method=method, rank=4, num_samples=8), **options)
    assert not lorakit.adapters_of(trainer.model)  # nothing estimated or injected
