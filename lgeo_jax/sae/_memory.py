"""Per-device memory of SAE training, for `lgeo plan` (before anything runs)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from jax.sharding import Mesh

from lgeo_jax.sae._config import Arch


@dataclasses.dataclass(frozen=True)
class SAEMemory:
    """Bytes per device, by kind; ``total`` is their sum. float32 everywhere (what `train_saes` uses)."""

    saes_per_device: int
    tokens_per_device: int
    params: int
    grads: int
    adam: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.adam + self.activations

    def describe(self, what: str = "SAEs") -> str:
        gib = 2**30
        return (f"{self.saes_per_device} {what} x {self.tokens_per_device} tokens per device: params "
                f"{self.params / gib:.2f} GiB, grads {self.grads / gib:.2f}, Adam {self.adam / gib:.2f}, "
                f"activations {self.activations / gib:.2f}; total {self.total / gib:.2f} GiB")


def estimate_sae_memory(d_in: int, d_sae: int, n_sae: int, batch_size: int, mesh_shape: Mapping[str, int] | Mesh,
                        arch: Arch = Arch.RELU) -> SAEMemory:
    """Peak training memory per device with the SAE axis on mesh axis ``model`` and tokens on ``data``.

    Params: W_enc and W_dec (2 d F) + b_enc, b_dec (+ threshold); gradients the same; Adam two moments.
    Activations per token kept for the backward pass: pre-activations, latents and their gradients (4 F)
    plus input, reconstruction and their gradients (4 d); TopK adds the k indices/values (small). An SAE
    count or batch that the axis does not divide is rounded up (the worst device).
    """
    shape = dict(mesh_shape.shape) if isinstance(mesh_shape, Mesh) else dict(mesh_shape)
    model, data = shape.get("model", 1), shape.get("data", 1)
    per_dev_sae = math.ceil(n_sae / model)
    per_dev_tok = math.ceil(batch_size / data)
    n_params = 2 * d_in * d_sae + d_sae + d_in + (d_sae if arch.has_threshold else 0)
    params = 4 * n_params * per_dev_sae
    acts = 4 * per_dev_sae * per_dev_tok * (4 * d_sae + 4 * d_in)
    return SAEMemory(per_dev_sae, per_dev_tok, params, params, 2 * params, acts)
