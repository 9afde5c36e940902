"""Parameter groups built from the adapters' declared structure (LoRA+, weight decay).

Which tensor is an A or a B comes from ``adapter.low_rank_pair()`` and
``adapter.trainable_parameters()``, never from parameter names, so any adapter class
(and any model layout) groups correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lorakit.errors import LorakitError
from lorakit.inject import adapters_of

LORAPLUS_DEFAULT_RATIO = 16.0


@dataclass(frozen=True)
class TrainableLayout:
    """The model's trainable tensors by role.

    ``pairs``: (A, B) of every adapter whose A (r × in) and B (out × r) both train — what
    LoRA+ and Riemannian preconditioning act on. ``others``: every other trainable tensor
    (LoRA-FA's B, LoRA-XS's R, DoRA's magnitude, heads, biases), in model order.
    ``structures``: the adapter structures present.
    """

    pairs: list[tuple[nn.Parameter, nn.Parameter]]
    others: list[nn.Parameter]
    structures: tuple[str, ...]

    @property
    def has_adapters(self) -> bool:
        return bool(self.structures)


def trainable_layout(model: nn.Module) -> TrainableLayout:
    adapters = adapters_of(model)
    pairs = []
    for adapter in adapters.values():
        pair = adapter.low_rank_pair()
        if pair is not None and pair[0].requires_grad and pair[1].requires_grad:
            pairs.append(pair)
    in_pair = {id(p) for pair in pairs for p in pair}
    seen: set[int] = set()
    others = []
    for param in model.parameters():
        if param.requires_grad and id(param) not in in_pair and id(param) not in seen:
            others.append(param)
        seen.add(id(param))
    structures = tuple(sorted({a.structure for a in adapters.values()}))
    return TrainableLayout(pairs, others, structures)


def pair_needed_error(option: str, structures: tuple[str, ...]) -> LorakitError:
    """The error for LoRA+ / Riemannian preconditioning on adapters with no trainable (A, B) pair."""
    return LorakitError(
        f"{option} needs adapters whose A and B both train, but the adapters here ({', '.join(structures) or 'none'}) "
        "have no trainable (A, B) pair (lora-fa trains B, lora-xs / lora-sb train R); drop it or use lora, "
        "gaussian, pissa, lora-ga or dora"
    )


def resolve_loraplus_ratio(loraplus_ratio: float | bool | None) -> float | None:
    """None/False: LoRA+ off; True: the paper's default λ = 16; a number: λ (> 0)."""
    if loraplus_ratio is None or loraplus_ratio is False:
        return None
    if loraplus_ratio is True:
        return LORAPLUS_DEFAULT_RATIO
    if not isinstance(loraplus_ratio, (int, float)) or not loraplus_ratio > 0:
        raise LorakitError(f"loraplus_ratio must be True (λ = 16) or a positive number, got {loraplus_ratio!r}")
    return float(loraplus_ratio)


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    loraplus_ratio: float | bool | None = None,
    layout: TrainableLayout | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups, each tagged with a ``role``.

    - ``lora_A``: A of every trainable (A, B) pair, at ``lr``.
    - ``lora_B``: B of every pair, at ``λ·lr`` under LoRA+ (Hayou et al., 2024, arXiv 2402.12354), else ``lr``.
    - ``decay`` / ``no_decay``: every other trainable tensor at ``lr``; weight decay applies to
      matrices only (not to biases, norms or DoRA's magnitude, which decay would shrink to 0).
    Empty groups are left out.
    """
    layout = layout or trainable_layout(model)
    ratio = resolve_loraplus_ratio(loraplus_ratio)
    if ratio is not None and not layout.pairs:
        raise pair_needed_error("loraplus_ratio", layout.structures)
    if not layout.pairs and not layout.others:
        raise LorakitError("the model has no trainable parameters; call lorakit.adapt(model, config) first")
    groups = [
        {"role": "lora_A", "params": [a for a, _ in layout.pairs], "lr": lr, "weight_decay": weight_decay},
        {"role": "lora_B", "params": [b for _, b in layout.pairs], "lr": lr * (ratio or 1.0), "weight_decay": weight_decay},
        {"role": "decay", "params": [p for p in layout.others if p.dim() >= 2], "lr": lr, "weight_decay": weight_decay},
        {"role": "no_decay", "params": [p for p in layout.others if p.dim() < 2], "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]
