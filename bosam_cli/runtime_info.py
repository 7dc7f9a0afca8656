"""What is installed and usable here: versions, runtimes, devices (for info, manifests, bench)."""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
import sys
from typing import Any

from . import __version__


#: the most CPU threads a --threads option takes (torch crashes, without a word, far above)
MAX_THREADS = 1024


def dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def ort_conflict() -> str | None:
    """A warning when both onnxruntime and onnxruntime-gpu are installed (they overwrite each other)."""
    cpu, gpu = dist_version("onnxruntime"), dist_version("onnxruntime-gpu")
    if cpu and gpu:
        return (
            f"both onnxruntime {cpu} and onnxruntime-gpu {gpu} are installed; they share one module and "
            "clobber each other: uninstall both, then install only one (bosam[cpu] or bosam[gpu])"
        )
    return None


def versions(with_torch: bool = True) -> dict[str, Any]:
    """Versions of bosam and of the libraries it runs on (imports torch unless told not to)."""
    out: dict[str, Any] = {
        "bosam": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "numpy": dist_version("numpy"),
        "nibabel": dist_version("nibabel"),
        "onnx": dist_version("onnx"),
        "onnxruntime": dist_version("onnxruntime") or dist_version("onnxruntime-gpu"),
    }
    if with_torch:
        import torch

        out["torch"] = torch.__version__
    trt = tensorrt_installed_version()
    if trt:
        out["tensorrt"] = trt
    return out


TENSORRT_DISTS = ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11")


def tensorrt_installed_version() -> str | None:
    """TensorRT's version as installed, without importing it (loading its CUDA libraries takes
    seconds and every manifest asks): the imported module's if some code has already loaded it."""
    if "tensorrt" in sys.modules:
        return getattr(sys.modules["tensorrt"], "__version__", "unknown")
    for name in TENSORRT_DISTS:
        found = dist_version(name)
        if found:
            return found
    return None


def tensorrt_version() -> str | None:
    """TensorRT's version if it imports here (libraries present), else None."""
    if "tensorrt" in sys.modules:
        return getattr(sys.modules["tensorrt"], "__version__", "unknown")
    if importlib.util.find_spec("tensorrt") is None:
        return None
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError):
        return None
    return getattr(trt, "__version__", "unknown")


def ort_providers() -> list[str]:
    """Execution providers compiled into the installed onnxruntime (not proof that they work)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return []
    return list(ort.get_available_providers())


def cuda_devices() -> list[dict[str, Any]]:
    import torch

    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devices.append(
                {
                    "index": i,
                    "name": p.name,
                    "compute_capability": f"{p.major}.{p.minor}",
                    "memory_gib": round(p.total_memory / 2**30, 1),
                }
            )
    return devices


def info_report(checkpoint: str | None = None) -> dict[str, Any]:
    """Everything ``bosam info`` shows: versions, runtimes, devices, and a checkpoint's facts."""
    report: dict[str, Any] = {"versions": versions()}
    report["onnxruntime_providers"] = ort_providers()
    report["cuda_devices"] = cuda_devices()
    warning = ort_conflict()
    report["warnings"] = [warning] if warning else []
    if checkpoint is not None:
        from .checkpoints import detect_preset, read_checkpoint

        ck = read_checkpoint(checkpoint)
        meta = ck.metadata
        preset = meta.get("preset") if isinstance(meta.get("arch"), dict) else None
        preset = preset or detect_preset(ck.state_dict, ck.path)
        report["checkpoint"] = {
            "path": str(ck.path),
            "sha256": ck.sha256,
            "layout": ck.layout,
            "preset": preset,
            "parameters": int(
                sum(v.numel() for k, v in ck.state_dict.items() if not k.endswith("gaussian_matrix"))
            ),
            "tensors": len(ck.state_dict),
            "conversions": ck.notes,
            "other_entries": ck.extra_keys,
            "metadata": meta,
        }
    return report
