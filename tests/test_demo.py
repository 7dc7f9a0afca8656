"""bosam demo: the README's main job on its embedded default (bundled model, phantom)."""

from __future__ import annotations

import json
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
