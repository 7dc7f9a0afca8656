"""Mask decoder of SAM-Med3D: tokens + image embedding -> low-resolution mask logits and IoU."""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP, LayerNorm3d
from .transformer import TwoWayTransformer3D


class MaskDecoder3D(nn.Module):
    """Predicts masks from the image embedding and prompt embeddings.

    Args:
        transformer_dim: token width (the prompt embedding width).
        transformer: the two-way transformer.
        num_multimask_outputs: extra mask tokens (3); token 0 is the single-mask output, the only
            one the published weights were trained on.
        iou_head_depth: layers of the IoU head.
        iou_head_hidden_dim: hidden width of the IoU head.
    """

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer3D,
        num_multimask_outputs: int = 3,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm3d(transformer_dim // 4),
            nn.GELU(),
            nn.ConvTranspose3d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3) for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth)
        # the exact matmul form of output_upscaling + mask projection (upscale_and_project); False
        # runs the modules as written (the test oracle)
        self.fast_upscaling = True

    def upscale_and_project(self, tokens: torch.Tensor, hyper_in: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """``output_upscaling`` followed by the per-voxel product with ``hyper_in``, exactly, as
        three matmuls and two small reshuffles of the final masks.

        Both transposed convolutions have kernel 2 = stride 2, so every output voxel depends on one
        input voxel: each is a matmul from C channels to (sub-voxel, channel) columns. The
        channel LayerNorm, the GELUs and the product with ``hyper_in`` act per voxel, so the work
        stays in "sub-voxel" layout until the final T-channel masks, whose 4x4x4 sub-voxels are
        put in place at the end. Same parameters, same function as the modules. On 2 CPU cores
        ONNX Runtime spent 10.6 ms of a ~30 ms decoder call in the two transposed-convolution
        kernels; the two matmuls take ~4.5 ms.

        Args:
            tokens: (B, N, C) transformer image tokens, N = d*h*w in C order.
            hyper_in: (B, T, C // 8) per-mask-token projection vectors.
            grid: (d, h, w) of the image embedding.
        Returns:
            (B, T, 4d, 4h, 4w) mask logits.
        """
        up1, ln, _, up2, _ = self.output_upscaling
        b, n, c = tokens.shape
        c1, c2 = up1.out_channels, up2.out_channels
        d, h, w = grid
        t = hyper_in.shape[1]
        # stage 1: (B, N, C) @ (C, 8*C1), columns (a1, c1) with a1 = the 2x2x2 sub-voxel
        w1 = up1.weight.reshape(c, c1, 8).transpose(1, 2).reshape(c, 8 * c1)
        y = tokens @ w1 + up1.bias.repeat(8)
        y = y.reshape(b, n * 8, c1)  # rows (n, a1)
        y = nn.functional.gelu(nn.functional.layer_norm(y, (c1,), ln.weight, ln.bias, ln.eps))
        # stage 2: (B, 8N, C1) @ (C1, 8*C2), columns (a2, c2)
        w2 = up2.weight.reshape(c1, c2, 8).transpose(1, 2).reshape(c1, 8 * c2)
        z = nn.functional.gelu(y @ w2 + up2.bias.repeat(8))
        z = z.reshape(b, n * 64, c2)  # rows (n, a1, a2)
        m = z @ hyper_in.transpose(1, 2)  # (B, 64N, T), rows (i, j, k, a1=(p1,q1,r1), a2=(p2,q2,r2))
        # voxel (4i + 2p1 + p2, ...), in two shuffles of at most 8 dimensions (TensorRT's limit)
        m = m.reshape(b, d, h, w, 2, 2, 2, 8 * t).permute(0, 1, 4, 2, 5, 3, 6, 7)
        m = m.reshape(b, 2 * d, 2 * h, 2 * w, 2, 2, 2, t).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return m.reshape(b, t, 4 * d, 4 * h, 4 * w)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        select: slice = slice(None),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks (B, T, 4d, 4h, 4w) and IoU (B, T) of the mask tokens ``select`` picks (all 4 by
        default); only the selected masks are computed."""
        b = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(b, -1, -1)
        tokens = torch.cat([output_tokens, sparse_prompt_embeddings], dim=1)

        src = image_embeddings.expand(b, -1, -1, -1, -1) + dense_prompt_embeddings
        pos_src = image_pe.expand(b, -1, -1, -1, -1)
        _, c, d, h, w = src.shape
        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : 1 + self.num_mask_tokens, :]

        chosen = range(self.num_mask_tokens)[select]
        hyper_in = torch.stack([self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in chosen], dim=1)
        if self.fast_upscaling:
            masks = self.upscale_and_project(src, hyper_in, (d, h, w))
        else:
            src = src.transpose(1, 2).reshape(b, c, d, h, w)
            upscaled = self.output_upscaling(src)
            _, cu, du, hu, wu = upscaled.shape
            masks = (hyper_in @ upscaled.reshape(b, cu, du * hu * wu)).reshape(b, -1, du, hu, wu)
        iou_pred = self.iou_prediction_head(iou_token_out)[:, select]
        return masks, iou_pred

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sl = slice(1, None) if multimask_output else slice(0, 1)
        return self.predict_masks(image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings, sl)
