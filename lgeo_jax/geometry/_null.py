"""What the geometric statistics look like for random directions: the baseline the paper called 0.000.

Monte Carlo nulls run the real kernels on Gaussian (hence uniformly oriented) rows of the same shapes
as the real comparison. Closed forms back them up:

* Max-cosine. For a fixed unit vector, its cosines with n independent uniform directions in R^d are
  i.i.d. with angle density proportional to sin^(d-2)(theta). `expected_max_cosine` integrates the law
  of their maximum numerically, so it is exact up to quadrature error (1e-9 at d = 3584, 6e-9 at
  d = 1e5, checked by refining the grid), not an approximation.
  `gumbel_max_cosine` is the classical extreme-value approximation (cosine ~ N(0, 1/d), Gumbel limit):
  E max ~ (a_n + gamma / sqrt(2 ln n)) / sqrt(d), a_n = sqrt(2 ln n) - (ln ln n + ln 4 pi) / (2 sqrt(2 ln n)).
  At d = 3584, n = 16,384 it gives 0.0667 vs the exact 0.0663 (0.6% high; the Gumbel limit converges
  like 1 / ln n and the cosine is not exactly Gaussian, so expect ~1% errors, more for small n or d).
* Principal angles. Squared cosines of the principal angles between independent uniform subspaces of
  dims k1 <= k2 in R^d (k1 + k2 <= d) follow, as d grows with k1/d = a, k2/d = b fixed, Wachter's law:
  density sqrt((l - l-)(l+ - l)) / (2 pi a l (1 - l)) on [l-, l+], l+- = (sqrt(a(1-b)) +- sqrt(b(1-a)))^2.
  `wachter_angle_stats` integrates it. Its "min" is the edge of the support, arccos(sqrt(l+)); finite
  samples scatter around it (e.g. 59.0 deg in the limit vs ~59.2-59.5 deg at k = 256, d = 3584).
* Mutual nearest neighbours. Row i of a and row j of b are mutual nearest neighbours when cos(a_i, b_j)
  is the largest of the m + n - 1 cosines in its row and its column (a "cross"). For independent uniform
  directions the cosines along the edges of any tree on the points are i.i.d. (draw the points one at a
  time from a root: by rotation invariance each new cosine with its parent is independent of the rest),
  and a cross is a tree, so each cosine in it is the largest with probability 1 / (m + n - 1). Summing over
  the m n pairs, E[fraction of rows of a] = n / (n + m - 1) exactly, for every d >= 2, signed or |cos|
  (`expected_mutual_nearest_fraction`): 1/2 for equal sizes, far from 0.
  Hungarian matching has no such closed form: `null_matching` is Monte Carlo only. Its mean matched
  cosine lies below the mean max-cosine of the same directions (a matched partner is never better than
  the nearest one) and approaches it when m << n.
"""

from __future__ import annotations

import math

import jax
import numpy as np

from lgeo_jax.geometry._matching import hungarian_match, mutual_nearest_fraction
from lgeo_jax.geometry._max_cosine import max_cosine
from lgeo_jax.geometry._subspace import principal_angles

_EULER_GAMMA = 0.5772156649015329


def _random_directions(m: int, n: int, d: int, seed: int, where: str) -> tuple[jax.Array, jax.Array]:
    """Gaussian rows a [M, D], b [N, D]: the same ones for every null with the same (m, n, d, seed)."""
    if min(m, n, d) < 1:
        raise ValueError(f"{where}: m={m}, n={n}, d={d} must all be >= 1")
    key_a, key_b = jax.random.split(jax.random.key(seed))
    a = jax.random.normal(key_a, (m, d), jax.numpy.float32)  # [M, D]
    b = jax.random.normal(key_b, (n, d), jax.numpy.float32)  # [N, D]
    return a, b


def null_max_cosine(m: int, n: int, d: int, *, seed: int = 0, absolute: bool = False, chunk: int = 512) -> jax.Array:
    """Max-cosine [m] of m random directions against n random directions in R^d (Monte Carlo)."""
    a, b = _random_directions(m, n, d, seed, "null_max_cosine")
    return max_cosine(a, b, chunk=chunk, absolute=absolute)


def null_matching(m: int, n: int, d: int, *, seed: int = 0, absolute: bool = False, chunk: int = 512) -> float:
    """Mean matched cosine of `hungarian_match` between m and n random directions in R^d (Monte Carlo).

    Same directions as `null_max_cosine` with the same arguments, so the two can be compared pair by pair.
    """
    a, b = _random_directions(m, n, d, seed, "null_matching")
    return float(np.mean(hungarian_match(a, b, chunk=chunk, absolute=absolute)[2], dtype=np.float64))


def null_mutual_nearest_fraction(
    m: int, n: int, d: int, *, seed: int = 0, absolute: bool = False, chunk: int = 512
) -> float:
    """`mutual_nearest_fraction` of m random directions against n random directions in R^d (Monte Carlo)."""
    a, b = _random_directions(m, n, d, seed, "null_mutual_nearest_fraction")
    return float(mutual_nearest_fraction(a, b, chunk=chunk, absolute=absolute))


def null_principal_angles(k: int, d: int, *, k2: int | None = None, seed: int = 0, n_trials: int = 1) -> jax.Array:
    """Principal angles [n_trials, min(k, k2)] (degrees, ascending) between random k- and k2-dim subspaces."""
    k2 = k if k2 is None else k2
    if not (1 <= k <= d and 1 <= k2 <= d and n_trials >= 1):
        raise ValueError(f"null_principal_angles: need 1 <= k={k}, k2={k2} <= d={d} and n_trials={n_trials} >= 1")
    key_u, key_v = jax.random.split(jax.random.key(seed))
    u = jax.random.normal(key_u, (n_trials, k, d), jax.numpy.float32)  # [R, K, D]
    v = jax.random.normal(key_v, (n_trials, k2, d), jax.numpy.float32)  # [R, J, D]
    return principal_angles(u, v)


def expected_mutual_nearest_fraction(m: int, n: int) -> float:
    """E[mutual_nearest_fraction] = n / (n + m - 1) for m against n random directions (exact; module docstring)."""
    if min(m, n) < 1:
        raise ValueError(f"expected_mutual_nearest_fraction: m={m}, n={n} must be >= 1")
    return n / (n + m - 1)


def expected_max_cosine(n: int, d: int, *, absolute: bool = False, grid: int = 400_001) -> float:
    """E[max_j cos(x, y_j)] (or of |cos|) for a fixed x and n i.i.d. uniform directions y_j in R^d.

    Exact law, integrated numerically on an angle grid: P(cos <= cos(theta)) = P(Theta >= theta), with
    the angle Theta having density proportional to sin^(d-2). For the max, E[M] = -1 + int P(M > t) dt
    (signed) or int_0^1 P(M > t) dt (absolute).
    """
    if n < 1 or d < 2:
        raise ValueError(f"expected_max_cosine: need n={n} >= 1 and d={d} >= 2")
    theta = np.linspace(0.0, np.pi, grid)  # [G]
    log_density = (d - 2) * np.log(np.maximum(np.sin(theta), 1e-300))  # [G], unnormalised
    density = np.exp(log_density - log_density.max())  # [G]
    step = theta[1] - theta[0]
    cum = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) * step / 2)])  # [G] P(Theta <= theta)
    cdf_theta = cum / cum[-1]
    cdf_cos = np.clip(1.0 - cdf_theta, 0.0, 1.0)  # [G] P(cos <= cos(theta))
    jacobian = np.sin(theta)  # dt = -sin(theta) dtheta
    if absolute:
        half = theta <= np.pi / 2  # t = cos(theta) in [0, 1]
        cdf_abs = np.clip(2.0 * cdf_cos[half] - 1.0, 0.0, 1.0)  # P(|cos| <= t)
        return float(np.trapezoid((1.0 - cdf_abs**n) * jacobian[half], theta[half]))
    return float(-1.0 + np.trapezoid((1.0 - cdf_cos**n) * jacobian, theta))


def gumbel_max_cosine(n: int, d: int) -> float:
    """Extreme-value (Gumbel) approximation of the signed expected max-cosine; see the module docstring."""
    if n < 2 or d < 1:
        raise ValueError(f"gumbel_max_cosine: need n={n} >= 2 and d={d} >= 1")
    root = math.sqrt(2.0 * math.log(n))
    a_n = root - (math.log(math.log(n)) + math.log(4.0 * math.pi)) / (2.0 * root)
    return (a_n + _EULER_GAMMA / root) / math.sqrt(d)


def wachter_angle_stats(
    k1: int, k2: int, d: int, *, near_orthogonal: float = 70.0, aligned: float = 30.0, nodes: int = 400
) -> dict[str, float]:
    """Large-d limit of the principal-angle summary for random k1- and k2-dim subspaces of R^d.

    Returns mean angle, smallest angle (support edge), fraction >= near_orthogonal and <= aligned
    (degrees). Needs k1 + k2 <= d (otherwise the law has an atom at angle 0 that this does not model).
    """
    k1, k2 = min(k1, k2), max(k1, k2)
    if not (1 <= k1 and k1 + k2 <= d):
        raise ValueError(f"wachter_angle_stats: need 1 <= k1, k2 and k1 + k2 <= d; got {k1}, {k2}, {d}")
    a, b = k1 / d, k2 / d
    lo = (math.sqrt(a * (1 - b)) - math.sqrt(b * (1 - a))) ** 2
    hi = (math.sqrt(a * (1 - b)) + math.sqrt(b * (1 - a))) ** 2
    centre, radius = (hi + lo) / 2, (hi - lo) / 2

    def integrate(fn, phi_max: float) -> float:
        """int f(l) g(l) dl over l <= l(phi_max); l = centre - radius cos(phi) removes the sqrt edges."""
        x, w = np.polynomial.legendre.leggauss(nodes)
        phi = (x + 1) * phi_max / 2  # [Nq]
        lam = centre - radius * np.cos(phi)
        weight = radius**2 * np.sin(phi) ** 2 / (2 * np.pi * a * lam * (1 - lam))  # f(l) dl / dphi
        return float(np.sum(w * weight * fn(lam)) * phi_max / 2)

    def phi_at(lam: float) -> float:
        return math.acos(min(1.0, max(-1.0, (centre - lam) / radius)))

    def cos2(deg: float) -> float:
        return math.cos(math.radians(deg)) ** 2

    return {
        "mean": integrate(lambda lam: np.degrees(np.arccos(np.sqrt(lam))), math.pi),
        "min": math.degrees(math.acos(math.sqrt(hi))),
        "frac_near_orthogonal": integrate(np.ones_like, phi_at(cos2(near_orthogonal))),
        "frac_aligned": max(0.0, 1.0 - integrate(np.ones_like, phi_at(cos2(aligned)))),
    }
