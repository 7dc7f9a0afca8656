"""Datasets: discovery, label names and filters, the integrity check, the cache, patch sampling."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bone_datasets import FEMUR, L3, make_dataset, paint_case, save_nifti
from bosam_cli.data import (
    CaseStore,
    PatchConfig,
    PatchSampler,
    find_cases,
    patch_rng,
    read_label_names,
    refuse_errors,
    resolve_labels,
    scan_dataset,
)
from bosam_cli.errors import BosamError
from bosam_cli.volume import HU_CHECK_VERSION, read_volume
from bosam_cli.windows import normalise, sample_labels, sample_window
from conftest import DATA

TS_LABELMAP = DATA / "totalsegmentator_total_v2_labelmap.json"


def _bosam(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bosam_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"}, timeout=300)


# ---------------------------------------------------------------------------------------------
# discovery


def test_cases_pair_channel_suffix_plain_names_and_nii(tmp_path):
    root = tmp_path / "ds"
    ct, lab, aff = paint_case(1)
    save_nifti(ct, aff, root / "imagesTr" / "a_0000.nii.gz")
    save_nifti(lab, aff, root / "labelsTr" / "a.nii.gz")
    save_nifti(ct, aff, root / "imagesTr" / "b.nii")  # no channel suffix, uncompressed
    save_nifti(lab, aff, root / "labelsTr" / "b.nii")
    save_nifti(ct, aff, root / "imagesTr" / "c_0001.nii.gz")  # a second channel: ignored, told
    (root / "imagesTr" / ".DS_Store").write_text("x")  # hidden files: silently ignored
    (root / "imagesTr" / ".cache").mkdir()  # hidden folders too
    cases, problems = find_cases([root])
    assert [(c.name, c.image.name, c.label.name) for c in cases] == [
        ("a", "a_0000.nii.gz", "a.nii.gz"), ("b", "b.nii", "b.nii")]
    assert len(problems) == 1 and problems[0].severity == "warning" and "channel 0001" in problems[0].message
    save_nifti(ct, aff, root / "imagesTr" / "more" / "d_0000.nii.gz")  # nnU-Net reads no sub-folders: told
    _, problems = find_cases([root])
    assert [str(p) for p in problems if "folder" in p.message] == [
        f"{root / 'imagesTr' / 'more'}: a folder: its files are not read (cases lie directly in imagesTr/)"]


def _as_other_format(src: Path, dst: Path) -> Path:
    """``src`` (NIfTI) written as NRRD (RAS space) or MetaImage (ITK's LPS) by the usual writers."""
    vol = read_volume(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.name.endswith(".nrrd"):
        nrrd = pytest.importorskip("nrrd")
        nrrd.write(str(dst), np.asarray(vol.array), {"space": "right-anterior-superior",
                   "space directions": vol.affine[:3, :3].T, "space origin": vol.affine[:3, 3]})
        return dst
    sitk = pytest.importorskip("SimpleITK")
    lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(vol.affine[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(vol.array).transpose(2, 1, 0)))
    img.SetSpacing([float(v) for v in spacing])
    img.SetDirection([float(v) for v in (lps @ vol.affine[:3, :3] / spacing).ravel()])
    img.SetOrigin([float(v) for v in lps @ vol.affine[:3, 3]])
    sitk.WriteImage(img, str(dst))  # .mhd also writes its .raw beside it
    return dst


def test_nrrd_and_metaimage_cases_read_as_their_nifti_originals(tmp_path):
    """nnU-Net v2 datasets may store .nrrd or .mha (dataset.json's file_ending): the same cases in
    those formats scan to the same grids and labels, give the same training windows, and the
    .raw data files beside .mhd headers are no cases of their own."""
    nifti = make_dataset(tmp_path / "nifti", 3)
    other = tmp_path / "other"
    for i, ending in enumerate((".mha", ".nrrd", ".mhd")):
        _as_other_format(nifti / "imagesTr" / f"case_{i:03d}_0000.nii.gz", other / "imagesTr" / f"case_{i:03d}_0000{ending}")
        _as_other_format(nifti / "labelsTr" / f"case_{i:03d}.nii.gz", other / "labelsTr" / f"case_{i:03d}{ending}")
    (other / "imagesTr" / "notes.txt").write_text("not a volume")
    assert (other / "imagesTr" / "case_002_0000.raw").exists() or (other / "imagesTr" / "case_002_0000.zraw").exists()
    a, b = scan_dataset([nifti]), scan_dataset([other])
    assert [p.message for p in b.problems] == ["not a volume file (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd); ignored"]
    assert [i.case.image.name for i in b.infos] == ["case_000_0000.mha", "case_001_0000.nrrd", "case_002_0000.mhd"]
    for x, y in zip(a.infos, b.infos):
        assert x.shape == y.shape and x.labels == y.labels and x.bboxes == y.bboxes
        np.testing.assert_allclose(y.affine, x.affine, atol=1e-4)
    sa, sb = PatchSampler(CaseStore(a.infos)), PatchSampler(CaseStore(b.infos))
    for seed in range(3):
        pa, pb = sa.sample(np.random.default_rng(seed)), sb.sample(np.random.default_rng(seed))
        assert (pa.case.split("/")[-1], pa.label) == (pb.case.split("/")[-1], pb.label)
        np.testing.assert_array_equal(pa.target, pb.target)
        np.testing.assert_allclose(pa.image, pb.image, atol=1e-4)
    # the real CLI: the threshold baseline scores both datasets alike
    dice = []
    for root in (nifti, other):
        out = tmp_path / f"eval_{root.name}"
        res = _bosam("evaluate", "--data", str(root), "--baseline", "threshold", "--clicks", "1,3", "--out", str(out))
        assert res.returncode == 0, res.stderr
        with open(out / "evaluation.csv") as f:
            dice.append([(r["case"].split("/")[-1], r["label"], r["click"], r["dice"], r["nsd"]) for r in csv.DictReader(f)])
    assert len(dice[1]) == 3 * 2 * 3 and dice[1] == dice[0]
    (other / "labelsTr" / "case_001.nrrd").unlink()
    msgs = [p.message for p in scan_dataset([other]).errors]
    assert msgs == ["unpaired image: no label file labelsTr/case_001.nrrd"]


def test_several_roots_and_splits(tmp_path):
    make_dataset(tmp_path / "one", 1)
    make_dataset(tmp_path / "two", 1, split="Ts")
    cases, _ = find_cases([tmp_path / "one", tmp_path / "two"], splits=("Tr", "Ts"))
    assert sorted(c.key for c in cases) == ["one/Tr/case_000", "two/Ts/case_000"]
    with pytest.raises(BosamError, match="not an nnU-Net-style dataset"):
        find_cases([tmp_path / "two"], splits=("Tr",))


def test_case_ids_ending_in_four_digits_without_a_channel_suffix(tmp_path):
    """Images named like their labels pair even when the case id itself ends in _NNNN."""
    root = tmp_path / "ds"
    ct, lab, aff = paint_case(2)
    for name in ("BONE_0001", "ct_0000"):
        save_nifti(ct, aff, root / "imagesTr" / f"{name}.nii.gz")
        save_nifti(lab, aff, root / "labelsTr" / f"{name}.nii.gz")
    cases, problems = find_cases([root])
    assert [(c.name, c.image.name) for c in cases] == [("BONE_0001", "BONE_0001.nii.gz"), ("ct_0000", "ct_0000.nii.gz")]
    assert problems == []


def test_roots_with_the_same_folder_name_keep_distinct_case_keys(tmp_path):
    make_dataset(tmp_path / "siteA" / "Dataset001", 1)
    make_dataset(tmp_path / "siteB" / "Dataset001", 1, seed=1)
    make_dataset(tmp_path / "Other", 1)
    cases, _ = find_cases([tmp_path / "siteA" / "Dataset001", tmp_path / "siteB" / "Dataset001", tmp_path / "Other"])
    assert [c.key for c in cases] == ["siteA/Dataset001/Tr/case_000", "siteB/Dataset001/Tr/case_000", "Other/Tr/case_000"]


def test_an_unlabelled_test_split_is_skipped_with_a_warning(tmp_path):
    """nnU-Net datasets often hold imagesTs/ without labelsTs/: the labelled splits are used."""
    root = make_dataset(tmp_path / "ds", 1)
    (root / "imagesTs").mkdir()
    cases, problems = find_cases([root], splits=("Tr", "Val", "Ts"))
    assert [c.key for c in cases] == ["ds/Tr/case_000"]
    assert len(problems) == 1 and problems[0].severity == "warning"
    assert str(problems[0]) == f"{root / 'labelsTs'}: missing (found imagesTs/ but no labelsTs/): that split is skipped"
    with pytest.raises(BosamError, match=r"labelsTs: missing"):
        find_cases([root], splits=("Ts",))


def test_label_names_that_differ_between_roots(tmp_path):
    """Two roots numbering their labels differently: a name that selects different ids is
    refused (it would train on another bone in one of them); ids are fine; an id named
    differently is a warning."""
    a, b = make_dataset(tmp_path / "a", 1), make_dataset(tmp_path / "b", 1, seed=1)
    (a / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "femur_left": FEMUR, "vertebrae_L3": L3}}))
    (b / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "femur_left": L3, "vertebrae_L3": FEMUR}}))
    with pytest.raises(BosamError, match=rf"--labels: selects ids \[{FEMUR}\] in {a} but \[{L3}\] in {b}"):
        scan_dataset([a, b], labels="femur_left")
    scan = scan_dataset([a, b], labels=str(FEMUR))
    assert scan.label_ids == [FEMUR] and scan.label_names[FEMUR] == "femur_left"
    told = [str(p) for p in scan.warnings if "dataset.json" in str(p)]
    assert told == [f"{b / 'dataset.json'}: label {L3} is 'femur_left' here but 'vertebrae_L3' in an earlier root; "
                    "reports use 'vertebrae_L3'", f"{b / 'dataset.json'}: label {FEMUR} is 'vertebrae_L3' here but "
                    "'femur_left' in an earlier root; reports use 'femur_left'"]


def test_missing_root_and_half_dataset_are_one_line_errors(tmp_path):
    with pytest.raises(BosamError, match="no such dataset folder"):
        find_cases([tmp_path / "nope"])
    (tmp_path / "half" / "imagesTr").mkdir(parents=True)
    with pytest.raises(BosamError, match=r"labelsTr: missing"):
        find_cases([tmp_path / "half"])


def test_label_names_from_dataset_json_v1_and_v2(tmp_path):
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "femur": 3, "region": [1, 2]}}))
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "5": "sacrum"}}))
    assert read_label_names(tmp_path / "v2") == {3: "femur"}
    (tmp_path / "v2" / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "femur": [3], "hip": "4"}}))
    assert read_label_names(tmp_path / "v2") == {3: "femur", 4: "hip"}  # a one-id region, an id as text
    assert read_label_names(tmp_path / "v1") == {5: "sacrum"}
    assert read_label_names(tmp_path) == {}
    # a region-based dataset is scanned with a warning: its name does not follow its ids
    root = make_dataset(tmp_path / "regions", 1)
    doc = json.loads((root / "dataset.json").read_text())
    doc["labels"]["spine_and_femur"] = [L3, FEMUR]
    (root / "dataset.json").write_text(json.dumps(doc))
    (warning,) = [str(p) for p in scan_dataset([root]).problems if "region" in p.message]
    assert warning == (f"{root / 'dataset.json'}: labels: 'spine_and_femur' is a region of ids [{L3}, {FEMUR}] (nnU-Net "
                       "v2): bosam takes one id per object, so each id is a label of its own here, without that name")


def test_label_filter_ids_ranges_names_bone_and_groups(tmp_path):
    names = {L3: "vertebrae_L3", FEMUR: "femur_left"}
    assert resolve_labels(None, names) is None
    assert resolve_labels("29, femur_left", names) == [L3, FEMUR]
    assert resolve_labels("25-27", names) == [25, 26, 27]
    lm = {"labels": {"0": {"name": "background"}, "1": {"name": "spleen", "bone": False},
                     "29": {"name": "vertebrae_L3", "bone": True}, "75": {"name": "femur_left", "bone": True}},
          "bone_groups": {"spine": [29]}}
    assert resolve_labels("bone", None, lm) == [L3, FEMUR]
    assert resolve_labels("spine", None, lm) == [L3]
    with pytest.raises(BosamError, match="'bone' needs a label map"):
        resolve_labels("bone", names)
    assert resolve_labels("bone", {7: "bone"}) == [7]  # a dataset's own label called "bone"
    with pytest.raises(BosamError, match="unknown label 'tibia'"):
        resolve_labels("tibia", names)
    assert resolve_labels("65530-65535", names) == list(range(65530, 65536))
    assert resolve_labels("000000000000000000031", names) == [31]
    for spec in ("0-99999999999", "65536", "1-70000"):  # the first was killed for memory
        with pytest.raises(BosamError, match=r"^--labels: label id \d+ is above 65535, the largest a label map holds$"):
            resolve_labels(spec, names)


def test_bone_filter_with_the_totalsegmentator_label_map(tmp_path):
    from bosam_cli.data import read_labelmap

    lm = read_labelmap(TS_LABELMAP) if TS_LABELMAP.exists() else pytest.skip(f"absent: {TS_LABELMAP}")
    bones = resolve_labels("bone", None, lm)
    assert 29 in bones and 75 in bones and 1 not in bones and 117 not in bones
    assert resolve_labels("femur_left,pelvis", None, lm) == [75, 77, 78]


# ---------------------------------------------------------------------------------------------
# integrity check


def _bad_dataset(root: Path) -> Path:
    """One good case and one case for every integrity error."""
    make_dataset(root, 1)  # case_000: good
    ct, lab, aff = paint_case(7)
    img, labs = root / "imagesTr", root / "labelsTr"
    save_nifti(ct, aff, img / "unpaired_image_0000.nii.gz")
    save_nifti(lab, aff, labs / "unpaired_label.nii.gz")
    save_nifti(ct, aff, img / "shape_0000.nii.gz")
    save_nifti(lab[:-2], aff, labs / "shape.nii.gz")
    save_nifti(ct, aff, img / "affine_0000.nii.gz")
    shifted = aff.copy()
    shifted[0, 3] += 1.5
    save_nifti(lab, shifted, labs / "affine.nii.gz")
    save_nifti(ct, aff, img / "empty_0000.nii.gz")
    save_nifti(np.zeros_like(lab), aff, labs / "empty.nii.gz")
    (img / "broken_0000.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 10))
    save_nifti(lab, aff, labs / "broken.nii.gz")
    save_nifti(ct, aff, img / "fractional_0000.nii.gz")
    save_nifti(lab.astype(np.float32) * 0.5, aff, labs / "fractional.nii.gz")
    save_nifti(ct, aff, img / "twice_0000.nii.gz")
    save_nifti(ct, aff, img / "twice.nii")
    save_nifti(lab, aff, labs / "twice.nii.gz")
    return root


def test_every_integrity_error_is_reported_per_case_with_the_file(tmp_path):
    root = _bad_dataset(tmp_path / "bad")
    scan = scan_dataset([root])
    by_file = {p.path.name: p.message for p in scan.errors}
    assert "no label file labelsTr/unpaired_image.nii.gz" in by_file["unpaired_image_0000.nii.gz"]
    assert "no image imagesTr/unpaired_label_0000.nii.gz" in by_file["unpaired_label.nii.gz"]
    assert "differs from the image's" in by_file["shape.nii.gz"] and "shape" in by_file["shape.nii.gz"]
    assert "affine differs" in by_file["affine.nii.gz"] and "1.5 mm" in by_file["affine.nii.gz"]
    assert "empty" in by_file["empty.nii.gz"]
    assert "cannot read" in by_file["broken_0000.nii.gz"] or "corrupt" in by_file["broken_0000.nii.gz"]
    assert "non-integer" in by_file["fractional.nii.gz"]
    assert "2 image files for case 'twice'" in by_file["twice.nii"] and "ambiguous" in by_file["twice.nii"]
    assert [i.case.name for i in scan.infos] == ["case_000"]
    with pytest.raises(BosamError) as err:
        refuse_errors(scan, skip_bad=False)
    assert "\n" not in str(err.value) and "--skip-bad" in str(err.value) and "more problems" in str(err.value)
    refuse_errors(scan, skip_bad=True)  # the good cases remain


def test_label_filter_that_matches_nothing_in_a_case_is_a_warning(tmp_path):
    root = make_dataset(tmp_path / "ds", 1)
    scan = scan_dataset([root], labels="vertebrae_L3")
    assert list(scan.infos[0].labels) == [L3] and not scan.problems
    scan = scan_dataset([root], labels="99")
    assert not scan.infos and scan.problems[0].severity == "warning" and "present: 29, 75" in scan.problems[0].message
    with pytest.raises(BosamError, match="no usable case"):
        refuse_errors(scan, skip_bad=False)


def test_a_ct_without_negative_values_is_a_warning_not_an_error(tmp_path):
    root = make_dataset(tmp_path / "ds", 2)
    img = sorted((root / "imagesTr").iterdir())[1]
    vol = read_volume(img)
    save_nifti((np.asarray(vol.array, np.int32) + 1024).astype(np.uint16), vol.affine, img)  # HU + 1024
    for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # decoded, written to the cache, read from it
        scan = scan_dataset([root], cache=cache, write_cache=cache is not None)
        assert len(scan.infos) == 2  # the case is kept
        (note,) = scan.problems
        assert note.severity == "warning" and note.path == img
        assert "does not look like a CT in Hounsfield units" in note.message and "lowest" in note.message
    assert all(i.cached for i in scan.infos)
    # a cache entry written by an older HU check is judged again from its cached values
    metas = list((tmp_path / "cache").rglob("*.json"))
    for meta_path in metas:
        meta = json.loads(meta_path.read_text())
        meta.pop("hu_check")
        meta["hu_warning"] = None
        meta_path.write_text(json.dumps(meta))
    scan = scan_dataset([root], cache=tmp_path / "cache")
    assert all(i.cached for i in scan.infos) and len(metas) == 2
    (note,) = scan.problems
    assert note.path == img and "does not look like a CT in Hounsfield units" in note.message
    assert all(json.loads(m.read_text())["hu_check"] == HU_CHECK_VERSION for m in metas)  # the new verdicts are kept


def test_an_image_with_nan_voxels_is_an_error_naming_it(tmp_path):
    root = make_dataset(tmp_path / "ds", 1)
    img = next((root / "imagesTr").iterdir())
    vol = read_volume(img)
    data = np.asarray(vol.array, np.float32)
    data[0, 0, :3] = np.nan
    save_nifti(data, vol.affine, img)
    scan = scan_dataset([root])
    (err,) = scan.problems
    assert not scan.infos and err.severity == "error" and err.path == img
    assert err.message.startswith("image data: 3 voxels are NaN or infinite")


def test_a_threaded_scan_reports_what_a_serial_one_does(tmp_path):
    good = make_dataset(tmp_path / "good", 3)
    bad = _bad_dataset(tmp_path / "bad")
    serial = scan_dataset([good, bad])
    threaded = scan_dataset([good, bad], jobs=4)
    assert [i.case.key for i in threaded.infos] == [i.case.key for i in serial.infos]
    assert [p.as_dict() for p in threaded.problems] == [p.as_dict() for p in serial.problems]
    assert [sorted(i.labels) for i in threaded.infos] == [sorted(i.labels) for i in serial.infos]


def test_prepare_check_cli_lists_problems_and_fails(tmp_path):
    root = _bad_dataset(tmp_path / "bad")
    res = _bosam("prepare", "--data", str(root), "--check", "--json")
    assert res.returncode == 1, res.stderr
    report = json.loads(res.stdout)
    assert report["summary"]["cases"] == 1 and report["summary"]["errors"] == 8
    assert any(p["path"].endswith("shape.nii.gz") for p in report["problems"])
    res = _bosam("prepare", "--data", str(tmp_path / "missing"), "--check")
    assert res.returncode == 2 and "missing: no such dataset folder" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# cache


def test_cache_is_used_memory_mapped_and_invalidated_by_a_changed_file(tmp_path):
    root = make_dataset(tmp_path / "ds", 2)
    cache = tmp_path / "cache"
    res = _bosam("prepare", "--data", str(root), "--cache", str(cache), "--json", "--jobs", "2")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["cached_cases"] == 2
    scan = scan_dataset([root], cache=cache)
    assert all(i.cached for i in scan.infos)
    image, labels = CaseStore(scan.infos, cache).load(0)
    assert isinstance(image.array, np.memmap) and isinstance(labels.array, np.memmap)
    ref_img, ref_lab = read_volume(scan.infos[0].case.image), read_volume(scan.infos[0].case.label)
    np.testing.assert_array_equal(image.array, ref_img.array)
    np.testing.assert_array_equal(labels.array, ref_lab.array)
    np.testing.assert_allclose(image.affine, ref_img.affine)
    # a re-written source file makes its entry stale: decoded from NIfTI again
    p = scan.infos[1].case.label
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = scan_dataset([root], cache=cache)
    assert [i.cached for i in again.infos] == [True, False]


# ---------------------------------------------------------------------------------------------
# patches


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("patches") / "ds", 2)
    scan = scan_dataset([root])
    return CaseStore(scan.infos)


def test_patch_is_the_segment_window_of_a_voxel_of_the_object(store):
    cfg = PatchConfig(flip=False, intensity_scale=0.0, intensity_shift=0.0, spacing_jitter=0.0, min_fg_mm3=1000.0)
    sampler = PatchSampler(store, cfg)
    for k in range(4):
        patch = sampler.sample(patch_rng(7, 0, k))
        case = next(i for i, info in enumerate(store.infos) if info.case.key == patch.case)
        image, labels = store.load(case)
        # same geometry and intensity code as bosam segment (windows.py)
        np.testing.assert_array_equal(patch.image, normalise(sample_window(image, patch.geom), cfg.clamp_hu))
        np.testing.assert_array_equal(patch.target, sample_labels(labels, patch.geom) == patch.label)
        assert labels.array[patch.seed_ijk] == patch.label
        seed_ras = image.voxel_to_world(np.asarray(patch.seed_ijk, float))
        assert patch.geom.contains(seed_ras)[0]
        assert np.abs(patch.geom.world_to_window(seed_ras)[0] - 64).max() <= cfg.max_shift_vox + 1
        assert patch.foreground == int(patch.target.sum()) > sampler.min_fg_voxels(1.5)
        assert patch.geom.spacing_mm == 1.5


def test_patches_are_a_pure_function_of_the_seed(store):
    sampler = PatchSampler(store, PatchConfig(min_fg_mm3=1000.0))
    a, b, c = (sampler.sample(patch_rng(3, *s)) for s in ((0, 1, 2), (0, 1, 2), (0, 1, 3)))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.target, b.target)
    assert (a.case, a.label, a.seed_ijk) != (c.case, c.label, c.seed_ijk) or not np.array_equal(a.image, c.image)


def test_augmentation_flips_the_window_and_jitters_spacing_and_intensity(store):
    cfg = PatchConfig(min_fg_mm3=1000.0)
    sampler = PatchSampler(store, cfg)
    seen_flips = set()
    seen_others = 0
    for k in range(6):
        p = sampler.sample(patch_rng(11, k))
        seen_flips.add(p.flips)
        assert 1.35 <= p.geom.spacing_mm <= 1.65
        case = next(i for i, info in enumerate(store.infos) if info.case.key == p.case)
        image, labels = store.load(case)
        axes = tuple(a for a in range(3) if p.flips[a])
        window_labels = sample_labels(labels, p.geom)
        target = window_labels == p.label
        np.testing.assert_array_equal(p.target, np.flip(target, axes) if axes else target)
        # the other labels' voxels (the neighbour penalty's region) are flipped the same way
        others = (window_labels > 0) & (window_labels != p.label)
        np.testing.assert_array_equal(p.others, np.flip(others, axes) if axes else others)
        assert not (p.others & p.target).any()
        seen_others += int(p.others.any())
        plain = normalise(sample_window(image, p.geom), cfg.clamp_hu)
        plain = np.flip(plain, axes) if axes else plain
        # intensity: an affine map of the plain window, close to the identity
        slope, icpt = np.polyfit(plain.ravel()[::97], p.image.ravel()[::97], 1)
        assert 0.9 - 1e-3 <= slope <= 1.1 + 1e-3 and abs(icpt) <= 0.1 + 1e-3
    assert len(seen_flips) > 1
    assert seen_others > 0


def test_small_objects_are_excluded_by_the_published_patch_rule(store):
    sampler = PatchSampler(store, PatchConfig())
    assert sampler.min_fg_voxels(1.5) == 1000 and sampler.min_fg_voxels(0.75) == 8000
    with pytest.raises(BosamError, match="smaller than the patch rule"):
        PatchSampler(store, PatchConfig(min_fg_mm3=1e9))


def test_real_totalsegmentator_ct_with_the_bone_filter(tmp_path):
    """The shared real CT (int32 HU, sform code 2, NaN scaling fields) and its TotalSegmentator
    labels: its bone classes pass the check, organs are filtered out, a window can be cut."""
    src = DATA / "totalsegmentator"
    if not (src / "example_ct.nii.gz").exists() or not TS_LABELMAP.exists():
        pytest.skip(f"shared data not available: {src}")
    root = tmp_path / "real"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTr" / "abd_0000.nii.gz").symlink_to(src / "example_ct.nii.gz")
    (root / "labelsTr" / "abd.nii.gz").symlink_to(src / "example_seg_fast_force_split.nii.gz")
    scan = scan_dataset([root], labels="bone", labelmap=TS_LABELMAP)
    assert not scan.problems and len(scan.infos) == 1
    labels = scan.infos[0].labels
    bones = set(range(25, 34)) | set(range(75, 79)) | set(range(98, 104)) | set(range(110, 116))
    assert set(labels) == bones  # spine S1..T11, femurs, hips, ribs 7-12 (organs and cartilage 117 left out)
    assert scan.label_names[29] == "vertebrae_L3"
    store = CaseStore(scan.infos)
    patch = PatchSampler(store, PatchConfig()).sample(patch_rng(0))
    assert patch.label in labels and patch.foreground > 1000 and np.isfinite(patch.image).all()


# ---------------------------------------------------------------------------------------------
# label names from two sources, nnU-Net's ignore label, and what --labels names but no case has


def _renumbered(tmp_path: Path, names: dict[str, int]) -> Path:
    """A dataset whose labels are numbered 1..N (as nnU-Net wants), unlike the label map."""
    root = make_dataset(tmp_path / "renum", dataset_json=False)
    for p in (root / "labelsTr").iterdir():
        img = read_volume(p)
        arr = np.asarray(img.array).copy()
        out = np.zeros_like(arr)
        for i, (name, new) in enumerate(names.items()):
            out[arr == (L3, FEMUR)[i]] = new
        save_nifti(out, img.affine, p)
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, **names}}))
    return root


def test_a_datasets_own_label_names_come_before_the_label_maps():
    """dataset.json numbers femur_left 2; TotalSegmentator's map numbers it 75. '--labels
    femur_left' means the dataset's label, whatever the map says; the same for 'bone' when the
    dataset itself has a label of that name (a binary bone dataset)."""
    lm = {"labels": {"1": "spleen", "2": "kidney_right", "75": {"name": "femur_left", "bone": True}},
          "bone_groups": {"leg": [75]}}
    own = {1: "spleen", 2: "femur_left"}
    assert resolve_labels("femur_left,spleen", own, lm) == [1, 2]
    assert resolve_labels("femur_left", None, lm) == [75]
    assert resolve_labels("bone", {1: "bone"}, lm) == [1] and resolve_labels("bone", own, lm) == [75]
    assert resolve_labels("leg", {3: "leg"}, lm) == [3] and resolve_labels("leg", own, lm) == [75]


def test_label_map_layouts_names_for_ids_and_one_line_errors():
    from bosam_cli.data import labelmap_bone_ids, labelmap_names

    by_id = {"labels": {"29": "vertebrae_L3", "75": "femur_left"}, "bone_ids": ["vertebrae_L3", 75],
             "bone_groups": {"spine": ["vertebrae_L3"], "leg": "75"}}
    assert labelmap_names(by_id) == {29: "vertebrae_L3", 75: "femur_left"}
    assert labelmap_bone_ids(by_id) == [29, 75]
    assert resolve_labels("spine", None, by_id) == [29]
    with pytest.raises(BosamError, match=r"bone_groups: leg: must be a list of label ids or names, not \"75\""):
        resolve_labels("leg", None, by_id)  # a string was read digit by digit: ids 5 and 7
    v2 = {"labels": {"background": 0, "femur_left": 75}}  # nnU-Net v2's direction, name -> id
    assert labelmap_names(v2) == {75: "femur_left"} and resolve_labels("femur_left", None, v2) == [75]
    with pytest.raises(BosamError, match='bone_ids: "tibia" is neither a label id nor a label name'):
        labelmap_bone_ids({"labels": {"75": "femur_left"}, "bone_ids": ["tibia"]})
    with pytest.raises(BosamError, match="the label map names no labels"):
        resolve_labels("femur_left", None, {"labels": {}})
    for empty in ("", ",", " , "):  # an unset shell variable must not select every label
        with pytest.raises(BosamError, match="--labels: empty selection"):
            resolve_labels(empty, {1: "femur"})


def test_scan_warns_when_dataset_and_label_map_name_a_label_differently(tmp_path):
    root = _renumbered(tmp_path, {"spleen": 1, "femur_left": 2})
    scan = scan_dataset([root], "femur_left,spleen", str(TS_LABELMAP))
    assert scan.label_ids == [1, 2] and scan.summary()["labels"]["2"]["name"] == "femur_left"
    (warn,) = [p for p in scan.problems if p.message.startswith("--labels: label 2")]
    assert "'femur_left' in dataset.json" in warn.message and "'kidney_right' in the label map" in warn.message


def test_labels_named_but_in_no_case_are_warned_about(tmp_path):
    root = make_dataset(tmp_path / "ds")
    scan = scan_dataset([root], f"{L3},99,femur_left")
    assert sorted(scan.summary()["labels"]) == [str(L3), str(FEMUR)]
    assert [p.message for p in scan.problems] == ["--labels: 99 is in no usable case"]
    assert not [p for p in scan_dataset([root], "20-99").problems]  # a range may hold ids no case has
    with pytest.raises(BosamError, match=r"no usable case for training: none of the selected labels \(99\) is in any case"):
        refuse_errors(scan_dataset([root], "99"), skip_bad=False)


def test_nnunet_ignore_label_is_never_an_object_nor_another_structure(tmp_path):
    """nnU-Net v2 names the voxels nobody annotated 'ignore': not a bone to train on or to
    evaluate, and not a neighbouring structure that a mask leaks into."""
    from bosam_cli.evaluate import run_clicks_protocol

    root = _renumbered(tmp_path, {"vertebra": 1, "ignore": 2})
    scan = scan_dataset([root])
    assert scan.label_ids is None and scan.summary()["label_ids"] == [1]
    assert all(info.ignore == (2,) for info in scan.infos)
    assert "ignore" in scan_dataset([root], "1,2").problems[0].message

    class Everything:  # a segmenter whose mask is the whole CT: it covers the ignore voxels
        def set_volume(self, volume):
            self.shape = volume.shape

        def reset(self, label):
            pass

        def add_click(self, label, voxel, positive=True):
            pass

        def mask(self, label):
            return np.ones(self.shape, bool)

    records = run_clicks_protocol(Everything(), scan, 2, nsd_tolerance_mm=None)
    assert {r.label for r in records} == {1} and all(r.other_voxels == 0 for r in records)
    # as in nnU-Net, no metric counts the ignore voxels and no click goes there: the mask over
    # them is neither a false positive nor an error region (it had lowered the Dice)
    from bosam_cli.evaluate import dice_score
    from bosam_cli.volume import read_volume

    for info in scan.infos:
        lab = np.asarray(read_volume(info.case.label).array)
        first, second = [r for r in records if r.case == info.case.key]
        assert (lab == 2).any() and first.dice == pytest.approx(dice_score(lab != 2, lab == 1))
        assert first.pred_voxels == int((lab != 2).sum())
        assert second.positive is False and lab[tuple(second.voxel)] == 0
    sampler = PatchSampler(CaseStore(scan.infos), PatchConfig(size=32, spacing_mm=3.0))
    patch = sampler.sample(patch_rng(0, 0, 0))
    assert patch.label == 1 and not patch.others.any()


def test_the_ct_channel_is_the_one_dataset_json_calls_ct(tmp_path):
    """nnU-Net allows channels in any order: a PET/CT dataset with the CT as channel 1 trains
    on the CT, not the PET; several channels none of which is CT are a warning."""
    root = tmp_path / "petct"
    ct, lab, aff = paint_case(1)
    save_nifti((ct / 100).astype(np.int16), aff, root / "imagesTr" / "a_0000.nii.gz")  # the PET
    save_nifti(ct, aff, root / "imagesTr" / "a_0001.nii.gz")
    save_nifti(lab, aff, root / "labelsTr" / "a.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "PET", "1": "CT"}, "labels": {"background": 0}}))
    cases, problems = find_cases([root])
    assert [c.image.name for c in cases] == ["a_0001.nii.gz"]
    assert [p.message for p in problems] == ["channel 0000 ignored: bosam reads one CT channel (_0001)"]
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "T1", "1": "T2"}}))  # v1, no CT
    cases, problems = find_cases([root])
    assert [c.image.name for c in cases] == ["a_0000.nii.gz"]
    assert any("name no single CT channel" in p.message for p in problems)


def test_broken_links_and_a_dot_root(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "Dataset007_dot")
    link = root / "labelsTr" / "case_009.nii.gz"
    link.symlink_to(tmp_path / "moved" / "case_009.nii.gz")
    (root / "imagesTr" / "case_000_0001.nii.gz").symlink_to(tmp_path / "moved" / "case_000_0001.nii.gz")
    cases, problems = find_cases([root])  # links to a missing label and an unused channel: told, not fatal
    assert len(cases) == 2 and sorted((p.severity, p.message) for p in problems) == [
        ("warning", f"broken link to {tmp_path / 'moved' / 'case_000_0001.nii.gz'} (the file it points to is missing)"),
        ("warning", f"broken link to {tmp_path / 'moved' / 'case_009.nii.gz'} (the file it points to is missing)")]
    monkeypatch.chdir(root)
    cases, _ = find_cases(["."])
    assert cases[0].key == "Dataset007_dot/Tr/case_000"  # the folder's own name, not '/Tr/case_000'


def test_prepare_check_fails_when_no_case_is_usable(tmp_path):
    root = make_dataset(tmp_path / "ds")
    r = _bosam("prepare", "--check", "--data", str(root), "--labels", "99")
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == [
        f"error: {root}: no usable case for training: none of the selected labels (99) is in any case (e.g. "
        f"{root}/labelsTr/case_000.nii.gz: none of the selected labels is present (present: {L3}, {FEMUR}); case skipped)"]
    assert _bosam("prepare", "--check", "--data", str(root)).returncode == 0
    r = _bosam("prepare", "--cache", str(tmp_path / "cache"), "--data", str(root), "--labels", "99")
    assert r.returncode == 1 and "no usable case" in r.stderr  # a cache of nothing is a failure too


def test_outputs_inside_a_datasets_folders_and_a_missing_cache_are_refused(tmp_path):
    """evaluate -o, prepare --cache and train -o inside imagesTr/ or labelsTr/ would be read back
    by every later command as stray files of the dataset: one line, exit 2, nothing written.
    A --cache that does not exist was silently ignored (training decoded every file itself); a
    cache that holds nothing for a root is a warning."""
    root = make_dataset(tmp_path / "ds")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    runs = [
        (["evaluate", "--data", str(root), "--clicks", "1", "--engine", "torch", "--threads", "1",
          "-o", str(root / "labelsTr" / "eval")], root / "labelsTr", "--out"),
        (["prepare", "--data", str(root), "--cache", str(root / "imagesTr")], root / "imagesTr", "--cache"),
        (["train", "--data", str(root), "--preset", "tiny", "--epochs", "1", "--no-tensorboard",
          "-o", str(root / "labelsTr" / "run")], root / "labelsTr", "--out"),
    ]
    for args, folder, option in runs:
        r = _bosam(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        out = args[args.index(option if option != "--out" else "-o") + 1]
        assert r.stderr.strip().splitlines() == [
            f"error: {out}: is inside the dataset folder {folder.resolve()}; choose a {option} outside the "
            "dataset's images and labels folders"], r.stderr
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before

    r = _bosam("train", "--data", str(root), "--preset", "tiny", "--epochs", "1", "--no-tensorboard",
               "-o", str(root / "dataset.json"))  # it said only "File exists"
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {root / 'dataset.json'}: is a file; --out is the run folder (checkpoints and log)"]
    r = _bosam("train", "--data", str(root), "--preset", "tiny", "--epochs", "1", "--no-tensorboard",
               "-o", str(tmp_path / "run"), "--cache", str(tmp_path / "nocache"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nocache'}: no such cache folder (--cache); write one with 'bosam prepare --cache'"]
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty_cache").mkdir()
    scan = scan_dataset([root], cache=str(tmp_path / "empty_cache"))
    assert [str(p) for p in scan.problems if p.severity == "warning"] == [
        f"{tmp_path / 'empty_cache'}: holds no cache of {root}; its files are read and decoded as they are"]
    scan_dataset([root], cache=str(tmp_path / "empty_cache"), write_cache=True)
    assert not [p for p in scan_dataset([root], cache=str(tmp_path / "empty_cache")).problems if p.severity == "warning"]


def test_a_cache_entry_belongs_to_its_channel_file(tmp_path):
    """Two channels of one case can share size and mtime (uncompressed files from one archive):
    after dataset.json names channel 1 the CT, channel 0's cache entry must not be served."""
    root = tmp_path / "ds"
    ct, lab, aff = paint_case(2)
    pet = save_nifti((ct // 100).astype(np.int16), aff, root / "imagesTr" / "a_0000.nii")
    real = save_nifti(ct, aff, root / "imagesTr" / "a_0001.nii")
    save_nifti(lab, aff, root / "labelsTr" / "a.nii")
    os.utime(real, ns=(pet.stat().st_atime_ns, pet.stat().st_mtime_ns))
    assert pet.stat().st_size == real.stat().st_size
    cache = tmp_path / "cache"
    scan_dataset([root], cache=str(cache), write_cache=True)  # channel 0 cached
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "PET", "1": "CT"}}))
    scan = scan_dataset([root], cache=str(cache))
    assert scan.infos[0].case.image.name == "a_0001.nii" and not scan.infos[0].cached
    image, _ = CaseStore(scan.infos, str(cache)).load(0)
    assert np.asarray(image.array).max() == ct.max()


def test_root_names_for_dot_and_dotdot_stay_distinct(tmp_path, monkeypatch):
    a = make_dataset(tmp_path / "siteA" / "Dataset001")
    make_dataset(tmp_path / "siteB" / "Dataset001")
    monkeypatch.chdir(a)
    cases, _ = find_cases([".", "../../siteB/Dataset001"])
    keys = [c.key for c in cases]
    assert len(set(keys)) == len(keys) == 4 and keys[0] == "siteA/Dataset001/Tr/case_000"
    monkeypatch.chdir(a / "imagesTr")
    assert find_cases([".."])[0][0].key == "Dataset001/Tr/case_000"


def test_a_label_map_keyed_by_name_with_id_entries():
    from bosam_cli.data import labelmap_bone_ids, labelmap_names

    lm = {"labels": {"femur_left": {"id": 75, "bone": True}, "spleen": {"id": 1}}, "bone_groups": {"leg": ["femur_left"]}}
    assert labelmap_names(lm) == {75: "femur_left", 1: "spleen"}
    assert labelmap_bone_ids(lm) == [75] and resolve_labels("leg,spleen", None, lm) == [1, 75]
