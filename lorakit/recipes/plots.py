"""PNG plots of runs (matplotlib, headless). Each writer returns the path, or None without matplotlib."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

from lorakit.files import atomic_file


def _pyplot():
    if importlib.util.find_spec("matplotlib") is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _color(plt, i: int):
    """Distinct colours for up to 20 methods (the default cycle repeats after 10)."""
    return plt.get_cmap("tab20")((2 * i) % 20 + (i // 10) % 2)


def _save(fig, path: Path) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return path


def training_curves(records: Sequence[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Loss, learning rate and gradient norm per step, and the validation metrics at each evaluation."""
    plt = _pyplot()
    if plt is None:
        return None
    steps = [r for r in records if r.get("type") == "train"]
    evals = [r for r in records if r.get("type") == "eval" and r.get("split") == "validation"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    x = [r["step"] for r in steps]
    for ax, key, label in ((axes[0, 0], "loss", "training loss"), (axes[0, 1], "lr", "learning rate"),
                           (axes[1, 0], "grad_norm", "gradient norm")):
        ax.plot(x, [r[key] for r in steps], lw=1)
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    ax = axes[1, 1]
    metric_keys = sorted({k for r in evals for k, v in r.items() if isinstance(v, (int, float))} - {"step", "epoch"})
    for key in metric_keys:
        ax.plot([r["step"] for r in evals], [r.get(key) for r in evals], marker="o", label=key)
    ax.set_title("validation")
    ax.set_xlabel("step")
    if metric_keys:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def loss_curves(curves: dict[str, tuple[list[int], list[float]]], path: Path, title: str = "") -> Path | None:
    """One training-loss curve per method (smoothed by a running mean over ~5 % of the steps)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, (steps, losses)) in enumerate(curves.items()):
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, k - window + 1):k + 1]) / len(losses[max(0, k - window + 1):k + 1]) for k in range(len(losses))]
        ax.plot(steps, smooth, label=name, lw=1.3, color=_color(plt, i))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (running mean)")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def metric_vs_params(points: dict[str, tuple[int, float, float]], metric: str, path: Path) -> Path | None:
    """Metric (mean ± std over seeds) against trainable parameters, log x axis."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, (params, mean, std)) in enumerate(points.items()):
        ax.errorbar([max(params, 1)], [mean], yerr=[std], fmt="o", capsize=3, color=_color(plt, i))
        ax.annotate(name, (max(params, 1), mean), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs trainable parameters")
    ax.grid(alpha=0.3, which="both")
    out = _save(fig, path)
    plt.close(fig)
    return out
