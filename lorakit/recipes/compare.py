"""Compare methods on the same data, seeds and budget.

A compare config is a train config (the shared base) plus a ``compare`` section::

    compare:
      seeds: [0, 1]
      methods:                 # name -> overrides of the base, in the train config's shape
        full: {adapter: {method: full}, optim: {lr: 5.0e-5}}
        lora: {adapter: {method: lora}}
        lora+: {adapter: {method: lora}, optim: {loraplus_ratio: 16}}

Every (method, seed) trains into ``<output.dir>/runs/<method>-seed<k>``; the comparison writes
``results.md`` and ``results.csv`` (method, trainable params, init time, train time, peak
memory, test metric mean ± std over seeds), ``loss_curves.png`` (training loss of every method,
first seed) and ``metric_vs_params.png``.
"""

from __future__ import annotations

import csv
import io
import statistics
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError
from lorakit.files import atomic_file
from lorakit.recipes import distributed as dist_ctx
from lorakit.recipes import plots
from lorakit.recipes.config import RunConfig, apply_overrides, deep_merge, from_dict, read_yaml, suggest
from lorakit.recipes.evaluation import primary_metric
from lorakit.recipes.rundir import read_metrics
from lorakit.recipes.runtime import device_kind
from lorakit.recipes.train import run

COMPARE_KEYS = ("seeds", "methods")


@dataclass
class CompareConfig:
    base: dict[str, Any]
    seeds: list[int]
    methods: dict[str, dict[str, Any]]
    output_dir: Path

    def run_config(self, method: str, seed: int) -> RunConfig:
        data = deep_merge(self.base, self.methods[method])
        data = deep_merge(data, {"train": {"seed": seed}, "output": {"dir": str(self.output_dir / "runs" / f"{_slug(method)}-seed{seed}")}})
        try:
            return from_dict(data)
        except LorakitError as exc:
            raise LorakitError(f"compare method {method!r}: {exc}") from None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else {"+": "plus"}.get(c, "_") for c in name)


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
    """Read and validate a compare config; every method's run config is checked before any training."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise LorakitError(f"{path}: a compare config must be a YAML mapping")
    section = data.pop("compare", None)
    if not isinstance(section, dict):
        raise LorakitError(f"{path} has no 'compare' section; add compare: {{methods: {{name: overrides}}, seeds: [0]}}")
    for key in section:
        if key not in COMPARE_KEYS:
            raise LorakitError(f"unknown config key 'compare.{key}'{suggest(str(key), COMPARE_KEYS)}; valid: compare.seeds, compare.methods")
    methods = section.get("methods")
    if not isinstance(methods, dict) or not methods:
        raise LorakitError("compare.methods must map method names to overrides, e.g. lora: {adapter: {method: lora}}")
    methods = {str(k): (v or {}) for k, v in methods.items()}
    for name, changes in methods.items():
        if not isinstance(changes, dict):
            raise LorakitError(f"compare method {name!r}: overrides must be a mapping like {{adapter: {{method: lora}}}}")
    seeds = section.get("seeds", [0])
    if isinstance(seeds, int):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise LorakitError("compare.seeds must be a non-empty list of integers")
    base = apply_overrides(data, overrides or [])
    out = (base.get("output") or {}).get("dir")
    output_dir = Path(out) if out else Path("runs") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    config = CompareConfig(base, seeds, methods, output_dir)
    for name in methods:
        for seed in seeds:
            config.run_config(name, seed)
    return config


@dataclass
class Row:
    method: str
    trainable_params: int | None = None
    init_seconds: float | None = None
    train_seconds: float | None = None
    peak_memory_mb: float | None = None
    mean: float | None = None
    std: float | None = None
    others: dict[str, float] | None = None
    error: str | None = None


def compare(config: CompareConfig, quiet: bool = False) -> tuple[list[Row], dict[str, Path]]:
    """Run every (method, seed), then write the tables and plots. Returns rows and written paths.
    Under torchrun every run uses all the processes; rank 0 alone writes and prints."""
    first = config.run_config(next(iter(config.methods)), config.seeds[0])
    with dist_ctx.running(device_kind(first.train.device), first.train.dist_timeout) as ctx:
        ctx.agree(lambda: _check_new(config.output_dir), "checking the output directory")
        return _compare(config, quiet or not ctx.is_main, ctx.is_main)


def _check_new(directory: Path) -> None:
    if directory.exists() and any(directory.iterdir()):
        raise LorakitError(f"output directory {str(directory)!r} already exists; choose another output.dir")


def _compare(config: CompareConfig, quiet: bool, writes: bool) -> tuple[list[Row], dict[str, Path]]:
    say = (lambda *a: None) if quiet else print
    rows, curves, paths = [], {}, {}
    task = config.run_config(next(iter(config.methods)), config.seeds[0]).task
    metric = primary_metric(task)
    for name in config.methods:
        results, error = [], None
        for seed in config.seeds:
            cfg = config.run_config(name, seed)
            say(f"== {name} (seed {seed})")
            try:
                outcome = run(cfg, quiet=quiet, metric_line=False)  # the table says it
            except Exception as exc:  # one failing method must not lose the others' results
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                say(f"!! {name} failed: {error}")
                if not isinstance(exc, LorakitError) and not quiet:
                    traceback.print_exc()
                break
            results.append(outcome.results)
            if seed == config.seeds[0] and writes:
                train = [r for r in read_metrics(outcome.run_dir / "metrics.jsonl") if r.get("type") == "train"]
                curves[name] = ([r["step"] for r in train], [r["loss"] for r in train])
        rows.append(_row(name, results, metric, error))
        if writes:
            paths = write_tables(rows, metric, config.output_dir)  # after every method: partial results survive a stop
    if not writes:
        return rows, paths
    for key, writer in (("loss_curves", lambda p: plots.loss_curves(curves, p, f"training loss · {task}")),
                        ("metric_vs_params", lambda p: plots.metric_vs_params(
                            {r.method: (r.trainable_params, r.mean, r.std or 0.0) for r in rows if r.error is None},
                            f"test {metric}", p))):
        written = writer(config.output_dir / f"{key}.png")
        if written is not None:
            paths[key] = written
    say(paths["markdown"].read_text())
    say("written: " + ", ".join(str(p) for p in paths.values()))
    return rows, paths


def _row(name: str, results: list[dict[str, Any]], metric: str, error: str | None) -> Row:
    if error is not None or not results:
        return Row(name, error=error or "no result")
    values = [r["test"][metric] for r in results]
    others = {k: statistics.fmean(r["test"][k] for r in results) for k in results[0]["test"] if k != metric}
    mean_of = lambda key: statistics.fmean(r[key] for r in results) if all(r.get(key) is not None for r in results) else None  # noqa: E731
    return Row(
        method=name,
        trainable_params=results[0]["trainable_params"],
        init_seconds=mean_of("init_seconds"),
        train_seconds=mean_of("train_seconds"),
        peak_memory_mb=max((r["peak_memory_mb"] for r in results if r.get("peak_memory_mb") is not None), default=None),
        mean=statistics.fmean(values),
        std=statistics.stdev(values) if len(values) > 1 else 0.0,
        others=others,
    )


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def write_tables(rows: list[Row], metric: str, directory: Path) -> dict[str, Path]:
    """results.csv (machine-readable) and results.md (metric as mean ± std)."""
    directory.mkdir(parents=True, exist_ok=True)
    other_keys = sorted({k for r in rows for k in (r.others or {})})
    header = ["method", "trainable_params", "init_s", "train_s", "peak_mem_mb", f"{metric}_mean", f"{metric}_std",
              *other_keys, "error"]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    for r in rows:
        writer.writerow([r.method, r.trainable_params, r.init_seconds, r.train_seconds, r.peak_memory_mb, r.mean, r.std,
                         *[(r.others or {}).get(k) for k in other_keys], r.error or ""])
    md = [f"| method | trainable params | init (s) | train (s) | peak mem (MB) | test {metric} (mean ± std) | "
          + " | ".join(other_keys) + (" |" if other_keys else ""),
          "|" + "---|" * (6 + len(other_keys))]
    for r in rows:
        if r.error:
            md.append(f"| {r.method} | failed: {r.error} |" + " |" * (4 + len(other_keys)))
            continue
        md.append(f"| {r.method} | {_fmt(r.trainable_params)} | {_fmt(r.init_seconds)} | {_fmt(r.train_seconds)} | "
                  f"{_fmt(r.peak_memory_mb, 0)} | {r.mean:.4f} ± {r.std:.4f} | "
                  + " | ".join(_fmt((r.others or {}).get(k), 4) for k in other_keys) + (" |" if other_keys else ""))
    paths = {"csv": directory / "results.csv", "markdown": directory / "results.md"}
    for key, text in (("csv", buffer.getvalue()), ("markdown", "\n".join(md) + "\n")):
        with atomic_file(paths[key]) as tmp:
            tmp.write_text(text)
    return paths
