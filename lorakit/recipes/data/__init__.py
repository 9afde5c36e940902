"""The recipe's data: sources, per-format examples, tokenisation and collation.

    splits = load_splits(cfg.data, cfg.task)                 train / validation / test examples (splits.py)
    encoded = encode_splits(splits, cfg.data, cfg.task, tokenizer, max_length, model_name)   token ids (encode.py)
    for batch in batches(features, batch_size, pad_id, order): ...                         (batching.py)

One module per concern: files.py (CSV / JSONL / JSON / Parquet), sources.py (Rotten Tomatoes,
reasoning-gym, the hub), rows.py (columns into examples, every row checked; label numbering),
and one per format — template.py (template and prompt-completion pairs), chat.py (chat
templates, assistant-only loss), choices.py (multiple choice, BIG-bench tasks).
"""

from lorakit.estimate.loss import IGNORE_INDEX
from lorakit.recipes.data.batching import batches, collate, epoch_order, to_device
from lorakit.recipes.data.encode import Encoded, encode_causal, encode_classification, encode_prompts, encode_splits
from lorakit.recipes.data.files import FILE_TYPES, read_rows
from lorakit.recipes.data.sources import GSM_SEED_STRIDE, RT_LABELS, rotten_tomatoes, score_reasoning_gym
from lorakit.recipes.data.splits import Splits, load_splits, seeded_split
from lorakit.recipes.data.template import prompt_text

__all__ = [
    "IGNORE_INDEX", "FILE_TYPES", "GSM_SEED_STRIDE", "RT_LABELS", "Encoded", "Splits", "batches", "collate",
    "encode_causal", "encode_classification", "encode_prompts", "encode_splits", "epoch_order", "load_splits",
    "prompt_text", "read_rows", "rotten_tomatoes", "score_reasoning_gym", "seeded_split", "to_device",
]
