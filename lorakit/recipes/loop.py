"""The training loop: optimizer and schedule, one step, and ``fit`` — resumable at any step
and the same under N processes as one process on the N-fold batch.

    budget = Budget.of(cfg, n_train, world)          total steps and warm-up steps
    opt = Optimization.build(model, cfg, budget)     optimizer + LambdaLR schedule
    seconds = fit(s, opt, log, start=position, seconds=spent, progress=True, checkpoint=fn)

Loss weighting (``loss_weight``): each micro-batch's mean loss is weighted by its share of the
step's loss targets (examples, or supervised tokens for causal-lm) over the accumulated
micro-batches and all processes, so a step follows the gradient of the mean loss over every
target it saw.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit import optim as lk_optim
from lorakit.errors import LorakitError
from lorakit.recipes import checkpoint as ckpt
from lorakit.recipes import data as D
from lorakit.recipes.config import RunConfig
from lorakit.recipes.distributed import no_sync
from lorakit.recipes.fsdp import full_tensor, is_sharded
from lorakit.recipes.evaluation import evaluate, loss_targets
from lorakit.recipes.setup import Setup


# -- budget, optimizer, schedule -----------------------------------------------------------------
def steps_per_epoch(cfg: RunConfig, n_train: int, world: int = 1) -> int:
    return math.ceil(math.ceil(n_train / (cfg.train.batch_size * world)) / cfg.train.grad_accum)


@dataclass(frozen=True)
class Budget:
    total: int  # optimizer steps of the run
    warmup: int  # linear warm-up steps (lora-sb's first-step size depends on it)

    @classmethod
    def of(cls, cfg: RunConfig, n_train: int, world: int = 1) -> "Budget":
        total = cfg.train.max_steps or steps_per_epoch(cfg, n_train, world) * cfg.train.epochs
        warmup = cfg.optim.warmup_steps if cfg.optim.warmup_steps is not None else int(cfg.optim.warmup_ratio * total)
        return cls(total, warmup)


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    return lk_optim.make_optimizer(model, name=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                   loraplus_ratio=o.loraplus_ratio, preconditioner=o.preconditioner, damping=o.damping,
                                   max_grad_norm=o.max_grad_norm)


class Schedule:
    """Linear warm-up over w steps, then linear decay to 0 / half-cosine / constant: a picklable
    LambdaLR multiplier (its state is plain numbers)."""

    def __init__(self, kind: str, warmup: int, total: int) -> None:
        self.kind, self.warmup, self.total = kind, warmup, total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0


def loss_scaler(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """float16 models train with loss scaling (torch.amp's GradScaler), so that small gradients do
    not underflow in fp16 activations; the tensors that train must then be float32 (lorakit's
    default adapter factors on a half-precision base), since fp16 parameters lose small updates."""
    if cfg.model.dtype != "float16":
        return None
    half = [n for n, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if half:
        what = "full fine-tuning" if cfg.is_full else f"adapter.adapter_dtype={cfg.adapter.get('adapter_dtype')}"
        raise LorakitError(
            f"float16 training of float16 parameters ({what}: {half[0]!r}, ...) loses small updates; use "
            "model.dtype=bfloat16 (or float32), or keep the adapter factors in float32 (the default)"
        )
    return torch.amp.GradScaler(device.type)


def gradient_checkpointing(model: nn.Module, on: bool) -> None:
    """``train.gradient_checkpointing``: transformers' own ``activation_checkpointing_enable``
    (``gradient_checkpointing_enable`` before transformers 5.x; its
    default, non-reentrant torch.utils.checkpoint; it also makes the input embeddings' output
    require grad, as frozen-base training needs). Active in training mode only, so evaluation and
    generation run as before. Called once the adapters are attached (lora-ga / lora-sb estimate
    checkpointed through their own estimation.checkpointing, which RunConfig.adapter_config sets)."""
    if not on:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise LorakitError(f"train.gradient_checkpointing: {type(model).__name__} does not support gradient "
                           "checkpointing; set train.gradient_checkpointing=false")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    budget: Budget
    scaler: torch.amp.GradScaler | None = None  # float16 models: loss scaling

    @classmethod
    def build(cls, model: nn.Module, cfg: RunConfig, budget: Budget, device: torch.device | None = None) -> "Optimization":
        scaler = loss_scaler(model, cfg, device or torch.device("cpu"))
        gradient_checkpointing(model, cfg.train.gradient_checkpointing)
        optimizer = make_optimizer(model, cfg)
        schedule = Schedule(cfg.optim.schedule, budget.warmup, budget.total)
        return cls(optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), budget, scaler)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

    def step(self) -> float | None:
        """The optimizer step (which clips what it applies: optim.max_grad_norm bounds the preconditioned
        gradient), then the schedule. Returns the applied gradient's norm before clipping, or None when
        the loss scaler skipped the step (a scaled gradient overflowed). Raises NonFiniteGradient
        before changing any weight."""
        self.optimizer.grad_norm = None
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        norm = self.optimizer.grad_norm
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return None if norm is None else float(norm)


# -- several processes ---------------------------------------------------------------------------
def check_identical(s: Setup) -> None:
    """Every process must start from the same trainable weights (lorakit's inits are seeded per
    layer and the estimation statistics are all-reduced); a cheap fingerprint proves it."""
    if not s.ctx.active:
        return
    with torch.no_grad():
        fingerprint = [float(p.double().sum()) + float(p.double().square().sum())
                       for p in map(full_tensor, s.model.parameters()) if p.requires_grad]
    prints = s.ctx.gather(fingerprint, "comparing the initial adapters")
    if any(p != prints[0] for p in prints[1:]):
        raise LorakitError("the processes initialised different trainable weights; check that every process loads "
                           "the same base model and config (a lorakit bug otherwise: please report it)")


def wrap_for_training(s: Setup) -> nn.Module:
    """DDP over the trainable parameters when several processes run (gradients averaged in backward);
    a model sharded with FSDP2 (train.parallel=fsdp) averages its own gradients."""
    if not s.ctx.active or is_sharded(s.model):
        return s.model
    from torch.nn.parallel import DistributedDataParallel

    # no broadcast of the (large, frozen) base weights at init: check_identical proved the ranks agree;
    # no buffer broadcast before each forward: the models' buffers are constants
    names = inspect.signature(DistributedDataParallel).parameters
    options = {"init_sync": False} if "init_sync" in names else {}
    options.update({"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False})
    return DistributedDataParallel(s.model, device_ids=[s.device.index] if s.device.type == "cuda" else None, **options)


COMPILE_BACKEND = "inductor"  # torch.compile's default; the tests use "aot_eager" (same capture and autograd, no C++ build)


INDUCTOR_OPTIONS = {"fallback_random": True}  # aten's dropout masks, not inductor's generated ones (see compiled)


def compiled(engine: nn.Module, cfg: RunConfig) -> nn.Module:
    """The module the training step calls: ``torch.compile(engine)`` under train.compile, sharing its
    parameters (checkpoints, evaluation and saving use the uncompiled model).

    Inductor runs with ``fallback_random``: dropout masks come from aten's random ops, not inductor's
    generated ones, which on CPU cost more than the fusions gain (MiniLM, 1 thread: compiled step
    1.15× the eager one with inductor's random numbers, 1.02× with aten's; bench/floor.py --compile)."""
    if not cfg.train.compile:
        return engine
    options = {"options": INDUCTOR_OPTIONS} if COMPILE_BACKEND == "inductor" else {}
    return torch.compile(engine, backend=COMPILE_BACKEND, **options)


def loss_weight(targets: int, step_targets: int, world: int) -> float:
    """The factor on one micro-batch's mean loss before its backward.

    A micro-batch with ``targets`` loss terms (examples or supervised tokens) contributes
    ``targets / step_targets`` of the step's mean loss, where ``step_targets`` counts the terms
    of every micro-batch of the step on every process. DDP averages gradients over the
    ``world`` processes, which the extra factor ``world`` undoes. Summed over micro-batches and
    processes, the gradient is that of the mean loss over all the step's targets: N processes
    give one process on the N-fold batch (one process, equal micro-batches: exactly 1/accum).
    """
    return targets * world / max(step_targets, 1)


def local_batch(s: Setup, order: list[int], index: int) -> tuple[dict[str, torch.Tensor], int]:
    """This process's part of global micro-batch ``index`` (batch_size × processes examples of the
    epoch order) and its loss-target count; a process left with no example gets one with weight 0
    so that it still joins the gradient all-reduce."""
    cfg, features = s.cfg, s.features["train"]
    span = cfg.train.batch_size * s.ctx.world
    mine = s.ctx.shard(order[index * span:(index + 1) * span])
    if not mine:
        batch = D.collate([features[order[index * span]]], s.pad_id)
        return D.to_device(batch, s.device), 0
    batch = D.to_device(D.collate([features[j] for j in mine], s.pad_id), s.device)
    return batch, loss_targets(cfg.task, batch)


# -- one step, and the loop ----------------------------------------------------------------------
class Diverged(LorakitError):
    """The loss or the gradient of a step is not finite: training stops before the step is applied."""


def check_finite_step(step: int, loss: float, grad_norm: float = 0.0) -> None:
    if math.isfinite(loss) and math.isfinite(grad_norm):
        return
    what = "loss" if not math.isfinite(loss) else "gradient norm"
    raise Diverged(
        f"training diverged at step {step}: the {what} is {loss if what == 'loss' else grad_norm} (the step was not "
        "applied and no adapter was saved); lower optim.lr, keep optim.max_grad_norm on, or train in bfloat16/float32 "
        "rather than float16"
    )


def train_step(s: Setup, engine: nn.Module, group: list[tuple[dict[str, torch.Tensor], int]],
               opt: Optimization, step: int) -> dict[str, float | None]:
    """Forward/backward every micro-batch of step ``step`` (1-based), step the optimizer (which
    clips) and schedule. Returns the step's record (loss, lr, grad_norm: of the applied gradient
    before clipping, None for a step the loss scaler skipped; examples, tokens); raises
    ``Diverged`` before touching the weights when the loss or applied gradient is not finite."""
    ctx = s.ctx
    step_targets = ctx.sum([sum(n for _, n in group)], "counting the step's loss targets")[0]
    weighted_loss, examples, tokens = 0.0, 0, 0
    for k, (batch, n) in enumerate(group):
        last = k == len(group) - 1
        with no_sync(engine) if ctx.active and not last else nullcontext():
            out = engine(**batch)
            # a micro-batch without targets (an empty shard) still runs backward, weighted 0
            loss = out.loss if n else out.logits.sum() * 0.0
            opt.backward(loss * loss_weight(n, step_targets, ctx.world))
        weighted_loss += float(loss.detach()) * n
        if n:
            examples += batch["input_ids"].shape[0]
            tokens += int(batch["attention_mask"].sum())
    weighted_loss, examples, tokens = ctx.sum([weighted_loss, examples, tokens], "summing the step's loss")
    opt.unscale()
    loss_value = weighted_loss / max(step_targets, 1)
    # the same on every process (loss and gradients are all-reduced); under loss scaling an overflowed
    # gradient is the scaler's business (it skips the step and lowers the scale), a non-finite loss is not
    check_finite_step(step, loss_value)
    lr = opt.optimizer.param_groups[0]["lr"]
    try:
        grad_norm = opt.step()
    except lk_optim.NonFiniteGradient as exc:
        check_finite_step(step, loss_value, exc.norm)
        raise
    return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm,
            "examples": examples, "tokens": tokens}


def validate(s: Setup, log: Any, step: int, epoch: int, progress: bool) -> None:
    """Evaluate the validation split (when there is one) after ``step`` and log it; back to training mode."""
    if not s.features["validation"]:
        return
    result = evaluate(s, "validation", progress)
    log.write({"type": "eval", "split": "validation", "step": step, "epoch": epoch, **result})
    s.model.train()


# checkpoint(position, train_seconds): write a checkpoint of the state after ``position``
Checkpointer = Callable[[ckpt.Position, float], None]


def fit(s: Setup, opt: Optimization, log: Any, *, start: ckpt.Position | None = None, seconds: float = 0.0,
        progress: bool = True, checkpoint: Checkpointer | None = None) -> float:
    """Train from ``start`` (default: the beginning) to the end of the budget, writing a record
    per step to ``log`` and calling ``checkpoint`` every ``train.checkpoint_every`` steps.
    Returns the training seconds: ``seconds`` spent before a resume plus this call's."""
    cfg, model, ctx = s.cfg, s.model, s.ctx
    total = opt.budget.total
    engine = compiled(wrap_for_training(s), cfg)
    features = s.features["train"]
    accum = cfg.train.grad_accum
    n_batches = math.ceil(len(features) / (cfg.train.batch_size * ctx.world))
    neftune = lk_optim.enable_neftune(model, cfg.optim.neftune_alpha) if cfg.optim.neftune_alpha else None
    start = start or ckpt.Position(step=0, epoch=0, batch=0, metrics_offset=0)
    step, epoch, start_batch = start.step, start.epoch, start.batch
    bar = tqdm(total=total, initial=step, desc=f"train {cfg.method}", disable=not progress, unit="step")
    model.train()
    while step < total:
        order = D.epoch_order(len(features), cfg.train.seed, epoch)
        b = start_batch
        while b < n_batches and step < total:
            t0 = time.perf_counter()
            group = [local_batch(s, order, i) for i in range(b, min(b + accum, n_batches))]
            record = train_step(s, engine, group, opt, step + 1)
            b += len(group)
            step += 1
            dt = time.perf_counter() - t0
            seconds += dt
            log.write({"type": "train", "step": step, "epoch": epoch, "loss": record["loss"], "lr": record["lr"],
                       "grad_norm": record["grad_norm"], "examples_per_s": record["examples"] / dt,
                       "tokens_per_s": record["tokens"] / dt})
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            every = cfg.eval.every_steps
            if every and step % every == 0 and (b < n_batches and step < total or not cfg.eval.every_epoch):
                validate(s, log, step, epoch, progress)  # at an epoch's end the every_epoch evaluation below is it
            if checkpoint is not None and cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < total:
                checkpoint(ckpt.Position(step=step, epoch=epoch, batch=b, metrics_offset=log.offset()), seconds)
        if (b >= n_batches or step >= total) and cfg.eval.every_epoch:
            validate(s, log, step, epoch, progress)
        epoch += 1
        start_batch = 0
    bar.close()
    if neftune is not None:
        neftune.remove()
    del engine  # DDP's gradient buckets
    model.eval()
    return seconds
