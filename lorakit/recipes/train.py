"""The training recipe: setup → estimate/init → fit → evaluate → save (``_run`` reads in that order).

    run(config)                       one training run into a run directory (files: see rundir.py and below)
    run(config, resume=RUN_DIR)       continue from RUN_DIR's last checkpoint
    evaluate_run(RUN_DIR)             reload a finished run and evaluate it on the test split
    evaluate_model(NAME, config)      score an untouched model on the config's test split (writes nothing)

The run directory::

    config.yaml            the resolved config (re-runnable as is)
    run.json               what this directory is (task, method, base model, labels, status)
    metrics.jsonl          one line per optimizer step (loss, lr, grad_norm, throughput) and per evaluation
    results.json           test metrics, trainable parameters, init / train time, peak memory
    samples.jsonl          causal-lm: the first test generations (prompt, generation, reference, correct)
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

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import lorakit
from lorakit.adapters.quantized import quantization_summary
from lorakit.errors import LorakitError
from lorakit.estimate.distributed import peer_errors
from lorakit.files import atomic_file, check_output_directory, json_text, output_directory
from lorakit.recipes import checkpoint as ckpt
from lorakit.recipes import distributed as dist_ctx
from lorakit.recipes import fsdp
from lorakit.recipes import plots
from lorakit.recipes.config import RunConfig
from lorakit.recipes.evaluation import evaluate, primary_metric
from lorakit.recipes.loop import Budget, Optimization, check_identical, fit
from lorakit.recipes.rundir import (RUN_FILE, RUN_FORMAT, MetricsLog, RunLock, check_new_run_dir, create_run_dir,
                                    default_run_dir, peak_memory_mb, read_metrics, read_run, reset_peak_memory,
                                    write_json, write_yaml)
from lorakit.recipes.runtime import device_kind
from lorakit.recipes.setup import Setup, attach, setup, unfreeze


@dataclass
class RunResult:
    run_dir: Path
    results: dict[str, Any]


def run(cfg: RunConfig | None = None, resume: str | Path | None = None, quiet: bool = False,
        metric_line: bool = True) -> RunResult:
    """Train one model as ``cfg`` says (or resume the run in ``resume``); returns its results.
    ``quiet`` hides progress and messages but not the final test-metric line (``metric_line``).
    Under torchrun every process calls this; all of them return the same results."""
    resumed = read_run(resume) if resume is not None else None
    cfg = resumed[2] if resumed is not None else cfg or RunConfig()
    with dist_ctx.running(device_kind(cfg.train.device), cfg.train.dist_timeout) as ctx:
        return _run(ctx, cfg, resumed, quiet, metric_line)


@dataclass
class Opened:
    """Where a run writes: its directory, the lock rank 0 holds on it, and the checkpoint to resume from."""

    run_dir: Path
    resuming: bool
    checkpoint: tuple[Path, dict[str, Any]] | None = None  # (directory, state.json); None: start from step 0
    lock: RunLock | None = None

    @property
    def state(self) -> dict[str, Any] | None:
        return self.checkpoint[1] if self.checkpoint else None


def _open(ctx: dist_ctx.Context, cfg: RunConfig, resumed: tuple[Path, dict[str, Any], RunConfig] | None) -> Opened:
    """A new run's directory is only checked here (created after setup and init succeed); a resumed
    run's directory is locked at once and its newest complete checkpoint found (none: start over)."""
    if resumed is None:
        run_dir = Path(cfg.output.dir) if cfg.output.dir else default_run_dir(cfg)
        return Opened(ctx.agree(lambda: check_new_run_dir(run_dir), "choosing the run directory"), resuming=False)
    run_dir, info, _ = resumed
    if info.get("status") == "done":
        raise LorakitError(f"{run_dir} already finished; start a new run instead of resuming it")
    lock = _on_main(ctx, lambda: RunLock.acquire(run_dir), "locking the run directory")
    checkpoint = ckpt.read_state(run_dir)
    if checkpoint is not None:
        ckpt.check_world_size(checkpoint[1], ctx.world)
    return Opened(run_dir, resuming=True, checkpoint=checkpoint, lock=lock)


def _on_main(ctx: dist_ctx.Context, take: Callable[[], RunLock], what: str) -> RunLock | None:
    """Rank 0 takes the run directory's lock (its error, if any, reaches every process); the
    others hold nothing."""
    held: list[RunLock] = []
    ctx.agree(lambda: held.append(take()), what)
    return held[0] if held else None


def _initialise(s: Setup, budget: Budget, opened: Opened, progress: bool) -> float:
    """From a checkpoint: its weights (the initialised and partly trained adapter: no
    re-estimation). Otherwise attach (and estimate). Returns the init seconds."""
    if opened.checkpoint is not None:
        directory, state = opened.checkpoint
        if s.cfg.is_full:
            unfreeze(s.model)
        ckpt.load_model_state(directory, s.model, s.cfg.is_full)
        if fsdp.enabled(s):  # loaded whole, then sharded as a new run is after its init
            fsdp.shard(s.model, lorakit.get_config(s.model), fsdp.mesh_of(s))
        return state.get("init_seconds", 0.0)
    seconds = (fsdp.attach if fsdp.enabled(s) else attach)(s, budget.warmup, progress)
    if s.ctx.active:  # dropout / NEFTune noise: one stream per process (the init above drew the same on all)
        torch.manual_seed(s.cfg.train.seed + 7919 * s.ctx.rank)
    return seconds


def _run(ctx: dist_ctx.Context, cfg: RunConfig, resumed: tuple[Path, dict[str, Any], RunConfig] | None,
         quiet: bool, metric_line: bool = True) -> RunResult:
    """``resumed``: read_run() of the run to continue, or None for a new run of ``cfg``."""
    fsdp.check_config(cfg, ctx)
    opened = _open(ctx, cfg, resumed)
    main = ctx.is_main
    progress = cfg.train.progress and not quiet and main
    say = print if main and not quiet else (lambda *a: None)
    if opened.resuming and opened.checkpoint is None:
        say(f"{opened.run_dir} has no complete checkpoint: training it again from the start")

    # setup: every input check happens here, before a new run's directory exists
    s = setup(cfg, ctx=ctx)
    for note in s.notes:
        say(note)
    budget = Budget.of(cfg, len(s.features["train"]), ctx.world)
    reset_peak_memory(s.device)
    init_seconds = _initialise(s, budget, opened, progress)
    check_identical(s)
    opt = Optimization.build(s.model, cfg, budget, s.device)
    report = lorakit.parameter_report(s.model)
    say(f"{cfg.method}: {report}" + (f" · {ctx.world} processes × batch {cfg.train.batch_size}" if ctx.active else ""))
    run_dir = opened.run_dir
    info = {"format": RUN_FORMAT, "lorakit_version": lorakit.__version__, "task": cfg.task, "method": cfg.method,
            "base_model": s.loaded.path, "label_names": s.splits.label_names, "status": "training",
            "init_seconds": init_seconds, "world_size": ctx.world}
    requantized = quantization_summary(s.model)
    if requantized is not None:  # an init moved W on a quantized base (QPiSSA): what re-quantizing it cost
        info["quantization_error"] = requantized
        say(f"re-quantized {requantized['layers']} {requantized['backend']} bases as W − s·B₀A₀: quantization error "
            f"{requantized['mean_residual']:.4f} (mean, max {requantized['max_residual']:.4f}) of ‖W‖, "
            f"against {requantized['mean_plain']:.4f} for re-quantizing W unchanged"
            + (" (W: the full-precision checkpoint's)" if requantized["from_full_precision"] else
               " (W: the dequantized base; adapter.full_precision_checkpoint=model takes the full-precision W, as QPiSSA does)"))
    if not opened.resuming:
        opened.lock = _on_main(ctx, lambda: create_run_dir(run_dir), "creating the run directory")
    if main:
        _write_run_files(s, run_dir, info, budget, new=opened.checkpoint is None)
    try:
        with peer_errors("training"):  # a process lost in a forward, backward or save: one line, not a hang
            results = _fit_evaluate_save(s, opened, opt, info, init_seconds, report, progress)
    except BaseException as exc:
        if main:  # the run directory says why it stopped; the last complete checkpoint stays
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            write_json(run_dir / RUN_FILE, {**info, "status": status, "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
        if isinstance(exc, KeyboardInterrupt):
            raise RunInterrupted(run_dir, ckpt.latest(run_dir)) from None
        raise
    finally:
        if opened.lock is not None:
            opened.lock.release()
    metric = primary_metric(cfg.task)
    test = results["test"]
    if main and (metric_line or not quiet):  # printed even with --quiet: the one line a run answers with
        print(f"test {metric}: {test.get(metric, float('nan')):.4f}  ({', '.join(f'{k} {v:.4f}' for k, v in test.items())})")
    written = ["config.yaml", "metrics.jsonl", "results.json"]
    written += ["model/"] if cfg.is_full else ["adapter/"] + (["peft/"] if cfg.output.peft else [])
    written += ["merged/"] if cfg.output.merged and not cfg.is_full else []
    written += ["training_curves.png"] if cfg.output.plot else []
    say(f"run directory: {run_dir}  ({', '.join(written)})")
    return RunResult(run_dir, results)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; knows where the run is and whether a checkpoint holds its progress."""

    def __init__(self, run_dir: Path, checkpoint: Path | None) -> None:
        super().__init__(str(run_dir))
        self.run_dir, self.checkpoint = run_dir, checkpoint


def _fit_evaluate_save(s: Setup, opened: Opened, opt: Optimization, info: dict[str, Any], init_seconds: float,
                       report: Any, progress: bool) -> dict[str, Any]:
    cfg, ctx, run_dir = s.cfg, s.ctx, opened.run_dir
    main = ctx.is_main

    # fit
    start = _restore(s, opened, opt)
    log = MetricsLog(run_dir / "metrics.jsonl", run_dir / "tensorboard" if cfg.output.tensorboard else None) if main else NullLog()

    def checkpoint(position: ckpt.Position, train_seconds: float) -> None:
        extra = {"init_seconds": init_seconds, "train_seconds": train_seconds}
        if opt.scaler is not None:
            extra["grad_scaler"] = opt.scaler.state_dict()
        _checkpoint(s, run_dir, opt, position, extra)

    try:
        train_seconds = fit(s, opt, log, start=start, seconds=(opened.state or {}).get("train_seconds", 0.0),
                            progress=progress, checkpoint=checkpoint)
        # evaluate
        test = evaluate(s, "test", progress)
        log.write({"type": "eval", "split": "test", "step": opt.budget.total, **test})
    finally:
        log.close()

    # save
    peak = peak_memory_mb(s.device)
    results = {
        "method": cfg.method, "task": cfg.task, "test": test,
        "trainable_params": report.trainable, "total_params": report.total,
        "init_seconds": init_seconds, "train_seconds": train_seconds,
        "peak_memory_mb": ctx.max(peak, "measuring memory") if peak is not None else None, "steps": opt.budget.total,
        "seed": cfg.train.seed, "world_size": ctx.world,
    }
    if fsdp.enabled(s):  # every process gathers its shards, rank 0 writes
        fsdp.save_outputs(s, run_dir)
    elif main:
        save_outputs(s, run_dir, cfg)
    if main:
        if cfg.output.plot:
            plots.training_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / "training_curves.png",
                                  f"{cfg.method} · {cfg.task}")
        write_json(run_dir / "results.json", results)
        if s.samples.get("test"):
            with atomic_file(run_dir / "samples.jsonl") as tmp:
                tmp.write_text("".join(json_text(sample) + "\n" for sample in s.samples["test"]))
        write_json(run_dir / RUN_FILE, {**info, "status": "done"})
    ctx.barrier("rank 0 saved the outputs")
    return results


def _write_run_files(s: Setup, run_dir: Path, info: dict[str, Any], budget: Budget, new: bool) -> None:
    """run.json, and when training starts from step 0 the resolved config.yaml (the adapter options as used)."""
    if new:
        resolved = s.cfg.to_dict()
        if not s.cfg.is_full:
            resolved["adapter"] = s.cfg.adapter_config(budget.warmup).to_dict()
        write_yaml(run_dir / "config.yaml", resolved)
    write_json(run_dir / RUN_FILE, info)


def _restore(s: Setup, opened: Opened, opt: Optimization) -> ckpt.Position:
    """Where training starts: the checkpoint's position (optimizer, schedule and RNG restored,
    metrics logged after it forgotten), or the beginning with an empty metrics log."""
    metrics = opened.run_dir / "metrics.jsonl"
    if opened.checkpoint is None:
        if s.ctx.is_main:
            metrics.write_text("")
        return ckpt.Position(step=0, epoch=0, batch=0, metrics_offset=0)
    directory, state = opened.checkpoint
    load = fsdp.optimizer_loader(s.model, opt.optimizer) if fsdp.enabled(s) else None
    position = ckpt.restore_training_state(directory, state, opt.optimizer, opt.scheduler, s.ctx.rank, load)
    if opt.scaler is not None and "grad_scaler" in state:
        opt.scaler.load_state_dict(state["grad_scaler"])
    if s.ctx.is_main:
        with open(metrics, "r+b") as f:
            f.truncate(position.metrics_offset)
    return position


class NullLog:
    """The metrics log of ranks other than 0: they compute the same figures but write nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def offset(self) -> int:
        return 0

    def close(self) -> None:
        pass


def _checkpoint(s: Setup, run_dir: Path, opt: Optimization, position: ckpt.Position, extra: dict[str, Any]) -> None:
    """Rank 0 writes the checkpoint, with every process's random-number state."""
    rng = s.ctx.gather(ckpt.rng_state(), "gathering random states for a checkpoint")
    gathered = fsdp.checkpoint_state(s.model, opt.optimizer, s.ctx.is_main) if fsdp.enabled(s) else {}
    if s.ctx.is_main:
        ckpt.save_checkpoint(run_dir, s.model, s.cfg.is_full, opt.optimizer, opt.scheduler, position, rng, extra, **gathered)
    s.ctx.barrier("rank 0 wrote a checkpoint")


def save_outputs(s: Setup, run_dir: Path, cfg: RunConfig) -> None:
    model, tok = s.model, s.loaded.tokenizer
    if cfg.is_full:
        with output_directory(run_dir / "model") as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        return
    lorakit.save_adapter(model, run_dir / "adapter")
    if cfg.output.peft:
        lorakit.export_peft(model, run_dir / "peft", base_model_name_or_path=s.loaded.path)
    if cfg.output.merged:
        export_merged(s, run_dir / "merged")


def export_merged(s: Setup, directory: Path, overwrite: bool = False) -> None:
    """Fold the adapters in and write a plain transformers model (the adapters are gone after)."""
    check_output_directory(directory, overwrite)  # refuse before merging
    model = lorakit.merge(s.model)
    with output_directory(directory, overwrite) as tmp:
        model.save_pretrained(tmp)
        s.loaded.tokenizer.save_pretrained(tmp)


# -- reloading a finished run ------------------------------------------------------------------
def load_run(run_dir: str | Path, quiet: bool = True) -> tuple[Path, Setup]:
    """A finished run's model (base + adapter, or the full model) with its data, ready to evaluate."""
    path, info, cfg = read_run(run_dir)
    if info.get("status") == "failed":
        raise LorakitError(f"{path} did not finish: training failed ({info.get('error', 'no reason recorded')})")
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
    return _evaluate_and_print(s, str(path), split, quiet)


def evaluate_model(model: str, cfg: RunConfig, split: str = "test", quiet: bool = False) -> dict[str, float]:
    """The "before" number: ``model`` as loaded (no adapter; a classifier's fresh head drawn from
    train.seed), on the split ``cfg``'s data gives, with its eval settings. Writes nothing."""
    s = setup(replace(cfg, model=replace(cfg.model, name=model)))  # the caller's config stays as it was
    s.model.eval()
    return _evaluate_and_print(s, model, split, quiet)


def _evaluate_and_print(s: Setup, name: str, split: str, quiet: bool) -> dict[str, float]:
    if not quiet:
        for note in s.notes:
            print(note)
    result = evaluate(s, split, progress=s.cfg.train.progress and not quiet)
    print(f"{name}: {split} " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, overwrite: bool = False) -> Path:
    """Write RUN_DIR/peft or RUN_DIR/merged (or ``out``) from a finished run. ``out`` must be new or
    empty unless ``overwrite`` (then lorakit's files in it are replaced, every other file kept);
    the default folder inside the run directory is lorakit's own and is refreshed."""
    if fmt not in ("peft", "merged", "vllm"):
        raise LorakitError(f"--format {fmt!r} is not valid; choose peft, vllm or merged")
    target = Path(out) if out else Path(run_dir) / fmt
    overwrite = overwrite or out is None
    check_output_directory(target, overwrite)  # before loading anything
    path, s = load_run(run_dir)
    if s.cfg.is_full:
        if fmt != "merged":
            raise LorakitError(f"a full fine-tuning run has no adapter to export as {fmt}; its model/ folder is a plain model "
                               "(vLLM serves it as is), or export it with --format merged")
        with output_directory(target, overwrite) as tmp:
            s.model.save_pretrained(tmp)
            s.loaded.tokenizer.save_pretrained(tmp)
        return target
    if fmt in ("peft", "vllm"):
        export = lorakit.export_vllm if fmt == "vllm" else lorakit.export_peft
        export(s.model, target, base_model_name_or_path=s.loaded.path, overwrite=overwrite)
    else:
        export_merged(s, target, overwrite)
    return target
