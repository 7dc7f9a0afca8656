"""Click simulation on small synthetic masks (spheres and boxes)."""

from __future__ import annotations

import numpy as np
import pytest

from bosam_cli.clicks import (
    SimClick,
    border_edt,
    bosam_protocol_click,
    center_click,
    first_click,
    ritm_click,
    training_schedule,
    uniform_error_click,
)

SHAPE = (40, 40, 40)


def sphere(centre: tuple[float, float, float], radius: float, shape=SHAPE) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float64)
    d2 = sum((grid[a] - centre[a]) ** 2 for a in range(3))
    return d2 <= radius**2


def box(lo: tuple[int, int, int], hi: tuple[int, int, int], shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return m


def test_none_on_perfect_prediction():
    gt = sphere((20, 20, 20), 8)
    rng = np.random.default_rng(0)
    assert center_click(gt, gt) is None
    assert uniform_error_click(gt, gt, rng) is None
    assert ritm_click(gt, gt, rng) is None
    assert bosam_protocol_click(0, gt, gt, rng) is None
    assert bosam_protocol_click(5, gt, gt, rng) is None
    empty = np.zeros(SHAPE, dtype=bool)
    assert center_click(empty, empty) is None
    assert ritm_click(empty, empty, rng) is None


def test_first_click_is_sphere_centre_and_equals_center_click_on_empty_pred():
    gt = sphere((12, 25, 18), 6)
    click = first_click(gt)
    assert click == SimClick((12, 25, 18), True)
    assert center_click(np.zeros_like(gt), gt) == click
    with pytest.raises(ValueError):
        first_click(np.zeros(SHAPE, dtype=bool))


def test_center_click_picks_larger_error_region_and_sign():
    gt = sphere((20, 20, 20), 10)
    # Prediction misses a big ball inside the object (FN, radius 6) and leaks into a small
    # ball outside it (FP, radius 3): the click must be positive, at the FN ball's centre.
    pred = gt & ~sphere((20, 20, 20), 6) | sphere((34, 34, 34), 3)
    click = center_click(pred, gt)
    assert click == SimClick((20, 20, 20), True)
    # Swap sizes: a small hole, a big leak -> negative click at the leak's centre.
    pred = gt & ~sphere((20, 20, 20), 2) | sphere((6, 6, 30), 5)
    click = center_click(pred, gt)
    assert click == SimClick((6, 6, 30), False)
    assert pred[click.ijk] and not gt[click.ijk]


def test_center_click_deepest_point_of_box_and_zero_border():
    gt = np.zeros(SHAPE, dtype=bool)
    # A slab touching the array's faces: with the one-voxel zero border its centre is the
    # middle of the slab, not a voxel on the array edge.
    gt[0:11, :, :] = True
    click = first_click(gt)
    # (Without the border, scipy's EDT would put the deepest voxel on the array face i = 0.)
    assert click.ijk[0] == 5
    assert 5 <= click.ijk[1] <= 34 and 5 <= click.ijk[2] <= 34


def test_center_click_spacing_aware():
    # Box 21 x 9 x 9 voxels. In voxel units the deepest voxels (depth 5) form a line along axis 0
    # (i = 14..26; the tie goes to the one nearest their centroid, i = 20). With 0.25 mm along
    # axis 0 the box is only 5.25 mm long there, so depth is limited by axis 0 and only its middle
    # (i = 20) is deepest.
    gt = box((10, 16, 16), (31, 25, 25))
    c_vox = first_click(gt)
    assert c_vox.ijk == (20, 20, 20)
    c_thin = first_click(gt, spacing_mm=(0.25, 1.0, 1.0))
    assert c_thin.ijk[0] == 20
    dist_thin = border_edt(gt, (0.25, 1.0, 1.0))
    assert dist_thin[c_thin.ijk] == pytest.approx(dist_thin.max()) == pytest.approx(11 * 0.25)
    # Anisotropy changes which region is the largest: FN box 6 x 6 x 6 voxels at 1 mm vs FP box
    # 2 x 12 x 12 voxels. In voxels the FN box is deeper (3 > 1); with 5 mm along axis 0 the FP
    # slab is deeper (min(5, 6, 6) = 5 > 3) -> sign flips.
    gt2 = box((2, 2, 2), (8, 8, 8))
    pred2 = box((20, 10, 10), (22, 22, 22))
    assert center_click(pred2, gt2).positive is True
    assert center_click(pred2, gt2, spacing_mm=(5.0, 1.0, 1.0)).positive is False
    with pytest.raises(ValueError):
        center_click(pred2, gt2, spacing_mm=(1.0, 0.0, 1.0))


def test_center_click_ties_deterministic_or_random_with_rng():
    gt = box((5, 5, 5), (10, 10, 30))  # 5 x 5 x 25: many equally deep voxels along axis 2
    pred = np.zeros_like(gt)
    a = center_click(pred, gt)
    assert a == center_click(pred, gt)
    assert a.ijk == (7, 7, 17)  # midway along the tied line k = 7..27, not its first voxel
    picks = {center_click(pred, gt, rng=np.random.default_rng(s)).ijk for s in range(20)}
    assert len(picks) > 1
    assert all(p[:2] == (7, 7) for p in picks)


def test_tied_first_click_on_a_thin_bone_lands_midway_not_at_one_end():
    """A rib-like tube, three thin voxels across, is equally deep all along: every voxel of its
    middle line ties. The click goes to the tied voxel nearest their centroid (in mm), midway
    along the tube and on the object, in either storage order (the old rule took the first
    voxel in memory order: one end of the tube)."""
    gt = np.zeros((60, 50, 12), dtype=bool)
    ii = np.arange(8, 52)
    jj = (25 + 12 * np.sin((ii - 8) / 44 * np.pi)).astype(int)  # a bent tube in the i-j plane
    for i, j in zip(ii, jj):
        gt[i, j - 1:j + 2, 9:12] = True  # 3 slices up to the array's last one
    sp = (0.8, 0.8, 3.0)
    c = first_click(gt, spacing_mm=sp)
    assert gt[c.ijk] and 25 <= c.ijk[0] <= 35 and c.ijk[2] == 10
    # stored with its axes reversed: again midway, not at the (now first) edge slice
    c_flip = first_click(gt[::-1, ::-1, ::-1], spacing_mm=sp)
    assert gt[::-1, ::-1, ::-1][c_flip.ijk] and 25 <= c_flip.ijk[0] <= 35 and c_flip.ijk[2] == 1


def test_uniform_error_click_inside_error_region_with_correct_sign():
    gt = sphere((20, 20, 20), 9)
    pred = sphere((23, 20, 20), 9)
    fn, fp = gt & ~pred, pred & ~gt
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(200):
        c = uniform_error_click(pred, gt, rng)
        assert c is not None
        assert fn[c.ijk] or fp[c.ijk]
        assert c.positive == bool(fn[c.ijk])
        seen.add(c.positive)
    assert seen == {True, False}
    # Empty prediction: a uniformly random object voxel, always positive.
    c = uniform_error_click(np.zeros_like(gt), gt, rng)
    assert c.positive and gt[c.ijk]


def test_uniform_error_click_is_roughly_uniform():
    gt = box((0, 0, 0), (2, 2, 2))  # 8 voxels
    counts = np.zeros(SHAPE, dtype=int)
    rng = np.random.default_rng(11)
    for _ in range(800):
        counts[uniform_error_click(np.zeros_like(gt), gt, rng).ijk] += 1
    hits = counts[gt]
    assert hits.sum() == 800 and hits.min() > 60  # expectation 100 each


def test_ritm_click_in_chosen_region_above_half_max():
    gt = sphere((20, 20, 20), 11)
    pred = gt & ~sphere((20, 20, 20), 7) | sphere((4, 4, 4), 2)
    fn = gt & ~pred
    dist = border_edt(fn)
    rng = np.random.default_rng(5)
    for _ in range(50):
        c = ritm_click(pred, gt, rng)
        assert c.positive
        assert fn[c.ijk]
        assert dist[c.ijk] > dist.max() / 2
    # Leak larger than the hole -> negative clicks in the leak.
    pred = gt & ~sphere((20, 20, 20), 1.5) | box((0, 0, 0), (8, 8, 8))
    fp = pred & ~gt
    dist_fp = border_edt(fp)
    for _ in range(20):
        c = ritm_click(pred, gt, rng)
        assert not c.positive and fp[c.ijk] and dist_fp[c.ijk] > dist_fp.max() / 2


def test_ritm_click_handles_one_empty_region():
    gt = sphere((20, 20, 20), 6)
    rng = np.random.default_rng(0)
    c = ritm_click(np.zeros_like(gt), gt, rng)  # no FP region at all
    assert c.positive and gt[c.ijk]
    c = ritm_click(gt | sphere((5, 5, 5), 3), gt, rng)  # no FN region at all
    assert not c.positive and not gt[c.ijk]


def test_determinism_with_seeded_generators():
    gt = sphere((20, 20, 20), 9)
    pred = sphere((22, 21, 20), 8)

    def run(seed: int) -> list[SimClick | None]:
        rng = np.random.default_rng(seed)
        return [bosam_protocol_click(i, pred, gt, rng) for i in range(6)]

    assert run(2023) == run(2023)
    assert run(2023) != run(2024)


def test_bosam_protocol_switches_generator_after_two_steps(monkeypatch):
    import bosam_cli.clicks as clicks

    used = []
    monkeypatch.setattr(clicks, "ritm_click", lambda p, g, r: used.append("ritm"))
    monkeypatch.setattr(clicks, "uniform_error_click", lambda p, g, r: used.append("uniform"))
    m = np.zeros((4, 4, 4), dtype=bool)
    for step in range(4):
        clicks.bosam_protocol_click(step, m, m, None)
    assert used == ["ritm", "ritm", "uniform", "uniform"]


def test_training_schedule():
    for n in (10, 11):
        for seed in range(30):
            s = training_schedule(n, np.random.default_rng(seed))
            assert len(s) == n and s[0] and s[1] and not s[-1]
            off = [i for i, has_point in enumerate(s) if not has_point]
            assert len(off) == 2 and 2 <= off[0] <= n - 2
    for n in (10, 11, 14):  # the published randint(2, 9): steps 2..8 whatever the loop length
        drawn = {training_schedule(n, np.random.default_rng(s)).index(False) for s in range(200)}
        assert drawn == set(range(2, 9))
    assert {training_schedule(6, np.random.default_rng(s)).index(False) for s in range(100)} == {2, 3, 4}
    assert training_schedule(1, 0) == [True]
    assert training_schedule(3, 0) == [True, True, False]
    with pytest.raises(ValueError):
        training_schedule(0, 0)


def test_shape_mismatch_rejected():
    with pytest.raises(ValueError):
        center_click(np.zeros((4, 4, 4), bool), np.zeros((4, 4, 5), bool))
