"""bosam segment end to end through the real CLI: grids, manifests, extras, batches, errors."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from bosam_cli.checkpoints import save_checkpoint
from bosam_cli.model import build_preset
from conftest import DATA, need

CT_SM = DATA / "totalsegmentator" / "example_ct_sm.nii.gz"
SEG_SM = DATA / "totalsegmentator" / "example_seg.nii.gz"


def bosam(*args: str, stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bosam_cli", *args], capture_output=True, text=True, input=stdin, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def random_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(build_preset("tiny"), tmp_path_factory.mktemp("ck") / "tiny_random.pth")


@pytest.fixture(scope="module")
def prompts_sm(tmp_path_factory) -> Path:
    seg = np.asanyarray(nib.load(need(SEG_SM)).dataobj)
    objects = []
    for label, name in [(31, "vertebrae_L1"), (30, "vertebrae_L2")]:
        idx = np.argwhere(seg == label)
        objects.append({"label": label, "name": name, "clicks": [{"xyz": idx[len(idx) // 2].tolist(), "positive": True}]})
    p = tmp_path_factory.mktemp("prompts") / "example_ct_sm.json"
    p.write_text(json.dumps({"coordinate_system": "voxel", "objects": objects}))
    return p


def test_real_ct_end_to_end_output_on_the_input_grid(tmp_path, random_checkpoint, prompts_sm):
    ct = need(CT_SM)
    out = tmp_path / "out"
    r = bosam("segment", str(ct), "--points", str(prompts_sm), "-c", str(random_checkpoint), "--engine", "torch",
              "-o", str(out), "--overlay", "--mesh", "--per-object", "--max-windows", "2")
    assert r.returncode == 0, r.stderr
    src, dst = nib.load(str(ct)), nib.load(str(out / "example_ct_sm.nii.gz"))
    assert dst.shape == src.shape
    assert np.array_equal(dst.affine, src.affine)
    for getter in ("get_sform", "get_qform"):
        (m_src, c_src), (m_dst, c_dst) = getattr(src.header, getter)(coded=True), getattr(dst.header, getter)(coded=True)
        assert int(c_src) == int(c_dst)
        if m_src is not None:
            assert np.allclose(m_src, m_dst)
    labels = np.asanyarray(dst.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 30, 31}

    manifest = json.loads((out / "example_ct_sm.json").read_text())
    for key in ("versions", "input", "output", "checkpoint", "engine", "model_window", "overlap_rule", "objects", "timings_s"):
        assert key in manifest
    assert not any("Hounsfield" in w for w in manifest["warnings"])
    empty = [o for o in manifest["objects"] if not o["voxels"]]
    assert len([w for w in manifest["warnings"] if "empty mask" in w]) == len(empty)
    assert manifest["model_window"]["islands"] == "clicked"  # the default: detached blobs dropped
    assert manifest["model_window"]["refine"] == "hu" and manifest["model_window"]["refine_hu"] == 75.0
    assert len(manifest["checkpoint"]["sha256"]) == 64 and manifest["engine"]["engine"] == "torch"
    assert manifest["input"]["shape"] == list(src.shape)
    for o in manifest["objects"]:
        assert {"label", "name", "clicks", "voxels", "volume_mm3", "windows", "truncated"} <= set(o)
        assert o["voxels"] == int((labels == o["label"]).sum())
        assert np.isclose(o["volume_mm3"], o["voxels"] * 27.0, rtol=1e-6)
        c = o["clicks"][0]
        assert {"ras", "voxel", "positive"} <= set(c)
        assert np.allclose(src.affine @ np.append(c["voxel"], 1), np.append(c["ras"], 1), atol=0.01)
        assert 1 <= o["windows"] <= 2
        mask = np.asanyarray(nib.load(o["mask_file"]).dataobj)
        assert mask.shape == src.shape and int(mask.sum()) == o["voxels"]
        stl = Path(o["mesh_file"]).read_bytes()
        assert struct.unpack("<I", stl[80:84])[0] == o["mesh_faces"] == (len(stl) - 84) // 50
        # the mesh lies on the mask in patient space: LPS mm in the file -> RAS -> voxels
        rec = np.frombuffer(stl[84:], dtype=[("n", "<f4", 3), ("v", "<f4", (3, 3)), ("a", "<u2")])
        ras = rec["v"].reshape(-1, 3).astype(np.float64) * np.array([-1, -1, 1])
        ijk = (np.linalg.inv(src.affine) @ np.c_[ras, np.ones(len(ras))].T)[:3].T
        nz = np.argwhere(mask)
        assert (ijk >= nz.min(0) - 1).all() and (ijk <= nz.max(0) + 1).all()
        np.testing.assert_allclose(ijk.min(0), nz.min(0) - 0.5, atol=0.51)
    for k in ("read", "sample_windows", "encoder", "decoder", "map_back", "write", "total"):
        assert manifest["timings_s"][k] >= 0
    png = (out / "example_ct_sm_overlay.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_ct_stored_as_hu_plus_1024_is_segmented_with_a_warning(tmp_path, random_checkpoint, prompts_sm):
    src = nib.load(need(CT_SM))
    ct = tmp_path / "offset_ct.nii.gz"
    img = nib.Nifti1Image((np.asanyarray(src.dataobj).astype(np.int32) + 1024).clip(0).astype(np.uint16), src.affine,
                          src.header)
    nib.save(img, str(ct))
    out = tmp_path / "out"
    r = bosam("segment", str(ct), "--points", str(prompts_sm), "-c", str(random_checkpoint), "--engine", "torch",
              "-o", str(out), "--max-windows", "1")
    assert r.returncode == 0, r.stderr
    assert "warning:" in r.stdout and "Hounsfield" in r.stdout
    manifest = json.loads((out / "offset_ct.json").read_text())
    hu = [w for w in manifest["warnings"] if "Hounsfield" in w]
    assert len(hu) == 1 and hu[0].startswith(f"{ct}: no voxel below 0 (lowest ")


def _expect_clean_failure(r: subprocess.CompletedProcess, name: str, out_dir: Path) -> None:
    assert r.returncode != 0
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert name in lines[0]
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_bad_inputs_fail_cleanly_without_output(tmp_path, random_checkpoint, prompts_sm):
    ct = need(CT_SM)
    out = tmp_path / "out"
    # corrupt NIfTI: truncated gzip
    bad_ct = tmp_path / "corrupt.nii.gz"
    bad_ct.write_bytes(ct.read_bytes()[:20000])
    r = bosam("segment", str(bad_ct), "--points", str(prompts_sm), "-c", str(random_checkpoint), "-o", str(out))
    _expect_clean_failure(r, "corrupt.nii.gz", out)
    # 4-D NIfTI
    img = nib.load(str(ct))
    four = tmp_path / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(img.shape + (2,), np.int16), img.affine), str(four))
    r = bosam("segment", str(four), "--points", str(prompts_sm), "-c", str(random_checkpoint), "-o", str(out))
    _expect_clean_failure(r, "four_d.nii.gz", out)
    # a float CT with NaN voxels (outside a scan's field of view, left by some resampling tools)
    nan_ct = tmp_path / "nan_ct.nii.gz"
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data[:5] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(nan_ct))
    r = bosam("segment", str(nan_ct), "--points", str(prompts_sm), "-c", str(random_checkpoint), "-o", str(out))
    _expect_clean_failure(r, "nan_ct.nii.gz", out)
    assert "image data: " in r.stderr and "NaN or infinite" in r.stderr
    # --coords is for typed clicks: with a prompt file it would be silently ignored
    r = bosam("segment", str(ct), "--points", str(prompts_sm), "--coords", "LPS", "-c", str(random_checkpoint), "-o", str(out))
    _expect_clean_failure(r, "--coords LPS", out)
    assert "coordinate_system" in r.stderr
    # a point outside the volume
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"coordinate_system": "voxel", "objects": [{"label": 1, "clicks": [{"xyz": [500, 1, 1]}]}]}))
    r = bosam("segment", str(ct), "--points", str(outside), "-c", str(random_checkpoint), "-o", str(out))
    _expect_clean_failure(r, "outside.json", out)
    # unknown coordinate system
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"coordinate_system": "XYZ", "objects": [{"label": 1, "clicks": [{"xyz": [1, 1, 1]}]}]}))
    r = bosam("segment", str(ct), "--points", str(unknown), "-c", str(random_checkpoint), "-o", str(out))
    _expect_clean_failure(r, "unknown.json", out)
    # wrong checkpoint: weights of no known model
    sd = build_preset("tiny").state_dict()
    sd["image_encoder.pos_embed"] = torch.zeros(1, 4, 4, 4, 192)
    wrong = tmp_path / "wrong.pth"
    torch.save(sd, wrong)
    r = bosam("segment", str(ct), "--points", str(prompts_sm), "-c", str(wrong), "-o", str(out))
    _expect_clean_failure(r, "wrong.pth", out)
    # not a checkpoint at all
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    r = bosam("segment", str(ct), "--points", str(prompts_sm), "-c", str(text), "-o", str(out))
    _expect_clean_failure(r, "notes.pth", out)
    # unknown --islands rule
    r = bosam("segment", str(ct), "--points", str(prompts_sm), "-c", str(random_checkpoint), "-o", str(out),
              "--islands", "largest")
    _expect_clean_failure(r, "--islands", out)
    # unknown --refine rule
    r = bosam("segment", str(ct), "--points", str(prompts_sm), "-c", str(random_checkpoint), "-o", str(out),
              "--refine", "threshold")
    _expect_clean_failure(r, "--refine", out)
    # the label map's path is taken by a folder: one line naming it, nothing else written
    taken = tmp_path / "taken" / "x.nii.gz"
    taken.mkdir(parents=True)
    r = bosam("segment", str(ct), "--points", str(prompts_sm), "-c", str(random_checkpoint), "-o", str(taken),
              "--max-windows", "1")
    assert r.returncode == 2 and r.stderr.strip() == f"error: {taken}: is a folder, where bosam would write its label map file"
    assert [p.name for p in taken.parent.iterdir()] == ["x.nii.gz"] and not any(taken.iterdir())


def test_outputs_never_overwrite_inputs_nor_each_other(tmp_path, random_checkpoint, prompts_sm):
    """-o pointing at the CT's own file or folder, a manifest that would replace the prompt
    file, a batch whose cases would share a label map: refused before any work, inputs intact.
    A batch without -o writes <case>_bosam.nii.gz beside nothing it read; names with [brackets]
    print literally."""
    ct = tmp_path / "cases" / "example_ct_sm.nii.gz"
    ct.parent.mkdir()
    shutil.copy(need(CT_SM), ct)
    prompts = json.loads(prompts_sm.read_text())
    prompts["objects"][0]["name"] = "L1 [/bold] [left]"
    (tmp_path / "cases" / "example_ct_sm.json").write_text(json.dumps(prompts))
    before = {p.name: p.read_bytes() for p in ct.parent.iterdir()}
    options = ["-c", str(random_checkpoint), "--engine", "torch", "--max-windows", "1"]
    for out in (ct.parent, ct):  # the README's "-o out/" aimed at the CT's folder, and the CT itself
        r = bosam("segment", str(ct), "--points", str(ct.with_name("example_ct_sm.json")), "-o", str(out), *options)
        assert r.returncode == 2 and "would overwrite the input" in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in ct.parent.iterdir()} == before
    # a batch: two CTs of one case name, and a label map path for several CTs
    shutil.copy(ct, ct.with_name("example_ct_sm.nii"))
    r = bosam("segment", str(ct.parent), "--points", str(ct.parent), "-o", str(tmp_path / "o"), *options)
    assert r.returncode == 2 and "would write this label map" in r.stderr and not (tmp_path / "o").exists()
    ct.with_name("example_ct_sm.nii").unlink()
    # no -o, run in the CTs' folder: <case>_bosam.nii.gz, the CT and prompts untouched
    r = bosam("segment", ".", "--points", ".", *options, cwd=ct.parent)
    assert r.returncode == 0, r.stderr
    assert (ct.parent / "example_ct_sm_bosam.nii.gz").exists() and ct.read_bytes() == before[ct.name]
    r = bosam("segment", ".", "--points", ".", *options, cwd=ct.parent)  # again: its outputs are no CTs
    assert r.returncode == 0 and "1 of 1 cases done" in r.stdout, r.stdout + r.stderr
    # a manifest whose first case would write over the second case's CT
    shutil.copy(ct, tmp_path / "b.nii.gz")
    (tmp_path / "cases.csv").write_text(f"ct,points,out\n{ct},{ct.with_name('example_ct_sm.json')},b.nii.gz\n"
                                        f"b.nii.gz,{ct.with_name('example_ct_sm.json')},o2\n")
    r = bosam("segment", str(tmp_path / "cases.csv"), *options)
    assert r.returncode == 2 and "would overwrite an input of the batch" in r.stderr, r.stderr
    assert (tmp_path / "b.nii.gz").read_bytes() == before[ct.name]
    r = bosam("segment", str(ct), "--points", str(ct.with_name("example_ct_sm.json")), "-o", str(tmp_path / "one"),
              *options)
    assert r.returncode == 0 and "[/bold]" in r.stdout and "[left]" in r.stdout, r.stdout + r.stderr  # not markup


def test_batch_outputs_through_links_or_sharing_a_manifest_are_refused_before_any_work(tmp_path):
    """An 'out' through a linked folder onto another case's CT (it overwrote the CT, exit 0),
    two 'out's that are one file through a link (the first result lost), x.nii beside x.nii.gz
    (one x.json for both), and one CT twice into one output: refused before any work. Cells
    with spaces around them, as spreadsheets leave them, are read."""
    from bosam_cli.errors import BosamError
    from bosam_cli.segment import _refuse_shared_outputs, find_cases

    (tmp_path / "cts").mkdir()
    (tmp_path / "res").mkdir()
    for name in ("a", "b"):
        (tmp_path / "cts" / f"{name}.nii.gz").write_bytes(b"x")
        (tmp_path / f"{name}.json").write_text("{}")
    (tmp_path / "ctlink").symlink_to(tmp_path / "cts")
    (tmp_path / "reslink").symlink_to(tmp_path / "res")
    rows = {
        "onto_ct": ["cts/a.nii.gz,a.json,ctlink/b.nii.gz", "cts/b.nii.gz,b.json,o_b.nii.gz"],
        "one_file": ["cts/a.nii.gz,a.json,res/z.nii.gz", "cts/b.nii.gz,b.json,reslink/z.nii.gz"],
        "one_manifest": ["cts/a.nii.gz,a.json,x.nii", "cts/b.nii.gz,b.json,x.nii.gz"],
        "same_ct_twice": ["cts/a.nii.gz,a.json,r1/", "cts/a.nii.gz,b.json,r1/"],
    }
    messages = {
        "onto_ct": f"{tmp_path / 'ctlink' / 'b.nii.gz'}: the label map of {tmp_path / 'cts' / 'a.nii.gz'} would "
                   f"overwrite an input of the batch (of {tmp_path / 'cts' / 'b.nii.gz'})",
        "one_file": f"{tmp_path / 'reslink' / 'z.nii.gz'}: both {tmp_path / 'cts' / 'a.nii.gz'} and "
                    f"{tmp_path / 'cts' / 'b.nii.gz'} would write this label map",
        "one_manifest": f"{tmp_path / 'x.json'}: both {tmp_path / 'cts' / 'a.nii.gz'} and "
                        f"{tmp_path / 'cts' / 'b.nii.gz'} would write this manifest",
        "same_ct_twice": "would write this label map",
    }
    for name, lines in rows.items():
        csv_file = tmp_path / f"{name}.csv"
        csv_file.write_text("ct,points,out\n" + "\n".join(lines) + "\n")
        with pytest.raises(BosamError, match=re.escape(messages[name])):
            _refuse_shared_outputs(find_cases(csv_file, None), None)
    (tmp_path / "spaces.csv").write_text("ct, points ,out\n cts/a.nii.gz , a.json , r2/ \n")
    (case,) = find_cases(tmp_path / "spaces.csv", None)
    assert (case.ct, case.points, case.out) == (tmp_path / "cts" / "a.nii.gz", tmp_path / "a.json", tmp_path / "r2")
    _refuse_shared_outputs([case], None)


def test_batch_manifests_and_engine_options_fail_in_one_line(tmp_path):
    from bosam_cli.errors import BosamError
    from bosam_cli.segment import find_cases

    (tmp_path / "five.json").write_text("5")
    with pytest.raises(BosamError, match=r"five\.json: cases: expected a list of rows"):
        find_cases(tmp_path / "five.json", None)
    (tmp_path / "prompt.json").write_text(json.dumps({"coordinate_system": "RAS", "objects": []}))
    with pytest.raises(BosamError, match=r"prompt\.json: cases: missing; .*a prompt file\? give the CT first"):
        find_cases(tmp_path / "prompt.json", None)
    # Excel's "CSV UTF-8" (a byte-order mark) with spaces after the commas
    (tmp_path / "cases.csv").write_bytes("\ufeffct, points\na.nii.gz, a.json\n".encode("utf-8"))
    (case,) = find_cases(tmp_path / "cases.csv", None)
    assert case.ct == tmp_path / "a.nii.gz"
    (tmp_path / "bad.csv").write_text("image,prompts\na.nii.gz,a.json\n")
    with pytest.raises(BosamError, match=r"row 1 needs 'ct' and 'points'; found 'image', 'prompts'"):
        find_cases(tmp_path / "bad.csv", None)
    (tmp_path / "open.csv").write_text('ct,points\n"a.nii.gz,a.json\n')  # an unterminated quote: one long 'ct'
    with pytest.raises(BosamError, match=r"row 1 needs 'ct' and 'points'; 'points' is empty$"):
        find_cases(tmp_path / "open.csv", None)
    with pytest.raises(BosamError, match=r"a batch \(a folder of CTs\) needs --points"):
        find_cases(tmp_path, None)
    ct = need(CT_SM)
    for flag, value, message in (("--device", "banana", "--device: 'banana' is not a device"),
                                 ("--threads", "-1", "--threads: must be 1 .. 1024, got -1")):
        r = bosam("segment", str(ct), "--points", str(tmp_path / "prompt.json"), flag, value, "-o", str(tmp_path / "o"))
        assert r.returncode == 2 and r.stderr.strip() == f"error: {message}" + (" (cpu, cuda, cuda:1, ...)" if value == "banana" else "")
    assert not (tmp_path / "o").exists()
    if not torch.cuda.is_available():  # the index asked for is named (it was dropped)
        r = bosam("segment", str(ct), "--points", str(tmp_path / "prompt.json"), "--engine", "torch",
                  "--device", "cuda:9", "-o", str(tmp_path / "o"))
        assert r.returncode == 2 and "'cuda:9' asked for, but torch sees no CUDA GPU here" in r.stderr, r.stderr
    # 'tensorrt' is ONNX Runtime's TensorRT provider, not a torch device: not refused as one
    r = bosam("segment", str(ct), "--points", str(tmp_path / "prompt.json"), "--engine", "onnxruntime",
              "--device", "tensorrt", "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "is not a device" not in r.stderr


def test_outputs_are_named_after_the_ct(tmp_path, monkeypatch):
    """A DICOM folder given as '.', or one file of a series, names the outputs sensibly."""
    from bosam_cli.segment import output_paths

    series = tmp_path / "CT_series"
    series.mkdir()
    monkeypatch.chdir(series)
    assert output_paths(Path("."), "out")["label_map"] == Path("out") / "CT_series.nii.gz"
    (series / "sub").mkdir()
    monkeypatch.chdir(series / "sub")
    assert output_paths(Path(".."), "out")["label_map"] == Path("out") / "CT_series.nii.gz"
    monkeypatch.chdir(series)
    assert output_paths(Path("IM0001.dcm"), "out")["manifest"] == Path("out") / "IM0001.json"
    assert output_paths(Path("ct.nii.gz"), None)["label_map"] == series / "ct_bosam.nii.gz"


def test_batch_reports_and_skips_failing_cases(tmp_path, random_checkpoint, prompts_sm):
    ct = need(CT_SM)
    cts, pts, out = tmp_path / "cts", tmp_path / "pts", tmp_path / "out"
    cts.mkdir(), pts.mkdir()
    shutil.copy(ct, cts / "case_a.nii.gz")
    shutil.copy(ct, cts / "case_b.nii.gz")
    shutil.copy(prompts_sm, pts / "case_a.json")  # case_b has no prompt file
    r = bosam("segment", str(cts), "--points", str(pts), "-c", str(random_checkpoint), "--engine", "torch",
              "-o", str(out), "--max-windows", "1", "--json")
    assert r.returncode == 1
    rows = json.loads(r.stdout)
    assert [x["ok"] for x in rows] == [True, False]
    assert "case_b" in rows[1]["error"]
    assert (out / "case_a.nii.gz").exists() and not (out / "case_b.nii.gz").exists()
    # the same through a CSV manifest
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"ct,points,out\n{cts / 'case_a.nii.gz'},{pts / 'case_a.json'},{tmp_path / 'm_out'}\n")
    r = bosam("segment", str(manifest), "-c", str(random_checkpoint), "--engine", "torch", "--max-windows", "1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m_out" / "case_a.nii.gz").exists()


def test_metaimage_ct_segments_like_its_nifti(tmp_path, random_checkpoint, prompts_sm):
    """The real CT saved as an ITK MetaImage (.mha, LPS geometry) gives the label map that the
    NIfTI gives, on the same grid, written as NIfTI."""
    sitk = pytest.importorskip("SimpleITK")
    ct = need(CT_SM)
    src = nib.load(str(ct))
    flip = np.diag([-1.0, -1.0, 1.0])
    lps = flip @ src.affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asanyarray(src.dataobj).transpose(2, 1, 0)))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((lps / spacing).ravel().tolist())
    img.SetOrigin((flip @ src.affine[:3, 3]).tolist())
    mha = tmp_path / "example_ct_sm.mha"
    sitk.WriteImage(img, str(mha))
    outs = []
    for path, out in ((ct, tmp_path / "from_nii"), (mha, tmp_path / "from_mha")):
        r = bosam("segment", str(path), "--points", str(prompts_sm), "-c", str(random_checkpoint), "--engine", "torch",
                  "-o", str(out), "--max-windows", "1")
        assert r.returncode == 0, r.stderr
        outs.append(nib.load(str(out / "example_ct_sm.nii.gz")))
    a, b = outs
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(b.dataobj), np.asanyarray(a.dataobj))
    assert np.asanyarray(a.dataobj).any()


def test_interactive_session_is_scriptable(tmp_path, random_checkpoint):
    ct = tmp_path / "ct.nii.gz"
    shutil.copy(need(CT_SM), ct)  # a copy: the session is asked to save over it (refused)
    (tmp_path / "taken.nii.gz").mkdir()  # a save target that is a folder
    seg = np.asanyarray(nib.load(need(SEG_SM)).dataobj)
    idx = np.argwhere(seg == 31)
    a, b = idx[len(idx) // 2], idx[len(idx) // 3]
    script = "\n".join([
        "object 31 vertebrae_L1",
        f"- {b[0]} {b[1]} {b[2]}",  # refused: an object starts with a positive click
        f"+ {a[0]} {a[1]} {a[2]}",
        f"- {b[0]} {b[1]} {b[2]}",
        "undo",
        f"- {b[0]} {b[1]} {b[2] + 0.5}",
        "object 0 background",  # refused: 0 is background
        "object 70000",  # refused: above 65535
        "object x",  # refused: not a number (Python's own text was shown)
        "object 3_1",  # refused: int() reads it as 31
        f"+ {a[0]} 1_0 {a[2]}",  # refused: float() reads it as 10
        f"+ {a[0]} nan {a[2]}",
        "list",
        "bogus",
        f"save {tmp_path / 'taken.nii.gz'}",  # refused, and the session goes on
        f"save {ct}",  # refused: that is the CT
        f"save {tmp_path / 'snap.nii.gz'}",
        "quit",
    ])
    out = tmp_path / "inter.nii.gz"
    options = ["-c", str(random_checkpoint), "--engine", "torch", "--max-windows", "1"]
    r = bosam("segment", str(ct), "--interactive", "--coords", "voxel", "-o", str(out), *options, stdin=script)
    assert r.returncode == 1  # failing commands (the refused ones and 'bogus')
    lines = r.stdout.splitlines()
    clicks = [l for l in lines if "decoder" in l and "ms" in l]
    assert len(clicks) == 3
    assert "encoder" in clicks[0] and "no new window" in clicks[1]
    assert any(l.startswith("undone") for l in lines)
    assert any("unknown command" in l for l in lines)
    assert sum("error:" in l for l in lines) == 10
    assert "error: 'object' needs a label number, got 'x'" in lines
    assert "error: 'object' needs a label number, got '3_1'" in lines
    assert "error: '+' needs three coordinates, got '1_0'" in lines and "error: '+' needs three coordinates, got 'nan'" in lines
    assert any(f"{tmp_path / 'taken.nii.gz'}: is a folder" in l for l in lines)
    assert any(f"{ct}: would overwrite the input {ct}" in l for l in lines)
    assert nib.load(str(ct)).get_data_dtype() == np.int16  # the CT is untouched
    assert any("first click of an object must be positive" in l for l in lines)
    assert any("1..65535 (0 is background), not 0" in l for l in lines)
    assert out.exists() and (tmp_path / "snap.nii.gz").exists() and (tmp_path / "snap_points.json").exists()
    assert nib.load(str(out)).shape == nib.load(str(ct)).shape
    # the clicks left after undo, saved beside the label map, replay to the same label map
    points = tmp_path / "inter_points.json"
    doc = json.loads(points.read_text())
    assert [(o["label"], o["name"], [c["positive"] for c in o["clicks"]]) for o in doc["objects"]] == [
        (31, "vertebrae_L1", [True, False])]
    jsonschema = pytest.importorskip("jsonschema")
    from bosam_cli.prompts import schema_path

    jsonschema.validate(doc, json.loads(schema_path().read_text()))
    replay = tmp_path / "replay.nii.gz"
    r = bosam("segment", str(ct), "--points", str(points), "-o", str(replay), *options)
    assert r.returncode == 0, r.stderr
    inter_map = np.asanyarray(nib.load(str(out)).dataobj)
    assert inter_map.any()
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(replay)).dataobj), inter_map)
    # the documented loop: replay into the session's own output, and go on with the session
    # from its own prompt file (read once at the start, then rewritten)
    r = bosam("segment", str(ct), "--points", str(points), "-o", str(out), *options)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(np.asanyarray(nib.load(str(out)).dataobj), inter_map)
    r = bosam("segment", str(ct), "--interactive", "--points", str(points), "-o", str(out), *options, stdin="quit\n")
    assert r.returncode == 0 and "loaded" in r.stdout, r.stdout + r.stderr
    assert json.loads(points.read_text())["objects"] == doc["objects"]


def test_interactive_save_into_a_folder_and_a_click_whose_autosave_fails(tmp_path, monkeypatch):
    """'save DIR' writes DIR/<ct>.nii.gz as '-o DIR' does (it was refused with a format message).
    When the rewrite after a click fails (a full or read-only disk), the click still stands: the
    session says it was applied but not saved, instead of an "error" that made users type it again."""
    import io

    from fake_engines import SphereEngine

    import bosam_cli.segment as segment_mod
    from bosam_cli.segment import SegmentOptions, interactive

    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((40, 40, 40), -1000, np.int16), np.diag([2.0, 2.0, 2.0, 1.0])), str(ct))
    real_write = segment_mod.write_label_map
    calls = []

    def flaky(labels, like, path, names=None):  # the first rewrite (after the first click) fails
        calls.append(path)
        if len(calls) == 1:
            raise OSError(28, "No space left on device", str(path))
        return real_write(labels, like, path, names)

    monkeypatch.setattr(segment_mod, "write_label_map", flaky)
    out = io.StringIO()
    script = f"+ 20 20 20\nlist\nsave {tmp_path / 'snaps'}/\nquit\n"
    failures = interactive(ct, tmp_path / "out.nii.gz", SphereEngine(radius_vox=4.0), SegmentOptions(refine="none"),
                           "voxel", stdin=io.StringIO(script), stdout=out)
    lines = out.getvalue().splitlines()
    click = next(line for line in lines if line.startswith("object 1 click +"))
    assert click.endswith(f"; applied, but NOT SAVED ({tmp_path / 'out.nii.gz'}: No space left on device); "
                          "'save PATH' writes elsewhere")
    assert "object 1 object_1: 1 clicks" in out.getvalue() and failures == 1
    assert f"saved {tmp_path / 'snaps'}" in out.getvalue() and (tmp_path / "snaps" / "ct.nii.gz").is_file()
    assert (tmp_path / "snaps" / "ct_points.json").is_file() and (tmp_path / "out.nii.gz").is_file()

    import tempfile

    from bosam_cli.errors import BosamError

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)  # found before the first click, not at its autosave
    with pytest.raises(BosamError, match=r"ro\.nii\.gz: cannot write there \(Read-only file system\)$"):
        interactive(ct, tmp_path / "ro.nii.gz", SphereEngine(radius_vox=4.0), SegmentOptions(refine="none"), "voxel",
                    stdin=io.StringIO("+ 20 20 20\n"), stdout=io.StringIO())


def test_manifest_warns_about_empty_masks_and_says_why(tmp_path):
    from fake_engines import SphereEngine

    from bosam_cli.segment import SegmentOptions, segment_file

    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((40, 40, 40), -1000, np.int16), np.diag([2.0, 2.0, 2.0, 1.0])), str(ct))
    click = {"xyz": [20, 20, 20], "positive": True}
    prompts = tmp_path / "ct.json"
    prompts.write_text(json.dumps({"coordinate_system": "voxel", "objects": [
        {"label": 1, "name": "first", "clicks": [click]},
        {"label": 2, "name": "same_place", "clicks": [click]},  # same logits: the tie goes to the first
        {"label": 3, "name": "erased", "clicks": [click, {**click, "positive": False}]},
    ]}))
    m = segment_file(ct, prompts, tmp_path / "out" / "ct.nii.gz", SphereEngine(radius_vox=4.0),
                     SegmentOptions(refine="none"))
    voxels = {o["label"]: o["voxels"] for o in m["objects"]}
    assert voxels[1] > 0 and voxels[2] == voxels[3] == 0
    assert m["warnings"] == [
        "object 2 (same_place): empty mask: every voxel went to other objects by the overlap rule",
        "object 3 (erased): empty mask: the model found nothing at its clicks",
    ]
    # the manifest's dtype is the file's: a label 300 whose mask came out empty leaves a uint8 map
    prompts.write_text(json.dumps({"coordinate_system": "voxel", "objects": [
        {"label": 1, "name": "first", "clicks": [click]},
        {"label": 300, "name": "erased", "clicks": [click, {**click, "positive": False}]},
    ]}))
    m = segment_file(ct, prompts, tmp_path / "out2" / "ct.nii.gz", SphereEngine(radius_vox=4.0),
                     SegmentOptions(refine="none"))
    assert m["output"]["dtype"] == "uint8" == str(nib.load(str(tmp_path / "out2" / "ct.nii.gz")).get_data_dtype())
    assert m["model_window"]["click_memory"] == "newest"


def test_a_sheared_non_nifti_ct_warns_when_its_label_map_is_nifti(tmp_path):
    """A gantry-tilted grid (sheared affine) read from NRRD: a .nii.gz label map holds the
    shear only in its sform, which ITK-based viewers do not read; the manifest says so and
    names the formats that hold it. A .nrrd label map, or an orthogonal grid, gives no warning."""
    nrrd = pytest.importorskip("nrrd")
    from fake_engines import SphereEngine

    from bosam_cli.segment import SegmentOptions, segment_file

    tilt = np.deg2rad(15.0)
    directions = np.array([[0.8, 0, 0], [0, 0.8, 0], [0, 2.5 * np.sin(tilt), 2.5 * np.cos(tilt)]])  # rows: axes (LPS)
    arr = np.full((40, 40, 30), -1000, np.int16)
    arr[10:30, 10:30, 5:25] = 600
    click = {"xyz": [20, 20, 15], "positive": True}
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"coordinate_system": "voxel", "objects": [{"label": 1, "clicks": [click]}]}))
    for name, dirs in (("tilted", directions), ("straight", np.diag([0.8, 0.8, 2.5]))):
        ct = tmp_path / f"{name}.nrrd"
        nrrd.write(str(ct), arr, {"space": "left-posterior-superior", "space directions": dirs,
                                  "space origin": np.zeros(3)})
        for ending in (".nii.gz", ".nrrd"):
            m = segment_file(ct, prompts, tmp_path / f"{name}_out{ending}", SphereEngine(radius_vox=4.0),
                             SegmentOptions(refine="none"))
            sheared = [w for w in m["warnings"] if "sheared" in w]
            if name == "tilted" and ending == ".nii.gz":
                assert len(sheared) == 1 and "ITK-based viewers" in sheared[0] and ".nrrd, .mha or .dcm" in sheared[0]
                assert float(sheared[0].split("up to ")[1].split(" mm")[0]) > 5.0
            else:
                assert sheared == [], (name, ending)


def test_a_failure_part_way_through_the_writes_keeps_the_previous_run(tmp_path, monkeypatch):
    """A first run writes its label map and manifest. A second run into the same place writes
    its label map and per-object masks, then the disk fills while the overlay is written: the
    first run's files are still there byte for byte, the folder the second run made for its
    masks is gone, no temporary file is left, and the error names the overlay file."""
    from fake_engines import SphereEngine

    import bosam_cli.report as report
    from bosam_cli.atomic import atomic_path
    from bosam_cli.segment import SegmentOptions, segment_file

    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((40, 40, 40), -1000, np.int16), np.diag([2.0, 2.0, 2.0, 1.0])), str(ct))
    prompts = tmp_path / "ct.json"
    prompts.write_text(json.dumps({"coordinate_system": "voxel", "objects": [
        {"label": 1, "name": "ball", "clicks": [{"xyz": [20, 20, 20]}]}]}))
    out = tmp_path / "out"
    segment_file(ct, prompts, out / "ct.nii.gz", SphereEngine(radius_vox=4.0), SegmentOptions(refine="none"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["ct.json", "ct.nii.gz"]

    def full_disk(path, data):  # the real atomic write, whose write() fails part-way
        with atomic_path(path) as tmp:
            tmp.write_bytes(data[:100])
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "atomic_write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left") as err:
        segment_file(ct, prompts, out / "ct.nii.gz", SphereEngine(radius_vox=6.0),
                     SegmentOptions(refine="none", per_object=True, overlay=True))
    assert err.value.filename == str(out / "ct_overlay.png")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_full_disk_is_one_line_naming_the_file_and_the_demo_leaves_no_folder(tmp_path):
    """Through the CLI: the demo's folder is created by its first file; when a later write
    fails (the disk fills), the error line names that file and no folder is left behind."""
    script = (
        "import sys, bosam_cli.report as r\n"
        "from bosam_cli.atomic import atomic_path\n"
        "def full(path, data):\n"
        "    with atomic_path(path) as tmp:\n"
        "        tmp.write_bytes(data[:10]); raise OSError(28, 'No space left on device')\n"
        "r.atomic_write_bytes = full\n"
        "from bosam_cli.cli import main\n"
        "sys.argv = ['bosam'] + sys.argv[1:]\n"
        "main()\n"
    )
    out = tmp_path / "new" / "demo"
    r = subprocess.run([sys.executable, "-c", script, "demo", "-o", str(out), "--engine", "torch", "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {out / 'segmentation_overlay.png'}: No space left on device"]
    assert not (tmp_path / "new").exists()


def test_a_rerun_leaves_no_stale_masks_or_meshes_of_the_earlier_run(tmp_path):
    """Two objects with --per-object --mesh, then one object, then neither flag, into one
    output: the masks and meshes the previous manifest listed and this run does not write again
    go (they had stayed, listed nowhere), and the manifest says which; the user's own files
    there stay, even named like a mask, and a linked folder is not followed."""
    from fake_engines import SphereEngine

    from bosam_cli.segment import SegmentOptions, segment_file

    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((40, 40, 40), -1000, np.int16), np.diag([2.0, 2.0, 2.0, 1.0])), str(ct))
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"coordinate_system": "voxel", "objects": [
        {"label": 1, "name": "b1", "clicks": [{"xyz": [10, 10, 10]}]},
        {"label": 2, "name": "b2", "clicks": [{"xyz": [30, 30, 30]}]}]}))
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"coordinate_system": "voxel", "objects": [
        {"label": 1, "name": "b1", "clicks": [{"xyz": [10, 10, 10]}]}]}))
    out = tmp_path / "o.nii.gz"

    def listed(m):
        return sorted(Path(o[k]).name for o in m["objects"] for k in ("mask_file", "mesh_file") if k in o)

    def present():
        return sorted(p.name for d in ("o_objects", "o_meshes") if (tmp_path / d).is_dir() for p in (tmp_path / d).iterdir())

    m = segment_file(ct, two, out, SphereEngine(radius_vox=3.0), SegmentOptions(refine="none", per_object=True, mesh=True))
    assert present() == listed(m) == ["1_b1.nii.gz", "1_b1.stl", "2_b2.nii.gz", "2_b2.stl"]
    mine = ["1_b1_corrected.nii.gz", "notes.txt"]  # the user's own files there, one named like a mask
    for name in mine:
        (tmp_path / "o_objects" / name).write_text("mine")
    m = segment_file(ct, one, out, SphereEngine(radius_vox=3.0), SegmentOptions(refine="none", per_object=True, mesh=True))
    assert present() == sorted(listed(m) + mine) and listed(m) == ["1_b1.nii.gz", "1_b1.stl"]
    assert sorted(Path(f).name for f in m["output"]["removed_from_previous_run"]) == ["2_b2.nii.gz", "2_b2.stl"]
    m = segment_file(ct, one, out, SphereEngine(radius_vox=3.0), SegmentOptions(refine="none"))
    assert listed(m) == [] and present() == mine and not (tmp_path / "o_meshes").exists()
    # a linked masks folder is not followed: the files behind it stay
    (tmp_path / "archive").mkdir()
    for f in (tmp_path / "o_objects").iterdir():
        f.unlink()
    (tmp_path / "o_objects").rmdir()
    (tmp_path / "o_objects").symlink_to(tmp_path / "archive")
    segment_file(ct, two, out, SphereEngine(radius_vox=3.0), SegmentOptions(refine="none", per_object=True))
    m = segment_file(ct, one, out, SphereEngine(radius_vox=3.0), SegmentOptions(refine="none"))
    assert m["output"]["removed_from_previous_run"] == []
    assert sorted(f.name for f in (tmp_path / "archive").iterdir()) == ["1_b1.nii.gz", "2_b2.nii.gz"]


def test_label_map_as_metaimage_with_per_object_masks(tmp_path, random_checkpoint):
    """``-o x.mha`` (or .nrrd): the label map and the per-object masks in that format, on the
    CT's grid; a detached .mhd header is refused up front with nothing written."""
    pytest.importorskip("SimpleITK")
    from bosam_cli.volume import read_volume

    ct = need(CT_SM)
    seg = np.asanyarray(nib.load(need(SEG_SM)).dataobj)
    a = np.argwhere(seg == 31)[len(np.argwhere(seg == 31)) // 2]
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps({"coordinate_system": "voxel", "objects": [
        {"label": 31, "name": "vertebrae_L1", "clicks": [{"xyz": [int(v) for v in a]}]}]}))
    options = ["-c", str(random_checkpoint), "--engine", "torch", "--max-windows", "1"]
    r = bosam("segment", str(ct), "--points", str(prompts), "-o", str(tmp_path / "bad" / "x.mhd"), *options)
    assert r.returncode == 2 and "x.mhd: a label map is written as" in r.stderr and not (tmp_path / "bad").exists()
    nii, mha = tmp_path / "a" / "seg.nii.gz", tmp_path / "b" / "seg.mha"
    for out in (nii, mha):
        r = bosam("segment", str(ct), "--points", str(prompts), "-o", str(out), "--per-object", *options)
        assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "b" / "seg.json").read_text())
    assert manifest["output"]["label_map"] == str(mha)
    mask_file = Path(manifest["objects"][0]["mask_file"])
    assert mask_file.name == "31_vertebrae_L1.mha" and mask_file.exists()
    src, got, ref = read_volume(ct), read_volume(mha), read_volume(nii)
    np.testing.assert_allclose(got.affine, src.affine, atol=1e-4)
    np.testing.assert_array_equal(got.array, ref.array)
    assert int(np.count_nonzero(read_volume(mask_file).array)) == manifest["objects"][0]["voxels"]


def test_bad_numbers_and_names_are_one_line_errors_before_any_work(tmp_path):
    """--spacing nan/inf/0, --max-windows 0, --threads far past the machine, an unknown
    --preset, a file where the mesh folder goes (found only when writing, it had cost the
    previous run's label map): one line each, exit 2, nothing written."""
    ct = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((24, 24, 24), 40, np.int16), np.eye(4)), str(ct))
    pts = tmp_path / "p.json"
    pts.write_text(json.dumps({"coordinate_system": "voxel", "objects": [{"label": 1, "clicks": [{"xyz": [12, 12, 12]}]}]}))
    out = tmp_path / "out" / "seg.nii.gz"
    cases = [(["--spacing", "nan"], "--spacing must be a window spacing in (0, 50] mm, got nan"),
             (["--spacing", "0"], "--spacing must be a window spacing in (0, 50] mm, got 0.0"),
             (["--max-windows", "0"], "--max-windows must be 1 or more, got 0"),
             (["--threads", "100000"], "--threads: must be 1 .. 1024, got 100000")]
    for flags, message in cases:
        r = bosam("segment", str(ct), "-p", str(pts), "-o", str(out), "--engine", "torch", *flags)
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {message}"], (flags, r.stderr)
        assert not out.parent.exists()
    out.parent.mkdir()
    (out.parent / "seg_meshes").write_text("a file")
    r = bosam("segment", str(ct), "-p", str(pts), "-o", str(out), "--engine", "torch", "--mesh")
    assert r.returncode == 2 and "seg_meshes: is a file, where bosam would make its meshes folder" in r.stderr
    assert not out.exists()
    endings = ".nii.gz, .nii, .nrrd, .mha, .dcm"
    for target, what in ((tmp_path / "seg.txt", "a file name"), (pts, "a file")):  # not made a folder 'seg.txt'
        r = bosam("segment", str(ct), "-p", str(pts), "-o", str(target), "--engine", "torch")
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            f"error: {target}: is {what}, not a label map or a folder; -o takes a label map path ({endings}) or a folder"]
    assert not (tmp_path / "seg.txt").exists() and pts.is_file()
    (tmp_path / "x.json").mkdir()  # an existing folder is a folder, whatever its name
    r = bosam("segment", str(ct), "-p", str(pts), "-o", str(tmp_path / "x.json"), "--engine", "torch", "--max-windows", "1")
    assert r.returncode == 0 and (tmp_path / "x.json" / "ct.nii.gz").is_file(), r.stderr
    r = bosam("export", "--preset", "foo", "-o", str(tmp_path / "eng"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --preset: unknown preset 'foo'; choose one of sam-med3d, tiny, vit-b-256"]
