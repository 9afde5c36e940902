"""One pass over the kept examples: forward, per-example loss terms, backward through the taps.

Weighting (see ``lorakit.estimate.loss``): batch b contributes ``Σᵢ∈b ℓᵢ / n`` (n = examples
this rank holds), so batch sizes do not matter; after the pass the accumulators are turned
back into raw sums (× n), summed over ranks with the weights wᵢ, and divided by the global
weight W = Σᵢ wᵢ: G = ∇ (Σᵢ ℓᵢ) / W exactly, on one rank or many.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.estimate.data import Batch, batch_size, move
from lorakit.estimate.distributed import all_reduce_sum, is_distributed
from lorakit.estimate.hooks import tap_gradients
from lorakit.estimate.loss import LossFn, terms_and_weights


NO_LABELS = "no estimation example has a supervised label (all labels are -100); pass labelled examples"


class Accumulator(Protocol):
    def add(self, x: Tensor, delta: Tensor) -> None: ...
    def tensors(self) -> list[Tensor]: ...


@contextmanager
def estimation_mode(model: nn.Module, dropout: bool = False) -> Iterator[None]:
    """Eval mode (train mode if ``dropout``), every parameter frozen, grad enabled; all restored after."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.train(dropout)
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _forward_kwargs(model: nn.Module, batch: Batch) -> dict[str, Any]:
    """The batch minus labels (lorakit computes the per-example loss) and any key the forward does not take."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return inputs
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        inputs = {k: v for k, v in inputs.items() if k in params}  # e.g. a dataset's 'idx' column
    if "use_cache" in params:
        inputs.setdefault("use_cache", False)  # no key/value cache: it only costs memory here
    return inputs


def run_pass(
    model: nn.Module,
    batches: list[Batch],
    layers: dict[str, nn.Module],
    accumulators: dict[str, Accumulator],
    loss_fn: LossFn,
    progress: Any = None,
) -> int:
    """Feed every batch through the model, accumulate, reduce over ranks; returns the global count of
    examples that carry weight."""
    device = _model_device(model)
    held = sum(batch_size(b) for b in batches)
    weight, examples = 0.0, 0

    def sink(name: str, x: Tensor, delta: Tensor) -> None:
        accumulators[name].add(x, delta)

    watched = {n: layers[n] for n in accumulators}
    with tap_gradients(model, watched, sink) as reached:
        for index, batch in enumerate(batches):
            on_device = move(batch, device)
            outputs = model(**_forward_kwargs(model, on_device))
            losses, weights = terms_and_weights(*loss_fn(outputs, on_device))
            del outputs  # the logits need not outlive the loss (its graph keeps what backward needs)
            total = losses.sum() / held
            if not torch.isfinite(total.detach()).all():
                raise LorakitError(
                    f"the loss of estimation batch {index} is not finite ({total.item()}); check the model "
                    "and the labels (e.g. out-of-range class ids), or load the model in float32"
                )
            if bool((weights > 0).any()) and total.requires_grad:
                total.backward()
            weight += float(weights.sum())
            examples += int((weights > 0).sum())
            del total, losses  # release this batch's graph before the next forward
            if progress is not None:
                progress.update(1)
    missing = [n for n in watched if n not in reached]
    if missing:
        raise LorakitError(
            f"target layer {missing[0]!r} received no gradient from the loss"
            f"{f' (nor {len(missing) - 1} more)' if len(missing) > 1 else ''}; it is unused by the forward pass "
            "or does not affect the loss: leave it out of targets"
        )
    return _finish(accumulators, held, weight, examples)


def _finish(accumulators: dict[str, Accumulator], held: int, weight: float, examples: int) -> int:
    """Turn the accumulators (Σℓ's gradient / held) into G = ∇Σℓ / W over every rank; returns the examples counted."""
    tensors = [t for acc in accumulators.values() for t in acc.tensors()]
    if not is_distributed():
        if weight == 0:
            raise LorakitError(NO_LABELS)
        if held != weight:
            for t in tensors:
                t.mul_(held / weight)
        return examples
    counts = torch.tensor([weight, float(examples)], dtype=torch.float64, device=tensors[0].device if tensors else "cpu")
    all_reduce_sum([counts])
    total, examples = float(counts[0]), int(counts[1])
    if total == 0:
        raise LorakitError(NO_LABELS)
    for t in tensors:
        t.mul_(held)
    all_reduce_sum(tensors)
    for t in tensors:
        t.div_(total)
    return examples
