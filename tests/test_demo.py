"""bosam demo: the README's main job on its embedded default (bundled model, phantom)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from bosam_cli.segment import bundled_checkpoint


def test_bundled_model_ships_in_the_package_and_is_small():
    path = bundled_checkpoint()
    assert path is not None, "bosam_cli/weights/bosam-tiny.safetensors is missing"
    assert path.stat().st_size <= 20 * 2**20
    from bosam_cli.checkpoints import load_model

    model = load_model(path)
    assert model.preset == "tiny"
    meta = model.checkpoint_metadata
    assert meta["bundled"]["recipe"] == "scripts/train_bundled_model.py"
    assert meta["spacing_mm"] > 0


def test_demo_runs_end_to_end_on_a_phantom(tmp_path):
    if bundled_checkpoint() is None:
        pytest.fail("no bundled model")
    out = tmp_path / "demo"
    r = subprocess.run(
        [sys.executable, "-m", "bosam_cli", "demo", "-o", str(out), "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    manifest = json.loads(r.stdout)
    assert manifest["demo"]["input"]["phantom_seed"] == 0
    seg = nib.load(str(out / "segmentation.nii.gz"))
    truth = nib.load(str(out / "phantom_labels.nii.gz"))
    assert seg.shape == truth.shape and np.allclose(seg.affine, truth.affine)
    labels = np.asanyarray(seg.dataobj)
    dices = [o["dice_vs_truth"] for o in manifest["objects"]]
    assert len(dices) >= 4
    for o in manifest["objects"]:
        assert o["voxels"] == int((labels == o["label"]).sum())
    # a trained model, not noise: every bone found, and clearly overlapping its truth on average
    assert min(o["voxels"] for o in manifest["objects"]) > 0
    assert manifest["demo"]["mean_dice"] > 0.3
    assert (out / "segmentation_overlay.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "segmentation.json").read_text())["demo"]["mean_dice"] == manifest["demo"]["mean_dice"]


def test_demo_on_a_given_ct_and_its_errors(tmp_path):
    """`bosam demo --ct --points` segments that CT (no truth, no phantom made); a negative seed is
    one line and no output."""
    from bosam_cli.atomic import write_json
    from bosam_cli.demo import phantom_prompts
    from bosam_cli.phantom import make_phantom

    phantom = make_phantom(3, shape=(64, 56, 48), spacing_mm=(2.0, 2.0, 2.5), orientation="LPS")
    ct = phantom.save(tmp_path / "in", stem="case")["ct"]
    pts = write_json(phantom_prompts(phantom), tmp_path / "in" / "pts.json")
    out = tmp_path / "demo_ct"
    r = subprocess.run([sys.executable, "-m", "bosam_cli", "demo", "--ct", str(ct), "--points", str(pts), "-o", str(out)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    assert "phantom made" not in r.stdout and "mean Dice" not in r.stdout
    assert "engine" in r.stdout
    seg = nib.load(str(out / "segmentation.nii.gz"))
    assert np.allclose(seg.affine, phantom.ct.affine)
    manifest = json.loads((out / "segmentation.json").read_text())
    assert manifest["demo"]["input"] == {"ct": str(ct)}
    assert {o["label"] for o in manifest["objects"]} == {o["label"] for o in phantom_prompts(phantom)["objects"]}

    bad = tmp_path / "neg"
    r = subprocess.run([sys.executable, "-m", "bosam_cli", "demo", "--seed", "-1", "-o", str(bad)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0
    assert "--seed" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not bad.exists()
    # an earlier phantom demo in the same folder: its phantom files go (they described another
    # CT), unless the CT given is that phantom
    from bosam_cli.demo import PHANTOM_FILES

    r = subprocess.run([sys.executable, "-m", "bosam_cli", "demo", "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and all((out / n).is_file() for n in PHANTOM_FILES), r.stderr
    r = subprocess.run([sys.executable, "-m", "bosam_cli", "demo", "--ct", str(out / "phantom_ct.nii.gz"), "--points",
                        str(out / "phantom_points.json"), "-o", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert all((out / n).is_file() for n in PHANTOM_FILES)  # the phantom given as --ct keeps its truth
    r = subprocess.run([sys.executable, "-m", "bosam_cli", "demo", "--ct", str(ct), "--points", str(pts), "-o", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and not [p for p in out.iterdir() if p.name.startswith("phantom")], r.stderr
    r = subprocess.run([sys.executable, "-m", "bosam_cli", "demo", "-o", str(pts)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {pts}: is a file; -o is the folder for the demo's outputs"]  # it named a temporary file inside it
