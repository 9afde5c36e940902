"""The run directory's files: resolved config, run description, metrics log, peak memory.

``run.json`` marks a directory as a lorakit run (format, task, method, base model, label
names, status: training / done / failed / interrupted); every file is written under a
temporary name and renamed into place. A run holds ``.lock`` while it writes, so a second
process on the same directory is refused instead of interleaving its files.
"""

from __future__ import annotations

import json
import secrets
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml

from lorakit.errors import LorakitError
from lorakit.files import RunLock, atomic_file, json_text, write_json  # noqa: F401  (write_json: the recipes' one)
from lorakit.recipes.config import RunConfig, from_dict

RUN_FILE = "run.json"
RUN_FORMAT = "lorakit-run"


_ISSUED: set[Path] = set()


def default_run_dir(cfg: RunConfig) -> Path:
    """runs/<task>-<method>-<date>-<time>-<6 random hex>: two runs started in the same second differ
    (a name this process already gave out or that exists on disk is drawn again)."""
    stem = f"{cfg.task}-{cfg.method}-{datetime.now():%Y%m%d-%H%M%S}"
    while True:
        path = Path("runs") / f"{stem}-{secrets.token_hex(3)}"
        if path not in _ISSUED and not path.exists():
            _ISSUED.add(path)
            return path


def check_new_run_dir(run_dir: Path) -> Path:
    """Refuse an output.dir that is a file or holds anything (but the lock file of a run killed before it wrote)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise LorakitError(f"output.dir {str(run_dir)!r} is a file; choose a directory path")
    if run_dir.is_dir() and any(p.name != RunLock.FILE for p in run_dir.iterdir()):
        raise LorakitError(f"run directory {str(run_dir)!r} already exists; choose another output.dir or resume it with --resume")
    return run_dir


def create_run_dir(run_dir: Path) -> RunLock:
    """Create (or take an empty) run directory and lock it; refused when another run got there first."""
    check_new_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock.acquire(run_dir)
    if any(p.name != RunLock.FILE for p in run_dir.iterdir()):  # another run wrote here between the check and the lock
        lock.release()
        check_new_run_dir(run_dir)
    return lock


def write_yaml(path: Path, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(yaml.safe_dump(data, sort_keys=False))


def read_run(run_dir: str | Path) -> tuple[Path, dict[str, Any], RunConfig]:
    """(path, run.json, config) of a run directory, or a one-line error when it is not one."""
    path = Path(run_dir)
    if not path.is_dir():
        raise LorakitError(f"run directory {str(path)!r} does not exist; pass a directory written by `lorakit train`")
    info_file, config_file = path / RUN_FILE, path / "config.yaml"
    if not info_file.is_file() or not config_file.is_file():
        raise LorakitError(f"{str(path)!r} is not a lorakit run directory (no {RUN_FILE} / config.yaml); pass a directory written by `lorakit train`")
    try:
        info = json.loads(info_file.read_text())
    except json.JSONDecodeError:
        raise LorakitError(f"{info_file} is corrupt; the run directory cannot be used") from None
    if info.get("format") != RUN_FORMAT:
        raise LorakitError(f"{info_file} is not a lorakit run description")
    return path, info, from_dict(yaml.safe_load(config_file.read_text()))


class MetricsLog:
    """metrics.jsonl (+ TensorBoard when installed)."""

    def __init__(self, path: Path, tensorboard_dir: Path | None) -> None:
        self.path = path
        self.writer = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(tensorboard_dir))
            except ImportError:
                self.writer = None

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json_text(record) + "\n")  # strict JSON: a non-finite value is written as null
        if self.writer is not None:
            prefix = record.get("split", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, record["step"])

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def records(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float | None:
    """Peak CUDA memory allocated, or on CPU the process's peak resident memory since the reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None
