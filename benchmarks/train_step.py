"""Training step time: our training step against the reference recipe's, same model, same batch.

    python benchmarks/train_step.py [--preset sam-med3d] [--batch 1] [--clicks 10] [--repeats 2] [--threads 1]
                                    [--device cuda [--precision fp16]] [--sim-on host|device]

One step = image encoder once, ``--clicks`` decoder calls with simulated clicks and the previous
logits as mask prompt (mask-only steps per the published schedule), DiceCE on logits upsampled
to 128^3 summed over the calls, backward, AdamW step: ``bosam_cli.train.ClickLoop``.

* ours: the exact fast encoder attention and separable-matrix upsampling (what ``bosam train``
  runs);
* reference: the same model and step with the straightforward attention
  (``set_attention_impl("reference")``, the reference code's structure: every padded window
  token a query and a key) and ``F.interpolate`` upsampling, i.e. the cost of the recipe as the
  reference code computes it.

Both run in one process on the same random-weight model (non-zero relative-position tables),
the same window and the same click generator seed, interleaved so that machine load hits both
alike. ``--sim-on device`` simulates the clicks on the training device
(``bosam_cli/clicks_torch.py``, what ``bosam train`` does on CUDA) instead of on the host.
Prints min/median step time of each, the ratio (issue 5's target: ours <= 0.5x the reference),
and the loss difference.

Measured (2-core shared CPU, torch 2.13 CPU, 1 thread, sam-med3d, batch 1, 10 decoder calls):
ours 5.65 s, reference 30.1 s per step (median of 2): 0.19x.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from bosam_cli.clicks import training_schedule
from bosam_cli.model import build_preset
from bosam_cli.train import ClickLoop, build_loss, freeze_never_trained, param_groups


def make_window(size: int, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """A z-scored window with an ellipsoidal 'bone' per batch element, and its mask."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
    gts = []
    for _ in range(batch):
        c = size / 2 + rng.uniform(-10, 10, 3)
        r = rng.uniform(14, 24, 3)
        gts.append((((g - c) / r) ** 2).sum(-1) <= 1)
    gt = np.stack(gts)
    img = np.where(gt, 1.5, -0.6) + rng.normal(0, 0.3, gt.shape)
    return torch.from_numpy(img.astype(np.float32))[:, None], torch.from_numpy(gt[:, None].astype(np.float32)), gt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sam-med3d")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--clicks", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timed with a synchronize after each step)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "fp16", "bf16"),
                    help="autocast dtype of the model calls (fp16 as bosam train uses on CUDA; the loss scaler "
                         "is left out, it does not change the step's cost)")
    ap.add_argument("--sim-on", default="host", choices=("host", "device"),
                    help="where clicks are simulated (bosam train --click-sim-on; auto picks device on CUDA)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    autocast = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    base = build_preset(args.preset).train()
    with torch.no_grad():
        for blk in base.image_encoder.blocks:
            for t in (blk.attn.rel_pos_d, blk.attn.rel_pos_h, blk.attn.rel_pos_w):
                t.normal_(0, 0.02)
    freeze_never_trained(base)
    images, targets, gt = make_window(base.img_size, args.batch)
    base, images, targets = base.to(device), images.to(device), targets.to(device)
    runs = {}
    for name, impl, upsample in (("ours", "fast", "matmul"), ("reference", "reference", "interpolate")):
        model = copy.deepcopy(base)
        model.image_encoder.set_attention_impl(impl)
        loop = ClickLoop(model, build_loss("dicece"), upsample=upsample, autocast_dtype=autocast,
                         sim_on=args.sim_on).to(device)
        opt = torch.optim.AdamW(param_groups(model, 1e-4, 0.1))
        runs[name] = (loop, opt)
    schedule = training_schedule(args.clicks, np.random.default_rng(1))

    def step(name: str, seed: int) -> tuple[float, float]:
        loop, opt = runs[name]
        sync()
        t0 = time.perf_counter()
        loss, _ = loop(images, targets, gt, schedule, np.random.default_rng(seed))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t0, float(loss.detach())

    times: dict[str, list[float]] = {"ours": [], "reference": []}
    losses: dict[str, list[float]] = {"ours": [], "reference": []}
    warm = {name: step(name, 100)[1] for name in times}  # warm-up: same weights, same clicks
    for r in range(args.repeats):
        for name in ("ours", "reference"):
            dt, loss = step(name, r)
            times[name].append(dt)
            losses[name].append(loss)
    print(f"training step, preset {args.preset}, batch {args.batch}, {args.clicks} decoder calls "
          f"({sum(schedule)} with a new point), "
          + (f"{torch.cuda.get_device_name(device)} {args.precision}" if device.type == "cuda" else f"{args.threads} thread(s)")
          + f", clicks simulated on the {args.sim_on}, {args.repeats} repeats after 1 warm-up")
    for name, ts in times.items():
        print(f"  {name:9s}  min {min(ts):8.2f} s   median {statistics.median(ts):8.2f} s")
    ratio = statistics.median(times["ours"]) / statistics.median(times["reference"])
    print(f"  ours / reference (median): {ratio:.2f}x  (target <= 0.5x)")
    print(f"  first step (identical weights): loss ours {warm['ours']:.6f}, reference {warm['reference']:.6f}, "
          f"|diff| {abs(warm['ours'] - warm['reference']):.2e} (clicks follow each run's own prediction, so a "
          "voxel with a logit near 0 can move a click)")
    diff = max(abs(a - b) for a, b in zip(losses["ours"], losses["reference"]))
    print(f"  later steps (weights drift apart by float rounding): max |loss diff| {diff:.2e}")


if __name__ == "__main__":
    main()
