"""bosam: promptable 3-D bone segmentation in CT (SAM-Med3D / BoSAM compatible).

Importing this package is cheap; torch is imported only when a model is built or loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .model import Sam3D


def load_model(path: Any = None, preset: str | None = None, device: Any = "cpu") -> "Sam3D":
    """Sam3D in eval mode from a checkpoint (any supported layout; preset detected from its
    shapes unless given), or randomly initialised when ``path`` is None."""
    from .checkpoints import load_model as _load

    return _load(path, preset=preset, device=device)


__all__ = ["__version__", "load_model"]
