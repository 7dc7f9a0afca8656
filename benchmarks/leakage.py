"""Where does a one-click mask go wrong? Leaks into neighbouring bones and bone-like soft tissue.

    python benchmarks/leakage.py [--checkpoint P] [--seeds 9000-9004] [--clicks 1]

On fresh phantoms (exact labels and a tissue map), every bone gets its first click(s) by the
evaluate protocol; for the bundled model (or --checkpoint) as ``segment`` runs it (soft-tissue
rim peeled off, ``--refine hu``, and detached pieces of a mask dropped, ``--islands clicked``),
the same model without the rim peeling (``--refine none``), its raw mask (``--refine none
--islands all``), and the HU-threshold baseline this prints, over all bones: mean Dice,
the share of predicted voxels that lie in *other* bones and in non-bone tissue of bone-like
HU (contrast-enhanced vessels / kidneys / bowel, calcifications, cartilage and discs), and the
volume in other bones against the bone's own volume (a share falls when a mask grows into soft
tissue and rises when it loses it; this one does neither).
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--seeds", default="9000-9004")
    ap.add_argument("--clicks", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from bosam_cli.baseline import ThresholdSegmenter
    from bosam_cli.clicks import center_click
    from bosam_cli.phantom import _T, make_phantom
    from bosam_cli.segment import SegmentOptions, make_session, resolve_checkpoint
    from engines.torch_engine import TorchEngine

    lo, hi = (int(v) for v in args.seeds.split("-"))
    engine = TorchEngine.from_checkpoint(resolve_checkpoint(args.checkpoint))
    bone_like = [_T["enhanced"], _T["calcification"], _T["cartilage_disc"]]
    variants = {"model": SegmentOptions(), "model, no refine": SegmentOptions(refine="none"),
                "model, raw": SegmentOptions(refine="none", islands="all")}
    rows: dict[str, list[tuple[float, float, float, float]]] = {name: [] for name in [*variants, "threshold"]}
    for seed in range(lo, hi + 1):
        ph = make_phantom(seed)
        labels, tissue = ph.labels.array, ph.tissue.array
        soft = np.isin(tissue, bone_like)
        meta = engine.model.checkpoint_metadata
        segmenters = [(name, make_session(engine, opts, meta)) for name, opts in variants.items()]
        for name, seg in [*segmenters, ("threshold", ThresholdSegmenter())]:
            seg.set_volume(ph.ct)
            for obj in ph.objects:
                gt = labels == obj.label
                pred = np.zeros_like(gt)
                for _ in range(args.clicks):
                    c = center_click(pred, gt, spacing_mm=ph.labels.spacing_mm)
                    if c is None:
                        break
                    seg.add_click(obj.label, voxel=np.asarray(c.ijk, float), positive=c.positive)
                    pred = seg.mask(obj.label)
                n = max(int(pred.sum()), 1)
                dice = 2 * (pred & gt).sum() / (pred.sum() + gt.sum())
                other = (pred & (labels > 0) & ~gt).sum()
                rows[name].append((float(dice), float(other / n), float((pred & soft).sum() / n), float(other / gt.sum())))
    print(f"{args.clicks} click(s) per bone, phantoms {args.seeds}, {len(rows['model'])} bones")
    print(f"{'':18s} {'Dice':>6s} {'in other bones':>15s} {'in bone-like soft tissue':>25s} {'other bones / own volume':>25s}")
    for name, r in rows.items():
        a = np.asarray(r)
        print(f"{name:18s} {a[:, 0].mean():6.3f} {100 * a[:, 1].mean():14.1f}% {100 * a[:, 2].mean():24.1f}% "
              f"{100 * a[:, 3].mean():24.1f}%")


if __name__ == "__main__":
    main()
