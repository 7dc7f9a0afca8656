"""The TensorRT engine: deserialised ``encoder.plan`` / ``decoder.plan`` with device buffers.

Device memory is held by torch CUDA tensors (``_TorchCudaMemory``); the embedding an ``encode``
returns is one of them and stays on the GPU, so a click copies only the points, labels and
the 32^3 mask prompt in and the logits out. The number of points is set per call with
``IExecutionContext.set_input_shape`` (the decoder plan has one optimisation profile,
1..max_points). TensorRT and torch are imported lazily.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from bosam_cli.errors import EngineError

from .base import Embedding, EngineInfo, check_decode_inputs, check_embedding, check_image
from .manifest import DECODER_PLAN, ENCODER_PLAN, check_files, check_io_shapes, load_manifest

#: TensorRT DataType member name -> torch dtype name
_TRT_TO_TORCH = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT32": "int32",
    "INT64": "int64",
    "INT8": "int8",
    "UINT8": "uint8",
    "BOOL": "bool",
}


def _dtype_name(trt_dtype: Any) -> str:
    name = getattr(trt_dtype, "name", None) or str(trt_dtype).rsplit(".", 1)[-1]
    if name not in _TRT_TO_TORCH:
        raise EngineError(f"unsupported TensorRT I/O type {name}")
    return _TRT_TO_TORCH[name]


class _TorchCudaMemory:
    """Device buffers and a stream, from torch (the one GPU library bosam already depends on)."""

    def __init__(self, device: int = 0) -> None:
        try:
            import torch
        except ImportError:
            raise EngineError("the TensorRT engine needs torch with CUDA for its device buffers") from None
        if not torch.cuda.is_available():
            raise EngineError("no CUDA GPU is visible here; the TensorRT engine needs one")
        if not 0 <= device < torch.cuda.device_count():
            raise EngineError(f"CUDA device {device} does not exist ({torch.cuda.device_count()} visible)")
        self.torch = torch
        self.device = torch.device("cuda", device)
        self.stream = torch.cuda.Stream(self.device)
        self.name = f"cuda:{device}"
        self.gpu_name = torch.cuda.get_device_name(self.device)

    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=self.device)

    def copy_in(self, dst: Any, arr: np.ndarray) -> None:
        src = self.torch.from_numpy(np.ascontiguousarray(arr))
        dst.copy_(src.to(dst.dtype), non_blocking=False)

    def to_numpy(self, t: Any) -> np.ndarray:
        return t.float().cpu().numpy()

    @staticmethod
    def ptr(t: Any) -> int:
        return int(t.data_ptr())

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def on_stream(self):
        return self.torch.cuda.stream(self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()


class TrtEngine:
    """Runs the TensorRT plans of an engine folder (built by ``bosam export --trt``).

    Args:
        engine_dir: the engine folder (manifest with a ``tensorrt`` section + the two plans).
        device: CUDA device index.
        manifest: an already-read manifest (default: read it from the folder).
        memory: device-memory provider (default: torch CUDA); tests inject a CPU stand-in.
    """

    def __init__(
        self,
        engine_dir: str | os.PathLike,
        device: int = 0,
        manifest: dict[str, Any] | None = None,
        memory: Any = None,
    ) -> None:
        from export.trt_build import cuda_device_scope, import_tensorrt

        trt = import_tensorrt()
        self.trt = trt
        self.dir = Path(engine_dir)
        self.manifest = manifest if manifest is not None else load_manifest(self.dir)
        built = self.manifest.get("tensorrt")
        if not built:
            raise EngineError(f"{self.dir}: no TensorRT plans here (build them with: bosam export --trt)")
        check_files(self.manifest, self.dir, (ENCODER_PLAN, DECODER_PLAN))
        self.mem = memory if memory is not None else _TorchCudaMemory(device)
        self.logger = trt.Logger(trt.Logger.WARNING)
        with cuda_device_scope(device):  # engines are bound to the device current when deserialised
            try:  # the binding raises (pybind11) rather than returning None when CUDA fails
                self.runtime = trt.Runtime(self.logger)
            except Exception as exc:  # noqa: BLE001
                raise EngineError(f"TensorRT could not create a runtime ({exc}; is the CUDA driver working?)") from None
            if self.runtime is None:
                raise EngineError("TensorRT could not create a runtime (is the CUDA driver working?)")
            self.enc = self._load(ENCODER_PLAN, built)
            self.dec = self._load(DECODER_PLAN, built)
            self.enc_ctx = self.enc.create_execution_context()
            self.dec_ctx = self.dec.create_execution_context()
        if self.enc_ctx is None or self.dec_ctx is None:
            raise EngineError("TensorRT could not create execution contexts (out of GPU memory?)")
        self.enc_io = self._io(self.enc)
        self.dec_io = self._io(self.dec)
        self._require(self.enc_io, ENCODER_PLAN, {"image": "in", "embedding": "out"})
        self._require(
            self.dec_io,
            DECODER_PLAN,
            {"embedding": "in", "points": "in", "labels": "in", "mask_prompt": "in", "low_res_logits": "out", "iou": "out"},
        )
        man = self.manifest
        check_io_shapes(man, self.dir, ENCODER_PLAN, DECODER_PLAN,
                        {k: v[2] for k, v in self.enc_io.items()}, {k: v[2] for k, v in self.dec_io.items()})
        self.img_size = int(man["img_size"])  # validated when the manifest was read
        self.mask_size = int(man["mask_size"])
        self.max_points = int(built.get("max_points") or man["max_points"])
        self.embed_shape = tuple(int(v) for v in self.enc_io["embedding"][2])
        m = self.mask_size
        # fixed device buffers: the click path allocates nothing
        self._image = self.mem.empty((1, 1, self.img_size, self.img_size, self.img_size), self.enc_io["image"][1])
        self._points = self.mem.empty((1, self.max_points, 3), self.dec_io["points"][1])
        self._labels = self.mem.empty((1, self.max_points), self.dec_io["labels"][1])
        self._mask = self.mem.empty((1, 1, m, m, m), self.dec_io["mask_prompt"][1])
        self._logits = self.mem.empty((1, 1, m, m, m), self.dec_io["low_res_logits"][1])
        self._iou = self.mem.empty((1, 1), self.dec_io["iou"][1])
        # the checkpoint's spacing, HU clamp and click feeding, as exported (segment reads them)
        self.metadata = dict(self.manifest.get("model_metadata") or {})
        self.info = EngineInfo(
            name="tensorrt",
            device=self.mem.name,
            precision=man.get("precision", "fp32"),
            img_size=self.img_size,
            mask_size=self.mask_size,
            embed_shape=self.embed_shape[1:],
            checkpoint_sha256=man.get("checkpoint_sha256"),
            preset=man.get("preset"),
            details={
                "tensorrt": str(getattr(trt, "__version__", "unknown")),
                "gpu": getattr(self.mem, "gpu_name", None),
                "built_for_gpu": built.get("gpu"),
                "built_with_tensorrt": built.get("version"),
                "compute_capability": built.get("compute_capability"),
                "max_points": self.max_points,
                "engine_dir": str(self.dir),
            },
        )

    # ------------------------------------------------------------------------------------------
    def _load(self, name: str, built: dict[str, Any]) -> Any:
        data = (self.dir / name).read_bytes()
        engine = self.runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise EngineError(
                f"{self.dir / name}: TensorRT cannot load this plan (built with TensorRT {built.get('version')} for "
                f"{built.get('gpu')}, sm {built.get('compute_capability')}); rebuild it here with bosam export --trt"
            )
        return engine

    def _io(self, engine: Any) -> dict[str, tuple[str, str, tuple[int, ...]]]:
        """name -> ("in"/"out", torch dtype name, shape with -1 for dynamic axes)."""
        trt = self.trt
        out: dict[str, tuple[str, str, tuple[int, ...]]] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = "in" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "out"
            shape = tuple(int(d) for d in engine.get_tensor_shape(name))
            out[name] = (mode, _dtype_name(engine.get_tensor_dtype(name)), shape)
        return out

    def _require(self, io: dict[str, Any], plan: str, want: dict[str, str]) -> None:
        for name, mode in want.items():
            if name not in io or io[name][0] != mode:
                raise EngineError(f"{self.dir / plan}: expected {'input' if mode == 'in' else 'output'} '{name}', has {sorted(io)}")

    def _execute(self, ctx: Any, what: str) -> None:
        if not ctx.execute_async_v3(self.mem.stream_handle):
            raise EngineError(f"TensorRT failed to run the {what}")

    # ------------------------------------------------------------------------------------------
    def encode(self, image: np.ndarray) -> Embedding:
        image = check_image(image, self.img_size)
        ctx, mem = self.enc_ctx, self.mem
        with mem.on_stream():
            emb = mem.empty(self.embed_shape, self.enc_io["embedding"][1])
            mem.copy_in(self._image, image)
            ctx.set_tensor_address("image", mem.ptr(self._image))
            ctx.set_tensor_address("embedding", mem.ptr(emb))
            self._execute(ctx, "encoder")
        mem.synchronize()
        return Embedding(emb, tuple(self.embed_shape), "tensorrt")

    def decode(
        self, embedding: Embedding, points: np.ndarray, labels: np.ndarray, mask_prompt: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        check_embedding(embedding, "tensorrt", "TensorRT")
        points, labels, mask_prompt = check_decode_inputs(points, labels, mask_prompt, self.mask_size)
        n = points.shape[1]
        if n > self.max_points:
            raise ValueError(f"{n} points exceed the {self.max_points} the TensorRT decoder was built for")
        ctx, mem = self.dec_ctx, self.mem
        with mem.on_stream():
            pts, lab = self._points[:, :n], self._labels[:, :n]
            mem.copy_in(pts, points)
            mem.copy_in(lab, labels)
            mem.copy_in(self._mask, mask_prompt)
            for name, shape in (("points", (1, n, 3)), ("labels", (1, n))):
                if ctx.set_input_shape(name, shape) is False:
                    raise ValueError(f"TensorRT refused {name} shape {shape}")
            for name, buf in (
                ("embedding", embedding.data),
                ("points", pts),
                ("labels", lab),
                ("mask_prompt", self._mask),
                ("low_res_logits", self._logits),
                ("iou", self._iou),
            ):
                ctx.set_tensor_address(name, mem.ptr(buf))
            self._execute(ctx, "decoder")
        mem.synchronize()
        return mem.to_numpy(self._logits).astype(np.float32), mem.to_numpy(self._iou).astype(np.float32)
