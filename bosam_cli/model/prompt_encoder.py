"""Prompt encoder of SAM-Med3D: clicks -> sparse tokens, previous logits -> dense embedding.

Conventions the published weights were trained with (kept exactly):

* points are voxel indices of the input crop in tensor order (d0, d1, d2), shifted by +0.5 and
  divided by the crop size; one padding point (label -1) is always appended;
* the dense positional encoding takes its *first* coordinate from tensor dim 1 and its *second*
  from tensor dim 0 (the point encoding does not swap them);
* Fourier features are ``[sin, cos, sin]`` of ``2*pi*((2c - 1) @ G)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .common import LayerNorm3d


class PositionEmbeddingRandom3D(nn.Module):
    """Random Fourier positional encoding with a (3, num_pos_feats) Gaussian matrix."""

    def __init__(self, num_pos_feats: int = 128, scale: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn(3, num_pos_feats))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords in [0, 1], (..., 3) -> (..., 3 * num_pos_feats)."""
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def forward(self, size: Sequence[int]) -> torch.Tensor:
        """Dense encoding of a (d, h, w) grid -> (C, d, h, w)."""
        d, h, w = (int(v) for v in size)
        device = self.positional_encoding_gaussian_matrix.device
        a = (torch.arange(d, device=device, dtype=torch.float32) + 0.5) / d
        b = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        c = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid_a, grid_b, grid_c = torch.meshgrid(a, b, c, indexing="ij")
        # First coordinate follows dim 1, second follows dim 0 (the reference's convention).
        pe = self._pe_encoding(torch.stack([grid_b, grid_a, grid_c], dim=-1))
        return pe.permute(3, 0, 1, 2)

    def forward_with_coords(self, coords: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """Voxel coordinates (B, N, 3) of an ``image_size`` crop -> (B, N, C)."""
        scale = coords.new_tensor([float(v) for v in image_size])
        return self._pe_encoding(coords / scale)


class PromptEncoder3D(nn.Module):
    """Encodes points and a mask prompt for the mask decoder.

    Args:
        embed_dim: prompt embedding width (decoder width); must be divisible by 3.
        image_embedding_size: token grid of the image embedding, e.g. (8, 8, 8).
        input_image_size: voxel size of the model input crop, e.g. (128, 128, 128).
        mask_in_chans: hidden channels of the mask downscaling convolutions.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Sequence[int],
        input_image_size: Sequence[int],
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = tuple(int(v) for v in image_embedding_size)
        self.input_image_size = tuple(int(v) for v in input_image_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        # index 0: negative click, 1: positive click
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = tuple(4 * v for v in self.image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """(1, C, d, h, w) positional encoding of the image embedding grid."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def embed_points(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """points (B, N, 3) float voxel indices, labels (B, N) in {1, 0, -1} -> (B, N + 1, C)."""
        points = points + 0.5
        pad_point = points.new_zeros(points.shape[0], 1, 3)
        pad_label = -torch.ones_like(labels[:, :1])
        points = torch.cat([points, pad_point], dim=1)
        labels = torch.cat([labels, pad_label], dim=1)
        pe = self.pe_layer.forward_with_coords(points, self.input_image_size)
        # Arithmetic masks instead of boolean index writes (export-friendly, same result).
        lab = labels.unsqueeze(-1)
        is_pad = (lab == -1).to(pe.dtype)
        is_neg = (lab == 0).to(pe.dtype)
        is_pos = (lab == 1).to(pe.dtype)
        return (
            pe * (1.0 - is_pad)
            + self.not_a_point_embed.weight * is_pad
            + self.point_embeddings[0].weight * is_neg
            + self.point_embeddings[1].weight * is_pos
        )

    def embed_mask(self, mask_prompt: torch.Tensor) -> torch.Tensor:
        """Previous low-res logits (B, 1, 4d, 4h, 4w) -> dense embedding (B, C, d, h, w)."""
        return self.mask_downscaling(mask_prompt)

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        *,
        batch_size: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse (B, N + 1 or 0, C) and dense (B, C, d, h, w) prompt embeddings.

        Called as the reference calls it, ``(points, boxes, masks)``; the 3-D weights have no box
        embeddings, so ``boxes`` must be None.
        """
        if boxes is not None:
            raise ValueError("box prompts are not supported: the SAM-Med3D weights have no box embeddings")
        if points is not None:
            batch_size = points[0].shape[0]
            sparse = self.embed_points(points[0], points[1])
        else:
            if masks is not None:
                batch_size = masks.shape[0]
            sparse = self.no_mask_embed.weight.new_zeros(batch_size, 0, self.embed_dim)
        if masks is not None:
            dense = self.embed_mask(masks)
        else:
            d, h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(batch_size, -1, d, h, w)
        return sparse, dense
