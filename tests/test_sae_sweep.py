"""Sweeps that reach their L0 target: the next grid after a miss, the search over rounds, the message when it
cannot, and reruns of finished jobs (metrics read back from disk)."""

import numpy as np
import pytest
from sae_helpers import D, one_device, planted, quiet_train, small_cfg, streams

from lgeo_jax.sae import SAEConfig, SweepPoint, l1_sweep, next_grid, read_metrics, search_l1


def pts(*pairs) -> list[SweepPoint]:
    return [SweepPoint(c, l0, 0.0, None, None) for c, l0 in pairs]


def test_next_grid_refines_inside_the_bracket():
    grid = next_grid(pts((0.1, 90.0), (1.0, 40.0), (10.0, 3.0)), (8, 32), 3)
    # the bracketing pair is (1, 10): L0 40 above the range, 3 below; 3 log-spaced points strictly inside
    assert grid == tuple(float(f"{c:.3g}") for c in np.geomspace(1.0, 10.0, 5)[1:-1])


@pytest.mark.parametrize("l0s,want", [
    ((90.0, 60.0), (0.9, 2.7)),     # too dense everywhere: stronger penalties, continuing the x3 spacing
    ((3.0, 1.0), (0.0333, 0.0111)),  # too sparse everywhere: weaker ones
])
def test_next_grid_extends_beyond_the_grid(l0s, want):
    assert next_grid(pts((0.1, l0s[0]), (0.3, l0s[1])), (8, 32), 2) == tuple(sorted(want))


def test_next_grid_spacing_is_at_least_x2():
    assert next_grid(pts((1.0, 90.0), (1.1, 80.0), (1.2, 70.0)), (8, 32), 2) == (2.4, 4.8)


@pytest.fixture(scope="module")
def planted_rows():
    _, x = planted(4096, seed=0)
    _, held = planted(512, seed=1)
    return x, held


def _search(x, held, out, grid, rounds):
    tc = small_cfg(steps=150, batch_size=128, eval_rows=512, log_every=150, eval_every=150, checkpoint_every=150)
    return search_l1(x, grid, SAEConfig(D, 64), tc, out, (6, 9), rounds, held_out=held, mesh=one_device(),
                     progress=False, plot=False)


def test_search_reaches_the_target_and_reruns_from_disk(tmp_path, planted_rows):
    """L0 at L1 0.1 / 0.3 is ~30 / ~24, far above [6, 9]: a second round continues the grid (0.9, 2.7) and lands.
    A rerun on the same directory (every job finished) gives the same points from the jobs' metrics on disk."""
    x, held = planted_rows
    found = _search(x, held, tmp_path, [0.1, 0.3], rounds=2)
    assert [p.l1_coeff for p in found.points] == [0.1, 0.3, 0.9, 2.7] and found.rounds == 2
    l0 = [p.l0 for p in found.points]
    assert all(a > b for a, b in zip(l0, l0[1:], strict=False)), l0  # stronger penalty, sparser code
    assert found.on_target and 6 <= found.chosen.l0 <= 9 and found.next_grid == ()
    csv = tmp_path / "round1" / "metrics.csv"
    before = csv.read_text()
    again = _search(x, held, tmp_path, [0.1, 0.3], rounds=2)  # was a KeyError('l0') before the fix
    assert again == found and csv.read_text() == before


def test_search_that_cannot_reach_says_what_it_found_and_what_to_try(tmp_path, planted_rows):
    x, held = planted_rows
    found = _search(x, held, tmp_path, [0.1, 0.3], rounds=0)
    assert not found.on_target and found.rounds == 1 and found.next_grid == (0.9, 2.7)
    message = found.off_target_message()
    for p in found.points:
        assert f"L1 {p.l1_coeff:g} -> L0 {p.l0:.1f}" in message
    assert "inside sae.l0_target [6, 9]" in message and "try sae.l1_sweep: [0.9, 2.7]" in message
    assert "sae.allow_off_target: true" in message and found.chosen.l1_coeff == 0.3  # nearest: the sparser one


def test_l1_sweep_rerun_of_a_finished_job(tmp_path, planted_rows):
    x, held = planted_rows
    tc = small_cfg(steps=20, batch_size=128, eval_rows=256, log_every=10, eval_every=20, checkpoint_every=20)
    first = l1_sweep(x, [0.5, 2.0], SAEConfig(D, 64), tc, tmp_path, held_out=held, mesh=one_device(),
                     progress=False, plot=False)
    second = l1_sweep(x, [0.5, 2.0], SAEConfig(D, 64), tc, tmp_path, held_out=held, mesh=one_device(),
                      progress=False, plot=False)
    assert first == second and all(np.isfinite(p.l0) and p.heldout_fvu is not None for p in first)


def test_final_metrics_of_a_finished_job_come_from_its_log(tmp_path):
    src, cfg, tc = streams(2), SAEConfig(24, 40), small_cfg()
    trained = quiet_train(src, cfg, tc, [0.1, 0.2], [0, 1], tmp_path, mesh=one_device())
    rerun = quiet_train(src, cfg, tc, [0.1, 0.2], [0, 1], tmp_path, mesh=one_device())
    assert rerun.final_metrics == trained.final_metrics
    last = [r for r in read_metrics(tmp_path / "metrics.csv") if r["step"] == tc.steps]
    assert [r["heldout_fvu"] for r in last] == [m["heldout_fvu"] for m in trained.final_metrics]
    (tmp_path / "metrics.csv").write_text((tmp_path / "metrics.csv").read_text().splitlines()[0] + "\n")
    with pytest.raises(ValueError, match="no metrics logged at step 6"):
        quiet_train(src, cfg, tc, [0.1, 0.2], [0, 1], tmp_path, mesh=one_device())
