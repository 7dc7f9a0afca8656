"""Synthetic CT phantoms: determinism, exact labels on the CT grid, HU realism, grid variety,
world-fixed anatomy, clicks and writing."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from bosam_cli import phantom as ph
from bosam_cli.phantom import KINDS, REGIONS, TISSUE_NAMES, TS_LABELS, make_phantom, phantom_clicks, write_phantom_dataset

SHARED_LABELMAP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "totalsegmentator_total_v2_labelmap.json"
SMALL = (96, 96, 64)  # a small grid the default view is fitted into (fast)


def expected_names(info: dict) -> set[str]:
    """Bones a phantom with this region, levels and kinds must hold (all fit into a default view)."""
    kinds = set(info["kinds"])
    names: set[str] = set()
    if "vertebra" in kinds:
        names |= {f"vertebrae_{lv}" for lv in info["levels"]}
    if "rib" in kinds:
        for lv in info["levels"]:
            if lv.startswith("T") and int(lv[1:]) in ph._RIBS:
                names |= {f"rib_left_{lv[1:]}", f"rib_right_{lv[1:]}"}
    if "pelvis" in kinds:
        names |= {"sacrum", "vertebrae_S1", "hip_left", "hip_right"}
    if "femur" in kinds:
        names |= {"femur_left", "femur_right"}
    return names


def canonical(arr: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The array in (closest) RAS storage order."""
    return nib.orientations.apply_orientation(arr, nib.orientations.io_orientation(affine))


@pytest.fixture(scope="module")
def pelvis() -> ph.Phantom:
    return make_phantom(4, shape=SMALL, kinds=["pelvis", "femur", "vertebra"])


@pytest.fixture(scope="module")
def thorax() -> ph.Phantom:
    return make_phantom(8, shape=SMALL, kinds=["vertebra", "rib"])


def test_embedded_label_ids_match_totalsegmentator():
    assert TS_LABELS["vertebrae_L1"] == 31 and TS_LABELS["femur_left"] == 75 and TS_LABELS["hip_left"] == 77
    assert TS_LABELS["rib_left_1"] == 92 and TS_LABELS["rib_right_12"] == 115
    if not SHARED_LABELMAP.exists():
        pytest.skip(f"shared labelmap not found at {SHARED_LABELMAP}")
    shared = json.loads(SHARED_LABELMAP.read_text())
    by_name = {v["name"]: int(k) for k, v in shared["labels"].items()}
    for name, label in TS_LABELS.items():
        assert by_name[name] == label, name
        assert shared["labels"][str(label)]["bone"] is True


def test_deterministic_from_seed():
    a = make_phantom(3, shape=(64, 64, 40))
    b = make_phantom(3, shape=(64, 64, 40))
    np.testing.assert_array_equal(a.ct.array, b.ct.array)
    np.testing.assert_array_equal(a.labels.array, b.labels.array)
    np.testing.assert_array_equal(a.ct.affine, b.ct.affine)
    assert a.objects == b.objects and a.info == b.info
    c = make_phantom(5, shape=(64, 64, 40))
    assert not np.array_equal(a.ct.array, c.ct.array)


def test_labels_exactly_on_ct_grid(pelvis: ph.Phantom):
    ct, labels = pelvis.ct, pelvis.labels
    assert ct.array.dtype == np.int16 and labels.array.dtype == np.uint8 and pelvis.tissue.array.dtype == np.uint8
    assert ct.shape == labels.shape == pelvis.tissue.shape == SMALL
    np.testing.assert_array_equal(ct.affine, labels.affine)
    present = set(np.unique(labels.array)) - {0}
    assert present == {o.label for o in pelvis.objects} <= set(TS_LABELS.values())
    counts = np.bincount(labels.array.ravel(), minlength=256)
    for obj in pelvis.objects:
        assert obj.voxels == counts[obj.label] > 0
        assert pelvis.label_names[obj.label] == obj.name and TS_LABELS[obj.name] == obj.label
        assert obj.kind in KINDS
    # bone labels are bone tissue and nothing else is
    bone_tissue = pelvis.tissue.array == 10
    np.testing.assert_array_equal(bone_tissue & (labels.array > 0), labels.array > 0)


@pytest.mark.parametrize("kinds", [None, ["vertebra"], ["rib"], ["pelvis", "femur"], ["vertebra", "rib"]])
def test_every_planned_object_present(kinds):
    for seed in (0, 1):
        p = make_phantom(seed, shape=SMALL, kinds=kinds)
        names = {o.name for o in p.objects}
        assert names == expected_names(p.info), (seed, p.region)
        assert all(o.voxels >= 20 for o in p.objects)
        if kinds is not None:
            assert {o.kind for o in p.objects} <= {"femur" if k == "long_bone" else k for k in kinds}


def test_kinds_select_region_and_validate():
    assert make_phantom(2, shape=(48, 48, 32), kinds=["long_bone"]).region == "pelvis"
    assert {o.kind for o in make_phantom(2, shape=(48, 48, 32), kinds=["long_bone"]).objects} == {"femur"}
    assert make_phantom(2, shape=(48, 48, 32), kinds=["rib"]).region in ("thoracic", "thoracolumbar")
    with pytest.raises(ValueError):
        make_phantom(0, kinds=["skull"])
    with pytest.raises(ValueError):
        make_phantom(0, orientation="RAX")
    with pytest.raises(ValueError):
        make_phantom(-1)


def test_bone_hu_inside_labels():
    # fine in-plane spacing: the cortex is resolved
    p = make_phantom(1, shape=(128, 128, 64), kinds=["vertebra", "rib"])
    assert max(p.info["spacing_mm"]) < 3.0
    ct, labels = p.ct.array.astype(np.float64), p.labels.array
    for obj in p.objects:
        hu = ct[labels == obj.label]
        assert 80 < np.median(hu) < 700, obj.name
        assert np.percentile(hu, 99) > max(400, np.median(hu) + 150), obj.name  # a brighter cortical shell
        assert np.percentile(hu, 1) > -150, obj.name
    for lab in (TS_LABELS["vertebrae_L1"], TS_LABELS["vertebrae_T12"]):
        # cancellous interior (deep voxels) well below cortical HU
        inside = labels == lab
        deep = ndimage.distance_transform_edt(inside, sampling=p.labels.spacing_mm) > 4.0
        assert 60 < np.median(ct[deep]) < 400
    # pelvis at fine spacing: carved joints must not turn whole bones into cortex
    q = make_phantom(4, spacing_mm=(0.8, 0.8, 1.0), shape=(150, 120, 90), orientation="LPS", kinds=["pelvis", "femur"])
    assert {o.name for o in q.objects} >= {"hip_left", "hip_right", "sacrum"}
    for obj in q.objects:
        hu = q.ct.array[q.labels.array == obj.label]
        assert 80 < np.median(hu) < 600, obj.name
        assert np.percentile(hu, 99) > 450, obj.name  # the thin cortex is resolved at 0.8 mm
    body = ct[p.tissue.array == 1]  # subcutaneous fat
    assert -150 < np.median(body) < -50
    assert np.median(ct[p.tissue.array == 0]) < -900  # air


def test_non_bone_distractors_with_bone_like_hu_are_unlabelled():
    seen = 0
    for seed in range(6):
        p = make_phantom(seed, shape=(80, 80, 48))
        enhanced = p.tissue.array == 5
        assert not np.any(p.labels.array[enhanced])
        if p.info["contrast"] != "native" and enhanced.any():
            hu = p.ct.array[enhanced]
            assert np.percentile(hu, 90) > 120
            seen += 1
    assert seen >= 2


def test_neighbouring_bones_keep_a_gap():
    # at 1.4 mm two face-adjacent voxel centres are closer than the carved joint spaces
    # (ribs-vertebrae 1.5 mm, hip-sacrum, hip-femur and hip-vertebrae 2.5 mm x scale >= 2 mm)
    p = make_phantom(8, spacing_mm=(1.4, 1.4, 1.4), shape=(120, 100, 90), orientation="RAS", kinds=["vertebra", "rib"])
    labels = p.labels.array
    vertebrae = np.isin(labels, [TS_LABELS[f"vertebrae_{lv}"] for lv in p.info["levels"]])
    ribs = np.isin(labels, [o.label for o in p.objects if o.kind == "rib"])
    assert ribs.any() and vertebrae.any()
    assert not np.any(ndimage.binary_dilation(ribs) & vertebrae)  # 1.5 mm carved joint space
    # the default pelvis phantom (with its lumbar spine): L5's transverse processes reach the iliac wings
    pelvis = make_phantom(4, spacing_mm=(1.4, 1.4, 1.4), shape=(150, 110, 150), orientation="RAS")
    assert pelvis.region == "pelvis"
    hips = pelvis.labels.array
    pairs = [("hip_left", "sacrum"), ("hip_left", "femur_left"), ("hip_right", "femur_right"), ("hip_right", "vertebrae_S1")]
    pairs += [("hip_left", "vertebrae_L5"), ("hip_right", "vertebrae_L5")]
    for a, b in pairs:
        ma, mb = hips == TS_LABELS[a], hips == TS_LABELS[b]
        assert ma.any() and mb.any()
        assert not np.any(ndimage.binary_dilation(ma) & mb), (a, b)


def test_grid_draws_vary_orientation_spacing_and_obliquity():
    codes, slices, inplane, oblique = set(), [], [], 0
    for seed in range(40):
        anat = ph._build_anatomy(seed, None)
        grid = ph._draw_grid(seed, anat, None, None, None)
        aff = grid.affine_anat
        assert "".join(nib.aff2axcodes(aff)) == grid.orientation
        spacing = np.sqrt((aff[:3, :3] ** 2).sum(0))
        along_z = int(np.argmax(np.abs(aff[2, :3])))
        slices.append(spacing[along_z])
        inplane.extend(np.delete(spacing, along_z))
        codes.add(grid.orientation)
        oblique += any(abs(a) > 0.1 for a in grid.oblique_deg)
        assert np.prod(grid.shape) <= ph.MAX_VOXELS
    assert len(codes) >= 4
    assert 0.6 <= min(inplane) and max(inplane) <= 1.51
    assert 0.8 <= min(slices) and max(slices) <= 3.0 and max(slices) - min(slices) > 1.0
    assert 5 <= oblique <= 25


def test_explicit_grid_is_honoured():
    p = make_phantom(6, shape=(70, 50, 40), spacing_mm=(2.0, 3.0, 2.5), orientation="PIR")
    assert p.ct.shape == (70, 50, 40)
    np.testing.assert_allclose(p.ct.spacing_mm, (2.0, 3.0, 2.5))
    assert p.ct.axcodes == "PIR"
    assert p.info["orientation"] == "PIR"


def corners(vol) -> np.ndarray:
    """World coordinates of a grid's 8 corner voxel centres, in a canonical order."""
    n = np.asarray(vol.shape) - 1
    ijk = np.array([[a, b, c] for a in (0, n[0]) for b in (0, n[1]) for c in (0, n[2])])
    xyz = vol.voxel_to_world(ijk)
    return xyz[np.lexsort(np.round(xyz, 4).T[::-1])]


def _grid_for(code: str, spacing_xyz, shape_xyz):
    """Spacing and shape in voxel order for an axis-code, from per-world-axis (x, y, z) values."""
    order = [ph._AXIS_OF[c][0] for c in code]
    return tuple(spacing_xyz[w] for w in order), tuple(shape_xyz[w] for w in order)


@pytest.mark.parametrize("seed", [0, 5])  # seed 0 draws an oblique grid, 5 does not
def test_same_anatomy_whatever_the_orientation(seed):
    spacing_xyz, shape_xyz = (2.5, 2.5, 3.0), (84, 84, 60)
    results = {}
    for code in ("RAS", "LPS", "PIR"):
        sp, sh = _grid_for(code, spacing_xyz, shape_xyz)
        p = make_phantom(seed, shape=sh, spacing_mm=sp, orientation=code)
        results[code] = p
    ref = results["RAS"]
    assert (any(abs(a) > 0.1 for a in ref.info["oblique_deg"])) == (seed == 0)
    ref_lab = canonical(ref.labels.array, ref.labels.affine)
    ref_ct = canonical(ref.ct.array, ref.ct.affine).astype(np.float64)
    for code in ("LPS", "PIR"):
        p = results[code]
        assert "".join(nib.aff2axcodes(p.ct.affine)) == code
        # the same voxel centres in the world, visited in another order: same grid corners
        np.testing.assert_allclose(corners(p.ct), corners(ref.ct), atol=1e-6)
        np.testing.assert_array_equal(canonical(p.labels.array, p.labels.affine), ref_lab)
        diff = canonical(p.ct.array, p.ct.affine).astype(np.float64) - ref_ct
        assert np.median(np.abs(diff)) < 4 * ref.info["noise_hu"]  # noise differs, anatomy not
        assert p.objects == ref.objects


def test_same_anatomy_on_a_different_spacing():
    a = make_phantom(12, shape=(90, 90, 60), spacing_mm=(2.0, 2.0, 2.5), orientation="LPS")
    b = make_phantom(12, shape=(120, 70, 120), spacing_mm=(1.5, 2.5, 1.5), orientation="ASL")
    # voxels deep inside b's bones are inside the same bone in a, at the same world position
    deep = ndimage.distance_transform_edt(b.labels.array > 0, sampling=b.labels.spacing_mm) > 3.0
    ijk_b = np.argwhere(deep)
    world = b.labels.voxel_to_world(ijk_b)
    vals_a = a.labels.value_at(a.labels.world_to_voxel(world))
    ok = ~np.isnan(vals_a)
    assert ok.sum() > 200
    agree = vals_a[ok] == b.labels.array[tuple(ijk_b[ok].T)]
    assert agree.mean() > 0.99


def test_phantom_clicks_inside_objects(thorax: ph.Phantom):
    clicks = phantom_clicks(thorax, per_object=3, seed=1)
    assert set(clicks) == {o.label for o in thorax.objects}
    labels = thorax.labels.array
    for label, pts in clicks.items():
        assert 1 <= len(pts) <= 3 and len(set(pts)) == len(pts)
        for ijk in pts:
            assert labels[ijk] == label
        mask = labels == label
        dist = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=thorax.labels.spacing_mm)[1:-1, 1:-1, 1:-1]
        assert dist[pts[0]] == pytest.approx(dist.max())
    assert clicks == phantom_clicks(thorax, per_object=3, seed=1)
    assert {k: v[0] for k, v in phantom_clicks(thorax).items()} == {k: v[0] for k, v in clicks.items()}


def test_save_and_dataset_roundtrip(tmp_path: Path):
    p = make_phantom(7, shape=(48, 40, 32))
    paths = p.save(tmp_path / "one", stem="p7")
    ct = nib.load(str(paths["ct"]))
    lab = nib.load(str(paths["labels"]))
    np.testing.assert_array_equal(np.asanyarray(ct.dataobj), p.ct.array)
    np.testing.assert_array_equal(np.asanyarray(lab.dataobj), p.labels.array)
    np.testing.assert_allclose(ct.affine, p.ct.affine)
    meta = json.loads(paths["meta"].read_text())
    assert meta["seed"] == 7 and len(meta["objects"]) == len(p.objects)
    root = write_phantom_dataset(tmp_path / "ds", [3, 4], shape=(40, 40, 24))
    assert sorted(f.name for f in (root / "imagesTr").iterdir()) == ["phantom_00003_0000.nii.gz", "phantom_00004_0000.nii.gz"]
    assert sorted(f.name for f in (root / "labelsTr").iterdir()) == ["phantom_00003.nii.gz", "phantom_00004.nii.gz"]
    ds = json.loads((root / "dataset.json").read_text())
    assert ds["labels"]["background"] == 0 and ds["labels"]["hip_left"] == 77 and ds["numTraining"] == 2
    # made in two worker processes: the same files
    par = write_phantom_dataset(tmp_path / "ds2", [3, 4], jobs=2, shape=(40, 40, 24))
    for sub in ("imagesTr/phantom_00003_0000.nii.gz", "labelsTr/phantom_00004.nii.gz"):
        np.testing.assert_array_equal(np.asanyarray(nib.load(str(par / sub)).dataobj),
                                      np.asanyarray(nib.load(str(root / sub)).dataobj))
    assert json.loads((par / "dataset.json").read_text()) == ds


def test_region_presets_and_tissue_names_are_consistent():
    for name, preset in REGIONS.items():
        assert set(preset["kinds"]) <= set(KINDS)
        for lv in preset["levels"]:
            assert f"vertebrae_{lv}" in TS_LABELS
    assert TISSUE_NAMES[10] == "bone" and TISSUE_NAMES[5] == "enhanced"
    assert abs(sum(ph._ORIENTATION_WEIGHTS) - 1) < 1e-9 and len(ph._ORIENTATION_WEIGHTS) == len(ph.ORIENTATIONS)
