"""Collect and keep the estimation examples, so every pass sees exactly the same data.

Accepted ``data``: a DataLoader or any iterable of batches (mappings of tensors with a
leading batch dimension, e.g. ``{"input_ids": (b, L), "attention_mask": (b, L),
"labels": (b,) or (b, L)}``), a single batch, or a list of single examples (mappings whose
``input_ids`` is 1-D: a list of ints or a 1-D tensor). Single examples are stacked into
batches of equal-shaped neighbours (no padding is invented); examples of different lengths
become separate batches. Iteration stops once ``num_samples`` examples are held; the last
batch is cut to size. Batches stay where the loader put them and move to the model's device
one at a time during a pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from lorakit.errors import LorakitError

Batch = dict[str, Any]
# Single examples are stacked into batches of at most this many equal-shaped examples.
EXAMPLES_PER_BATCH = 8


def batch_size(batch: Mapping[str, Any]) -> int:
    """Number of examples in a batch: the leading dimension of input_ids (or of its first tensor)."""
    for key in ("input_ids", "inputs_embeds", "labels"):
        value = batch.get(key)
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    for value in batch.values():
        if isinstance(value, Tensor) and value.dim() > 0:
            return value.shape[0]
    raise LorakitError("a batch holds no tensor with a batch dimension; pass mappings such as {'input_ids': (b, L) tensor, 'labels': ...}")


def _is_single_example(item: Mapping[str, Any]) -> bool:
    ids = item.get("input_ids")
    if ids is None:
        return False
    if isinstance(ids, Tensor):
        return ids.dim() == 1
    return isinstance(ids, (list, tuple)) and (not ids or not isinstance(ids[0], (list, tuple, Tensor)))


def _as_batch_of_one(example: Mapping[str, Any]) -> Batch:
    out = {}
    for key, value in example.items():
        if isinstance(value, Tensor):
            out[key] = value.unsqueeze(0)
        elif isinstance(value, (int, float, bool, list, tuple)):
            out[key] = torch.as_tensor(value).unsqueeze(0)
        else:
            out[key] = value  # strings and the like: passed through untouched
    return out


def _shapes(batch: Batch) -> tuple:
    return tuple((k, tuple(v.shape[1:]), v.dtype) if isinstance(v, Tensor) else (k, None) for k, v in batch.items())


def _stack(group: list[Batch]) -> Batch:
    if len(group) == 1:
        return group[0]
    return {k: torch.cat([b[k] for b in group]) if isinstance(v, Tensor) else [b[k] for b in group] for k, v in group[0].items()}


def _head(batch: Batch, n: int) -> Batch:
    """The first n examples of a batch (every tensor or list whose leading size is the batch size)."""
    size = batch_size(batch)
    out = {}
    for key, value in batch.items():
        if isinstance(value, (Tensor, list, tuple)) and len(value) == size and not (isinstance(value, Tensor) and value.dim() == 0):
            out[key] = value[:n]
        else:
            out[key] = value
    return out


def collect_batches(data: Any, num_samples: int, require_labels: bool = True) -> list[Batch]:
    """Keep the first ``num_samples`` examples of ``data`` as a list of batches (see module doc)."""
    if data is None:
        raise LorakitError("no estimation data: pass data=<a DataLoader, an iterable of batches or a list of examples>")
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, Iterable):
        raise LorakitError(f"data must be a DataLoader, an iterable of batches or a list of dicts, got {type(data).__name__}")
    batches: list[Batch] = []
    pending: list[Batch] = []  # single examples waiting to be stacked
    held = 0

    def flush() -> None:
        while pending:
            shape = _shapes(pending[0])
            n = 1
            while n < len(pending) and n < EXAMPLES_PER_BATCH and _shapes(pending[n]) == shape:
                n += 1
            batches.append(_stack(pending[:n]))
            del pending[:n]

    for index, item in enumerate(data):
        if held >= num_samples:
            break
        if not isinstance(item, Mapping):
            raise LorakitError(
                f"item {index} of the data is a {type(item).__name__}; lorakit needs mappings such as "
                "{'input_ids': ..., 'attention_mask': ..., 'labels': ...} (tokenize and collate first)"
            )
        if require_labels and "labels" not in item:
            raise LorakitError(
                f"item {index} of the data has no 'labels' (keys: {', '.join(map(str, item))}); gradient estimation "
                "needs labels (class ids, or token ids with -100 on positions to ignore)"
            )
        if _is_single_example(item):
            pending.append(_as_batch_of_one(item))
            held += 1
            if len(pending) >= EXAMPLES_PER_BATCH:
                flush()
            continue
        flush()
        batch = dict(item)
        size = batch_size(batch)
        if size == 0:
            continue
        take = min(size, num_samples - held)
        batches.append(batch if take == size else _head(batch, take))
        held += take
    flush()
    if held == 0:
        raise LorakitError("the estimation data is empty: pass at least one labelled example")
    return batches


def move(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
