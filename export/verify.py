"""Verification of an exported engine folder: ONNX Runtime (CPU) against PyTorch fp32 eager.

Fixed, seeded random inputs: a z-scored-like image, clicks at random voxels, and for the
decoder N = 1 (first click, zero mask prompt), N = 5 (mask prompt = the previous step's logits),
N = max_points (random mask prompt, trailing -1 padding). Decoder cases feed the *torch*
embedding to both sides so that they measure the decoder alone; one end-to-end case runs the
ONNX encoder into the ONNX decoder.

Tolerances (``allowed = atol + rtol * max|reference|``; "max_rel" below is max|diff| / max|ref|):

* fp32: atol 1e-4, rtol 1e-4. ORT and torch differ only in summation order: about 1e-7
  relative per op, measured 6e-6..8e-6 absolute on the full encoder and 3e-7 on decoder
  logits (TOOLCHAIN.md). For logits of O(1..10) this allows ~1e-3, a >100x margin, while a
  real export bug (a swapped axis, a lost bias, a wrong mask arithmetic) moves outputs by
  O(0.1..1) and fails.
* fp16 (mixed): atol 2e-2, rtol 2e-2, mask Dice (logits > 0) >= 0.98. fp16 keeps 11
  significant bits (unit roundoff 4.9e-4); rounding activations and weights at every fp16
  op through a 12-block encoder and the two-way decoder gives errors of a few 1e-3 relative
  to the output scale; 2e-2 leaves ~5x margin yet catches an fp16 overflow or a broken fp32
  island (errors of O(1)). Dice >= 0.98 says at most ~2 % of the mask boundary voxels flip,
  the same order as the disagreement between two annotators' bone masks at 1.5 mm.

Note: ORT's CPU provider lacks many fp16 kernels and runs them in fp32 between inserted
casts, so on CPU the fp16 check measures fp16 storage rounding, not fp16 accumulation; a
TensorRT engine built from the same ONNX accumulates in fp32 for matmuls and convolutions too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engines.manifest import DECODER_ONNX, ENCODER_ONNX

TOLERANCES = {
    "fp32": {"atol": 1e-4, "rtol": 1e-4, "dice_min": 0.99},
    "fp16": {"atol": 2e-2, "rtol": 2e-2, "dice_min": 0.98},
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def compare(got: np.ndarray, ref: np.ndarray, atol: float, rtol: float) -> dict[str, Any]:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        raise ValueError(f"shape {got.shape} differs from the reference's {ref.shape}")
    diff = np.abs(got - ref)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    max_abs = float(diff.max()) if diff.size else 0.0
    allowed = atol + rtol * scale
    finite = bool(np.isfinite(got).all())
    return {
        "max_abs": max_abs,
        "max_rel": max_abs / scale if scale > 0 else max_abs,
        "ref_max_abs": scale,
        "allowed_abs": allowed,
        "passed": finite and max_abs <= allowed,
    }


def ort_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def decoder_cases(model: Any, max_points: int, seed: int) -> list[dict[str, Any]]:
    """The fixed decoder inputs (NumPy), without mask prompts that depend on earlier outputs."""
    rng = np.random.default_rng(seed + 1)
    s, m = model.img_size, model.mask_size

    def pts(n: int) -> np.ndarray:
        return (rng.random((1, n, 3)) * (s - 1)).astype(np.float32)

    n_mid = min(5, max_points)
    labels_mid = np.array([[1] + [int(v) for v in rng.integers(0, 2, n_mid - 1)]], dtype=np.int64)
    n_pad = max(1, max_points // 4)
    labels_max = np.array(
        [[1] + [int(v) for v in rng.integers(0, 2, max_points - 1 - n_pad)] + [-1] * n_pad], dtype=np.int64
    )
    return [
        {"case": "N=1, zero mask", "points": pts(1), "labels": np.ones((1, 1), np.int64),
         "mask_prompt": np.zeros((1, 1, m, m, m), np.float32)},
        {"case": f"N={n_mid}, prev. logits", "points": pts(n_mid), "labels": labels_mid,
         "mask_prompt": None},
        {"case": f"N={max_points}, rand. mask, {n_pad} pad", "points": pts(max_points), "labels": labels_max,
         "mask_prompt": (rng.standard_normal((1, 1, m, m, m)) * 4).astype(np.float32)},
    ]


def verify_export(
    model: Any, folder: str | Path, precision: str, max_points: int, seed: int = 0, threads: int | None = None
) -> dict[str, Any]:
    """Run both ONNX files in ORT CPU and torch fp32; per-case differences, Dice and a verdict."""
    import onnxruntime as ort
    import torch

    folder = Path(folder)
    tol = TOLERANCES[precision]
    atol, rtol = tol["atol"], tol["rtol"]
    cases: list[dict[str, Any]] = []
    g = torch.Generator().manual_seed(seed)
    s = model.img_size
    image = torch.randn(1, 1, s, s, s, generator=g)
    image_np = image.numpy()

    enc = ort_session(folder / ENCODER_ONNX, threads)
    with torch.inference_mode():
        emb_ref = model.image_encoder(image)
    (emb_ort,) = enc.run(None, {"image": image_np})
    emb_ref_np = emb_ref.numpy()
    cases.append({"component": "encoder", "case": "random image", "output": "embedding",
                  **compare(emb_ort, emb_ref_np, atol, rtol)})
    del enc

    dec = ort_session(folder / DECODER_ONNX, threads)

    def run_torch(emb: torch.Tensor, c: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            lo, io = model.decode(
                emb, torch.from_numpy(c["points"]), torch.from_numpy(c["labels"]), torch.from_numpy(c["mask_prompt"])
            )
        return lo.numpy(), io.numpy()

    def run_ort(emb: np.ndarray, c: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        lo, io = dec.run(None, {"embedding": emb, "points": c["points"], "labels": c["labels"],
                                "mask_prompt": c["mask_prompt"]})
        return lo, io

    prev: np.ndarray | None = None
    for c in decoder_cases(model, max_points, seed):
        if c["mask_prompt"] is None:
            c["mask_prompt"] = prev
        lo_ref, io_ref = run_torch(emb_ref, c)
        lo, io = run_ort(emb_ref_np, c)
        prev = lo_ref
        cl = compare(lo, lo_ref, atol, rtol)
        d = dice(lo > 0, lo_ref > 0)
        cl["dice"] = d
        cl["ref_foreground"] = float((lo_ref > 0).mean())
        cl["passed"] = cl["passed"] and d >= tol["dice_min"]
        cases.append({"component": "decoder", "case": c["case"], "output": "logits", **cl})
        cases.append({"component": "decoder", "case": c["case"], "output": "iou", **compare(io, io_ref, atol, rtol)})

    # end to end: ONNX encoder -> ONNX decoder against torch encoder -> torch decoder
    c = decoder_cases(model, max_points, seed)[1]
    c["mask_prompt"] = np.zeros_like(prev)
    lo_ref, _ = run_torch(emb_ref, c)
    lo, _ = run_ort(np.ascontiguousarray(emb_ort, dtype=np.float32), c)
    cl = compare(lo, lo_ref, atol, rtol)
    cl["dice"] = dice(lo > 0, lo_ref > 0)
    cl["ref_foreground"] = float((lo_ref > 0).mean())
    cl["passed"] = cl["passed"] and cl["dice"] >= tol["dice_min"]
    cases.append({"component": "end-to-end", "case": c["case"].split(",")[0], "output": "logits", **cl})

    return {
        "reference": "torch fp32 eager (CPU)",
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
        "seed": seed,
        "precision": precision,
        "tolerance": dict(tol, rule="max|onnx - torch| <= atol + rtol * max|torch|; Dice of logits > 0"),
        "cases": cases,
        "passed": all(c["passed"] for c in cases),
    }
