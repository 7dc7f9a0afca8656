"""Deterministic engines for geometry tests (no model): they obey the engine contract."""

from __future__ import annotations

import numpy as np

from engines.base import Embedding, EngineInfo, check_decode_inputs, check_image


class SphereEngine:
    """Decoder returns a ball of ``radius_vox`` window voxels around the newest point.

    Logits are ``radius - distance`` (in window voxels) at the low-res voxel centres, so the
    mask on any CT grid must be the ball of radius ``radius_vox * spacing`` mm around the click.
    A negative newest point erases a ball around it from the previous logits.
    """

    def __init__(self, radius_vox: float = 20.0, img_size: int = 128, mask_size: int = 32) -> None:
        self.radius = radius_vox
        self.info = EngineInfo("sphere-test", "cpu", "fp32", img_size, mask_size, (1,), None, "test")
        f = img_size / mask_size
        c = np.arange(mask_size) * f + (f - 1) / 2
        self.grid = np.stack(np.meshgrid(c, c, c, indexing="ij"), axis=-1)
        self.encoded = 0

    def encode(self, image: np.ndarray) -> Embedding:
        image = check_image(image, self.info.img_size)
        self.encoded += 1
        return Embedding(None, (1,), "sphere-test")

    def decode(self, embedding, points, labels, mask_prompt):
        points, labels, mask_prompt = check_decode_inputs(points, labels, mask_prompt, self.info.mask_size)
        p = points[0, -1]
        d = np.linalg.norm(self.grid - p, axis=-1)
        ball = (self.radius - d).astype(np.float32)
        prev = mask_prompt[0, 0]
        if labels[0, -1] == 1:
            out = np.maximum(prev, ball) if prev.any() else ball
        else:
            out = np.minimum(prev, -ball)
        return out[None, None], np.ones((1, 1), np.float32)


class ThresholdEngine:
    """Decoder returns the connected bright region (> ``threshold`` in z-scored units) that
    contains the newest point, as +/-8 logits at the low-res grid; the embedding is the image.

    On a CT whose bright object spans several windows, a correct window pipeline must
    reproduce that object on the CT grid without seams.
    """

    def __init__(self, threshold: float = 1.0, img_size: int = 128, mask_size: int = 32) -> None:
        self.threshold = threshold
        self.info = EngineInfo("threshold-test", "cpu", "fp32", img_size, mask_size, (1,), None, "test")
        self.f = img_size // mask_size
        self.encoded = 0

    def encode(self, image: np.ndarray) -> Embedding:
        image = check_image(image, self.info.img_size)
        self.encoded += 1
        m = self.info.mask_size
        f = self.f
        low = image[0, 0].reshape(m, f, m, f, m, f).mean(axis=(1, 3, 5))
        return Embedding(low, low.shape, "threshold-test")

    def decode(self, embedding, points, labels, mask_prompt):
        from scipy.ndimage import label as cc

        points, labels, mask_prompt = check_decode_inputs(points, labels, mask_prompt, self.info.mask_size)
        low = embedding.data
        bright = low > self.threshold
        comp, _ = cc(bright)
        p = np.clip(np.floor(points[0, -1] / self.f).astype(int), 0, self.info.mask_size - 1)
        lab = comp[tuple(p)]
        if labels[0, -1] == 1 and lab > 0:
            region = comp == lab
            prev = mask_prompt[0, 0] > 0
            region = region | prev
        else:
            region = mask_prompt[0, 0] > 0
            if lab > 0:
                region &= comp != lab
        out = np.where(region, 8.0, -8.0).astype(np.float32)
        return out[None, None], np.ones((1, 1), np.float32)
