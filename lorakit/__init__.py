"""lorakit: low-rank adapters done right."""

__version__ = "0.1.0"

from lorakit.adaptation import adapt, adapters_disabled, get_config
from lorakit.adapters.quantized import full_precision_weights
from lorakit.config import METHODS, AdapterConfig
from lorakit.errors import LorakitError
from lorakit.estimate import estimate, load_stats, save_stats
from lorakit.export import export_peft, export_vllm, merge
from lorakit.inject import adapters_of, parameter_report
from lorakit.io import load_adapter, save_adapter
from lorakit.named import active_adapter, add_adapter, adapter_names, delete_adapter, set_adapter
from lorakit.optim import enable_neftune, make_optimizer
from lorakit.peft_format import import_peft, load

__all__ = [
    "METHODS",
    "AdapterConfig",
    "LorakitError",
    "active_adapter",
    "adapt",
    "add_adapter",
    "adapter_names",
    "adapters_disabled",
    "adapters_of",
    "delete_adapter",
    "export_peft",
    "export_vllm",
    "full_precision_weights",
    "import_peft",
    "load",
    "load_adapter",
    "merge",
    "save_adapter",
    "set_adapter",
    "get_config",
    "parameter_report",
    "enable_neftune",
    "estimate",
    "load_stats",
    "save_stats",
    "make_optimizer",
]
