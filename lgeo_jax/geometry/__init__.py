"""Geometry kernels: max-cosine, top subspaces and principal angles, linear CKA, and their null baselines.

All kernels run in float32 under `jax.jit` (matmuls at HIGHEST precision) and batch over leading axes;
host-side accumulation (streaming CKA) is float64 numpy. To spread many (adapter, layer) pairs over devices,
place the leading pair axis on a mesh axis (`jax.device_put(x, NamedSharding(mesh, P("data")))`): the
kernels then run sharded, one slice of pairs per device, with the same numbers. Per-table metrics built on these live in
`lgeo_jax.analysis`.

Einsum letters: M rows of the first dictionary, N rows of the second, C rows in a chunk, D feature dim
(E its second copy in a Gram matrix), K / J subspace dims, T samples (tokens; S its second copy),
P / Q feature dims of the two CKA inputs (O / R their second copies).
"""

from lgeo_jax.geometry._cka import StreamingCKA, linear_cka
from lgeo_jax.geometry._max_cosine import max_cosine, normalize_rows
from lgeo_jax.geometry._null import (
    expected_max_cosine,
    gumbel_max_cosine,
    null_max_cosine,
    null_principal_angles,
    wachter_angle_stats,
)
from lgeo_jax.geometry._subspace import angle_summary, principal_angles, top_subspace

__all__ = [
    "StreamingCKA",
    "angle_summary",
    "expected_max_cosine",
    "gumbel_max_cosine",
    "linear_cka",
    "max_cosine",
    "normalize_rows",
    "null_max_cosine",
    "null_principal_angles",
    "principal_angles",
    "top_subspace",
    "wachter_angle_stats",
]
