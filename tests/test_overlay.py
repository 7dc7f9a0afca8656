"""The overlay PNG shows the same patient slices, masks and clicks whatever order the CT's axes
are stored in (flipped, permuted, oblique)."""

from __future__ import annotations

import io

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

from bosam_cli.report import overlay_views, write_overlay
from bosam_cli.volume import Volume

SHAPE = (20, 24, 28)  # RAS storage: x (towards the patient's right), y (anterior), z (superior)
SPACING = (0.8, 1.1, 2.5)


def ras_case() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(CT, labels, affine, click voxel) stored in RAS order."""
    rng = np.random.default_rng(7)
    ct = rng.integers(-1000, 1500, SHAPE).astype(np.int16)
    labels = np.zeros(SHAPE, np.uint8)
    labels[5:11, 8:15, 10:20] = 3
    labels[13:17, 3:6, 2:6] = 9
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-30.0, 12.0, -400.0]
    return ct, labels, affine, np.array([7.0, 11.0, 14.0])


def stored_as(codes: str, ct: np.ndarray, labels: np.ndarray, affine: np.ndarray, click: np.ndarray):
    """The same patient data stored with axis codes ``codes``; the click in the new indices."""
    t = ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(codes))
    new_affine = affine @ inv_ornt_aff(t, ct.shape)
    new_ct = apply_orientation(ct, t)
    new_labels = apply_orientation(labels, t)
    new_click = (np.linalg.inv(new_affine) @ affine @ np.append(click, 1.0))[:3]
    assert nib.aff2axcodes(new_affine) == tuple(codes)
    assert new_ct[tuple(np.round(new_click).astype(int))] == ct[tuple(click.astype(int))]
    return new_ct, new_labels, new_affine, new_click


def test_views_of_a_ras_volume_are_radiological() -> None:
    ct, labels, affine, click = ras_case()
    views = overlay_views(Volume(ct, affine), labels, [{"voxel": click.tolist(), "positive": True}])
    axial, coronal, sagittal = views
    nx, ny, nz = SHAPE
    x, y, z = click.astype(int)
    r, c = 3, 5  # any pixel: rows run anterior -> posterior / superior -> inferior
    assert axial.ct[r, c] == ct[nx - 1 - c, ny - 1 - r, z]  # patient right on the image left
    assert coronal.ct[r, c] == ct[nx - 1 - c, y, nz - 1 - r]
    assert sagittal.ct[r, c] == ct[x, c, nz - 1 - r]  # anterior on the right
    assert [v.spacing_mm for v in views] == [(1.1, 0.8), (2.5, 0.8), (2.5, 1.1)]
    for v in views:
        (row, col, positive), = v.clicks
        assert positive and v.labels[int(row), int(col)] == 3


@pytest.mark.parametrize("codes", ["LPS", "PIR", "SLA", "IRP", "ASL"])
def test_views_do_not_depend_on_the_storage_order(codes: str) -> None:
    ct, labels, affine, click = ras_case()
    reference = overlay_views(Volume(ct, affine), labels, [{"voxel": click.tolist(), "positive": True}])
    ct2, labels2, affine2, click2 = stored_as(codes, ct, labels, affine, click)
    clicks = [{"voxel": click2.tolist(), "positive": True}, {"voxel": (click2 + 0.2).tolist(), "positive": False}]
    views = overlay_views(Volume(ct2, affine2), labels2, clicks)
    for ref, got in zip(reference, views):
        np.testing.assert_array_equal(got.ct, ref.ct)
        np.testing.assert_array_equal(got.labels, ref.labels)
        assert got.spacing_mm == pytest.approx(ref.spacing_mm)
        assert got.clicks[0] == pytest.approx(ref.clicks[0])
        assert got.clicks[0][2] is True and got.clicks[1][2] is False


def test_an_oblique_volume_is_shown_in_its_closest_orientation() -> None:
    ct, labels, affine, click = ras_case()
    ct2, labels2, affine2, click2 = stored_as("PIR", ct, labels, affine, click)
    angle = np.deg2rad(8)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0, 0], [np.sin(angle), np.cos(angle), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    reference = overlay_views(Volume(ct, affine), labels, [{"voxel": click.tolist(), "positive": True}])
    views = overlay_views(Volume(ct2, rot @ affine2), labels2, [{"voxel": click2.tolist(), "positive": True}])
    for ref, got in zip(reference, views):
        np.testing.assert_array_equal(got.labels, ref.labels)
        assert got.clicks[0] == pytest.approx(ref.clicks[0])


def test_overlay_png_is_the_same_for_every_storage_order(tmp_path) -> None:
    from PIL import Image

    ct, labels, affine, click = ras_case()
    pngs = []
    for codes in ("RAS", "PIR"):
        ct2, labels2, affine2, click2 = stored_as(codes, ct, labels, affine, click)
        objects = [{"label": 3, "name": "bone", "clicks": [{"voxel": click2.tolist(), "positive": True}]}]
        path = write_overlay(Volume(ct2, affine2), labels2, objects, tmp_path / f"{codes}.png")
        pngs.append(np.asarray(Image.open(io.BytesIO(path.read_bytes())).convert("RGB")).astype(int))
    np.testing.assert_array_equal(pngs[1], pngs[0])
    rgb = pngs[1][18:]  # below the title
    green = (rgb[..., 1] == 255) & (rgb[..., 0] == 0) & (rgb[..., 2] == 0)  # the click's crosses
    tinted = (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])  # the mask; the CT is grey
    assert green.sum() >= 3 * 10
    assert (tinted & ~green).sum() > 300


@pytest.mark.parametrize("codes", ["RAS", "LPS", "LAS", "PIR"])
def test_stl_normals_point_out_of_the_bone_in_world_space(codes: str, tmp_path) -> None:
    """STL readers (viewers, 3-D printing slicers) take the right-hand normals as pointing out
    of the solid: the signed volume must be positive and match the mask, for either handedness.
    The file holds LPS mm and says so (3D Slicer assumes LPS for a mesh without the tag)."""
    from bosam_cli.report import mask_to_mesh, write_stl

    g = np.indices(SHAPE) - np.array([10, 12, 14])[:, None, None, None]
    ball = ((g * np.array(SPACING)[:, None, None, None]) ** 2).sum(0) < 8.0**2
    _, _, affine, _ = ras_case()
    _, mask, affine2, _ = stored_as(codes, ball.astype(np.uint8), ball.astype(np.uint8), affine, np.zeros(3))
    path = write_stl(*mask_to_mesh(mask.astype(bool), affine2), tmp_path / "ball.stl")
    raw = path.read_bytes()
    n = int(np.frombuffer(raw[80:84], "<u4")[0])
    rec = np.frombuffer(raw[84:], dtype=[("n", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")], count=n)
    tri = rec["v"].astype(np.float64)
    signed = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
    assert signed == pytest.approx(ball.sum() * np.prod(SPACING), rel=0.05)
    assert raw[:80].rstrip().endswith(b"SPACE=LPS") and not raw[:5].lower() == b"solid"
    centre_lps = (affine @ np.array([10, 12, 14, 1.0]))[:3] * np.array([-1, -1, 1])
    np.testing.assert_allclose(tri.reshape(-1, 3).mean(axis=0), centre_lps, atol=0.3)
    outward = np.einsum("ij,ij->i", rec["n"], tri.mean(axis=1) - centre_lps)
    assert (outward > 0).mean() > 0.99


def test_a_mesh_from_the_objects_box_equals_the_mesh_from_the_whole_ct() -> None:
    """segment meshes each bone from its box of the label map (a full-size CT made that 5 s per
    bone); with the box's corner in the affine the vertices are the same."""
    from bosam_cli.report import mask_to_mesh

    g = np.indices(SHAPE) - np.array([10, 12, 14])[:, None, None, None]
    ball = ((g * np.array(SPACING)[:, None, None, None]) ** 2).sum(0) < 8.0**2
    _, _, affine, _ = ras_case()
    whole_v, whole_f = mask_to_mesh(ball, affine)
    nz = np.nonzero(ball)
    lo, hi = [int(a.min()) for a in nz], [int(a.max()) + 1 for a in nz]
    box = (slice(lo[0], hi[0]), slice(lo[1] - 2, hi[1] + 1), slice(max(lo[2] - 3, 0), hi[2]))
    assert ball[box].sum() == ball.sum()  # the box holds the object, touching its faces or not
    shift = np.eye(4)
    shift[:3, 3] = [sl.start for sl in box]
    box_v, box_f = mask_to_mesh(ball[box], affine @ shift)
    np.testing.assert_allclose(box_v, whole_v, atol=1e-9)
    np.testing.assert_array_equal(box_f, whole_f)
