"""A small byte-level BPE tokenizer trained on the synthetic records, saved as a transformers directory.

Byte-level BPE (GPT-2 style) makes every string encodable and ``decode(encode(s)) == s`` exact, with
no unknown tokens, while a vocabulary of ~1k merges keeps the toy model's embedding small. Special
tokens take Gemma's ids (pad 0, eos 1, bos 2, unk 3), so code that hard-codes nothing but reads ids from
the tokenizer behaves the same on both. The saved directory loads with
``transformers.AutoTokenizer.from_pretrained(dir)``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lgeo_jax.data._records import AlpacaRecord, format_prompt
from lgeo_jax.files import atomic_directory

# The first import of transformers in lgeo_jax (every `lgeo` command reaches it): without torch, transformers
# logs "PyTorch was not found..." at import, noise for a package that only uses its tokenizers. Quiet its
# logger for the import alone, then restore the default level; a TRANSFORMERS_VERBOSITY the user set is kept.
_USER_VERBOSITY = "TRANSFORMERS_VERBOSITY" in os.environ
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
import transformers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

if not _USER_VERBOSITY:
    del os.environ["TRANSFORMERS_VERBOSITY"]
    transformers.logging.set_verbosity_warning()

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")  # ids 0, 1, 2, 3 as in Gemma
_MIN_VOCAB = len(SPECIAL_TOKENS) + 256  # specials + the byte alphabet


def record_texts(records: Iterable[AlpacaRecord]) -> list[str]:
    """The texts a tokenizer should cover: formatted prompt followed by the response."""
    return [format_prompt(r) + r.output for r in records]


def build_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer of at most ``vocab_size`` tokens on ``texts``."""
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"build_bpe_tokenizer: vocab_size={vocab_size} is below the minimum {_MIN_VOCAB}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    pad, eos, bos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=pad, eos_token=eos, bos_token=bos, unk_token=unk
    )


def save_synthetic_tokenizer(
    records: Iterable[AlpacaRecord], out_dir: str | Path, vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Train on ``records`` (see :func:`record_texts`) and save to ``out_dir`` for ``AutoTokenizer``."""
    tokenizer = build_bpe_tokenizer(record_texts(records), vocab_size=vocab_size)
    with atomic_directory(out_dir, overwrite=True) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return tokenizer
