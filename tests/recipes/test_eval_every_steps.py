"""eval.every_steps: validation learning curves that leave the training itself unchanged."""

from __future__ import annotations

import assets
import pytest
import torch
from safetensors.torch import load_file

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.recipes.config import from_dict
from lorakit.recipes.rundir import read_metrics


def _train(tmp_path, config: dict, name: str, **eval_section) -> tuple[list[float], dict[int, dict], dict]:
    out = tmp_path / name
    path = assets.write_yaml(tmp_path / f"{name}.yaml", assets._merge(config, {"eval": eval_section, "output": {"dir": str(out)}}))
    assert main(["train", "--config", str(path), "--quiet"]) == 0
    records = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval" and r.get("split") == "validation"]
    steps = [r["step"] for r in evals]
    assert len(steps) == len(set(steps)), f"a step evaluated twice: {steps}"
    return losses, {r["step"]: r for r in evals}, load_file(str(out / "adapter" / "adapter.safetensors"))


@pytest.mark.parametrize("kind", ["classification", "causal-lm"])
def test_periodic_validation_changes_nothing_of_the_training(tmp_path, kind):
    """Every k steps a validation record, at the epoch ends the every_epoch one (not twice), and the run's
    losses, end-of-epoch evaluations and adapter bit-identical to the run without it (dropout on: evaluation
    draws no random numbers the training would have drawn)."""
    make = assets.classification_config if kind == "classification" else assets.causal_config
    config = make(tmp_path, train={"max_steps": 14, "epochs": 3}, output={"plot": False})
    plain_losses, plain_evals, plain_adapter = _train(tmp_path, config, "plain", every_epoch=True, every_steps=0)
    epoch_ends = sorted(plain_evals)
    assert len(epoch_ends) >= 2 and epoch_ends[-1] == 14
    losses, evals, adapter = _train(tmp_path, config, "every3", every_epoch=True, every_steps=3)
    assert sorted(evals) == sorted(set(range(3, 15, 3)) | set(epoch_ends))
    assert losses == plain_losses
    for step in epoch_ends:
        assert evals[step] == plain_evals[step]
    assert adapter.keys() == plain_adapter.keys()
    assert all(torch.equal(adapter[k], plain_adapter[k]) for k in adapter)


def test_periodic_validation_without_epoch_evaluations(tmp_path):
    config = assets.classification_config(tmp_path, train={"max_steps": 10, "epochs": 3}, output={"plot": False})
    _, evals, _ = _train(tmp_path, config, "only-steps", every_epoch=False, every_steps=4)
    assert sorted(evals) == [4, 8]


def test_negative_every_steps_is_refused(tmp_path):
    config = assets.classification_config(tmp_path, eval={"every_steps": -1})
    with pytest.raises(LorakitError, match="eval.every_steps must be >= 0"):
        from_dict(config)
