"""Window geometry and the two interpolations between CT grids and model windows."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from bosam_cli.volume import Volume, read_volume
from bosam_cli.windows import (
    WindowGeometry,
    logits_to_grid,
    normalise,
    resample,
    sample_labels,
    sample_window,
    window_at,
    window_image,
)
from conftest import DATA, need


def _rot(axis: int, deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(3)
    i, j = [a for a in range(3) if a != axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def affine_for(codes: str, spacing=(1.0, 1.0, 1.0), oblique_deg: float = 0.0, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Affine whose voxel axes point along ``codes`` (e.g. 'PIR'), with spacing and a tilt."""
    direction = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    m = np.zeros((3, 3))
    for col, code in enumerate(codes):
        axis, sign = direction[code]
        m[axis, col] = sign * spacing[col]
    a = np.eye(4)
    a[:3, :3] = _rot(0, oblique_deg) @ m
    a[:3, 3] = origin
    return a


ORIENTATIONS = [
    ("RAS", (1.0, 1.0, 1.0), 0.0),
    ("LAS", (0.7, 0.7, 2.5), 0.0),
    ("LPS", (0.8, 0.9, 1.25), 0.0),
    ("PIR", (2.0, 1.0, 1.0), 12.0),
    ("SLP", (3.0, 0.6, 0.8), 0.0),
]


@pytest.mark.parametrize("codes, spacing, tilt", ORIENTATIONS)
def test_world_voxel_window_round_trip(codes, spacing, tilt):
    aff = affine_for(codes, spacing, tilt, origin=(-40.0, 25.0, 310.0))
    vol = Volume(np.zeros((40, 50, 30), np.int16), aff)
    assert vol.axcodes == codes
    rng = np.random.default_rng(0)
    ijk = rng.uniform(0, 29, size=(20, 3))
    world = vol.voxel_to_world(ijk)
    geom = window_at(world[0], spacing_mm=1.5)
    q = geom.world_to_window(world)
    back = vol.world_to_voxel(geom.window_to_world(q))
    assert np.allclose(back, ijk, atol=1e-9)
    assert np.allclose(vol.voxel_to_world(back), world, atol=1e-9)
    # the click that opened the window sits within snap/2 voxels of its centre
    assert np.all(np.abs(q[0] - 64) <= 8 + 1e-9)


def test_verse_oblique_pir_round_trip():
    vol = read_volume(need(DATA / "verse_mask_only" / "sub-verse004_seg-vert_msk.nii.gz"))
    assert vol.axcodes == "PIR"
    off_diag = np.abs(vol.affine[:3, :3]) > 1e-6
    assert off_diag.sum() > 3  # really oblique
    ijk = np.argwhere(vol.array == 20)[::997].astype(float)  # L1 voxels
    world = vol.voxel_to_world(ijk)
    geom = window_at(world.mean(0))
    assert np.allclose(vol.world_to_voxel(geom.window_to_world(geom.world_to_window(world))), ijk, atol=1e-8)
    # sampling the mask into the window: L1 lands around the window centre
    win = sample_labels(vol, geom)
    centre = np.argwhere(win == 20).mean(0)
    assert np.linalg.norm(centre - geom.world_to_window(world.mean(0))[0]) < 3


@pytest.mark.parametrize("codes, spacing, tilt", ORIENTATIONS)
def test_bright_voxel_lands_at_its_window_position(codes, spacing, tilt):
    aff = affine_for(codes, spacing, tilt, origin=(10.0, -20.0, 5.0))
    arr = np.zeros((60, 60, 60), np.int16)
    arr[31, 27, 35] = 1000
    vol = Volume(arr, aff)
    world = vol.voxel_to_world([[31, 27, 35]])[0]
    geom = window_at(world + np.array([7.0, -5.0, 3.0]), spacing_mm=0.5, snap_vox=0)
    raw = sample_window(vol, geom)
    expect = geom.world_to_window(world[None])[0]
    # centre of mass of the interpolated blob equals the world position of the voxel
    idx = np.argwhere(raw > 0)
    com = (idx * raw[raw > 0][:, None]).sum(0) / raw[raw > 0].sum()
    assert np.linalg.norm(com - expect) < 0.35
    # window axes run along +R, +A, +S
    assert np.allclose(geom.affine[:3, :3], np.eye(3) * 0.5)


def test_separable_and_general_paths_agree():
    rng = np.random.default_rng(1)
    arr = rng.normal(size=(30, 34, 26)).astype(np.float32)
    for codes in ("LPS", "PIR", "ASL"):
        aff = affine_for(codes, (0.8, 1.3, 2.0), 0.0, origin=(3.0, -7.0, 11.0))
        vol = Volume(arr, aff)
        geom = window_at(vol.voxel_to_world([[15, 17, 13]])[0], 1.1, 24, snap_vox=0)
        fast = resample(arr, aff, (24,) * 3, geom.affine, order=1, cval=-5.0)
        m = np.linalg.inv(aff) @ geom.affine
        g = np.meshgrid(*[np.arange(24.0)] * 3, indexing="ij")
        coords = np.stack([m[r, 0] * g[0] + m[r, 1] * g[1] + m[r, 2] * g[2] + m[r, 3] for r in range(3)])
        ref = map_coordinates(arr, coords, order=1, mode="grid-constant", cval=-5.0, prefilter=False)
        assert np.allclose(fast, ref, atol=1e-4)
        near = resample(arr, aff, (24,) * 3, geom.affine, order=0, cval=0)
        ref0 = map_coordinates(arr, coords, order=0, mode="grid-constant", cval=0, prefilter=False)
        assert np.mean(np.isclose(near, ref0)) > 0.99  # ties at exact .5 may round differently


def test_normalise_is_zscore_over_positive_voxels_after_clamp():
    raw = np.array([-2000.0, -500.0, 0.0, 100.0, 300.0, 5000.0], dtype=np.float32)
    out = normalise(raw, (-1000, 1000))
    fg = np.array([100.0, 300.0, 1000.0])
    mean, std = fg.mean(), fg.std(ddof=1)
    expect = (np.clip(raw, -1000, 1000) - mean) / std
    assert np.allclose(out, expect, atol=1e-5)
    assert np.allclose(normalise(raw, None)[-1], (5000 - np.mean([100, 300, 5000])) / np.std([100, 300, 5000], ddof=1))


def test_window_image_pads_outside_the_ct_with_zero_hu():
    vol = Volume(np.full((10, 10, 10), 500, np.int16), np.eye(4))
    geom = window_at([0.0, 0.0, 0.0], spacing_mm=1.0, size=32, snap_vox=0)
    raw = sample_window(vol, geom)
    assert raw[0, 0, 0] == 0 and raw[-1, -1, -1] == 0
    assert raw[16 + 3, 16 + 3, 16 + 3] == 500
    img = window_image(vol, geom)
    assert img.shape == (1, 1, 32, 32, 32) and img.dtype == np.float32


@pytest.mark.parametrize("codes, spacing, tilt", ORIENTATIONS)
def test_window_logits_map_back_exactly_for_linear_fields(codes, spacing, tilt):
    """Trilinear maps reproduce linear functions: logits = a . world + b in the window must
    come back as the same function of each CT voxel's world position."""
    aff = affine_for(codes, spacing, tilt, origin=(-30.0, -30.0, -30.0))
    vol = Volume(np.zeros((64, 64, 64), np.int16), aff)
    centre = vol.voxel_to_world([[32, 32, 32]])[0]
    geom = window_at(centre, spacing_mm=1.5, snap_vox=0)
    a, b = np.array([0.3, -0.2, 0.1]), 2.0
    low_aff = geom.lowres_affine(32)
    g = np.stack(np.meshgrid(*[np.arange(32.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    world_low = g @ low_aff[:3, :3].T + low_aff[:3, 3]
    logits = (world_low @ a + b).reshape(32, 32, 32).astype(np.float32)
    box = (slice(16, 48), slice(16, 48), slice(16, 48))
    values, weights = logits_to_grid(logits, geom, vol, box)
    ijk = np.stack(np.meshgrid(*[np.arange(16, 48)] * 3, indexing="ij"), -1).reshape(-1, 3)
    expect = (vol.voxel_to_world(ijk) @ a + b).reshape(32, 32, 32)
    inner = geom.contains(vol.voxel_to_world(ijk), margin_vox=4).reshape(32, 32, 32)
    assert inner.sum() > 1000
    assert np.allclose(values[inner], expect[inner], atol=1e-3)
    assert np.all(weights[inner] > 0)


def test_lowres_affine_matches_trilinear_upsampling_convention():
    geom = WindowGeometry((0.0, 0.0, 0.0), 1.0, 128)
    low = geom.lowres_affine(32)
    # low-res voxel 0 covers window voxels 0..3, centred at 1.5
    assert np.allclose(low[:3, 3], [1.5, 1.5, 1.5]) and np.allclose(np.diag(low)[:3], 4.0)


@pytest.mark.parametrize("edge, cval", [(True, 0.0), (False, 0.0), (False, -1000.0)])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_matmul_interpolation_equals_gather_and_lerp(axis, edge, cval):
    """The axis interpolation (a BLAS matmul) equals gather + lerp with the edge / cval rules,
    for up- and down-sampling and positions beyond both ends."""
    from bosam_cli.windows import _interp_axis

    rng = np.random.default_rng(axis)
    arr = rng.normal(size=(9, 11, 13)).astype(np.float32) * 100
    n = arr.shape[axis]
    for c in (np.linspace(-2.3, n + 1.7, 40), np.linspace(0.2, n - 1.4, 5), np.array([0.0, n - 1.0, -0.5, n - 0.5])):
        got = _interp_axis(arr, axis, c, 1, edge, cval)
        cc = np.clip(c, 0, n - 1) if edge else c
        i0 = np.floor(cc).astype(int)
        w = cc - i0
        shape = [1, 1, 1]
        shape[axis] = len(c)

        def val(idx):
            v = np.take(arr, np.clip(idx, 0, n - 1), axis=axis).astype(np.float64)
            return v if edge else np.where(((idx >= 0) & (idx < n)).reshape(shape), v, cval)

        want = val(i0) * (1 - w).reshape(shape) + val(i0 + 1) * w.reshape(shape)
        assert got.shape == want.shape and got.dtype == np.float32
        assert np.allclose(got, want, rtol=1e-6, atol=1e-3), float(np.abs(got - want).max())
