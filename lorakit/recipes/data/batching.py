"""Padding examples into batches, the seeded epoch order, and moving batches to a device."""

from __future__ import annotations

from typing import Any, Iterator

import torch

from lorakit.estimate.loss import IGNORE_INDEX


def collate(features: list[dict[str, Any]], pad_id: int, left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Pad to the longest example: input_ids, attention_mask, and labels (class ids, or -100-padded)."""
    width = max(len(f["input_ids"]) for f in features)

    def pad(seq: list[int], value: int) -> list[int]:
        fill = [value] * (width - len(seq))
        return fill + seq if left_pad else seq + fill

    batch = {
        "input_ids": torch.tensor([pad(f["input_ids"], pad_id) for f in features], dtype=torch.long),
        "attention_mask": torch.tensor([pad([1] * len(f["input_ids"]), 0) for f in features], dtype=torch.long),
    }
    if "label" in features[0]:
        batch["labels"] = torch.tensor([f["label"] for f in features], dtype=torch.long)
    elif "labels" in features[0]:
        batch["labels"] = torch.tensor([pad(f["labels"], IGNORE_INDEX) for f in features], dtype=torch.long)
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The training order of one epoch: a permutation fixed by (seed, epoch), so a resumed run
    sees exactly the batches an uninterrupted one would."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def batches(features: list[dict[str, Any]], batch_size: int, pad_id: int, order: list[int] | None = None,
            left_pad: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    order = list(range(len(features))) if order is None else order
    for start in range(0, len(order), batch_size):
        yield collate([features[i] for i in order[start:start + batch_size]], pad_id, left_pad)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}
