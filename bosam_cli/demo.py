"""``bosam demo``: the whole pipeline on an embedded default, in well under a minute on a CPU.

Generates a synthetic CT phantom with exact bone labels (or takes a CT and prompt file),
places one click per bone, runs the model through the same session and writer as
``bosam segment``, and reports Dice against the phantom's truth and the time of each stage.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from .segment import SegmentOptions, segment_file


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def phantom_prompts(phantom: Any, max_objects: int = 8, min_voxels: int = 200) -> dict[str, Any]:
    """A prompt file (RAS mm) with one click at the deepest voxel of up to ``max_objects`` bones,
    taking kinds in turn so the demo shows vertebrae, ribs, hips and femurs alike."""
    from .phantom import phantom_clicks

    clicks = phantom_clicks(phantom)
    by_kind: dict[str, list[Any]] = {}
    for obj in sorted(phantom.objects, key=lambda o: -o.voxels):
        if obj.voxels >= min_voxels and obj.label in clicks:
            by_kind.setdefault(obj.kind, []).append(obj)
    chosen: list[Any] = []
    while len(chosen) < max_objects and any(by_kind.values()):
        for kind in sorted(by_kind):
            if by_kind[kind] and len(chosen) < max_objects:
                chosen.append(by_kind[kind].pop(0))
    objects = []
    for obj in sorted(chosen, key=lambda o: o.label):
        ras = phantom.ct.voxel_to_world(np.asarray(clicks[obj.label][0], float)[None])[0]
        objects.append({"label": obj.label, "name": obj.name,
                        "clicks": [{"xyz": [round(float(v), 2) for v in ras], "positive": True}]})
    return {"coordinate_system": "RAS", "objects": objects}


def run_demo(
    out_dir: str | os.PathLike,
    engine: Any,
    ct: str | os.PathLike | None = None,
    points: str | os.PathLike | None = None,
    seed: int = 0,
    options: SegmentOptions | None = None,
) -> dict[str, Any]:
    """Run the demo; returns the segment manifest plus ``demo`` facts (Dice per bone). Its files
    are written all together or not at all (a failure leaves the folder as it was)."""
    from .atomic import all_or_nothing, remove_when_committed
    from .errors import BosamError

    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise BosamError(f"{out_dir}: is a file; -o is the folder for the demo's outputs")
    with all_or_nothing():
        manifest = _run_demo(Path(out_dir), engine, ct, points, seed, options)
        own = [Path(out_dir) / name for name in PHANTOM_FILES]
        if ct is not None and os.path.realpath(ct) not in {os.path.realpath(f) for f in own}:
            # an earlier phantom demo's files would sit beside another CT's result (when the CT
            # given is that phantom, its truth and clicks belong with it and stay)
            remove_when_committed([f for f in own if f.is_file() and not f.is_symlink()])
    return manifest


#: what a phantom demo writes besides the segmentation (``Phantom.save`` and the prompt file)
PHANTOM_FILES = ("phantom_ct.nii.gz", "phantom_labels.nii.gz", "phantom.json", "phantom_points.json")


def _run_demo(out: Path, engine: Any, ct: str | os.PathLike | None, points: str | os.PathLike | None,
              seed: int, options: SegmentOptions | None) -> dict[str, Any]:
    from .atomic import staged, write_json

    # out is created by the first file written: a bad --ct leaves no empty folder
    options = options or SegmentOptions(overlay=True)
    truth = None
    t0 = time.perf_counter()
    if ct is None:
        from .phantom import make_phantom

        phantom = make_phantom(seed)
        saved = phantom.save(out, stem="phantom")
        ct = saved["ct"]
        points = out / "phantom_points.json"
        write_json(phantom_prompts(phantom), points)
        truth = phantom.labels.array
        source = {"phantom_seed": seed, "region": phantom.region, "spacing_mm": phantom.info["spacing_mm"],
                  "orientation": phantom.info["orientation"], "truth": str(saved["labels"])}
    elif points is None:
        raise ValueError("--points is required with --ct")
    else:
        source = {"ct": str(ct)}
    t_input = time.perf_counter() - t0
    manifest = segment_file(ct, points, out / "segmentation.nii.gz", engine, options)
    demo: dict[str, Any] = {"input": source, "make_input_s": round(t_input, 3)}
    if truth is not None:
        import nibabel as nib

        labels = np.asanyarray(nib.load(str(staged(out / "segmentation.nii.gz"))).dataobj)
        per = []
        for o in manifest["objects"]:
            d = _dice(labels == o["label"], truth == o["label"])
            o["dice_vs_truth"] = round(d, 4)
            per.append(d)
        demo["mean_dice"] = round(float(np.mean(per)), 4) if per else None
    manifest["demo"] = demo
    write_json(manifest, out / "segmentation.json")
    return manifest
