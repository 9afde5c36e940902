"""The recipe's configuration: a small typed dataclass per concern, loaded from YAML plus
``section.key=value`` overrides.

    task: classification | causal-lm
    model:   which model, dtype, sequence length
    data:    which data, columns, split sizes
    adapter: an AdapterConfig (any of its options), or ``method: full`` for full fine-tuning
    optim:   optimizer, learning rate, schedule, LoRA+, preconditioner, NEFTune
    train:   epochs/steps, batch size, accumulation, seed, checkpoints, device
    eval:    evaluation batch size, generation length
    output:  run directory and which exports to write

Unknown keys and badly typed values raise a one-line ``LorakitError`` with a suggestion.
"""

from __future__ import annotations

import dataclasses
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit import defaults
from lorakit.config import FLAT, GROUPS, AdapterConfig, config_keys, suggest
from lorakit.errors import LorakitError
from lorakit.linalg import DTYPES as TORCH_DTYPES

TASKS = ("classification", "causal-lm", "multiple-choice")
FORMATS = ("auto", "template", "prompt-completion", "chat")
FULL = "full"  # the adapter method meaning "no adapters, every parameter trains"
DTYPES = tuple(TORCH_DTYPES)
QUANTIZATIONS = ("nf4", "fp4", "int8", "torchao-int8")  # model.quantization (lorakit.recipes.models builds each)


@dataclass
class ModelSection:
    """``name``: 'minilm', 'smollm2', a local folder or a hub name ('auto': minilm for
    classification, smollm2 for causal-lm). ``quantization``: load the base quantized through
    transformers' own configs (null: unquantized): 'nf4' / 'fp4' (bitsandbytes 4-bit, computing in
    ``dtype``), 'int8' (bitsandbytes LLM.int8) or 'torchao-int8' (torchao int8 weight-only)."""

    name: str = "auto"
    dtype: str = "float32"
    max_length: int = 64
    quantization: str | None = None


@dataclass
class DataSection:
    """``source``: 'rotten-tomatoes', 'gsm-symbolic', 'reasoning-gym:<dataset>' (``options``:
    the dataset's config), a .csv/.jsonl/.json/.parquet file, a BIG-bench ``task.json`` (or its
    folder), or a Hugging Face ``datasets`` name ('auto': the task's embedded default).
    ``validation`` and ``test`` name separate files; without them the source is split (seeded by
    ``split_seed``, fractions ``validation_fraction`` / ``test_fraction``; ``group_column``: rows
    sharing its value, e.g. a document id, land in one split). The ``*_size``
    options keep the first N examples of each split (null: all).

    ``format`` (causal-lm, multiple-choice): ``template`` (``template`` around the prompt
    column, then the answer), ``prompt-completion`` (TRL's ``prompt`` / ``completion`` columns,
    joined as they are), ``chat`` (a ``messages_column`` of {role, content} turns, or the
    prompt/answer columns as one user/assistant exchange, rendered by the tokenizer's chat
    template, after ``system_prompt`` if set); ``auto``: chat when the data has a messages
    column, prompt-completion when it has prompt and completion columns, else template."""

    source: str = "auto"
    format: str = "auto"
    validation: str | None = None
    test: str | None = None
    hf_config: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "question"
    answer_column: str = "answer"
    messages_column: str = "messages"
    choices_column: str = "choices"
    template: str = "Question: {prompt}\nAnswer: "
    system_prompt: str | None = None
    train_size: int | None = None
    validation_size: int | None = None
    test_size: int | None = None
    split_seed: int = 0
    group_column: str | None = None
    validation_fraction: float = 0.1
    test_fraction: float = 0.1
    chain_of_thought: bool = True
    options: dict[str, Any] | None = None


@dataclass
class OptimSection:
    """``name``: adamw | sgd; ``schedule``: linear | cosine | constant, after ``warmup_steps``
    of linear warm-up (or ``warmup_ratio`` of the total steps). ``lr`` null (the default): the
    method's own rate (its initialisation's ``training_lr``: 1e-2 for lora-xs / lora-sb, 1e-4
    for lora-ga, ``lorakit.defaults.LR`` = 1e-3 otherwise; 5e-5 for full fine-tuning)."""

    name: str = "adamw"
    lr: float | None = None
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.06
    max_grad_norm: float | None = 1.0
    loraplus_ratio: float | None = None
    preconditioner: str | None = None
    damping: float = 1e-6
    neftune_alpha: float | None = None


@dataclass
class TrainSection:
    """``max_steps`` is the step budget (default: the main job's 125 steps of 32 examples);
    null lets ``epochs`` decide. ``gradient_checkpointing``: recompute each block's activations
    in the backward pass instead of keeping them (transformers' own gradient_checkpointing_enable;
    less memory, about one more forward per step, the same gradients); lora-ga / lora-sb's
    estimation passes then checkpoint too (adapter.estimate_checkpointing). ``threads``: CPU threads (default: a fixed count per machine, see runtime.cpu_threads).
    Under torchrun, ``batch_size`` is per process and ``dist_timeout`` (seconds) bounds every
    wait for the other processes; ``parallel``: ddp (a full model per process) or fsdp (the
    model sharded over the processes with FSDP2, see lorakit/recipes/fsdp.py). ``compile``: train
    through ``torch.compile(model)`` (the first steps compile: minutes on a CPU; see
    bench/floor.py --compile for what it gains)."""

    epochs: int = 1
    max_steps: int | None = 125
    batch_size: int = 32
    grad_accum: int = 1
    seed: int = 0
    checkpoint_every: int = 0
    device: str = "auto"
    threads: int | None = None
    progress: bool = True
    dist_timeout: float = 1800.0
    compile: bool = False
    gradient_checkpointing: bool = False
    parallel: str = "ddp"


@dataclass
class EvalSection:
    """``every_epoch``: evaluate the validation split at the end of every epoch (and of the budget);
    ``every_steps``: also every that many optimizer steps (0: never), for learning curves of the
    validation metric. Evaluation leaves the training itself unchanged (no random numbers drawn)."""

    batch_size: int = 64
    max_new_tokens: int = 128
    every_epoch: bool = True
    every_steps: int = 0


@dataclass
class OutputSection:
    """``dir``: the run directory (default runs/<task>-<method>-<time>)."""

    dir: str | None = None
    peft: bool = True
    merged: bool = False
    plot: bool = True
    tensorboard: bool = True


def _default_adapter() -> dict[str, Any]:
    """The main job's adapter: LoRA-SB at lorakit's default rank (16)."""
    return {"method": "lora-sb"}


@dataclass
class RunConfig:
    task: str = "classification"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    adapter: dict[str, Any] = field(default_factory=_default_adapter)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    output: OutputSection = field(default_factory=OutputSection)

    def __post_init__(self) -> None:
        _check_choice("task", self.task, TASKS)
        _check_choice("data.format", self.data.format, FORMATS)
        _check_choice("model.dtype", self.model.dtype, DTYPES)
        if self.model.quantization is not None:
            _check_choice("model.quantization", self.model.quantization, QUANTIZATIONS)
            _check_quantized_run(self)
        _check_choice("optim.name", self.optim.name, ("adamw", "sgd"))
        _check_choice("optim.schedule", self.optim.schedule, ("linear", "cosine", "constant"))
        _check_choice("train.parallel", self.train.parallel, ("ddp", "fsdp"))
        if self.optim.preconditioner is not None:
            _check_choice("optim.preconditioner", self.optim.preconditioner, ("riemannian",))
        for key in ("model.max_length", "train.epochs", "train.batch_size", "train.grad_accum", "eval.batch_size",
                    "eval.max_new_tokens"):
            if _get(self, key) < 1:
                raise LorakitError(f"{key} must be >= 1, got {_get(self, key)!r}")
        for key in ("train.max_steps", "data.train_size", "data.validation_size", "data.test_size"):
            if _get(self, key) is not None and _get(self, key) < 1:
                raise LorakitError(f"{key} must be >= 1 or null, got {_get(self, key)!r}")
        if not self.train.dist_timeout > 0:
            raise LorakitError(f"train.dist_timeout must be a positive number of seconds, got {self.train.dist_timeout!r}")
        if self.train.checkpoint_every < 0:
            raise LorakitError("train.checkpoint_every must be >= 0 (0 = no checkpoints)")
        if self.eval.every_steps < 0:
            raise LorakitError("eval.every_steps must be >= 0 (0 = only at the end of each epoch)")
        if not 0 <= self.data.validation_fraction < 1 or not 0 < self.data.test_fraction < 1 or \
                self.data.validation_fraction + self.data.test_fraction >= 1:
            raise LorakitError("data.validation_fraction and data.test_fraction must be in [0, 1) and sum below 1")
        if self.train.threads is not None and self.train.threads < 1:
            raise LorakitError(f"train.threads must be >= 1 or null (a fixed count per machine), got {self.train.threads!r}")
        _check_device(self.train.device)
        if not 0 <= self.optim.warmup_ratio < 1:
            raise LorakitError(f"optim.warmup_ratio must be in [0, 1), got {self.optim.warmup_ratio!r}")
        _check_template(self.data.template)
        self.adapter = dict(self.adapter)
        self.adapter.setdefault("method", _default_adapter()["method"])
        self.lr_is_default = self.optim.lr is None
        if self.optim.lr is None:  # the method's own rate (its initialisation says which)
            self.optim.lr = defaults.FULL_FINETUNING_LR if self.is_full else self.adapter_config().initialisation.training_lr
        _check_optimizer(self.optim)
        if not self.is_full:
            self.adapter_config()  # validates every adapter option now, before any work

    @property
    def is_full(self) -> bool:
        return self.adapter.get("method") == FULL

    @property
    def method(self) -> str:
        return str(self.adapter["method"])

    def adapter_config(self, warmup_steps: int = 0) -> AdapterConfig:
        """The AdapterConfig; an init that starts from the training step (lora-sb's η) takes the
        optimizer's lr and warm-up unless the adapter section sets them; with
        train.gradient_checkpointing the estimation passes checkpoint too unless it says otherwise."""
        if self.is_full:
            raise LorakitError("adapter.method is 'full' (full fine-tuning): there is no adapter config")
        options = dict(self.adapter)
        options.setdefault("seed", self.train.seed)
        if options.get("full_precision_checkpoint") == "model":  # the model folder the base is quantized from
            options["full_precision_checkpoint"] = self.model_checkpoint()
        if self.train.gradient_checkpointing and "checkpointing" not in (options.get("estimation") or {}):
            options.setdefault("estimate_checkpointing", True)  # lora-ga / lora-sb estimate checkpointed too
        try:
            config = AdapterConfig(**options)
            sb = config.lora_sb
            if config.initialisation.uses_training_lr and sb.eta is None and sb.lr is None and self.optim.lr is not None:
                config = config.replace(lr=self.optim.lr, warmup_steps=sb.warmup_steps or warmup_steps)
            return config
        except LorakitError as exc:
            raise LorakitError(f"adapter: {exc}") from None

    def model_checkpoint(self) -> str:
        """The local folder of ``model.name`` (adapter.full_precision_checkpoint: model)."""
        from lorakit.recipes.models import resolve

        path = resolve(self.model.name, self.task)
        if not Path(path).is_dir():
            raise LorakitError(f"adapter: full_precision_checkpoint=model needs a local model folder, but model.name "
                               f"{self.model.name!r} is a hub name; give the downloaded folder's path instead")
        return str(path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_quantized_run(cfg: RunConfig) -> None:
    """What a quantized base cannot do: train its own weights. (output.merged writes a dequantized plain model.)"""
    q = cfg.model.quantization
    if cfg.adapter.get("method") == FULL:
        raise LorakitError(f"full fine-tuning cannot train a quantized base (model.quantization={q}); "
                           "use an adapter method, or model.quantization=null")


def _check_template(template: str) -> None:
    """``data.template``: str.format text whose one field is ``{prompt}`` (the answer follows it)."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise LorakitError(f"data.template {template!r} is not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
    if "prompt" not in fields:
        raise LorakitError("data.template must contain '{prompt}' where the prompt goes")
    others = sorted(fields - {"prompt"})
    if others:
        raise LorakitError(f"data.template may only hold the field {{prompt}}, not {{{others[0]}}}; the answer is appended "
                           "after the filled template (write literal braces as {{ and }})")


def _check_device(name: str) -> None:
    if name == "auto":
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise LorakitError(f"train.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LorakitError(f"train.device={name!r} but this machine (or this torch build) has no CUDA; use train.device=cpu or auto")


def _check_optimizer(optim: OptimSection) -> None:
    """The optimizer's options, checked without a model (lr=inf, negative weight decay, ...)."""
    from lorakit.optim.factory import optimizer_options

    try:
        optimizer_options(optim.name, optim.lr, optim.weight_decay, loraplus_ratio=optim.loraplus_ratio,
                          preconditioner=optim.preconditioner, damping=optim.damping, max_grad_norm=optim.max_grad_norm)
    except LorakitError as exc:
        raise LorakitError(f"optim: {exc}") from None


def _get(cfg: RunConfig, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _check_choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise LorakitError(f"{key}={value!r} is not valid{suggest(str(value), valid)}; choose one of {', '.join(valid)}")


SECTIONS: dict[str, type] = {
    "model": ModelSection, "data": DataSection, "optim": OptimSection, "train": TrainSection,
    "eval": EvalSection, "output": OutputSection,
}


def all_keys() -> list[str]:
    """Every valid dotted key, for suggestions."""
    keys = ["task"] + [f"adapter.{k}" for k in config_keys()]
    keys += [f"adapter.{g}.{f.name}" for g, cls in GROUPS.items() for f in dataclasses.fields(cls)]
    for name, cls in SECTIONS.items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _unknown_key(key: str) -> LorakitError:
    keys = all_keys()
    # a bare key ('lr') is suggested as the dotted keys ending with it ('optim.lr')
    hint = [k for k in keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    names = keys + ["adapter", *SECTIONS]  # a misspelt section ('trian') is suggested too
    did_you_mean = f" (did you mean {' or '.join(repr(h) for h in hint[:3])}?)" if hint else suggest(key, names)
    return LorakitError(f"unknown config key {key!r}{did_you_mean}; keys are section.option, e.g. optim.lr=1e-3")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Check/convert a YAML value against a field's type hint (YAML reads '1e-3' as a string)."""
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise LorakitError(f"{key} cannot be null")
    options = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    for kind in options:
        if typing.get_origin(kind) is dict:
            if isinstance(value, dict):
                return value
            continue
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                continue
        if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    names = " or ".join(getattr(k, "__name__", str(k)) for k in options)
    raise LorakitError(f"{key}={value!r} has the wrong type; expected {names}")


def _build_section(name: str, cls: type, data: Any) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise LorakitError(f"config section {name!r} must be a mapping of options, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key(f"{name}.{key}")
        values[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**values)


def _numeric(value: Any, hint: Any) -> Any:
    """A number YAML read as a string ('1e-3') becomes a float where the field is a float."""
    if isinstance(value, str) and float in typing.get_args(hint) + (hint,):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _coerce_adapter(data: dict[str, Any]) -> dict[str, Any]:
    """The adapter section: core options, option groups (mappings) and flat group options."""
    out = {}
    hints = typing.get_type_hints(AdapterConfig)
    for key, value in data.items():
        if key not in config_keys():
            raise _unknown_key(f"adapter.{key}")
        if key in GROUPS and isinstance(value, dict):
            group_hints = typing.get_type_hints(GROUPS[key])
            for option in value:
                if option not in group_hints:
                    raise _unknown_key(f"adapter.{key}.{option}")
            value = {k: _numeric(v, group_hints[k]) for k, v in value.items()}
        elif key in FLAT:
            group, option = FLAT[key]
            value = _numeric(value, typing.get_type_hints(GROUPS[group])[option])
        elif key in hints:
            value = _numeric(value, hints[key])
        out[key] = value
    return out


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a RunConfig from a nested mapping (as read from YAML)."""
    if not isinstance(data, dict):
        raise LorakitError("a config must be a YAML mapping of sections (task, model, data, adapter, optim, train, eval, output)")
    for key in data:
        if key not in ("task", "adapter", *SECTIONS):
            raise _unknown_key(str(key))
    sections = {name: _build_section(name, cls, data.get(name)) for name, cls in SECTIONS.items()}
    adapter = data.get("adapter")
    if adapter is not None and not isinstance(adapter, dict):
        raise LorakitError("config section 'adapter' must be a mapping of options, e.g. {method: lora, rank: 8}")
    kwargs: dict[str, Any] = dict(sections)
    if adapter is not None:
        kwargs["adapter"] = {**_default_adapter(), **_coerce_adapter(adapter)}
    if "task" in data:
        kwargs["task"] = str(data["task"])
    return RunConfig(**kwargs)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"config file {str(path)!r} does not exist; pass the path of a YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise LorakitError(f"config file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise LorakitError(f"config file {str(path)!r} is not UTF-8 text; save it as UTF-8 YAML") from None
    if data is not None and not isinstance(data, dict):
        raise LorakitError(f"config file {str(path)!r} holds a YAML {type(data).__name__}, not a mapping of sections "
                           "(task, model, data, adapter, optim, train, eval, output)")
    return data or {}


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply 'section.key=value' strings (value parsed as YAML) to a nested mapping."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise LorakitError(f"override {item!r} is not key=value; write e.g. optim.lr=1e-3")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as exc:
            raise LorakitError(f"override {item!r}: the value is not valid YAML ({str(exc).splitlines()[0]}); quote it, "
                               "e.g. adapter.targets='[query, value]'") from None
        path = key.strip().split(".")
        if len(path) == 1:
            if path[0] != "task":
                raise _unknown_key(path[0])
            data["task"] = value
            continue
        if len(path) == 3 and path[0] == "adapter" and path[1] in GROUPS:  # adapter.estimation.num_samples=32
            group = data.setdefault("adapter", {}) or {}
            data["adapter"] = group
            group[path[1]] = {**(group.get(path[1]) or {}), path[2]: value}
            continue
        if len(path) != 2:
            raise _unknown_key(key)
        section, option = path
        if section not in ("adapter", *SECTIONS):
            raise _unknown_key(key)
        target = data.setdefault(section, {})
        if target is None:
            target = data[section] = {}
        if not isinstance(target, dict):
            raise LorakitError(f"config section {section!r} must be a mapping of options, got {type(target).__name__}")
        target[option] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (optional) + overrides -> validated RunConfig."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(apply_overrides(data, overrides or []))


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
