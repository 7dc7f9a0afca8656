"""Latency of an engine: encoder per window, decoder per click (1 and 10 points).

Pure timing over the engine interface (NumPy in and out, so host<->device copies are part of
a click's cost). Each decoder call feeds the previous call's logits back as the mask prompt,
as a real session does. Reports median and min over repeats; never used as a test assertion.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Any, Sequence

import numpy as np


def stats(seconds: Sequence[float], scale: float = 1.0) -> dict[str, Any]:
    xs = [s * scale for s in seconds]
    return {"median": statistics.median(xs), "min": min(xs), "n": len(xs)}


def bench_engine(
    engine: Any,
    repeats: int = 3,
    decoder_repeats: int = 20,
    points: Sequence[int] = (1, 10),
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Time ``engine.encode`` (seconds) and ``engine.decode`` per click (milliseconds)."""
    info = engine.info
    s, m = info.img_size, info.mask_size
    rng = np.random.default_rng(seed)
    image = rng.standard_normal((1, 1, s, s, s)).astype(np.float32)
    enc_times: list[float] = []
    emb = None
    for i in range(warmup + max(1, repeats)):
        t0 = time.perf_counter()
        emb = engine.encode(image)
        dt = time.perf_counter() - t0
        if i >= warmup:
            enc_times.append(dt)
    decoder: dict[str, Any] = {}
    for n in points:
        pts = (rng.random((1, n, 3)) * (s - 1)).astype(np.float32)
        labels = np.ones((1, n), np.int64)
        labels[0, 1:] = rng.integers(0, 2, n - 1)
        mask = np.zeros((1, 1, m, m, m), np.float32)
        times: list[float] = []
        for i in range(2 * warmup + max(1, decoder_repeats)):
            t0 = time.perf_counter()
            mask, _iou = engine.decode(emb, pts, labels, mask)
            dt = time.perf_counter() - t0
            if i >= 2 * warmup:
                times.append(dt)
        decoder[str(n)] = stats(times, 1e3)
    return {
        "engine": info.name,
        "device": info.device,
        "precision": info.precision,
        "preset": info.preset,
        "details": {k: v for k, v in info.details.items() if k in ("providers", "threads", "gpu", "tensorrt", "onnxruntime", "auto")},
        "encoder_s": stats(enc_times),
        "decoder_ms": decoder,
    }


def machine_info(threads: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
    }
    try:
        out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return out


def _cpu_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
