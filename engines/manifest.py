"""The engine folder and its ``manifest.json``: names, reading, and the identity checks.

An engine folder (written by ``export.export_onnx``) holds ``encoder.onnx``, ``decoder.onnx``,
optionally ``encoder.plan`` / ``decoder.plan`` (TensorRT), and ``manifest.json`` that says
which weights, preset, precision and bosam version they came from. Runtimes refuse a folder
whose manifest does not match what the caller asked for. Reading needs no torch.

The manifest is checked when it is read (``validate_manifest``): every field a runtime or
``segment`` uses must have a usable value, or the folder is refused with one line naming the
manifest and the field. It also records each engine file's size and sha256 (``encoder`` /
``decoder`` for the ONNX files, ``tensorrt.plans`` for the plans); ``check_files`` compares
them when a runtime opens the folder, so an ONNX file or plan from another export is refused.
"""

from __future__ import annotations

import json
import math
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
#: export's --max-points range
MAX_POINTS_RANGE = (2, 4096)
#: bosam_cli.session.CLICK_MEMORIES and bosam_cli.segment.MAX_SPACING_MM (written out: reading a
#: manifest must not import the segmentation code; a test ties them)
CLICK_MEMORIES = ("newest", "all")
MAX_SPACING_MM = 50.0
#: where the manifest records each engine file's size and sha256
FILE_RECORDS: dict[str, tuple[str, ...]] = {
    ENCODER_ONNX: ("encoder",),
    DECODER_ONNX: ("decoder",),
    ENCODER_PLAN: ("tensorrt", "plans", ENCODER_PLAN),
    DECODER_PLAN: ("tensorrt", "plans", DECODER_PLAN),
}


class ManifestError(EngineError):
    """An engine manifest with a missing or unusable field (the message names file and field)."""


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
    validate_manifest(manifest, path)
    return manifest


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _file_record(manifest: Mapping[str, Any], name: str) -> Any:
    rec: Any = manifest
    for key in FILE_RECORDS[name]:
        rec = rec.get(key) if isinstance(rec, Mapping) else None
    return rec


def validate_manifest(manifest: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Refuse (ManifestError) a manifest whose fields a runtime or ``segment`` would use
    unchecked: the window and mask sizes, the point limit, the precision, the checkpoint's
    spacing, HU clamp and click feeding, and the size and sha256 of each engine file."""
    path = Path(path)

    def bad(field: str, expected: str, value: Any = None, missing: bool = False) -> ManifestError:
        got = "it is missing" if missing else f"got {_show(value)}"
        return ManifestError(f"{path}: {field}: expected {expected}, {got}; export again (bosam export)")

    def need(obj: Mapping[str, Any], key: str, field: str, ok: Any, expected: str, optional: bool = False) -> Any:
        if key not in obj or (optional and obj[key] is None):
            if optional:
                return None
            raise bad(field, expected, missing=True)
        if not ok(obj[key]):
            raise bad(field, expected, obj[key])
        return obj[key]

    def size(v: Any) -> bool:
        return _integer(v) and 1 <= v <= 4096

    need(manifest, "img_size", "img_size", size, "a window size in voxels (an integer, 1 .. 4096)")
    need(manifest, "mask_size", "mask_size", size, "a mask size in voxels (an integer, 1 .. 4096)")
    lo, hi = MAX_POINTS_RANGE
    need(manifest, "max_points", "max_points", lambda v: _integer(v) and lo <= v <= hi,
         f"the decoder's point limit (an integer, {lo} .. {hi}, as bosam export --max-points)")
    need(manifest, "precision", "precision", lambda v: v in PRECISIONS, " or ".join(PRECISIONS))
    need(manifest, "embed_shape", "embed_shape",
         lambda v: isinstance(v, list) and len(v) == 5 and all(_integer(d) and d >= 1 for d in v),
         "[1, channels, d, h, w] (positive integers)", optional=True)
    need(manifest, "checkpoint_sha256", "checkpoint_sha256",
         lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
         "a sha256 (64 hex digits) or null (exported from no checkpoint)", optional=True)
    need(manifest, "preset", "preset", lambda v: isinstance(v, str), "a preset name or null", optional=True)

    meta = need(manifest, "model_metadata", "model_metadata", lambda v: isinstance(v, dict),
                "an object (the checkpoint's spacing, HU clamp and click feeding)", optional=True) or {}
    need(meta, "spacing_mm", "model_metadata.spacing_mm", lambda v: _number(v) and 0 < v <= MAX_SPACING_MM,
         f"a window spacing in (0, {MAX_SPACING_MM:g}] mm", optional=True)
    need(meta, "click_memory", "model_metadata.click_memory", lambda v: v in CLICK_MEMORIES,
         " or ".join(CLICK_MEMORIES), optional=True)
    intensity = need(meta, "intensity", "model_metadata.intensity", lambda v: isinstance(v, dict),
                     "an object (clamp_hu, pad_value)", optional=True) or {}
    need(intensity, "clamp_hu", "model_metadata.intensity.clamp_hu",
         lambda v: isinstance(v, list) and len(v) == 2 and all(_number(x) for x in v) and v[0] < v[1],
         "[low, high] HU with low < high, or null (no clamp)", optional=True)
    need(intensity, "pad_value", "model_metadata.intensity.pad_value", _number, "a finite HU value", optional=True)

    trt = need(manifest, "tensorrt", "tensorrt", lambda v: isinstance(v, dict),
               "an object (the TensorRT build) or null", optional=True)
    if trt:
        need(trt, "max_points", "tensorrt.max_points",
             lambda v: _integer(v) and 1 <= v <= manifest["max_points"],
             f"the plans' point limit (an integer, 1 .. max_points {manifest['max_points']})", optional=True)
        need(trt, "plans", "tensorrt.plans", lambda v: isinstance(v, dict), "an object (one entry per plan)")
    for name in FILE_RECORDS:
        if name in (ENCODER_PLAN, DECODER_PLAN) and not trt:
            continue
        where = ".".join(FILE_RECORDS[name])
        rec = _file_record(manifest, name)
        if not isinstance(rec, Mapping):
            raise bad(where, f"the record of {name} (its bytes and sha256)", rec, missing=rec is None)
        need(rec, "bytes", f"{where}.bytes", lambda v: _integer(v) and v >= 0, f"the size of {name} in bytes")
        need(rec, "sha256", f"{where}.sha256",
             lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None,
             f"the sha256 of {name} (64 hex digits)")


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
    """The files exist and are the ones the manifest records (size, then sha256); EngineError
    naming the first missing or different one. A file's hash is read in 1 MiB chunks, once per
    open (about a second for the largest model's encoder)."""
    for name in names:
        path = Path(engine_dir) / name
        if not path.is_file():
            what = "missing from the engine folder" if not path.exists() else "not a regular file"
            raise EngineError(f"{path}: {what} (re-run bosam export)")
    for name in names:
        path = Path(engine_dir) / name
        rec = _file_record(manifest, name)
        if not isinstance(rec, Mapping) or "sha256" not in rec:  # validate_manifest refuses this on reading
            raise ManifestError(f"{Path(engine_dir) / MANIFEST_NAME}: records no sha256 for {name} (export again: bosam export)")
        size = path.stat().st_size
        if rec.get("bytes") is not None and size != rec["bytes"]:
            raise EngineError(f"{path}: does not match the engine's manifest ({size} bytes, the manifest records "
                              f"{rec['bytes']}); export again (bosam export)")
        have = sha256_file(path)
        if have != rec["sha256"]:
            raise EngineError(f"{path}: does not match the engine's manifest (sha256 {have[:12]}..., the manifest "
                              f"records {str(rec['sha256'])[:12]}...); export again (bosam export)")


def check_io_shapes(
    manifest: Mapping[str, Any],
    engine_dir: str | os.PathLike,
    encoder: str,
    decoder: str,
    encoder_io: Mapping[str, Any],
    decoder_io: Mapping[str, Any],
) -> None:
    """The manifest's img_size, mask_size and embed_shape are the graphs' own (ManifestError
    naming the field otherwise): a runtime sizes its inputs from the manifest. ``*_io``: tensor
    name -> shape as the runtime reports it (symbols or -1 for dynamic axes, not compared)."""
    s, m = manifest["img_size"], manifest["mask_size"]
    wants = [
        ("img_size", s, encoder, encoder_io, "image", (1, 1, s, s, s)),
        ("mask_size", m, decoder, decoder_io, "low_res_logits", (1, 1, m, m, m)),
        ("mask_size", m, decoder, decoder_io, "mask_prompt", (1, 1, m, m, m)),
    ]
    if manifest.get("embed_shape") is not None:
        emb = tuple(manifest["embed_shape"])
        wants += [("embed_shape", list(emb), encoder, encoder_io, "embedding", emb),
                  ("embed_shape", list(emb), decoder, decoder_io, "embedding", emb)]
    for field, value, graph, io, tensor, want in wants:
        have = io.get(tensor)
        if have is None:
            raise EngineError(f"{Path(engine_dir) / graph}: has no tensor '{tensor}' (has {sorted(io)}); export again")
        have = tuple(have)
        fixed = [(h, w) for h, w in zip(have, want) if isinstance(h, int) and not isinstance(h, bool) and h >= 0]
        if len(have) != len(want) or any(h != w for h, w in fixed):
            shown = [h if isinstance(h, int) and h >= 0 else "?" for h in have]
            raise ManifestError(f"{Path(engine_dir) / MANIFEST_NAME}: {field}: {value} does not fit {graph}, whose "
                                f"'{tensor}' has shape {shown}; export again (bosam export)")


def engine_warnings(engine: Any) -> list[str]:
    """What a command segmenting with an engine folder should warn about: a folder exported
    from no checkpoint file, whose weights nothing checks (``bosam export --preset`` without
    ``--checkpoint`` exports random weights, for tests and benchmarks). Folder engines keep
    their manifest as ``.manifest``; torch engines give none."""
    manifest = getattr(engine, "manifest", None)
    if not isinstance(manifest, Mapping) or manifest.get("checkpoint_sha256") is not None:
        return []
    folder = getattr(engine, "dir", None) or "the engine folder"
    if manifest.get("random_init") is False:
        what = "a model held in memory, not a checkpoint file: its weights cannot be checked"
    else:
        what = (f"a randomly initialised '{manifest.get('preset')}' model (bosam export --preset without "
                "--checkpoint, for tests and benchmarks): its masks are meaningless")
    return [f"{folder}: exported from {what}; export real weights with bosam export -c CHECKPOINT"]
