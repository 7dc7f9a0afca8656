"""The engine contract shared by every runtime.

``encode(image) -> Embedding`` once per 128^3 window; ``decode(embedding, points, labels,
mask_prompt) -> (low_res_logits, iou)`` once per click. NumPy at the boundary:

* image: (1, 1, S, S, S) float32, z-scored (S = ``img_size``, 128);
* points: (1, N, 3) float32 voxel indices (d0, d1, d2) of the window, N >= 1;
* labels: (1, N) int64: 1 positive, 0 negative, -1 padding;
* mask_prompt: (1, 1, M, M, M) float32 previous low-res logits, zeros on a first click (M = 32);
* returns logits (1, 1, M, M, M) float32 and IoU (1, 1) float32.

The embedding stays where the runtime keeps it (GPU memory for CUDA runtimes), so a click
costs only the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass
class Embedding:
    """An image embedding held by an engine; ``data`` is runtime-specific (tensor, array, buffer)."""

    data: Any
    shape: tuple[int, ...]
    engine: str


@dataclass
class EngineInfo:
    """What an engine is, for manifests and tables."""

    name: str
    device: str
    precision: str
    img_size: int
    mask_size: int
    embed_shape: tuple[int, ...]
    checkpoint_sha256: str | None = None
    preset: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "engine": self.name,
            "device": self.device,
            "precision": self.precision,
            "img_size": self.img_size,
            "mask_size": self.mask_size,
            "embed_shape": list(self.embed_shape),
            "checkpoint_sha256": self.checkpoint_sha256,
            "preset": self.preset,
            **self.details,
        }


@runtime_checkable
class Engine(Protocol):
    info: EngineInfo

    def encode(self, image: np.ndarray) -> Embedding: ...

    def decode(
        self, embedding: Embedding, points: np.ndarray, labels: np.ndarray, mask_prompt: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]: ...


def check_image(image: np.ndarray, img_size: int) -> np.ndarray:
    image = np.asarray(image)
    want = (1, 1, img_size, img_size, img_size)
    if image.shape != want:
        raise ValueError(f"image must have shape {want}, got {image.shape}")
    return np.ascontiguousarray(image, dtype=np.float32)


def check_embedding(embedding: Any, engine: str, display: str | None = None) -> None:
    """Refuse an embedding made by another engine (its payload lives elsewhere: a torch tensor,
    an ORT OrtValue, TensorRT device memory)."""
    if not isinstance(embedding, Embedding) or embedding.engine != engine:
        got = embedding.engine if isinstance(embedding, Embedding) else type(embedding).__name__
        raise ValueError(f"embedding comes from engine {got!r}, not from this {display or engine} engine")


def check_decode_inputs(
    points: np.ndarray, labels: np.ndarray, mask_prompt: np.ndarray, mask_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    points = np.asarray(points, dtype=np.float32)
    labels = np.asarray(labels)
    mask_prompt = np.asarray(mask_prompt, dtype=np.float32)
    if points.ndim != 3 or points.shape[0] != 1 or points.shape[2] != 3 or points.shape[1] < 1:
        raise ValueError(f"points must have shape (1, N, 3) with N >= 1, got {points.shape}")
    if labels.shape != points.shape[:2]:
        raise ValueError(f"labels must have shape {points.shape[:2]}, got {labels.shape}")
    if not np.all(np.isin(labels, (-1, 0, 1))):
        raise ValueError("labels must be 1 (positive), 0 (negative) or -1 (padding)")
    want = (1, 1, mask_size, mask_size, mask_size)
    if mask_prompt.shape != want:
        raise ValueError(f"mask_prompt must have shape {want}, got {mask_prompt.shape}")
    return (
        np.ascontiguousarray(points),
        np.ascontiguousarray(labels, dtype=np.int64),
        np.ascontiguousarray(mask_prompt),
    )
