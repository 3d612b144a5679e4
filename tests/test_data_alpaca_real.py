"""The pipeline on 5,000 real Alpaca records with the real Gemma tokenizer (skips without the files)."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from lgeo_jax.data import (
    BatchConfig,
    Category,
    DataConfig,
    category_counts,
    iterate_batches,
    length_stats,
    load_alpaca,
    padding_fraction,
    steps_per_epoch,
    tokenize_records,
)

SHARED = Path("/work/shared/data")
SUBSET, SPM = SHARED / "alpaca_5000_subset.json", SHARED / "gemma_tokenizer.model"
pytestmark = pytest.mark.skipif(not (SUBSET.exists() and SPM.exists()), reason="shared Alpaca/Gemma files absent")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gemma_tok")
    shutil.copy(SPM, directory / "tokenizer.model")
    return AutoTokenizer.from_pretrained(str(directory))


@pytest.fixture(scope="module")
def records():
    return load_alpaca(SUBSET)


def test_gemma_ids_with_explicit_bos(gemma):
    """The README's reference ids for an Alpaca instruction, BOS added by us rather than the tokenizer."""
    ids = [gemma.bos_token_id] + gemma("Give three tips for staying healthy.", add_special_tokens=False)["input_ids"]
    assert ids == [2, 23136, 2149, 9697, 604, 23213, 9606, 235265]
    assert (gemma.bos_token_id, gemma.eos_token_id) == (2, 1)


def test_token_statistics_match_the_readme(gemma, records):
    """README: mean 106.9, median 93, p99 311, max 1,134 tokens for template + output without BOS/EOS.

    The mean, median and p99 are those of the full 52k file; this 5,000-record random subset matches them
    to sampling error. Its longest record is shorter than the full file's 1,134.
    """
    assert len(records) == 5000
    bare = DataConfig(max_length=4096, add_bos=False, add_eos=False)
    examples = tokenize_records(records, gemma, bare)
    stats = length_stats([e.length for e in examples])
    assert abs(stats.mean - 106.9) < 1.0  # std 55 tokens: the subset mean has standard error 0.8
    assert stats.median == 93
    assert abs(stats.p99 - 311) <= 5
    assert stats.max <= 1134
    # The training layout adds exactly BOS and EOS and masks prompt tokens.
    full = tokenize_records(records[:500], gemma, DataConfig(max_length=4096))
    assert [e.length for e in full] == [e.length + 2 for e in examples[:500]]
    for example in full:
        assert example.input_ids[0] == 2 and example.input_ids[-1] == 1
        first = int(np.argmax(example.loss_mask))
        assert example.loss_mask[first:].all() and not example.loss_mask[:first].any()


def test_probe_category_counts(records):
    counts = category_counts(records)
    print({c.value: n for c, n in counts.items()})
    assert sum(counts.values()) == 5000
    assert all(counts[c] > 100 for c in Category)  # every bucket populated on real data


def test_real_lengths_batch_with_little_padding(gemma, records):
    examples = tokenize_records(records, gemma, DataConfig(max_length=1024))
    config = BatchConfig(batch_size=16, seed=0)  # default sort_window and pad_multiple
    batches = list(iterate_batches(examples, config, num_steps=steps_per_epoch(len(examples), config)))
    assert sorted(int(i) for b in batches for i in b.sample_index if i >= 0) == list(range(5000))
    assert padding_fraction(batches) < 0.1  # unsorted batches of 16 pad about 54%
