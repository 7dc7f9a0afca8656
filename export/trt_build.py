"""ONNX -> TensorRT plans (``encoder.plan``, ``decoder.plan``) with the TensorRT Python API.

Works with TensorRT 10.x and 11.x:

* networks are created strongly typed (``1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED``;
  TensorRT 11 makes strong typing the only mode and ignores the flag, so it is set only
  when the enum still has the member). Precision therefore comes from the ONNX itself: an
  fp32 export gives fp32 engines, the mixed fp16 export gives fp16 engines with fp32 islands.
  No ``BuilderFlag.FP16`` (removed in 11.x); ``BuilderFlag.TF32``, on by default, is cleared
  where it exists, so that fp32 layers really run in fp32;
* one optimisation profile for the decoder's dynamic number of points: min 1, opt 5
  (or max_points if smaller), max ``max_points``, on every dynamic input (points, labels);
* a timing cache file, keyed by TensorRT version and GPU, read before and written after each
  build so that later builds (re-exports, the other network) reuse measured tactics;
* the TensorRT version, GPU name and compute capability go into the manifest.

TensorRT is imported lazily: ``ImportError`` (not installed) and ``OSError`` (wheel present,
``libnvinfer`` missing) both become one-line ``EngineError``s, as does a machine without a
CUDA GPU. Engines are specific to a GPU architecture and TensorRT version: ship the ONNX and
build on the target machine.
"""

from __future__ import annotations

import contextlib

import os
import re
import time
from pathlib import Path
from typing import Any, Callable

from bosam_cli.errors import EngineError
from engines.manifest import (
    DECODER_ONNX,
    DECODER_PLAN,
    ENCODER_ONNX,
    ENCODER_PLAN,
    load_manifest,
    sha256_file,
)

DEFAULT_OPT_POINTS = 5


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or EngineError when it is absent or its libraries do not load."""
    try:
        import tensorrt as trt  # noqa: PLC0415
    except ImportError as exc:
        raise EngineError(
            f"TensorRT is not installed here ({exc}); install it on a CUDA machine "
            "(pip install 'bosam[trt]'), or use the ONNX Runtime engines"
        ) from None
    except OSError as exc:
        raise EngineError(f"TensorRT is installed but its libraries do not load ({exc}); check the CUDA/TensorRT install") from None
    return trt


def cuda_device_scope(index: int) -> Any:
    """Makes CUDA device ``index`` current inside the block (TensorRT binds an engine to the
    device current when it is built or deserialised, and runs it there); a no-op without CUDA."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device(index)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return contextlib.nullcontext()


def cuda_device(index: int = 0) -> dict[str, Any]:
    """Name and compute capability of a CUDA GPU (EngineError when there is none)."""
    try:
        import torch
    except ImportError:
        raise EngineError("building TensorRT engines needs torch with CUDA to find the GPU") from None
    if not torch.cuda.is_available():
        raise EngineError("no CUDA GPU is visible here; TensorRT engines must be built on the GPU that will run them")
    if index >= torch.cuda.device_count():
        raise EngineError(f"CUDA device {index} does not exist ({torch.cuda.device_count()} visible)")
    major, minor = torch.cuda.get_device_capability(index)
    return {"index": index, "name": torch.cuda.get_device_name(index), "compute_capability": f"{major}.{minor}"}


def check_trt_prerequisites(device: int = 0) -> tuple[Any, dict[str, Any]]:
    """(tensorrt module, GPU description); EngineError when TensorRT or a CUDA GPU is missing."""
    trt = import_tensorrt()
    gpu = cuda_device(device)
    return trt, gpu


def default_timing_cache(trt_version: str, gpu: dict[str, Any]) -> Path:
    """``$XDG_CACHE_HOME/bosam/tensorrt/timing-<trt>-<gpu>-sm<cc>.cache`` (shared by all builds)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bosam" / "tensorrt"
    gpu_slug = re.sub(r"[^A-Za-z0-9]+", "-", str(gpu.get("name", "gpu"))).strip("-").lower()
    cc = str(gpu.get("compute_capability", "")).replace(".", "")
    return base / f"timing-trt{trt_version}-{gpu_slug}-sm{cc}.cache"


def _network_flags(trt: Any) -> int:
    flag_enum = getattr(trt, "NetworkDefinitionCreationFlag", None)
    member = getattr(flag_enum, "STRONGLY_TYPED", None) if flag_enum is not None else None
    return (1 << int(member)) if member is not None else 0


def _parse(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> Any:
    network = builder.create_network(_network_flags(trt))
    if network is None:
        raise EngineError("TensorRT could not create a network definition")
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        first = errors[0] if errors else "unknown error"
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise EngineError(f"TensorRT's ONNX parser rejected {onnx_path.name}: {first}{more}")
    return network, parser


def _profile_shapes(network: Any, max_points: int, opt_points: int) -> dict[str, tuple[tuple[int, ...], ...]]:
    """min/opt/max shapes for every input with dynamic axes; only axis 1 (points) may be dynamic."""
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(int(d) for d in tensor.shape)
        dynamic = [axis for axis, d in enumerate(dims) if d < 0]
        if not dynamic:
            continue
        if dynamic != [1]:
            raise EngineError(
                f"input '{tensor.name}' has dynamic axes {dynamic} {list(dims)}; only axis 1 (the points) may be dynamic"
            )

        def with_n(n: int, dims: tuple[int, ...] = dims) -> tuple[int, ...]:
            return tuple(n if axis == 1 else d for axis, d in enumerate(dims))

        shapes[tensor.name] = (with_n(1), with_n(opt_points), with_n(max_points))
    return shapes


def build_plan(
    trt: Any,
    onnx_path: Path,
    plan_path: Path,
    max_points: int,
    timing_cache: Path | None,
    workspace_gib: float | None = None,
    opt_points: int = DEFAULT_OPT_POINTS,
    logger: Any = None,
) -> dict[str, Any]:
    """Build one serialized engine; returns what the manifest records about it."""
    t0 = time.perf_counter()
    logger = logger or trt.Logger(trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # noqa: BLE001 - e.g. CUDA initialisation failure (NVIDIA/TensorRT #2913)
        raise EngineError(f"TensorRT could not create a builder ({exc}); is the CUDA driver working?") from None
    if builder is None:
        raise EngineError("TensorRT could not create a builder (is the CUDA driver working?)")
    network, _parser = _parse(trt, builder, logger, onnx_path)
    config = builder.create_builder_config()
    # TensorRT runs fp32 convolutions and matmuls in TF32 unless told otherwise (10 mantissa
    # bits: logits off by ~3e-4, more than an fp32 engine may differ from torch). A TensorRT
    # that no longer has or takes the flag builds as it does; the manifest says which.
    tf32 = getattr(getattr(trt, "BuilderFlag", None), "TF32", None)
    tf32_cleared = False
    if tf32 is not None:
        try:
            config.clear_flag(tf32)
            tf32_cleared = True
        except (AttributeError, TypeError, RuntimeError, ValueError):
            pass
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    reused = bool(cache_bytes)
    if config.set_timing_cache(cache, ignore_mismatch=False) is False:
        # a cache from another GPU or TensorRT build: start a fresh one rather than fail
        reused = False
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    shapes = _profile_shapes(network, max_points, min(opt_points, max_points))
    if shapes:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build an engine from {onnx_path.name} (see the TensorRT log above)")
    from bosam_cli.atomic import atomic_write_bytes

    atomic_write_bytes(plan_path, bytes(serialized))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return {
        "file": plan_path.name,
        "bytes": plan_path.stat().st_size,
        "sha256": sha256_file(plan_path),
        "onnx_sha256": sha256_file(onnx_path),
        "timing_cache_reused": reused,
        "tf32_cleared": tf32_cleared,
        "profile": {name: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for name, s in shapes.items()},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def build_trt_engines(
    onnx_dir: str | os.PathLike,
    max_points: int | None = None,
    *,
    workspace_gib: float | None = None,
    timing_cache: str | os.PathLike | None = None,
    opt_points: int = DEFAULT_OPT_POINTS,
    device: int = 0,
    check_readiness: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build ``encoder.plan`` and ``decoder.plan`` in an engine folder; returns the updated manifest.

    Args:
        onnx_dir: engine folder written by ``export_onnx``.
        max_points: profile max for the number of points (default: the manifest's max_points).
        workspace_gib: builder workspace limit (default: TensorRT's, the whole GPU memory).
        timing_cache: timing cache file (default: per TensorRT version and GPU, under
            ``~/.cache/bosam/tensorrt``); read before and updated after each build.
        opt_points: profile opt for the number of points (5: a few clicks).
        device: CUDA device index to build for.
        check_readiness: lint the ONNX files first and refuse on errors.
    """
    from .onnx_export import write_manifest

    log = log or (lambda _msg: None)
    folder = Path(onnx_dir)
    manifest = load_manifest(folder)
    trt, gpu = check_trt_prerequisites(device)
    max_points = int(max_points or manifest.get("max_points") or 64)
    if max_points > int(manifest.get("max_points") or max_points):
        raise EngineError(
            f"--max-points {max_points} exceeds the {manifest['max_points']} the ONNX was exported for; export again"
        )
    if check_readiness:
        from .readiness import check_trt_readiness

        for name in (ENCODER_ONNX, DECODER_ONNX):
            rep = check_trt_readiness(folder / name)
            if not rep.ok:
                raise EngineError(f"{folder / name} is not TensorRT-ready: {rep.errors[0]}")
    version = str(getattr(trt, "__version__", "unknown"))
    cache = Path(timing_cache) if timing_cache is not None else default_timing_cache(version, gpu)
    cache.parent.mkdir(parents=True, exist_ok=True)
    logger = trt.Logger(trt.Logger.WARNING)
    plans: dict[str, Any] = {}
    with cuda_device_scope(device):  # an engine is bound to the device current when it is built
        for onnx_name, plan_name in ((ENCODER_ONNX, ENCODER_PLAN), (DECODER_ONNX, DECODER_PLAN)):
            log(f"building TensorRT {plan_name} on {gpu['name']}")
            plans[plan_name] = build_plan(
                trt, folder / onnx_name, folder / plan_name, max_points, cache, workspace_gib, opt_points, logger
            )
    manifest["tensorrt"] = {
        "version": version,
        "gpu": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "strongly_typed": True,
        "network_flags": _network_flags(trt),
        "max_points": max_points,
        "opt_points": min(opt_points, max_points),
        "timing_cache": str(cache),
        "plans": plans,
    }
    manifest.setdefault("versions", {})["tensorrt"] = version
    write_manifest(folder, manifest)
    return manifest
