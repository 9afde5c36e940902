"""`lorakit train` logs to TensorBoard for real: TensorBoard's own reader finds loss, lr and the eval
metrics, with the values of metrics.jsonl."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "recipes"))
import assets  # noqa: E402

from lorakit.cli import main  # noqa: E402


def test_tensorboard_events_hold_the_logged_metrics(tmp_path):
    config = assets.classification_config(tmp_path, train={"epochs": 2}, eval={"every_epoch": True},
                                          output={"tensorboard": True, "plot": False})
    assert main(["train", "--config", str(assets.write_yaml(tmp_path / "c.yaml", config)), "--quiet"]) == 0
    run = tmp_path / "run"
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r.get("split") == "validation"]
    assert train and evals and {"train/loss", "train/lr"} <= tags
    for key in ("loss", "lr"):
        logged = {e.step: e.value for e in events.Scalars(f"train/{key}")}
        assert logged == pytest.approx({r["step"]: r[key] for r in train}, rel=1e-6)  # float32 in the event file
    metrics = [k for k, v in evals[0].items() if isinstance(v, float)]
    assert metrics and all(f"validation/{k}" in tags for k in metrics)
    for key in metrics:
        logged = {e.step: e.value for e in events.Scalars(f"validation/{key}")}
        assert logged == pytest.approx({r["step"]: r[key] for r in evals}, rel=1e-6)
