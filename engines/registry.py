"""Open an engine by kind: torch, onnxruntime, tensorrt, or auto (the fastest that works here).

Engine folders are checked against what the caller asked for (``engines.manifest``): a folder
exported from another checkpoint (sha256), another preset or precision, or by another bosam
version is refused. ``auto`` picks, in order: TensorRT (tensorrt imports, a CUDA GPU, plans in
the folder), ONNX Runtime with CUDA (only if the CUDA provider really starts), ONNX Runtime on
the CPU (ONNX files in the folder), and finally torch. Without ``engine_dir`` the folder is
``engines/<checkpoint stem or preset>[-fp16]`` under the working directory, as ``bosam export``
writes it; ``auto`` skips a default folder that does not match (with a note in
``info.details["auto"]``) but refuses an explicitly given one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bosam_cli.errors import EngineError

from .manifest import (
    DECODER_ONNX,
    DECODER_PLAN,
    ENCODER_ONNX,
    ENCODER_PLAN,
    MANIFEST_NAME,
    check_manifest,
    default_engine_dir,
    load_manifest,
    sha256_file,
)

KINDS = ("torch", "onnxruntime", "tensorrt", "auto")
ALIASES = {"ort": "onnxruntime", "onnx": "onnxruntime", "trt": "tensorrt", "pytorch": "torch"}


def _cuda_index(device: str | None) -> int:
    if device is None or device == "cuda":
        return 0
    if device.startswith("cuda:"):
        try:
            return int(device.split(":", 1)[1])
        except ValueError:
            pass
    raise EngineError(f"TensorRT runs on a CUDA device ('cuda' or 'cuda:N'), not {device!r}")


def _open_torch(checkpoint: Any, preset: str | None, device: str | None, precision: str | None) -> Any:
    from .torch_engine import TorchEngine

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "tensorrt":  # ONNX Runtime's TensorRT provider; torch has no such device
        raise EngineError("--device tensorrt selects ONNX Runtime's TensorRT provider, which needs an engine folder "
                          "(bosam export); no usable folder was found, and torch runs on cpu or cuda")
    try:
        return TorchEngine.from_checkpoint(
            str(checkpoint) if checkpoint is not None else None, preset=preset, device=device, precision=precision or "fp32"
        )
    except ValueError as exc:
        if isinstance(exc, EngineError) or type(exc).__module__.startswith("bosam_cli"):
            raise
        raise EngineError(str(exc)) from None


def open_engine(
    kind: str = "auto",
    checkpoint: str | os.PathLike | None = None,
    engine_dir: str | os.PathLike | None = None,
    device: str | None = None,
    precision: str | None = None,
    threads: int | None = None,
    preset: str | None = None,
) -> Any:
    """An engine with ``encode``/``decode`` and ``.info``.

    Args:
        kind: "torch", "onnxruntime", "tensorrt" or "auto".
        checkpoint: weights; engine folders must have been exported from this exact file.
        engine_dir: engine folder (default: ``engines/<checkpoint stem or preset>[-fp16]``).
        device: "cpu", "cuda", "cuda:N" (ONNX Runtime also takes "tensorrt" for its TensorRT
            provider); None lets the engine choose (GPU when one really works).
        precision: for torch "fp32"/"bf16"/"fp16"; for engine folders the precision they must
            have been exported with (None: whatever the folder holds).
        threads: CPU threads (ONNX Runtime intra-op threads; torch's are the process's).
        preset: model preset for torch without a checkpoint, and the preset a folder must hold.
    """
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise EngineError(f"unknown engine {kind!r}; choose one of {', '.join(KINDS)}")
    if kind == "torch":
        return _open_torch(checkpoint, preset, device, precision)
    if precision == "bf16":  # engine folders are exported in fp32 or fp16; only torch computes in bf16
        if kind != "auto" or engine_dir is not None:
            raise EngineError("--precision bf16: only the torch engine runs bf16 (engine folders hold fp32 or fp16 "
                              "graphs); use --engine torch, or --precision fp16 with a folder exported with it")
        engine = _open_torch(checkpoint, preset, device, precision)
        engine.info.details["auto"] = ["--precision bf16: torch (engine folders hold fp32 or fp16 graphs)"]
        return engine

    if checkpoint is not None and not Path(checkpoint).is_file():
        raise EngineError(f"{checkpoint}: no such checkpoint file")
    ckpt_sha = sha256_file(checkpoint) if checkpoint is not None else None
    explicit = engine_dir is not None
    folder = Path(engine_dir) if explicit else default_engine_dir(checkpoint, preset, precision or "fp32")

    if kind in ("onnxruntime", "tensorrt"):
        if kind == "tensorrt":  # say first that TensorRT is missing, before any engine folder is looked for
            from export.trt_build import import_tensorrt

            import_tensorrt()
        manifest = load_manifest(folder)
        check_manifest(manifest, folder, checkpoint, preset, precision, ckpt_sha)
        if kind == "onnxruntime":
            from .ort_engine import OrtEngine

            return _with_checkpoint_path(OrtEngine(folder, providers=device, threads=threads, manifest=manifest),
                                         checkpoint, manifest)
        from .trt_engine import TrtEngine

        return _with_checkpoint_path(TrtEngine(folder, device=_cuda_index(device), manifest=manifest), checkpoint, manifest)

    # auto
    notes: list[str] = []
    manifest: dict[str, Any] | None = None
    if (folder / MANIFEST_NAME).is_file() or explicit:
        try:
            manifest = load_manifest(folder)
            check_manifest(manifest, folder, checkpoint, preset, precision, ckpt_sha)
        except EngineError as exc:
            if explicit:
                raise
            notes.append(f"skipped {folder}: {exc}")
            manifest = None
    else:
        notes.append(f"no engine folder at {folder} (bosam export writes one)")
    engine: Any = None
    if manifest is not None:
        engine = _auto_from_folder(folder, manifest, device, threads, notes)
        if engine is not None:
            _with_checkpoint_path(engine, checkpoint, manifest)
    if engine is None:
        engine = _open_torch(checkpoint, preset or (manifest or {}).get("preset"), device, precision)
    engine.info.details["auto"] = notes
    return engine


def _with_checkpoint_path(engine: Any, checkpoint: str | os.PathLike | None, manifest: dict[str, Any]) -> Any:
    """Record the checkpoint a folder engine was opened for (its sha256 was checked against the
    folder's; without one, the path the folder was exported from), so that manifests name the
    weights whatever the engine."""
    path = checkpoint if checkpoint is not None else manifest.get("checkpoint_path")
    if path is not None:
        engine.info.details.setdefault("checkpoint_path", str(path))
    return engine


def _auto_from_folder(folder: Path, manifest: dict[str, Any], device: str | None, threads: int | None, notes: list[str]) -> Any:
    want_gpu = device is None or device.startswith("cuda") or device == "tensorrt"
    want_cpu = device is None or device == "cpu"
    if want_gpu:
        from bosam_cli.runtime_info import tensorrt_version

        if not manifest.get("tensorrt"):
            notes.append("tensorrt: no plans in the folder (bosam export --trt)")
        elif not all((folder / p).is_file() for p in (ENCODER_PLAN, DECODER_PLAN)):
            notes.append("tensorrt: plan files missing")
        elif tensorrt_version() is None:
            notes.append("tensorrt: not installed")
        else:
            try:
                from .trt_engine import TrtEngine

                return TrtEngine(folder, device=_cuda_index(None if device in (None, "tensorrt") else device), manifest=manifest)
            except EngineError as exc:
                notes.append(f"tensorrt: {exc}")
    if not all((folder / f).is_file() for f in (ENCODER_ONNX, DECODER_ONNX)):
        notes.append("onnxruntime: ONNX files missing")
        return None
    try:
        import onnxruntime as ort
    except ImportError:
        notes.append("onnxruntime: not installed")
        return None
    from .ort_engine import CUDA, OrtEngine

    if want_gpu and CUDA in ort.get_available_providers():
        try:
            return OrtEngine(folder, providers=device if device and device.startswith("cuda") else "cuda",
                             threads=threads, manifest=manifest)
        except EngineError as exc:
            notes.append(f"onnxruntime cuda: {exc}")
    elif want_gpu:
        notes.append("onnxruntime cuda: provider not in this onnxruntime build")
    if want_cpu:
        return OrtEngine(folder, providers="cpu", threads=threads, manifest=manifest)
    return None
