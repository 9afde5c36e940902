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
    assert AdapterConfig(memory_budget="1.5GiB").memory_budget_bytes == int(1.5 * 2**30)


def test_round_trip_through_dict():
    cfg = AdapterConfig(method="dora", init="pissa", rank=4, targets=["q_proj", "v_proj"])
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg
