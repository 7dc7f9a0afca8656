"""Masks land where clicks are, in every orientation; objects grow across windows without seams."""

from __future__ import annotations

import numpy as np
import pytest

from bosam_cli.session import Session
from bosam_cli.volume import Volume
from fake_engines import SphereEngine, ThresholdEngine
from test_windows import ORIENTATIONS, affine_for


def _volume(codes, spacing, tilt, shape=(90, 90, 90)) -> Volume:
    aff = affine_for(codes, spacing, tilt)
    centre = (np.asarray(shape) - 1) / 2
    aff[:3, 3] = -aff[:3, :3] @ centre  # world origin at the array centre
    return Volume(np.zeros(shape, np.int16), aff)


def _world_grid(vol: Volume) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), -1).reshape(-1, 3)
    return vol.voxel_to_world(ijk).reshape(*vol.shape, 3)


@pytest.mark.parametrize("codes, spacing, tilt", ORIENTATIONS)
def test_mask_is_a_ball_around_the_click_in_patient_space(codes, spacing, tilt):
    vol = _volume(codes, spacing, tilt)
    session = Session(SphereEngine(radius_vox=12), spacing_mm=1.5, refine="none")  # an all-0 HU CT: nothing to refine on
    session.set_volume(vol)
    click = np.array([6.0, -4.0, 3.0])
    rep = session.add_click(1, xyz=click)
    assert rep.encoder_calls == 1 and rep.decoder_calls == 1 and rep.windows == 1
    mask = session.mask(1)
    dist = np.linalg.norm(_world_grid(vol) - click, axis=-1)
    radius_mm = 12 * 1.5
    tol = 1.5 * max(spacing)  # low-res sampling of a non-linear field
    assert mask.any()
    assert not (mask & (dist > radius_mm + tol)).any(), "mask outside the ball"
    assert mask[dist < radius_mm - tol].all(), "ball not filled"
    # same click given as a voxel of the file's array
    session.reset()
    session.add_click(2, voxel=vol.world_to_voxel(click[None])[0])
    assert (session.mask(2) == mask).all()


def _cylinder_volume(codes, spacing, tilt, half_length_mm=130.0, radius_mm=25.0):
    """A bright cylinder along world z (260 mm, longer than a 192 mm window) inside a CT that
    extends 300 mm along z and 90 mm across, on a grid with the given axis codes."""
    aff = affine_for(codes, spacing, tilt)
    world_extent = np.array([90.0, 90.0, 300.0])
    shape = tuple(
        int(np.ceil(world_extent[int(np.argmax(np.abs(aff[:3, c])))] / spacing[c])) for c in range(3)
    )
    aff[:3, 3] = -aff[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    vol = Volume(np.zeros(shape, np.int16), aff)
    w = _world_grid(vol)
    inside = (w[..., 0] ** 2 + w[..., 1] ** 2 < radius_mm**2) & (np.abs(w[..., 2]) < half_length_mm)
    vol = vol.with_array(np.where(inside, 900, 40).astype(np.int16))
    return vol, inside, w


@pytest.mark.parametrize("codes, spacing, tilt", [("RAS", (1.2, 1.2, 3.0), 0.0), ("LPS", (1.5, 1.5, 2.5), 0.0), ("PIR", (3.0, 1.5, 1.5), 8.0)])
def test_object_longer_than_a_window_grows_without_seams(codes, spacing, tilt):
    vol, truth, w = _cylinder_volume(codes, spacing, tilt)
    session = Session(ThresholdEngine(threshold=1.0), spacing_mm=1.5, max_windows=8)
    session.set_volume(vol)
    rep = session.add_click(1, xyz=[0.0, 0.0, 0.0])
    assert rep.windows >= 2 and rep.new_windows == rep.windows
    mask = session.mask(1)
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.85
    # no seams: every slab along the cylinder axis (world z) is segmented, with a stable area
    z = w[..., 2]
    areas = []
    for z0 in np.arange(-126, 126, 6.0):
        slab = (z >= z0) & (z < z0 + 6)
        t = (truth & slab).sum()
        if t:
            areas.append((mask & slab).sum() / t)
    areas = np.array(areas)
    assert areas.min() > 0.7 and areas.max() < 1.6
    assert not session.objects[1].truncated


def test_window_limit_marks_object_truncated():
    vol, truth, w = _cylinder_volume("RAS", (1.2, 1.2, 3.0), 0.0)
    session = Session(ThresholdEngine(threshold=1.0), spacing_mm=1.5, max_windows=1)
    session.set_volume(vol)
    rep = session.add_click(1, xyz=[0.0, 0.0, 0.0])
    assert rep.windows == 1 and session.objects[1].truncated
    assert (session.mask(1) & truth).sum() < truth.sum()


def test_negative_click_removes_and_undo_restores():
    vol = _volume("RAS", (1.0, 1.0, 1.0), 0.0)
    session = Session(SphereEngine(radius_vox=14), spacing_mm=1.5)
    session.set_volume(vol)
    session.add_click(1, xyz=[0.0, 0.0, 0.0])
    full = session.mask(1).sum()
    rep = session.add_click(1, xyz=[12.0, 0.0, 0.0], positive=False)
    assert rep.decoder_calls == 1 and rep.encoder_calls == 0  # a click costs one decoder call
    assert session.mask(1).sum() < full
    assert session.undo()
    assert session.mask(1).sum() == full
    assert session.undo() and 1 not in session.objects
    assert not session.undo()


def test_nearby_objects_share_cached_embeddings_and_overlap_rule():
    vol = _volume("LPS", (0.8, 0.8, 1.0), 0.0)
    engine = SphereEngine(radius_vox=10)
    session = Session(engine, spacing_mm=1.5, refine="none")  # the overlap rule on the model's masks
    session.set_volume(vol)
    session.add_click(1, xyz=[0.0, 0.0, 0.0])
    session.add_click(2, xyz=[9.0, 0.0, 0.0])  # same snapped window, overlapping balls
    assert engine.encoded == 1
    labels = session.label_map()
    both = session.mask(1) & session.mask(2)
    assert both.any()
    w = _world_grid(vol)
    d1 = np.linalg.norm(w - [0.0, 0.0, 0.0], axis=-1)
    d2 = np.linalg.norm(w - [9.0, 0.0, 0.0], axis=-1)
    # the ball whose centre is nearer has the higher logit (radius - distance)
    clear = both & (np.abs(d1 - d2) > 1.0)
    assert (labels[clear & (d1 < d2)] == 1).all() and (labels[clear & (d2 < d1)] == 2).all()
    assert set(np.unique(labels)) == {0, 1, 2}


def test_click_outside_the_volume_is_refused():
    vol = _volume("RAS", (1.0, 1.0, 1.0), 0.0)
    session = Session(SphereEngine(), spacing_mm=1.5)
    session.set_volume(vol)
    with pytest.raises(ValueError, match="outside the volume"):
        session.add_click(1, xyz=[500.0, 0.0, 0.0])


class _Recording(SphereEngine):
    """SphereEngine that records the points and labels of every decoder call."""

    def __init__(self, max_points=None, **kw):
        super().__init__(**kw)
        self.calls = []
        self.max_points = max_points

    def decode(self, embedding, points, labels, mask_prompt):
        self.calls.append((np.array(points, copy=True), np.array(labels, copy=True)))
        return super().decode(embedding, points, labels, mask_prompt)


def test_click_memory_all_feeds_the_objects_clicks_in_the_window():
    """A model trained with --click-memory all gets every click of the object that lies in the
    window, newest last (at most the engine's max_points); the published 'newest' gets one."""
    vol = _volume("LPS", (1.0, 1.0, 1.0), 0.0)
    clicks = [([0.0, 0.0, 0.0], True), ([10.0, 0.0, 0.0], False), ([0.0, 8.0, 0.0], True), ([-6.0, 0.0, 4.0], True)]
    got = {}
    for memory, limit in (("newest", None), ("all", None), ("all", 3)):
        eng = _Recording(radius_vox=14, max_points=limit)
        session = Session(eng, spacing_mm=1.5, click_memory=memory, grow=False)
        session.set_volume(vol)
        for xyz, positive in clicks:
            session.add_click(1, xyz=xyz, positive=positive)
        win = session.objects[1].windows[0].geom
        expected = [win.world_to_window(np.array([xyz]))[0] for xyz, _ in clicks]
        got[(memory, limit)] = (eng.calls, expected)
    calls, expected = got[("newest", None)]
    assert [c[0].shape for c in calls] == [(1, 1, 3)] * 4
    assert np.allclose([c[0][0, 0] for c in calls], expected, atol=1e-4)
    calls, expected = got[("all", None)]
    assert [c[0].shape[1] for c in calls] == [1, 2, 3, 4]
    assert np.allclose(calls[-1][0][0], expected, atol=1e-4)
    assert calls[-1][1].tolist() == [[1, 0, 1, 1]]
    calls, _ = got[("all", 3)]
    assert [c[0].shape[1] for c in calls] == [1, 2, 3, 3]
    assert np.allclose(calls[-1][0][0], expected[1:], atol=1e-4) and calls[-1][1].tolist() == [[0, 1, 1]]
    with pytest.raises(ValueError, match="click_memory"):
        Session(SphereEngine(), click_memory="last")


def test_segment_reads_click_memory_from_the_checkpoint():
    from bosam_cli.segment import SegmentOptions, make_session

    assert make_session(SphereEngine(), SegmentOptions(), {}).click_memory == "newest"
    assert make_session(SphereEngine(), SegmentOptions(), {"click_memory": "all"}).click_memory == "all"


# ---------------------------------------------------------------------------------------------
# islands: detached pieces of a mask


def _two_blobs() -> np.ndarray:
    logits = np.full((20, 20, 20), -3.0, np.float32)
    logits[2:5, 2:5, 2:5] = 2.0
    logits[10:13, 10:13, 10:13] = 5.0
    return logits


def test_keep_clicked_islands_keeps_the_pieces_a_positive_click_holds_or_touches():
    from bosam_cli.session import SessionClick, keep_clicked_islands

    box = (slice(5, 25), slice(5, 25), slice(5, 25))  # the logits sit at CT voxels 5..24
    sp, reach = (1.5, 1.5, 1.5), 3.0  # two voxels here

    def click(rel, positive=True):
        return SessionClick(np.zeros(3), np.asarray(rel, float) + 5, positive)

    out = keep_clicked_islands(_two_blobs(), box, [click([3, 3, 3]), click([11, 11, 11], positive=False)], sp, reach)
    assert (out[2:5, 2:5, 2:5] == 2.0).all() and np.isneginf(out[10:13, 10:13, 10:13]).all()
    assert (out[out < 0] != -3.0).sum() == 27  # only the dropped piece changed
    # a click just outside a piece (the user missed the bone by a voxel or two) keeps it
    out = keep_clicked_islands(_two_blobs(), box, [click([4 + 2, 3.4, 3])], sp, reach)
    assert (out[2:5, 2:5, 2:5] == 2.0).all() and np.isneginf(out[10:13, 10:13, 10:13]).all()
    # no positive click near any piece: nothing is dropped
    out = keep_clicked_islands(_two_blobs(), box, [click([4 + 3, 3, 3])], sp, reach)
    np.testing.assert_array_equal(out, _two_blobs())
    # the reach is in mm per axis: along a 5 mm axis one voxel, along a 0.75 mm axis four
    out = keep_clicked_islands(_two_blobs(), box, [click([4 + 2, 3, 3])], (5.0, 1.5, 1.5), reach)
    np.testing.assert_array_equal(out, _two_blobs())
    out = keep_clicked_islands(_two_blobs(), box, [click([4 + 4, 3, 3])], (0.75, 1.5, 1.5), reach)
    assert np.isneginf(out[10:13, 10:13, 10:13]).all()
    # both pieces clicked: both kept; pieces touching only diagonally are one piece
    out = keep_clicked_islands(_two_blobs(), box, [click([3, 3, 3]), click([12, 12, 12])], sp, reach)
    np.testing.assert_array_equal(out, _two_blobs())
    diag = np.full((6, 6, 6), -1.0, np.float32)
    diag[1, 1, 1] = diag[2, 2, 2] = 1.0
    np.testing.assert_array_equal(keep_clicked_islands(diag.copy(), (slice(0, 6),) * 3, [click([-4, -4, -4])], sp, reach), diag)


class _AllBrightEngine(ThresholdEngine):
    """Decoder returns every bright region of the window on a positive click (a model that
    also lights up a detached look-alike)."""

    def decode(self, embedding, points, labels, mask_prompt):
        bright = embedding.data > self.threshold
        out = np.where(bright, 8.0, -8.0).astype(np.float32)
        return out[None, None], np.ones((1, 1), np.float32)


def test_session_drops_detached_blobs_unless_islands_all():
    vol = _volume("RAS", (1.5, 1.5, 1.5), 0.0)
    w = _world_grid(vol)
    ball_a = np.linalg.norm(w - [-25.0, 0, 0], axis=-1) < 10
    ball_b = np.linalg.norm(w - [25.0, 0, 0], axis=-1) < 10
    vol = vol.with_array(np.where(ball_a | ball_b, 900, 40).astype(np.int16))
    masks = {}
    for islands in ("clicked", "all"):
        session = Session(_AllBrightEngine(threshold=1.0), spacing_mm=1.5, islands=islands)
        session.set_volume(vol)
        session.add_click(1, xyz=np.array([-25.0, 0, 0]))
        masks[islands] = session.mask(1)
        assert session.voxel_count(1) == masks[islands].sum()
        assert (session.label_map() == 1).sum() == masks[islands].sum()
    clicked, every = masks["clicked"], masks["all"]
    assert every[ball_a].mean() > 0.9 and every[ball_b].mean() > 0.9  # the model lit both
    assert clicked[ball_a].mean() > 0.9 and not clicked[ball_b].any()  # the tool keeps the clicked one
    assert not (clicked & ~every).any()
    # a click 4.5 mm off ball A's surface still means ball A: within one model output voxel (6 mm)
    session = Session(_AllBrightEngine(threshold=1.0), spacing_mm=1.5)
    session.set_volume(vol)
    session.add_click(1, xyz=np.array([-25.0, 14.5, 0]))
    near = session.mask(1)
    assert near[ball_a].mean() > 0.9 and not near[ball_b].any()
    with pytest.raises(ValueError, match="islands must be one of clicked, all"):
        Session(_AllBrightEngine(), islands="largest")


def test_islands_without_cc3d_fall_back_to_scipy_with_the_same_pieces(monkeypatch):
    import sys

    from bosam_cli.session import _pieces

    rng = np.random.default_rng(3)
    mask = rng.random((30, 25, 20)) > 0.7
    fast, n_fast = _pieces(mask)
    monkeypatch.setitem(sys.modules, "cc3d", None)  # import cc3d now raises ImportError
    slow, n_slow = _pieces(mask)
    assert n_fast == n_slow > 1
    # the same partition of the voxels (numbering may differ)
    pairs = np.unique(np.stack([fast[mask], slow[mask]]), axis=1)
    assert pairs.shape[1] == n_fast


# ---------------------------------------------------------------------------------------------
# surface refinement: the soft-tissue rim of a coarse mask


def _bone_phantom(n=61, spacing=1.0):
    """Distance (mm) from the box centre and a CT of a bone ball: cortex (900 HU) from 8 to 10 mm,
    cancellous bone (180 HU) inside, fatty marrow (-60 HU) within 4 mm, muscle (40 HU) outside."""
    c = (n - 1) / 2
    g = np.indices((n, n, n)).astype(np.float32) - c
    r = np.sqrt((g ** 2).sum(0)) * spacing
    hu = np.select([r < 4, r < 8, r <= 10], [-60, 180, 900], 40).astype(np.int16)
    return r, hu


def test_peel_removes_the_soft_rim_within_reach_and_nothing_behind_the_cortex():
    from bosam_cli.session import peel_soft_surface

    r, hu = _bone_phantom()
    sp = (1.0, 1.0, 1.0)
    # a coarse mask 4 mm too large: the whole muscle rim goes, the bone stays whole, the fatty
    # marrow (below the threshold but enclosed by cortex) stays
    out = peel_soft_surface((14.0 - r).astype(np.float32), hu, sp, 6.0, 75.0)
    np.testing.assert_array_equal(out > 0, r <= 10)
    assert np.isneginf(out[(r > 10) & (r < 14)]).all()
    assert (out[r < 4] > 0).all()
    # a mask just over the bone reaches the marrow: below the threshold, in reach, but enclosed
    out = peel_soft_surface((10.5 - r).astype(np.float32), hu, sp, 6.0, 75.0)
    np.testing.assert_array_equal(out > 0, r <= 10)
    # a mask 15 mm too large: only the outer part of the rim is in reach (6 mm per axis), the
    # muscle deeper than 6 * sqrt(3) mm from the surface is never touched
    big = (25.0 - r).astype(np.float32)
    out = peel_soft_surface(big.copy(), hu, sp, 6.0, 75.0)
    assert not (out[r > 19.5] > 0).any()
    assert (out[(r > 10) & (r < 25 - 6 * np.sqrt(3) - 1)] > 0).all()
    assert (out[r <= 10] > 0).all()
    # a positive click in the rim keeps it (it is one piece here)
    click = (int(30 + 12), 30, 30)
    np.testing.assert_array_equal(peel_soft_surface((14.0 - r).astype(np.float32), hu, sp, 6.0, 75.0, [click]), 14.0 - r)
    # nothing below the threshold at the surface: unchanged; the threshold is a parameter
    np.testing.assert_array_equal(peel_soft_surface((14.0 - r).astype(np.float32), hu, sp, 6.0, 30.0), 14.0 - r)


def test_peel_keeps_marrow_where_the_mask_cuts_through_the_bone():
    """A mask over half a bone (it stops at x = 0 inside the marrow, as a partial mask of a
    femoral head does): the fatty marrow at the cut is below the threshold, within reach and
    open to the outside of the mask, but enclosed by bone, so it stays; the muscle rim goes."""
    from bosam_cli.session import peel_soft_surface

    r, hu = _bone_phantom()
    x = np.indices(r.shape)[0] - 30.0
    for radius in (10.0, 14.0):
        logits = np.where(x <= 0, radius - r, -1.0).astype(np.float32)
        out = peel_soft_surface(logits.copy(), hu, (1.0, 1.0, 1.0), 6.0, 50.0)
        np.testing.assert_array_equal(out > 0, (logits > 0) & (r <= 10))
        assert (out[(r < 4) & (x <= 0)] > 0).all()


def test_peel_reach_is_per_axis_in_mm_and_the_box_border_inside_the_ct_is_outside():
    from bosam_cli.session import peel_soft_surface

    logits = np.ones((40, 40, 40), np.float32)  # the mask fills the box: its surface is the border
    ct = np.full((60, 60, 60), 40, np.int16)  # the box lies inside the CT, from voxel (10, 10, 10)
    hu = ct[10:50, 10:50, 10:50]
    out = peel_soft_surface(logits, hu, (0.5, 1.0, 3.0), 6.0, 75.0, context=(ct, (10, 10, 10)))
    kept = np.zeros(logits.shape, bool)
    kept[12:28, 6:34, 2:38] = True  # 6 mm is 12, 6 and 2 voxels along the three axes
    np.testing.assert_array_equal(out > 0, kept)
    # at least one voxel per axis, however coarse the CT
    ct = np.zeros((7, 7, 7))
    out = peel_soft_surface(np.ones((5, 5, 5), np.float32), ct[1:6, 1:6, 1:6], (10.0, 10.0, 10.0), 6.0, 75.0,
                            context=(ct, (1, 1, 1)))
    np.testing.assert_array_equal(out > 0, np.pad(np.ones((3, 3, 3), bool), 1))


def test_peel_leaves_a_bone_cut_by_the_edge_of_the_ct():
    """A long-bone shaft that leaves the CT (a femur at the bottom of a pelvic CT, a humerus in a
    chest CT): its fatty marrow reaches the CT's first and last slices, where the bone goes on
    beyond the field of view. That edge is not the outside of the mask: the marrow stays, while
    the muscle rim around the shaft goes. A box face inside the CT still counts as outside."""
    from bosam_cli.session import peel_soft_surface

    n, sp = 61, (1.0, 1.0, 2.0)
    g = np.indices((n, n, 30)).astype(np.float32)
    r = np.hypot(g[0] - 30, g[1] - 30)  # a shaft along the third axis, through every slice
    hu = np.select([r < 9, r <= 13], [-30, 1200], 40).astype(np.int16)
    logits = (16.0 - r).astype(np.float32)  # the bone and a 3 mm muscle rim
    for context in (None, (hu, (0, 0, 0))):
        out = peel_soft_surface(logits.copy(), hu, sp, 6.0, 75.0, context=context)
        np.testing.assert_array_equal(out > 0, r <= 13)
    # the same shaft as a box inside a longer CT (the windows reach no further): the marrow at
    # the end faces is enclosed by the cortex along two axes, so it stays too
    ct = np.concatenate([np.full((n, n, 5), 40, np.int16), hu, np.full((n, n, 5), 40, np.int16)], axis=2)
    out = peel_soft_surface(logits.copy(), hu, sp, 6.0, 75.0, context=(ct, (0, 0, 5)))
    np.testing.assert_array_equal(out > 0, r <= 13)


def test_peel_keeps_the_canal_of_a_shaft_that_the_mask_stops_part_way_along():
    """A partial mask of a long bone (it stops at z = 0 inside the shaft): the marrow next to the
    cut is bone-enclosed along two axes only (the canal goes on), and the ring of marrow inside
    the cortex is a rim connected to that cut along the whole shaft. Peeling it hollowed the
    shaft, and cut the cortex off the clicked core; it stays, while muscle goes."""
    from bosam_cli.session import peel_soft_surface

    n, sp = 61, (1.0, 1.0, 2.0)
    g = np.indices((n, n, 40)).astype(np.float32)
    r = np.hypot(g[0] - 30, g[1] - 30)
    hu = np.select([r < 9, r <= 13], [-30, 1200], 40).astype(np.int16)
    ct = np.concatenate([hu, hu], axis=2)  # the shaft runs through the whole CT; the box is its upper half
    partial = g[2] >= 20  # the mask covers the upper half of the shaft
    logits = np.where(partial, 16.0 - r, -1.0).astype(np.float32)
    out = peel_soft_surface(logits.copy(), hu, sp, 6.0, 75.0, context=(ct, (0, 0, 40)))
    np.testing.assert_array_equal(out > 0, partial & (r <= 13))
    # soft tissue in the same place is still peeled: a muscle "canal" with no cortex around it
    soft = np.where(r <= 4, 1200, 40).astype(np.int16)  # a thin bone in the middle of a mask 16 mm wide
    out = peel_soft_surface(np.where(partial, 16.0 - r, -1.0).astype(np.float32), soft, sp, 6.0, 75.0,
                            context=(soft, (0, 0, 0)))
    assert not (out[partial & (r > 13)] > 0).any()


def test_session_refine_peels_the_rim_of_a_too_large_mask_on_the_ct_grid():
    n = 61
    r, hu = _bone_phantom(n, 1.0)
    aff = np.eye(4)
    aff[:3, 3] = -(n - 1) / 2
    vol = Volume(hu, aff)
    masks = {}
    for refine in ("hu", "none"):
        session = Session(SphereEngine(radius_vox=9.0), spacing_mm=1.5, refine=refine)  # a 13.5 mm ball
        session.set_volume(vol)
        session.add_click(1, xyz=np.zeros(3))
        masks[refine] = session.mask(1)
        assert (session.label_map() == 1).sum() == masks[refine].sum() == session.voxel_count(1)
    raw, refined = masks["none"], masks["hu"]
    assert raw[(r > 10.5) & (r < 12.5)].all()  # the model's mask takes in a rim of muscle
    np.testing.assert_array_equal(refined, raw & (r <= 10))  # the tool's mask is the bone
    with pytest.raises(ValueError, match="refine must be one of hu, none"):
        Session(SphereEngine(), refine="threshold")


def test_cli_refine_default_matches_the_session():
    from bosam_cli import cli, session

    assert cli.REFINE_HU == session.REFINE_HU


def test_reach_in_voxels_does_not_depend_on_float32_spacing():
    """A CT read from its file carries float32 spacings (0.8 mm is 0.800000011920929): 6 mm is
    7.5 voxels either way, and 30 mm at 0.6 mm is 50 voxels either way; the same CT must not
    peel differently in memory and from its file."""
    from bosam_cli.session import _reach_vox, _vox_within

    for exact in (0.8, 0.6, 1.2, 0.7, 3.0):
        f32 = float(np.float32(exact))
        assert list(_vox_within(6.0, (exact,) * 3)) == list(_vox_within(6.0, (f32,) * 3)), exact
        assert _reach_vox(30.0, (exact,) * 3, 0) == _reach_vox(30.0, (f32,) * 3, 0), exact
    assert list(_vox_within(6.0, (0.8, 1.2, 12.0))) == [8, 5, 1]  # 7.5 rounds up; at least one
    assert _reach_vox(30.0, (0.6, 0.6, 0.6), 0) == 50


def test_enclosure_test_matches_a_ray_walk():
    from bosam_cli.session import _bone_around

    rng = np.random.default_rng(5)
    hu = np.where(rng.random((12, 15, 9)) < 0.08, 400, 0)
    # 7, 3 and 14 voxels along the three axes: the last reaches past both ends of its 9
    spacing, reach = (1.0, 2.0, 0.5), 7.0
    steps = [int(reach // s) for s in spacing]
    hits = np.zeros(hu.shape, int)
    both = np.zeros(hu.shape, int)  # axes with a hit on either side
    for ijk in np.ndindex(hu.shape):  # walk the six rays voxel by voxel
        for a in range(3):
            sides = 0
            for sign in (-1, 1):
                for t in range(steps[a] + 1):
                    q = list(ijk)
                    q[a] += sign * t
                    if 0 <= q[a] < hu.shape[a] and hu[tuple(q)] >= 150:
                        hits[ijk] += 1
                        sides += 1
                        break
            both[ijk] += sides == 2
    assert len(np.unique(hits)) >= 4 and len(np.unique(both)) >= 3  # several counts exercised
    directions, axes = _bone_around(hu, [0, 0, 0], list(hu.shape), spacing, 150, reach)
    np.testing.assert_array_equal(directions, hits)
    np.testing.assert_array_equal(axes, both)
    for lo, hi in (([2, 4, 1], [9, 6, 8]), ([0, 7, 3], [12, 8, 4]), ([11, 0, 0], [12, 15, 9])):
        # a box inside the volume sees bright voxels beyond it, up to the reach
        directions, axes = _bone_around(hu, lo, hi, spacing, 150, reach)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        np.testing.assert_array_equal(directions, hits[box])
        np.testing.assert_array_equal(axes, both[box])


def test_window_any_matches_a_brute_force_window():
    from bosam_cli.session import _window_any

    rng = np.random.default_rng(11)
    field = rng.random((13, 17, 9)) < 0.1
    for axis in range(3):
        n = field.shape[axis]
        for width in (1, 2, 3, 5, 8, 9, 16, 21, 40):  # powers of two, odd widths, wider than the axis
            got = _window_any(field.copy(), width, axis)
            moved = np.moveaxis(field, axis, 0)
            want = np.stack([moved[k:min(k + width, n)].any(axis=0) for k in range(n)])
            np.testing.assert_array_equal(got, np.moveaxis(want, 0, axis), err_msg=f"axis {axis} width {width}")


# ---------------------------------------------------------------------------------------------
# window bookkeeping: pruning, the truncated flag, border clicks, reset


def _ras_volume(lo, hi, spacing, fill=40) -> Volume:
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    shape = tuple(int(np.floor((hi[a] - lo[a]) / spacing)) + 1 for a in range(3))
    aff = np.diag([spacing] * 3 + [1.0])
    aff[:3, 3] = lo
    return Volume(np.full(shape, fill, np.int16), aff)


def _segment_distance(w: np.ndarray, a, b) -> np.ndarray:
    a, b = np.asarray(a, float), np.asarray(b, float)
    t = np.clip(((w - a) @ (b - a)) / ((b - a) @ (b - a)), 0, 1)
    return np.linalg.norm(w - (a + t[..., None] * (b - a)), axis=-1)


class _EraseBall(ThresholdEngine):
    """Positive points: ThresholdEngine. A negative point erases a ball of ``erase`` window
    voxels around it from the previous mask."""

    erase = 23.0

    def decode(self, embedding, points, labels, mask_prompt):
        if labels[0, -1] == 1:
            return super().decode(embedding, points, labels, mask_prompt)
        m = self.info.mask_size
        c = np.arange(m) * self.f + (self.f - 1) / 2
        grid = np.stack(np.meshgrid(c, c, c, indexing="ij"), -1)
        prev = np.asarray(mask_prompt)[0, 0].copy()
        prev[np.linalg.norm(grid - np.asarray(points)[0, -1], axis=-1) < self.erase] = -8.0
        return prev[None, None].astype(np.float32), np.ones((1, 1), np.float32)


def test_a_negative_click_that_cuts_one_path_keeps_the_windows_reached_another_way():
    """A ring-shaped bone over four windows grown in a chain; a negative click cuts the ring
    in the first window. The windows beyond the cut are still reached around the ring, so the
    rest of the bone stays (pruning used to follow only the window each grew from)."""
    vol = _ras_volume([-100, -30, -130], [170, 30, 190], 2.0)
    w = _world_grid(vol)
    bars = {
        "left": _segment_distance(w, [-48, 0, -45], [-48, 0, 150]) < 10,
        "top": _segment_distance(w, [-48, 0, 150], [120, 0, 150]) < 10,
        "right": _segment_distance(w, [120, 0, 150], [120, 0, -90]) < 10,
        "bottom": _segment_distance(w, [120, 0, -90], [-10, 0, -90]) < 10,
    }
    vol = vol.with_array(np.where(np.any(list(bars.values()), axis=0), 900, 40).astype(np.int16))
    session = Session(_EraseBall(1.0), spacing_mm=1.5, refine="none", islands="all")
    session.set_volume(vol)
    session.add_click(1, xyz=[-48.0, 0, -35.0])
    session.add_click(1, xyz=[0.0, 0, -90.0])
    assert len(session.objects[1].windows) == 4
    session.add_click(1, xyz=[-48.0, 0, 40.0], positive=False)
    mask = session.mask(1)
    erased = np.linalg.norm(w - [-48, 0, 40], axis=-1) < 23 * 1.5
    assert len(session.objects[1].windows) == 4
    for name in ("top", "right", "bottom"):
        assert mask[bars[name]].mean() > 0.95, name
    assert mask[bars["left"] & ~erased].mean() > 0.95 and mask[bars["left"] & erased].mean() < 0.1, mask[bars["left"] & erased].mean()


def test_truncated_follows_the_mask_not_its_history():
    """With one window allowed, a mask that reaches a face is truncated; once a negative click
    takes it back inside the window, it is not."""
    vol = _ras_volume([-100, -60, -60], [220, 60, 60], 2.0)
    engine = SphereEngine(radius_vox=20)
    session = Session(engine, spacing_mm=1.5, refine="none", max_windows=1)
    session.set_volume(vol)
    session.add_click(1, xyz=[72.0, 0, 0])
    assert not session.objects[1].truncated
    session.add_click(1, xyz=[150.0, 0, 0])  # the ball reaches beyond the window's +x face
    assert session.objects[1].truncated
    engine.radius = 30
    session.add_click(1, xyz=[150.0, 0, 0], positive=False)
    assert not session.objects[1].truncated
    session.add_click(1, xyz=[210.0, 0, 0])  # outside the only window allowed: not applied
    assert session.objects[1].truncated


@pytest.mark.parametrize("i", [121.49, 121.5, -0.5])
def test_a_click_on_the_outermost_half_voxel_keeps_its_mask(i):
    """Index shape - 0.5 is still the last voxel: the clicked piece is kept, not peeled away (a
    9 mm ball of soft tissue is all rim, one piece holding the click)."""
    vol = _ras_volume([-60, -60, -60], [61, 60, 60], 1.0)
    assert vol.shape[0] == 122
    masks = {}
    for refine in ("none", "hu"):
        session = Session(SphereEngine(radius_vox=6), spacing_mm=1.5, refine=refine, islands="clicked")
        session.set_volume(vol)
        session.add_click(1, voxel=[i, 60.0, 60.0])
        masks[refine] = session.mask(1)
    assert masks["none"].sum() > 1000 and masks["none"][121 if i > 0 else 0, 60, 60]
    np.testing.assert_array_equal(masks["hu"], masks["none"])


def test_reset_keeps_the_objects_name_and_place():
    vol = _ras_volume([-40, -40, -40], [40, 40, 40], 2.0)
    session = Session(SphereEngine(radius_vox=6), spacing_mm=1.5, refine="none")
    session.set_volume(vol)
    session.add_click(300, xyz=[0.0, 0, 0], name="sacrum")
    session.add_click(5, xyz=[10.0, 0, 0], name="L5")
    session.reset(300)
    assert not session.mask(300).any() and session.objects[300].clicks == []
    session.add_click(300, xyz=[0.0, 0, 0])
    assert list(session.objects) == [300, 5] and session.objects[300].name == "sacrum"


def _two_bars(joined: bool) -> tuple[Volume, np.ndarray, np.ndarray]:
    """Two parallel bars along x (y = -30 and +30 mm), optionally joined at x = -40 mm."""
    vol = _ras_volume([-150, -60, -30], [200, 60, 30], 1.5)
    w = _world_grid(vol)
    start = -40 if joined else -60
    bar1 = _segment_distance(w, [start, -30, 0], [170, -30, 0]) < 10
    bar2 = _segment_distance(w, [start, 30, 0], [170, 30, 0]) < 10
    bright = bar1 | bar2 | (joined & (_segment_distance(w, [-40, -30, 0], [-40, 30, 0]) < 10))
    return vol.with_array(np.where(bright, 900, 40).astype(np.int16)), bar1, bar2


def test_a_window_that_exists_learns_about_mask_reaching_it_later():
    """Click 1 on bar 1 grows the +x window, seeded on bar 1; click 2 on bar 2 (in the first
    window only) brings bar 2 to that window's face. The existing neighbour gets a seed on
    bar 2, so bar 2 is segmented past the face (it used to stop there, erased in the overlap
    by the blend with a neighbour that knew nothing of it)."""
    vol, bar1, bar2 = _two_bars(joined=False)
    session = Session(ThresholdEngine(1.0), spacing_mm=1.5, refine="none", islands="all")
    session.set_volume(vol)
    session.add_click(1, xyz=[-60.0, -30, 0])
    windows = len(session.objects[1].windows)
    session.add_click(1, xyz=[-60.0, 30, 0])
    mask = session.mask(1)
    assert mask[bar1].mean() > 0.97 and mask[bar2].mean() > 0.97
    assert len(session.objects[1].windows) == windows  # the existing windows, told again


def test_a_grown_window_gets_a_seed_on_every_branch_of_the_mask():
    """Two bars joined inside the first window and apart in its +x neighbour: both branches go on
    (the neighbour used to get one seed, on one branch)."""
    vol, bar1, bar2 = _two_bars(joined=True)
    session = Session(ThresholdEngine(1.0), spacing_mm=1.5, refine="none")
    session.set_volume(vol)
    session.add_click(1, xyz=[-40.0, 0.0, 0.0])
    mask = session.mask(1)
    x = _world_grid(vol)[..., 0]
    for bar in (bar1, bar2):
        assert mask[bar & (x > 90)].mean() > 0.95


def test_a_window_opened_by_a_click_gets_the_earlier_negative_clicks_inside_it():
    """A negative click where the object has no window yet removes nothing then; the window a
    later positive click opens over it gets it replayed (as a grown window does), so the same
    clicks give the same mask however the window came to be (newest-click memory)."""
    vol = _ras_volume([-110, -60, -60], [250, 60, 60], 2.0)
    neg = np.array([130.0, 0, 0])
    session = Session(SphereEngine(radius_vox=20), spacing_mm=1.5, refine="none", islands="all", click_memory="newest")
    session.set_volume(vol)
    session.add_click(1, xyz=[0.0, 0, 0])
    assert "nothing to remove" in session.add_click(1, xyz=neg, positive=False).note
    rep = session.add_click(1, xyz=[118.0, 0, 0])
    assert rep.new_windows >= 1 and session.objects[1].windows[1].geom.contains(neg[None])[0]
    ijk = tuple(np.rint(vol.world_to_voxel(neg[None])[0]).astype(int))
    assert session.mask(1)[tuple(np.rint(vol.world_to_voxel(np.zeros((1, 3)))[0]).astype(int))]
    assert not session.mask(1)[ijk]
