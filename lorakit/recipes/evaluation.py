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
    characters). The options are scored in right-padded batches of ``batch_size`` rows, in order,
    so that a question's options mostly share one forward pass; under torchrun each process
    scores its share of the questions."""
    mine = ctx.shard(options) if ctx is not None else options
    flat = [(q, f) for q, question in enumerate(mine) for f in question]
    sums: list[float] = []
    bar = tqdm(total=len(flat), desc="score options", disable=not (progress and (ctx is None or ctx.is_main)), leave=False)
    for start in range(0, len(flat), batch_size):
        batch = D.to_device(D.collate([f for _, f in flat[start:start + batch_size]], pad_id), device)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))[:, :-1]
        targets, keep = labels[:, 1:], labels[:, 1:] != D.IGNORE_INDEX
        picked = torch.log_softmax(logits[keep], dim=-1).gather(-1, targets[keep][:, None])[:, 0]
        rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(keep)[keep]
        sums += torch.zeros(labels.shape[0], dtype=picked.dtype, device=picked.device).index_add_(0, rows, picked).tolist()
        bar.update(labels.shape[0])
    bar.close()
    scores: list[list[tuple[float, int]]] = [[] for _ in mine]
    for (q, f), total in zip(flat, sums):
        scores[q].append((total, f["chars"]))
    if ctx is None:
        return scores
    return [q for part in ctx.gather(scores, "scoring the options") for q in part]
