"""`bosam points check` through the real CLI (subprocess) on the shared TotalSegmentator CT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CT_SM = DATA / "totalsegmentator" / "example_ct_sm.nii.gz"
SEG = DATA / "totalsegmentator" / "example_seg.nii.gz"
pytestmark = pytest.mark.skipif(not CT_SM.exists(), reason=f"shared test data not found: {CT_SM}")

KEYS = ["object", "label", "click", "positive", "ras", "voxel", "hu", "inside"]


def bosam(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bosam_cli", *map(str, args)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[1])


def reference():
    """The CT as nibabel sees it: the independent truth for voxel, world and HU."""
    img = nib.load(str(CT_SM))
    return np.asanyarray(img.dataobj), img.affine


def l1_voxel() -> list[int]:
    """A voxel inside vertebra L1 (label 31) of the TotalSegmentator segmentation, when present."""
    if SEG.exists():
        idx = np.argwhere(np.asanyarray(nib.load(str(SEG)).dataobj) == 31)
        return idx[len(idx) // 2].tolist()
    return [61, 60, 15]


def write(tmp_path: Path, obj, name="prompts.json") -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def test_points_check_json(tmp_path):
    hu, affine = reference()
    ijk_l1 = l1_voxel()
    ijk_frac = [10.4, 20.6, 3.2]  # nearest voxel (10, 21, 3)
    prompts = write(tmp_path, {"coordinate_system": "voxel", "objects": [
        {"label": 31, "name": "vertebrae_L1", "clicks": [{"xyz": ijk_l1}, {"xyz": ijk_frac, "positive": False}]},
        {"label": 98, "clicks": [{"xyz": [61, 50, 15]}, {"xyz": [130.0, 50, 15]}]},  # second click outside (shape 122)
    ]})
    r = bosam("points", "check", CT_SM, prompts, "--json")
    assert r.returncode == 1, r.stderr  # the report, and an exit code a script can gate on: a click is outside
    recs = json.loads(r.stdout)
    assert [list(rec) for rec in recs] == [KEYS] * 4
    assert [(rec["object"], rec["label"], rec["click"], rec["positive"]) for rec in recs] == [
        ("vertebrae_L1", 31, 0, True), ("vertebrae_L1", 31, 1, False), ("object_98", 98, 0, True), ("object_98", 98, 1, True)]
    for rec, ijk in zip(recs, [ijk_l1, ijk_frac, [61, 50, 15], [130, 50, 15]]):
        np.testing.assert_allclose(rec["voxel"], ijk, atol=1e-3)
        np.testing.assert_allclose(rec["ras"], (affine @ [*ijk, 1])[:3], atol=1e-3)
    assert [rec["inside"] for rec in recs] == [True, True, True, False]
    assert recs[0]["hu"] == int(hu[tuple(ijk_l1)])
    assert recs[1]["hu"] == int(hu[10, 21, 3])
    assert recs[2]["hu"] == int(hu[61, 50, 15])
    assert recs[3]["hu"] is None
    if SEG.exists():
        assert recs[0]["hu"] > 100  # a click in L1 lands on bone


def test_points_check_lps_world_matches_voxel(tmp_path):
    _, affine = reference()
    ijk = np.array([40.0, 70.0, 12.0])
    lps = (affine @ [*ijk, 1])[:3] * [-1, -1, 1]
    prompts = write(tmp_path, {"coordinate_system": "LPS", "objects": [{"label": 1, "clicks": [{"xyz": lps.tolist()}]}]})
    r = bosam("points", "check", CT_SM, prompts, "--json")
    assert r.returncode == 0, r.stderr
    (rec,) = json.loads(r.stdout)
    np.testing.assert_allclose(rec["voxel"], ijk, atol=1e-3)
    assert rec["inside"] is True


def test_points_check_table_for_a_slicer_file(tmp_path):
    _, affine = reference()
    lps = ((affine @ [61, 50, 15, 1])[:3] * [-1, -1, 1]).tolist()
    doc = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
           "markups": [{"type": "Fiducial", "name": "spine", "coordinateSystem": "LPS",
                        "controlPoints": [{"label": "spine-1", "position": lps, "positionStatus": "defined"}]}]}
    r = bosam("points", "check", CT_SM, write(tmp_path, doc, "F.mrk.json"))
    assert r.returncode == 0, r.stderr
    assert "spine" in r.stdout and "61.00" in r.stdout
    doc["markups"][0]["controlPoints"].append({"label": "far", "position": [1e4, 0, 0], "positionStatus": "defined"})
    r = bosam("points", "check", CT_SM, write(tmp_path, doc, "F.mrk.json"))
    assert r.returncode == 1 and "NO" in r.stdout and "1 of 2 clicks fall outside the volume" in r.stdout


@pytest.mark.parametrize("case", ["missing-ct", "missing-prompts", "unknown-system", "corrupt-nifti", "bad-json"])
def test_points_check_bad_input(tmp_path, case):
    good = write(tmp_path, {"coordinate_system": "voxel", "objects": [{"label": 1, "clicks": [{"xyz": [1, 2, 3]}]}]}, "good.json")
    ct, prompts, named = CT_SM, good, None
    if case == "missing-ct":
        ct = named = tmp_path / "absent.nii.gz"
    elif case == "missing-prompts":
        prompts = named = tmp_path / "absent.json"
    elif case == "unknown-system":
        prompts = named = write(tmp_path, {"coordinate_system": "IJK", "objects": [{"label": 1, "clicks": [{"xyz": [1, 2, 3]}]}]})
    elif case == "corrupt-nifti":
        raw = CT_SM.read_bytes()
        ct = named = tmp_path / "truncated.nii.gz"
        ct.write_bytes(raw[: len(raw) // 3])
    elif case == "bad-json":
        prompts = named = tmp_path / "broken.json"
        prompts.write_text('{"coordinate_system": "RAS", ')
    r = bosam("points", "check", ct, prompts, "--json")
    assert r.returncode != 0
    assert r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and str(named) in lines[0], r.stderr
    if case == "unknown-system":
        assert "coordinate_system" in lines[0] and "unknown coordinate system" in lines[0]


def test_flags_show_no_value_placeholder_in_help():
    """Typer shows '<bool>' beside on/off flags, which reads as if a value were needed
    ('--per-object true' then fails); every flag of every command, '--help' too, is shown bare."""
    from typer.testing import CliRunner

    from bosam_cli.cli import app

    runner = CliRunner()
    paths = [[c.name or c.callback.__name__] for c in app.registered_commands]
    for group in app.registered_groups:  # sub-commands such as 'points check'
        paths += [[group.name, c.name or c.callback.__name__] for c in group.typer_instance.registered_commands]
    assert {"segment", "train", "evaluate", "export", "demo"} <= {p[0] for p in paths} and ["points", "check"] in paths
    for path in paths + [[]]:
        out = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "200"}).output
        assert "Usage" in out, path
        flagged = [line for line in out.splitlines() if "<bool>" in line]
        assert not flagged, (path, flagged)


def test_the_cli_keeps_numpys_blas_to_one_thread_unless_told():
    """The window sampling's small matrix products ran on one OpenBLAS thread per core beside
    torch's threads (twice the encoder time on 2 cores); the command sets one thread before
    NumPy loads, and leaves a user's own setting alone."""
    code = ("import os, sys; sys.argv = ['bosam', '--version']; from bosam_cli import cli\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "print(os.environ['OPENBLAS_NUM_THREADS'], 'numpy' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    for given, want in ((None, "1"), ("3", "3")):
        if given:
            env["OPENBLAS_NUM_THREADS"] = given
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert r.stdout.split()[-2:] == [want, "False"], r.stdout + r.stderr
