"""lorakit: low-rank adapters done right."""

from lorakit.adaptation import adapt, adapters_disabled, get_config
from lorakit.config import METHODS, AdapterConfig
from lorakit.errors import LorakitError
from lorakit.inject import adapters_of, parameter_report

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "AdapterConfig",
    "LorakitError",
    "adapt",
    "adapters_disabled",
    "adapters_of",
    "get_config",
    "parameter_report",
]
