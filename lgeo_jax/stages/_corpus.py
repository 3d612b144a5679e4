"""The `corpus` stage: probe and held-out residuals of the base and every adapter -> tensorstore corpus.

Reads the records and tokenizer (`data`), the base checkpoint (`base` or the user's) and the adapters
(`adapters`) through `lgeo_jax.stages._layout`; writes the store (inside this stage's directory, or at
`extract.store`, any tensorstore kvstore URL) and `stats.json` (Table 4's mean norms and the SAE RMS
scales). Progress is recorded batch by batch in the stage manifest, so a killed run resumes where it
stopped; the caller (`lgeo run`) marks the stage finished after this returns.

In a job of several processes every process runs this stage, each on its own devices, extracting its share of
the batches into the one store (`lgeo_jax.corpus.Share`); process 0 alone writes the manifest and stats.json.
"""

from __future__ import annotations

from lgeo_jax.corpus import (
    CATEGORY_NAMES,
    META_FIELDS,
    STATS_FILE,
    Share,
    directories_fingerprint,
    extract_corpus,
    itemsize,
    summarize,
)
from lgeo_jax.data import categorize, tokenize_split
from lgeo_jax.files import atomic_write_json
from lgeo_jax.lora import load_adapter
from lgeo_jax.model import load_model
from lgeo_jax.stages._layout import (
    adapter_dirs,
    base_checkpoint,
    corpus_store,
    load_records,
    load_tokenizer,
    stage_mesh,
)
from lgeo_jax.stages._manifest import Run, StageRun
from lgeo_jax.stages._peers import job_peers
from lgeo_jax.study import StudyConfig


def corpus_size_bytes(config: StudyConfig, n_tokens: int, d_model: int) -> int:
    """Bytes the corpus takes for `n_tokens` kept tokens (all extracted splits together): base plus one
    delta per adapter at every layer, plus the int32 token metadata. Paper scale: 1M tokens x 3584 x 2
    bytes = 7.2 GB per (adapter, layer) in bf16."""
    arrays = len(config.extract.layers) * (1 + len(config.lora.ranks))
    per_array = n_tokens * d_model * itemsize(config.extract.store_dtype.value)
    return arrays * per_array + n_tokens * 4 * len(META_FIELDS)


def run_corpus(config: StudyConfig, stage: StageRun, run: Run) -> None:
    """Extracts (or resumes extracting) the corpus and saves its statistics as `stats.json`."""
    peers = job_peers()
    share = Share(peers.index, peers.count, commits_dir=stage.path,
                  broadcast=lambda what, value: peers.exchange(what, value)[0])
    records = load_records(run)
    tokenizer = load_tokenizer(run, config)
    examples = {s: tokenize_split(records, tokenizer, config.data, s) for s in config.extract.splits}
    categories = {s: [CATEGORY_NAMES.index(categorize(records[e.index].instruction).value) for e in ex]
                  for s, ex in examples.items()}
    base_dir, dirs, names = base_checkpoint(run, config), adapter_dirs(run, config), config.lora.names
    mesh = stage_mesh(config, base_dir)  # the model's mesh (this process's devices), each batch over data x fsdp
    model = load_model(base_dir, dtype=config.model.param_dtype, mesh=mesh)
    adapters = [load_adapter(d, config=model.config, name=n, mesh=mesh) for d, n in zip(dirs, names, strict=True)]
    store = corpus_store(config, run)
    activation_dtype = config.model.residual_dtype
    layout, stats = extract_corpus(model, adapters, names, examples, categories, store, config.extract, stage,
                                   activation_dtype=activation_dtype,
                                   inputs_hash=directories_fingerprint([base_dir, *dirs]), share=share)
    if not peers.is_writer:
        return
    atomic_write_json(stage.path / STATS_FILE, {
        "store": store,
        "activation_dtype": activation_dtype or str(model.embed[...].dtype),
        "store_dtype": config.extract.store_dtype.value,
        "rows": dict(layout.split_rows),
        "splits": summarize(stats, layout.names, layout.layers, layout.d_model),
    })
