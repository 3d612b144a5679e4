"""Data: Alpaca records -> prompts -> token batches; index splits; probe categories; offline default.

Typical use::

    records = load_alpaca("alpaca_data.json", sha256=ALPACA_DATA_SHA256)
    config = DataConfig(max_length=512)                  # the `data` section of a study config
    train = tokenize_split(records, tokenizer, config, "train")
    for batch in iterate_batches(train, BatchConfig(batch_size=8), start_step=resume_step): ...
"""

from lgeo_jax.data._alpaca import (
    ALPACA_DATA_SHA256,
    ALPACA_HUB_ID,
    file_sha256,
    load_alpaca,
    records_from_dicts,
    save_alpaca_json,
)
from lgeo_jax.data._batching import (
    Batch,
    BatchConfig,
    collate,
    epoch_batches,
    iterate_batches,
    padded_length,
    padding_fraction,
    steps_per_epoch,
)
from lgeo_jax.data._categories import (
    CATEGORY_RULES,
    FALLBACK_CATEGORY,
    Category,
    categorize,
    categorize_records,
    category_counts,
)
from lgeo_jax.data._config import BUILTIN_DATA, SPLIT_NAMES, DataConfig, LossOn, Overflow, select_split
from lgeo_jax.data._default import DEFAULT_SYNTHETIC_RECORDS, SyntheticDataset, write_synthetic_dataset
from lgeo_jax.data._records import PROMPT_INPUT, PROMPT_NO_INPUT, AlpacaRecord, format_prompt
from lgeo_jax.data._synthetic import generate_records, synthetic_category
from lgeo_jax.data._tokenize import (
    IGNORE_INDEX,
    LengthStats,
    TokenizedExample,
    length_stats,
    tokenize_records,
    tokenize_split,
)
from lgeo_jax.data._tokenizer import (
    SPECIAL_TOKENS,
    build_bpe_tokenizer,
    record_texts,
    save_synthetic_tokenizer,
)

__all__ = [
    "ALPACA_DATA_SHA256",
    "ALPACA_HUB_ID",
    "BUILTIN_DATA",
    "CATEGORY_RULES",
    "DEFAULT_SYNTHETIC_RECORDS",
    "FALLBACK_CATEGORY",
    "IGNORE_INDEX",
    "PROMPT_INPUT",
    "PROMPT_NO_INPUT",
    "SPECIAL_TOKENS",
    "SPLIT_NAMES",
    "AlpacaRecord",
    "Batch",
    "BatchConfig",
    "Category",
    "DataConfig",
    "LengthStats",
    "LossOn",
    "Overflow",
    "SyntheticDataset",
    "TokenizedExample",
    "build_bpe_tokenizer",
    "categorize",
    "categorize_records",
    "category_counts",
    "collate",
    "epoch_batches",
    "file_sha256",
    "format_prompt",
    "generate_records",
    "iterate_batches",
    "length_stats",
    "load_alpaca",
    "padded_length",
    "padding_fraction",
    "record_texts",
    "records_from_dicts",
    "save_alpaca_json",
    "save_synthetic_tokenizer",
    "select_split",
    "steps_per_epoch",
    "synthetic_category",
    "tokenize_records",
    "tokenize_split",
    "write_synthetic_dataset",
]
