"""Save and load lorakit adapters: safetensors tensors + a JSON description, nothing pickled.

A saved adapter holds only the adapters' tensors (factors, DoRA magnitudes, and the B₀, A₀
of a base offset so that a fresh base model can be brought to the same state), the full
state of ``modules_to_save``, and JSON: the config, each layer's shape and a fingerprint of
its original base weight so loading onto a different model fails loudly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lorakit
from lorakit.adaptation import full_precision_of, get_config, mark_adapted
from lorakit.adapters import LowRankAdapter, is_supported_layer, weight_out_in
from lorakit.adapters.quantized import FullPrecisionWeights, full_precision_source
from lorakit.config import AdapterConfig
from lorakit.errors import LorakitError
from lorakit.files import output_directory, write_json
from lorakit.inject import adapters_of, build_adapters, install_adapters, resolve_modules_to_save
from lorakit.linalg import compute_dtype
from lorakit.named import activated

CONFIG_FILE = "lorakit_adapter.json"
TENSOR_FILE = "adapter.safetensors"
FORMAT = "lorakit-adapter"
FORMAT_VERSION = 2
ADAPTER_PREFIX = "adapter."
MODULE_PREFIX = "module."
FINGERPRINT_PREFIX = "fingerprint."
# Base-weight fingerprint: this many values of each target's original weight, at fixed positions.
FINGERPRINT_SIZE = 64
# Unit roundoff of each dtype: two copies of one checkpoint in different dtypes differ by at most this, relatively.
_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


def fingerprint_positions(numel: int, size: int = FINGERPRINT_SIZE) -> torch.Tensor:
    """Fixed positions in a flattened weight: evenly spread, first and last included."""
    return torch.linspace(0, numel - 1, min(size, numel), dtype=torch.float64).round().long()


def base_fingerprint(W: torch.Tensor) -> torch.Tensor:
    """A fixed sample of a base weight's values (float64), to recognise the weights an adapter belongs to."""
    flat = W.detach().reshape(-1)
    return flat[fingerprint_positions(flat.numel()).to(flat.device)].to("cpu", torch.float64)


def fingerprint_differs(saved: torch.Tensor, saved_dtype: torch.dtype, now: torch.Tensor, now_dtype: torch.dtype) -> float:
    """How far ``now`` is from ``saved`` beyond the rounding of either dtype (≤ 0: the same weights).

    The same checkpoint loaded in another dtype (fp32 ↔ bf16 ↔ fp16) differs by at most the two
    roundoffs, relatively; another fine-tune of the same base moves some values by more.
    """
    roundoff = _ROUNDOFF.get(saved_dtype, 2.0**-8) + _ROUNDOFF.get(now_dtype, 2.0**-8)
    scale = saved.abs().max().clamp_min(1e-30)
    allowed = 2 * roundoff * saved.abs() + 1e-6 * scale  # the absolute floor covers fp16 subnormals
    return float(((now - saved).abs() - allowed).max() / scale)


def check_finite(tensors: dict[str, torch.Tensor]) -> None:
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise LorakitError(
                f"adapter tensor {key!r} holds NaN or infinite values (training diverged); refusing to save it: "
                "lower the learning rate, keep max_grad_norm on, or use bfloat16 instead of float16"
            )


def layer_entries(name: str, adapter: LowRankAdapter) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """One adapter's tensors in the saved file (its tensors and its base weight's fingerprint) and its layer description."""
    tensors = {f"{ADAPTER_PREFIX}{name}.{key}": value.contiguous() for key, value in adapter_tensors(adapter).items()}
    original = adapter.original_fingerprint  # a re-quantized base no longer holds the original exactly
    tensors[f"{FINGERPRINT_PREFIX}{name}"] = base_fingerprint(original_base_weight(adapter)) if original is None else original
    layer = {
        "structure": adapter.structure,
        "shape": [adapter.out_features, adapter.in_features],
        "base_dtype": str(adapter.base_weight.dtype).removeprefix("torch."),
        "has_offset": adapter.has_offset,
    }
    if adapter.from_full_precision:  # its base is Q(W − s·B₀A₀) of the full-precision checkpoint's W
        layer["full_precision"] = True
    return tensors, layer


def module_entries(model: nn.Module, module_names: list[str]) -> dict[str, torch.Tensor]:
    """The full state of each of ``module_names`` (the modules_to_save) under its key in the saved file."""
    return {f"{MODULE_PREFIX}{module_name}.{key}": value.detach().contiguous()
            for module_name in module_names for key, value in model.get_submodule(module_name).state_dict().items()}


def model_class_name(model: nn.Module) -> str:
    """The model's class, not the subclass FSDP2's fully_shard makes of it (FSDP<name>)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch build without torch.distributed
        return type(model).__name__
    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule)).__name__


def save_adapter(model: nn.Module, directory: str | os.PathLike, overwrite: bool = False,
                 entries: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
                 adapter_name: str | None = None) -> Path:
    """Write the model's adapters (and modules_to_save) to ``directory``.

    ``directory`` must be new or empty, unless ``overwrite``: then lorakit's two files in it are
    replaced and any other file is kept. The write is atomic (see ``lorakit.files``); the JSON
    holds the tensor file's SHA-256, so a damaged file is refused on load. Non-finite tensors
    are refused (a diverged run must not ship its adapter). ``entries``: the (tensors, layers)
    of ``layer_entries`` / ``module_entries`` collected already, e.g. gathered from FSDP shards
    (lorakit.recipes.fsdp); default: read from the model. ``adapter_name``: that named adapter
    (``lorakit.named``) instead of the active one.
    """
    if adapter_name is not None:
        with activated(model, adapter_name):
            return save_adapter(model, directory, overwrite, entries)
    config = get_config(model)
    adapters = adapters_of(model)
    if any(a.merged for a in adapters.values()):
        raise LorakitError("cannot save merged adapters; call unmerge() on them (or save before merging)")
    saved_modules = resolve_modules_to_save(model, config)
    if entries is None:
        tensors: dict[str, torch.Tensor] = {}
        layers = {}
        for name, adapter in adapters.items():
            found, layers[name] = layer_entries(name, adapter)
            tensors.update(found)
        tensors.update(module_entries(model, saved_modules))
    else:
        tensors, layers = entries
    check_finite(tensors)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lorakit_version": lorakit.__version__,
        "model_class": model_class_name(model),
        "config": config.to_dict(),
        "layers": layers,
        "modules_to_save": saved_modules,
    }
    with output_directory(directory, overwrite) as tmp:
        save_file(tensors, str(tmp / TENSOR_FILE), metadata={"format": FORMAT})
        write_json(tmp / CONFIG_FILE, {**meta, "tensors_sha256": sha256_of(tmp / TENSOR_FILE)})
    return Path(directory)


def read_adapter_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise LorakitError(f"{directory} is not a lorakit adapter directory (no {CONFIG_FILE}); pass the directory save_adapter wrote")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LorakitError(f"{path} is corrupt ({exc}); the adapter cannot be loaded") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LorakitError(f"{path} is not a lorakit adapter description; pass the directory save_adapter wrote")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise LorakitError(f"{path} was written by a newer lorakit ({meta.get('lorakit_version')}); upgrade lorakit")
    if not isinstance(meta.get("layers"), dict) or not isinstance(meta.get("config"), dict):
        raise LorakitError(f"{path} is incomplete (no layers or config); the adapter cannot be loaded")
    return meta


def read_tensors(directory: str | os.PathLike, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``directory``'s adapter file, checked against ``sha256`` when given."""
    path = Path(directory) / TENSOR_FILE
    if not path.is_file():
        raise LorakitError(f"{directory} has no {TENSOR_FILE}; the adapter cannot be loaded")
    if sha256 is not None and sha256_of(path) != sha256:
        raise LorakitError(f"{path} does not match the checksum in {CONFIG_FILE} (the file changed or was damaged after "
                           "saving); the adapter cannot be loaded")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for truncated or garbled files
        raise LorakitError(f"{path} is corrupt or truncated ({type(exc).__name__}); the adapter cannot be loaded") from None


def _check_layers_match(model: nn.Module, meta: dict[str, Any], tensors: dict[str, torch.Tensor], check_base: bool,
                        full_precision: FullPrecisionWeights | None = None) -> None:
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
        if layer.get("full_precision"):  # the base was re-quantized from the full-precision W: it is needed again
            if full_precision is None:
                raise LorakitError(f"the base of layer {name!r} was re-quantized from a full-precision checkpoint; load the "
                                   "adapter inside lorakit.full_precision_weights(model, CHECKPOINT) with that checkpoint")
            full_precision.check(name, tuple(W.shape))
            if check_base:
                W = full_precision.weight(name, tuple(W.shape))
        if check_base:
            _check_base_weight(name, W, layer, tensors.get(f"{FINGERPRINT_PREFIX}{name}"))


def _check_base_weight(name: str, W: torch.Tensor, layer: dict[str, Any], fingerprint: torch.Tensor | None) -> None:
    hint = "load it onto the base model it was trained on (or pass check_base=False if you know better)"
    if fingerprint is None:  # format 1: the norm of the base weight, within 1 %
        norm = W.to(compute_dtype(W.dtype)).norm().item()
        if abs(norm - layer["base_norm"]) > 1e-2 * max(layer["base_norm"], 1e-12):
            raise LorakitError(f"adapter does not match the model: layer {name!r} has different base weights "
                               f"(norm {norm:.6g} vs {layer['base_norm']:.6g}); {hint}")
        return
    saved_dtype = getattr(torch, layer.get("base_dtype", "float32"), torch.float32)
    excess = fingerprint_differs(fingerprint, saved_dtype, base_fingerprint(W), W.dtype)
    if excess > 0:
        raise LorakitError(f"adapter does not match the model: layer {name!r} has different base weights (sampled values "
                           f"differ by up to {excess:.2g} of the weight's scale beyond rounding); {hint}")


def load_adapter(model: nn.Module, directory: str | os.PathLike, check_base: bool = True) -> nn.Module:
    """Add the adapters saved in ``directory`` to a fresh copy of their base model (in place).

    Everything is checked before the model is touched (file checksum, layers, shapes, every
    tensor, the base weights' fingerprint unless ``check_base=False``): a failed load leaves the
    model exactly as it was.
    """
    meta = read_adapter_meta(directory)
    tensors = read_tensors(directory, meta.get("tensors_sha256"))
    if adapters_of(model):
        raise LorakitError("model already has lorakit adapters; load onto a fresh base model")
    try:
        config = AdapterConfig.from_dict(meta["config"])
    except (LorakitError, TypeError) as exc:
        raise LorakitError(f"{Path(directory) / CONFIG_FILE} holds an invalid config ({exc}); the adapter cannot be loaded") from None
    full_precision = None
    if any(layer.get("full_precision") for layer in meta["layers"].values()):
        try:
            full_precision = full_precision_source(model, config.full_precision_checkpoint)
        except LorakitError as exc:  # the checkpoint the adapter remembers moved or changed
            raise LorakitError(f"{exc} (the adapter's bases were re-quantized from it: load the adapter inside "
                               "lorakit.full_precision_weights(model, CHECKPOINT) with its new place)") from None
    _check_layers_match(model, meta, tensors, check_base, full_precision)
    adapters = build_adapters(model, config, list(meta["layers"]))  # beside the model: nothing changed yet
    expected = {}
    for name, adapter in adapters.items():
        if meta["layers"][name]["has_offset"]:  # shapes come from the file; checked below against the other factors
            r0 = tensors.get(f"{ADAPTER_PREFIX}{name}.offset_A", torch.empty(0, 0)).shape[0]
            adapter.offset_A = torch.zeros(r0, adapter.in_features, **adapter.tensor_options())
            adapter.offset_B = torch.zeros(adapter.out_features, r0, **adapter.tensor_options())
        for key, value in adapter_tensors(adapter).items():
            expected[f"{ADAPTER_PREFIX}{name}.{key}"] = value
    saved_modules = meta.get("modules_to_save") or []
    modules = dict(model.named_modules())
    for module_name in saved_modules:
        if module_name not in modules:
            raise LorakitError(f"the adapter trains module {module_name!r}, which this model does not have; load it onto the model it was trained on")
        for key, value in modules[module_name].state_dict().items():
            expected[f"{MODULE_PREFIX}{module_name}.{key}"] = value
    stored = {k for k in tensors if not k.startswith(FINGERPRINT_PREFIX)}
    missing, extra = sorted(set(expected) - stored), sorted(stored - set(expected))
    if missing or extra:
        raise LorakitError(f"{Path(directory) / TENSOR_FILE} does not match its description ({(missing or extra)[0]!r}); "
                           "the adapter cannot be loaded")
    for key, target in expected.items():
        if target.shape != tensors[key].shape:
            raise LorakitError(f"tensor {key!r} has shape {tuple(tensors[key].shape)}, expected {tuple(target.shape)}; "
                               "the adapter cannot be loaded")
    # every check passed: now change the model
    with torch.no_grad():
        for key, target in expected.items():
            if key.startswith(ADAPTER_PREFIX):
                target.copy_(tensors[key])
    install_adapters(model, config, adapters)
    with torch.no_grad():
        for key, target in expected.items():
            if key.startswith(MODULE_PREFIX):
                target.copy_(tensors[key])
    for name, adapter in adapters.items():
        if adapter.has_offset:
            with full_precision_of(adapter, name, full_precision if meta["layers"][name].get("full_precision") else None):
                adapter.apply_base_offset()
    mark_adapted(model, config)
    return model
