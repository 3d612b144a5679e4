"""Length-bucketed, resumable batching (lgeo_jax.data)."""

import numpy as np
import pytest

from lgeo_jax.data import (
    IGNORE_INDEX,
    BatchConfig,
    TokenizedExample,
    epoch_batches,
    iterate_batches,
    padding_fraction,
    steps_per_epoch,
)


def make_examples(n, seed=0):
    """Examples with Alpaca-like lognormal lengths (median ~93) and random ids; index = 1000 + position."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(93), 0.5, size=n).astype(int), 4, 600)
    examples = []
    for i, length in enumerate(lengths):
        ids = rng.integers(4, 500, size=length).astype(np.int32)
        mask = (np.arange(length) >= length // 2).astype(np.int32)
        examples.append(TokenizedExample(ids, mask, 1000 + i, False))
    return examples


def rows_of(batch):
    return [int(i) for i in batch.sample_index if i >= 0]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for name in ("input_ids", "attention_mask", "loss_mask", "sample_index"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name))


@pytest.mark.parametrize("shuffle", [True, False])
def test_each_epoch_covers_every_example_once(shuffle):
    examples = make_examples(203)
    config = BatchConfig(batch_size=8, seed=3, shuffle=shuffle, sort_window=4)
    n_steps = steps_per_epoch(len(examples), config)
    assert n_steps == 26
    batches = list(iterate_batches(examples, config, num_steps=2 * n_steps))
    for epoch in range(2):
        seen = [i for b in batches[epoch * n_steps : (epoch + 1) * n_steps] for i in rows_of(b)]
        assert sorted(seen) == [e.index for e in examples]
    fillers = [int((b.sample_index < 0).sum()) for b in batches[:n_steps]]
    assert sum(fillers) == 26 * 8 - 203


def test_rows_hold_the_examples_right_padded():
    examples = make_examples(50)
    by_index = {e.index: e for e in examples}
    config = BatchConfig(batch_size=6, pad_multiple=8, pad_id=0)
    for batch in iterate_batches(examples, config, num_steps=steps_per_epoch(50, config)):
        assert batch.input_ids.dtype == np.int32 and batch.input_ids.shape[0] == 6
        assert batch.input_ids.shape[1] % 8 == 0
        for row, index in enumerate(batch.sample_index):
            if index < 0:
                assert batch.attention_mask[row].sum() == 0 and batch.loss_mask[row].sum() == 0
                continue
            example, n = by_index[int(index)], by_index[int(index)].length
            np.testing.assert_array_equal(batch.input_ids[row, :n], example.input_ids)
            np.testing.assert_array_equal(batch.loss_mask[row, :n], example.loss_mask)
            assert batch.attention_mask[row, :n].all() and not batch.attention_mask[row, n:].any()
            assert not batch.loss_mask[row, n:].any() and not batch.input_ids[row, n:].any()
        labels = batch.labels
        np.testing.assert_array_equal(labels == IGNORE_INDEX, batch.loss_mask == 0)
        np.testing.assert_array_equal(labels[batch.loss_mask == 1], batch.input_ids[batch.loss_mask == 1])


def test_length_sorting_keeps_padding_small():
    examples = make_examples(2048)
    n_steps = steps_per_epoch(2048, BatchConfig(batch_size=16))
    sorted_batches = list(iterate_batches(examples, BatchConfig(batch_size=16, sort_window=128), 0, n_steps))
    plain_batches = list(iterate_batches(examples, BatchConfig(batch_size=16, sort_window=1), 0, n_steps))
    sorted_fraction, plain_fraction = padding_fraction(sorted_batches), padding_fraction(plain_batches)
    # Independent count of padding: slots minus the real tokens.
    real = sum(e.length for e in examples)
    assert sorted_fraction == pytest.approx(1 - real / sum(b.input_ids.size for b in sorted_batches))
    assert sorted_fraction < 0.06
    assert plain_fraction > 0.4


def test_resume_from_any_step_reproduces_the_stream():
    examples = make_examples(45)
    config = BatchConfig(batch_size=4, seed=11, sort_window=2)
    n_steps = steps_per_epoch(45, config)  # 12
    full = list(iterate_batches(examples, config, num_steps=3 * n_steps))
    for k in (0, 1, 11, 12, 13, 30):
        assert_same_batches(full[k:], list(iterate_batches(examples, config, start_step=k, num_steps=36 - k)))


def test_order_depends_on_seed_and_epoch_only():
    lengths = [e.length for e in make_examples(64)]
    config = BatchConfig(batch_size=4, seed=1)
    first = epoch_batches(lengths, config, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(first, epoch_batches(lengths, config, epoch=0), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, epoch_batches(lengths, config, epoch=1), strict=True))
    other = epoch_batches(lengths, BatchConfig(batch_size=4, seed=2), epoch=0)
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_drop_last_drops_a_different_remainder_each_epoch():
    examples = make_examples(30)
    config = BatchConfig(batch_size=8, drop_last=True, seed=4)
    assert steps_per_epoch(30, config) == 3
    batches = list(iterate_batches(examples, config, num_steps=6))
    assert all((b.sample_index >= 0).all() for b in batches)
    epochs = [{i for b in batches[e * 3 : (e + 1) * 3] for i in rows_of(b)} for e in range(2)]
    assert [len(s) for s in epochs] == [24, 24] and epochs[0] != epochs[1]
    with pytest.raises(ValueError, match="only 5 examples"):
        steps_per_epoch(5, config)


def test_bucket_boundaries():
    examples = make_examples(100)
    longest = max(e.length for e in examples)
    config = BatchConfig(batch_size=8, bucket_boundaries=(64, 128, 256, 1024))
    widths = {b.input_ids.shape[1] for b in iterate_batches(examples, config, num_steps=13)}
    assert widths <= {64, 128, 256, 1024}
    with pytest.raises(ValueError, match="above the largest bucket boundary"):
        list(iterate_batches(examples, BatchConfig(batch_size=8, bucket_boundaries=(longest - 1,)), 0, 13))
    with pytest.raises(ValueError, match="increasing"):
        BatchConfig(batch_size=8, bucket_boundaries=(128, 64))
    with pytest.raises(ValueError, match="batch_size"):
        BatchConfig(batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        steps_per_epoch(0, BatchConfig(batch_size=2))
