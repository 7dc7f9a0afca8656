"""Exports shared by the engine tests, made once per test session (tiny preset, seeded weights).

Session-scoped pytest fixtures defined in several modules would each run once; these helpers
cache in the module instead, so ``test_export``, ``test_engine_contract``, ``test_trt_fake`` and
``test_export_cli`` share one fp32 export (API) and one fp16 export (through the CLI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MAX_POINTS = 16
_CACHE: dict[str, Any] = {}


def ort_default_providers() -> set[str]:
    """What ONNX Runtime may run on when no device is asked for: CUDA where onnxruntime-gpu
    has it (when it really starts), else the CPU."""
    import onnxruntime as ort

    cuda = "CUDAExecutionProvider"
    return {"CPUExecutionProvider", cuda} if cuda in ort.get_available_providers() else {"CPUExecutionProvider"}


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m bosam_cli ARGS`` in a subprocess (two CPU threads, like the tests)."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "bosam_cli", *args],
        cwd=str(cwd or REPO), env=env, capture_output=True, text=True, timeout=timeout,
    )


def with_trained_rel_pos(model: Any, std: float = 0.2) -> Any:
    """Fill the relative-position tables, which a new model starts with at zero, with random
    values as trained weights have them: an export that got the relative-position term wrong
    passes on zero tables."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".rel_pos_" in name:
                p.normal_(0.0, std)
    return model


def tiny_checkpoint(factory: Any) -> Path:
    """A seeded tiny model saved as a bosam checkpoint (its sha256 identifies the exports)."""
    if "ckpt" not in _CACHE:
        import torch

        from bosam_cli.checkpoints import save_checkpoint
        from bosam_cli.model import build_preset

        torch.manual_seed(1234)
        model = with_trained_rel_pos(build_preset("tiny").eval())
        path = factory.mktemp("ckpt") / "tiny-test.pth"
        save_checkpoint(model, path)
        _CACHE["ckpt"] = path
    return _CACHE["ckpt"]


def other_checkpoint(factory: Any) -> Path:
    """A second tiny checkpoint with different weights."""
    if "other" not in _CACHE:
        import torch

        from bosam_cli.checkpoints import save_checkpoint
        from bosam_cli.model import build_preset

        torch.manual_seed(99)
        path = factory.mktemp("ckpt-other") / "tiny-other.pth"
        save_checkpoint(build_preset("tiny").eval(), path)
        _CACHE["other"] = path
    return _CACHE["other"]


def tiny_model(factory: Any) -> Any:
    """The model of ``tiny_checkpoint``, loaded (CPU, eval)."""
    if "model" not in _CACHE:
        from bosam_cli.checkpoints import load_model

        _CACHE["model"] = load_model(tiny_checkpoint(factory))
    return _CACHE["model"]


def tiny_export(factory: Any) -> tuple[Path, dict[str, Any]]:
    """fp32 export of the tiny checkpoint through ``export_onnx`` (max_points 16)."""
    if "fp32" not in _CACHE:
        from export import export_onnx

        out = factory.mktemp("engines") / "tiny-test"
        manifest = export_onnx(str(tiny_checkpoint(factory)), out, max_points=MAX_POINTS)
        _CACHE["fp32"] = (out, manifest)
    return _CACHE["fp32"]


def fp16_cli_export(factory: Any) -> tuple[subprocess.CompletedProcess, Path, dict[str, Any] | None]:
    """fp16 export of the tiny checkpoint through ``bosam export`` (max_points 8)."""
    if "fp16" not in _CACHE:
        out = factory.mktemp("engines-fp16") / "tiny-fp16"
        proc = run_cli(
            "export", "--checkpoint", str(tiny_checkpoint(factory)), "-o", str(out),
            "--precision", "fp16", "--max-points", "8", "--threads", "2",
        )
        manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else None
        _CACHE["fp16"] = (proc, out, manifest)
    return _CACHE["fp16"]

