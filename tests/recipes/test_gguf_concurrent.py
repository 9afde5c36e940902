"""convert_gguf is safe when two processes convert the same GGUF into the same folder at once (two
`lorakit train` runs starting together on smollm2 once crashed with `OSError: Directory not empty`
at the final rename), and a conversion killed half way leaves nothing that breaks the next one.

The conversions run in child processes (real processes, real fcntl locks); each child's
save_pretrained is wrapped to sleep after writing (so the two conversions would overlap) or to
SIGKILL its own process after writing the weights (a conversion killed half way)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import assets
from lorakit.errors import LorakitError
from lorakit.recipes.models import GGUF_MARKER, convert_gguf

pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[2]
CHILD = r"""
import hashlib, json, os, signal, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
import transformers
from lorakit.recipes.models import convert_gguf

gguf, target, ready, go, mode = sys.argv[1:6]
saves = []
real = transformers.PreTrainedModel.save_pretrained

def save_pretrained(self, directory, *args, **kwargs):
    saves.append(str(directory))
    real(self, directory, *args, **kwargs)
    if mode == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # weights written; tokenizer and marker not yet
    time.sleep(1.5)  # between writing and renaming: the other process would convert meanwhile

transformers.PreTrainedModel.save_pretrained = save_pretrained
Path(ready).write_text("")
while not Path(go).exists():
    time.sleep(0.005)
folder = convert_gguf(gguf, target)
model = transformers.AutoModelForCausalLM.from_pretrained(folder)
state = sorted(model.state_dict().items())
digest = hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for _, t in state)).hexdigest()
print(json.dumps({"folder": str(folder), "saves": saves, "digest": digest}))
"""


def _digest(folder: Path) -> str:
    from transformers import AutoModelForCausalLM

    state = sorted(AutoModelForCausalLM.from_pretrained(folder).state_dict().items())
    return hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for _, t in state)).hexdigest()


def _start(tmp_path: Path, gguf: Path, target: Path, mode: str, name: str) -> tuple[subprocess.Popen, Path]:
    ready = tmp_path / f"{name}.ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(gguf), str(target), str(ready), str(tmp_path / "go"), mode],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, ready


def _go(tmp_path: Path, children: list[tuple[subprocess.Popen, Path]]) -> list[tuple[int, str, str]]:
    deadline = time.monotonic() + 300
    while not all(ready.exists() for _, ready in children):  # every child imported and waiting
        assert all(proc.poll() is None for proc, _ in children), [proc.communicate() for proc, _ in children]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (tmp_path / "go").write_text("")
    outputs = [proc.communicate(timeout=600) for proc, _ in children]
    return [(proc.returncode, out, err) for (proc, _), (out, err) in zip(children, outputs)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny GGUF and its conversion into a folder of its own (the independent reference)."""
    root = tmp_path_factory.mktemp("gguf")
    gguf = assets.gguf_llama_file(root / "tiny.gguf")
    reference = convert_gguf(gguf, root / "reference")
    return gguf, _digest(reference)


def test_two_processes_converting_into_the_same_folder_at_once_both_get_the_one_finished_conversion(tmp_path, tiny):
    gguf, reference = tiny
    target = tmp_path / "cache" / "tiny-hf"
    results = _go(tmp_path, [_start(tmp_path, gguf, target, "race", f"child{i}") for i in range(2)])
    for code, out, err in results:
        assert code == 0, err[-3000:]
    answers = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
    assert [a["folder"] for a in answers] == [str(target)] * 2
    # one process converted (one save, into a temporary); the other waited and converted nothing
    assert sorted(len(a["saves"]) for a in answers) == [0, 1]
    assert sum("another process is converting" in out for _, out, _ in results) == 1  # ... for the lock: they overlapped
    assert Path(next(a for a in answers if a["saves"])["saves"][0]).parent == target.parent
    assert [a["digest"] for a in answers] == [reference, reference]  # the same weights as a conversion alone
    assert sorted(os.listdir(target.parent)) == [".tiny-hf.lock", "tiny-hf"]  # no temporary left
    assert json.loads((target / GGUF_MARKER).read_text())["gguf_file"] == "tiny.gguf"


def test_a_conversion_killed_half_way_does_not_break_the_next_one(tmp_path, tiny):
    gguf, reference = tiny
    target = tmp_path / "cache" / "tiny-hf"
    [(code, _, err)] = _go(tmp_path, [_start(tmp_path, gguf, target, "kill", "killed")])
    assert code == -9, err[-3000:]
    left = [p for p in target.parent.iterdir() if p.name != ".tiny-hf.lock"]
    assert not target.exists()
    assert len(left) == 1 and left[0].name.startswith(".tiny-hf.tmp-") and (left[0] / "config.json").is_file()
    assert not (left[0] / GGUF_MARKER).exists()  # the half-written temporary

    assert convert_gguf(gguf, target) == target  # the dead process's lock and temporary are no obstacle
    assert _digest(target) == reference
    assert sorted(os.listdir(target.parent)) == [".tiny-hf.lock", "tiny-hf"]  # its temporary removed


def test_a_finished_conversion_is_returned_as_is_and_other_folders_are_refused(tmp_path, tiny):
    gguf, reference = tiny
    target = convert_gguf(gguf, tmp_path / "tiny-hf")
    weights = target / "model.safetensors"
    written = weights.stat().st_mtime_ns
    assert convert_gguf(gguf, target) == target and weights.stat().st_mtime_ns == written  # not converted again
    (tmp_path / "other").mkdir()
    other = assets.gguf_llama_file(tmp_path / "other" / "tiny.gguf", seed=1)  # same name and size, other weights
    with pytest.raises(LorakitError, match="already exists"):
        convert_gguf(other, target)
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text("{}")  # a folder without the marker is never taken for a conversion
    with pytest.raises(LorakitError, match="already exists"):
        convert_gguf(gguf, half)
    assert _digest(target) == reference
