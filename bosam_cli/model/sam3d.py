"""Sam3D: wires the image encoder, prompt encoder and mask decoder together."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D


class Sam3D(nn.Module):
    """Promptable 3-D segmentation model (state-dict layout of SAM-Med3D ``vit_b_ori``).

    ``image_encoder(x)`` runs once per crop; ``decode`` runs once per click.
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT3D,
        prompt_encoder: PromptEncoder3D,
        mask_decoder: MaskDecoder3D,
        preset: str | None = None,
        arch: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        #: registry name this model was built from, if any
        self.preset = preset
        #: plain keyword arguments of ``build_sam3d`` that rebuild this architecture
        self.arch = dict(arch or {})

    @property
    def img_size(self) -> int:
        """Side of the cubic input crop in voxels (128)."""
        return self.image_encoder.img_size

    @property
    def mask_size(self) -> int:
        """Side of the low-resolution logits and of the mask prompt (32)."""
        return self.prompt_encoder.mask_input_size[0]

    @property
    def embed_dim(self) -> int:
        """Channels of the image embedding (384 for the published model)."""
        return self.prompt_encoder.embed_dim

    @property
    def embed_grid(self) -> int:
        return self.prompt_encoder.image_embedding_size[0]

    def decode(
        self,
        embedding: torch.Tensor,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        mask_prompt: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoder call.

        Args:
            embedding: (B, C, 8, 8, 8) image embedding.
            points: (B, N, 3) float voxel indices (d0, d1, d2) of the 128^3 crop, or None for a
                mask-prompt-only step.
            labels: (B, N) int, 1 positive, 0 negative, -1 padding.
            mask_prompt: (B, 1, 32, 32, 32) previous low-res logits (zeros on a first click).
                None uses the untrained ``no_mask_embed``; the published weights never saw that.

        Returns:
            low-res logits (B, 1, 32, 32, 32) of the single-mask output, and IoU (B, 1).
        """
        pts = None
        if points is not None:
            if labels is None:
                raise ValueError("labels are required with points")
            pts = (points.to(embedding.dtype), labels.to(torch.int64))
        sparse, dense = self.prompt_encoder(pts, None, mask_prompt, batch_size=embedding.shape[0])
        return self.mask_decoder(
            embedding, self.prompt_encoder.get_dense_pe().to(embedding.dtype), sparse, dense, False
        )

    def forward(
        self,
        image: torch.Tensor,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        mask_prompt: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decode(self.image_encoder(image), points, labels, mask_prompt)


def upscale_logits(low_res: torch.Tensor, size: int) -> torch.Tensor:
    """Low-res logits (B, 1, m, m, m) -> (B, 1, size^3), trilinear, align_corners=False."""
    return F.interpolate(low_res, size=(size, size, size), mode="trilinear", align_corners=False)
