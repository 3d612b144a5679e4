"""The offline default dataset on disk: synthetic records plus the tokenizer trained on them.

Writing both to a directory lets every later stage treat the default exactly like real data: a JSON
file for :func:`load_alpaca` and a tokenizer directory for ``AutoTokenizer.from_pretrained``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from lgeo_jax.data._alpaca import save_alpaca_json
from lgeo_jax.data._config import DataConfig
from lgeo_jax.data._synthetic import generate_records
from lgeo_jax.data._tokenizer import save_synthetic_tokenizer

DEFAULT_SYNTHETIC_RECORDS = DataConfig().required_records  # 11,200: every default split fits


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
    """Paths of a written synthetic dataset."""

    records_path: Path
    tokenizer_dir: Path


def write_synthetic_dataset(
    out_dir: str | Path,
    n_records: int = DEFAULT_SYNTHETIC_RECORDS,
    seed: int = 0,
    vocab_size: int = 1024,
) -> SyntheticDataset:
    """Generate ``n_records`` records with ``seed``, train a tokenizer on them, and write both."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = generate_records(n_records, seed)
    records_path = save_alpaca_json(records, out_dir / "alpaca_synthetic.json")
    tokenizer_dir = out_dir / "tokenizer"
    save_synthetic_tokenizer(records, tokenizer_dir, vocab_size=vocab_size)
    return SyntheticDataset(records_path, tokenizer_dir)
