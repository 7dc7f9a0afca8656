"""Clean-room SAM-Med3D architecture, weight-compatible with the published checkpoints."""

from .presets import PRESETS, build_from_arch, build_preset, build_sam3d
from .sam3d import Sam3D, upscale_logits

__all__ = ["PRESETS", "Sam3D", "build_from_arch", "build_preset", "build_sam3d", "upscale_logits"]
