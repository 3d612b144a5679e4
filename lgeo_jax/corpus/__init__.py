"""The delta-activation corpus: extraction into tensorstore, random access, shuffled SAE batches.

Typical use::

    layout, stats = extract_corpus(model, adapters, ["r4", "r8"], {"probe": examples}, {"probe": cats},
                                   "gs://bucket/corpus", ExtractConfig(layers=(5, 10)), stage)
    corpus = open_corpus("gs://bucket/corpus")
    delta = corpus.split_rows("probe", "r4", 5)                  # [N, D] float32
    source = CorpusSource(corpus, "probe", [("r4", 5), ("r8", 5)], held_out_split="heldout")
"""

from lgeo_jax.corpus._config import ExtractConfig
from lgeo_jax.corpus._fingerprint import directories_fingerprint
from lgeo_jax.corpus._plan import SplitPlan, plan_split
from lgeo_jax.corpus._reader import Corpus, open_corpus
from lgeo_jax.corpus._source import CorpusSource
from lgeo_jax.corpus._stats import STATS_FILE, SplitStats, load_stats, summarize
from lgeo_jax.corpus._store import BASE_NAME, META_FIELDS, CorpusLayout, itemsize, store_url
from lgeo_jax.corpus._writer import CATEGORY_NAMES, Share, corpus_identity, extract_corpus

__all__ = [
    "BASE_NAME", "CATEGORY_NAMES", "META_FIELDS", "STATS_FILE", "Corpus", "CorpusLayout", "CorpusSource",
    "ExtractConfig", "Share", "SplitPlan", "SplitStats", "corpus_identity", "directories_fingerprint", "extract_corpus",
    "itemsize", "load_stats", "open_corpus", "plan_split", "store_url", "summarize",
]
