"""Runtimes that run a model behind one interface: torch, ONNX Runtime, TensorRT.

``engines`` knows nothing of files of CT, prompts or training: NumPy arrays in, NumPy arrays
out. Runtime libraries are imported lazily by each engine module.
"""

from .base import Embedding, Engine, EngineInfo, check_decode_inputs, check_embedding, check_image

__all__ = ["Embedding", "Engine", "EngineInfo", "check_decode_inputs", "check_embedding", "check_image"]
