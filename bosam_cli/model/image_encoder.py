"""3-D ViT image encoder of SAM-Med3D (weight-compatible, with an exact fast attention path).

The published weights depend on two quirks of the reference attention, reproduced here:

* windowed blocks zero-pad the token grid at the end of every axis to one ``window_size``^3
  window and attend over every token of it, padded ones included (their q, k, v are the qkv
  bias, because the padding happens after ``norm1``);
* the decomposed relative-position term is broadcast onto the wrong axes. For query
  (qd, qh, qw) and key (kd, kh, kw) it adds
  ``<q(qd,qh,qw), Rd[qd,kw]> + <q(qd,qh,kd), Rh[qh,kw]> + <q(qd,qh,kh), Rw[kh,kw]>``
  with ``Ra[i, j] = rel_pos_a[i - j + S - 1]`` and unscaled queries.

``Attention3D`` has two implementations of that maths. ``reference`` is the literal one (pad,
attend over the whole window, crop) and serves as the test oracle. ``fast`` (the default) only
computes the real queries and adds the padded keys' softmax mass in closed form: they all share
k = k_bias and v = v_bias, and the bias factorises over (kd, kh) for each kw. The fast path is
written for exporters (static shapes, matmul, no boolean indexing, no in-place writes).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm3d, MLPBlock


def _rel_index(side: int) -> torch.Tensor:
    """Index table ``idx[i, j] = i - j + side - 1`` into a (2*side-1)-row rel-pos table."""
    coords = torch.arange(side)
    return coords[:, None] - coords[None, :] + (side - 1)


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """logsumexp with elementary ops, the maximum taken out. Exported as such: TensorRT's ONNX
    importer computes ReduceLogSumExp as log(sum(exp(x))), which overflows."""
    m = x.amax(dim=dim, keepdim=True)
    return (m + torch.log(torch.exp(x - m).sum(dim=dim, keepdim=True))).squeeze(dim)


def _logaddexp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) + exp(b)) with elementary ops (exports everywhere)."""
    m = torch.maximum(a, b)
    return m + torch.log(torch.exp(a - m) + torch.exp(b - m))


class PatchEmbed3D(nn.Module):
    """Non-overlapping cubic patches -> channels-last token grid (B, G, G, G, C)."""

    def __init__(self, patch_size: int = 16, in_chans: int = 1, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 4, 1)


class Attention3D(nn.Module):
    """Multi-head self-attention over a cubic token grid with SAM-Med3D's relative positions.

    Args:
        dim: token width.
        num_heads: number of heads (head width ``dim // num_heads``).
        grid_size: side of the token grid the block sees (8 for 128^3 input and patch 16).
        window_size: side of the attention window; 0 means global attention over the grid.
        qkv_bias: whether the fused qkv projection has a bias.
    """

    def __init__(
        self, dim: int, num_heads: int, grid_size: int, window_size: int = 0, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.grid_size = grid_size
        self.window_size = window_size
        side = window_size if window_size > 0 else grid_size
        self.side = side
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * side - 1, self.head_dim))
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * side - 1, self.head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * side - 1, self.head_dim))
        self.register_buffer("rel_index", _rel_index(side), persistent=False)
        #: "fast" (default) or "reference"; the fast path needs one window covering the grid.
        self.impl = "fast"

    # -- shared pieces -------------------------------------------------------------------------
    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gathered (S, S, head_dim) tables ``R[i, j] = rel_pos[i - j + S - 1]``."""
        idx = self.rel_index
        return self.rel_pos_d[idx], self.rel_pos_h[idx], self.rel_pos_w[idx]

    @property
    def fast_possible(self) -> bool:
        return self.window_size == 0 or self.window_size >= self.grid_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, G, G, G, C) after norm1 -> (B, G, G, G, C)."""
        if self.impl == "fast" and self.fast_possible:
            return self.forward_fast(x)
        return self.forward_reference(x)

    # -- reference (oracle) --------------------------------------------------------------------
    def _attend_reference(self, x: torch.Tensor) -> torch.Tensor:
        """Full attention inside cubic windows x: (Bw, S, S, S, C), every token a query."""
        bw, s = x.shape[0], x.shape[1]
        n = s * s * s
        h, hd = self.num_heads, self.head_dim
        qkv = self.qkv(x).reshape(bw, n, 3, h, hd).permute(2, 0, 3, 1, 4).reshape(3, bw * h, n, hd)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        rd, rh, rw = self._tables()
        r_q = q.reshape(bw * h, s, s, s, hd)
        rel_d = torch.einsum("bdhwc,dkc->bdhwk", r_q, rd)
        rel_h = torch.einsum("bdhwc,hkc->bdhwk", r_q, rh)
        rel_w = torch.einsum("bdhwc,wkc->bdhwk", r_q, rw)
        # The reference's broadcast, kept literally: each term lands on the axes shown in the
        # module docstring, not on (kd, kh, kw).
        attn = (
            attn.view(bw * h, s, s, s, s, s, s)
            + rel_d[:, :, :, :, None, None]
            + rel_h[:, :, :, None, :, None]
            + rel_w[:, :, :, None, None, :]
        ).view(bw * h, n, n)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).view(bw, h, s, s, s, hd).permute(0, 2, 3, 4, 1, 5).reshape(bw, s, s, s, -1)
        return self.proj(out)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        b, g = x.shape[0], x.shape[1]
        c = x.shape[-1]
        if self.window_size == 0:
            return self._attend_reference(x)
        s = self.window_size
        padded = math.ceil(g / s) * s
        p = padded - g
        if p:
            x = F.pad(x, (0, 0, 0, p, 0, p, 0, p))
        nw = padded // s
        win = x.view(b, nw, s, nw, s, nw, s, c).permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, s, s, s, c)
        out = self._attend_reference(win)
        out = out.view(b, nw, nw, nw, s, s, s, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
        out = out.reshape(b, padded, padded, padded, c)
        return out[:, :g, :g, :g, :].contiguous()

    # -- fast exact path -----------------------------------------------------------------------
    def forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        b, g = x.shape[0], x.shape[1]
        n = g * g * g
        h, hd = self.num_heads, self.head_dim
        s = self.side
        qkv = self.qkv(x).reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, h, N, hd)
        rd, rh, rw = self._tables()  # (S, S, hd) each

        q5 = q.reshape(b, h, g, g, g, hd)
        # A[qd, qh, qw, kw] = <q(qd,qh,qw), Rd[qd, kw]>. Eager torch runs it as g batched
        # (qh*qw, hd) @ (hd, S) products (fastest); for export it is one broadcast matmul over
        # (qd, 1), because torch's dynamo ONNX exporter drops the reshape pair around the first
        # form and then broadcasts Rd over qh instead of qd. Both compute the same numbers.
        if _exporting():
            a = q5 @ rd[:g, None].transpose(-1, -2)  # (B, h, qd, qh, qw, S)
        else:
            a = (q5.reshape(b, h, g, g * g, hd) @ rd[:g].transpose(1, 2)).reshape(b, h, g, g, g, s)
        if s > g:
            # Queries at padded positions (index >= G along the third axis) are the q bias.
            q_bias, k_bias, v_bias = self._qkv_bias(x)
            q_pad = q_bias.reshape(1, h, 1, 1, 1, hd).expand(b, h, g, g, s - g, hd)
            q_ext = torch.cat([q5, q_pad], dim=4)  # (B, h, qd, qh, S, hd)
        else:
            q_ext = q5
        # Bm[qd, qh, kd, kw] = <q(qd,qh,kd), Rh[qh, kw]>
        bm = q_ext @ rh[:g].transpose(1, 2)  # (B, h, qd, qh, S, S)
        # Cm[qd, qh, kh, kw] = <q(qd,qh,kh), Rw[kh, kw]>
        cm = (q_ext.unsqueeze(-2) @ rw.transpose(1, 2)).squeeze(-2)  # (B, h, qd, qh, S, S)

        bias = (
            a[:, :, :, :, :, None, None, :g]
            + bm[:, :, :, :, None, :g, None, :g]
            + cm[:, :, :, :, None, None, :g, :g]
        ).reshape(b, h, n, n)
        logits = (q * self.scale) @ k.transpose(-2, -1) + bias  # real keys only

        if s == g:
            return self._merge_heads(logits.softmax(dim=-1) @ v, b, g)

        # Padded keys: log of their total softmax mass for every real query, computed from
        # sums of positive terms only (no cancellation).
        lb_real = _logsumexp(bm[:, :, :, :, :g, :], dim=-2)  # (B, h, qd, qh, kw)
        lb_pad = _logsumexp(bm[:, :, :, :, g:, :], dim=-2)
        lc_real = _logsumexp(cm[:, :, :, :, :g, :], dim=-2)
        lc_pad = _logsumexp(cm[:, :, :, :, g:, :], dim=-2)
        lb_all = _logaddexp(lb_real, lb_pad)
        lc_all = _logaddexp(lc_real, lc_pad)
        # kw < G: pad in kd or in kh;  kw >= G: every (kd, kh).
        t_real = _logaddexp(lb_pad + lc_all, lb_real + lc_pad)[..., :g]
        t_pad = (lb_all + lc_all)[..., g:]
        t = torch.cat([t_real, t_pad], dim=-1)  # (B, h, qd, qh, S)
        log_mass = _logsumexp(a + t.unsqueeze(4), dim=-1).reshape(b, h, n, 1)
        log_mass = log_mass + (q @ k_bias.reshape(1, h, hd, 1)) * self.scale
        p = torch.cat([logits, log_mass], dim=-1).softmax(dim=-1)
        out = p[..., :n] @ v + p[..., n:] * v_bias.reshape(1, h, 1, hd)
        return self._merge_heads(out, b, g)

    def _qkv_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of a zero token (the padding), each (heads, head_dim)."""
        zero = x.new_zeros(1, x.shape[-1])
        qkv = self.qkv(zero).reshape(3, self.num_heads, self.head_dim)
        return qkv[0], qkv[1], qkv[2]

    def _merge_heads(self, out: torch.Tensor, b: int, g: int) -> torch.Tensor:
        out = out.reshape(b, self.num_heads, g, g, g, self.head_dim).permute(0, 2, 3, 4, 1, 5)
        return self.proj(out.reshape(b, g, g, g, self.num_heads * self.head_dim))


def _exporting() -> bool:
    """True while torch traces the model for ONNX (the dynamo exporter or the legacy one)."""
    is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)  # torch >= 2.6
    return bool((is_exporting is not None and is_exporting()) or torch.onnx.is_in_onnx_export())


class Block3D(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        grid_size: int,
        window_size: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention3D(dim, num_heads, grid_size, window_size, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT3D(nn.Module):
    """(B, 1, I, I, I) z-scored CT crop -> (B, out_chans, I/p, I/p, I/p) image embedding.

    Args:
        img_size: side of the cubic input crop in voxels (128 for every published checkpoint).
        patch_size: side of the cubic patch (16).
        in_chans: input channels (1).
        embed_dim: ViT width.
        depth: number of blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP width over ``embed_dim``.
        out_chans: width of the neck output (the prompt embedding width).
        window_size: window side of the non-global blocks (0: all global).
        global_attn_indexes: blocks that attend globally even when ``window_size`` > 0.
    """

    def __init__(
        self,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    ) -> None:
        super().__init__()
        self.img_size = img_size
        grid = img_size // patch_size
        self.grid_size = grid
        self.patch_embed = PatchEmbed3D(patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            Block3D(
                embed_dim,
                num_heads,
                grid,
                window_size=0 if i in global_attn_indexes else window_size,
                mlp_ratio=mlp_ratio,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNorm3d(out_chans),
            nn.Conv3d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(out_chans),
        )

    def set_attention_impl(self, impl: str) -> None:
        """Choose "fast" (default, exact) or "reference" (literal, slow) attention."""
        if impl not in ("fast", "reference"):
            raise ValueError(f"attention implementation must be 'fast' or 'reference', not {impl!r}")
        for blk in self.blocks:
            blk.attn.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.neck(x.permute(0, 4, 1, 2, 3))
