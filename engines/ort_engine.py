"""The ONNX Runtime engine: CPU, CUDA or TensorRT execution providers over an engine folder.

ONNX Runtime silently falls back to the CPU when a GPU provider cannot start (missing CUDA or
cuDNN libraries), so the providers reported in ``info`` are the ones the sessions *really*
use (``session.get_providers()``); asking explicitly for "cuda" or "tensorrt" and getting the
CPU raises instead. With a CUDA provider the embedding stays on the GPU as an ``OrtValue``
between clicks (IOBinding); on the CPU it is a NumPy array. No torch is needed here.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bosam_cli.errors import EngineError

from .base import Embedding, EngineInfo, check_decode_inputs, check_embedding, check_image
from .manifest import (
    DECODER_ONNX,
    ENCODER_ONNX,
    check_files,
    check_io_shapes,
    load_manifest,
)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
PROVIDER_ALIASES: dict[str, tuple[str, ...]] = {
    "cpu": (CPU,),
    "cuda": (CUDA, CPU),
    "tensorrt": (TENSORRT, CUDA, CPU),
}
GPU_PROVIDERS = (CUDA, TENSORRT)


def resolve_providers(providers: str | Sequence[str] | None) -> tuple[tuple[str, ...], bool]:
    """(provider list, strict): strict when the caller named a GPU runtime explicitly by alias."""
    if providers is None:
        return (CUDA, CPU), False
    if isinstance(providers, str):
        key = providers.lower()
        if key.startswith("cuda:"):
            key = "cuda"
        if key not in PROVIDER_ALIASES:
            raise EngineError(f"unknown ONNX Runtime device {providers!r}; use cpu, cuda or tensorrt")
        return PROVIDER_ALIASES[key], key != "cpu"
    return tuple(providers), False


def _provider_options(provider: str, device_id: int, folder: Path, max_points: int | None) -> dict[str, Any]:
    """Options of one execution provider. The CUDA provider runs fp32 as fp32 (no TF32), as
    torch on the CPU does. ORT's TensorRT provider otherwise builds its engines
    again in every session, and again whenever the number of points leaves the range it has seen
    (each new click): so it gets the decoder's point range as its optimisation profile (1 / 5 /
    max, as ``bosam export --trt``) and an engine and timing cache beside the ONNX files (in the
    user's cache when that folder is read-only)."""
    if provider not in GPU_PROVIDERS:
        return {}
    opts: dict[str, Any] = {"device_id": device_id}
    if provider == CUDA:
        opts["use_tf32"] = 0  # on by default: fp32 convolutions and matmuls would run in TF32
    if provider != TENSORRT:
        return opts
    cache = folder / "ort_trt_cache"
    if not os.access(folder, os.W_OK):
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bosam" / "ort_trt" / folder.resolve().name
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineError(f"{cache}: cannot create the TensorRT engine cache ({exc.strerror})") from None
    opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache), trt_timing_cache_enable=True,
                trt_timing_cache_path=str(cache))
    if max_points is not None:
        def shapes(n: int) -> str:
            return f"points:1x{n}x3,labels:1x{n}"

        opts.update(trt_profile_min_shapes=shapes(1), trt_profile_opt_shapes=shapes(min(5, max_points)),
                    trt_profile_max_shapes=shapes(max_points))
    return opts


def _device_id(providers: str | Sequence[str] | None) -> int:
    if isinstance(providers, str) and providers.lower().startswith("cuda:"):
        try:
            return int(providers.split(":", 1)[1])
        except ValueError:
            raise EngineError(f"bad CUDA device {providers!r}") from None
    return 0


class OrtEngine:
    """Runs ``encoder.onnx`` / ``decoder.onnx`` of an engine folder with ONNX Runtime.

    Args:
        onnx_dir: the engine folder (``manifest.json`` + the two ONNX files).
        providers: a sequence of execution-provider names (ORT order of preference), or "cpu",
            "cuda" ("cuda:N"), "tensorrt". Default: CUDA if it really starts, else CPU.
        threads: intra-op threads (None: ORT's default, one per physical core).
        manifest: an already-read manifest (default: read ``onnx_dir/manifest.json``).
        spinning: let ORT's intra-op threads spin between runs. Off by default: spinning
            steals the CPU from torch and from other processes between clicks; on, an
            ORT-only process on an idle machine saves a few ms per call.
    """

    def __init__(
        self,
        onnx_dir: str | os.PathLike,
        providers: str | Sequence[str] | None = None,
        threads: int | None = None,
        manifest: dict[str, Any] | None = None,
        spinning: bool = False,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise EngineError(
                "onnxruntime is not installed: pip install 'bosam[cpu]' (or 'bosam[gpu]' for CUDA)"
            ) from None
        from bosam_cli.runtime_info import ort_conflict

        conflict = ort_conflict()
        if conflict:
            warnings.warn(conflict, RuntimeWarning, stacklevel=2)
        self.ort = ort
        self.dir = Path(onnx_dir)
        self.manifest = manifest if manifest is not None else load_manifest(self.dir)
        check_files(self.manifest, self.dir, (ENCODER_ONNX, DECODER_ONNX))
        wanted, strict = resolve_providers(providers)
        available = set(ort.get_available_providers())
        requested = [p for p in wanted if p in available] or [CPU]
        if strict and not any(p in available for p in wanted if p != CPU):
            raise EngineError(
                f"ONNX Runtime here has no {wanted[0]} (available: {', '.join(sorted(available))}); "
                "install onnxruntime-gpu (bosam[gpu]) or use --device cpu"
            )
        device_id = _device_id(providers)
        max_points = int(self.manifest["max_points"])  # validated when the manifest was read
        enc_opts = [_provider_options(p, device_id, self.dir, None) for p in requested]
        dec_opts = [_provider_options(p, device_id, self.dir, max_points) for p in requested]

        so = ort.SessionOptions()
        # ORT's pool spins after each run; with torch in the same process that doubles torch's
        # latency (TOOLCHAIN.md), and it burns a core between clicks.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = int(threads)
            so.inter_op_num_threads = 1
        try:
            self.enc = ort.InferenceSession(str(self.dir / ENCODER_ONNX), so, providers=requested, provider_options=enc_opts)
            self.dec = ort.InferenceSession(str(self.dir / DECODER_ONNX), so, providers=requested, provider_options=dec_opts)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise EngineError(f"{self.dir}: ONNX Runtime cannot load the engines: {first}") from None
        active = list(self.dec.get_providers())
        self.providers = active
        self.on_gpu = active[0] in GPU_PROVIDERS
        if strict and not self.on_gpu:
            raise EngineError(
                f"asked ONNX Runtime for {wanted[0]} but it fell back to {active[0]} "
                "(CUDA/cuDNN libraries missing or no GPU); use --device cpu or fix the CUDA install"
            )
        if strict and wanted[0] == TENSORRT and active[0] != TENSORRT:
            raise EngineError(
                f"asked ONNX Runtime for {TENSORRT} but it runs on {active[0]} (TensorRT libraries missing, or "
                "a TensorRT that this ONNX Runtime was not built for: TensorRT 11 needs onnxruntime-gpu 1.27 or newer); "
                "use --device cuda, or the tensorrt engine (bosam export --trt)"
            )
        self.device_id = device_id
        man = self.manifest
        self.img_size = int(man["img_size"])
        self.mask_size = int(man["mask_size"])
        self.max_points = int(man["max_points"])
        check_io_shapes(man, self.dir, ENCODER_ONNX, DECODER_ONNX,
                        {v.name: v.shape for v in (*self.enc.get_inputs(), *self.enc.get_outputs())},
                        {v.name: v.shape for v in (*self.dec.get_inputs(), *self.dec.get_outputs())})
        embed_shape = tuple(man.get("embed_shape") or self.enc.get_outputs()[0].shape)
        # the checkpoint's spacing, HU clamp and click feeding, as exported (segment reads them)
        self.metadata = dict(self.manifest.get("model_metadata") or {})
        self.info = EngineInfo(
            name="onnxruntime",
            device=f"cuda:{device_id}" if self.on_gpu else "cpu",
            precision=man.get("precision", "fp32"),
            img_size=self.img_size,
            mask_size=self.mask_size,
            embed_shape=tuple(int(v) for v in embed_shape[1:]),
            checkpoint_sha256=man.get("checkpoint_sha256"),
            preset=man.get("preset"),
            details={
                "providers": active,
                "providers_requested": list(wanted),
                "threads": threads,
                "spinning": spinning,
                "engine_dir": str(self.dir),
                "onnxruntime": ort.__version__,
                "exporter": man.get("exporter"),
                "opset": man.get("opset"),
                "ort_conflict": conflict,
            },
        )

    # ------------------------------------------------------------------------------------------
    def encode(self, image: np.ndarray) -> Embedding:
        image = check_image(image, self.img_size)
        if self.on_gpu:
            io = self.enc.io_binding()
            io.bind_cpu_input("image", image)
            io.bind_output("embedding", "cuda", self.device_id)
            self.enc.run_with_iobinding(io)
            value = io.get_outputs()[0]  # OrtValue in GPU memory
            return Embedding(value, tuple(value.shape()), "onnxruntime")
        (emb,) = self.enc.run(["embedding"], {"image": image})
        return Embedding(np.ascontiguousarray(emb, dtype=np.float32), tuple(emb.shape), "onnxruntime")

    def decode(
        self, embedding: Embedding, points: np.ndarray, labels: np.ndarray, mask_prompt: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        check_embedding(embedding, "onnxruntime")
        points, labels, mask_prompt = check_decode_inputs(points, labels, mask_prompt, self.mask_size)
        feeds = {"points": points, "labels": labels, "mask_prompt": mask_prompt}
        if self.on_gpu:
            io = self.dec.io_binding()
            if isinstance(embedding.data, np.ndarray):
                io.bind_cpu_input("embedding", embedding.data)
            else:
                io.bind_ortvalue_input("embedding", embedding.data)
            for name, arr in feeds.items():
                io.bind_cpu_input(name, arr)
            io.bind_output("low_res_logits")
            io.bind_output("iou")
            self.dec.run_with_iobinding(io)
            logits, iou = io.copy_outputs_to_cpu()
        else:
            data = embedding.data
            if not isinstance(data, np.ndarray):
                data = data.numpy()
            logits, iou = self.dec.run(None, {"embedding": data, **feeds})
        return np.asarray(logits, dtype=np.float32), np.asarray(iou, dtype=np.float32)
