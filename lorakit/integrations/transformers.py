"""``transformers.Trainer`` integration: adapters, data-driven init and lorakit optimizers.

    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate)
    prepare(trainer, AdapterConfig(method="lora-ga", rank=8), preconditioner="riemannian", loraplus_ratio=True)
    trainer.train()

Order matters: a data-driven init (lora-ga, lora-sb) needs training batches, and the
optimizer must be built after the adapters exist. The Trainer only creates its optimizer
inside ``train()`` and skips that when ``trainer.optimizer`` is already set, so ``prepare``
runs between construction and ``train()``: it estimates on the Trainer's own train
dataloader (same collator, batch size, device), adapts the model in place, then installs
``make_optimizer`` built from the TrainingArguments (learning_rate, weight_decay,
adam_beta1/2, adam_epsilon); the Trainer still builds its LR scheduler around it. With a
preconditioner, ``max_grad_norm`` moves from the Trainer (which would clip the raw gradient)
into the optimizer, which clips the preconditioned gradient it applies.
``prepare`` is a function, not a Trainer subclass, so it works on any Trainer subclass
(e.g. TRL's SFTTrainer). FSDP and DeepSpeed create their optimizers themselves, so they
are refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.adaptation import adapt
from lorakit.inject import adapters_of
from lorakit.io import save_adapter
from lorakit.adapters import ADAPTER_CLASSES
from lorakit.config import AdapterConfig
from lorakit.errors import LorakitError
from lorakit.optim.factory import make_optimizer, optimizer_options
from lorakit.optim.groups import pair_needed_error, resolve_loraplus_ratio
from lorakit.optim.neftune import NEFTuneHandle, enable_neftune

# Trainer saves hold the lorakit adapter in this sub-folder (see save_adapter_with_checkpoints)
ADAPTER_FOLDER = "lorakit_adapter"

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a dependency
    TrainerCallback = object  # type: ignore[assignment, misc]


def optimizer_from_args(model: nn.Module, args: Any, name: str = "adamw", **options: Any):
    """``make_optimizer`` with lr, weight decay, betas and ε read from ``TrainingArguments``.

    For models adapted by hand: ``Trainer(..., optimizers=(optimizer_from_args(model, args,
    preconditioner="riemannian"), None))``. ``options`` go to ``make_optimizer``. With a
    preconditioner the optimizer clips to ``args.max_grad_norm`` after preconditioning and
    ``args.max_grad_norm`` is set to 0, so that the Trainer does not clip the raw gradient too.
    """
    settings = _optimizer_settings(args, name, options)
    optimizer = make_optimizer(model, name, **settings)
    if settings.get("preconditioner") is not None:
        args.max_grad_norm = 0.0  # the Trainer's clip_grad_norm_ is off; the optimizer clips what it applies
    return optimizer


def _optimizer_settings(args: Any, name: str, options: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments' optimizer settings overridden by ``options``, checked (raises on bad input)."""
    settings: dict[str, Any] = {"lr": args.learning_rate, "weight_decay": args.weight_decay}
    if name == "adamw":
        settings.update(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    if options.get("preconditioner") is not None and args.max_grad_norm and args.max_grad_norm > 0:
        settings["max_grad_norm"] = args.max_grad_norm
    settings.update(options)
    optimizer_options(name, **settings)
    return settings


class NEFTuneCallback(TrainerCallback):
    """Adds NEFTune noise (``lorakit.enable_neftune``) for the duration of each ``train()`` call."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.handle: NEFTuneHandle | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        self.handle = enable_neftune(model, self.alpha)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _training_steps(trainer: Any, dataloader: Any) -> int:
    args = trainer.args
    if args.max_steps > 0:
        return args.max_steps
    per_epoch = max(1, math.ceil(len(dataloader) / args.gradient_accumulation_steps))
    return per_epoch * math.ceil(args.num_train_epochs)


def _with_training_lr(config: AdapterConfig, trainer: Any, dataloader: Any) -> AdapterConfig:
    """An init that starts from the training step (lora-sb's η) takes the Trainer's learning rate and
    warm-up, unless the config sets them."""
    sb = config.lora_sb
    if not config.initialisation.uses_training_lr or sb.eta is not None or sb.lr is not None:
        return config
    warmup = trainer.args.get_warmup_steps(_training_steps(trainer, dataloader))
    return config.replace(lr=trainer.args.learning_rate, warmup_steps=int(warmup))


def _check_trainer(trainer: Any) -> None:
    if getattr(trainer, "optimizer", None) is not None or getattr(trainer, "optimizer_cls_and_kwargs", None) is not None:
        raise LorakitError(
            "the Trainer already has an optimizer; prepare() builds it, so construct the Trainer without "
            "optimizers= / optimizer_cls_and_kwargs="
        )
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False):
        raise LorakitError(
            "prepare() does not support FSDP or DeepSpeed, which build their own optimizer; adapt the model with "
            "lorakit.adapt before creating the Trainer and use the Trainer's optimizer"
        )
    if getattr(trainer, "model_init", None) is not None:
        raise LorakitError("prepare() needs a Trainer built with model=, not model_init=")


def _check_structure(config: AdapterConfig, preconditioner: str | None, loraplus_ratio: float | bool | None) -> None:
    """LoRA+ and the preconditioner need the structure's A and B to train (read from the adapter class)."""
    structure = ADAPTER_CLASSES[config.adapter_type]
    if {"A", "B"} <= set(structure.trainable_names):
        return
    for option, value in (("preconditioner='riemannian'", preconditioner), ("loraplus_ratio", resolve_loraplus_ratio(loraplus_ratio))):
        if value is not None:
            raise pair_needed_error(option, (structure.structure,))


def save_adapter_with_checkpoints(trainer: Any) -> None:
    """Trainer saves (checkpoints, ``save_model``) also write a lorakit adapter in
    ``<folder>/lorakit_adapter`` that ``lorakit.load(base_model, that folder)`` reloads.

    The checkpoint's model.safetensors stays the adapted model's raw state, which the same
    adapted model reloads on ``resume_from_checkpoint`` (``save_pretrained`` writes it only for
    ``Trainer._save``: ``from_pretrained`` cannot load it). ``prepare`` calls this.
    """
    save = trainer._save
    if getattr(save, "lorakit_adapter", False):
        return

    def _save(output_dir: str | None = None, *args: Any, **kwargs: Any) -> Any:
        result = save(output_dir, *args, **kwargs)
        if trainer.args.should_save and adapters_of(trainer.model):
            folder = Path(output_dir if output_dir is not None else trainer.args.output_dir) / ADAPTER_FOLDER
            save_adapter(trainer.model, folder, overwrite=True)
        return result

    _save.lorakit_adapter = True  # type: ignore[attr-defined]
    trainer._save = _save


def prepare(
    trainer: Any,
    config: AdapterConfig | None = None,
    *,
    optimizer: str = "adamw",
    loraplus_ratio: float | bool | None = None,
    preconditioner: str | None = None,
    damping: float = 1e-6,
    neftune_alpha: float | None = None,
    data: Any = None,
    **torch_options: Any,
) -> Any:
    """Adapt ``trainer.model`` with ``config`` and install a lorakit optimizer; returns the trainer.

    Data-driven inits (lora-ga, lora-sb) estimate on ``data`` if given, else on the Trainer's
    train dataloader (``config.estimation.num_samples`` examples). lora-sb's η defaults to the Trainer's
    learning rate over its warm-up steps. ``config=None`` keeps a model adapted earlier.
    ``neftune_alpha`` adds NEFTune noise during ``train()`` (instead of the Trainer's own
    ``neftune_noise_alpha``; setting both is an error). Every option is checked before the
    (possibly long) estimation starts. ``torch_options`` go to torch's optimizer.
    """
    _check_trainer(trainer)
    model = trainer.model
    options = dict(loraplus_ratio=loraplus_ratio, preconditioner=preconditioner, damping=damping, **torch_options)
    _optimizer_settings(trainer.args, optimizer, options)
    if neftune_alpha is not None:
        if getattr(trainer.args, "neftune_noise_alpha", None) is not None:
            raise LorakitError("NEFTune is set twice: pass neftune_alpha to prepare() or neftune_noise_alpha to TrainingArguments, not both")
        enable_neftune(model, neftune_alpha).remove()  # checks alpha and the embeddings now, not at train()
    if config is not None:
        _check_structure(config, preconditioner, loraplus_ratio)
        loader = trainer.get_train_dataloader() if config.needs_data else None
        config = _with_training_lr(config, trainer, loader)
        adapt(model, config, data=loader if data is None else data)
    trainer.optimizer = optimizer_from_args(model, trainer.args, optimizer, **options)
    save_adapter_with_checkpoints(trainer)
    if neftune_alpha is not None:
        trainer.add_callback(NEFTuneCallback(neftune_alpha))
    return trainer
