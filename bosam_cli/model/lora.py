"""LoRA on the q and v branches of every encoder block's fused qkv projection.

Layout follows BoSAM's (``attn.qkv.qkv`` base, ``linear_a_q``/``linear_b_q``/``linear_a_v``/
``linear_b_v`` deltas, no alpha/r scaling) so the same merge rule serves both. Unlike BoSAM, B
starts at zero, so a freshly wrapped model computes exactly what the base model computes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .sam3d import Sam3D


class LoRAQKV(nn.Module):
    """Fused qkv linear plus rank-``r`` deltas: q += B_q A_q x, v += B_v A_v x (k untouched)."""

    def __init__(self, qkv: nn.Linear, rank: int) -> None:
        super().__init__()
        dim = qkv.in_features
        self.qkv = qkv
        self.dim = dim
        self.rank = rank
        self.linear_a_q = nn.Linear(dim, rank, bias=False)
        self.linear_b_q = nn.Linear(rank, dim, bias=False)
        self.linear_a_v = nn.Linear(dim, rank, bias=False)
        self.linear_b_v = nn.Linear(rank, dim, bias=False)
        for a in (self.linear_a_q, self.linear_a_v):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        for b in (self.linear_b_q, self.linear_b_v):
            nn.init.zeros_(b.weight)

    @property
    def in_features(self) -> int:
        return self.dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dq = self.linear_b_q(self.linear_a_q(x))
        dv = self.linear_b_v(self.linear_a_v(x))
        return self.qkv(x) + torch.cat([dq, torch.zeros_like(dq), dv], dim=-1)

    def merged_weight(self) -> torch.Tensor:
        """The plain qkv weight with both deltas folded in."""
        return merge_qkv_delta(
            self.qkv.weight,
            self.linear_a_q.weight,
            self.linear_b_q.weight,
            self.linear_a_v.weight,
            self.linear_b_v.weight,
        )


def merge_qkv_delta(
    qkv_weight: torch.Tensor, a_q: torch.Tensor, b_q: torch.Tensor, a_v: torch.Tensor, b_v: torch.Tensor
) -> torch.Tensor:
    """``W[0:d] += B_q @ A_q`` and ``W[2d:3d] += B_v @ A_v`` (fp32 maths, no scaling)."""
    d = qkv_weight.shape[1]
    w = qkv_weight.detach().float().clone()
    w[:d] += b_q.detach().float() @ a_q.detach().float()
    w[2 * d :] += b_v.detach().float() @ a_v.detach().float()
    return w.to(qkv_weight.dtype)


def apply_lora(model: Sam3D, rank: int) -> list[nn.Parameter]:
    """Wrap every encoder block's qkv with LoRA, freeze the rest; returns the LoRA parameters."""
    if rank < 1:
        raise ValueError("LoRA rank must be >= 1")
    for p in model.parameters():
        p.requires_grad_(False)
    params: list[nn.Parameter] = []
    for blk in model.image_encoder.blocks:
        if isinstance(blk.attn.qkv, LoRAQKV):
            raise ValueError("model already has LoRA")
        base = blk.attn.qkv
        wrapped = LoRAQKV(base, rank).to(base.weight.device, base.weight.dtype)
        blk.attn.qkv = wrapped
        for name in ("linear_a_q", "linear_b_q", "linear_a_v", "linear_b_v"):
            p = getattr(wrapped, name).weight
            p.requires_grad_(True)
            params.append(p)
    return params


def has_lora(model: Sam3D) -> bool:
    return any(isinstance(b.attn.qkv, LoRAQKV) for b in model.image_encoder.blocks)


def lora_rank(model: Sam3D) -> int | None:
    for b in model.image_encoder.blocks:
        if isinstance(b.attn.qkv, LoRAQKV):
            return b.attn.qkv.rank
    return None


def merge_lora(model: Sam3D) -> Sam3D:
    """Fold every LoRA wrapper back into a plain qkv linear (in place); returns the model."""
    for blk in model.image_encoder.blocks:
        wrapped = blk.attn.qkv
        if isinstance(wrapped, LoRAQKV):
            base = wrapped.qkv
            with torch.no_grad():
                base.weight.copy_(wrapped.merged_weight())
            blk.attn.qkv = base
    return model


def plain_state_dict(model: Sam3D) -> dict[str, torch.Tensor]:
    """State dict in the plain SAM-Med3D layout, LoRA deltas merged (model left unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".attn.qkv.linear_" in key:
            continue
        if ".attn.qkv.qkv." in key:
            prefix = key.split(".attn.qkv.qkv.")[0]
            idx = int(prefix.rsplit(".", 1)[1])
            wrapped = model.image_encoder.blocks[idx].attn.qkv
            key = key.replace(".attn.qkv.qkv.", ".attn.qkv.")
            if key.endswith("weight"):
                value = wrapped.merged_weight()
        out[key] = value.detach()
    return out


def lora_tensors(model: Sam3D) -> dict[str, torch.Tensor]:
    """The LoRA A/B tensors and the base qkv weights they apply to, keyed by model path."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".attn.qkv.linear_" in key or key.endswith(".attn.qkv.qkv.weight"):
            out[key] = value.detach().clone()
    return out
