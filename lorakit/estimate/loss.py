"""Per-example loss terms and weights, so that G is the gradient of a stated objective whatever
the batching.

The estimated G is the gradient of ``L = Σᵢ ℓᵢ / Σᵢ wᵢ`` over the estimation examples, where a
loss function returns per example i its loss term ℓᵢ and its weight wᵢ:
- causal LM (a model that generates, not encoder-decoder; logits (b, L, V), labels (b, L)),
  predicting token t+1 from position t (transformers' shift), skipping labels equal to -100:
  ``weighting="token"`` (default): ℓᵢ = the summed cross-entropy of example i's supervised
  tokens, wᵢ = their number — the mean over every supervised token, which is the loss
  transformers' causal LMs (and lorakit's training recipe) train on, so lora-sb's start is a
  step of the objective that training then follows; ``weighting="example"``: ℓᵢ = example i's
  mean token loss, wᵢ = 1 — every example weighs the same whatever its length;
- token classification / seq2seq (logits (b, L, C), labels (b, L), no shift): the same two
  weightings over the tokens whose label is not -100;
- sequence classification (logits (b, C), integer labels (b,)): cross-entropy, wᵢ = 1; float
  labels: mean squared error (``problem_type`` regression or one label) or mean binary
  cross-entropy over the labels (``multi_label_classification``).
An example with no supervised token weighs 0. The model is called without ``labels``, so its own
(batch-mean) loss is never used.
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
WEIGHTINGS = ("token", "example")
# (model outputs, batch) -> (per-example loss terms ℓ (b,), per-example weights w (b,)); G = ∇ Σℓ / Σw.
# A bool second value (the older form: valid examples, with ℓ their mean losses) means w = valid.
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


def _token_losses(logits: Tensor, labels: Tensor, shift: bool, weighting: str) -> tuple[Tensor, Tensor]:
    if shift:  # shift the labels, not the (large) logits, so the logits are never copied
        labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    b, length, classes = logits.shape
    per_token = F.cross_entropy(logits.reshape(-1, classes), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    count = (labels != IGNORE_INDEX).sum(dim=1).to(per_token.dtype)
    summed = per_token.view(b, length).sum(dim=1)
    if weighting == "token":
        return summed, count
    return summed / count.clamp_min(1), (count > 0).to(per_token.dtype)


def example_loss_fn(model: nn.Module, weighting: str = "token") -> LossFn:
    """The default loss terms and weights for ``model`` (see module doc)."""
    if weighting not in WEIGHTINGS:
        raise LorakitError(f"weighting={weighting!r} is not valid; choose 'token' (the training loss) or 'example'")
    shift = shifts_labels(model)
    problem = getattr(getattr(model, "config", None), "problem_type", None)

    def losses(outputs: Any, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        logits = _logits(outputs)
        labels = batch["labels"].to(logits.device)
        if logits.dim() == 3 and labels.dim() == 2:
            return _token_losses(logits, labels.long(), shift, weighting)
        ones = torch.ones(labels.shape[0], dtype=logits.dtype, device=labels.device)
        if labels.is_floating_point():
            labels = labels.to(logits.dtype)
            if problem == "multi_label_classification":
                per = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
            else:
                per = (logits.reshape(labels.shape) - labels) ** 2 if logits.numel() == labels.numel() else (logits - labels) ** 2
            return per.reshape(per.shape[0], -1).mean(dim=1), ones
        if logits.dim() == 2 and labels.dim() == 1:
            labels = labels.long()
            valid = labels != IGNORE_INDEX
            return F.cross_entropy(logits, labels.masked_fill(~valid, 0), reduction="none") * valid, valid.to(logits.dtype)
        raise LorakitError(
            f"cannot derive a per-example loss from logits of shape {tuple(logits.shape)} and labels of shape "
            f"{tuple(labels.shape)}; pass loss_fn=(outputs, batch) -> (losses (b,), weights (b,))"
        )

    return losses


def terms_and_weights(losses: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """A loss function's output as (ℓ, w): a bool second value marks valid examples (w = 0/1)."""
    if second.dtype == torch.bool:
        weights = second.to(losses.dtype)
        return losses * weights, weights
    return losses, second.to(losses.dtype)
