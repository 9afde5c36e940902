"""The training recipe: setup → estimate/init → fit → evaluate → save.

    run(config)                       one training run into a run directory (files: see rundir.py and below)
    run(config, resume=RUN_DIR)       continue from RUN_DIR's last checkpoint
    evaluate_run(RUN_DIR)             reload a finished run and evaluate it on the test split

The run directory::

    config.yaml            the resolved config (re-runnable as is)
    run.json               what this directory is (task, method, base model, labels, status)
    metrics.jsonl          one line per optimizer step (loss, lr, grad_norm, throughput) and per evaluation
    results.json           test metrics, trainable parameters, init / train time, peak memory
    adapter/               the lorakit adapter (lorakit.load_adapter) — or model/ for full fine-tuning
    peft/                  the PEFT LoRA export (peft.PeftModel.from_pretrained(base, peft/))
    merged/                the merged model, when output.merged
    training_curves.png    loss, lr, grad-norm per step; validation metrics per epoch
    checkpoint/            the last checkpoint (train.checkpoint_every), for --resume
    tensorboard/           when tensorboard is installed

Under torchrun (see distributed.py) every process runs this recipe: estimation examples, training
batches and evaluation splits are sharded over the processes, DDP averages the gradients, and
rank 0 alone writes the run directory.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

import lorakit
from lorakit import optim as lk_optim
from lorakit.errors import LorakitError
from lorakit.io import atomic_directory
from lorakit.recipes import checkpoint as ckpt
from lorakit.recipes import data as D
from lorakit.recipes import distributed as dist_ctx
from lorakit.recipes import metrics as M
from lorakit.recipes import plots
from lorakit.recipes.config import RunConfig
from lorakit.recipes.models import LoadedModel, load_model
from lorakit.recipes.rundir import (RUN_FILE, RUN_FORMAT, MetricsLog, default_run_dir, peak_memory_mb, read_metrics,
                                    read_run, reset_peak_memory, write_json, write_yaml)

TORCH_THREADS = torch.get_num_threads()  # torch's own default, before any run changes it


# -- setup --------------------------------------------------------------------------------------
@dataclass
class Setup:
    cfg: RunConfig
    loaded: LoadedModel
    splits: D.Splits
    features: dict[str, list[dict[str, Any]]]  # train / validation / test, tokenised
    prompts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # causal-lm: prompt ids per eval split
    device: torch.device = torch.device("cpu")
    ctx: dist_ctx.Context = field(default_factory=dist_ctx.Context)  # the processes of a torchrun launch

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    @property
    def pad_id(self) -> int:
        return int(self.loaded.tokenizer.pad_token_id)


def pick_device(name: str, ctx: dist_ctx.Context | None = None) -> torch.device:
    """``train.device``; under torchrun with CUDA each process takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LorakitError(f"train.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and ctx is not None and ctx.active:
        return torch.device("cuda", ctx.local_rank)
    return device


def device_kind(name: str) -> str:
    """'cuda' or 'cpu': which process-group backend ``train.device`` needs."""
    return pick_device(name).type


def cpu_threads(requested: int | None) -> int:
    """``train.threads``, or by default the cores not already busy (1-minute load average):
    on a shared CPU, intra-op threads that wait for a busy core slow every step several-fold."""
    if requested:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    local_processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))  # torchrun's processes on this machine
    return max(1, min(TORCH_THREADS, round(cores - busy) // local_processes, cores // local_processes))


def setup(cfg: RunConfig, label_names: list[str] | None = None, ctx: dist_ctx.Context | None = None) -> Setup:
    """Data and model, tokenised; raises before anything is written when an input is bad."""
    ctx = ctx or dist_ctx.Context()
    device = pick_device(cfg.train.device, ctx)
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg.train.threads))
    splits = D.load_splits(cfg.data, cfg.task)
    if label_names is not None and splits.label_names is not None and label_names != splits.label_names:
        raise LorakitError(f"the data's labels {splits.label_names} differ from the run's {label_names}")
    if cfg.task == "classification" and splits.num_labels < 2:
        raise LorakitError(f"classification needs at least 2 classes, the data has {splits.num_labels}; check data.label_column")
    torch.manual_seed(cfg.train.seed)  # a fresh classifier head is drawn from this
    loaded = load_model(cfg.model, cfg.task, splits.num_labels or None)
    tok, n = loaded.tokenizer, cfg.model.max_length
    parts = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    prompts = {}
    if cfg.task == "classification":
        features = {k: D.encode_classification(v, tok, n) for k, v in parts.items()}
    else:
        features = {k: D.encode_causal(v, tok, n, cfg.data.template) for k, v in parts.items()}
        prompts = {k: D.encode_prompts(v, tok, n, cfg.data.template) for k, v in parts.items() if k != "train"}
    loaded.model.to(device)
    return Setup(cfg, loaded, splits, features, prompts, device, ctx)


def estimation_batches(s: Setup) -> list[dict[str, torch.Tensor]]:
    """The first examples of the epoch-0 order: the data lora-ga / lora-sb estimate from (each
    process takes its contiguous share; lorakit.estimate sums the statistics over processes)."""
    n = s.cfg.adapter_config().num_samples
    order = s.ctx.shard(D.epoch_order(len(s.features["train"]), s.cfg.train.seed, 0)[:n])
    return list(D.batches(s.features["train"], s.cfg.train.batch_size, s.pad_id, order))


def attach(s: Setup, warmup: int, progress: bool = True) -> float:
    """Full fine-tuning: unfreeze everything. Otherwise lorakit.adapt (estimating first when the
    method needs data). Returns the seconds it took."""
    start = time.perf_counter()
    model = s.model
    if s.cfg.is_full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        config = s.cfg.adapter_config(warmup)
        data = [D.to_device(b, s.device) for b in estimation_batches(s)] if config.needs_data else None
        lorakit.adapt(model, config, data=data, progress=progress)
    return time.perf_counter() - start


# -- optimisation ------------------------------------------------------------------------------
def steps_per_epoch(cfg: RunConfig, n_train: int, world: int = 1) -> int:
    return math.ceil(math.ceil(n_train / (cfg.train.batch_size * world)) / cfg.train.grad_accum)


def total_steps(cfg: RunConfig, n_train: int, world: int = 1) -> int:
    per_epoch = steps_per_epoch(cfg, n_train, world)
    return cfg.train.max_steps if cfg.train.max_steps else per_epoch * cfg.train.epochs


def warmup_steps(cfg: RunConfig, total: int) -> int:
    if cfg.optim.warmup_steps is not None:
        return cfg.optim.warmup_steps
    return int(cfg.optim.warmup_ratio * total)


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    o = cfg.optim
    return lk_optim.make_optimizer(model, name=o.name, lr=o.lr, weight_decay=o.weight_decay,
                                loraplus_ratio=o.loraplus_ratio, preconditioner=o.preconditioner, damping=o.damping)


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


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RunConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(cfg.optim.schedule, warmup_steps(cfg, total), total))


# -- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(s: Setup, split: str, progress: bool = True) -> dict[str, float]:
    """Classification: loss, accuracy, F1, MCC. Causal-LM: loss, perplexity, and exact match of
    the final number of greedy generations."""
    model, cfg, ctx = s.model, s.cfg, s.ctx
    if not s.features[split]:
        return {}
    features = ctx.shard(s.features[split])
    was_training = model.training
    model.eval()
    bs = cfg.eval.batch_size
    total_loss, weight, preds, labels = 0.0, 0, [], []
    bar = tqdm(total=len(features), desc=f"eval {split}", disable=not (progress and ctx.is_main), leave=False, unit="ex")
    for batch in D.batches(features, bs, s.pad_id):
        batch = D.to_device(batch, s.device)
        out = model(**batch)
        if cfg.task == "classification":
            n = batch["labels"].numel()
            preds += out.logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
        else:
            n = int((batch["labels"][:, 1:] != D.IGNORE_INDEX).sum())
        total_loss += float(out.loss) * n
        weight += n
        bar.update(batch["input_ids"].shape[0])
    bar.close()
    parts = ctx.gather((total_loss, weight, preds, labels), f"evaluating the {split} split")  # [ours] on one process
    total_loss, weight = sum(p[0] for p in parts), sum(p[1] for p in parts)
    preds, labels = [x for p in parts for x in p[2]], [x for p in parts for x in p[3]]
    mean_loss = total_loss / max(weight, 1)
    if cfg.task == "classification":
        result = {"loss": mean_loss, **M.classification_metrics(preds, labels, s.splits.num_labels)}
    else:
        generations = generate(s, split, progress)
        references = [ex["answer"] for ex in getattr(s.splits, split)]
        result = {"loss": mean_loss, "perplexity": M.perplexity(mean_loss), "exact_match": M.exact_match(generations, references)}
    model.train(was_training)
    return result


@torch.no_grad()
def generate(s: Setup, split: str, progress: bool = True) -> list[str]:
    """Greedy continuations of the split's prompts (left-padded batches)."""
    tok, out, ctx = s.loaded.tokenizer, [], s.ctx
    prompts = ctx.shard(s.prompts[split])
    bar = tqdm(total=len(prompts), desc=f"generate {split}", disable=not (progress and ctx.is_main), leave=False, unit="ex")
    for batch in D.batches(prompts, s.cfg.eval.batch_size, s.pad_id, left_pad=True):
        batch = D.to_device(batch, s.device)
        ids = s.model.generate(**batch, max_new_tokens=s.cfg.eval.max_new_tokens, do_sample=False,
                               pad_token_id=s.pad_id, eos_token_id=tok.eos_token_id)
        out += tok.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        bar.update(len(ids))
    bar.close()
    return [text for part in ctx.gather(out, f"generating on the {split} split") for text in part]


def primary_metric(task: str) -> str:
    return "accuracy" if task == "classification" else "exact_match"


# -- the recipe -------------------------------------------------------------------------------
@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, Any]


def run(cfg: RunConfig | None = None, resume: str | Path | None = None, quiet: bool = False) -> RunResult:
    """Train one model as ``cfg`` says (or resume the run in ``resume``); returns its results.
    Under torchrun every process calls this; all of them return the same results."""
    resumed = read_run(resume) if resume is not None else None
    cfg = resumed[2] if resumed is not None else cfg or RunConfig()
    with dist_ctx.running(device_kind(cfg.train.device), cfg.train.dist_timeout) as ctx:
        return _run(ctx, cfg, resumed, quiet)


def _new_run_dir(cfg: RunConfig) -> Path:
    run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise LorakitError(f"run directory {str(run_dir)!r} already exists; choose another output.dir or resume it with --resume")
    return run_dir


def _run(ctx: dist_ctx.Context, cfg: RunConfig, resumed: tuple[Path, dict[str, Any], RunConfig] | None,
         quiet: bool) -> RunResult:
    """``resumed``: read_run() of the run to continue, or None for a new run of ``cfg``."""
    if resumed is not None:
        run_dir, info, _ = resumed
        state = ckpt.read_state(run_dir)
        if info.get("status") == "done":
            raise LorakitError(f"{run_dir} already finished; start a new run instead of resuming it")
        ckpt.check_world_size(state, ctx.world)
    else:
        run_dir = ctx.agree(lambda: _new_run_dir(cfg), "choosing the run directory")
        state = None
    main = ctx.is_main
    progress = cfg.train.progress and not quiet and main
    say = print if main and not quiet else (lambda *a: None)

    # setup: every input check happens here, before the run directory exists
    s = setup(cfg, ctx=ctx)
    total = total_steps(cfg, len(s.features["train"]), ctx.world)
    warmup = warmup_steps(cfg, total)
    reset_peak_memory(s.device)
    if state is None:
        init_seconds = attach(s, warmup, progress)
        if ctx.active:  # dropout / NEFTune noise: one stream per process (the init above drew the same on all)
            torch.manual_seed(cfg.train.seed + 7919 * ctx.rank)
    else:  # the checkpoint holds the initialised + partly trained weights: no re-estimation
        if cfg.is_full:
            for p in s.model.parameters():
                p.requires_grad_(True)
        ckpt.load_model_state(run_dir, s.model, cfg.is_full)
        init_seconds = state.get("init_seconds", 0.0)
    check_identical(s)
    report = lorakit.parameter_report(s.model)
    say(f"{cfg.method}: {report}" + (f" · {ctx.world} processes × batch {cfg.train.batch_size}" if ctx.active else ""))

    resolved = cfg.to_dict()
    if not cfg.is_full:
        resolved["adapter"] = s.cfg.adapter_config(warmup).to_dict()
    info = {"format": RUN_FORMAT, "lorakit_version": lorakit.__version__, "task": cfg.task, "method": cfg.method,
            "base_model": s.loaded.path, "label_names": s.splits.label_names, "status": "training",
            "init_seconds": init_seconds, "world_size": ctx.world}
    metrics_path = run_dir / "metrics.jsonl"
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            write_yaml(run_dir / "config.yaml", resolved)
        write_json(run_dir / RUN_FILE, info)

    # fit
    optimizer = make_optimizer(s.model, cfg)
    scheduler = make_scheduler(optimizer, cfg, total)
    if state is not None:
        position = ckpt.restore_training_state(run_dir, state, optimizer, scheduler, ctx.rank)
        if main:
            with open(metrics_path, "r+b") as f:  # forget what was logged after the checkpoint
                f.truncate(position.metrics_offset)
    else:
        position = ckpt.Position(step=0, epoch=0, batch=0, metrics_offset=0)
        if main:
            metrics_path.write_text("")
    log = MetricsLog(metrics_path, run_dir / "tensorboard" if cfg.output.tensorboard else None) if main else NullLog()
    train_seconds = fit(s, optimizer, scheduler, total, position, log, run_dir, init_seconds, progress, state)

    # evaluate
    test = evaluate(s, "test", progress)
    log.write({"type": "eval", "split": "test", "step": total, **test})
    log.close()

    # save
    peak = peak_memory_mb(s.device)
    results = {
        "method": cfg.method, "task": cfg.task, "test": test,
        "trainable_params": report.trainable, "total_params": report.total,
        "init_seconds": init_seconds, "train_seconds": train_seconds,
        "peak_memory_mb": ctx.max(peak, "measuring memory") if peak is not None else None, "steps": total,
        "seed": cfg.train.seed, "world_size": ctx.world,
    }
    if main:
        save_outputs(s, run_dir, cfg)
        if cfg.output.plot:
            plots.training_curves(read_metrics(metrics_path), run_dir / "training_curves.png", f"{cfg.method} · {cfg.task}")
        write_json(run_dir / "results.json", results)
        write_json(run_dir / RUN_FILE, {**info, "status": "done"})
    ctx.barrier("rank 0 saved the outputs")
    say(f"test {primary_metric(cfg.task)}: {test.get(primary_metric(cfg.task), float('nan')):.4f}  "
        f"({', '.join(f'{k} {v:.4f}' for k, v in test.items())})")
    say(f"run directory: {run_dir}  (config.yaml, metrics.jsonl, results.json, "
        + ("model/" if cfg.is_full else "adapter/" + (", peft/" if cfg.output.peft else ""))
        + (", merged/" if cfg.output.merged and not cfg.is_full else "") + ", training_curves.png)")
    return RunResult(run_dir, results)


class NullLog:
    """The metrics log of ranks other than 0: they compute the same figures but write nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def offset(self) -> int:
        return 0

    def close(self) -> None:
        pass


def check_identical(s: Setup) -> None:
    """Every process must start from the same trainable weights (lorakit's inits are seeded per
    layer and the estimation statistics are all-reduced); a cheap fingerprint proves it."""
    if not s.ctx.active:
        return
    with torch.no_grad():
        fingerprint = [float(p.double().sum()) + float(p.double().square().sum())
                       for p in s.model.parameters() if p.requires_grad]
    prints = s.ctx.gather(fingerprint, "comparing the initial adapters")
    if any(p != prints[0] for p in prints[1:]):
        raise LorakitError("the processes initialised different trainable weights; check that every process loads "
                           "the same base model and config (a lorakit bug otherwise: please report it)")


def wrap_for_training(s: Setup) -> nn.Module:
    """DDP over the trainable parameters when several processes run (gradients averaged in backward)."""
    if not s.ctx.active:
        return s.model
    from torch.nn.parallel import DistributedDataParallel

    # no broadcast of the (large, frozen) base weights at init: check_identical proved the ranks agree;
    # no buffer broadcast before each forward: the models' buffers are constants
    names = inspect.signature(DistributedDataParallel).parameters
    options = {"init_sync": False} if "init_sync" in names else {}
    options.update({"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False})
    return DistributedDataParallel(s.model, device_ids=[s.device.index] if s.device.type == "cuda" else None, **options)


def loss_targets(task: str, batch: dict[str, torch.Tensor]) -> int:
    """How many terms the model's mean loss averages: examples, or supervised next tokens."""
    if task == "classification":
        return int(batch["labels"].numel())
    return int((batch["labels"][:, 1:] != D.IGNORE_INDEX).sum())


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


def fit(s: Setup, optimizer, scheduler, total: int, position: ckpt.Position, log, run_dir: Path,
        init_seconds: float, progress: bool, state: dict | None) -> float:
    """The training loop; resumes at ``position``. Returns the training seconds.

    Each micro-batch's mean loss is weighted by its share of the step's loss targets (over the
    accumulated micro-batches and all processes), so a step follows the gradient of the mean
    loss over every example it saw: N processes equal one process on the N-fold batch."""
    cfg, model, ctx = s.cfg, s.model, s.ctx
    engine = wrap_for_training(s)
    params = [p for p in model.parameters() if p.requires_grad]
    features = s.features["train"]
    accum = cfg.train.grad_accum
    n_batches = math.ceil(len(features) / (cfg.train.batch_size * ctx.world))
    clip = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else float("inf")
    neftune = lk_optim.enable_neftune(model, cfg.optim.neftune_alpha) if cfg.optim.neftune_alpha else None
    step, epoch, start_batch = position.step, position.epoch, position.batch
    seconds = (state or {}).get("train_seconds", 0.0)
    bar = tqdm(total=total, initial=step, desc=f"train {cfg.method}", disable=not progress, unit="step")
    model.train()
    while step < total:
        order = D.epoch_order(len(features), cfg.train.seed, epoch)
        b = start_batch
        while b < n_batches and step < total:
            t0 = time.perf_counter()
            group = [local_batch(s, order, i) for i in range(b, min(b + accum, n_batches))]
            local_targets = sum(n for _, n in group)
            global_targets = ctx.sum([local_targets], "counting the step's loss targets")[0]
            weighted_loss, examples, tokens = 0.0, 0, 0
            for k, (batch, n) in enumerate(group):
                last = k == len(group) - 1
                with engine.no_sync() if ctx.active and not last else nullcontext():
                    out = engine(**batch)
                    # a micro-batch without targets (an empty shard) still runs backward, weighted 0
                    loss = out.loss if n else out.logits.sum() * 0.0
                    (loss * (n * ctx.world / max(global_targets, 1))).backward()
                weighted_loss += float(loss.detach()) * n
                if n:
                    examples += batch["input_ids"].shape[0]
                    tokens += int(batch["attention_mask"].sum())
            weighted_loss, examples, tokens = ctx.sum([weighted_loss, examples, tokens], "summing the step's loss")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            b += len(group)
            step += 1
            dt = time.perf_counter() - t0
            seconds += dt
            loss_value = weighted_loss / max(global_targets, 1)
            log.write({"type": "train", "step": step, "epoch": epoch, "loss": loss_value, "lr": lr,
                       "grad_norm": grad_norm, "examples_per_s": examples / dt, "tokens_per_s": tokens / dt})
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < total:
                pos = ckpt.Position(step=step, epoch=epoch, batch=b, metrics_offset=log.offset())
                _checkpoint(s, run_dir, optimizer, scheduler, pos, init_seconds, seconds)
        if b >= n_batches or step >= total:
            if cfg.eval.every_epoch and s.features["validation"]:
                result = evaluate(s, "validation", progress)
                log.write({"type": "eval", "split": "validation", "step": step, "epoch": epoch, **result})
                model.train()
        epoch += 1
        start_batch = 0
    bar.close()
    if neftune is not None:
        neftune.remove()
    del engine  # DDP's gradient buckets
    model.eval()
    return seconds


def _checkpoint(s: Setup, run_dir: Path, optimizer, scheduler, position: ckpt.Position,
                init_seconds: float, train_seconds: float) -> None:
    """Rank 0 writes the checkpoint, with every process's random-number state."""
    rng = s.ctx.gather(ckpt.rng_state(), "gathering random states for a checkpoint")
    if s.ctx.is_main:
        path = ckpt.save_checkpoint(run_dir, s.model, s.cfg.is_full, optimizer, scheduler, position, rng)
        state = json.loads((path / "state.json").read_text())
        state.update(init_seconds=init_seconds, train_seconds=train_seconds)
        write_json(path / "state.json", state)
    s.ctx.barrier("rank 0 wrote a checkpoint")


def save_outputs(s: Setup, run_dir: Path, cfg: RunConfig) -> None:
    model, tok = s.model, s.loaded.tokenizer
    if cfg.is_full:
        with atomic_directory(run_dir / "model") as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        return
    lorakit.save_adapter(model, run_dir / "adapter")
    if cfg.output.peft:
        lorakit.export_peft(model, run_dir / "peft", base_model_name_or_path=s.loaded.path)
    if cfg.output.merged:
        export_merged(s, run_dir / "merged")


def export_merged(s: Setup, directory: Path) -> None:
    """Fold the adapters in and write a plain transformers model (the adapters are gone after)."""
    model = lorakit.merge(s.model)
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp)
        s.loaded.tokenizer.save_pretrained(tmp)


# -- reloading a finished run ------------------------------------------------------------------
def load_run(run_dir: str | Path, quiet: bool = True) -> tuple[Path, Setup]:
    """A finished run's model (base + adapter, or the full model) with its data, ready to evaluate."""
    path, info, cfg = read_run(run_dir)
    if info.get("status") != "done":
        raise LorakitError(f"{path} has not finished training; resume it with `lorakit train --resume {path}` first")
    if cfg.is_full:
        if not (path / "model" / "config.json").is_file():
            raise LorakitError(f"{path} has no model/ folder; the run did not save its model")
        cfg.model.name = str((path / "model").resolve())
        s = setup(cfg, info.get("label_names"))
    else:
        s = setup(cfg, info.get("label_names"))
        lorakit.load_adapter(s.model, path / "adapter")
    s.model.eval()
    return path, s


def evaluate_run(run_dir: str | Path, split: str = "test", quiet: bool = False) -> dict[str, float]:
    """``quiet`` hides the progress bars; the metrics line is always printed."""
    path, s = load_run(run_dir)
    result = evaluate(s, split, progress=s.cfg.train.progress and not quiet)
    print(f"{path}: {split} " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """Write RUN_DIR/peft or RUN_DIR/merged (or ``out``) from a finished run."""
    if fmt not in ("peft", "merged"):
        raise LorakitError(f"--format {fmt!r} is not valid; choose peft or merged")
    path, s = load_run(run_dir)
    target = Path(out) if out else path / fmt
    if s.cfg.is_full:
        if fmt == "peft":
            raise LorakitError("a full fine-tuning run has no adapter to export as PEFT; its model/ folder is the merged model")
        with atomic_directory(target) as tmp:
            s.model.save_pretrained(tmp)
            s.loaded.tokenizer.save_pretrained(tmp)
        return target
    if fmt == "peft":
        lorakit.export_peft(s.model, target, base_model_name_or_path=s.loaded.path)
    else:
        export_merged(s, target)
    return target
