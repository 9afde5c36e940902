"""lorakit's defaults, one value each, used by the library, the recipes and the CLI alike.

- ``RANK`` 16: the adapter rank r of ``AdapterConfig`` and of ``lorakit train``.
- ``LR`` 1e-3: the learning rate of ``make_optimizer`` and the Trainer helpers, and the lr behind
  lora-sb's first-step size η = lr / max(1, warmup_steps) when none is given. ``lorakit train``
  uses a method's own rate when ``optim.lr`` is not set (``Initialisation.training_lr``, e.g.
  1e-2 for the LoRA-XS structure, whose r × r core needs a larger step), and says so.
"""

RANK = 16
LR = 1e-3
FULL_FINETUNING_LR = 5e-5  # lorakit train's rate for adapter.method=full when optim.lr is not set
