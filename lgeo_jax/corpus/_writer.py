"""Extraction: residuals of the base and every adapter from one jitted pass per batch -> the corpus.

Per batch: `residuals(...)` (one pass for the base and all adapters) -> on the device, delta = h_adapter -
h_base in float32, norms summed over the kept tokens, cast to the store dtype -> asynchronous copy to the
host while the next batch is dispatched -> kept rows gathered on the host -> asynchronous tensorstore
writes. At most `max_pending` batches have writes in flight (a bounded queue); the oldest is committed
(its writes durable, then the manifest records it with the running statistics) before more are issued,
in batch order.

Several processes (`Share`): process 0 claims the store, creates the arrays and writes the metadata; then
(a barrier) every process extracts its part of the uncommitted batches, round robin, into their planned rows
of the one store, and records each commit, with the batch's own sums, in its own commit log
(`corpus-commits.p<index>.json` in `Share.commits_dir`, rewritten atomically); after a second barrier process
0 folds every log into the manifest (each batch once, in batch order, float64 sums) and removes them. The
manifest stays the one record: `committed` counts the prefix of each split's batches that is done and
`beyond` lists the done batches after it. A rerun, with any number of processes, first folds what the logs of
a killed attempt hold, so a batch is extracted again only if no process committed it.

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
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
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
    read_identity,
    store_url,
)
from lgeo_jax.data import BatchConfig, Category, TokenizedExample, collate
from lgeo_jax.files import atomic_write_json, json_hash, read_json
from lgeo_jax.lora import (
    AUTO,
    LoraAdapters,
    batch_shards,
    check_layers,
    micro_batch_size,
    prepare_adapters,
    residuals,
    tune_micro_batch_tokens,
)
from lgeo_jax.model import Gemma2
from lgeo_jax.sharding import mesh_of

PROGRESS_KEY = "corpus"
CATEGORY_NAMES = tuple(c.value for c in Category)
COMMITS_GLOB = "corpus-commits.p*.json"


class ProgressLog(Protocol):
    """What extraction needs from a stage: its recorded progress and an atomic way to extend it
    (`lgeo_jax.stages.StageRun` is one)."""

    @property
    def progress(self) -> Mapping[str, Any]: ...

    def update(self, **entries: Any) -> None: ...


def _alone(what: str, value: Any) -> Any:
    return value


@dataclasses.dataclass(frozen=True)
class Share:
    """This process's part of an extraction run by `count` processes (`lgeo_jax.stages` makes one per job).

    `broadcast(what, value)` is a barrier of all the processes that returns process 0's `value` to each (what
    names the step in errors); `commits_dir` holds the per-process commit logs (None: no logs, which only a
    single process without earlier multi-process attempts may have)."""

    index: int = 0
    count: int = 1
    commits_dir: str | os.PathLike | None = None
    broadcast: Callable[[str, Any], Any] = _alone

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"extraction share: process {self.index} of {self.count}")
        if self.count > 1 and self.commits_dir is None:
            raise ValueError("extraction over several processes needs a directory for their commit logs")

    def commit_log(self, index: int) -> Path:
        return Path(self.commits_dir) / COMMITS_GLOB.replace("*", str(index))


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
                   inputs_hash: str = "", share: Share = Share()) -> tuple[CorpusLayout, dict[str, SplitStats]]:
    """Writes (or resumes writing) the corpus of `splits` into `store`; returns its layout and statistics.

    `categories[split][i]` is the category code (index into `Category`) of `splits[split][i]`; the residual
    stream runs in `activation_dtype` (None: the parameters'). Progress goes to `log` (the stage manifest,
    written by process 0 only); a log whose progress names another corpus is refused. With `share`, this
    process extracts only its part of the batches; every process returns the statistics of the whole corpus.
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

    recorded = log.progress.get(PROGRESS_KEY)
    if recorded is not None and recorded.get("identity") != layout.identity:
        raise ValueError(
            "corpus stage: the interrupted run was started with other settings, data or checkpoints (identity "
            f"{recorded.get('identity')} != {layout.identity}); rerun the corpus stage with force")

    url = store_url(store)
    if share.index == 0:  # the one writer of the manifest, corpus.json and the metadata
        done, stats = _state(recorded, plans, layout)
        claim_store(url, layout)
        arrays = open_corpus_arrays(url, layout, create=True)
        folded = _fold(share, layout, plans, done, stats)  # what the processes of a killed attempt committed
        if recorded is None or folded:
            log.update(**{PROGRESS_KEY: _progress(layout, done, stats)})
        _remove(folded)
        for split, plan in plans.items():
            meta = plan.metadata(categories[split])
            for name, values in meta.items():
                arrays[(split, "meta", name)].write(values).result()
    progress = share.broadcast("corpus store ready", _progress(layout, done, stats) if share.index == 0 else None)
    if share.index != 0:
        if read_identity(url) != layout:
            raise ValueError(f"{url}: process 0 made this store for another corpus than process {share.index} "
                             "plans (the processes must run the same config on the same files)")
        arrays = open_corpus_arrays(url, layout, create=False)
        done, stats = _state(progress, plans, layout)
    collate_cfg = BatchConfig(batch_size=config.batch_size, shuffle=False, pad_multiple=config.pad_multiple)

    def dispatch(split: str, b: int):
        nonlocal micro_tokens
        plan = plans[split]
        batch = collate([plan.examples[i] for i in plan.batches[b]], collate_cfg)
        keep = np.zeros(batch.input_ids.shape, bool)  # [B, T]
        for row, i in enumerate(plan.batches[b]):
            keep[row, : plan.examples[i].length] = plan.keep[i]
        n_models = 1 + (0 if stack is None else len(stack))

        def run(micro: int) -> jax.Array:  # [A, C, B, T, D]
            return residuals(model, batch.input_ids, layers=config.layers, adapters=() if stack is None else stack,
                             attention_mask=batch.attention_mask, dtype=activation_dtype, micro_batch=micro)

        if micro_tokens == AUTO:  # timed once, on the first batch this process extracts
            micro_tokens = tune_micro_batch_tokens(lambda m: jax.block_until_ready(run(m)), *batch.input_ids.shape,
                                                   n_models, shards=shards)
        res = run(micro_batch_size(*batch.input_ids.shape, n_models, micro_tokens, shards=shards))
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

    remaining = [(split, b) for split, plan in plans.items() for b in range(len(plan.batches)) if b not in done[split]]
    mine = remaining[share.index::share.count]  # round robin over what no process has committed

    def rows_of(batches) -> int:
        return sum(int(plans[split].offsets[b + 1] - plans[split].offsets[b]) for split, b in batches)

    finished = rows_of((split, b) for split in plans for b in done[split])
    bar = tqdm(total=finished + rows_of(mine), initial=finished, unit="tok", unit_scale=True, mininterval=1.0,
               desc="extract" if share.count == 1 else f"extract (process {share.index} of {share.count})")
    commits = None if share.count == 1 else _CommitLog(share.commit_log(share.index), layout.identity)

    def commit(p: _Pending) -> None:
        for f in p.futures:
            f.result()
        if commits is None:
            stats[p.split].add(p.count, p.norm_sum, p.sq_sum)
            done[p.split].add(p.batch)
            log.update(**{PROGRESS_KEY: _progress(layout, done, stats)})
        else:
            commits.record(p)
        bar.update(p.count)

    pending: collections.deque[_Pending] = collections.deque()
    in_flight = None
    with bar:
        for split, b in mine:
            bar.set_postfix_str(split, refresh=False)
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

    if share.count > 1:
        share.broadcast("corpus extracted", None)
        if share.index == 0:
            folded = _fold(share, layout, plans, done, stats)
            log.update(**{PROGRESS_KEY: _progress(layout, done, stats)})
            _remove(folded)
        progress = share.broadcast("corpus merged", _progress(layout, done, stats) if share.index == 0 else None)
        done, stats = _state(progress, plans, layout)
    lost = [(split, b) for split, plan in plans.items() for b in range(len(plan.batches)) if b not in done[split]]
    if lost:
        raise ValueError(f"internal: {len(lost)} batches (e.g. {lost[:3]}) were committed by no process")
    return layout, stats


def _state(progress: Mapping[str, Any] | None, plans: Mapping[str, SplitPlan],
           layout: CorpusLayout) -> tuple[dict[str, set[int]], dict[str, SplitStats]]:
    """The committed batches of each split and their sums, as `progress` (the manifest's entry) records them."""
    shape = (len(layout.names), len(layout.layers))
    if progress is None:
        return {s: set() for s in plans}, {s: SplitStats.zeros(*shape) for s in plans}
    beyond = progress.get("beyond", {})  # absent from manifests of one-process runs before multi-process ones
    done = {s: set(range(int(progress["committed"][s]))) | set(beyond.get(s, ())) for s in plans}
    return done, {s: SplitStats.from_json(progress["stats"][s], shape) for s in plans}


def _progress(layout: CorpusLayout, done: Mapping[str, set[int]], stats: Mapping[str, SplitStats]) -> dict:
    committed = {s: next(n for n in range(len(batches) + 1) if n not in batches) for s, batches in done.items()}
    return {"identity": layout.identity, "committed": committed,
            "beyond": {s: sorted(b for b in done[s] if b > committed[s]) for s in done},
            "stats": {s: v.to_json() for s, v in stats.items()}}


class _CommitLog:
    """One process's commits, each batch with its own sums (so process 0 can fold each batch once)."""

    def __init__(self, path: Path, identity: str):
        self.path, self.identity, self.batches = path, identity, []

    def record(self, p: _Pending) -> None:
        self.batches.append([p.split, p.batch, p.count, p.norm_sum.tolist(), p.sq_sum.tolist()])
        atomic_write_json(self.path, {"identity": self.identity, "batches": self.batches})


def _fold(share: Share, layout: CorpusLayout, plans: Mapping[str, SplitPlan], done: dict[str, set[int]],
          stats: dict[str, SplitStats]) -> list[Path]:
    """Adds to `done` and `stats` every batch the commit logs in `share.commits_dir` hold and `done` lacks, each
    once and in batch order; returns the logs read, to remove once the manifest records them."""
    if share.commits_dir is None:
        return []
    paths = sorted(Path(share.commits_dir).glob(COMMITS_GLOB))
    found = {}
    for path in paths:
        value = read_json(path, needed_by="the corpus stage")
        if value.get("identity") != layout.identity:
            raise ValueError(f"{path}: the commit log of another corpus (identity {value.get('identity')} != "
                             f"{layout.identity}); rerun the corpus stage with force")
        for split, b, count, norm_sum, sq_sum in value["batches"]:
            if b not in done[split]:
                found[(split, b)] = (count, norm_sum, sq_sum)
    order = {split: i for i, split in enumerate(plans)}
    for split, b in sorted(found, key=lambda key: (order[key[0]], key[1])):
        count, norm_sum, sq_sum = found[(split, b)]
        start, stop = plans[split].batch_rows(b)
        if count != stop - start:
            raise ValueError(f"{share.commits_dir}: batch {b} of '{split}' was committed with {count} rows, "
                             f"planned {stop - start}; rerun the corpus stage with force")
        stats[split].add(count, np.asarray(norm_sum), np.asarray(sq_sum))
        done[split].add(b)
    return paths


def _remove(paths: Sequence[Path]) -> None:
    for path in paths:  # a log left behind (a crash here) is folded again harmlessly: its batches are done
        path.unlink(missing_ok=True)
