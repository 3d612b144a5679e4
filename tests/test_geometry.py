"""Geometry kernels against independent float64 references (numpy brute force, scipy, U-statistics).

Shapes are small primes so transposition or chunking bugs cannot hide; the paper-shape nulls run by default
(the max-cosine one is a 1-TFLOP Monte Carlo, about 30 s on 2 cores: it is an acceptance number).
"""

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize

from lgeo_jax import geometry as geo


def _unit(w):
    return w / np.linalg.norm(w, axis=-1, keepdims=True)


def _f32(x):
    """Round to float32 and return as float64, so the reference sees exactly the kernel's inputs."""
    return np.asarray(x, np.float32).astype(np.float64)


# ----------------------------------------------------------------------------------------- max-cosine


@pytest.mark.parametrize("absolute", [False, True])
def test_max_cosine_matches_float64_brute_force(absolute):
    rng = np.random.default_rng(0)
    a, b = _f32(rng.normal(size=(37, 19))), _f32(rng.normal(size=(53, 19)) * 3.0)
    cos = _unit(a) @ _unit(b).T  # [37, 53]
    if absolute:
        cos = np.abs(cos)
    best, idx = geo.max_cosine(a, b, chunk=8, absolute=absolute, return_index=True)  # 8 does not divide 37
    np.testing.assert_allclose(np.asarray(best), cos.max(axis=1), atol=2e-6, rtol=0)
    # The returned index must point at a row achieving the max (exact index may differ only on near-ties).
    np.testing.assert_allclose(cos[np.arange(37), np.asarray(idx)], cos.max(axis=1), atol=2e-6, rtol=0)
    assert np.mean(np.asarray(idx) == cos.argmax(axis=1)) > 0.9


def test_max_cosine_chunk_independent_and_batched():
    rng = np.random.default_rng(1)
    a, b = _f32(rng.normal(size=(2, 3, 29, 11))), _f32(rng.normal(size=(2, 3, 41, 11)))
    batched = np.asarray(geo.max_cosine(a, b, chunk=7))  # [2, 3, 29]
    assert batched.shape == (2, 3, 29)
    for i, j in itertools.product(range(2), range(3)):
        ref = (_unit(a[i, j]) @ _unit(b[i, j]).T).max(axis=1)
        np.testing.assert_allclose(batched[i, j], ref, atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(geo.max_cosine(a, b, chunk=512)), batched, atol=1e-6, rtol=0)


def test_max_cosine_zero_rows():
    a = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    b = np.array([[-1.0, 0.5], [0.0, 0.0], [-1.0, -0.5]])
    best, idx = geo.max_cosine(a, b, return_index=True)
    best, idx = np.asarray(best), np.asarray(idx)
    # Row 0: every live b row has a negative cosine; the zero b row must not win with cosine 0.
    np.testing.assert_allclose(best[0], -1 / math.sqrt(1.25), rtol=1e-6)
    assert idx[0] in (0, 2)
    assert np.isnan(best[1]) and idx[1] == -1  # dead row of a
    np.testing.assert_allclose(best[2], 0.5 / math.sqrt(1.25), rtol=1e-6)
    assert idx[2] == 0
    all_dead = np.asarray(geo.max_cosine(a, np.zeros((4, 2))))
    assert np.isnan(all_dead).all()


def test_max_cosine_validates_shapes():
    with pytest.raises(ValueError, match="feature dim"):
        geo.max_cosine(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match="batch"):
        geo.max_cosine(np.ones((2, 3, 4)), np.ones((3, 3, 4)))


# ----------------------------------------------------------------------------- subspaces and angles


def _angle_atol_deg(u, v):
    """Float32 QR moves a subspace by ~eps * cond(basis) radians; allow 4x that (~1e-4 deg for cond ~ 3)."""
    cond = max(np.linalg.cond(u), np.linalg.cond(v))
    return math.degrees(4 * np.finfo(np.float32).eps * cond)


def _scipy_angles_deg(u, v):
    """scipy works on column bases; sort ascending (scipy's order mixes its two formulas)."""
    return np.sort(np.degrees(scipy.linalg.subspace_angles(u.T, v.T)))


def test_principal_angles_random_matches_scipy():
    rng = np.random.default_rng(2)
    u, v = _f32(rng.normal(size=(7, 31))), _f32(rng.normal(size=(7, 31)))
    ours = np.asarray(geo.principal_angles(u, v))
    assert np.all(np.diff(ours) >= 0)
    np.testing.assert_allclose(ours, _scipy_angles_deg(u, v), atol=_angle_atol_deg(u, v), rtol=0)


def test_principal_angles_nearly_identical_subspaces():
    """Angles ~1e-3 deg (cos = 1 - 1.5e-10, invisible to float32 arccos) must come out to ~1% relative.

    Tolerance: the sine path computes the residual Qv - Qu Qu^T Qv in float32, whose rounding error is
    ~eps * sqrt(k) ~ 3e-7 rad ~ 2e-5 deg absolute; 1e-5 deg + 1% relative covers it with margin.
    """
    rng = np.random.default_rng(3)
    u = rng.normal(size=(6, 47))
    v = _f32(u + 2e-5 * rng.normal(size=u.shape))
    u = _f32(u)
    ref = _scipy_angles_deg(u, v)
    assert 1e-4 < ref.min() and ref.max() < 1e-2  # really the tiny-angle regime
    np.testing.assert_allclose(np.asarray(geo.principal_angles(u, v)), ref, rtol=1e-2, atol=1e-5)


def test_principal_angles_partially_shared_and_unequal_dims():
    rng = np.random.default_rng(4)
    shared = rng.normal(size=(3, 43))
    u = _f32(np.concatenate([shared, rng.normal(size=(2, 43))]))  # 5-dim
    v = _f32(np.concatenate([rng.normal(size=(3, 3)) @ shared, rng.normal(size=(6, 43))]))  # 9-dim, same 3 shared
    ours = np.asarray(geo.principal_angles(u, v))
    assert ours.shape == (5,)
    ref = _scipy_angles_deg(u, v)
    np.testing.assert_allclose(ours, ref, atol=_angle_atol_deg(u, v), rtol=0)
    assert np.all(ours[:3] < 1e-3) and np.all(ours[3:] > 10)
    np.testing.assert_allclose(np.asarray(geo.principal_angles(v, u)), ours, atol=_angle_atol_deg(u, v), rtol=0)


def _rotation(rng, d):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    return q


def test_principal_angles_batched():
    rng = np.random.default_rng(5)
    u, v = _f32(rng.normal(size=(3, 4, 13))), _f32(rng.normal(size=(3, 6, 13)))
    ours = np.asarray(geo.principal_angles(u, v))  # [3, 4]
    for i in range(3):
        np.testing.assert_allclose(ours[i], _scipy_angles_deg(u[i], v[i]), atol=_angle_atol_deg(u[i], v[i]), rtol=0)


@pytest.mark.parametrize("method", ["subset", "gram", "svd"])
@pytest.mark.parametrize("row_normalize", [False, True])
def test_top_subspace_spans_numpy_svd_subspace(row_normalize, method):
    rng = np.random.default_rng(6)
    # Decaying column scales give a clear singular gap, so the top-5 subspace is well defined.
    w = _f32(rng.normal(size=(41, 23)) * np.geomspace(10, 0.1, 23) * rng.uniform(0.5, 2.0, size=(41, 1)))
    basis = np.asarray(geo.top_subspace(w, 5, row_normalize=row_normalize, method=method), np.float64)  # [5, 23]
    assert basis.shape == (5, 23)
    np.testing.assert_allclose(basis @ basis.T, np.eye(5), atol=1e-5)
    ref_w = _unit(w) if row_normalize else w
    ref = np.linalg.svd(ref_w, full_matrices=False)[2][:5]  # [5, 23]
    np.testing.assert_allclose(basis.T @ basis, ref.T @ ref, atol=5e-6)  # same projector


@pytest.mark.parametrize("method", ["subset", "gram", "svd"])
def test_top_subspace_small_singular_gap(method):
    """Decoder-like rows (random unit rows): the k-th singular gap is ~0.3%, so float32 can only pin the
    subspace to ~eps * s_1 / (s_k - s_k+1) ~ 1e-3 deg (gram: eps * s_1^2 / (s_k^2 - s_k+1^2), similar)."""
    w = _f32(np.random.default_rng(13).normal(size=(2000, 300)))
    ref = np.linalg.svd(_unit(w), full_matrices=False)[2][:64]  # [64, 300]
    basis = np.asarray(geo.top_subspace(w, 64, row_normalize=True, method=method), np.float64)
    assert np.degrees(scipy.linalg.subspace_angles(basis.T, ref.T)).max() < 1e-2


def test_top_subspace_batched_matches_per_item():
    w = _f32(np.random.default_rng(14).normal(size=(2, 3, 31, 17)) * np.geomspace(5, 0.2, 17))
    batched = np.asarray(geo.top_subspace(w, 4), np.float64)  # [2, 3, 4, 17]
    for i, j in itertools.product(range(2), range(3)):
        ref = np.linalg.svd(w[i, j], full_matrices=False)[2][:4]
        np.testing.assert_allclose(batched[i, j].T @ batched[i, j], ref.T @ ref, atol=5e-6)


def test_top_subspace_subset_rows_are_the_singular_vectors_in_order_under_vmap_and_map():
    """The host subset solver returns each singular vector (up to sign) in descending order, as slicing a basis
    to its first k rows (the analysis does) needs, also when traced under vmap or lax.map (the resampled angles)."""
    w = _f32(np.random.default_rng(15).normal(size=(3, 41, 23)) * np.geomspace(10, 0.1, 23))
    basis = np.asarray(geo.top_subspace(w, 5, method="subset"), np.float64)  # [3, 5, 23]
    np.testing.assert_array_equal(np.asarray(geo.top_subspace(w[0], 5)), basis[0])  # auto: one matrix -> subset
    for i in range(3):
        ref = np.linalg.svd(w[i].astype(np.float64), full_matrices=False)[2][:5]
        np.testing.assert_allclose(np.abs(np.sum(basis[i] * ref, axis=-1)), 1.0, atol=1e-5)
    import jax

    one = lambda x: geo.top_subspace(x, 5, method="subset")
    np.testing.assert_array_equal(np.asarray(jax.vmap(one)(w)), basis)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda x: jax.lax.map(one, x))(w)), basis)


def test_top_subspace_validates_k():
    with pytest.raises(ValueError, match="k=9"):
        geo.top_subspace(np.ones((5, 8)), 9)
    with pytest.raises(ValueError, match="method"):
        geo.top_subspace(np.ones((5, 8)), 2, method="qr")


def test_angle_summary():
    s = geo.angle_summary(np.array([10.0, 30.0, 70.0, 80.0]))
    assert float(s["mean"]) == 47.5 and float(s["min"]) == 10.0
    assert float(s["frac_near_orthogonal"]) == 0.5 and float(s["frac_aligned"]) == 0.5


# ---------------------------------------------------------------------------------------------- CKA


def _cka64(x, y):
    x, y = x - x.mean(0), y - y.mean(0)
    return np.sum((y.T @ x) ** 2) / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


@pytest.mark.parametrize("offset", [0.0, 1e3, 1e4])
@pytest.mark.parametrize("n_samples", [211, 17])  # feature-space form, then sample-space form
def test_linear_cka_with_large_mean_offsets(offset, n_samples):
    """Offsets of 1e3-1e4 x the spread: the float32 inputs themselves are only good to ~offset * 6e-8,
    so the reference runs on the same rounded inputs; what is tested is the kernel's own arithmetic."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(n_samples, 23))
    y = x[:, :19] @ rng.normal(size=(19, 29)) + 0.7 * rng.normal(size=(n_samples, 29))
    x, y = _f32(x + offset * rng.uniform(0.5, 1.0, 23)), _f32(y - offset * rng.uniform(0.5, 1.0, 29))
    ours, ref = float(geo.linear_cka(x, y)), _cka64(x, y)
    assert 0.2 < ref < 0.95
    np.testing.assert_allclose(ours, ref, rtol=2e-6)


def test_linear_cka_invariances():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(101, 13)), rng.normal(size=(101, 7)) + rng.normal(size=(101, 1))
    base = float(geo.linear_cka(x, y))
    np.testing.assert_allclose(float(geo.linear_cka(3.7 * x, y)), base, rtol=1e-5)
    np.testing.assert_allclose(float(geo.linear_cka(x @ _rotation(rng, 13), y)), base, rtol=1e-5)
    np.testing.assert_allclose(float(geo.linear_cka(x, x)), 1.0, rtol=1e-6)


def test_streaming_cka_equals_exact_with_uneven_batches_and_merge():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(200, 17)) + 1e3
    y = np.tanh(x[:, :11] - 1e3) @ rng.normal(size=(11, 13)) + 0.3 * rng.normal(size=(200, 13)) - 5e2
    x, y = _f32(x), _f32(y)
    bounds = [0, 7, 57, 70, 130, 131, 200]  # uneven, including a single-row batch
    host_a, host_b = geo.StreamingCKA(), geo.StreamingCKA()
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        (host_a if i % 2 == 0 else host_b).update(x[lo:hi], y[lo:hi])
    merged = host_a.merge(host_b)
    assert merged.n == 200 and merged.n_batches == 6
    np.testing.assert_allclose(merged.result(), _cka64(x, y), rtol=5e-6)
    np.testing.assert_allclose(merged.mean_x, x.mean(0), rtol=1e-7)


def _hsic_u_statistic(kx, ky):
    """Unbiased HSIC straight from its U-statistic definition over distinct index tuples (tiny n only)."""
    n = kx.shape[0]
    t1 = np.mean([kx[i, j] * ky[i, j] for i, j in itertools.permutations(range(n), 2)])
    t2 = np.mean([kx[i, j] * ky[q, r] for i, j, q, r in itertools.permutations(range(n), 4)])
    t3 = np.mean([kx[i, j] * ky[i, q] for i, j, q in itertools.permutations(range(n), 3)])
    return t1 + t2 - 2 * t3


def test_unbiased_minibatch_cka_matches_u_statistic():
    rng = np.random.default_rng(10)
    batches = [7, 6, 8]
    xs = [_f32(rng.normal(size=(n, 5)) + 50.0) for n in batches]
    ys = [_f32(x[:, :3] @ rng.normal(size=(3, 4)) + rng.normal(size=(len(x), 4))) for x in xs]
    acc = geo.StreamingCKA(unbiased=True)
    for x, y in zip(xs, ys, strict=True):
        acc.update(x, y)
    # Reference on the *uncentred* data: the estimator is translation invariant, the kernel centres.
    sums = np.zeros(3)
    for x, y in zip(xs, ys, strict=True):
        kx, ky = x @ x.T, y @ y.T
        sums += [_hsic_u_statistic(kx, ky), _hsic_u_statistic(kx, kx), _hsic_u_statistic(ky, ky)]
    np.testing.assert_allclose(acc.result(), sums[0] / np.sqrt(sums[1] * sums[2]), rtol=1e-6)
    with pytest.raises(ValueError, match=">= 4 rows"):
        acc.update(xs[0][:3], ys[0][:3])


def test_streaming_cka_validates():
    with pytest.raises(ValueError, match="no batches"):
        geo.StreamingCKA().result()
    with pytest.raises(ValueError, match="unbiased"):
        geo.StreamingCKA().merge(geo.StreamingCKA(unbiased=True, n=4, n_batches=1))


# --------------------------------------------------------------------------------------- null baselines


def test_expected_max_cosine_closed_form_d3():
    """In R^3 the cosine with a random direction is uniform on [-1, 1]: E max of n = -1 + 2n / (n + 1)."""
    for n in (1, 2, 10, 1000):
        np.testing.assert_allclose(geo.expected_max_cosine(n, 3), -1 + 2 * n / (n + 1), atol=1e-6)
        np.testing.assert_allclose(geo.expected_max_cosine(n, 3, absolute=True), n / (n + 1), atol=1e-6)


@pytest.mark.parametrize("absolute", [False, True])
def test_expected_max_cosine_matches_monte_carlo(absolute):
    values = np.asarray(geo.null_max_cosine(2048, 3001, 257, seed=11, absolute=absolute))
    # Rows share the same b, so the per-row maxima are weakly correlated; 5 naive standard errors.
    se = values.std() / math.sqrt(values.size)
    assert abs(values.mean() - geo.expected_max_cosine(3001, 257, absolute=absolute)) < 5 * se


def test_max_cosine_null_at_paper_shape_analytic():
    exact = geo.expected_max_cosine(16_384, 3584)
    assert abs(exact - 0.067) < 1e-3  # docs/conventions.md: ~0.067 vs the paper's "random = 0.000"
    assert abs(geo.gumbel_max_cosine(16_384, 3584) / exact - 1) < 0.01  # the asymptotic is within 1%


def test_max_cosine_null_at_paper_shape_monte_carlo():
    values = np.asarray(geo.null_max_cosine(16_384, 16_384, 3584, seed=0))
    assert abs(values.mean() - geo.expected_max_cosine(16_384, 3584)) < 2e-4
    assert abs(values.mean() - 0.067) < 1e-3


def test_subspace_null_at_paper_shape():
    """Random 256-dim subspaces of R^3584: mean ~76.7 deg, smallest ~59.5, ~75% >= 70 deg, none <= 30."""
    summary = {k: float(v[0]) for k, v in geo.angle_summary(geo.null_principal_angles(256, 3584, seed=0)).items()}
    limit = geo.wachter_angle_stats(256, 256, 3584)
    assert abs(summary["mean"] - 76.7) < 0.3 and abs(summary["mean"] - limit["mean"]) < 0.3
    assert abs(summary["min"] - 59.5) < 1.0 and abs(summary["min"] - limit["min"]) < 1.5
    assert abs(summary["frac_near_orthogonal"] - 0.75) < 0.03
    assert abs(summary["frac_near_orthogonal"] - limit["frac_near_orthogonal"]) < 0.03
    assert summary["frac_aligned"] == 0.0 and limit["frac_aligned"] < 1e-9


def test_wachter_law_is_normalised_and_matches_monte_carlo_for_unequal_dims():
    assert abs(geo.wachter_angle_stats(100, 400, 2000, near_orthogonal=0.0)["frac_near_orthogonal"] - 1) < 1e-9
    angles = np.asarray(geo.null_principal_angles(100, 2000, k2=400, seed=12, n_trials=2))
    limit = geo.wachter_angle_stats(100, 400, 2000)
    assert abs(angles.mean() - limit["mean"]) < 0.15
    assert abs(np.mean(angles >= 70) - limit["frac_near_orthogonal"]) < 0.03
    with pytest.raises(ValueError, match="k1 \\+ k2 <= d"):
        geo.wachter_angle_stats(300, 300, 500)


def test_pair_batches_shard_across_devices():
    """(adapter, layer) pairs placed along a mesh axis run sharded (GSPMD propagates it through vmap, lax.map,
    QR and SVD) and give the single-device numbers."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from lgeo_jax.sharding import make_mesh

    mesh = make_mesh(data=8)
    pairs = NamedSharding(mesh, PartitionSpec("data"))
    rng = np.random.default_rng(11)
    a = rng.normal(size=(8, 67, 29)).astype(np.float32)  # 8 pairs, one per device
    b = rng.normal(size=(8, 53, 29)).astype(np.float32)
    a_sh, b_sh = jax.device_put(a, pairs), jax.device_put(b, pairs)
    cos = geo.max_cosine(a_sh, b_sh, chunk=16)
    assert cos.sharding.spec == PartitionSpec("data")
    np.testing.assert_allclose(np.asarray(cos), np.asarray(geo.max_cosine(a, b, chunk=16)), rtol=0, atol=1e-6)
    angles = geo.principal_angles(geo.top_subspace(a_sh, 5), geo.top_subspace(b_sh, 5))
    assert angles.sharding.spec == PartitionSpec("data")
    want = geo.principal_angles(geo.top_subspace(a, 5), geo.top_subspace(b, 5))
    np.testing.assert_allclose(np.asarray(angles), np.asarray(want), rtol=0, atol=1e-3)


# =========================================================================================================
# Issue 16: principal angles between subspaces of different dims, one-to-one matching (Hungarian),
# mutual nearest neighbours, and their null baselines.
# =========================================================================================================


@pytest.mark.parametrize(
    "k, j, d, seed",
    [(3, 8, 29, 20), (11, 4, 37, 21), (1, 6, 13, 22), (9, 7, 12, 23)],  # last: K + J > D forces 4 zero angles
)
def test_principal_angles_unequal_dims_match_scipy(k, j, d, seed):
    """K != J: min(K, J) angles in degrees, ascending, with scipy's values (scipy: radians, descending).

    Tolerance: `_angle_atol_deg`, 4 eps cond(basis) (the float32 QR moves each subspace by ~eps cond
    radians); the reference runs in float64 on the same float32-rounded inputs.
    """
    rng = np.random.default_rng(seed)
    u, v = _f32(rng.normal(size=(k, d))), _f32(rng.normal(size=(j, d)))
    ours = np.asarray(geo.principal_angles(u, v))
    assert ours.shape == (min(k, j),) and np.all(np.diff(ours) >= 0)
    atol = _angle_atol_deg(u, v)
    np.testing.assert_allclose(ours, np.degrees(scipy.linalg.subspace_angles(u.T, v.T))[::-1], atol=atol, rtol=0)
    np.testing.assert_allclose(np.asarray(geo.principal_angles(v, u)), ours, atol=atol, rtol=0)
    if k + j > d:
        assert np.all(ours[: k + j - d] < 1e-3) and ours[k + j - d] > 1.0


def test_principal_angles_unequal_dims_nearly_contained():
    """A 4-dim subspace tilted ~1e-3 deg out of a 9-dim one: the sine path with K != J, both argument orders.

    Tolerance as in `test_principal_angles_nearly_identical_subspaces` (float32 residual rounding ~2e-5 deg
    absolute; 1e-5 deg + 1% relative).
    """
    rng = np.random.default_rng(24)
    v = rng.normal(size=(9, 47))
    u = _f32(v[:4] + 2e-5 * rng.normal(size=(4, 47)))
    v = _f32(v)
    ref = _scipy_angles_deg(u, v)
    assert ref.shape == (4,) and 1e-4 < ref.min() and ref.max() < 1e-2  # really the tiny-angle regime
    np.testing.assert_allclose(np.asarray(geo.principal_angles(u, v)), ref, rtol=1e-2, atol=1e-5)
    np.testing.assert_allclose(np.asarray(geo.principal_angles(v, u)), ref, rtol=1e-2, atol=1e-5)


def test_null_principal_angles_unequal_dims():
    """Random 30- and 35-dim subspaces of R^50 share at least 15 dims: 15 angles ~0, the rest not."""
    angles = np.asarray(geo.null_principal_angles(30, 50, k2=35, seed=6, n_trials=3))  # [3, 30]
    assert angles.shape == (3, 30) and np.all(np.diff(angles, axis=-1) >= 0)
    assert np.all(angles[:, :15] < 1e-3) and np.all(angles[:, 15:] > 1.0)
    swapped = np.asarray(geo.null_principal_angles(35, 50, k2=30, seed=6, n_trials=3))
    assert swapped.shape == (3, 30) and np.all(swapped[:, :15] < 1e-3)
    summary = geo.angle_summary(angles, aligned=1e-3)
    np.testing.assert_allclose(np.asarray(summary["frac_aligned"]), 0.5)
    np.testing.assert_allclose(np.asarray(summary["mean"]), angles.mean(axis=-1), rtol=1e-6)


def _cosines64(a, b, absolute=False):
    cos = _unit(a) @ _unit(b).T  # [M, N]
    return np.abs(cos) if absolute else cos


def _check_assignment(rows, cols, cos, m, n, pairs):
    assert rows.shape == cols.shape == cos.shape == (pairs,)
    assert rows.dtype.kind == cols.dtype.kind == "i" and cos.dtype == np.float32
    assert np.all(np.diff(rows) > 0)  # ascending, hence one-to-one on the a side
    assert len(np.unique(cols)) == pairs  # one-to-one on the b side
    assert rows.min() >= 0 and rows.max() < m and cols.min() >= 0 and cols.max() < n


@pytest.mark.parametrize("m, n, d, chunk", [(23, 23, 5, 7), (19, 41, 3, 8), (47, 13, 11, 512)])
@pytest.mark.parametrize("absolute", [False, True])
def test_hungarian_match_is_an_optimal_assignment(m, n, d, chunk, absolute):
    """Total cosine equals scipy's float64 optimum; chunks that do not divide M, M < N, M > N.

    Tolerance: our assignment is optimal for float32 cosines within delta = 2e-6 of float64 (as in the
    max-cosine tests), so its float64 total is within 2 * pairs * delta of the float64 optimum.
    """
    rng = np.random.default_rng(30 + m)
    a = _f32(rng.normal(size=(m, d)))
    b = _f32(rng.normal(size=(n, d)) * rng.uniform(0.1, 10.0, size=(n, 1)))
    cos = _cosines64(a, b, absolute)
    rows, cols, got = geo.hungarian_match(a, b, chunk=chunk, absolute=absolute)
    pairs = min(m, n)
    _check_assignment(rows, cols, got, m, n, pairs)
    ref_rows, ref_cols = scipy.optimize.linear_sum_assignment(cos, maximize=True)
    delta = 2e-6
    assert abs(cos[rows, cols].sum() - cos[ref_rows, ref_cols].sum()) <= 2 * pairs * delta
    np.testing.assert_allclose(got, cos[rows, cols], atol=delta, rtol=0)
    # The case must need an assignment: rows' nearest columns collide, so per-row argmax is not one-to-one.
    nearest = cos.argmax(axis=1) if m <= n else cos.argmax(axis=0)
    assert len(np.unique(nearest)) < pairs


@pytest.mark.parametrize("absolute", [False, True])
def test_hungarian_match_recovers_a_permuted_rescaled_copy(absolute):
    """b = a's rows shuffled among extra latents, each scaled by a random positive factor (or, with
    absolute=True, a random-sign one): matched back exactly as the permutation, cosine 1 to 1e-5."""
    rng = np.random.default_rng(31)
    a = _f32(rng.normal(size=(61, 29)))
    scale = rng.uniform(0.01, 100.0, size=(61, 1))
    if absolute:
        scale *= rng.choice([-1.0, 1.0], size=(61, 1))
    perm = rng.permutation(78)
    b = _f32(np.concatenate([a * scale, rng.normal(size=(17, 29))])[perm])  # b[j] = stacked row perm[j]
    position = np.argsort(perm)  # position[i] = where stacked row i (a[i] for i < 61) went in b
    rows, cols, cos = geo.hungarian_match(a, b, chunk=16, absolute=absolute)
    np.testing.assert_array_equal(rows, np.arange(61))
    np.testing.assert_array_equal(cols, position[:61])
    np.testing.assert_allclose(cos, 1.0, atol=1e-5, rtol=0)
    # The other way round: the 17 extra latents of b stay unmatched.
    rows, cols, cos = geo.hungarian_match(b, a, chunk=16, absolute=absolute)
    np.testing.assert_array_equal(rows, np.sort(position[:61]))
    np.testing.assert_array_equal(cols, perm[rows])
    np.testing.assert_allclose(cos, 1.0, atol=1e-5, rtol=0)


def test_hungarian_match_leaves_dead_rows_unmatched():
    rng = np.random.default_rng(32)
    a, b = _f32(rng.normal(size=(7, 5))), _f32(rng.normal(size=(6, 5)))
    a[[1, 4]] = 0.0
    b[2] = 0.0
    rows, cols, cos = geo.hungarian_match(a, b)
    _check_assignment(rows, cols, cos, 7, 6, 5)
    assert not set(rows) & {1, 4} and 2 not in cols
    live_a, live_b = np.array([0, 2, 3, 5, 6]), np.array([0, 1, 3, 4, 5])
    ref = _cosines64(a[live_a], b[live_b])
    best = ref[scipy.optimize.linear_sum_assignment(ref, maximize=True)].sum()
    np.testing.assert_allclose(cos.sum(), best, rtol=0, atol=2 * 5 * 2e-6)
    empty = geo.hungarian_match(np.zeros((3, 5)), b)
    assert all(x.shape == (0,) for x in empty)
    with pytest.raises(ValueError, match="equal dim"):
        geo.hungarian_match(a, np.ones((3, 4)))


def _mutual_fraction64(a, b, absolute=False):
    cos = _cosines64(a, b, absolute)  # [M, N]
    for c in (cos, cos.T):  # no near-ties, so float32 argmaxes cannot flip
        top2 = np.sort(c, axis=1)[:, -2:]
        assert np.all(top2[:, 1] - top2[:, 0] > 1e-5)
    a_to_b, b_to_a = cos.argmax(axis=1), cos.argmax(axis=0)
    return np.mean(b_to_a[a_to_b] == np.arange(len(a)))


@pytest.mark.parametrize("absolute", [False, True])
def test_mutual_nearest_fraction_matches_float64(absolute):
    """Batched [2, ...]; b holds noisy copies of 20 of a's 43 rows among 31 random ones."""
    rng = np.random.default_rng(40)
    a = _f32(rng.normal(size=(2, 43, 17)))
    copies = a[:, :20] + 0.5 * rng.normal(size=(2, 20, 17))
    b = _f32(np.concatenate([copies, rng.normal(size=(2, 31, 17))], axis=1))
    ours = np.asarray(geo.mutual_nearest_fraction(a, b, chunk=8, absolute=absolute))  # [2]
    assert ours.shape == (2,)
    for i in range(2):
        ref = _mutual_fraction64(a[i], b[i], absolute)
        assert 0.35 < ref < 0.95  # neither trivial nor saturated
        np.testing.assert_allclose(ours[i], ref, rtol=0, atol=1e-6)


def test_mutual_nearest_fraction_dead_rows():
    rng = np.random.default_rng(41)
    a, b = _f32(rng.normal(size=(13, 6))), _f32(rng.normal(size=(11, 6)))
    a[3] = 0.0
    b[[0, 5]] = 0.0
    live_a, live_b = np.delete(np.arange(13), 3), np.delete(np.arange(11), [0, 5])
    ref = _mutual_fraction64(a[live_a], b[live_b])  # dead rows of a leave the fraction, of b never win
    np.testing.assert_allclose(float(geo.mutual_nearest_fraction(a, b)), ref, rtol=0, atol=1e-6)
    assert np.isnan(float(geo.mutual_nearest_fraction(a, np.zeros((4, 6)))))


def test_null_matching_between_random_pairing_and_max_cosine():
    """Same directions as null_max_cosine: a matched cosine never beats the row's max-cosine, equals it for
    one row, nearly equals it when rows rarely share a nearest neighbour, and falls measurably below it
    when m = n; yet it is far above a random one-to-one pairing (mean 0, standard error 1 / sqrt(d m))."""
    single = geo.null_matching(1, 500, 64, seed=1)
    np.testing.assert_allclose(single, float(geo.null_max_cosine(1, 500, 64, seed=1)[0]), rtol=0, atol=1e-7)
    sparse = geo.null_matching(20, 4000, 64, seed=2)
    assert abs(sparse - float(np.mean(geo.null_max_cosine(20, 4000, 64, seed=2)))) < 1e-3
    matched = geo.null_matching(400, 400, 64, seed=3)
    nearest = float(np.mean(geo.null_max_cosine(400, 400, 64, seed=3)))  # ~0.36
    assert matched < nearest - 0.005  # ~0.345: collisions cost something
    assert matched > 0.8 * nearest and matched > 20 / math.sqrt(64 * 400)
    assert geo.null_matching(400, 400, 64, seed=3, absolute=True) > matched


@pytest.mark.parametrize("m, n, d, absolute", [(3000, 2000, 300, False), (500, 2000, 8, True)])
def test_null_mutual_nearest_fraction_matches_closed_form(m, n, d, absolute):
    """E = n / (n + m - 1) exactly (the _null module docstring); 4 seeds, 4 binomial standard errors (rows
    of one draw are close to independent: measured spread across seeds is at most the binomial one).
    Counting over b's rows instead of a's would give m / (n + m - 1) and fail."""
    p = geo.expected_mutual_nearest_fraction(m, n)
    values = [geo.null_mutual_nearest_fraction(m, n, d, seed=s, absolute=absolute) for s in range(4)]
    assert abs(np.mean(values) - p) < 4 * math.sqrt(p * (1 - p) / (4 * m))
    assert geo.expected_mutual_nearest_fraction(1000, 1000) == pytest.approx(0.5, abs=1e-3)
