"""Save and load lorakit adapters: safetensors tensors + a JSON description, nothing pickled.

A saved adapter holds only the adapters' tensors (factors, DoRA magnitudes, and the B₀, A₀
of a base offset so that a fresh base model can be brought to the same state), the full
state of ``modules_to_save``, and JSON: the config, each layer's shape and a fingerprint of
its original base weight so loading onto a different model fails loudly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lorakit
from lorakit.adaptation import CONFIG_ATTR, get_config
from lorakit.adapters import LowRankAdapter, is_supported_layer, weight_out_in
from lorakit.config import AdapterConfig
from lorakit.errors import LorakitError
from lorakit.inject import adapters_of, inject, resolve_modules_to_save
from lorakit.linalg import compute_dtype

CONFIG_FILE = "lorakit_adapter.json"
TENSOR_FILE = "adapter.safetensors"
FORMAT = "lorakit-adapter"
FORMAT_VERSION = 1
ADAPTER_PREFIX = "adapter."
MODULE_PREFIX = "module."
# Relative tolerance on the base-weight norm: loose enough for a bf16 copy of the same model.
FINGERPRINT_RTOL = 1e-2


@contextmanager
def atomic_directory(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``directory`` in one rename."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path (same suffix); on success it replaces ``path`` in one rename."""
    target = Path(path)
    tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def original_base_weight(adapter: LowRankAdapter) -> torch.Tensor:
    """W before any initialisation offset, in float32+."""
    W = adapter.base_weight.to(compute_dtype(adapter.base_weight.dtype))
    return W - adapter.base_offset() if adapter.has_offset else W


def adapter_tensors(adapter: LowRankAdapter) -> dict[str, torch.Tensor]:
    """The tensors that define an adapter: its parameters and any base-offset factors."""
    tensors = {n: p.detach() for n, p in adapter.named_parameters(recurse=False)}
    if adapter.has_offset:
        tensors.update(offset_A=adapter.offset_A, offset_B=adapter.offset_B)
    return tensors


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the model's adapters (and modules_to_save) to ``directory`` atomically."""
    config = get_config(model)
    adapters = adapters_of(model)
    if any(a.merged for a in adapters.values()):
        raise LorakitError("cannot save merged adapters; call unmerge() on them (or save before merging)")
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for name, adapter in adapters.items():
        for key, value in adapter_tensors(adapter).items():
            tensors[f"{ADAPTER_PREFIX}{name}.{key}"] = value.contiguous()
        layers[name] = {
            "structure": adapter.structure,
            "shape": [adapter.out_features, adapter.in_features],
            "base_norm": original_base_weight(adapter).norm().item(),
            "has_offset": adapter.has_offset,
        }
    saved_modules = resolve_modules_to_save(model, config)
    for module_name in saved_modules:
        for key, value in model.get_submodule(module_name).state_dict().items():
            tensors[f"{MODULE_PREFIX}{module_name}.{key}"] = value.detach().contiguous()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lorakit_version": lorakit.__version__,
        "model_class": type(model).__name__,
        "config": config.to_dict(),
        "layers": layers,
        "modules_to_save": saved_modules,
    }
    with atomic_directory(directory) as tmp:
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": FORMAT})
        write_json(tmp / CONFIG_FILE, meta)
    return Path(directory)


def read_adapter_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise LorakitError(f"{directory} is not a lorakit adapter directory (no {CONFIG_FILE}); pass the directory save_adapter wrote")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LorakitError(f"{path} is corrupt ({exc}); save the adapter again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LorakitError(f"{path} is not a lorakit adapter description; save the adapter again")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise LorakitError(f"{path} was written by a newer lorakit ({meta.get('lorakit_version')}); upgrade lorakit")
    return meta


def read_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(directory) / TENSOR_FILE
    if not path.is_file():
        raise LorakitError(f"{directory} has no {TENSOR_FILE}; save the adapter again")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for truncated or garbled files
        raise LorakitError(f"{path} is corrupt or truncated ({type(exc).__name__}); save the adapter again") from None


def _check_layers_match(model: nn.Module, meta: dict[str, Any]) -> None:
    modules = dict(model.named_modules())
    for name, layer in meta["layers"].items():
        module = modules.get(name)
        if module is None or not is_supported_layer(module):
            found = "missing" if module is None else f"a {type(module).__name__}"
            raise LorakitError(f"adapter does not match the model: layer {name!r} is {found} in this model; load it onto the model it was trained on")
        W = weight_out_in(module)
        if list(W.shape) != layer["shape"]:
            raise LorakitError(
                f"adapter does not match the model: layer {name!r} is {tuple(W.shape)} here but "
                f"{tuple(layer['shape'])} in the adapter; load it onto the model it was trained on"
            )
        norm = W.to(compute_dtype(W.dtype)).norm().item()
        if abs(norm - layer["base_norm"]) > FINGERPRINT_RTOL * max(layer["base_norm"], 1e-12):
            raise LorakitError(
                f"adapter does not match the model: layer {name!r} has different base weights "
                f"(norm {norm:.6g} vs {layer['base_norm']:.6g}); load it onto the base model it was trained on"
            )


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Add the adapters saved in ``directory`` to a fresh copy of their base model (in place)."""
    meta = read_adapter_meta(directory)
    tensors = read_tensors(directory)
    if adapters_of(model):
        raise LorakitError("model already has lorakit adapters; load onto a fresh base model")
    config = AdapterConfig.from_dict(meta["config"])
    _check_layers_match(model, meta)
    expected = {}
    adapters = inject(model, config, list(meta["layers"]))
    for name, adapter in adapters.items():
        has_offset = meta["layers"][name]["has_offset"]
        if has_offset:  # shapes come from the file; checked below against the other factors
            r0 = tensors.get(f"{ADAPTER_PREFIX}{name}.offset_A", torch.empty(0, 0)).shape[0]
            adapter.offset_A = torch.zeros(r0, adapter.in_features, **adapter._factory)
            adapter.offset_B = torch.zeros(adapter.out_features, r0, **adapter._factory)
        for key, value in adapter_tensors(adapter).items():
            expected[f"{ADAPTER_PREFIX}{name}.{key}"] = value
    for module_name in meta["modules_to_save"]:
        for key, value in model.get_submodule(module_name).state_dict().items():
            expected[f"{MODULE_PREFIX}{module_name}.{key}"] = value
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise LorakitError(f"{Path(directory) / TENSOR_FILE} does not match its description ({(missing or extra)[0]!r}); save the adapter again")
    with torch.no_grad():
        for key, target in expected.items():
            if target.shape != tensors[key].shape:
                raise LorakitError(f"tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {tuple(target.shape)}; save the adapter again")
            target.copy_(tensors[key])
    for name, adapter in adapters.items():
        if adapter.has_offset:
            adapter.apply_base_offset()
    setattr(model, CONFIG_ATTR, config)
    return model
