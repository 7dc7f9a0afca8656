"""torch -> ONNX (encoder, decoder) -> TensorRT engines, verified against torch.

``export_onnx`` writes an engine folder (``encoder.onnx``, ``decoder.onnx``, ``manifest.json``);
``build_trt_engines`` adds ``encoder.plan`` / ``decoder.plan``; ``check_trt_readiness`` lints an
ONNX file for TensorRT on a CPU-only machine. Names resolve lazily so that ``import export``
imports neither torch nor onnx.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "export_onnx": ("onnx_export", "export_onnx"),
    "state_dict_fingerprint": ("onnx_export", "state_dict_fingerprint"),
    "describe_io": ("onnx_export", "describe_io"),
    "verify_export": ("verify", "verify_export"),
    "convert_to_mixed_fp16": ("fp16", "convert_to_mixed_fp16"),
    "check_trt_readiness": ("readiness", "check_trt_readiness"),
    "ReadinessReport": ("readiness", "ReadinessReport"),
    "build_trt_engines": ("trt_build", "build_trt_engines"),
    "check_trt_prerequisites": ("trt_build", "check_trt_prerequisites"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
