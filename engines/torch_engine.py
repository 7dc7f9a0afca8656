"""The PyTorch engine: CPU or CUDA, fp32, or bf16/fp16 autocast on CUDA (bf16 on CPU too)."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from .base import Embedding, EngineInfo, check_decode_inputs, check_embedding, check_image

PRECISIONS = ("fp32", "bf16", "fp16")


class TorchEngine:
    """Runs a ``Sam3D`` model (``bosam_cli.model``) with torch.

    Args:
        model: the model (any preset); moved to ``device`` and put in eval mode.
        device: "cpu", "cuda", "cuda:1" ...
        precision: "fp32", "bf16" (CUDA or CPU autocast) or "fp16" (CUDA autocast only).
    """

    def __init__(self, model: Any, device: str = "cpu", precision: str = "fp32") -> None:
        import torch

        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device '{dev}' asked for, but torch sees no CUDA GPU here")
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s) here")
        if precision == "fp16" and dev.type != "cuda":
            raise ValueError("fp16 needs a CUDA device; use fp32 or bf16 on CPU")
        self.torch = torch
        self.model = model.to(dev).eval()
        self.device = dev
        self.precision = precision
        emb = (model.embed_dim, model.embed_grid, model.embed_grid, model.embed_grid)
        details: dict[str, Any] = {}
        if dev.type == "cuda":
            details["gpu"] = torch.cuda.get_device_name(dev)
        self.info = EngineInfo(
            name="torch",
            device=str(dev),
            precision=precision,
            img_size=model.img_size,
            mask_size=model.mask_size,
            embed_shape=emb,
            checkpoint_sha256=getattr(model, "checkpoint_sha256", None),
            preset=getattr(model, "preset", None),
            details=details,
        )

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | None, preset: str | None = None, device: str = "cpu", precision: str = "fp32"
    ) -> "TorchEngine":
        from bosam_cli.checkpoints import load_model

        return cls(load_model(checkpoint, preset=preset), device=device, precision=precision)

    def _autocast(self):
        torch = self.torch
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def encode(self, image: np.ndarray) -> Embedding:
        torch = self.torch
        image = check_image(image, self.info.img_size)
        with torch.inference_mode(), self._autocast():
            x = torch.from_numpy(image).to(self.device)
            emb = self.model.image_encoder(x).float()
        return Embedding(emb, tuple(emb.shape), "torch")

    def decode(
        self, embedding: Embedding, points: np.ndarray, labels: np.ndarray, mask_prompt: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        check_embedding(embedding, "torch")
        points, labels, mask_prompt = check_decode_inputs(points, labels, mask_prompt, self.info.mask_size)
        with torch.inference_mode(), self._autocast():
            logits, iou = self.model.decode(
                embedding.data,
                torch.from_numpy(points).to(self.device),
                torch.from_numpy(labels).to(self.device),
                torch.from_numpy(mask_prompt).to(self.device),
            )
        return logits.float().cpu().numpy(), iou.float().cpu().numpy()
