"""Read PEFT LoRA adapter folders into lorakit adapters; ``lorakit.load`` for either format.

A PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``) holds, per
adapted layer, ``base_model.model.<layer>.lora_A.weight`` (r × in) and ``.lora_B.weight``
(out × r), DoRA's ``.lora_magnitude_vector`` (out,), and the full state of its
``modules_to_save``. PEFT computes y = base(x) + s·(x Aᵀ) Bᵀ with s = lora_alpha / r (or
/ √r under ``use_rslora``) — lorakit's LoRA (DoRA) with the same A, B and s, so importing
is a copy. lorakit adapters share one rank and one scale per model: adapters whose
``rank_pattern`` / ``alpha_pattern`` give layers different ones are refused, as are PEFT
options with no lorakit counterpart (bias training, embedding adapters, …).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lorakit.adaptation import mark_adapted
from lorakit.adapters import is_supported_layer, weight_out_in
from lorakit.config import AdapterConfig
from lorakit.errors import LorakitError
from lorakit.export import PEFT_PREFIX
from lorakit.inject import adapters_of, build_adapters, install_adapters
from lorakit.named import adapter_names, load_beside, rename_active

PEFT_CONFIG = "adapter_config.json"
PEFT_TENSORS = "adapter_model.safetensors"
FACTOR_KEYS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "magnitude"}
# PEFT LoRA options lorakit has no counterpart for: (config key, the value that means "off")
UNSUPPORTED_OPTIONS = {
    "lora_bias": False, "use_qalora": False, "target_parameters": None, "trainable_token_indices": None,
    "layer_replication": None, "alora_invocation_tokens": None, "use_bdlora": None,
}
TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "SEQ_CLS": "AutoModelForSequenceClassification",
                "TOKEN_CLS": "AutoModelForTokenClassification"}


def is_peft_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / PEFT_CONFIG).is_file()


def read_peft_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The adapter_config.json of a PEFT LoRA folder, refused when lorakit cannot import it."""
    path = Path(directory) / PEFT_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LorakitError(f"{path} cannot be read ({type(exc).__name__}); pass a PEFT adapter folder") from None
    if not isinstance(config, dict):
        raise LorakitError(f"{path} is not a PEFT adapter config (not a JSON object)")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise LorakitError(f"{directory} is a PEFT {kind} adapter; lorakit imports PEFT LoRA adapters (peft_type LORA) only")
    for key, off in UNSUPPORTED_OPTIONS.items():
        if config.get(key, off) not in (off, [], {}):
            raise LorakitError(f"{path} sets {key}={config[key]!r}, which lorakit adapters do not support; "
                               "export that adapter merged (peft merge_and_unload) instead")
    return config


def read_peft_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(directory) / PEFT_TENSORS
    if not path.is_file():
        pickled = " (it has a pickled adapter_model.bin: re-save it with safe_serialization)" if (Path(directory) / "adapter_model.bin").exists() else ""
        raise LorakitError(f"{directory} has no {PEFT_TENSORS}{pickled}; lorakit loads safetensors only")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for truncated or garbled files
        raise LorakitError(f"{path} is corrupt or truncated ({type(exc).__name__}); the adapter cannot be loaded") from None


def _split_keys(tensors: dict[str, torch.Tensor], saved_names: list[str], modules: dict[str, nn.Module]):
    """(factors by layer: {role: tensor}, modules_to_save tensors by (module, key)) from PEFT's keys."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[tuple[str, str], torch.Tensor] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in FACTOR_KEYS if name.endswith("." + s)), None)
        if suffix is not None:
            layers.setdefault(name[: -len(suffix) - 1], {})[FACTOR_KEYS[suffix]] = value
            continue
        owner = next((m for m in sorted(modules, key=len, reverse=True)
                      if m and name.startswith(m + ".") and any(m == s or m.endswith("." + s) for s in saved_names)), None)
        if owner is None:
            raise LorakitError(f"PEFT adapter tensor {key!r} is neither a LoRA factor nor part of its modules_to_save; "
                               "lorakit imports LoRA/DoRA factors of Linear layers (no embedding adapters or bias training)")
        saved[(owner, name[len(owner) + 1:])] = value
    return layers, saved


def _layer_scale(config: dict[str, Any], rank: int) -> float:
    alpha = config.get("lora_alpha", 8)
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _check_shapes(layers: dict[str, dict[str, torch.Tensor]], modules: dict[str, nn.Module], dora: bool) -> int:
    """Every layer exists, is adaptable, has the factors its shapes need; returns the one shared rank."""
    ranks = set()
    for name, factors in layers.items():
        module = modules.get(name)
        if module is None or not is_supported_layer(module):
            found = "missing" if module is None else f"a {type(module).__name__}"
            raise LorakitError(f"PEFT adapter does not match the model: layer {name!r} is {found} in this model; "
                               "load it onto its base model")
        needed = {"A", "B", "magnitude"} if dora else {"A", "B"}
        if set(factors) != needed:
            raise LorakitError(f"PEFT adapter layer {name!r} has {sorted(factors)}, expected {sorted(needed)}; the adapter is incomplete")
        out, inp = weight_out_in(module).shape
        r = factors["A"].shape[0]
        shapes = {"A": (r, inp), "B": (out, r), "magnitude": (out,)}
        for role, value in factors.items():
            if tuple(value.shape) != shapes[role]:
                raise LorakitError(f"PEFT adapter does not match the model: layer {name!r} is {out} × {inp} here but its "
                                   f"{role} is {tuple(value.shape)}; load it onto its base model")
        ranks.add(r)
    if len(ranks) != 1:
        raise LorakitError(f"PEFT adapter layers have ranks {sorted(ranks)}; lorakit adapters share one rank: "
                           "merge it (peft merge_and_unload) instead")
    return ranks.pop()


def peft_adapter_config(config: dict[str, Any], layers: list[str], rank: int, saved: list[str]) -> AdapterConfig:
    """The lorakit config that computes what the PEFT config does (one rank, one scale)."""
    alphas = set((config.get("alpha_pattern") or {}).values())
    if alphas - {config.get("lora_alpha", 8)}:
        raise LorakitError("PEFT adapter's alpha_pattern gives layers different scales; lorakit adapters share one: "
                           "merge it (peft merge_and_unload) instead")
    scale = _layer_scale(config, rank)
    rslora = bool(config.get("use_rslora"))
    return AdapterConfig(
        method="dora" if config.get("use_dora") else "lora", rank=rank, use_rslora=rslora,
        alpha=scale * (math.sqrt(rank) if rslora else rank), targets=sorted(layers),
        dropout=float(config.get("lora_dropout") or 0.0), modules_to_save=saved,
    )


def import_peft(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Add the PEFT LoRA (or DoRA) adapter in ``directory`` to ``model`` (its base model), in place.

    The model then computes what ``peft.PeftModel.from_pretrained(model, directory)`` computes,
    and trains with lorakit's optimizers like any adapted model. Everything is checked first
    (type, options, layer names and shapes): a failed import leaves the model as it was.
    """
    config = read_peft_config(directory)
    tensors = read_peft_tensors(directory)
    if adapters_of(model):
        raise LorakitError("model already has lorakit adapters; import onto a fresh base model")
    modules = dict(model.named_modules())
    saved_names = list(config.get("modules_to_save") or [])
    layers, saved = _split_keys(tensors, saved_names, modules)
    if not layers:
        raise LorakitError(f"{Path(directory) / PEFT_TENSORS} has no lora_A/lora_B tensors; it is not a LoRA adapter")
    rank = _check_shapes(layers, modules, bool(config.get("use_dora")))
    for (owner, key), value in saved.items():
        state = modules[owner].state_dict()
        if key not in state or state[key].shape != value.shape:
            raise LorakitError(f"PEFT adapter does not match the model: module {owner!r} has no {key!r} of shape "
                               f"{tuple(value.shape)}; load it onto its base model")
    adapter_config = peft_adapter_config(config, list(layers), rank, sorted({owner for owner, _ in saved}))
    adapters = build_adapters(model, adapter_config, sorted(layers))  # beside the model: nothing changed yet
    with torch.no_grad():
        for name, adapter in adapters.items():
            for role, value in layers[name].items():
                getattr(adapter, role).copy_(value)
    install_adapters(model, adapter_config, adapters)
    with torch.no_grad():
        for (owner, key), value in saved.items():
            modules[owner].state_dict()[key].copy_(value)
    mark_adapted(model, adapter_config)
    return model


def load(model: nn.Module | str | os.PathLike, directory: str | os.PathLike, adapter_name: str | None = None,
         **options: Any) -> nn.Module:
    """Add a saved adapter to a base model: ``lorakit.load(model_or_path, adapter_dir)``.

    ``directory`` is a lorakit adapter (``lorakit.save_adapter``; ``options`` go to
    ``lorakit.load_adapter``) or a PEFT LoRA adapter folder (``lorakit.import_peft``).
    ``model`` is a model object or what ``from_pretrained`` takes (a folder or hub name),
    loaded with the class the adapter was saved for. ``adapter_name`` names the adapter
    (``lorakit.named``; default "default"); on a model that has adapters already it is required,
    and the loaded adapter is added beside them, inactive (PEFT's ``load_adapter``).
    """
    from lorakit.io import CONFIG_FILE, load_adapter, read_adapter_meta

    lorakit_format = (Path(directory) / CONFIG_FILE).is_file()
    if not lorakit_format and not is_peft_dir(directory):
        raise LorakitError(f"{directory} is neither a lorakit adapter ({CONFIG_FILE}) nor a PEFT adapter ({PEFT_CONFIG}); "
                           "pass the folder save_adapter or PEFT's save_pretrained wrote")
    if not isinstance(model, nn.Module):
        import transformers

        if lorakit_format:
            class_name = read_adapter_meta(directory).get("model_class", "AutoModel")
        else:
            class_name = TASK_CLASSES.get(read_peft_config(directory).get("task_type"), "AutoModel")
        cls = getattr(transformers, class_name, transformers.AutoModel)
        model = cls.from_pretrained(str(model))
    if adapters_of(model):
        if adapter_name is None:
            raise LorakitError(f"the model has adapters already ({', '.join(adapter_names(model))}); pass "
                               "adapter_name=... to add this one beside them")
        return load_beside(model, directory, adapter_name, **options)
    if lorakit_format:
        load_adapter(model, directory, **options)
    elif options:
        raise LorakitError(f"options {sorted(options)} apply to lorakit adapters only, not to the PEFT folder {directory}")
    else:
        import_peft(model, directory)
    if adapter_name is not None:
        rename_active(model, adapter_name)
    return model
