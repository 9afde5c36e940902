"""The recipe config: shipped configs validate, overrides apply with types, bad keys are caught."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lorakit.config import AdapterConfig
from lorakit.errors import LorakitError
from lorakit.recipes.compare import load_compare_config
from lorakit.recipes.config import FULL, RunConfig, all_keys, from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert "compare-rotten-tomatoes.yaml" in names and len(names) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses_and_validates(path):
    data = yaml.safe_load(path.read_text())
    if "compare" in data:
        config = load_compare_config(path)
        for method in config.methods:
            for seed in config.seeds:
                run = config.run_config(method, seed)
                assert run.train.seed == seed
                assert run.is_full or isinstance(run.adapter_config(), AdapterConfig)
    else:
        config = load_config(path)
        assert config.to_dict()["task"] == data.get("task", "classification")
        assert config.is_full or isinstance(config.adapter_config(), AdapterConfig)


def test_compare_example_covers_the_methods_of_the_issue():
    config = load_compare_config(CONFIGS[[p.name for p in CONFIGS].index("compare-rotten-tomatoes.yaml")])
    runs = {name: config.run_config(name, 0) for name in config.methods}
    methods = {r.method for r in runs.values()}
    assert {FULL, "lora", "pissa", "dora", "lora-xs", "lora-ga", "lora-sb"} <= methods
    assert methods & {"lora-fa", "svd-fa"}
    assert any(r.optim.loraplus_ratio for r in runs.values())
    assert any(r.optim.preconditioner == "riemannian" for r in runs.values())
    # same data, seed and budget for every method
    for field in ("data", "train", "model"):
        assert len({repr(getattr(r, field)) for r in runs.values()}) == 1, field


def test_defaults_are_the_main_job():
    config = RunConfig()
    assert (config.task, config.model.name, config.data.source, config.method) == ("classification", "auto", "auto", "lora-sb")


def test_overrides_apply_with_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\nadapter:\n  method: dora\n")
    config = load_config(path, ["optim.lr=2e-4", "train.max_steps=7", "adapter.rank=4", "output.merged=true",
                                "adapter.targets=[query, value]", "optim.max_grad_norm=null"])
    assert config.optim.lr == pytest.approx(2e-4) and isinstance(config.optim.lr, float)
    assert config.train.max_steps == 7 and config.output.merged is True and config.optim.max_grad_norm is None
    adapter = config.adapter_config()
    assert (adapter.method, adapter.rank, adapter.targets) == ("dora", 4, ["query", "value"])
    # lora-sb's first step η follows the optimizer unless set
    sb = load_config(None, ["adapter.method=lora-sb", "optim.lr=3e-3"]).adapter_config(warmup_steps=5)
    assert (sb.lora_sb.lr, sb.lora_sb.warmup_steps) == (pytest.approx(3e-3), 5)
    assert load_config(None, ["adapter.eta=0.1"]).adapter_config().lora_sb.lr is None
    # option groups: nested in YAML, three-part overrides, or the flat names
    grouped = load_config(None, ["adapter.estimation.num_samples=8", "adapter.lora_sb.update=gradient"]).adapter_config()
    assert (grouped.estimation.num_samples, grouped.lora_sb.update) == (8, "gradient")
    assert load_config(None, ["adapter.num_samples=8"]).adapter_config().estimation.num_samples == 8


def test_the_learning_rate_defaults_to_the_methods_own():
    from lorakit import defaults

    assert RunConfig().optim.lr == 1e-2  # the main job: lora-sb
    assert load_config(None, ["adapter.method=lora"]).optim.lr == defaults.LR
    assert load_config(None, ["adapter.method=lora-ga"]).optim.lr == 1e-4
    assert load_config(None, ["adapter.method=full"]).optim.lr == defaults.FULL_FINETUNING_LR
    assert load_config(None, ["adapter.method=lora", "optim.lr=3e-3"]).optim.lr == 3e-3


def test_resolved_config_round_trips():
    config = load_config(None, ["adapter.method=pissa", "train.epochs=2", "data.train_size=10"])
    again = from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict())))
    assert again == config


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "did you mean 'optim.lr'"),
    (["lr=1"], "'optim.lr'"),
    (["rank=4"], "'adapter.rank'"),
    (["optimm.lr=1"], "unknown config key"),
    (["adapter.rnak=4"], "adapter.rank"),
    (["train.epochs=two"], "train.epochs"),
    (["train.epochs=0"], "train.epochs must be >= 1"),
    (["optim.schedule=cosin"], "did you mean 'cosine'"),
    (["task=regression"], "task='regression' is not valid"),
    (["adapter.method=lora-gb"], "lora-ga"),
    (["optim.preconditioner=riemann"], "riemannian"),
    (["adapter.rank=-1"], "rank must be a positive integer"),
    (["noequals"], "is not key=value"),
    (["model.dtype=fp8"], "model.dtype"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(LorakitError, match=message.replace("(", r"\(").replace("?", r"\?")):
        load_config(None, overrides)


def test_every_key_is_reachable_by_override():
    for key in all_keys():
        section, _, option = key.partition(".")
        if option in ("method", "name", "source", "task", "dir") or not option:
            continue
        config = RunConfig()
        if section == "adapter":
            from lorakit.config import FLAT, GROUPS

            adapter = config.adapter_config()
            if option in GROUPS or "." in option:
                continue  # groups: reached through their options
            value = getattr(getattr(adapter, FLAT[option][0]), FLAT[option][1]) if option in FLAT else getattr(adapter, option)
        else:
            value = getattr(getattr(config, section), option)
        if value is None:
            continue
        load_config(None, [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"])
