"""Every bad input a user tried is one line on stderr, exit status 2, and leaves no run directory.

The table below is the contract; ``python tests/test_bad_input.py`` runs it and rewrites
docs/bad-input.md with the message each input gets.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

sys.path.insert(0, str(Path(__file__).parent / "recipes"))
import assets  # noqa: E402

from lorakit.cli import main  # noqa: E402
from lorakit.errors import LorakitError  # noqa: E402


@dataclass
class Case:
    name: str  # what the user did
    pattern: str  # a regex the one-line message must match
    argv: Callable[[Path], list[str]] | None  # the command, given a scratch directory with a tiny model and data
    writes_run: bool = False  # the case resumes / exports an existing run (which must stay as it was)
    call: Callable[[Path], object] | None = None  # a library call instead of a command: raises a one-line LorakitError


def _config(tmp: Path, **sections) -> str:
    return str(assets.write_yaml(tmp / "c.yaml", assets.classification_config(tmp, **sections)))


def _train(tmp: Path, *overrides: str, **sections) -> list[str]:
    return ["train", "--config", _config(tmp, **sections), "--quiet", *overrides]


def _yaml_list(tmp: Path) -> list[str]:
    (tmp / "list.yaml").write_text("- task: classification\n- adapter: {method: lora}\n")
    return ["train", "--config", str(tmp / "list.yaml")]


def _truncated_model(tmp: Path) -> list[str]:
    folder = assets.bert_folder(tmp / "broken")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return _train(tmp, f"model.name={folder}")


def _checkpointed_run(tmp: Path) -> Path:
    """A run killed after its first checkpoint (steps 1-2 done, checkpoint at 2)."""
    config = assets.classification_config(tmp, train={"max_steps": 4, "checkpoint_every": 2}, output={"plot": False})
    with assets.interrupted_at_step(3):
        assert main(["train", "--config", str(assets.write_yaml(tmp / "k.yaml", config)), "--quiet"]) == 130
    from lorakit.recipes import checkpoint as ckpt

    return ckpt.latest(tmp / "run")


def _resume_with(damage: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def argv(tmp: Path) -> list[str]:
        damage(_checkpointed_run(tmp))
        return ["train", "--resume", str(tmp / "run"), "--quiet"]

    return argv


def _truncate(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes((d / name).read_bytes()[:40])


def _drop_position(directory: Path) -> None:
    state = json.loads((directory / "state.json").read_text())
    del state["position"]
    (directory / "state.json").write_text(json.dumps(state))


def _foreign_pickle(directory: Path) -> None:
    import pickle

    (directory / "optimizer.pt").write_bytes(pickle.dumps({"state": {}, "param_groups": []}))


def _adapter_damage(directory: Path) -> None:
    path = directory / "adapter" / "adapter.safetensors"
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF
    path.write_bytes(bytes(data))


def _data_with(change: Callable[[list[dict]], None]) -> Callable[[Path], list[str]]:
    """Train on the tiny sentiment data after ``change`` edits its rows."""
    def argv(tmp: Path) -> list[str]:
        rows = assets.sentiment_rows(96)
        change(rows)
        path = assets.write_jsonl(tmp / "edited.jsonl", rows)
        return _train(tmp, f"data.source={path}")

    return argv


def _vllm_export_of(method: str) -> Callable[[Path], list[str]]:
    """Export to vLLM a finished classification run trained with ``method``."""
    def argv(tmp: Path) -> list[str]:
        config = assets.classification_config(tmp, adapter={"method": method, "rank": 4}, train={"max_steps": 2},
                                              output={"plot": False})
        assert main(["train", "--config", str(assets.write_yaml(tmp / "f.yaml", config)), "--quiet"]) == 0
        return ["export", str(tmp / "run"), "--format", "vllm"]

    return argv


def _data_file(name: str, content: bytes | None) -> Callable[[Path], list[str]]:
    """Train on ``name`` holding ``content`` (None: a folder of that name)."""
    def argv(tmp: Path) -> list[str]:
        path = tmp / name
        path.mkdir() if content is None else path.write_bytes(content)
        return _train(tmp, f"data.source={path}")

    return argv


def _one_class(rows: list[dict]) -> None:
    for row in rows:
        row["sentiment"] = 1


def _causal(rows: list[dict] | None, *overrides: str, task: str = "causal-lm", name: str = "rows.jsonl") -> Callable[[Path], list[str]]:
    """Train the tiny Llama on ``rows`` (written as JSONL; None: the config's own data)."""
    def argv(tmp: Path) -> list[str]:
        config = assets.write_yaml(tmp / "c.yaml", assets.causal_config(tmp, task=task))
        source = [f"data.source={assets.write_jsonl(tmp / name, rows)}"] if rows is not None else []
        return ["train", "--config", str(config), "--quiet", *source, *overrides]

    return argv


def _chat(messages) -> list[dict]:
    good = [{"role": "user", "content": "what is 1 plus 1 ?"}, {"role": "assistant", "content": "2"}]
    return [{"messages": good} for _ in range(10)] + [{"messages": messages}] + [{"messages": good} for _ in range(10)]


def _choices(choices, answer) -> list[dict]:
    good = {"q": "what is 1 plus 1 ?", "choices": ["2", "3"], "a": 0}  # the causal config's columns
    return [good] * 7 + [{"q": "what is 2 plus 2 ?", "choices": choices, "a": answer}] + [good] * 7


def _bigbench_without_scores(tmp: Path) -> list[str]:
    task = tmp / "bb" / "task.json"
    task.parent.mkdir()
    task.write_text(json.dumps({"name": "t", "examples": [{"input": "1 plus 1", "target": "2"}] * 5}))
    config = assets.write_yaml(tmp / "c.yaml", assets.causal_config(tmp, task="multiple-choice"))
    return ["train", "--config", str(config), "--quiet", f"data.source={task.parent}"]


def _set_unknown_adapter(tmp: Path) -> None:
    """Python: two named adapters on a tiny model, then set_adapter to a name it does not have."""
    import lorakit

    from conftest import tiny_llama

    model = lorakit.adapt(tiny_llama(), lorakit.AdapterConfig(rank=2, targets=["q_proj"]))
    lorakit.add_adapter(model, "math", lorakit.AdapterConfig(rank=2, targets=["v_proj"]))
    lorakit.set_adapter(model, "maths")


def _import_peft_folder(tmp: Path, build_peft, target) -> None:
    """Python: a PEFT adapter saved by PEFT itself, imported into ``target()``; the folder is removed after
    (the import itself writes nothing)."""
    import shutil

    import lorakit

    folder = tmp / "peft-adapter"
    try:
        build_peft().save_pretrained(folder)
        lorakit.import_peft(target(), folder)
    finally:
        shutil.rmtree(folder)


def _peft_ia3():
    from peft import IA3Config, get_peft_model

    from conftest import tiny_llama

    return get_peft_model(tiny_llama(), IA3Config(target_modules=["q_proj", "down_proj"], feedforward_modules=["down_proj"]))


def _peft_lora():
    from peft import LoraConfig, get_peft_model

    from conftest import tiny_llama

    return get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))


def _other_shaped_llama():
    import torch

    from conftest import tiny_llama

    model = tiny_llama()
    layer = model.model.layers[1].mlp.down_proj
    model.model.layers[1].mlp.down_proj = torch.nn.Linear(layer.in_features * 2, layer.out_features, bias=False, dtype=layer.weight.dtype)
    return model


def _pickle_checkpoint(tmp: Path) -> list[str]:
    pytest.importorskip("bitsandbytes")  # imported before the command: its import-time notice is not the command's
    (tmp / "model.bin").write_bytes(b"a pickle lorakit never opens")
    return _train(tmp, "model.quantization=nf4", "adapter.method=pissa", f"adapter.full_precision_checkpoint={tmp / 'model.bin'}")


CASES = [
    Case("a YAML config whose top level is a list", r"holds a YAML list, not a mapping of sections", _yaml_list),
    Case("an override value that is not valid YAML", r"override 'adapter.targets=\[query': the value is not valid YAML",
         lambda t: _train(t, "adapter.targets=[query")),
    Case("a non-integer adapter.seed", r"adapter: seed must be an integer, got 'x'", lambda t: _train(t, "adapter.seed=x")),
    Case("train.threads = 0", r"train.threads must be >= 1", lambda t: _train(t, "train.threads=0")),
    Case("train.device=cuda without CUDA", r"has no CUDA; use train.device=cpu", lambda t: _train(t, "train.device=cuda")),
    Case("train.parallel=zero3", r"train.parallel='zero3' is not valid; choose one of ddp, fsdp",
         lambda t: _train(t, "train.parallel=zero3")),
    Case("truncated model weights", r"could not load model .*broken", _truncated_model),
    Case("an invalid target regex", r"target regex '\(\*' is not a valid regular expression", lambda t: _train(t, "adapter.targets=(*")),
    Case("adapter.dropout=abc", r"adapter: dropout must be a number in \[0, 1\), got 'abc'", lambda t: _train(t, "adapter.dropout=abc")),
    Case("optim.lr=inf", r"optim: lr must be a finite number > 0, got inf", lambda t: _train(t, "optim.lr=.inf")),
    Case("negative weight decay", r"optim: weight_decay must be a finite number >= 0", lambda t: _train(t, "optim.weight_decay=-0.1")),
    Case("negative max_grad_norm", r"optim: max_grad_norm must be a finite number > 0, got -1.* \(or None / null: no clipping\)",
         lambda t: _train(t, "optim.max_grad_norm=-1")),
    Case("an unknown model.quantization", r"model.quantization='nf5' is not valid \(did you mean 'nf4'\?\); choose one of nf4, fp4",
         lambda t: _train(t, "model.quantization=nf5")),
    Case("full fine-tuning of a quantized base", r"full fine-tuning cannot train a quantized base",
         lambda t: _train(t, "model.quantization=int8", "adapter.method=full")),
    Case("a pickle as adapter.full_precision_checkpoint", r"full-precision checkpoint .*model.bin is not a .safetensors file; "
         r"lorakit reads only safetensors, never pickles", _pickle_checkpoint),
    Case("resume with a truncated rng.safetensors", r"checkpoint .*step-00000002 is damaged \(rng.safetensors",
         _resume_with(_truncate("rng.safetensors")), writes_run=True),
    Case("resume with a state.json missing 'position'", r"checkpoint .*step-00000002 is damaged \(state.json's position",
         _resume_with(_drop_position), writes_run=True),
    Case("resume with a foreign pickle as optimizer.pt", r"optimizer.pt is missing or was not written by lorakit",
         _resume_with(_foreign_pickle), writes_run=True),
    Case("eval of a run that has not finished", r"has not finished training; resume it with `lorakit train --resume .*run`",
         lambda t: (_checkpointed_run(t), ["eval", str(t / "run")])[1], writes_run=True),
    Case("resume with a damaged checkpoint adapter", r"checkpoint .*step-00000002 is damaged \(.*checksum",
         _resume_with(_adapter_damage), writes_run=True),
    Case("a CSV that is not UTF-8", r"latin.csv: line 3 is not UTF-8 \(byte 0xe9\); save the file as UTF-8",
         _data_file("latin.csv", "sentence,sentiment\ngood film,1\nclich\u00e9,0\n".encode("latin-1"))),
    Case("a JSONL line that is a list", r"list.jsonl: line 2 is a JSON list, not an object of columns",
         _data_file("list.jsonl", b'{"sentence": "good", "sentiment": 1}\n[1, 2]\n')),
    Case("a .json holding [1,2,3]", r"numbers.json: entry 1 is a JSON int, not an object of columns",
         _data_file("numbers.json", b"[1, 2, 3]")),
    Case("a text file named .parquet", r"text.parquet is not a readable Parquet file .*give it its real extension",
         _data_file("text.parquet", b"sentence,sentiment\ngood,1\n")),
    Case("a data path that is a folder", r"data path '.*folder' is a folder; give a .csv/.jsonl/.json/.parquet file",
         _data_file("folder", None)),
    Case("a data.template containing {answer}", r"data.template may only hold the field \{prompt\}, not \{answer\}",
         _causal(None, "data.template='Q: {prompt} A: {answer}'")),
    Case("training data with a single class", r"at least 2 classes, the training data has only the label '1'",
         _data_with(_one_class)),
    Case("a row (not the first) with its text missing", r"edited.jsonl: row 40 has column 'sentence' missing",
         _data_with(lambda rows: rows[39].update(sentence=None))),
    Case("messages that are not a list of turns", r"rows.jsonl: row 11: messages must be a list", _causal(_chat("hi"))),
    Case("a chat turn with an unknown role", r"row 11: unknown role 'bot'; use one of system, user, assistant",
         _causal(_chat([{"role": "bot", "content": "2"}]))),
    Case("a conversation with no assistant turn", r"row 11: the conversation has no assistant turn",
         _causal(_chat([{"role": "user", "content": "hi"}]))),
    Case("data.format=chat with a model that has no chat template",
         r"has no chat template.*use data.format=template with data.template", _causal(None, "data.format=chat")),
    Case("multiple-choice options fewer than two", r"row 8: the options must be a list of at least two",
         _causal(_choices(["4"], 0), task="multiple-choice")),
    Case("a multiple-choice answer index out of range", r"row 8: the answer must be the index of the right option \(0 to 1\), got 2",
         _causal(_choices(["4", "5"], 2), task="multiple-choice")),
    Case("a BIG-bench task with no target_scores", r"example 1 has no target_scores", _bigbench_without_scores),
    Case("an unknown reasoning-gym dataset", r"reasoning-gym has no dataset 'chain_sums' \(close: chain_sum",
         _causal(None, "data.source=reasoning-gym:chain_sums")),
    Case("export --format vllm of a full fine-tuning run", r"full fine-tuning run has no adapter to export as vllm.*--format merged",
         _vllm_export_of("full"), writes_run=True),
    Case("export --format vllm of a run that trains a classifier head", r"trains module 'classifier' fully .*--format merged",
         _vllm_export_of("lora"), writes_run=True),
    Case("export --format vllm of a DoRA run", r"vLLM does not serve DoRA adapters; export the merged model instead \(--format merged",
         _vllm_export_of("dora"), writes_run=True),
    Case("a row without its data.group_column value", r"row 2 has column 'doc' missing; fix or remove that row \(or set data.group_column\)",
         lambda t: _train(t, "data.group_column=doc", data={"source": str(assets.write_jsonl(
             t / "g.jsonl", [{"sentence": "good film", "sentiment": "pos", "doc": 1}, {"sentence": "bad", "sentiment": "neg"}]))})),
    Case("eval with neither a run directory nor --model", r"takes one RUN_DIR, or --model NAME_OR_PATH --config FILE.yaml",
         lambda t: ["eval", "--config", _config(t)]),
    Case("Python: import a PEFT IA3 adapter", r"is a PEFT IA3 adapter; lorakit imports PEFT LoRA adapters",
         None, call=lambda t: _import_peft_folder(t, _peft_ia3, __import__("conftest").tiny_llama)),
    Case("Python: import a PEFT LoRA adapter of another base", r"layer 'model.layers.1.mlp.down_proj' is .* here",
         None, call=lambda t: _import_peft_folder(t, _peft_lora, _other_shaped_llama)),
    Case("Python: set_adapter to an unknown name", r"no adapter named 'maths' \(did you mean 'math'\?\); its adapters: default, math",
         None, call=_set_unknown_adapter),
]


def _run(case: Case, tmp: Path, capsys) -> str:
    if case.call is not None:
        with pytest.raises(LorakitError) as raised:
            case.call(tmp)
        message = str(raised.value)
        assert "\n" not in message and not list(tmp.iterdir()), message
        return message
    argv = case.argv(tmp)
    capsys.readouterr()
    before = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert err.count("\n") == 0 and err.startswith("lorakit: error: "), err
    assert "Traceback" not in err and "weights_only" not in err, err
    after = sorted(p.relative_to(tmp) for p in tmp.rglob("*"))
    if not case.writes_run:
        assert not (tmp / "run").exists() and not (tmp / "runs").exists(), after
    assert [p for p in after if p not in before and not str(p).startswith("run")] == []
    return err.removeprefix("lorakit: error: ")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    message = _run(case, tmp_path, capsys)
    assert re.search(case.pattern, message), message


if __name__ == "__main__":  # rewrite docs/bad-input.md from the table (messages as they are now)
    import tempfile

    class _Capture:
        def readouterr(self):
            out = self.buffer.getvalue()
            self.buffer.seek(0)
            self.buffer.truncate()
            return type("Captured", (), {"err": out, "out": ""})()

    import contextlib
    import io

    rows = []
    for case in CASES:
        capture = _Capture()
        capture.buffer = io.StringIO()
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stderr(capture.buffer):
            message = _run(case, Path(tmp), capture)
        shown = message.replace("|", "\\|").replace(tmp, "…")
        rows.append(f"| {case.name} | `{shown}` |")
    doc = Path(__file__).parents[1] / "docs" / "bad-input.md"
    doc.write_text("# Bad input: what lorakit says\n\nEach row is a case of `tests/test_bad_input.py`: exit status 2, "
                   "this one line on stderr, and no run directory left behind (resume cases leave the run as it was); "
                   "rows marked Python are library calls, raising a LorakitError with this one-line message. "
                   "Regenerate with `python tests/test_bad_input.py`.\n\n| input | message |\n| --- | --- |\n"
                   + "\n".join(rows) + "\n")
    print(f"wrote {doc}")
