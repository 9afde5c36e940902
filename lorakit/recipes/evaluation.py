"""Evaluation of a run's model on one split: classification, causal-LM or multiple-choice metrics.

    evaluate(s, "test")     loss + accuracy / F1 / MCC; loss + perplexity + exact match of greedy
                            generations; or loss + accuracy (raw and length-normalised) over options
    generate(s, "test")     greedy continuations of the split's prompts (stopping at EOS / end of turn)
    option_scores(...)      each option's summed token log-probability given its prompt

Under torchrun each process evaluates its contiguous share and the results are gathered, so
every process returns the metrics of the whole split (under train.parallel=fsdp every process
evaluates the whole split with the sharded model, the forwards in step).
"""

from __future__ import annotations

import inspect

import torch
from tqdm.auto import tqdm

from lorakit.recipes import data as D
from lorakit.recipes import distributed as dist_ctx
from lorakit.recipes import metrics as M
from lorakit.recipes.data import chat
from lorakit.recipes.fsdp import is_sharded
from lorakit.recipes.setup import Setup


SAMPLES = 20  # generations kept per split for samples.jsonl


def evaluation_context(s: Setup) -> dist_ctx.Context:
    """The processes that split the evaluation: all of them, or none for a model sharded with FSDP2,
    whose every forward needs every process (each then evaluates the whole split, in step)."""
    return dist_ctx.Context() if is_sharded(s.model) else s.ctx


def primary_metric(task: str) -> str:
    return "exact_match" if task == "causal-lm" else "accuracy"


def loss_targets(task: str, batch: dict[str, torch.Tensor]) -> int:
    """How many terms the model's mean loss averages: examples, or supervised next tokens."""
    if task == "classification":
        return int(batch["labels"].numel())
    return int((batch["labels"][:, 1:] != D.IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(s: Setup, split: str, progress: bool = True) -> dict[str, float]:
    """Classification: loss, accuracy, macro F1 (``f1``), MCC, per-class F1 (``f1_<label>``).
    Causal-LM: loss, perplexity, and exact match of the final number of greedy generations."""
    model, cfg, ctx = s.model, s.cfg, evaluation_context(s)
    if not s.features[split]:
        return {}
    features = ctx.shard(s.features[split])
    was_training = model.training
    model.eval()
    total_loss, weight, preds, labels = 0.0, 0, [], []
    bar = tqdm(total=len(features), desc=f"eval {split}", disable=not (progress and ctx.is_main), leave=False, unit="ex")
    for batch in D.batches(features, cfg.eval.batch_size, s.pad_id):
        batch = D.to_device(batch, s.device)
        out = model(**batch)
        n = loss_targets(cfg.task, batch)
        if cfg.task == "classification":
            preds += out.logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
        total_loss += float(out.loss) * n
        weight += n
        bar.update(batch["input_ids"].shape[0])
    bar.close()
    parts = ctx.gather((total_loss, weight, preds, labels), f"evaluating the {split} split")  # [ours] on one process
    total_loss, weight = sum(p[0] for p in parts), sum(p[1] for p in parts)
    preds, labels = [x for p in parts for x in p[2]], [x for p in parts for x in p[3]]
    mean_loss = total_loss / max(weight, 1)
    if cfg.task == "classification":
        result = {"loss": mean_loss, **M.classification_metrics(preds, labels, s.splits.num_labels, s.splits.label_names)}
    elif cfg.task == "multiple-choice":
        scores = option_scores(model, s.options[split], cfg.eval.batch_size, s.pad_id, s.device, ctx, progress)
        answers = [ex["label"] for ex in getattr(s.splits, split)]
        result = {"loss": mean_loss, **M.choice_accuracy(scores, answers)}
    else:
        result = {"loss": mean_loss, "perplexity": M.perplexity(mean_loss), **_generation_metrics(s, split, progress)}
    model.train(was_training)
    return result


def _generation_metrics(s: Setup, split: str, progress: bool) -> dict[str, float]:
    """Exact match of the greedy generations (scorer: s.splits.scorer); the first SAMPLES
    (prompt, generation, reference, correct) are kept in s.samples[split]."""
    examples, tok = getattr(s.splits, split), s.loaded.tokenizer
    generations = generate(s, split, progress)
    scorer = s.splits.scorer
    correct = [M.is_correct(g, ex["answer"], scorer, ex.get("source")) for g, ex in zip(generations, examples)]
    s.samples[split] = [{"prompt": tok.decode(p["input_ids"]), "generation": g, "reference": ex["answer"], "correct": c}
                        for p, g, ex, c in zip(s.prompts[split], generations, examples, correct)][:SAMPLES]
    return {"exact_match": sum(correct) / max(len(correct), 1)}


@torch.no_grad()
def generate(s: Setup, split: str, progress: bool = True) -> list[str]:
    """Greedy continuations of the split's prompts (left-padded batches)."""
    tok, out, ctx = s.loaded.tokenizer, [], evaluation_context(s)
    prompts = ctx.shard(s.prompts[split])
    bar = tqdm(total=len(prompts), desc=f"generate {split}", disable=not (progress and ctx.is_main), leave=False, unit="ex")
    for batch in D.batches(prompts, s.cfg.eval.batch_size, s.pad_id, left_pad=True):
        batch = D.to_device(batch, s.device)
        ids = s.model.generate(**batch, max_new_tokens=s.cfg.eval.max_new_tokens, do_sample=False,
                               pad_token_id=s.pad_id, eos_token_id=stop_tokens(s), synced_gpus=is_sharded(s.model))
        out += tok.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        bar.update(len(ids))
    bar.close()
    return [text for part in ctx.gather(out, f"generating on the {split} split") for text in part]


def stop_tokens(s: Setup) -> list[int]:
    """EOS, the chat template's end-of-turn token (chat data) and the model's own stop ids
    (generation_config.eos_token_id)."""
    ids = [s.loaded.tokenizer.eos_token_id]
    if s.splits.format == "chat":
        ids.append(chat.end_of_turn(s.loaded.tokenizer))
    extra = getattr(getattr(s.model, "generation_config", None), "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra]
    return list(dict.fromkeys(i for i in ids if i is not None))


@torch.no_grad()
def option_scores(model: torch.nn.Module, options: list[list[dict]], batch_size: int, pad_id: int,
                  device: torch.device, ctx=None, progress: bool = False) -> list[list[tuple[float, int]]]:
    """Per question, per option: (Σ log p(option token | everything before it), option length in
    characters). A question's options share their prompt: the tokens all its options begin with
    run once, and each option continues from their key/value cache (questions batched so that a
    forward holds at most ``batch_size`` option rows); a model without a plain attention cache
    (or a question whose options share no prompt) scores whole prompt + option rows instead, in
    right-padded batches of ``batch_size``. Under torchrun each process scores its share of the
    questions."""
    mine = ctx.shard(options) if ctx is not None else options
    bar = tqdm(total=sum(len(q) for q in mine), desc="score options", leave=False,
               disable=not (progress and (ctx is None or ctx.is_main)))
    sums: list[list[float] | None] = [None] * len(mine)
    lengths = [_shared_prompt_length(question) for question in mine]
    shared = [q for q, k in enumerate(lengths) if k > 0]
    for group in _groups(shared, [len(q) for q in mine], batch_size):
        scored = _shared_prompt_sums(model, [mine[q] for q in group], [lengths[q] for q in group], pad_id, device)
        if scored is None:  # no usable cache: this model takes the whole-row path for every question
            break
        for q, row in zip(group, scored):
            sums[q] = row
        bar.update(sum(len(mine[q]) for q in group))
    rest = [q for q in range(len(mine)) if sums[q] is None]
    flat = [(q, f) for q in rest for f in mine[q]]
    for start in range(0, len(flat), batch_size):
        part = flat[start:start + batch_size]
        for (q, _), total in zip(part, _row_sums(model, [f for _, f in part], pad_id, device)):
            sums[q] = (sums[q] or []) + [total]
        bar.update(len(part))
    bar.close()
    scores = [[(total, f["chars"]) for total, f in zip(row, question)] for row, question in zip(sums, mine)]
    if ctx is None:
        return scores
    return [q for part in ctx.gather(scores, "scoring the options") for q in part]


def _shared_prompt_length(question: list[dict]) -> int:
    """How many leading tokens every option of a question has in common and that no option's
    score needs a logit of: the common prefix, stopping one short of the first scored token."""
    ids = [f["input_ids"] for f in question]
    common = 0
    while all(len(i) > common for i in ids) and len({i[common] for i in ids}) == 1:
        common += 1
    first_scored = min(next(k for k, t in enumerate(f["labels"]) if t != D.IGNORE_INDEX) for f in question)
    return min(common, first_scored - 1)


def _groups(questions: list[int], sizes: list[int], rows: int) -> list[list[int]]:
    """Consecutive questions, as many per group as keep its option rows within ``rows`` (at least one)."""
    groups: list[list[int]] = []
    for q in questions:
        if groups and sum(sizes[g] for g in groups[-1]) + sizes[q] <= rows:
            groups[-1].append(q)
        else:
            groups.append([q])
    return groups


def _picked_sums(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Per row, Σ log p(label token) of the logits one position before it (labels -100 skipped)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))[:, :-1]
    targets, keep = labels[:, 1:], labels[:, 1:] != D.IGNORE_INDEX
    picked = torch.log_softmax(logits[keep], dim=-1).gather(-1, targets[keep][:, None])[:, 0]
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(keep)[keep]
    return torch.zeros(labels.shape[0], dtype=picked.dtype, device=picked.device).index_add_(0, rows, picked).tolist()


def _row_sums(model: torch.nn.Module, features: list[dict], pad_id: int, device: torch.device) -> list[float]:
    batch = D.to_device(D.collate(features, pad_id), device)
    labels = batch.pop("labels")
    return _picked_sums(model(**batch).logits, labels)


def _returned_cache(out):
    """The key/value cache a forward returned: ``cache`` (transformers ≥ 5.x) or ``past_key_values``."""
    for name in ("cache", "past_key_values"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return None


def _cache_keyword(model: torch.nn.Module) -> str:
    """The forward argument that takes a cache: ``cache`` where the model's forward names it, else
    the older ``past_key_values``."""
    inner = getattr(model, "module", model)  # DDP-wrapped
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"


def _plain_cache(cache) -> bool:
    """A transformers Cache of full-attention layers only, which continuing after padding keeps exact."""
    from transformers.cache_utils import Cache

    layers = getattr(cache, "layers", None)
    return isinstance(cache, Cache) and layers is not None and not any(getattr(l, "is_sliding", False) for l in layers)


def _shared_prompt_sums(model: torch.nn.Module, questions: list[list[dict]], lengths: list[int], pad_id: int,
                        device: torch.device) -> list[list[float]] | None:
    """Option sums for questions that each share a prompt (its first ``lengths[q]`` tokens): one right-padded forward of the
    prompts (explicit positions), its cache repeated per option, one forward of the options'
    remaining tokens continuing at each prompt's own length. None if the model keeps no plain cache."""
    prompts = [{"input_ids": q[0]["input_ids"][:k]} for q, k in zip(questions, lengths)]
    head = D.to_device(D.collate(prompts, pad_id), device)
    width = head["input_ids"].shape[1]
    positions = torch.arange(width, device=device).expand(len(prompts), width)
    out = model(**head, position_ids=positions, use_cache=True)
    cache = _returned_cache(out)
    if not _plain_cache(cache):
        return None
    rows = [q for q, question in enumerate(questions) for _ in question]
    cache.reorder_cache(torch.tensor(rows, device=device))
    tails = [{"input_ids": f["input_ids"][k:], "labels": f["labels"][k:]}
             for question, k in zip(questions, lengths) for f in question]
    batch = D.to_device(D.collate(tails, pad_id), device)
    labels = batch.pop("labels")
    start = torch.tensor([lengths[q] for q in rows], device=device)[:, None]
    batch["position_ids"] = start + torch.arange(batch["input_ids"].shape[1], device=device)
    batch["attention_mask"] = torch.cat([head["attention_mask"][rows], batch["attention_mask"]], dim=1)
    batch[_cache_keyword(model)] = cache
    sums = _picked_sums(model(**batch).logits, labels)
    it = iter(sums)
    return [[next(it) for _ in question] for question in questions]
