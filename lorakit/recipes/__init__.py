"""Training recipes over the library: data, models, metrics, the train loop, comparisons.

The library (adapters, init, optim, export) knows nothing of training; everything that
loops over data lives here, and ``lorakit.cli`` is a thin layer over it.
"""

from lorakit.recipes.config import RunConfig, load_config
from lorakit.recipes.train import RunResult, evaluate_run, export_run, run

__all__ = ["RunConfig", "RunResult", "evaluate_run", "export_run", "load_config", "run"]
