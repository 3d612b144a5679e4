"""Crosscoders between the base and adapted streams: one encoder over ``[h_base; h_adapted]`` (from the corpus:
base and base + delta), one decoder per stream; BatchTopK with AuxK, or ReLU with an L1 penalty weighting each
latent by the sum of its two decoder norms. Many at once (vmapped, sharded over the mesh like the SAEs),
resumable, with the SAE package's training-health metrics. Format: `_formats` (also in the README).

Typical use::

    source = PairSource(ArraySource([h_base], sae_to_array=[0, 0]), ArraySource([delta_r4, delta_r8]))
    result = train_crosscoders(source, CrosscoderConfig(width=4096, k=32), seeds=[0, 0], out_dir="cc")
"""

from lgeo_jax.crosscoder._config import CrossArch, CrosscoderConfig
from lgeo_jax.crosscoder._formats import Crosscoder, crosscoder_health, load_crosscoder, save_crosscoder
from lgeo_jax.crosscoder._models import decoder_norms, init_params
from lgeo_jax.crosscoder._train import CrossResult, PairSource, initial_decoder, train_crosscoders

__all__ = ["CrossArch", "CrossResult", "Crosscoder", "CrosscoderConfig", "PairSource", "crosscoder_health",
           "decoder_norms", "init_params", "initial_decoder", "load_crosscoder", "save_crosscoder",
           "train_crosscoders"]
