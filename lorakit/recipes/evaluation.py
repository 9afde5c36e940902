"""Evaluation of a run's model on one split: classification or causal-LM metrics.

    evaluate(s, "test")     loss + accuracy / F1 / MCC, or loss + perplexity + exact match of greedy generations
    generate(s, "test")     greedy continuations of the split's prompts

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
from lorakit.recipes.fsdp import is_sharded
from lorakit.recipes.setup import Setup


def evaluation_context(s: Setup) -> dist_ctx.Context:
    """The processes that split the evaluation: all of them, or none for a model sharded with FSDP2,
    whose every forward needs every process (each then evaluates the whole split, in step)."""
    return dist_ctx.Context() if is_sharded(s.model) else s.ctx


def primary_metric(task: str) -> str:
    return "accuracy" if task == "classification" else "exact_match"


def loss_targets(task: str, batch: dict[str, torch.Tensor]) -> int:
    """How many terms the model's mean loss averages: examples, or supervised next tokens."""
    if task == "classification":
        return int(batch["labels"].numel())
    return int((batch["labels"][:, 1:] != D.IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(s: Setup, split: str, progress: bool = True) -> dict[str, float]:
    """Classification: loss, accuracy, F1, MCC. Causal-LM: loss, perplexity, and exact match of
    the final number of greedy generations."""
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
        result = {"loss": mean_loss, **M.classification_metrics(preds, labels, s.splits.num_labels)}
    else:
        generations = generate(s, split, progress)
        references = [ex["answer"] for ex in getattr(s.splits, split)]
        result = {"loss": mean_loss, "perplexity": M.perplexity(mean_loss), "exact_match": M.exact_match(generations, references)}
    model.train(was_training)
    return result


@torch.no_grad()
def generate(s: Setup, split: str, progress: bool = True) -> list[str]:
    """Greedy continuations of the split's prompts (left-padded batches)."""
    tok, out, ctx = s.loaded.tokenizer, [], evaluation_context(s)
    prompts = ctx.shard(s.prompts[split])
    bar = tqdm(total=len(prompts), desc=f"generate {split}", disable=not (progress and ctx.is_main), leave=False, unit="ex")
    for batch in D.batches(prompts, s.cfg.eval.batch_size, s.pad_id, left_pad=True):
        batch = D.to_device(batch, s.device)
        ids = s.model.generate(**batch, max_new_tokens=s.cfg.eval.max_new_tokens, do_sample=False,
                               pad_token_id=s.pad_id, eos_token_id=tok.eos_token_id, synced_gpus=is_sharded(s.model))
        out += tok.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        bar.update(len(ids))
    bar.close()
    return [text for part in ctx.gather(out, f"generating on the {split} split") for text in part]
