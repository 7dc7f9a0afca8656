"""Encoder speed: the exact fast windowed attention against the straightforward formula.

    python benchmarks/encoder.py [--preset sam-med3d] [--repeats 3] [--threads 2] [--device cuda]

Both paths run the same random-weight model (non-zero relative-position tables) on the same
input in one process; the script prints each path's min/median time, their ratio, and the
largest output difference. For scale: the reference SAM-Med3D code took 15.6 s (1 thread) /
17.8 s (2 threads) per 128^3 encoder call on this kind of 2-core machine (FACTS.md §8).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bosam_cli.model import build_preset

REFERENCE_CODE_S = {1: 15.6, 2: 17.8}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="sam-med3d")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timed with a synchronize after each call)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = build_preset(args.preset).eval()
    with torch.no_grad():
        for blk in model.image_encoder.blocks:
            for t in (blk.attn.rel_pos_d, blk.attn.rel_pos_h, blk.attn.rel_pos_w):
                t.normal_(0, 0.02)
    x = torch.randn(1, 1, model.img_size, model.img_size, model.img_size)
    model, x = model.to(device), x.to(device)
    times: dict[str, list[float]] = {"fast": [], "reference": []}
    outputs = {}
    with torch.inference_mode():
        for impl in ("fast", "reference"):
            model.image_encoder.set_attention_impl(impl)
            outputs[impl] = model.image_encoder(x)  # warm-up
        for _ in range(args.repeats):
            for impl in ("fast", "reference"):  # interleaved, so load affects both alike
                model.image_encoder.set_attention_impl(impl)
                sync()
                t0 = time.perf_counter()
                model.image_encoder(x)
                sync()
                times[impl].append(time.perf_counter() - t0)
    diff = (outputs["fast"] - outputs["reference"]).abs().max().item()
    scale = outputs["reference"].abs().max().item()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{args.threads} threads"
    print(f"encoder {args.preset}, input {tuple(x.shape)}, {where}, {args.repeats} repeats")
    for impl, ts in times.items():
        print(f"  {impl:9s}  min {min(ts):7.3f} s   median {statistics.median(ts):7.3f} s")
    ratio = statistics.median(times["reference"]) / statistics.median(times["fast"])
    print(f"  speed-up fast vs straightforward (median): {ratio:.1f}x")
    ref = REFERENCE_CODE_S.get(args.threads)
    if ref and args.preset == "sam-med3d" and device.type == "cpu":
        print(f"  speed-up fast vs the reference code's {ref} s (FACTS.md §8): {ref / statistics.median(times['fast']):.1f}x")
    print(f"  max |fast - straightforward| = {diff:.2e} (relative {diff / scale:.2e})")


if __name__ == "__main__":
    main()
