"""Small nnU-Net-style CT datasets with exact bone labels, for the data/train/evaluate tests.

Uses ``bosam_cli.phantom.make_phantom`` when it is available; otherwise (and for the cases
where a test needs exact control) it paints two bones itself: a vertebra-like ellipsoid with a
cortical shell (label 29, TotalSegmentator L3) and a femur-like cylinder (label 75).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np

L3, FEMUR = 29, 75
NAMES = {L3: "vertebrae_L3", FEMUR: "femur_left"}


def paint_case(
    seed: int,
    shape: Sequence[int] = (40, 36, 32),
    spacing_mm: Sequence[float] = (3.0, 3.0, 3.0),
    flip_axes: Sequence[int] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CT int16 HU, labels uint8, affine) of one synthetic case."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    sp = np.asarray(spacing_mm, dtype=float)
    grid = np.stack(np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, sp)], indexing="ij"), axis=-1)
    extent = np.asarray(shape) * sp
    ct = np.full(shape, -1000.0)
    body = (((grid - extent / 2) / (extent * 0.48)) ** 2)[..., :2].sum(-1) <= 1.0
    ct[body] = 40.0
    labels = np.zeros(shape, np.uint8)
    # vertebra: ellipsoid, cortical shell + cancellous core
    c = extent * np.array([0.35, 0.5, 0.5]) + rng.uniform(-6, 6, 3)
    r = np.array([16.0, 14.0, 15.0]) * rng.uniform(0.9, 1.1, 3)
    d = np.sqrt((((grid - c) / r) ** 2).sum(-1))
    ct[d <= 1.0] = 900.0
    ct[d <= 0.75] = 250.0
    labels[d <= 1.0] = L3
    # femur: cylinder along axis 2, cortical shell around marrow
    c2 = extent[:2] * np.array([0.72, 0.5]) + rng.uniform(-5, 5, 2)
    rad = 9.0 * rng.uniform(0.9, 1.1)
    rr = np.sqrt(((grid[..., :2] - c2) ** 2).sum(-1))
    zz = grid[..., 2]
    cyl = (rr <= rad) & (zz > extent[2] * 0.15) & (zz < extent[2] * 0.85)
    ct[cyl] = 1100.0
    ct[cyl & (rr <= rad * 0.55)] = 300.0
    labels[cyl] = FEMUR
    ct += rng.normal(0, 15, shape)
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = rng.uniform(-50, 50, 3)
    for a in flip_axes:  # store the axis reversed: same anatomy, other orientation
        ct = np.flip(ct, a)
        labels = np.flip(labels, a)
        flip = np.eye(4)
        flip[a, a] = -1
        flip[a, 3] = shape[a] - 1
        affine = affine @ flip
    return np.ascontiguousarray(ct).astype(np.int16), np.ascontiguousarray(labels), affine


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.header.set_sform(affine, code=2)
    img.header.set_qform(affine, code=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def make_dataset(
    root: Path,
    n_cases: int = 2,
    seed: int = 0,
    split: str = "Tr",
    dataset_json: bool = True,
    suffix: str = ".nii.gz",
    flip_second: bool = True,
) -> Path:
    """Write ``n_cases`` cases as ``images<split>/case_XXX_0000`` + ``labels<split>/case_XXX``."""
    root = Path(root)
    for i in range(n_cases):
        flips = (0,) if (flip_second and i % 2 == 1) else ()
        ct, lab, aff = paint_case(seed * 100 + i, flip_axes=flips)
        save_nifti(ct, aff, root / f"images{split}" / f"case_{i:03d}_0000{suffix}")
        save_nifti(lab, aff, root / f"labels{split}" / f"case_{i:03d}{suffix}")
    if dataset_json:
        (root / "dataset.json").write_text(
            json.dumps({"name": "synthetic bones", "labels": {"background": 0, **{v: k for k, v in NAMES.items()}}})
        )
    return root
