"""Extraction: residuals of the base and every adapter from one jitted pass per batch -> the corpus.

Per batch: `residuals(...)` (one pass for the base and all adapters) -> on the device, delta = h_adapter -
h_base in float32, norms summed over the kept tokens, cast to the store dtype -> asynchronous copy to the
host while the next batch is dispatched -> kept rows gathered on the host -> asynchronous tensorstore
writes. At most `max_pending` batches have writes in flight (a bounded queue); the oldest is committed
(its writes durable, then the manifest records it with the running statistics) before more are issued,
always in batch order, so the manifest's `committed` count is a prefix of the plan.

Crash safety: arrays are preallocated from the plan; batch b always writes the same rows with the same
values, so after a kill the rerun rewrites the uncommitted batches and the store ends identical to an
uninterrupted run. The store's identity (config, inputs, plan) is checked before anything is written.
A progress bar counts kept tokens as their batches are committed (tokens/s and ETA; a resumed run starts
at what was committed).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lgeo_jax.config import to_plain
from lgeo_jax.corpus._config import ExtractConfig
from lgeo_jax.corpus._plan import SplitPlan, plan_split
from lgeo_jax.corpus._stats import SplitStats
from lgeo_jax.corpus._store import (
    CorpusLayout,
    claim_store,
    open_corpus_arrays,
    store_url,
)
from lgeo_jax.data import BatchConfig, Category, TokenizedExample, collate
from lgeo_jax.files import json_hash
from lgeo_jax.lora import LoraAdapters, batch_shards, check_layers, micro_batch_size, prepare_adapters, residuals
from lgeo_jax.model import Gemma2
from lgeo_jax.sharding import mesh_of

PROGRESS_KEY = "corpus"
CATEGORY_NAMES = tuple(c.value for c in Category)


class ProgressLog(Protocol):
    """What extraction needs from a stage: its recorded progress and an atomic way to extend it
    (`lgeo_jax.stages.StageRun` is one)."""

    @property
    def progress(self) -> Mapping[str, Any]: ...

    def update(self, **entries: Any) -> None: ...


@functools.partial(jax.jit, static_argnames=("store_dtype",))
def _rows_and_sums(res, keep, *, store_dtype):
    """[A, C, B, T, D] residuals -> (base and deltas in the store dtype, norm sums [A, C], squared sums)."""
    x = jnp.concatenate([res[:1], res[1:] - res[:1]], axis=0)  # [A, C, B, T, D] float32: base, deltas
    sq = jnp.einsum("acbtd,acbtd->acbt", x, x)  # [A, C, B, T]
    w = keep.astype(jnp.float32)  # [B, T]
    norm_sum = jnp.einsum("acbt,bt->ac", jnp.sqrt(sq), w)  # [A, C]
    sq_sum = jnp.einsum("acbt,bt->ac", sq, w)  # [A, C]
    return x.astype(store_dtype), norm_sum, sq_sum


def _examples_hash(examples: Sequence[TokenizedExample]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(np.int64(e.index).tobytes())
        h.update(np.int64(e.length).tobytes())
        h.update(np.ascontiguousarray(e.input_ids, np.int32).tobytes())
    return h.hexdigest()


def corpus_identity(config: ExtractConfig, activation_dtype: str | None, adapter_names: Sequence[str],
                    d_model: int, plans: Mapping[str, SplitPlan], inputs_hash: str) -> str:
    """Hash of everything that determines the rows: the settings (batch size and chunking too, since they fix
    row offsets; not the store's location or the queue depth), the residual dtype, adapters, tokens of every
    split, and the model/adapter weights (`inputs_hash`)."""
    value = {
        "settings": {**to_plain(config), "store": None, "max_pending": None},
        "activation_dtype": activation_dtype,
        "adapters": list(adapter_names),
        "d_model": d_model,
        "splits": {s: {"tokens": _examples_hash(p.examples), "rows": p.n_rows} for s, p in plans.items()},
        "inputs": inputs_hash,
    }
    return json_hash(value, digits=32)


@dataclasses.dataclass
class _Pending:
    split: str
    batch: int
    futures: list
    count: int
    norm_sum: np.ndarray
    sq_sum: np.ndarray


def extract_corpus(model: Gemma2, adapters: Sequence[LoraAdapters], adapter_names: Sequence[str],
                   splits: Mapping[str, Sequence[TokenizedExample]], categories: Mapping[str, Sequence[int]],
                   store: str, config: ExtractConfig, log: ProgressLog, *, activation_dtype: str | None = None,
                   inputs_hash: str = "") -> tuple[CorpusLayout, dict[str, SplitStats]]:
    """Writes (or resumes writing) the corpus of `splits` into `store`; returns its layout and statistics.

    `categories[split][i]` is the category code (index into `Category`) of `splits[split][i]`; the residual
    stream runs in `activation_dtype` (None: the parameters'). Progress goes to `log` (the stage manifest); a
    log whose progress names another corpus is refused.
    """
    adapters, adapter_names = list(adapters), tuple(adapter_names)
    n_adapters = sum(len(a) for a in adapters)
    if n_adapters != len(adapter_names):
        raise ValueError(f"extract_corpus: {n_adapters} adapters (stacks count one per adapter) but "
                         f"{len(adapter_names)} names {adapter_names}")
    check_layers(config.layers, model.config.n_layers)
    stack = prepare_adapters(adapters, model.config)  # stacked and padded once, not per batch
    # micro-batching avoids XLA:CPU's fusion cliff; on an accelerator a bigger call only helps
    micro_tokens = config.micro_batch_tokens if jax.default_backend() == "cpu" else None
    shards = batch_shards(mesh_of(model))
    plans = {}
    for code, (split, examples) in enumerate(splits.items()):
        if len(categories[split]) != len(examples):
            raise ValueError(f"split '{split}': {len(categories[split])} categories for {len(examples)} examples")
        plans[split] = plan_split(split, examples, config, split_code=code)
    d_model = model.config.d_model
    layout = CorpusLayout(
        d_model=d_model, layers=config.layers, adapters=adapter_names,
        split_rows={s: p.n_rows for s, p in plans.items()}, store_dtype=config.store_dtype.value,
        chunk_rows=config.chunk_rows, categories=CATEGORY_NAMES,
        identity=corpus_identity(config, activation_dtype, adapter_names, d_model, plans, inputs_hash))
    n_arrays, n_layers = len(layout.names), len(layout.layers)

    recorded = log.progress.get(PROGRESS_KEY)
    if recorded is not None and recorded.get("identity") != layout.identity:
        raise ValueError(
            "corpus stage: the interrupted run was started with other settings, data or checkpoints (identity "
            f"{recorded.get('identity')} != {layout.identity}); rerun the corpus stage with force")
    committed = dict(recorded["committed"]) if recorded else {s: 0 for s in plans}
    stats = ({s: SplitStats.from_json(recorded["stats"][s], (n_arrays, n_layers)) for s in plans} if recorded
             else {s: SplitStats.zeros(n_arrays, n_layers) for s in plans})

    url = store_url(store)
    claim_store(url, layout)
    arrays = open_corpus_arrays(url, layout, create=True)
    if recorded is None:
        log.update(**{PROGRESS_KEY: _progress(layout, committed, stats)})

    for split, plan in plans.items():
        meta = plan.metadata(categories[split])
        for name, values in meta.items():
            arrays[(split, "meta", name)].write(values).result()
    collate_cfg = BatchConfig(batch_size=config.batch_size, shuffle=False, pad_multiple=config.pad_multiple)

    def dispatch(split: str, b: int):
        plan = plans[split]
        batch = collate([plan.examples[i] for i in plan.batches[b]], collate_cfg)
        keep = np.zeros(batch.input_ids.shape, bool)  # [B, T]
        for row, i in enumerate(plan.batches[b]):
            keep[row, : plan.examples[i].length] = plan.keep[i]
        micro = micro_batch_size(*batch.input_ids.shape, 1 + (0 if stack is None else len(stack)), micro_tokens,
                                 shards=shards)
        res = residuals(model, batch.input_ids, layers=config.layers, adapters=() if stack is None else stack,
                        attention_mask=batch.attention_mask, dtype=activation_dtype,
                        micro_batch=micro)  # [A, C, B, T, D]
        out = _rows_and_sums(res, keep, store_dtype=config.store_dtype.value)
        for x in out:
            x.copy_to_host_async()
        return split, b, keep, out

    def issue_writes(split: str, b: int, keep: np.ndarray, out) -> _Pending:
        x, norm_sum, sq_sum = (np.asarray(v) for v in out)
        a_, c_, bsz, t, d = x.shape
        idx = np.flatnonzero(keep.reshape(-1))  # [n]
        rows = x.reshape(a_, c_, bsz * t, d)[:, :, idx]  # [A, C, n, D]
        start, stop = plans[split].batch_rows(b)
        if stop - start != idx.shape[0]:
            raise ValueError(f"internal: batch {b} of '{split}' kept {idx.shape[0]} tokens, planned {stop - start}")
        futures = []
        if stop > start:
            for a, name in enumerate(layout.names):
                for c, layer in enumerate(layout.layers):
                    futures.append(arrays[(split, name, layer)][start:stop].write(rows[a, c]))
        return _Pending(split, b, futures, int(idx.shape[0]), norm_sum, sq_sum)

    done = sum(int(plans[s].offsets[committed[s]]) for s in plans)  # rows of the committed batches
    bar = tqdm(total=sum(p.n_rows for p in plans.values()), initial=done, desc="extract", unit="tok",
               unit_scale=True, mininterval=1.0)

    def commit(p: _Pending) -> None:
        for f in p.futures:
            f.result()
        stats[p.split].add(p.count, p.norm_sum, p.sq_sum)
        committed[p.split] = p.batch + 1
        log.update(**{PROGRESS_KEY: _progress(layout, committed, stats)})
        bar.update(p.count)

    pending: collections.deque[_Pending] = collections.deque()
    in_flight = None
    with bar:
        for split, plan in plans.items():
            bar.set_postfix_str(split)
            for b in range(committed[split], len(plan.batches)):
                nxt = dispatch(split, b)  # runs on the device while the previous batch goes to the host
                if in_flight is not None:
                    pending.append(issue_writes(*in_flight))
                in_flight = nxt
                while len(pending) > config.max_pending:
                    commit(pending.popleft())
        if in_flight is not None:
            pending.append(issue_writes(*in_flight))
        while pending:
            commit(pending.popleft())
    return layout, stats


def _progress(layout: CorpusLayout, committed: Mapping[str, int], stats: Mapping[str, SplitStats]) -> dict:
    return {"identity": layout.identity, "committed": dict(committed),
            "stats": {s: v.to_json() for s, v in stats.items()}}
