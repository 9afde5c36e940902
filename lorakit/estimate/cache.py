"""Save and load gradient statistics as one safetensors file (no pickle).

Tensors are keyed ``<layer>/G`` (exact) or ``<layer>/U``, ``<layer>/S``, ``<layer>/V``
(sketch); the metadata holds a format tag, each sketch layer's rank and the estimation
report as JSON. Exact statistics serve both lora-ga and lora-sb at any rank; a sketch
serves any method needing at most the rank it was sized for.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from lorakit.errors import LorakitError
from lorakit.estimate.stats import EstimationReport, GradientStatistics, LayerStats
from lorakit.linalg import TopSVD

FORMAT = "lorakit-gradient-stats/1"


def save_stats(stats: dict[str, LayerStats], path: str | os.PathLike) -> Path:
    """Write ``stats`` to ``path`` (a .safetensors file), atomically."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for name, layer in stats.items():
        if layer.of != "gradient":
            raise LorakitError(f"layer {name!r} holds compacted statistics (the SVD of {layer.of}), which are not "
                               "saved; save the statistics lorakit.estimate returns without compact=")
        if layer.grad is not None:
            tensors[f"{name}/G"] = layer.grad
        else:
            tensors.update({f"{name}/U": layer.svd.U, f"{name}/S": layer.svd.S, f"{name}/V": layer.svd.V})
            ranks[name] = layer.rank
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    report = getattr(stats, "report", None)
    metadata = {
        "format": FORMAT,
        "layers": json.dumps(list(stats)),
        "ranks": json.dumps(ranks),
        "report": json.dumps(report.to_dict() if report is not None else None),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_stats(path: str | os.PathLike, device: str | torch.device = "cpu") -> GradientStatistics:
    """Read statistics written by ``save_stats``."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"no gradient statistics at {str(path)!r}; write them with lorakit.save_stats(stats, path)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as exc:
        raise LorakitError(f"{str(path)!r} is not a readable safetensors file ({exc}); re-run lorakit.estimate") from None
    if metadata.get("format") != FORMAT:
        raise LorakitError(f"{str(path)!r} does not hold lorakit gradient statistics (format {metadata.get('format')!r})")
    ranks = json.loads(metadata["ranks"])
    stats = GradientStatistics()
    for name in json.loads(metadata["layers"]):
        if f"{name}/G" in tensors:
            stats[name] = LayerStats(grad=tensors[f"{name}/G"])
        else:
            svd = TopSVD(tensors[f"{name}/U"], tensors[f"{name}/S"], tensors[f"{name}/V"])
            stats[name] = LayerStats(svd=svd, rank=int(ranks[name]))
    report = json.loads(metadata["report"])
    stats.report = EstimationReport(**report) if report else None
    return stats
