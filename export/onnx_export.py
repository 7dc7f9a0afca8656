"""torch -> ONNX: ``encoder.onnx`` and ``decoder.onnx``, verified with ONNX Runtime, with a manifest.

The model code is already export-friendly (arithmetic masks, ``LayerNormalization``, matmul
relative positions), so the wrappers below only fix the I/O names and the one dynamic axis
(the number of points). Export goes through ``torch.onnx.export(..., dynamo=True)`` at opset
18 and falls back to the legacy TorchScript exporter only when dynamo fails; the manifest says
which one ran. The folder is built in a temporary directory beside the target and renamed into
place only after verification passed, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from bosam_cli import __version__
from bosam_cli.atomic import current_umask, make_dirs
from bosam_cli.errors import EngineError
from engines.manifest import (
    DECODER_INPUTS,
    DECODER_ONNX,
    DECODER_OUTPUTS,
    ENCODER_INPUTS,
    ENCODER_ONNX,
    ENCODER_OUTPUTS,
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    POINTS_DIM,
    PRECISIONS,
    default_engine_dir,
    sha256_file,
)

#: largest opset TensorRT 10.0 parses (10.x: 9..20 at 10.0; 11.x goes further)
MAX_TRT_OPSET = 20
MIN_OPSET = 18
MAX_IR_VERSION = 10

Log = Callable[[str], None]


def _noop(_: str) -> None:
    pass


# --------------------------------------------------------------------------------------------
# model identity


def state_dict_fingerprint(model: Any) -> str:
    """sha256 over (key, dtype, shape, bytes) of every state-dict entry, sorted by key.

    Identifies a model that has no checkpoint file (random initialisation, an in-memory
    fine-tune); stable across processes and machines for the same weights.
    """
    import torch

    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _resolve_model(model_or_checkpoint: Any, preset: str | None) -> tuple[Any, str | None, str | None]:
    """(model in eval mode on CPU fp32, checkpoint path or None, checkpoint sha256 or None)."""
    import copy

    import torch

    from bosam_cli.checkpoints import load_model

    if model_or_checkpoint is None or isinstance(model_or_checkpoint, (str, os.PathLike)):
        model = load_model(model_or_checkpoint, preset=preset)
    else:
        model = model_or_checkpoint
        if preset is not None and getattr(model, "preset", None) not in (None, preset):
            raise EngineError(f"the model is preset '{model.preset}', not '{preset}'")
        p = next(model.parameters(), None)
        if model.training or (p is not None and (p.device.type != "cpu" or p.dtype != torch.float32)):
            # never move or switch the caller's model (a training loop's CUDA model, say)
            model = copy.deepcopy(model)
    model = model.to("cpu").float().eval()
    return model, getattr(model, "checkpoint_path", None), getattr(model, "checkpoint_sha256", None)


# --------------------------------------------------------------------------------------------
# wrappers and exporters


def _wrappers(model: Any):
    import torch

    class EncoderONNX(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.m.image_encoder(image)

    class DecoderONNX(torch.nn.Module):
        def __init__(self, m: Any) -> None:
            super().__init__()
            self.m = m

        def forward(self, embedding, points, labels, mask_prompt):
            return self.m.decode(embedding, points, labels, mask_prompt)

    return EncoderONNX(model).eval(), DecoderONNX(model).eval()


def _example_inputs(model: Any, n_points: int):
    import torch

    s, m = model.img_size, model.mask_size
    g = torch.Generator().manual_seed(0)
    image = torch.randn(1, 1, s, s, s, generator=g)
    embedding = torch.randn(1, model.embed_dim, model.embed_grid, model.embed_grid, model.embed_grid, generator=g)
    points = torch.rand(1, n_points, 3, generator=g) * (s - 1)
    labels = torch.ones(1, n_points, dtype=torch.int64)
    mask_prompt = torch.zeros(1, 1, m, m, m)
    return image, (embedding, points, labels, mask_prompt)


def _save_program(program: Any, path: Path) -> None:
    program.save(str(path), external_data=False)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporters' warnings and log lines (torchvision ops skipped, deprecations)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


@_quiet_exporter()
def _export_one(
    module: Any,
    args: tuple,
    path: Path,
    input_names: tuple[str, ...],
    output_names: tuple[str, ...],
    opset: int,
    max_points: int | None,
    log: Log,
    output_shapes: dict[str, tuple[int, ...]],
    legacy_because: str | None = None,
) -> dict[str, Any]:
    """Export one module to ``path`` (exporter warnings silenced); returns {"exporter": ...,
    "seconds": ..., "dynamo_error": ...}. ``legacy_because`` skips the dynamo exporter (its
    graph failed verification) and is recorded as the reason."""
    import torch

    t0 = time.perf_counter()
    dynamic = max_points is not None
    info: dict[str, Any] = {}
    try:
        if legacy_because is not None:
            raise RuntimeError(legacy_because)
        kwargs: dict[str, Any] = {}
        if dynamic:
            n = torch.export.Dim(POINTS_DIM, min=1, max=max_points)
            kwargs["dynamic_shapes"] = {
                "embedding": None,
                "points": {1: n},
                "labels": {1: n},
                "mask_prompt": None,
            }
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=list(input_names),
            output_names=list(output_names),
            verbose=False,
            **kwargs,
        )
        _save_program(program, path)
        info["exporter"] = "dynamo"
    except Exception as exc:  # noqa: BLE001 - any dynamo failure -> legacy fallback, recorded
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if legacy_because is None:
            log(f"dynamo export of {path.name} failed ({first}); falling back to the legacy exporter")
        path.unlink(missing_ok=True)
        kwargs = {}
        if dynamic:
            kwargs["dynamic_axes"] = {"points": {1: POINTS_DIM}, "labels": {1: POINTS_DIM}}
        try:
            with _legacy_friendly(module):
                torch.onnx.export(
                    module,
                    args,
                    str(path),
                    dynamo=False,
                    opset_version=opset,
                    input_names=list(input_names),
                    output_names=list(output_names),
                    do_constant_folding=True,
                    **kwargs,
                )
        except Exception as exc2:  # noqa: BLE001
            first2 = (str(exc2).strip().splitlines() or [type(exc2).__name__])[0][:300]
            raise EngineError(f"ONNX export of {path.name} failed with both exporters: dynamo: {first}; legacy: {first2}") from None
        info["exporter"] = "legacy"
        info["dynamo_error"] = first
    info["gelu_reordered_for_ort_fusion"] = _finalise(path, output_shapes)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info


@contextlib.contextmanager
def _legacy_friendly(module: Any):
    """Adapt the model for the legacy (TorchScript) exporter for the duration of an export.

    ``LayerNorm3d`` passes ``(x.shape[-1],)`` as ``normalized_shape``; under tracing with a
    dynamic axis that becomes a traced value and ``aten::layer_norm`` refuses it ("not
    constant"). The patch uses the weight's length instead: the same number, known statically.
    Nothing changes for the dynamo exporter or for eager use.
    """
    import torch.nn.functional as F

    from bosam_cli.model.common import LayerNorm3d

    def static_forward(self: Any, x: Any) -> Any:
        x = x.permute(0, 2, 3, 4, 1)
        x = F.layer_norm(x, (int(self.weight.shape[0]),), self.weight, self.bias, self.eps)
        return x.permute(0, 4, 1, 2, 3)

    patched = [m for m in module.modules() if isinstance(m, LayerNorm3d)]
    for m in patched:
        m.forward = static_forward.__get__(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


def _finalise(path: Path, output_shapes: dict[str, tuple[int, ...]]) -> int:
    """Cap the IR version at 10 (TensorRT 10 and onnxruntime-gpu builds reject newer IRs) and
    state the static output shapes where the exporter left symbols (the legacy exporter names
    Slice outputs' dims instead of computing them)."""
    import onnx

    model = onnx.load(str(path))
    changed = False
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        changed = True
    for out in model.graph.output:
        want = output_shapes.get(out.name)
        dims = out.type.tensor_type.shape.dim
        if want is None or (len(dims) == len(want) and all(d.HasField("dim_value") for d in dims)):
            continue
        del dims[:]
        for v in want:
            dims.add().dim_value = int(v)
        changed = True
    gelus = reorder_gelu(model)
    if changed or gelus:
        onnx.save(model, str(path))
    return gelus


def reorder_gelu(model: Any) -> int:
    """Rewrite exported erf-GELUs into the operand order ONNX Runtime fuses; returns how many.

    torch's exporters write ``0.5 * (1 + erf(x / sqrt2))`` then ``* x``; ORT's GeluFusion only
    matches ``(x * (1 + erf(x / sqrt2))) * 0.5`` and otherwise runs five elementwise passes
    (measured on a 48x32^3 tensor: 2.1 ms vs 0.9 ms fused, 2 vCPUs). Same operations, same
    operands, only the order of the two products changes, so TensorRT and checkers see
    standard ops either way; verification bounds the rounding difference (~1e-7).
    """
    from onnx import numpy_helper

    g = model.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}

    def scalar(name: str, value: float) -> bool:
        arr = consts.get(name)
        return arr is not None and arr.size == 1 and abs(float(arr.reshape(-1)[0]) - value) < 1e-3

    def only_consumer(name: str) -> Any:
        c = consumers.get(name, [])
        return c[0] if len(c) == 1 and name not in outputs else None

    count = 0
    for erf in [n for n in g.node if n.op_type == "Erf"]:
        div = producer.get(erf.input[0])
        if div is None or div.op_type != "Div" or not scalar(div.input[1], 2 ** 0.5):
            continue
        x = div.input[0]
        add = only_consumer(erf.output[0])
        if add is None or add.op_type != "Add" or not any(scalar(i, 1.0) for i in add.input):
            continue
        half = only_consumer(add.output[0])
        if half is None or half.op_type != "Mul":
            continue
        half_const = next((i for i in half.input if scalar(i, 0.5)), None)
        if half_const is None:
            continue
        last = only_consumer(half.output[0])
        if last is None or last.op_type != "Mul" or x not in last.input:
            continue
        # half: 0.5 * add  ->  x * add ;  last: x * half  ->  half * 0.5
        half.input[:] = [x, add.output[0]]
        last.input[:] = [half.output[0], half_const]
        count += 1
    return count


# --------------------------------------------------------------------------------------------
# graph description


_ONNX_DTYPES = {1: "float32", 10: "float16", 6: "int32", 7: "int64", 9: "bool", 16: "bfloat16", 11: "float64"}


def describe_io(path: str | os.PathLike) -> dict[str, Any]:
    """Names, shapes (dim_param names for dynamic axes), dtypes, opset and IR of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def spec(v: Any) -> dict[str, Any]:
        tt = v.type.tensor_type
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
        return {"name": v.name, "shape": dims, "dtype": _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))}

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "file": Path(path).name,
        "bytes": Path(path).stat().st_size,
        "sha256": sha256_file(path),
        "opset": opset,
        "ir_version": int(model.ir_version),
        "nodes": len(model.graph.node),
        "inputs": [spec(v) for v in model.graph.input],
        "outputs": [spec(v) for v in model.graph.output],
    }


# --------------------------------------------------------------------------------------------
# the export


def export_onnx(
    model_or_checkpoint: Any = None,
    out_dir: str | os.PathLike | None = None,
    precision: str = "fp32",
    max_points: int = 64,
    opset: int = 18,
    *,
    preset: str | None = None,
    trt: bool = False,
    trt_options: dict[str, Any] | None = None,
    seed: int = 0,
    threads: int | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Export a model to an engine folder and verify it; returns the manifest (also written).

    Args:
        model_or_checkpoint: a ``Sam3D``, a checkpoint path, or None (random init of ``preset``).
        out_dir: target folder; default ``engines/<checkpoint stem or preset>[-fp16]`` under the
            working directory. An existing engine folder is replaced atomically; any other
            existing non-empty folder is refused.
        precision: "fp32", or "fp16" (mixed precision: LayerNorm, Softmax, reductions and the
            positional encoding stay fp32; inputs and outputs stay fp32).
        max_points: largest number of points the decoder accepts (N is dynamic in 1..max_points).
        opset: ONNX opset, 18..20 (TensorRT 10.0 parses up to 20; dynamo starts at 18).
        trt: also build TensorRT plans (``export.trt_build.build_trt_engines``) before the folder
            is moved into place; checked first, so a machine without TensorRT fails at once.
        trt_options: keyword arguments for ``build_trt_engines`` (workspace_gib, timing_cache ...).
        seed: seed of the verification inputs.
        threads: ONNX Runtime threads for the verification (None: ORT's default).
        log: progress callback (one line per step).
    """
    log = log or _noop
    if precision not in PRECISIONS:
        raise EngineError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if not 2 <= int(max_points) <= 4096:
        raise EngineError(f"--max-points must be between 2 and 4096, not {max_points}")
    if not MIN_OPSET <= int(opset) <= MAX_TRT_OPSET:
        raise EngineError(f"opset must be between {MIN_OPSET} and {MAX_TRT_OPSET} (TensorRT 10 parses up to 20), not {opset}")
    max_points, opset = int(max_points), int(opset)
    if trt:
        from .trt_build import check_trt_prerequisites

        check_trt_prerequisites()  # fail before minutes of export on a machine without TensorRT

    model, ckpt_path, ckpt_sha = _resolve_model(model_or_checkpoint, preset)
    preset_name = getattr(model, "preset", None) or preset
    target = Path(out_dir) if out_dir is not None else default_engine_dir(ckpt_path, preset_name, precision)
    _check_target(target)

    created = make_dirs(target.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as exc:
        _remove_created(created)
        raise _about_target(exc, target) from None
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # the folder others use, not mkdtemp's private 0700
        manifest = _export_into(
            model, tmp, precision, max_points, opset, ckpt_path, ckpt_sha, preset_name, seed, threads, log,
            random_init=model_or_checkpoint is None,
        )
        if trt:
            from .trt_build import build_trt_engines

            build_trt_engines(tmp, max_points=max_points, log=log, **(trt_options or {}))
            from engines.manifest import load_manifest

            manifest = load_manifest(tmp)
        _replace_dir(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        if isinstance(exc, OSError) and _names_scratch(exc, target):
            raise _about_target(exc, target) from None
        raise
    manifest["path"] = str(target)
    return manifest


def _remove_created(created: list[Path]) -> None:
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            break


def _names_scratch(exc: OSError, target: Path) -> bool:
    """The error names one of export's scratch folders beside the target (``.name.tmp-*``,
    ``.name.old-*``) or a file in one: a name the user never gave."""
    for f in (exc.filename, exc.filename2):
        if f is None:
            continue
        p = Path(os.fsdecode(f)).absolute()
        for q in (p, *p.parents):
            if q.parent == target.absolute().parent and q.name.startswith(f".{target.name}."):
                return True
    return False


def _about_target(exc: OSError, target: Path) -> EngineError:
    """An OSError about export's scratch folder, told about the target (a read-only or full disk)."""
    return EngineError(f"{target}: cannot write the engine folder ({exc.strerror or exc})")


def _check_target(target: Path) -> None:
    if target.exists():
        if not target.is_dir():
            raise EngineError(f"{target}: exists and is not a folder")
        if any(target.iterdir()) and not (target / MANIFEST_NAME).is_file():
            raise EngineError(f"{target}: exists, is not empty and is not an engine folder; choose another -o")


def _replace_dir(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing target is moved aside first and then removed."""
    old: Path | None = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        old.rmdir()
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _export_into(
    model: Any,
    folder: Path,
    precision: str,
    max_points: int,
    opset: int,
    ckpt_path: str | None,
    ckpt_sha: str | None,
    preset: str | None,
    seed: int,
    threads: int | None,
    log: Log,
    random_init: bool = False,
) -> dict[str, Any]:
    import torch

    from bosam_cli.runtime_info import dist_version, versions

    from .readiness import check_trt_readiness
    from .verify import verify_export

    enc_mod, dec_mod = _wrappers(model)
    g, m = int(model.embed_grid), int(model.mask_size)
    emb_shape = (1, int(model.embed_dim), g, g, g)

    def export_graphs(legacy_because: str | None = None) -> tuple[dict[str, Any], dict[str, Any] | None, float | None]:
        image, dec_args = _example_inputs(model, min(5, max_points))
        exporters: dict[str, Any] = {}
        with torch.no_grad():
            log("exporting the image encoder")
            exporters["encoder"] = _export_one(
                enc_mod, (image,), folder / ENCODER_ONNX, ENCODER_INPUTS, ENCODER_OUTPUTS, opset, None, log,
                {"embedding": emb_shape}, legacy_because,
            )
            log("exporting the prompt encoder + mask decoder")
            exporters["decoder"] = _export_one(
                dec_mod, dec_args, folder / DECODER_ONNX, DECODER_INPUTS, DECODER_OUTPUTS, opset, max_points, log,
                {"low_res_logits": (1, 1, m, m, m), "iou": (1, 1)}, legacy_because,
            )
        del image, dec_args
        fp16_notes: dict[str, Any] | None = None
        fp16_seconds: float | None = None
        if precision == "fp16":
            from .fp16 import convert_to_mixed_fp16

            log("converting to mixed precision (fp16 with fp32 LayerNorm/Softmax/reductions)")
            t0 = time.perf_counter()
            fp16_notes = {}
            for name in (ENCODER_ONNX, DECODER_ONNX):
                fp16_notes[name] = convert_to_mixed_fp16(folder / name, folder / name)
            fp16_seconds = round(time.perf_counter() - t0, 2)
        return exporters, fp16_notes, fp16_seconds

    exporters, fp16_notes, fp16_seconds = export_graphs()
    timings = {f"export_{k}": v["seconds"] for k, v in exporters.items()}
    log("verifying with ONNX Runtime (CPU) against PyTorch")
    t0 = time.perf_counter()
    verification = verify_export(model, folder, precision, max_points, seed=seed, threads=threads)
    if not verification["passed"] and any(v["exporter"] == "dynamo" for v in exporters.values()):
        # a dynamo graph that computes something else (an exporter bug): the legacy exporter,
        # verified the same way, before giving up
        worst = next(c for c in verification["cases"] if not c["passed"])
        reason = (f"the dynamo exporter's graph failed verification ({worst['component']} {worst['output']}, "
                  f"{worst['case']}: max abs difference {worst['max_abs']:.3g})")
        log(f"{reason}; exporting again with the legacy exporter")
        exporters, fp16_notes, fp16_seconds = export_graphs(reason)
        timings.update({f"export_{k}_legacy": v["seconds"] for k, v in exporters.items()})
        verification = verify_export(model, folder, precision, max_points, seed=seed, threads=threads)
    timings["verification"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    readiness = {
        name: check_trt_readiness(folder / name, max_points=max_points if name == DECODER_ONNX else None).as_dict(brief=True)
        for name in (ENCODER_ONNX, DECODER_ONNX)
    }
    timings["trt_readiness"] = round(time.perf_counter() - t0, 2)
    vers = versions()
    vers["onnxscript"] = dist_version("onnxscript")
    enc_io, dec_io = describe_io(folder / ENCODER_ONNX), describe_io(folder / DECODER_ONNX)
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "bosam_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint_path": str(ckpt_path) if ckpt_path else None,
        "checkpoint_sha256": ckpt_sha,
        "weights_fingerprint": state_dict_fingerprint(model),
        # no checkpoint: random weights (export --preset without --checkpoint), which segment warns about
        "random_init": bool(random_init),
        "preset": preset,
        "arch": dict(getattr(model, "arch", {}) or {}),
        "img_size": int(model.img_size),
        "mask_size": int(model.mask_size),
        "embed_shape": [1, int(model.embed_dim)] + [int(model.embed_grid)] * 3,
        "precision": precision,
        "max_points": max_points,
        "model_metadata": segment_metadata(model),
        "opset": opset,
        "ir_version": max(enc_io["ir_version"], dec_io["ir_version"]),
        "exporter": {k: v["exporter"] for k, v in exporters.items()},
        "export_details": exporters,
        "encoder": enc_io,
        "decoder": dec_io,
        "fp16_conversion": fp16_notes,
        "verification": verification,
        "trt_readiness": readiness,
        "timings_s": {**timings, **({"fp16_conversion": fp16_seconds} if fp16_seconds is not None else {})},
        "tensorrt": None,
        "versions": vers,
    }
    write_manifest(folder, manifest)
    if not verification["passed"]:
        worst = next(c for c in verification["cases"] if not c["passed"])
        raise EngineError(
            f"verification failed: {worst['component']} {worst['output']} ({worst['case']}): max abs difference {worst['max_abs']:.3g} "
            f"(allowed {worst['allowed_abs']:.3g})"
            + (f", mask Dice {worst['dice']:.4f} (needs >= {verification['tolerance']['dice_min']})" if worst.get("dice") is not None else "")
            + "; nothing was written"
        )
    return manifest


def segment_metadata(model: Any) -> dict[str, Any]:
    """What ``segment`` reads from a checkpoint besides the weights (window spacing, HU clamp, how
    clicks are fed), so that an engine folder segments like its checkpoint without it."""
    meta = dict(getattr(model, "checkpoint_metadata", None) or {})
    keep = {k: meta[k] for k in ("spacing_mm", "intensity", "click_memory", "label_ids", "label_names") if k in meta}
    return json.loads(json.dumps(keep))  # plain JSON types only


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> None:
    from bosam_cli.atomic import write_json

    write_json(manifest, Path(folder) / MANIFEST_NAME)
