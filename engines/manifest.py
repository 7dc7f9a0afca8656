"""The engine folder and its ``manifest.json``: names, reading, and the identity checks.

An engine folder (written by ``export.export_onnx``) holds ``encoder.onnx``, ``decoder.onnx``,
optionally ``encoder.plan`` / ``decoder.plan`` (TensorRT), and ``manifest.json`` that says
which weights, preset, precision and bosam version they came from. Runtimes refuse a folder
whose manifest does not match what the caller asked for. Reading needs no torch.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from bosam_cli import __version__
from bosam_cli.atomic import sha256_file
from bosam_cli.errors import EngineError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "bosam-engines/1"

ENCODER_ONNX = "encoder.onnx"
DECODER_ONNX = "decoder.onnx"
ENCODER_PLAN = "encoder.plan"
DECODER_PLAN = "decoder.plan"

ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("embedding",)
DECODER_INPUTS = ("embedding", "points", "labels", "mask_prompt")
DECODER_OUTPUTS = ("low_res_logits", "iou")
#: the one dynamic dimension of the decoder (axis 1 of points and labels)
POINTS_DIM = "num_points"

PRECISIONS = ("fp32", "fp16")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def default_engine_dir(
    checkpoint: str | os.PathLike | None = None,
    preset: str | None = None,
    precision: str = "fp32",
    root: str | os.PathLike = ".",
) -> Path:
    """``engines/<checkpoint stem or preset>[-fp16]`` under ``root`` (the working directory)."""
    if checkpoint is not None:
        name = Path(checkpoint).stem
    else:
        name = preset or "sam-med3d"
    if precision and precision != "fp32":
        name = f"{name}-{precision}"
    return Path(root) / "engines" / _slug(name)


def load_manifest(engine_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``manifest.json`` of an engine folder (EngineError when absent or invalid)."""
    engine_dir = Path(engine_dir)
    path = engine_dir / MANIFEST_NAME
    if not engine_dir.is_dir():
        raise EngineError(f"{engine_dir}: no such engine folder (create one with: bosam export)")
    if not path.is_file():
        raise EngineError(f"{engine_dir}: not an engine folder: {MANIFEST_NAME} is missing (re-run bosam export)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"{path}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise EngineError(f"{path}: manifest format {got!r} is not {MANIFEST_FORMAT!r} (re-run bosam export)")
    return manifest


def check_manifest(
    manifest: Mapping[str, Any],
    engine_dir: str | os.PathLike,
    checkpoint: str | os.PathLike | None = None,
    preset: str | None = None,
    precision: str | None = None,
    checkpoint_sha256: str | None = None,
) -> None:
    """Refuse (EngineError) engines made from other weights, another preset, precision or bosam.

    ``checkpoint`` is hashed unless its ``checkpoint_sha256`` is given.
    """
    where = Path(engine_dir)
    made_by = manifest.get("bosam_version")
    if made_by != __version__:
        raise EngineError(
            f"{where}: engines were exported by bosam {made_by}, this is bosam {__version__}; "
            "re-export them (bosam export)"
        )
    if checkpoint is not None or checkpoint_sha256 is not None:
        want = checkpoint_sha256 or sha256_file(checkpoint)  # type: ignore[arg-type]
        have = manifest.get("checkpoint_sha256")
        if have is None:
            raise EngineError(
                f"{where}: engines were exported from a randomly initialised '{manifest.get('preset')}' model, "
                f"not from {checkpoint or 'the given checkpoint'}; re-export with --checkpoint"
            )
        if have != want:
            raise EngineError(
                f"{where}: engines were exported from checkpoint sha256 {have[:12]}..., "
                f"not from {checkpoint or 'the given checkpoint'} (sha256 {want[:12]}...); re-export them"
            )
    if preset is not None and manifest.get("preset") not in (None, preset):
        raise EngineError(f"{where}: engines are for preset '{manifest.get('preset')}', not '{preset}'")
    if precision is not None and manifest.get("precision") != precision:
        raise EngineError(
            f"{where}: engines are {manifest.get('precision')}, not {precision} "
            f"(pass --precision {manifest.get('precision')} or export again)"
        )


def check_files(manifest: Mapping[str, Any], engine_dir: str | os.PathLike, names: tuple[str, ...]) -> None:
    """The files exist (EngineError naming the first missing one)."""
    for name in names:
        if not (Path(engine_dir) / name).is_file():
            raise EngineError(f"{Path(engine_dir) / name}: missing from the engine folder (re-run bosam export)")
