"""TRL's ``SFTTrainer`` (and TRL's other Trainer subclasses) with lorakit adapters.

    from trl import SFTConfig, SFTTrainer
    from lorakit.integrations.trl import prepare

    trainer = SFTTrainer(model=model, args=SFTConfig(...), train_dataset=conversations, processing_class=tokenizer)
    prepare(trainer, AdapterConfig(method="lora-ga", rank=8), preconditioner="riemannian")
    trainer.train()

Build the trainer WITHOUT ``peft_config``: lorakit adds the adapters. Data-driven inits
(lora-ga, lora-sb) estimate on the SFTTrainer's own train dataloader — its tokenised,
chat-templated, collated batches, whose labels mask what SFTTrainer's loss masks (the
prompt under completion-only loss) — so the gradients they start from are those of the
loss SFTTrainer trains; there is no pre-pass to write. Checkpoints and ``save_model``
also write ``<folder>/lorakit_adapter`` (``lorakit.load(base_model, folder)`` reloads it).
Everything else is ``lorakit.integrations.transformers.prepare``.
"""

from __future__ import annotations

from typing import Any

from lorakit.config import AdapterConfig
from lorakit.errors import LorakitError
from lorakit.integrations import transformers as hf


def prepare(trainer: Any, config: AdapterConfig | None = None, **options: Any) -> Any:
    """``lorakit.integrations.transformers.prepare`` for a TRL trainer, refusing one built with
    ``peft_config`` (two adapter libraries on one model). Returns the trainer."""
    if getattr(trainer.model, "peft_config", None) is not None:
        raise LorakitError("this TRL trainer was built with peft_config, so PEFT already adapted the model; "
                           "build it without peft_config and let lorakit add the adapters")
    return hf.prepare(trainer, config, **options)
