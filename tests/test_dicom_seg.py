"""Label maps written as DICOM SEG for a CT read from a DICOM series (``-o x.dcm``).

The SEG is read back with highdicom, and every segmented voxel is placed in patient space from
the SEG's own per-frame geometry (plane position, orientation, pixel spacing), independently of
bosam's affines, then compared with the label map bosam writes as NIfTI.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import DATA, need
from test_segment_cli import bosam, random_checkpoint  # noqa: F401 - the fixture is used by name
from test_volume import ct_image_dataset, write_dicom_series, write_enhanced_ct

hd = pytest.importorskip("highdicom", reason="DICOM SEG needs highdicom (the io and test extras)")
pydicom = pytest.importorskip("pydicom")

from bosam_cli.errors import VolumeError  # noqa: E402
from bosam_cli.volume import read_volume, write_label_map  # noqa: E402

CT_SM = DATA / "totalsegmentator" / "example_ct_sm.nii.gz"
SEG_SM = DATA / "totalsegmentator" / "example_seg.nii.gz"
LPS = np.array([-1.0, -1.0, 1.0])


def add_study(folder: Path, *, frame_of_reference: bool = True) -> None:
    """The UIDs any CT from a scanner has (the bare test series lacks them). Type 2 patient and
    study attributes (birth date, sex, accession number ...) stay absent, as anonymisers drop
    them."""
    for f in folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.PatientID, ds.PatientName = "BOSAM-TEST", "Test^Patient"
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
        if frame_of_reference:
            ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
        ds.SeriesNumber = 3
        ds.save_as(f)


def seg_voxels_lps(path: Path) -> dict[str, np.ndarray]:
    """Segment label -> (n, 3) LPS mm centres of its voxels, from the SEG's own geometry."""
    seg = pydicom.dcmread(path)
    bits = np.asarray(seg.pixel_array).reshape(int(seg.NumberOfFrames), seg.Rows, seg.Columns)
    shared = seg.SharedFunctionalGroupsSequence[0]
    iop = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    d_row, d_col = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    names = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    out: dict[str, list[np.ndarray]] = {name: [] for name in names.values()}
    for frame, fg in zip(bits, seg.PerFrameFunctionalGroupsSequence):
        ident = fg if "SegmentIdentificationSequence" in fg else shared  # shared when there is one segment
        number = int(ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        ipp = np.asarray(fg.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        r, c = np.nonzero(frame)
        out[names[number]].append(ipp + c[:, None] * d_col * iop[:3] + r[:, None] * d_row * iop[3:])
    return {k: np.concatenate(v) if v else np.zeros((0, 3)) for k, v in out.items()}


def test_seg_of_an_oblique_series_lies_on_the_labelled_voxels(tmp_path):
    """Two objects with TotalSegmentator-style ids (not 1, 2) on an oblique, shuffled series:
    segments named and numbered in object order, every voxel where the label map has it, the
    CT's files untouched, type 2 attributes the export lacked filled in empty."""
    folder = tmp_path / "series"
    write_dicom_series(folder, rows=9, cols=8, n=6)
    add_study(folder)
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir()}
    vol = read_volume(folder)
    labels = np.zeros(vol.shape, np.uint8)
    labels[1:4, 2:7, 1:3] = 76  # femur_right
    labels[5:8, 0:2, 3:6] = 75  # femur_left
    out = write_label_map(labels, vol, tmp_path / "out" / "seg.dcm", {76: "femur_right", 75: "femur_left", 9: "empty"})
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["seg.dcm"]  # no temp file left
    # a SEG saved into the series' own folder is passed over when the folder is read again
    inside = write_label_map(labels, vol, folder / "seg.dcm", {76: "femur_right", 75: "femur_left"})
    again = read_volume(folder)
    np.testing.assert_array_equal(again.array, vol.array)
    with pytest.raises(VolumeError, match=r"seg\.dcm: SOPClassUID: .* is not a CT image"):
        read_volume(inside)
    inside.unlink()

    seg = hd.seg.segread(out)
    assert [(int(s.SegmentNumber), str(s.SegmentLabel)) for s in seg.SegmentSequence] == [
        (1, "femur_right"), (2, "femur_left"), (3, "empty")]
    assert seg.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.1"
    assert seg.FrameOfReferenceUID == "1.2.826.0.1.3680043.8.498.2"
    assert seg.SeriesInstanceUID != pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID
    assert int(seg.SeriesNumber) == 1003 and seg.PatientBirthDate == ""
    cat = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (cat.CodeValue, cat.CodingSchemeDesignator) == ("272673000", "SCT")

    # frames name the slices they segment: highdicom's own lookup by source instance
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in vol.meta["files"]]
    by_instance = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    expected = np.select([labels == 76, labels == 75], [1, 2], 0).transpose(2, 1, 0)
    np.testing.assert_array_equal(by_instance, expected)

    # and the SEG's own geometry puts every voxel where the CT's voxel is
    got = seg_voxels_lps(out)
    for name, lab in (("femur_right", 76), ("femur_left", 75)):
        want = vol.voxel_to_world(np.argwhere(labels == lab).astype(float)) * LPS
        np.testing.assert_allclose(np.array(sorted(map(tuple, np.round(got[name], 3)))),
                                   np.array(sorted(map(tuple, np.round(want, 3)))), atol=2e-3)
    assert len(got["empty"]) == 0


def test_seg_refused_without_a_dicom_series_or_its_uids(tmp_path):
    folder = tmp_path / "series"
    write_dicom_series(folder)
    vol = read_volume(folder)
    labels = np.ones(vol.shape, np.uint8)
    with pytest.raises(VolumeError, match=r"StudyInstanceUID: missing, so a DICOM SEG cannot reference"):
        write_label_map(labels, vol, tmp_path / "a.dcm", {1: "bone"})
    add_study(folder, frame_of_reference=False)
    with pytest.raises(VolumeError, match=r"FrameOfReferenceUID: missing"):
        write_label_map(labels, read_volume(folder), tmp_path / "a.dcm", {1: "bone"})
    nifti = vol.with_array(vol.array)
    nifti.meta = {}
    with pytest.raises(VolumeError, match=r"a\.dcm: a DICOM SEG references the CT's DICOM slices, but .* is not a DICOM series"):
        write_label_map(labels, nifti, tmp_path / "a.dcm", {1: "bone"})
    nifti.meta = {"format": "dicom-multiframe", "files": ["x"], "frame_slices": None}
    with pytest.raises(VolumeError, match=r"the frames of the multi-frame CT .* do not map one to one"):
        write_label_map(labels, nifti, tmp_path / "a.dcm", {1: "bone"})
    add_study(folder)
    with pytest.raises(VolumeError, match=r"labels: values \[2\] have no segment name"):
        write_label_map(labels * 2, read_volume(folder), tmp_path / "a.dcm", {1: "bone"})
    assert not list(tmp_path.glob("*.dcm"))


def test_seg_labels_from_any_object_name_are_valid_single_lo_values(tmp_path):
    """Object names are the user's text: a backslash (DICOM's value separator, which made
    SegmentLabel multi-valued), control characters and over 64 characters are no valid LO
    value. Read back, every segment has one SegmentLabel, the cleaned name, and the
    manifest's segment map says the same."""
    from pydicom.multival import MultiValue

    from bosam_cli.dicom_seg import segment_map

    folder = tmp_path / "series"
    write_dicom_series(folder, rows=9, cols=8, n=4)
    add_study(folder)
    vol = read_volume(folder)
    labels = np.zeros(vol.shape, np.uint16)
    labels[1:3, 1:3, 0:2], labels[4:6, 4:6, 1:3], labels[0:2, 6:8, 2:4], labels[6:8, 0:2, 0:2] = 300, 2, 3, 4
    names = {300: "a\\b^c=long_name_" + "x" * 80, 2: "ab\\\\cd", 3: " femur\tleft\n2\r", 4: "\\"}
    want = ["a b^c=long_name_" + "x" * 48, "ab cd", "femur left 2", "label 4"]
    out = write_label_map(labels, vol, tmp_path / "seg.dcm", names)
    seg = pydicom.dcmread(out)
    got = [seg.SegmentSequence[i]["SegmentLabel"].value for i in range(len(names))]
    assert not any(isinstance(v, MultiValue) for v in got), got
    assert got == want
    assert all(len(v) <= 64 for v in got)
    assert [name for _, _, name in segment_map(labels, names)] == want
    assert set(seg_voxels_lps(out)) == set(want)  # every segment's frames found under its label
    # a name beyond ASCII is kept whole, in UTF-8, with no encoding warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = write_label_map(labels, vol, tmp_path / "utf8.dcm", {300: "fémur ½ 骨", 2: "b", 3: "c", 4: "d"})
    seg = pydicom.dcmread(out)
    assert seg.SpecificCharacterSet == "ISO_IR 192" and seg.SegmentSequence[0].SegmentLabel == "fémur ½ 骨"
    assert str(seg.PatientName) == "Test^Patient"


def test_seg_of_only_empty_masks_is_written_without_highdicom_logging(tmp_path, caplog):
    """bosam warns about an empty mask itself; highdicom's own 'Encoding an empty image with
    omit_empty_frames' went raw to stderr on top."""
    import logging

    folder = tmp_path / "series"
    write_dicom_series(folder, rows=9, cols=8, n=4)
    add_study(folder)
    vol = read_volume(folder)
    with caplog.at_level(logging.DEBUG):
        out = write_label_map(np.zeros(vol.shape, np.uint8), vol, tmp_path / "seg.dcm", {1: "bone"})
    assert not [r for r in caplog.records if "omit_empty_frames" in r.getMessage()], caplog.text
    seg = hd.seg.segread(out)
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["bone"]
    assert not seg_voxels_lps(out)["bone"].size


def test_seg_of_an_enhanced_multiframe_ct_references_its_frames(tmp_path):
    """An enhanced CT stores its frames in any order: the SEG's frames name the right source
    frame and lie, voxel for voxel, where the label map has them."""
    write_dicom_series(tmp_path / "series", rows=9, cols=8, n=6)
    enhanced = tmp_path / "enh" / "ct.dcm"
    write_enhanced_ct(tmp_path / "series", enhanced, order=[4, 1, 5, 0, 3, 2])
    vol = read_volume(enhanced)
    assert sorted(vol.meta["frame_slices"]) == list(range(6))
    labels = np.zeros(vol.shape, np.uint16)
    labels[1:4, 2:7, 0:2] = 300
    labels[5:8, 0:2, 3:6] = 2
    out = write_label_map(labels, vol, tmp_path / "seg.dcm", {300: "vertebra", 2: "rib"})
    got = seg_voxels_lps(out)
    for name, lab in (("vertebra", 300), ("rib", 2)):
        want = vol.voxel_to_world(np.argwhere(labels == lab).astype(float)) * LPS
        np.testing.assert_allclose(np.array(sorted(map(tuple, np.round(got[name], 3)))),
                                   np.array(sorted(map(tuple, np.round(want, 3)))), atol=2e-3)
    seg = pydicom.dcmread(out)
    source_uid = pydicom.dcmread(enhanced, stop_before_pixels=True).SOPInstanceUID
    for fg in seg.PerFrameFunctionalGroupsSequence:  # each frame names the source frame at its position
        ref = fg.DerivationImageSequence[0].SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == source_uid
        src = pydicom.dcmread(enhanced).PerFrameFunctionalGroupsSequence[int(ref.ReferencedFrameNumber) - 1]
        np.testing.assert_allclose([float(v) for v in src.PlanePositionSequence[0].ImagePositionPatient],
                                   [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient], atol=1e-4)


def test_enhanced_ct_without_frame_of_reference_is_read_and_only_a_seg_refused(tmp_path):
    """As for a series: an enhanced CT without FrameOfReferenceUID is read (highdicom refused
    to build its volume, so even a NIfTI label map was refused); only a DICOM SEG, which
    references it, is refused, naming the field."""
    write_dicom_series(tmp_path / "series", rows=6, cols=5, n=4)
    classic = read_volume(tmp_path / "series")
    enhanced = tmp_path / "enh" / "ct.dcm"
    write_enhanced_ct(tmp_path / "series", enhanced, order=[2, 0, 3, 1])
    ds = pydicom.dcmread(enhanced)
    del ds.FrameOfReferenceUID
    ds.save_as(enhanced)
    vol = read_volume(enhanced)
    np.testing.assert_array_equal(vol.array, classic.array)
    assert "FrameOfReferenceUID" not in pydicom.dcmread(enhanced, stop_before_pixels=True)  # the file is untouched
    labels = np.zeros(vol.shape, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    write_label_map(labels, vol, tmp_path / "out.nii.gz", {1: "bone"})
    with pytest.raises(VolumeError, match=r"ct\.dcm: FrameOfReferenceUID: missing, so a DICOM SEG cannot reference"):
        write_label_map(labels, vol, tmp_path / "out.dcm", {1: "bone"})
    assert not (tmp_path / "out.dcm").exists()


def write_nifti_as_dicom(nifti: Path, folder: Path) -> None:
    """The CT as a DICOM series: column i, row j, slice k of the NIfTI array, same patient
    positions (LPS), HU stored as int16, files named in no particular order."""
    from pydicom.uid import generate_uid

    img = nib.load(str(nifti))
    arr = np.asanyarray(img.dataobj).astype(np.int16)
    a = img.affine
    row_dir, col_dir = a[:3, 0] * LPS, a[:3, 1] * LPS
    d_col, d_row = np.linalg.norm(row_dir), np.linalg.norm(col_dir)
    folder.mkdir(parents=True)
    series = generate_uid()
    for k in range(arr.shape[2]):
        ds = ct_image_dataset(series, arr.shape[1], arr.shape[0], signed=True)
        ds.InstanceNumber = k + 1
        ds.PixelSpacing = [float(d_row), float(d_col)]
        ds.ImageOrientationPatient = [float(v) for v in (*(row_dir / d_col), *(col_dir / d_row))]
        ds.ImagePositionPatient = [float(f"{v:.6f}") for v in (a @ [0, 0, k, 1])[:3] * LPS]
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = np.ascontiguousarray(arr[:, :, k].T).tobytes()
        ds.save_as(folder / f"{(k * 7919) % 1000:04d}.dcm", enforce_file_format=True)
    add_study(folder)


def test_segment_dicom_ct_to_dicom_seg_cli(tmp_path, random_checkpoint):  # noqa: F811
    """bosam segment on a DICOM series with ``-o x.dcm --per-object``: the SEG holds, voxel for
    voxel in patient space, the label map the same run writes as NIfTI; the manifest lists the
    segments; a NIfTI CT asked for a SEG fails before any work, with nothing written."""
    ct = need(CT_SM)
    seg_truth = np.asanyarray(nib.load(need(SEG_SM)).dataobj)
    series = tmp_path / "series"
    write_nifti_as_dicom(ct, series)
    objects = []
    for label, name in [(31, "vertebrae_L1"), (30, "vertebrae_L2")]:
        idx = np.argwhere(seg_truth == label)
        ras = nib.load(str(ct)).affine @ [*idx[len(idx) // 2], 1]
        objects.append({"label": label, "name": name, "clicks": [{"xyz": ras[:3].tolist()}]})
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"coordinate_system": "RAS", "objects": objects}))
    options = ["--points", str(prompts), "-c", str(random_checkpoint), "--engine", "torch", "--max-windows", "1"]

    r = bosam("segment", str(ct), "-o", str(tmp_path / "bad" / "x.dcm"), *options)
    assert r.returncode != 0 and "x.dcm: a DICOM SEG references the CT's DICOM slices" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()

    r = bosam("segment", str(series), "-o", str(tmp_path / "a" / "ct.nii.gz"), *options)
    assert r.returncode == 0, r.stderr
    r = bosam("segment", str(series), "-o", str(tmp_path / "b" / "ct.dcm"), "--per-object", *options)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "b" / "ct.json").read_text())
    assert manifest["output"]["dicom_seg_segments"] == [
        {"segment_number": 1, "label": 31, "name": "vertebrae_L1"},
        {"segment_number": 2, "label": 30, "name": "vertebrae_L2"}]
    ref = nib.load(str(tmp_path / "a" / "ct.nii.gz"))
    ref_labels = np.asanyarray(ref.dataobj)
    got = seg_voxels_lps(tmp_path / "b" / "ct.dcm")
    for obj in objects:
        want = nib.affines.apply_affine(ref.affine, np.argwhere(ref_labels == obj["label"])) * LPS
        assert len(want) > 0
        np.testing.assert_allclose(np.array(sorted(map(tuple, np.round(got[obj["name"]], 2)))),
                                   np.array(sorted(map(tuple, np.round(want, 2)))), atol=0.02)
        mask = Path(next(o for o in manifest["objects"] if o["label"] == obj["label"])["mask_file"])
        assert mask.suffix == ".dcm"
        one = seg_voxels_lps(mask)
        assert list(one) == [obj["name"]] and len(one[obj["name"]]) == len(want)

    # an interactive session writes the SEG at every click, with the object's name
    ras = objects[0]["clicks"][0]["xyz"]
    r = bosam("segment", str(series), "--interactive", "-o", str(tmp_path / "c" / "ct.dcm"), *options[2:],
              stdin=f"object 31 vertebrae_L1\n+ {ras[0]} {ras[1]} {ras[2]}\nquit\n")
    assert r.returncode == 0, r.stdout + r.stderr
    assert [str(s.SegmentLabel) for s in hd.seg.segread(tmp_path / "c" / "ct.dcm").SegmentSequence] == ["vertebrae_L1"]
    # ... and removes it, with its prompt file, when the session ends with no click left
    r = bosam("segment", str(series), "--interactive", "-o", str(tmp_path / "c" / "ct.dcm"), *options[2:],
              stdin=f"object 31 vertebrae_L1\n+ {ras[0]} {ras[1]} {ras[2]}\nundo\nquit\n")
    assert r.returncode == 0 and "nothing to write" in r.stdout and "saved" not in r.stdout.splitlines()[-1]
    assert not (tmp_path / "c" / "ct.dcm").exists() and not (tmp_path / "c" / "ct_points.json").exists()


def test_a_label_map_into_the_series_folder_is_refused(tmp_path):
    """'-o <the series folder>' wrote <folder>.nii.gz among the slices, after which the folder
    read as a folder of CTs (a batch) for every later command; a DICOM SEG there stays allowed
    (reading the series again skips it)."""
    from fake_engines import SphereEngine

    from bosam_cli.errors import BosamError
    from bosam_cli.segment import SegmentOptions, segment_file

    series = tmp_path / "series"
    write_dicom_series(series, rows=16, cols=16, n=8)
    add_study(series)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"coordinate_system": "voxel", "objects": [{"label": 1, "clicks": [{"xyz": [8, 8, 4]}]}]}))
    before = sorted(p.name for p in series.iterdir())
    for out in (series, series / "seg.nrrd"):
        target = out if out.suffix else out / "series.nii.gz"
        with pytest.raises(BosamError, match=f"{target}: would go into the CT's DICOM series folder {series}, which then"):
            segment_file(series, prompts, out, SphereEngine(radius_vox=3.0), SegmentOptions(refine="none"))
    assert sorted(p.name for p in series.iterdir()) == before
    segment_file(series, prompts, series / "seg.dcm", SphereEngine(radius_vox=3.0), SegmentOptions(refine="none"))
    assert read_volume(series).shape == (16, 16, 8)
    # a series kept in sub-folders of the folder given (study/DICOM/S1/...): the folder given counts too
    study = tmp_path / "study"
    write_dicom_series(study / "DICOM" / "S1", rows=16, cols=16, n=8)
    for out in (study, study / "DICOM" / "seg.nii.gz"):
        with pytest.raises(BosamError, match=f"would go into the CT's DICOM series folder {study}"):
            segment_file(study, prompts, out, SphereEngine(radius_vox=3.0), SegmentOptions(refine="none"))
