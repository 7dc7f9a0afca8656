"""Stage breakdown of ``bosam segment`` on a full-size CT.

    python benchmarks/segment.py [--preset sam-med3d] [--engine torch] [--threads 2] [--max-windows 1] [--device cuda]

Builds (once, cached under benchmarks/.cache) a 512x512x300 int16 CT at 0.8x0.8x1.0 mm in LPS
storage order (as scanners write it) with a body, a spine-like column and two femur-like
bones, and a prompt file with three objects; runs the same code as ``bosam segment`` with a
random-weight model of the chosen preset, with the rim peeling (the default) and without it;
prints the time of every stage and the share of everything outside the engine calls (reading,
sampling windows, mapping back, writing).
Issue 3's target: that share <= 25 % with the sam-med3d preset on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

CACHE = Path(__file__).parent / ".cache"


def make_ct(path: Path) -> tuple[Path, Path]:
    import nibabel as nib

    shape = (512, 512, 300)
    aff = np.diag([-0.8, -0.8, 1.0, 1.0])
    aff[:3, 3] = [204.4, 204.4, -150.0]
    rng = np.random.default_rng(0)
    i = (np.arange(shape[0]) - 256) * 0.8
    j = (np.arange(shape[1]) - 256) * 0.8
    xx, yy = np.meshgrid(i, j, indexing="ij")
    body = (xx / 170) ** 2 + (yy / 120) ** 2 < 1
    spine = (xx / 18) ** 2 + ((yy + 60) / 16) ** 2 < 1
    femur_l = ((xx - 90) / 14) ** 2 + (yy / 14) ** 2 < 1
    femur_r = ((xx + 90) / 14) ** 2 + (yy / 14) ** 2 < 1
    slab = np.where(body, 40, -1000).astype(np.int16)
    bone = slab.copy()
    bone[spine] = 400
    bone[femur_l | femur_r] = 700
    arr = np.empty(shape, np.int16)
    for k in range(shape[2]):
        noise = rng.normal(0, 15, size=(shape[0], shape[1])).astype(np.int16)
        arr[:, :, k] = (bone if 40 <= k < 260 else slab) + noise
    img = nib.Nifti1Image(arr, aff)
    img.header.set_sform(aff, code=1)
    img.header.set_qform(aff, code=1)
    nib.save(img, str(path))
    world = lambda ijk: (aff @ np.append(ijk, 1.0))[:3].round(2).tolist()  # noqa: E731
    prompts = {
        "coordinate_system": "RAS",
        "objects": [
            {"label": 28, "name": "spine", "clicks": [{"xyz": world([256, 181, 150])}]},
            {"label": 75, "name": "femur_left", "clicks": [{"xyz": world([143, 256, 150])}]},
            {"label": 76, "name": "femur_right", "clicks": [{"xyz": world([369, 256, 150])}]},
        ],
    }
    p = path.with_suffix("").with_suffix(".json")
    p.write_text(json.dumps(prompts))
    return path, p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sam-med3d")
    ap.add_argument("--engine", default="torch")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-windows", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="engine device: cpu, cuda ...")
    ap.add_argument("--precision", default=None, help="engine precision (torch: fp32, bf16, fp16)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from bosam_cli.checkpoints import save_checkpoint
    from bosam_cli.model import build_preset
    from bosam_cli.segment import SegmentOptions, segment_file
    from engines.registry import open_engine

    CACHE.mkdir(exist_ok=True)
    ct = CACHE / "ct_512x512x300.nii.gz"
    if not ct.exists():
        print("building the synthetic CT (once) ...")
        make_ct(ct)
    points = ct.with_suffix("").with_suffix(".json")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        ck = save_checkpoint(build_preset(args.preset), Path(tmp) / f"{args.preset}.pth")
        engine = open_engine(args.engine, checkpoint=ck, threads=args.threads, device=args.device,
                             precision=args.precision)
        best = {}
        for refine in ("hu", "none"):  # as segment runs by default, and without the rim peeling
            options = SegmentOptions(max_windows=args.max_windows, refine=refine)
            segment_file(ct, points, Path(tmp) / "warm.nii.gz", engine, options)  # warm-up
            runs = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                m = segment_file(ct, points, Path(tmp) / f"out{r}.nii.gz", engine, options)
                m["timings_s"]["wall"] = time.perf_counter() - t0
                runs.append(m)
            best[refine] = min(runs, key=lambda m: m["timings_s"]["wall"])
    print(f"bosam segment, 512x512x300 int16 CT, 3 objects, preset {args.preset}, engine {args.engine} "
          f"on {engine.info.device} ({engine.info.precision}), {args.threads} threads, max {args.max_windows} window(s) per object; best of {args.repeats}")
    print(f"  {'':15s} {'--refine hu':>12s} {'--refine none':>14s}")
    for k in ("read", "prompts", "sample_windows", "encoder", "decoder", "map_back", "segment_other", "write", "total"):
        print(f"  {k:15s} {best['hu']['timings_s'][k]:10.3f} s {best['none']['timings_s'][k]:12.3f} s")
    print(f"  engine calls: {best['hu']['calls']}")
    for refine, m in best.items():
        ts = m["timings_s"]
        outside = ts["total"] - ts["encoder"] - ts["decoder"]
        print(f"  outside the engine, --refine {refine}: {outside:.3f} s = {100 * outside / ts['total']:.1f} % of total")


if __name__ == "__main__":
    main()
