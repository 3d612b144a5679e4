"""Geometry kernels: max-cosine, matching, top subspaces and principal angles, linear CKA, and their null baselines.

All kernels run in float32 under `jax.jit` (matmuls at HIGHEST precision) and batch over leading axes;
host-side accumulation (streaming CKA) is float64 numpy. `hungarian_match` is the exception: one pair at
a time, the cosines built on the device, the assignment solved on the host by scipy. To spread many
(adapter, layer) pairs over devices, place the leading pair axis on a mesh axis
(`jax.device_put(x, NamedSharding(mesh, P("data")))`): the kernels then run sharded, one slice of pairs
per device, with the same numbers. Per-table metrics built on these live in `lgeo_jax.analysis`.

Einsum letters: M rows of the first dictionary, N rows of the second, C rows in a chunk, D feature dim
(E its second copy in a Gram matrix), A matched (row, column) pairs, K / J subspace dims (L = min(K, J)
principal angles), T samples (tokens; S its second copy), P / Q feature dims of the two CKA inputs
(O / R their second copies).
"""

from lgeo_jax.geometry._cka import StreamingCKA, linear_cka
from lgeo_jax.geometry._matching import hungarian_match, mutual_nearest_fraction
from lgeo_jax.geometry._max_cosine import max_cosine, normalize_rows
from lgeo_jax.geometry._null import (
    expected_max_cosine,
    expected_mutual_nearest_fraction,
    gumbel_max_cosine,
    null_matching,
    null_max_cosine,
    null_mutual_nearest_fraction,
    null_principal_angles,
    wachter_angle_stats,
)
from lgeo_jax.geometry._subspace import angle_summary, principal_angles, top_subspace

__all__ = [
    "StreamingCKA",
    "angle_summary",
    "expected_max_cosine",
    "expected_mutual_nearest_fraction",
    "gumbel_max_cosine",
    "hungarian_match",
    "linear_cka",
    "max_cosine",
    "mutual_nearest_fraction",
    "normalize_rows",
    "null_matching",
    "null_max_cosine",
    "null_mutual_nearest_fraction",
    "null_principal_angles",
    "principal_angles",
    "top_subspace",
    "wachter_angle_stats",
]
