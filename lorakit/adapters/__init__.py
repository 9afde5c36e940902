"""Adapter structures: one small Module class each, registered by name."""

from lorakit.adapters.base import SUPPORTED_LAYERS, LowRankAdapter, is_linear_layer, is_supported_layer, weight_out_in
from lorakit.adapters.dora import DoRA
from lorakit.adapters.lora import LoRA, LoRAFA
from lorakit.adapters.xs import LoRAXS

ADAPTER_CLASSES: dict[str, type[LowRankAdapter]] = {
    cls.structure: cls for cls in (LoRA, LoRAFA, LoRAXS, DoRA)
}

__all__ = ["ADAPTER_CLASSES", "SUPPORTED_LAYERS", "DoRA", "LoRA", "LoRAFA", "LoRAXS", "LowRankAdapter", "is_linear_layer", "is_supported_layer", "weight_out_in"]
