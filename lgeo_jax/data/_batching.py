"""Length-bucketed, fixed-shape, resumable batches of tokenised examples.

Each epoch's order is a pure function of ``(seed, epoch)``: shuffle the examples, cut the permutation
into windows of ``sort_window`` batches, sort each window by length (so a batch holds similar lengths
and little padding), cut into batches, then shuffle the batch order (so lengths do not trend through
the epoch). Step ``s`` of the infinite stream is batch ``s % steps_per_epoch`` of epoch
``s // steps_per_epoch``, which is how training resumes exactly from a step number.

Every batch has ``batch_size`` rows: a short last batch is filled with empty rows (``sample_index``
-1, all masks 0) so one compiled step function serves the whole epoch and no example is dropped
(unless ``drop_last``, which drops a different remainder each epoch). Sequence length is the longest
row rounded up to ``pad_multiple``, or the smallest of ``bucket_boundaries`` that fits, which bounds
the number of distinct shapes (and recompilations). Padding is on the right.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np
from jaxtyping import Int

from lgeo_jax.data._tokenize import IGNORE_INDEX, TokenizedExample


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Batching policy. ``pad_id`` only fills masked positions (Gemma and the synthetic tokenizer use 0)."""

    batch_size: int
    seed: int = 0
    shuffle: bool = True
    sort_window: int = 64  # batches per length-sorting window; 1 disables sorting
    pad_multiple: int = 8
    bucket_boundaries: tuple[int, ...] = ()
    drop_last: bool = False
    pad_id: int = 0

    def __post_init__(self):
        for name in ("batch_size", "sort_window", "pad_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"BatchConfig.{name}={getattr(self, name)}: must be >= 1")
        boundaries = tuple(int(b) for b in self.bucket_boundaries)
        if any(b < 1 for b in boundaries) or list(boundaries) != sorted(set(boundaries)):
            raise ValueError(
                f"BatchConfig.bucket_boundaries={self.bucket_boundaries}: need distinct positive lengths "
                "in increasing order"
            )
        object.__setattr__(self, "bucket_boundaries", boundaries)


@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
    """A padded batch; all arrays are numpy int32."""

    input_ids: Int[np.ndarray, "B T"]
    attention_mask: Int[np.ndarray, "B T"]  # 1 = real token, 0 = padding
    loss_mask: Int[np.ndarray, "B T"]  # 1 = prediction target
    sample_index: Int[np.ndarray, " B"]  # dataset index of each row, -1 for filler rows

    @property
    def labels(self) -> Int[np.ndarray, "B T"]:
        """Hugging Face style labels: the token where ``loss_mask`` is 1, else -100 (unshifted)."""
        return np.where(self.loss_mask == 1, self.input_ids, IGNORE_INDEX).astype(np.int32)


def steps_per_epoch(n_examples: int, config: BatchConfig) -> int:
    """Batches per epoch."""
    if n_examples < 1:
        raise ValueError("steps_per_epoch: no examples to batch (empty dataset or split)")
    if config.drop_last:
        if n_examples < config.batch_size:
            raise ValueError(f"drop_last with batch_size={config.batch_size} but only {n_examples} examples: no batch")
        return n_examples // config.batch_size
    return -(-n_examples // config.batch_size)


def epoch_batches(lengths: Sequence[int], config: BatchConfig, epoch: int) -> list[np.ndarray]:
    """Positions (into ``lengths``) of the rows of every batch of ``epoch``, in step order."""
    lengths = np.asarray(lengths)
    n, size = lengths.shape[0], config.batch_size
    n_steps = steps_per_epoch(n, config)
    rng = np.random.default_rng((config.seed, epoch))
    order = rng.permutation(n) if config.shuffle else np.arange(n)  # [N]
    order = order[: n_steps * size]
    window = config.sort_window * size
    batches = []
    for start in range(0, order.shape[0], window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + size] for i in range(0, chunk.shape[0], size))
    if config.shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def padded_length(longest: int, config: BatchConfig) -> int:
    """The sequence length a batch whose longest row is ``longest`` is padded to."""
    if config.bucket_boundaries:
        for boundary in config.bucket_boundaries:
            if boundary >= longest:
                return boundary
        raise ValueError(
            f"a batch row has {longest} tokens, above the largest bucket boundary "
            f"{config.bucket_boundaries[-1]}; add a boundary >= data.max_length"
        )
    return -(-longest // config.pad_multiple) * config.pad_multiple


def collate(examples: Sequence[TokenizedExample], config: BatchConfig) -> Batch:
    """Right-pad ``examples`` (at most ``batch_size``) into a ``batch_size``-row batch."""
    if not 1 <= len(examples) <= config.batch_size:
        raise ValueError(f"collate: got {len(examples)} examples for batch_size={config.batch_size}")
    width = padded_length(max(e.length for e in examples), config)
    input_ids = np.full((config.batch_size, width), config.pad_id, dtype=np.int32)  # [B, T]
    attention_mask = np.zeros((config.batch_size, width), dtype=np.int32)  # [B, T]
    loss_mask = np.zeros((config.batch_size, width), dtype=np.int32)  # [B, T]
    sample_index = np.full((config.batch_size,), -1, dtype=np.int32)  # [B]
    for row, example in enumerate(examples):
        input_ids[row, : example.length] = example.input_ids
        attention_mask[row, : example.length] = 1
        loss_mask[row, : example.length] = example.loss_mask
        sample_index[row] = example.index
    return Batch(input_ids, attention_mask, loss_mask, sample_index)


def iterate_batches(
    examples: Sequence[TokenizedExample],
    config: BatchConfig,
    start_step: int = 0,
    num_steps: int | None = None,
) -> Iterator[Batch]:
    """Batches for global steps ``start_step, start_step + 1, ...`` (``num_steps`` of them, or forever).

    Restarting with ``start_step=k`` yields exactly what an uninterrupted run yields from step k on.
    """
    if start_step < 0:
        raise ValueError(f"iterate_batches: start_step={start_step} must be >= 0")
    lengths = [e.length for e in examples]
    n_steps = steps_per_epoch(len(examples), config)
    step, epoch, plan = start_step, -1, []
    while num_steps is None or step < start_step + num_steps:
        if step // n_steps != epoch:
            epoch = step // n_steps
            plan = epoch_batches(lengths, config, epoch)
        yield collate([examples[i] for i in plan[step % n_steps]], config)
        step += 1


def padding_fraction(batches: Sequence[Batch]) -> float:
    """Fraction of token slots that are padding (filler rows included) over ``batches``."""
    slots = sum(b.attention_mask.size for b in batches)
    if slots == 0:
        raise ValueError("padding_fraction: no batches")
    return 1.0 - sum(int(b.attention_mask.sum()) for b in batches) / slots
