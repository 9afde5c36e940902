"""train.compile: the recipe trains through torch.compile with the same losses as eager training."""

from __future__ import annotations

import assets
import pytest

from lorakit.cli import main
from lorakit.recipes import loop
from lorakit.recipes.rundir import read_metrics


@pytest.mark.parametrize("kind", ["classification", "causal-lm"])
def test_compiled_training_gives_the_eager_losses(tmp_path, monkeypatch, kind):
    # aot_eager: dynamo's graph capture and AOT autograd (what inductor compiles), without a C++ build
    monkeypatch.setattr(loop, "COMPILE_BACKEND", "aot_eager")
    calls = []
    real_compile = loop.torch.compile
    monkeypatch.setattr(loop.torch, "compile", lambda m, **kw: calls.append(kw) or real_compile(m, **kw))
    make = assets.classification_config if kind == "classification" else assets.causal_config
    config = make(tmp_path, train={"max_steps": 4, "epochs": 1}, eval={"every_epoch": False},
                  output={"plot": False, "peft": False})
    losses = {}
    for flag in (False, True):
        out = tmp_path / f"run-{flag}"
        path = assets.write_yaml(tmp_path / "c.yaml", config)
        assert main(["train", "--config", str(path), "--quiet", f"output.dir={out}", f"train.compile={str(flag).lower()}"]) == 0
        losses[flag] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert calls == [{"backend": "aot_eager"}]  # compiled once, only when asked
    assert len(losses[True]) == 4
    assert losses[True] == pytest.approx(losses[False], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("flag", [False, True])
def test_inductor_takes_atens_random_numbers_and_only_when_asked(monkeypatch, flag):
    """train.compile with inductor (the default backend) compiles once with fallback_random (aten's dropout
    masks: inductor's generated ones cost more than its fusions gain on CPU); without it, the module itself."""
    import torch

    from lorakit.recipes.config import from_dict

    calls = []
    monkeypatch.setattr(loop.torch, "compile", lambda m, **kw: calls.append(kw) or "compiled")
    module = torch.nn.Linear(2, 2)
    got = loop.compiled(module, from_dict({"train": {"compile": flag}}))
    assert loop.COMPILE_BACKEND == "inductor"
    assert (got, calls) == (("compiled", [{"backend": "inductor", "options": {"fallback_random": True}}]) if flag
                            else (module, []))
