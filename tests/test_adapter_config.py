"""AdapterConfig validation: unknown names are one-line errors listing the valid ones."""

import math

import pytest

from lorakit import AdapterConfig, LorakitError


def test_unknown_method_lists_valid_ones_and_suggests():
    with pytest.raises(LorakitError, match=r"unknown method 'psisa' \(did you mean 'pissa'\?\); valid: lora,"):
        AdapterConfig(method="psisa")


def test_unknown_option_is_named_with_suggestion():
    with pytest.raises(LorakitError, match=r"no option 'rnak' \(did you mean 'rank'\?\)"):
        AdapterConfig(rnak=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 0}, "rank must be a positive integer"),
        ({"alpha": -1}, "alpha must be a positive"),
        ({"dropout": 1.0}, "dropout"),
        ({"direction": "BA"}, "direction='BA' is not valid"),
        ({"estimator": "sketchy"}, "did you mean 'sketch'"),
        ({"method": "lora-xs", "init": "pissa"}, "cannot initialise the 'xs' structure"),
        ({"method": "lora-sb", "estimator": "sketch"}, "needs the exact gradient"),
        ({"oversample": 2}, "needs oversampling"),
        ({"memory_budget": "lots"}, "memory_budget 'lots' is not a size"),
        ({"targets": []}, "targets must be"),
        ({"targets": "(*"}, "is not a valid regular expression"),
        ({"dropout": "abc"}, "dropout must be a number"),
        ({"seed": 1.5}, "seed must be an integer"),
        ({"estimation": {"num_smaples": 3}}, r"no option estimation.num_smaples \(did you mean 'num_samples'\?\)"),
        ({"lr": float("inf")}, "positive finite"),
    ],
)
def test_bad_values_are_clear_errors(kwargs, message):
    with pytest.raises(LorakitError, match=message):
        AdapterConfig(**kwargs)


def test_scale_and_defaults():
    assert AdapterConfig(rank=8, alpha=16).scale == 2.0
    assert AdapterConfig(rank=16, alpha=8, use_rslora=True).scale == 2.0
    ga = AdapterConfig(method="lora-ga", rank=4, alpha=8)
    assert ga.rslora and math.isclose(ga.scale, 4.0)
    assert AdapterConfig(method="svd-fa").adapter_type == "lora-fa"
    assert AdapterConfig(memory_budget="1.5GiB").estimation.memory_budget_bytes == int(1.5 * 2**30)
    from lorakit import defaults

    assert AdapterConfig().rank == defaults.RANK


def test_round_trip_through_dict():
    cfg = AdapterConfig(method="dora", init="pissa", rank=4, targets=["q_proj", "v_proj"])
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg


def test_flat_keywords_and_option_groups_are_one_config():
    flat = AdapterConfig(method="lora-sb", num_samples=32, lr=1e-3, warmup_steps=5, svd="exact", estimator="exact")
    grouped = AdapterConfig(method="lora-sb", estimation={"num_samples": 32, "estimator": "exact"},
                            lora_sb={"lr": 1e-3, "warmup_steps": 5}, svd={"method": "exact"})
    assert flat == grouped
    assert flat.estimation.num_samples == 32 and flat.lora_sb.warmup_steps == 5 and flat.svd.method == "exact"
    assert AdapterConfig.from_dict(flat.to_dict()) == flat
    assert flat.replace(num_samples=8).estimation.num_samples == 8 and flat.replace(num_samples=8).lora_sb.lr == 1e-3


def test_to_dict_holds_only_the_groups_the_method_reads():
    from lorakit.config import CORE

    assert set(AdapterConfig(method="lora").to_dict()) == set(CORE) == set(AdapterConfig.options()[:len(CORE)])
    assert {"svd", "estimation", "lora_ga"} <= set(AdapterConfig(method="lora-ga").to_dict())
    assert "lora_sb" not in AdapterConfig(method="lora-ga").to_dict()
    assert AdapterConfig(method="lora-xs").to_dict()["lora_xs"] == {"init_std": 1e-5}


def test_modules_to_save_takes_one_name_as_one_name():
    assert AdapterConfig(modules_to_save="classifier").modules_to_save == ["classifier"]


def test_every_method_names_a_registered_initialisation_that_accepts_its_structure():
    from lorakit.config import METHODS
    from lorakit.init import INITIALISATIONS

    for method, (structure, init) in METHODS.items():
        assert structure in INITIALISATIONS[init].structures, method
        config = AdapterConfig(method=method)
        assert config.initialisation is INITIALISATIONS[init]
        assert config.needs_data == INITIALISATIONS[init].data_driven
    assert [n for n, i in INITIALISATIONS.items() if i.data_driven] == ["lora-ga", "lora-sb"]
    assert [n for n, i in INITIALISATIONS.items() if i.changes_base] == ["pissa", "lora-ga"]
    assert AdapterConfig(method="lora-ga", rank=4).initialisation.directions(AdapterConfig(method="lora-ga", rank=4)) == 8
