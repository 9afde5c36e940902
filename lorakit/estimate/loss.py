"""Per-example losses, so that every example weighs the same whatever the batching.

The estimated G is the gradient of ``L = (1/N) Σᵢ ℓᵢ`` over the N examples, where ``ℓᵢ``:
- sequence classification (logits (b, C), integer labels (b,)): cross-entropy of example i;
  float labels: mean squared error (``problem_type`` regression or one label) or mean binary
  cross-entropy over the labels (``multi_label_classification``);
- causal LM (a model that generates, not encoder-decoder; logits (b, L, V), labels (b, L)):
  the mean cross-entropy over example i's supervised tokens, predicting token t+1 from
  position t (transformers' shift) and skipping labels equal to -100;
- token classification / seq2seq (logits (b, L, C), labels (b, L), no shift): the mean over
  example i's tokens whose label is not -100.
An example with no supervised token has no loss and is not counted in N.
The model is called without ``labels``, so its own (batch-mean) loss is never used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.linalg import compute_dtype

IGNORE_INDEX = -100
# (model outputs, batch) -> (per-example losses (b,), which examples count (b,) bool)
LossFn = Callable[[Any, Mapping[str, Any]], tuple[Tensor, Tensor]]


def _logits(outputs: Any) -> Tensor:
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0] if isinstance(outputs, (tuple, list)) else outputs
    return logits.to(compute_dtype(logits.dtype))


def shifts_labels(model: nn.Module) -> bool:
    """True for causal LMs, whose labels are the input ids and must be shifted by one."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "is_encoder_decoder", False):
        return False
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False


def _token_losses(logits: Tensor, labels: Tensor, shift: bool) -> tuple[Tensor, Tensor]:
    if shift:  # shift the labels, not the (large) logits, so the logits are never copied
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    b, length, classes = logits.shape
    per_token = F.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    count = (labels != IGNORE_INDEX).sum(dim=1)
    per_example = per_token.view(b, length).sum(dim=1) / count.clamp_min(1)
    return per_example, count > 0


def example_loss_fn(model: nn.Module) -> LossFn:
    """The default per-example loss for ``model`` (see module doc)."""
    shift = shifts_labels(model)
    problem = getattr(getattr(model, "config", None), "problem_type", None)

    def losses(outputs: Any, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        logits, labels = _logits(outputs), batch["labels"].to(_logits(outputs).device)
        if logits.dim() == 3 and labels.dim() == 2:
            return _token_losses(logits, labels.long(), shift)
        valid = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        if labels.is_floating_point():
            labels = labels.to(logits.dtype)
            if problem == "multi_label_classification":
                per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
            else:
                per = (logits.reshape(labels.shape) - labels) ** 2 if logits.numel() == labels.numel() else (logits - labels) ** 2
            return per.reshape(per.shape[0], -1).mean(dim=1), valid
        if logits.dim() == 2 and labels.dim() == 1:
            labels = labels.long()
            valid = labels != IGNORE_INDEX
            return F.cross_entropy(logits, labels.masked_fill(~valid, 0), reduction="none") * valid, valid
        raise LorakitError(
            f"cannot derive a per-example loss from logits of shape {tuple(logits.shape)} and labels of shape "
            f"{tuple(labels.shape)}; pass loss_fn=(outputs, batch) -> (losses (b,), valid (b,))"
        )

    return losses
