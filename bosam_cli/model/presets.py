"""Registry of model presets: a name -> a builder of plain keyword arguments.

``sam-med3d`` is the architecture of every published checkpoint (SAM-Med3D, SAM-Med3D-turbo,
BoSAM; the reference registry calls it ``vit_b_ori``). ``tiny`` is the same code, small and
with global attention, for CPU training and the bundled demo model. ``vit-b-256`` is the
reference registry's unused ``vit_b`` entry (input 256^3), kept so that such files load.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D
from .sam3d import Sam3D
from .transformer import TwoWayTransformer3D


def build_sam3d(
    *,
    img_size: int = 128,
    patch_size: int = 16,
    encoder_embed_dim: int = 768,
    encoder_depth: int = 12,
    encoder_num_heads: int = 12,
    encoder_window_size: int = 14,
    encoder_global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
    prompt_embed_dim: int = 384,
    decoder_depth: int = 2,
    decoder_num_heads: int = 8,
    decoder_mlp_dim: int = 2048,
    iou_head_hidden_dim: int = 256,
    mask_in_chans: int = 16,
    preset: str | None = None,
) -> Sam3D:
    """Build a Sam3D from plain architecture arguments (random initialisation)."""
    arch = dict(
        img_size=img_size,
        patch_size=patch_size,
        encoder_embed_dim=encoder_embed_dim,
        encoder_depth=encoder_depth,
        encoder_num_heads=encoder_num_heads,
        encoder_window_size=encoder_window_size,
        encoder_global_attn_indexes=[int(i) for i in encoder_global_attn_indexes],
        prompt_embed_dim=prompt_embed_dim,
        decoder_depth=decoder_depth,
        decoder_num_heads=decoder_num_heads,
        decoder_mlp_dim=decoder_mlp_dim,
        iou_head_hidden_dim=iou_head_hidden_dim,
        mask_in_chans=mask_in_chans,
    )
    grid = img_size // patch_size
    encoder = ImageEncoderViT3D(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=encoder_embed_dim,
        depth=encoder_depth,
        num_heads=encoder_num_heads,
        out_chans=prompt_embed_dim,
        window_size=encoder_window_size,
        global_attn_indexes=tuple(encoder_global_attn_indexes),
    )
    prompt = PromptEncoder3D(
        embed_dim=prompt_embed_dim,
        image_embedding_size=(grid, grid, grid),
        input_image_size=(img_size, img_size, img_size),
        mask_in_chans=mask_in_chans,
    )
    decoder = MaskDecoder3D(
        transformer_dim=prompt_embed_dim,
        transformer=TwoWayTransformer3D(
            depth=decoder_depth,
            embedding_dim=prompt_embed_dim,
            num_heads=decoder_num_heads,
            mlp_dim=decoder_mlp_dim,
        ),
        iou_head_hidden_dim=iou_head_hidden_dim,
    )
    return Sam3D(encoder, prompt, decoder, preset=preset, arch=arch)


def build_sam_med3d() -> Sam3D:
    """SAM-Med3D ``vit_b_ori``: 100,509,232 parameters; every published checkpoint."""
    return build_sam3d(preset="sam-med3d")


def build_tiny() -> Sam3D:
    """Small, global-attention model of the same code (CPU training, bundled demo model)."""
    return build_sam3d(
        encoder_embed_dim=192,
        encoder_depth=6,
        encoder_num_heads=3,
        encoder_window_size=0,
        encoder_global_attn_indexes=(),
        prompt_embed_dim=192,
        decoder_mlp_dim=768,
        iou_head_hidden_dim=128,
        preset="tiny",
    )


def build_vit_b_256() -> Sam3D:
    """The reference registry's unused ``vit_b`` (width 384, input 256^3)."""
    return build_sam3d(img_size=256, encoder_embed_dim=384, preset="vit-b-256")


PRESETS: dict[str, Callable[[], Sam3D]] = {
    "sam-med3d": build_sam_med3d,
    "tiny": build_tiny,
    "vit-b-256": build_vit_b_256,
}

#: names other tools use for the same architectures
ALIASES = {"vit_b_ori": "sam-med3d", "sam_med3d": "sam-med3d", "bosam": "sam-med3d", "vit_b": "vit-b-256"}


def build_preset(name: str) -> Sam3D:
    key = ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[key]()


def build_from_arch(arch: dict[str, Any], preset: str | None = None) -> Sam3D:
    """Rebuild a model from the ``arch`` dict stored in a bosam checkpoint."""
    known = set(build_sam3d.__kwdefaults__) - {"preset"}
    unknown = set(arch) - known
    if unknown:
        raise ValueError(f"unknown architecture fields {sorted(unknown)}")
    return build_sam3d(**arch, preset=preset)
