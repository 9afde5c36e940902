"""Gradient estimation: the statistics lora-ga and lora-sb initialise from.

    stats = lorakit.estimate(model, config, data)          # layer name -> LayerStats
    lorakit.save_stats(stats, "grads.safetensors")          # reuse across runs and methods
    lorakit.adapt(model, config, stats=lorakit.load_stats("grads.safetensors"))

G is the gradient of the training loss over ``config.estimation.num_samples`` examples — for a
causal LM by default the mean over all their supervised tokens, the objective transformers'
LMs and lorakit's recipe train (``estimation.weighting``; see ``lorakit.estimate.loss``) — w.r.t.
every target weight, computed from hooks on the target layers with all weights frozen (no ``.grad``).
The model runs in eval mode (dropout off) unless ``estimate_dropout``; its modes and
``requires_grad`` flags are restored afterwards.

Estimators (``config.estimation.estimator``):
- ``"exact"``: G per layer (out × in, float32; float64 for float64 models), on
  ``estimate_device`` if given. With ``memory_budget``, layers are split into consecutive
  groups whose G fit the budget, one pass per group; under ``lorakit.adapt`` each group's G is
  reduced to what the init needs (its top singular triplets) before the next group's pass, so
  the budget bounds the peak.
- ``"sketch"``: randomized SVD of G from 2q + 2 passes (``power_iters`` = q), O((out+in)·k)
  memory per layer, k = 2·rank (lora-ga) or rank (lora-sb) plus ``oversample``.
- ``"auto"`` (default): ``"exact"`` in one pass when there is no ``memory_budget`` or all
  target G fit it; otherwise ``"exact"`` in layer groups when the init needs G itself
  (lora-sb with ``update="sign"``), else ``"sketch"``.
With ``checkpointing``, each block's activations are recomputed in backward (the same statistics for
less memory; ``lorakit.estimate.checkpointing``).
Under torch.distributed each rank passes its own shard of the data and uses its share of
``num_samples``; the statistics are summed over ranks after each pass (identical on every rank).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from torch import nn
from tqdm.auto import tqdm

from lorakit.adapters import LowRankAdapter
from lorakit.adapters.layers import kind_of
from lorakit.config import AdapterConfig
from lorakit.errors import LorakitError
from lorakit.estimate.cache import load_stats, save_stats
from lorakit.estimate.checkpointing import activation_checkpointing
from lorakit.estimate.data import collect_batches
from lorakit.estimate.distributed import local_share, rank_and_world
from lorakit.estimate.engine import estimation_mode, run_pass
from lorakit.estimate.exact import GradientAccumulator, gradient_bytes, layer_shape, plan_groups
from lorakit.estimate.loss import LossFn, example_loss_fn
from lorakit.estimate.sketch import sketch_bytes, sketch_svd
from lorakit.estimate.stats import EstimationReport, GradientStatistics, LayerStats
from lorakit.inject import find_targets

logger = logging.getLogger("lorakit")

__all__ = [
    "EstimationReport",
    "GradientStatistics",
    "LayerStats",
    "choose_estimator",
    "estimate",
    "load_stats",
    "needed_rank",
    "save_stats",
]


def needed_rank(config: AdapterConfig) -> int:
    """Singular directions of G the init uses (2r for lora-ga, r for lora-sb: its ``directions``)."""
    return config.initialisation.directions(config)


def choose_estimator(config: AdapterConfig, layers: dict[str, nn.Module]) -> tuple[str, list[list[str]]]:
    """(estimator, layer groups) by the rule in the module doc; groups are one pass each (exact)."""
    budget = config.estimation.memory_budget_bytes
    estimator = config.estimation.estimator
    if estimator == "auto":
        fits = budget is None or sum(gradient_bytes(m) for m in layers.values()) <= budget
        estimator = "exact" if fits or config.initialisation.needs_exact_gradient(config) else "sketch"
    if estimator == "sketch":
        return "sketch", [list(layers)]
    return "exact", plan_groups(layers, budget)


def _target_layers(model: nn.Module, config: AdapterConfig, targets: list[str] | None) -> dict[str, nn.Module]:
    names = find_targets(model, config) if targets is None else list(targets)
    if not names:
        raise LorakitError("no target layers to estimate gradients for; check config.targets")
    layers = {}
    for name in names:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise LorakitError(f"target {name!r} is not a module of this model") from None
        if isinstance(layer, LowRankAdapter):  # an installed adapter: G of its base weight (lorakit.recipes.fsdp)
            layer = layer.base_layer
        kind = kind_of(layer)
        if kind is None or not kind.estimable:  # not Embedding, whose input is token ids (lorakit.adapters.layers)
            raise LorakitError(f"target {name!r} is a {type(layer).__name__}; estimation needs nn.Linear, Conv1D (quantized "
                               "or not) or nn.Conv2d layers")
        kind.check(layer)
        layers[name] = layer
    k = needed_rank(config)
    for name, layer in layers.items():
        if k > min(layer_shape(layer)):
            raise LorakitError(
                f"{config.init_method} needs {k} singular directions of G but layer {name!r} is "
                f"{' × '.join(map(str, layer_shape(layer)))}; lower rank to at most {min(layer_shape(layer)) * config.rank // k} "
                "or leave the layer out of targets"
            )
    return layers


def estimate(
    model: nn.Module,
    config: AdapterConfig,
    data: Any,
    targets: list[str] | None = None,
    *,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    compact: Callable[[str, LayerStats], LayerStats] | None = None,
) -> GradientStatistics:
    """Estimate the gradient statistics of every target layer of the plain (un-adapted) model.

    ``data``: a DataLoader, an iterable of batches or a list of examples, with ``labels``
    (see ``lorakit.estimate.data``). ``targets``: layer names (default: ``config.targets``; the
    name of an installed adapter means its base layer).
    ``loss_fn(outputs, batch) -> (per-example loss terms ℓ (b,), weights w (b,))`` overrides the
    default (G = ∇Σℓ / Σw; a bool second value marks valid examples whose ℓ are their means). Returns layer name -> ``LayerStats``, with ``.report``.
    ``compact(name, layer_stats)``: applied to each exact layer group's statistics as soon as the group
    is estimated, before the next group's G exist (``lorakit.adapt`` passes the init's own
    ``Initialisation.compact``, so ``memory_budget`` bounds the peak, not only each pass).
    """
    start = time.perf_counter()
    layers = _target_layers(model, config, targets)
    rank, world = rank_and_world()
    options = config.estimation
    if options.num_samples < world:
        raise LorakitError(f"num_samples={options.num_samples} is smaller than the {world} ranks; use num_samples ≥ {world}")
    batches = collect_batches(data, local_share(options.num_samples, rank, world), require_labels=loss_fn is None)
    loss_fn = loss_fn or example_loss_fn(model, options.weighting)
    estimator, groups = choose_estimator(config, layers)
    k = needed_rank(config)
    passes = len(groups) if estimator == "exact" else 2 * options.power_iters + 2
    if estimator == "sketch" and options.memory_budget_bytes is not None:
        need = sum(sketch_bytes(m, k, options.oversample) for m in layers.values())
        if need > options.memory_budget_bytes:
            logger.warning("lorakit: the sketches need about %s bytes, more than memory_budget", f"{need:,}")

    stats = GradientStatistics()
    samples = 0
    bar = tqdm(total=passes * len(batches), desc=f"lorakit {estimator} estimate", unit="batch", leave=False, disable=not progress or rank != 0)
    pass_index = 0

    def one_pass(accumulators: dict) -> None:
        nonlocal samples, pass_index
        pass_index += 1
        bar.set_description(f"lorakit {estimator} estimate, pass {pass_index}/{passes}")
        samples = run_pass(model, batches, layers, accumulators, loss_fn, bar)

    try:
        with estimation_mode(model, options.dropout), activation_checkpointing(model, layers, options.checkpointing, options.dropout):
            if estimator == "exact":
                for group in groups:
                    accumulators = {n: GradientAccumulator(layers[n], options.device) for n in group}
                    one_pass(accumulators)
                    for n in group:
                        found = LayerStats(grad=accumulators.pop(n).G)
                        stats[n] = compact(n, found) if compact is not None else found
                        del found  # with compact, this G is freed here, before the next group's pass
            else:
                svds = sketch_svd(layers, k, options.oversample, options.power_iters, config.seed, one_pass)
                stats.update({n: LayerStats(svd=svd, rank=k) for n, svd in svds.items()})
    finally:
        bar.close()
    stats = GradientStatistics({n: stats[n] for n in layers}, report=EstimationReport(
        estimator=estimator, samples=samples, passes=passes, layers=len(layers), groups=len(groups),
        world_size=world, seconds=time.perf_counter() - start, rank=k if estimator == "sketch" else 0,
    ))
    logger.info("lorakit: %s", stats.report)
    return stats
