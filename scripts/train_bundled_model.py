"""Reproduce the bundled model (bosam_cli/weights/bosam-tiny.safetensors) end to end.

    python scripts/train_bundled_model.py --work /tmp/bosam-bundled [--steps-per-epoch 200 --epochs 15]
                                          [--jobs 8] [--stages run6] [--device cuda]

Steps (each skipped when its output exists, so a stopped run can be restarted; training itself
resumes from its last checkpoint):

1. data: 160 synthetic phantoms (seeds 1000-1159, ``bosam_cli.phantom``), 6 validation phantoms
   (seeds 5000-5005), and the real TotalSegmentator example CT of ../shared/data with its bone
   labels, where the held-out classes (L3, T12, femur_right, hip_right) are set to background
   and the case is linked 16 times so that it is drawn about as often as 16 phantoms (the
   held-out set is the same CT with its full label map: every bone, organ and muscle);
2. ``bosam prepare --cache`` (decoded volumes, so gzip does not dominate training);
3. ``bosam train`` eight times: the tiny preset from scratch (15 epochs x 200 steps), a second
   warm-restart schedule from those weights (15 epochs x 250 steps, another seed), then one
   cosine cycle (5 epochs x 400 steps, lr 3e-4) from the second run's best weights with
   ``--click-sim mixed`` (half of the clicks in the interior of the larger error region, so the
   decoder learns to act on corrective clicks), then one more cycle (5 epochs x 500 steps,
   lr 2e-4) from the third run's best with ``--neighbour-weight 1`` (a cross-entropy penalty on
   the voxels of the other bones in the window, against leaks into neighbours), and a fifth
   (5 epochs x 500 steps, lr 2e-4, same penalty) from the fourth run's best with
   ``--click-memory all`` (each decoder call sees every click so far, not only the newest; the
   checkpoint says so and segment/evaluate feed clicks that way), and a sixth from the fifth's
   best with four windows per step (5 epochs x 140 steps, ``--batch-size 4``, lr 3e-4, same
   options; sized for a GPU, where a step of four windows costs about what one does, and
   reproduced on the 2-core CPU at ~8 s per step), and a seventh from the sixth's best with
   eight windows per step (5 epochs x 100 steps, ``--batch-size 8``, lr 2e-4, same options; run
   on an H100 at 0.8 s per step; the shipped weights are its best, the second epoch, of a run
   the lent GPU's time limit stopped after 400 steps), and an eighth from the seventh's best
   (4 epochs x 40 steps, eight windows, lr 1.5e-4, seed 2030; on an H100 in 3 minutes,
   started from the seventh's fp16 package weights since its full checkpoint stayed on the
   lent machine); DiceCE summed over 8 simulated clicks per window, AdamW with the prompt
   encoder and decoder at the encoder's rate, batch 1 up to stage 5, 2 CPU threads (about
   1.1-1.4 s per step);
4. the chosen checkpoint (best validation Dice on the phantoms) written as fp16 safetensors
   with its metadata into the package;
5. ``bosam evaluate`` (clicks protocol, 1/5/10 clicks) of the model and of the HU-threshold
   baseline on 5 fresh phantoms (seeds 9000-9004) and on the held-out real bone classes; the
   summary goes to benchmarks/bundled_model_eval.md (the README's model card quotes it).

``--stages run6`` runs only the named stages (their predecessors' checkpoints must exist),
``--jobs N`` makes the phantoms and the cache N at a time, ``--device`` goes to stages 6-8, and
``--data-only`` stops after step 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
HELD_OUT = {29: "vertebrae_L3", 32: "vertebrae_T12", 76: "femur_right", 78: "hip_right"}
#: stage 6's steps per epoch (batch 4, on a GPU)
STAGE6_STEPS = 140
#: stage 7's steps per epoch (batch 8, on a GPU)
STAGE7_STEPS = 100
#: stage 8's steps per epoch (batch 8, on a GPU)
STAGE8_STEPS = 40
WEIGHTS = REPO / "bosam_cli" / "weights" / "bosam-tiny.safetensors"


def run(*args: str, cwd: Path) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(args, cwd=cwd, check=True)


def make_data(work: Path, jobs: int = 1) -> None:
    import nibabel as nib
    import numpy as np

    from bosam_cli.phantom import write_phantom_dataset

    if not (work / "phantoms" / "dataset.json").exists():
        write_phantom_dataset(work / "phantoms", list(range(1000, 1160)), jobs=jobs)
    if not (work / "val_phantoms" / "dataset.json").exists():
        write_phantom_dataset(work / "val_phantoms", list(range(5000, 5006)), jobs=jobs)
    if not (work / "eval_phantoms" / "dataset.json").exists():
        write_phantom_dataset(work / "eval_phantoms", list(range(9000, 9005)), jobs=jobs)
    src = SHARED / "totalsegmentator"
    if not src.exists():
        sys.exit(f"{src}: the shared real CT is needed for the real-CT part of the recipe")
    lm = json.loads((SHARED / "totalsegmentator_total_v2_labelmap.json").read_text())
    seg = nib.load(src / "example_seg_fast_force_split.nii.gz")
    lab = np.asanyarray(seg.dataobj).astype(np.uint8)
    bone = np.isin(lab, lm["bone_ids"])
    held = np.isin(lab, list(HELD_OUT))
    # training sees the bones that are not held out; the held-out set keeps the full label map
    # (every bone, organ and muscle) so that evaluate's Other@n counts leaks into any of them
    for name, arr in (("real", np.where(bone & ~held, lab, 0)), ("real_heldout", lab)):
        root = work / name
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        img = nib.Nifti1Image(arr.astype(np.uint8), seg.affine, header=seg.header.copy())
        img.set_data_dtype(np.uint8)
        copies = 16 if name == "real" else 1
        for i in range(copies):
            case = "ts_example" if i == 0 else f"ts_example{i:02d}"
            if not (root / "labelsTr" / f"{case}.nii.gz").exists():
                nib.save(img, str(root / "labelsTr" / f"{case}.nii.gz"))
            link = root / "imagesTr" / f"{case}_0000.nii.gz"
            if not link.exists():
                os.symlink((src / "example_ct.nii.gz").resolve(), link)
        present = sorted(int(v) for v in np.unique(arr) if v)
        names = {lm["labels"][str(v)]["name"]: v for v in present}
        dataset = {"channel_names": {"0": "CT"}, "labels": {"background": 0, **names}, "file_ending": ".nii.gz"}
        (root / "dataset.json").write_text(json.dumps(dataset, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--steps-per-epoch", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1, help="phantoms made and cases cached at once (data steps)")
    ap.add_argument("--stages", default=None,
                    help="comma-separated stage names to run (e.g. run6; the earlier stages' checkpoints must exist)")
    ap.add_argument("--stage6-steps", type=int, default=STAGE6_STEPS, help="steps per epoch of stage 6")
    ap.add_argument("--stage7-steps", type=int, default=STAGE7_STEPS, help="steps per epoch of stage 7")
    ap.add_argument("--stage8-steps", type=int, default=STAGE8_STEPS, help="steps per epoch of stage 8")
    ap.add_argument("--device", default=None,
                    help="bosam train --device for stages 6-8 (default: CUDA when present)")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--data-only", action="store_true", help="make the datasets and the cache, then stop")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    bosam = [sys.executable, "-m", "bosam_cli"]
    labelmap = str(SHARED / "totalsegmentator_total_v2_labelmap.json")

    make_data(work, args.jobs)
    if not (work / "cache").exists():
        run(*bosam, "prepare", "--data", "phantoms", "--data", "real", "--check", "--cache", "cache",
            "--jobs", str(args.jobs), cwd=work)
    if args.data_only:
        return
    common = ["--data", "phantoms", "--data", "real", "--cache", "cache", "--val-data", "val_phantoms",
              "--labels", "bone", "--labelmap", labelmap, "--clicks", "8", "--prompt-lr-scale", "1.0",
              "--val-cases", "6", "--val-clicks", "3",
              "--threads", str(args.threads), "--checkpoint-every", "100", "--no-tensorboard"]
    # stage 1 from scratch, stage 2 a second warm-restart schedule from stage 1's final weights,
    # stage 3 one cosine cycle from stage 2's best with half of the clicks in error interiors,
    # stage 4 one more cycle from stage 3's best with the leak penalty on neighbouring bones,
    # stage 5 one more from stage 4's best where every decoder call sees all clicks so far,
    # stages 6-8 more windows per step (4, then 8; sized for a GPU)
    spe = args.steps_per_epoch
    device = ["--device", args.device] if args.device else []
    stages = [
        ("run1", ["--preset", "tiny", "--epochs", str(args.epochs), "--steps-per-epoch", str(spe), "--lr", "4e-4",
                  "--seed", "2023"]),
        ("run2", ["--from", str(work / "run1" / "final.pth"), "--epochs", str(args.epochs),
                  "--steps-per-epoch", str(spe * 5 // 4), "--lr", "4e-4", "--seed", "2024"]),
        ("run3", ["--from", str(work / "run2" / "best.pth"), "--epochs", "5", "--steps-per-epoch", str(spe * 2),
                  "--lr", "3e-4", "--click-sim", "mixed", "--seed", "2025"]),
        ("run4", ["--from", str(work / "run3" / "best.pth"), "--epochs", "5", "--steps-per-epoch", str(spe * 5 // 2),
                  "--lr", "2e-4", "--click-sim", "mixed", "--neighbour-weight", "1.0", "--seed", "2026"]),
        ("run5", ["--from", str(work / "run4" / "best.pth"), "--epochs", "5", "--steps-per-epoch", str(spe * 5 // 2),
                  "--lr", "2e-4", "--click-sim", "mixed", "--neighbour-weight", "1.0", "--click-memory", "all",
                  "--seed", "2027"]),
        ("run6", ["--from", str(work / "run5" / "best.pth"), "--epochs", "5", "--steps-per-epoch", str(args.stage6_steps),
                  "--batch-size", "4", "--workers", "8", "--lr", "3e-4", "--click-sim", "mixed",
                  "--neighbour-weight", "1.0", "--click-memory", "all", "--seed", "2028", *device]),
        ("run7", ["--from", str(work / "run6" / "best.pth"), "--epochs", "5", "--steps-per-epoch", str(args.stage7_steps),
                  "--batch-size", "8", "--workers", "12", "--lr", "2e-4", "--click-sim", "mixed",
                  "--neighbour-weight", "1.0", "--click-memory", "all", "--seed", "2029", *device]),
        ("run8", ["--from", str(work / "run7" / "best.pth"), "--epochs", "4", "--steps-per-epoch", str(args.stage8_steps),
                  "--batch-size", "8", "--workers", "12", "--lr", "1.5e-4", "--click-sim", "mixed",
                  "--neighbour-weight", "1.0", "--click-memory", "all", "--seed", "2030", *device]),
    ]
    wanted = set(args.stages.split(",")) if args.stages else None
    if wanted and not wanted <= {name for name, _ in stages}:
        sys.exit(f"--stages: unknown stage(s) {', '.join(sorted(wanted - {n for n, _ in stages}))}")
    for name, extra in stages:
        if wanted is not None and name not in wanted:
            continue
        run_dir = work / name
        if (run_dir / "final.pth").exists():
            continue
        resume = ["--resume"] if (run_dir / "last.pth").exists() else []
        run(*bosam, "train", *common, *extra, "--out", str(run_dir), *resume, cwd=work)
    run_dir = work / stages[-1][0]
    chosen = run_dir / ("best.pth" if (run_dir / "best.pth").exists() else "final.pth")
    write_bundled(chosen, work)
    if not args.skip_eval:
        evaluate(work, bosam)


def write_bundled(checkpoint: Path, work: Path) -> None:
    """fp16 safetensors with the checkpoint's metadata plus how it was made."""
    from bosam_cli.checkpoints import load_model, save_checkpoint

    model = load_model(checkpoint)
    meta = dict(model.checkpoint_metadata)
    meta["bundled"] = {
        "recipe": "scripts/train_bundled_model.py",
        "source_checkpoint": checkpoint.name,
        "held_out_real_classes": {str(k): v for k, v in HELD_OUT.items()},
        "stored_dtype": "float16",
    }
    model.checkpoint_metadata = meta
    model.half()
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, WEIGHTS)
    print(f"wrote {WEIGHTS} ({WEIGHTS.stat().st_size / 2**20:.1f} MiB)")


def evaluate(work: Path, bosam: list[str]) -> None:
    held = ",".join(str(k) for k in HELD_OUT)
    jobs = {
        "phantoms_model": ["--data", "eval_phantoms"],
        "phantoms_threshold": ["--data", "eval_phantoms", "--baseline", "threshold"],
        "heldout_model": ["--data", "real_heldout", "--labels", held],
        "heldout_threshold": ["--data", "real_heldout", "--labels", held, "--baseline", "threshold"],
    }
    for name, extra in jobs.items():
        out = work / "eval" / name
        if not (out / "evaluation.json").exists():
            run(*bosam, "evaluate", *extra, "--clicks", "1,5,10", "--checkpoint", str(WEIGHTS),
                "--engine", "torch", "--out", str(out), cwd=work)
    lines = ["# Bundled model evaluation (clicks protocol: Dice / NSD@2mm after 1, 5, 10 clicks)", ""]
    for name in jobs:
        lines.append(f"## {name}")
        lines.append("")
        lines.append((work / "eval" / name / "evaluation.md").read_text())
        lines.append("")
    (REPO / "benchmarks" / "bundled_model_eval.md").write_text("\n".join(lines))
    print("wrote benchmarks/bundled_model_eval.md")


if __name__ == "__main__":
    main()
