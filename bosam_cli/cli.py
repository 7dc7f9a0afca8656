"""The ``bosam`` command line: thin Typer commands over the core functions.

Heavy imports (torch, onnxruntime, nibabel) happen inside the commands, so ``bosam --help``
stays instant.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from . import __version__


class _BareHelp:
    """Typer shows '<bool>' beside on/off flags ('--json', '--help'), which reads as if a value
    were needed ('--per-object true' then fails): every flag of every command is shown bare."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Command(_BareHelp, TyperCommand):
    pass


class _Group(_BareHelp, TyperGroup):
    pass


app = typer.Typer(
    name="bosam",
    cls=_Group,
    help="Promptable 3-D bone segmentation in CT from a few clicks (SAM-Med3D / BoSAM compatible).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def esc(text: Any) -> str:
    """User text (paths, names, messages) shown literally: rich would read "[...]" as markup."""
    from rich.markup import escape

    return escape(str(text))


def fail(message: str, code: int = 2) -> None:
    """Print one error line to stderr and exit non-zero."""
    _console(stderr=True).print(f"[bold red]error:[/] {esc(message)}", soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn bosam's user-facing errors into one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import BosamError

        try:
            return func(*args, **kwargs)
        except BosamError as exc:
            fail(str(exc))
        except FileNotFoundError as exc:
            fail(f"{exc.filename}: no such file")
        except OSError as exc:  # a folder where a file goes, no permission, disk full ...
            where = exc.filename2 or exc.filename
            fail(f"{where}: {exc.strerror or exc}" if where else f"cannot write or read a file: {exc}")
        except KeyboardInterrupt:
            fail("interrupted", code=130)

    return wrapper


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"bosam {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Print the version."),
) -> None:
    """bosam: promptable 3-D bone segmentation in CT."""


@app.command()
@handle_errors
def info(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Checkpoint to describe."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
) -> None:
    """Versions, runtimes and GPUs here; layout, preset, size and sha256 of a checkpoint."""
    from .runtime_info import info_report

    report = info_report(str(checkpoint) if checkpoint else None)
    if as_json:
        print_json(report)
        return
    from rich.table import Table

    con = _console()
    t = Table(title="bosam environment", show_header=False)
    for k, v in report["versions"].items():
        t.add_row(k, str(v) if v else "[dim]not installed[/]")
    t.add_row("onnxruntime providers", ", ".join(report["onnxruntime_providers"]) or "[dim]none[/]")
    gpus = report["cuda_devices"]
    t.add_row(
        "CUDA devices",
        "; ".join(f"{d['index']}: {d['name']} (sm {d['compute_capability']}, {d['memory_gib']} GiB)" for d in gpus)
        or "[dim]none[/]",
    )
    con.print(t)
    for w in report["warnings"]:
        con.print(f"[yellow]warning:[/] {esc(w)}")
    ck = report.get("checkpoint")
    if ck:
        t = Table(title=f"checkpoint {esc(str(ck['path']))}", show_header=False)
        for k in ("layout", "preset", "parameters", "tensors", "sha256"):
            t.add_row(k, f"{ck[k]:,}" if isinstance(ck[k], int) else esc(str(ck[k])))
        if ck["conversions"]:
            t.add_row("conversions", esc("; ".join(ck["conversions"])))
        if ck["other_entries"]:
            t.add_row("other entries", esc(", ".join(ck["other_entries"])))
        for k, v in ck["metadata"].items():
            t.add_row(esc(f"metadata.{k}"), esc(json.dumps(v) if not isinstance(v, str) else v))
        con.print(t)


points_app = typer.Typer(help="Prompt files: check where clicks land before inference.", no_args_is_help=True, cls=_Group)
app.add_typer(points_app, name="points")


@points_app.command("check")
@handle_errors
def points_check(
    ct: Path = typer.Argument(..., help="CT: .nii/.nii.gz, .nrrd/.nhdr, .mha/.mhd, a DICOM series folder or one file of the series."),
    prompts: Path = typer.Argument(..., help="Prompt file: bosam JSON, Slicer .mrk.json or MONAI Label JSON."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
) -> None:
    """Where every click lands: object, click, +/-, RAS mm, voxel i,j,k, HU there, inside or not.
    Exits 1 when a click falls outside the CT (segment would refuse the file), so it can gate a script."""
    from .prompts import check_points

    records = check_points(ct, prompts)
    outside = sum(not r["inside"] for r in records)
    if as_json:
        print_json(records)
        if outside:
            raise typer.Exit(1)
        return
    from rich.table import Table

    t = Table(title=esc(f"clicks of {prompts} in {ct}"))
    for col in ("object", "label", "click", "+/-", "RAS mm", "voxel i,j,k", "HU", "inside"):
        t.add_column(col, justify="right" if col in ("label", "click", "HU") else "left", overflow="fold")  # names wrap, never cut
    for r in records:
        t.add_row(
            esc(r["object"]),
            str(r["label"]),
            str(r["click"]),
            "+" if r["positive"] else "-",
            ", ".join(f"{x:.1f}" for x in r["ras"]),
            ", ".join(f"{x:.2f}" for x in r["voxel"]),
            "" if r["hu"] is None else str(r["hu"]),
            "yes" if r["inside"] else "[bold red]NO[/]",
        )
    con = _console()
    con.print(t)
    if outside:
        con.print(f"[yellow]warning:[/] {outside} of {len(records)} clicks fall outside the volume; segmentation would refuse this file")
        raise typer.Exit(1)


def check_preset(preset: Optional[str]) -> None:
    """--preset: a known architecture (or one of its other names), or None."""
    from .errors import BosamError
    from .model.presets import ALIASES, PRESETS

    if preset is not None and ALIASES.get(preset, preset) not in PRESETS:
        raise BosamError(f"--preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")


def check_threads(threads: Optional[int]) -> None:
    """--threads: 1 .. MAX_THREADS (torch dies without a word far above), or None."""
    from .errors import BosamError
    from .runtime_info import MAX_THREADS

    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise BosamError(f"--threads: must be 1 .. {MAX_THREADS}, got {threads}")


def open_engine_for(
    engine: str,
    checkpoint: Optional[Path],
    engine_dir: Optional[Path],
    device: Optional[str],
    precision: str,
    threads: Optional[int],
):
    """The engine a command asked for (checkpoint defaults to the bundled model)."""
    from engines.registry import open_engine

    from .errors import BosamError
    from .segment import resolve_checkpoint

    check_threads(threads)
    if device and device.lower() != "tensorrt":  # tensorrt: ONNX Runtime's TensorRT provider
        import torch

        try:
            torch.device(device)
        except (RuntimeError, ValueError):
            raise BosamError(f"--device: {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if threads:
        import torch

        torch.set_num_threads(threads)
    ck = resolve_checkpoint(checkpoint) if (checkpoint or engine_dir is None) else None
    return open_engine(
        engine, checkpoint=ck, engine_dir=str(engine_dir) if engine_dir else None,
        device=device, precision=precision, threads=threads,
    )


ENGINE_HELP = "torch, onnxruntime, tensorrt, or auto (TensorRT, then ONNX Runtime CUDA, then ONNX Runtime CPU, then torch)."
ISLANDS_HELP = ("clicked: keep the connected pieces of each mask that hold a positive click (drop detached blobs); "
                "all: keep every piece.")
REFINE_HU = 75.0  # session.REFINE_HU, written out so that the CLI starts without SciPy (a test ties them)
REFINE_HELP = ("hu: peel the soft-tissue rim off each mask (voxels below --refine-hu within one model output voxel "
               "of the surface, reachable from outside and not enclosed by bone); none: the model's mask as is.")
REFINE_HU_HELP = "HU below which --refine hu peels a surface voxel."


@app.command()
@handle_errors
def segment(
    ct: Path = typer.Argument(..., help="CT (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd, DICOM series folder or one file of the series); for a batch a folder of CTs or a CSV/JSON manifest (columns ct, points, out)."),
    points: Optional[Path] = typer.Option(None, "--points", "-p", help="Prompt file with the clicks (bosam JSON, Slicer .mrk.json, MONAI Label); for a batch a folder of them matched by CT name."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Label map path (.nii.gz, .nii, .nrrd, .mha, or .dcm: a DICOM SEG, for a DICOM CT) or output folder \\[default: ./<ct>_bosam.nii.gz]."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Model weights (SAM-Med3D, turbo, BoSAM, BoSAM-LoRA or bosam) \\[default: the bundled model]."),
    engine: str = typer.Option("auto", "--engine", help=ENGINE_HELP),
    engine_dir: Optional[Path] = typer.Option(None, "--engine-dir", help="Folder written by 'bosam export' (ONNX / TensorRT engines)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... \\[default: best available]."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16: torch autocast (fp16 needs CUDA there; bf16 is torch only); an engine folder must have been exported in it."),
    spacing: Optional[float] = typer.Option(None, "--spacing", help="Model window spacing in mm \\[default: the checkpoint's, else 1.5]."),
    no_clamp: bool = typer.Option(False, "--no-clamp", help="Do not clamp HU to [-1000, 1000] before normalising."),
    max_windows: int = typer.Option(8, "--max-windows", help="Most 128^3 windows one bone may grow into."),
    islands: str = typer.Option("clicked", "--islands", help=ISLANDS_HELP),
    refine: str = typer.Option("hu", "--refine", help=REFINE_HELP),
    refine_hu: float = typer.Option(REFINE_HU, "--refine-hu", help=REFINE_HU_HELP),
    per_object: bool = typer.Option(False, "--per-object", help="Also write one mask file per bone."),
    overlay: bool = typer.Option(False, "--overlay", help="Also write a PNG with three slices through each bone and its clicks."),
    mesh: bool = typer.Option(False, "--mesh", help="Also write one STL surface per bone, in patient millimetres."),
    interactive_mode: bool = typer.Option(False, "--interactive", "-i", help="Read clicks line by line ('+ x y z', '- x y z', 'object N', 'undo', 'save', 'quit')."),
    coords: str = typer.Option("RAS", "--coords", help="Coordinate system of interactive clicks: RAS, LPS (mm) or voxel."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the engine."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest(s) as JSON."),
) -> None:
    """Segment bones from clicks: a label map on the exact grid of the CT, plus a JSON manifest."""
    from .segment import SegmentOptions, find_cases, interactive, is_batch, segment_file

    options = SegmentOptions(
        spacing_mm=spacing,
        clamp_hu=() if no_clamp else None,
        max_windows=max_windows,
        islands=islands,
        refine=refine,
        refine_hu=refine_hu,
        per_object=per_object,
        overlay=overlay,
        mesh=mesh,
    )
    if not ct.exists():
        fail(f"{ct}: no such file or folder")
    if not interactive_mode and coords.upper() != "RAS":
        fail(f"--coords {coords}: sets the system of clicks typed with --interactive; a prompt file names its own "
             "(its coordinate_system field)")
    if interactive_mode:
        eng = open_engine_for(engine, checkpoint, engine_dir, device, precision, threads)
        from engines.manifest import engine_warnings

        _print_warnings(_console(stderr=True), engine_warnings(eng))  # a file run has them in its manifest
        failures = interactive(ct, out, eng, options, coordinate_system=coords, points=points)
        if failures:
            raise typer.Exit(1)
        return
    if is_batch(ct):
        cases = find_cases(ct, points)
        eng = open_engine_for(engine, checkpoint, engine_dir, device, precision, threads)
        _segment_batch_cli(cases, out, eng, options, as_json)
        return
    if points is None:
        fail("--points: a prompt file is required (or use --interactive)")
    eng = open_engine_for(engine, checkpoint, engine_dir, device, precision, threads)
    manifest = segment_file(ct, points, out, eng, options)
    if as_json:
        print_json(manifest)
        return
    _print_segment_summary([manifest])


def _print_warnings(con, warnings: list) -> None:
    """One yellow line per warning, never cut at the terminal width."""
    for w in warnings:
        con.print(f"[yellow]warning:[/] {esc(w)}", soft_wrap=True)


def _print_segment_summary(manifests: list) -> None:
    from rich.table import Table

    con = _console()
    for m in manifests:
        t = Table(title=esc(f"{m['input']['ct']} -> {m['output']['label_map']}"))
        for col in ("label", "name", "clicks", "voxels", "volume mm³", "windows", "note"):
            t.add_column(col, justify="right" if col in ("label", "clicks", "voxels", "volume mm³", "windows") else "left")
        for o in m["objects"]:
            t.add_row(
                str(o["label"]), esc(o["name"]), str(len(o["clicks"])), f"{o['voxels']:,}", f"{o['volume_mm3']:,.0f}",
                str(o["windows"]), "truncated at window limit" if o["truncated"] else "",
            )
        con.print(t)
        _print_warnings(con, m["warnings"])
        ts = m["timings_s"]
        con.print(
            "engine {e} on {d}; time {total:.2f} s (read {read:.2f}, windows {sample_windows:.2f}, encoder {encoder:.2f}, "
            "decoder {decoder:.2f}, map back {map_back:.2f}, write {write:.2f})".format(
                e=m["engine"]["engine"], d=m["engine"]["device"], **ts
            )
        )


def _segment_batch_cli(cases: list, out: Optional[Path], eng, options, as_json: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .segment import segment_batch

    con = _console(stderr=True)
    with Progress(
        TextColumn("[bold]segment"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"),
        console=con, transient=True,
    ) as progress:
        task = progress.add_task("", total=len(cases))

        def on_case(case, manifest, error):
            progress.update(task, advance=1, description=case.ct.name)

        results = segment_batch(cases, out, eng, options, on_case=on_case)
    failed = [r for r in results if not r["ok"]]
    if as_json:
        print_json(results)
    else:
        t = Table(title=f"bosam segment: {len(results) - len(failed)} of {len(results)} cases done")
        for col in ("case", "status", "objects", "voxels", "seconds"):
            t.add_column(col)
        for r in results:
            m = r["manifest"]
            if r["ok"]:
                t.add_row(esc(Path(r["ct"]).name), "[green]ok[/]", str(len(m["objects"])),
                          f"{sum(o['voxels'] for o in m['objects']):,}", f"{m['timings_s']['total']:.1f}")
            else:
                t.add_row(esc(Path(r["ct"]).name), "[red]failed[/] (below)", "", "", "")  # the error follows, on stderr
        _console().print(t)
        seen: set[str] = set()  # one engine's warning is every case's: said once
        for r in results:
            if r["ok"]:
                fresh = [w for w in r["manifest"]["warnings"] if w not in seen]
                seen.update(fresh)
                _print_warnings(_console(stderr=True), fresh)
    for r in failed:
        _console(stderr=True).print(f"[bold red]error:[/] {esc(r['error'])}", soft_wrap=True)
    if failed:
        raise typer.Exit(1)


@app.command("export")
@handle_errors
def export_command(
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Weights to export (any supported layout) \\[default: the bundled model, into engines/bosam-tiny, where segment's --engine auto looks]."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Engine folder \\[default: engines/<checkpoint stem or preset>, '-fp16' appended for fp16]."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Model preset \\[default: detected from the checkpoint]; without --checkpoint, exports a randomly initialised model (for tests and benchmarks)."),
    trt: bool = typer.Option(False, "--trt", help="Also build TensorRT plans (needs TensorRT and a CUDA GPU)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or fp16 (mixed: LayerNorm, Softmax, reductions and positional encoding stay fp32; inputs and outputs fp32)."),
    max_points: int = typer.Option(64, "--max-points", help="Most points per decoder call (the decoder takes 1..N)."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset, 18..20."),
    workspace_gib: Optional[float] = typer.Option(None, "--workspace-gib", help="TensorRT builder workspace limit in GiB."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the export and its verification."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Export ONNX encoder + decoder (and TensorRT plans), verified against PyTorch."""
    from export.onnx_export import export_onnx

    if checkpoint is None and preset is None:
        from .segment import resolve_checkpoint

        checkpoint = Path(resolve_checkpoint(None))  # the bundled model, as segment's default
    check_threads(threads)
    check_preset(preset)
    if threads:
        import torch

        torch.set_num_threads(threads)
    err = _console(stderr=True)
    manifest = export_onnx(
        str(checkpoint) if checkpoint is not None else None,
        out,
        precision=precision,
        max_points=max_points,
        opset=opset,
        preset=preset,
        trt=trt,
        trt_options={"workspace_gib": workspace_gib} if workspace_gib else None,
        threads=threads,
        log=lambda msg: err.print(f"[dim]{esc(msg)}[/]"),
    )
    if as_json:
        print_json(manifest)
        return
    _print_export_summary(manifest)


def _wide_console():
    """A console 120 columns wide when stdout is not a terminal (logs, pipes), so tables keep one line per row."""
    con = _console()
    if not con.is_terminal:
        from rich.console import Console

        con = Console(highlight=False, width=120)
    return con


def _print_export_summary(manifest: dict) -> None:
    from rich.table import Table

    con = _wide_console()
    ver = manifest["verification"]
    t = Table(title=f"verification: ONNX Runtime CPU vs torch fp32 ({manifest['precision']})")
    for col in ("part", "inputs", "output", "max abs", "max rel", "allowed abs", "Dice", "ok"):
        t.add_column(col, justify="left" if col in ("part", "inputs", "output") else "right")
    for c in ver["cases"]:
        t.add_row(
            c["component"], c["case"], c["output"], f"{c['max_abs']:.2e}", f"{c['max_rel']:.2e}", f"{c['allowed_abs']:.2e}",
            "" if c.get("dice") is None else f"{c['dice']:.4f}", "[green]yes[/]" if c["passed"] else "[red]NO[/]",
        )
    con.print(t)
    for name, rep in manifest["trt_readiness"].items():
        state = "[green]ready[/]" if rep["ok"] else "[red]not ready[/]"
        con.print(f"TensorRT readiness of {name}: {state} (opset {rep['opset']}, IR {rep['ir_version']}, "
                  f"{rep['nodes']} nodes, dynamic: {', '.join(rep['dynamic_dims']) or 'none'})")
        for e in rep["errors"]:
            con.print(f"  [red]error:[/] {esc(e)}")
        for w in rep["warnings"]:
            con.print(f"  [yellow]warning:[/] {esc(w)}")
    trt = manifest.get("tensorrt")
    if trt:
        con.print(f"TensorRT {trt['version']} plans for {trt['gpu']} (sm {trt['compute_capability']}), points 1..{trt['max_points']}")
    exporters = ", ".join(sorted(set(manifest["exporter"].values())))
    con.print(f"wrote {esc(str(manifest['path']))} ({exporters} exporter, opset {manifest['opset']}, IR {manifest['ir_version']}, "
              f"{manifest['precision']}, points 1..{manifest['max_points']})")


@app.command()
@handle_errors
def bench(
    engine: str = typer.Option("all", "--engine", help="torch, onnxruntime, tensorrt, or all (those available here)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Weights \\[default: a randomly initialised --preset model; timing does not depend on the weights]."),
    engine_dir: Optional[Path] = typer.Option(None, "--engine-dir", help="Folder written by 'bosam export' \\[default: engines/<checkpoint stem or preset>]."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Model preset without a checkpoint \\[default: the engine folder's, else sam-med3d]."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... \\[default: best available]."),
    precision: Optional[str] = typer.Option(None, "--precision", help="torch: fp32, bf16, fp16; engine folders: the precision they must hold."),
    repeats: int = typer.Option(3, "--repeats", help="Timed encoder runs (after one warm-up)."),
    decoder_repeats: int = typer.Option(20, "--decoder-repeats", help="Timed clicks per point count."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (torch and ONNX Runtime)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
) -> None:
    """Latency per engine: encoder per window, decoder per click (1 and 10 points); median and min."""
    import gc

    from engines.bench import bench_engine, machine_info
    from engines.manifest import load_manifest
    from engines.registry import open_engine

    from .errors import BosamError, EngineError

    kinds = ["torch", "onnxruntime", "tensorrt"] if engine == "all" else [engine]
    if engine not in ("all", "torch", "onnxruntime", "tensorrt"):
        raise BosamError(f"--engine must be torch, onnxruntime, tensorrt or all, not {engine!r}")
    if not (1 <= repeats <= 1000 and 1 <= decoder_repeats <= 10000):  # a huge value ran until killed
        raise BosamError("--repeats must be 1 .. 1000 and --decoder-repeats 1 .. 10000")
    check_threads(threads)
    check_preset(preset)
    if threads:
        import torch

        torch.set_num_threads(threads)
    if preset is None and checkpoint is None:
        preset = load_manifest(engine_dir).get("preset") if engine_dir is not None else "sam-med3d"
    results, skipped = [], []
    err = _console(stderr=True)
    for kind in kinds:
        try:
            eng = open_engine(
                kind,
                checkpoint=str(checkpoint) if checkpoint else None,
                engine_dir=str(engine_dir) if engine_dir and kind != "torch" else None,
                device=device,
                precision=precision,
                threads=threads,
                preset=preset,
            )
        except EngineError as exc:
            if engine != "all":
                raise
            skipped.append({"engine": kind, "reason": str(exc)})
            continue
        err.print(f"[dim]timing {kind} on {eng.info.device} ...[/]")
        results.append(bench_engine(eng, repeats=repeats, decoder_repeats=decoder_repeats))
        del eng
        gc.collect()
    report = {"machine": machine_info(threads), "preset": preset, "checkpoint": str(checkpoint) if checkpoint else None,
              "results": results, "skipped": skipped}
    if as_json:
        print_json(report)
        return
    from rich.table import Table

    con = _wide_console()
    base = next((r["encoder_s"]["median"] for r in results if r["engine"] == "torch"), None)
    m = report["machine"]
    what = Path(checkpoint).name if checkpoint else (preset or "model")
    t = Table(title=esc(f"bosam bench: {what} on {m['cpu'] or m['platform']} ({m['cpu_count']} CPUs, threads {threads or 'default'})"))
    for col in ("engine", "device", "precision", "encoder s (median / min)", "vs torch", "click 1 pt ms", "click 10 pts ms"):
        t.add_column(col, justify="left" if col in ("engine", "device", "precision") else "right")
    for r in results:
        e, d1, d10 = r["encoder_s"], r["decoder_ms"]["1"], r["decoder_ms"]["10"]
        ratio = f"{base / e['median']:.1f}x" if base else ""
        t.add_row(r["engine"], r["device"], r["precision"], f"{e['median']:.3f} / {e['min']:.3f}", ratio,
                  f"{d1['median']:.1f} / {d1['min']:.1f}", f"{d10['median']:.1f} / {d10['min']:.1f}")
    con.print(t)
    for s in skipped:
        con.print(f"[dim]skipped {s['engine']}: {esc(s['reason'])}[/]")


@app.command()
@handle_errors
def demo(
    out: Path = typer.Option(Path("bosam_demo"), "--out", "-o", help="Folder for the demo outputs."),
    ct: Optional[Path] = typer.Option(None, "--ct", help="Use this CT instead of a generated phantom (needs --points)."),
    points: Optional[Path] = typer.Option(None, "--points", "-p", help="Prompt file for --ct."),
    seed: int = typer.Option(0, "--seed", help="Phantom seed (anatomy, grid and noise)."),
    islands: str = typer.Option("clicked", "--islands", help=ISLANDS_HELP),
    refine: str = typer.Option("hu", "--refine", help=REFINE_HELP),
    refine_hu: float = typer.Option(REFINE_HU, "--refine-hu", help=REFINE_HU_HELP),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Model weights \\[default: the bundled model]."),
    engine: str = typer.Option("auto", "--engine", help=ENGINE_HELP),
    engine_dir: Optional[Path] = typer.Option(None, "--engine-dir", help="Folder written by 'bosam export'."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda ..."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the engine."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Segment the bones of a synthetic CT phantom from one click each and score them against its truth."""
    from .demo import run_demo
    from .segment import SegmentOptions

    if ct is not None and points is None:
        fail("--points: a prompt file is required with --ct")
    if ct is None and points is not None:
        fail("--points: goes with --ct (the phantom demo places its own clicks)")
    if seed < 0:
        fail(f"--seed: {seed} is negative (a phantom seed is 0 or more)")
    eng = open_engine_for(engine, checkpoint, engine_dir, device, "fp32", threads)
    options = SegmentOptions(overlay=True, islands=islands, refine=refine, refine_hu=refine_hu)
    manifest = run_demo(out, eng, ct=ct, points=points, seed=seed, options=options)
    if as_json:
        print_json(manifest)
        return
    from rich.table import Table

    con = _console()
    d = manifest["demo"]
    title = esc(f"bosam demo: {manifest['input']['ct']}")
    t = Table(title=title)
    for col in ("label", "bone", "voxels", "volume mm³", "Dice vs truth"):
        t.add_column(col, justify="left" if col == "bone" else "right")
    for o in manifest["objects"]:
        dice = o.get("dice_vs_truth")
        t.add_row(str(o["label"]), esc(o["name"]), f"{o['voxels']:,}", f"{o['volume_mm3']:,.0f}", "" if dice is None else f"{dice:.3f}")
    con.print(t)
    if d.get("mean_dice") is not None:
        con.print(f"mean Dice {d['mean_dice']:.3f} over {len(manifest['objects'])} bones (one click each)")
    ts = manifest["timings_s"]
    con.print(
        f"engine {manifest['engine']['engine']} on {manifest['engine']['device']}: segment {ts['total']:.1f} s "
        f"(encoder {ts['encoder']:.2f}, decoder {ts['decoder']:.2f}, windows {ts['sample_windows']:.2f}, "
        f"read {ts['read']:.2f}, write {ts['write']:.2f})" + ("" if ct is not None else f"; phantom made in {d['make_input_s']:.1f} s")
    )
    _print_warnings(con, manifest["warnings"])
    con.print(f"outputs in {esc(str(out))}/: segmentation.nii.gz, segmentation_overlay.png, segmentation.json")


# --------------------------------------------------------------------------------------------
# training, evaluation, datasets (train.py, evaluate.py, data.py)

SPLIT_CHOICES = {"tr": ("Tr",), "val": ("Val",), "ts": ("Ts",), "all": ("Tr", "Val", "Ts")}


def _splits(split: str) -> tuple:
    key = split.lower()
    if key not in SPLIT_CHOICES:
        fail(f"--split must be one of {', '.join(SPLIT_CHOICES)}, not {split!r}")
    return SPLIT_CHOICES[key]


def _clamp_option(text: Optional[str]) -> Optional[tuple]:
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        fail(f"--clamp-hu: expected two numbers like -1000,1000, got {text!r}")
    if not lo < hi:
        fail(f"--clamp-hu: the lower bound must be below the upper, got {text!r}")
    return (lo, hi)


@app.command()
@handle_errors
def prepare(
    data: list[Path] = typer.Option(..., "--data", "-d", help="nnU-Net-style dataset folder (imagesTr/, labelsTr/); repeat for several."),
    check: bool = typer.Option(False, "--check", help="Check every case: unpaired files, unreadable files, image/label shape or affine mismatch, empty or non-integer labels, NaN voxels, non-HU values (a warning)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Write decoded volumes here (uncompressed .npy + JSON) so training does not spend its time un-gzipping."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Labels to use: ids, ranges (25-50), names, 'bone' or a bone group (spine, rib ...) of --labelmap."),
    labelmap: Optional[Path] = typer.Option(None, "--labelmap", help="Label-map JSON with names, bone ids and bone groups (e.g. TotalSegmentator's)."),
    split: str = typer.Option("tr", "--split", help="Which folders: tr (imagesTr), val, ts, or all."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Cases read (and cached) at once, in threads."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check a bone dataset before training, and optionally cache it decoded."""
    from .data import scan_dataset

    if not check and cache is None:
        fail("nothing to do: give --check and/or --cache DIR")
    if jobs < 1:
        fail(f"--jobs must be >= 1, got {jobs}")
    con = _console(stderr=True)
    status = con.status("reading cases ...") if not as_json else None
    if status is not None:
        status.start()
    try:
        def on_case(case, info, problems):
            if status is not None:
                status.update(f"read {case.key}")

        scan = scan_dataset([str(d) for d in data], labels, str(labelmap) if labelmap else None, _splits(split),
                            str(cache) if cache else None, write_cache=cache is not None, on_case=on_case,
                            jobs=jobs)
    finally:
        if status is not None:
            status.stop()
    report = {"summary": scan.summary(), "problems": [p.as_dict() for p in scan.problems],
              "cache": str(cache) if cache else None, "cached_cases": sum(i.cached for i in scan.infos)}
    if as_json:
        print_json(report)
    else:
        from rich.table import Table

        out = _console()
        s = report["summary"]
        out.print(f"{s['cases']} usable cases, {s['errors']} errors, {s['warnings']} warnings in {esc(', '.join(s['roots']))}")
        if scan.problems:
            t = Table(title="problems")
            for col in ("severity", "case", "file", "problem"):
                t.add_column(col)
            for p in scan.problems:
                t.add_row("[red]error[/]" if p.severity == "error" else "[yellow]warning[/]", esc(p.case),
                          esc(str(p.path)) if p.path else "", esc(p.message))
            out.print(t)
        if s["labels"]:
            t = Table(title="labels")
            for col in ("id", "name", "cases", "voxels"):
                t.add_column(col, justify="right" if col != "name" else "left")
            for lab, e in s["labels"].items():
                t.add_row(lab, esc(e["name"]), str(e["cases"]), f"{e['voxels']:,}")
            out.print(t)
        if cache:
            out.print(f"cache: {report['cached_cases']} cases in {esc(str(cache))}")
    if not scan.infos:  # what train and evaluate would refuse (a cache of nothing too)
        from .data import refuse_errors
        from .errors import BosamError

        try:
            refuse_errors(scan, skip_bad=True, what="training")
        except BosamError as exc:
            fail(str(exc), 1)
    if check and scan.errors:
        raise typer.Exit(1)


@app.command()
@handle_errors
def train(
    data: list[Path] = typer.Option(..., "--data", "-d", help="Training dataset (nnU-Net style); repeat for several."),
    out: Path = typer.Option(Path("bosam-train"), "--out", "-o", help="Run folder: last.pth, best.pth, final.pth, log.csv."),
    val_data: Optional[list[Path]] = typer.Option(None, "--val-data", help="Dataset validated after every epoch (clicks protocol, Dice)."),
    init_from: Optional[Path] = typer.Option(None, "--from", help="Checkpoint to fine-tune: SAM-Med3D, turbo, BoSAM, BoSAM-LoRA or bosam."),
    preset: Optional[str] = typer.Option(None, "--preset", help="Architecture to train from scratch: sam-med3d or tiny."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Bones to train on: ids, ranges, names, 'bone' or a bone group of --labelmap."),
    labelmap: Optional[Path] = typer.Option(None, "--labelmap", help="Label-map JSON with names and bone ids (e.g. TotalSegmentator's)."),
    lora_rank: int = typer.Option(0, "--lora-rank", help="Train LoRA adapters of this rank on q and v of every encoder block (0: full fine-tuning)."),
    merge_lora: bool = typer.Option(False, "--merge-lora", help="final.pth: adapters merged into plain weights and dropped."),
    loss: str = typer.Option("dicece", "--loss", help="dicece (SAM-Med3D) or gdfocal (BoSAM: generalized Dice + focal)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Encoder learning rate; prompt encoder and decoder get 0.1x \\[default: 1e-4, LoRA 5e-4]."),
    prompt_lr_scale: float = typer.Option(0.1, "--prompt-lr-scale", help="Prompt encoder and mask decoder learning rate over --lr (0.1 as published for fine-tuning; 1 for training from scratch)."),
    weight_decay: float = typer.Option(0.1, "--weight-decay", help="AdamW weight decay."),
    epochs: int = typer.Option(10, "--epochs", help="Epochs (the cosine schedule restarts after 5, 15, 35 ...)."),
    steps_per_epoch: Optional[int] = typer.Option(None, "--steps-per-epoch", help="Optimiser steps per epoch \\[default: cases / global batch]."),
    batch_size: int = typer.Option(1, "--batch-size", help="128^3 windows per micro-batch and GPU."),
    accumulation: int = typer.Option(1, "--accumulation", help="Micro-batches per optimiser step."),
    clicks: int = typer.Option(10, "--clicks", help="Decoder calls (simulated clicks) per window."),
    click_sim: str = typer.Option("uniform", "--click-sim", help="Click simulator: uniform (published: uniform over the error region) or mixed (half of the clicks in the interior of the larger error region, as users click)."),
    neighbour_weight: float = typer.Option(0.0, "--neighbour-weight", help="Extra loss weight on the voxels of other labels in the window (neighbouring bones): penalises leaking into them; 0 = the published loss."),
    click_memory: str = typer.Option("newest", "--click-memory", help="What each decoder call sees besides the previous mask: newest (published: the click just made) or all (every click so far; segment, demo and evaluate's clicks protocol then feed clicks the same way)."),
    click_sim_on: str = typer.Option("auto", "--click-sim-on", help="Where clicks are simulated: host (NumPy, exact distance transform), device (batched on the training GPU, chessboard depth for interior clicks) or auto (device on CUDA, host on CPU)."),
    detach_mask: bool = typer.Option(False, "--detach-mask", help="Do not backpropagate through the previous mask prompt."),
    precision: str = typer.Option("auto", "--precision", help="auto (fp16 + GradScaler on CUDA, fp32 on CPU), fp32, fp16, bf16."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda \\[default: cuda when available; torchrun picks cuda:LOCAL_RANK]."),
    seed: int = typer.Option(2023, "--seed", help="Seed of every random choice (per rank: seed + rank)."),
    spacing: Optional[float] = typer.Option(None, "--spacing", help="Window spacing in mm \\[default: the checkpoint's, else 1.5]."),
    clamp_hu: Optional[str] = typer.Option(None, "--clamp-hu", help="HU clamp before z-scoring, e.g. -1000,1000 \\[default: the checkpoint's]."),
    no_clamp: bool = typer.Option(False, "--no-clamp", help="Do not clamp HU."),
    max_shift: int = typer.Option(32, "--max-shift", help="Window centre offset from the chosen bone voxel, up to this many voxels per axis."),
    min_fg_mm3: float = typer.Option(3375.0, "--min-fg-mm3", help="Redraw windows holding less bone than this (published: 1000 voxels at 1.5 mm)."),
    spacing_jitter: float = typer.Option(0.1, "--spacing-jitter", help="Window spacing varies by up to this fraction."),
    intensity_jitter: float = typer.Option(0.1, "--intensity-jitter", help="Intensity scale and shift (z units) vary by up to this much."),
    no_flip: bool = typer.Option(False, "--no-flip", help="No random flips of the window axes."),
    val_cases: int = typer.Option(4, "--val-cases", help="Validation cases per epoch."),
    val_clicks: int = typer.Option(3, "--val-clicks", help="Clicks per validation object."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from last.pth (same weights as an uninterrupted run)."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Also write last.pth every N optimiser steps."),
    stop_after_steps: Optional[int] = typer.Option(None, "--stop-after-steps", help="Stop (checkpointed) after N optimiser steps in total; --resume continues."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder written by 'bosam prepare --cache'."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave cases with integrity errors out instead of refusing the dataset."),
    workers: int = typer.Option(1, "--workers", help="Background threads preparing the next windows."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    safetensors: bool = typer.Option(False, "--safetensors", help="Also write final.safetensors."),
    no_tensorboard: bool = typer.Option(False, "--no-tensorboard", help="No TensorBoard scalars even if tensorboard is installed."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Fine-tune a model on bone CT with simulated clicks (run under torchrun for several GPUs)."""
    from .train import TrainConfig, train as run_training

    cfg = TrainConfig(
        data=[str(d) for d in data], out_dir=str(out), val_data=[str(d) for d in (val_data or [])],
        init_from=str(init_from) if init_from else None, preset=preset, labels=labels,
        labelmap=str(labelmap) if labelmap else None, lora_rank=lora_rank, merge_lora=merge_lora, loss=loss, lr=lr,
        prompt_lr_scale=prompt_lr_scale, weight_decay=weight_decay, epochs=epochs, steps_per_epoch=steps_per_epoch, batch_size=batch_size,
        accumulation=accumulation, clicks=clicks, click_sim=click_sim,
        neighbour_weight=neighbour_weight, click_memory=click_memory, click_sim_on=click_sim_on, detach_mask=detach_mask, precision=precision, device=device,
        seed=seed, spacing_mm=spacing, clamp_hu=_clamp_option(clamp_hu), no_clamp=no_clamp, max_shift_vox=max_shift,
        min_fg_mm3=min_fg_mm3, spacing_jitter=spacing_jitter, intensity_jitter=intensity_jitter, flip=not no_flip,
        val_cases=val_cases, val_clicks=val_clicks, resume=resume, checkpoint_every=checkpoint_every,
        stop_after_steps=stop_after_steps, cache=str(cache) if cache else None, skip_bad=skip_bad, workers=workers,
        threads=threads, safetensors=safetensors, tensorboard=not no_tensorboard,
    )
    result = run_training(cfg, console=_console(stderr=True))
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    summary = {
        "out_dir": str(result.out_dir), "last": str(result.last) if result.last else None,
        "best": str(result.best) if result.best else None, "final": str(result.final) if result.final else None,
        "epochs_done": result.epochs_done, "global_step": result.global_step, "best_val_dice": result.best_dice,
        "stopped_early": result.stopped_early, "history": result.history,
    }
    if as_json:
        print_json(summary)
        return
    con = _console()
    done = "stopped (resume with --resume)" if result.stopped_early else "done"
    con.print(f"training {done}: {result.epochs_done} epochs, {result.global_step} steps; checkpoints in {esc(str(result.out_dir))}")
    for key in ("final", "best", "last"):
        if summary[key]:
            con.print(f"  {key}: {esc(str(summary[key]))}")


@app.command()
@handle_errors
def evaluate(
    data: list[Path] = typer.Option(..., "--data", "-d", help="Dataset with CTs and bone labels (nnU-Net style); repeat for several."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Model weights \\[default: the bundled model]."),
    engine: str = typer.Option("auto", "--engine", help="torch, onnxruntime, tensorrt, or auto (the fastest that works here)."),
    engine_dir: Optional[Path] = typer.Option(None, "--engine-dir", help="Folder written by 'bosam export'."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... \\[default: best available]."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for the engine."),
    clicks: str = typer.Option("1,5,10", "--clicks", help="Click counts to report, e.g. 1,5,10."),
    protocol: str = typer.Option("clicks", "--protocol", help="clicks (per bone on the full CT, Dice + NSD) or bosam (BoSAM's published crop protocol, best of N)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Bones to evaluate: ids, ranges, names, 'bone' or a bone group of --labelmap \\[default: every label]."),
    labelmap: Optional[Path] = typer.Option(None, "--labelmap", help="Label-map JSON with names and bone ids."),
    cases: Optional[int] = typer.Option(None, "--cases", help="Evaluate only this many cases."),
    split: str = typer.Option("all", "--split", help="Which folders: tr, val, ts or all (imagesTr/Val/Ts)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for evaluation.csv, .json and .md."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Evaluate a classical baseline instead of a model: threshold."),
    threshold_hu: float = typer.Option(200.0, "--threshold-hu", help="Baseline: bone threshold in HU."),
    radius_mm: float = typer.Option(50.0, "--radius-mm", help="Baseline: growth limit around each positive click (mm)."),
    seed: int = typer.Option(2023, "--seed", help="Seed of the bosam protocol (published: 2023)."),
    bosam_grid: str = typer.Option("native", "--bosam-grid", help="bosam protocol crops: native (stored voxels, as published) or model (1.5 mm RAS windows)."),
    nsd_mm: float = typer.Option(2.0, "--nsd-mm", help="Surface Dice tolerance in mm."),
    spacing: Optional[float] = typer.Option(None, "--spacing", help="Model window spacing in mm \\[default: the checkpoint's]."),
    no_clamp: bool = typer.Option(False, "--no-clamp", help="Do not clamp HU before normalising."),
    max_windows: int = typer.Option(8, "--max-windows", help="Most windows one bone may grow into."),
    islands: str = typer.Option("clicked", "--islands", help="clicks protocol: " + ISLANDS_HELP),
    refine: str = typer.Option("hu", "--refine", help="clicks protocol: " + REFINE_HELP),
    refine_hu: float = typer.Option(REFINE_HU, "--refine-hu", help=REFINE_HU_HELP),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache folder written by 'bosam prepare --cache'."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Leave cases with integrity errors out instead of refusing."),
    as_json: bool = typer.Option(False, "--json", help="Print settings and summary as JSON."),
) -> None:
    """Dice and surface Dice after 1, 5, 10 simulated clicks per bone (or BoSAM's published protocol)."""
    from .evaluate import EvaluateOptions, markdown_table, parse_clicks
    from .evaluate import evaluate as run_evaluation

    opts = EvaluateOptions(
        clicks=parse_clicks(clicks), protocol=protocol, labels=labels, labelmap=str(labelmap) if labelmap else None,
        cases=cases, splits=_splits(split), nsd_tolerance_mm=nsd_mm, seed=seed, bosam_grid=bosam_grid,
        spacing_mm=spacing, clamp_hu=() if no_clamp else None, max_windows=max_windows, islands=islands,
        refine=refine, refine_hu=refine_hu, skip_bad=skip_bad,
        cache=str(cache) if cache else None,
    )
    for d in data:
        if not d.exists():
            fail(f"{d}: no such dataset folder")
    if not (nsd_mm > 0 and math.isfinite(nsd_mm)):
        fail(f"--nsd-mm: the surface Dice tolerance must be a finite number of mm above 0, got {nsd_mm}")
    if baseline is not None and not math.isfinite(threshold_hu):
        fail(f"--threshold-hu: must be a finite HU value, got {threshold_hu}")
    if baseline is not None and not (radius_mm > 0 and math.isfinite(radius_mm)):
        fail(f"--radius-mm: the growth limit must be a finite number of mm above 0, got {radius_mm}")
    if no_clamp and protocol == "bosam" and bosam_grid == "native":
        fail("--no-clamp: the bosam protocol's native grid clamps by the published rule (image paths "
             "containing '/ct_'); use --bosam-grid model to choose the clamp")
    if cases is not None and cases < 1:
        fail(f"--cases: must be 1 or more, got {cases}")
    if not 0 <= seed < 2**32:  # NumPy's generator takes no negative seed (a traceback)
        fail(f"--seed must be in 0 .. 2**32-1, got {seed}")
    if out is not None and out.exists() and not out.is_dir():
        fail(f"{out}: is a file; --out is the folder for evaluation.csv, .json and .md")
    base = None
    eng = None
    if baseline is not None:
        if baseline != "threshold":
            fail(f"--baseline must be 'threshold', not {baseline!r}")
        from .baseline import ThresholdSegmenter

        base = ThresholdSegmenter(threshold_hu=threshold_hu, radius_mm=radius_mm)
    else:
        eng = open_engine_for(engine, checkpoint, engine_dir, device, precision, threads)
    con = _console(stderr=True)
    status = con.status("evaluating ...") if not as_json else None
    if status is not None:
        status.start()
    try:
        def on_record(r):
            if status is not None:
                status.update(f"{r.case} label {r.label}: click {r.click}, Dice {r.dice:.3f}")

        result = run_evaluation([str(d) for d in data], opts, engine=eng, baseline=base,
                                out_dir=str(out) if out else None, on_record=on_record)
    finally:
        if status is not None:
            status.stop()
    if as_json:
        print_json({"settings": result["settings"], "summary": result["summary"],
                    "paths": {k: str(v) for k, v in result["paths"].items()}})
        return
    _print_warnings(con, result["settings"]["warnings"])
    from rich.markdown import Markdown

    c = _console()
    summary = result["summary"]
    # the wide table (a column per metric and click count) needs ~24 columns per click count
    if summary["protocol"] == "clicks" and c.width < 30 + 24 * len(summary["clicks"]):
        _print_clicks_summary_long(c, summary, result["title"])
    else:
        c.print(Markdown(markdown_table(summary, result["title"])))
    c.print(f"[dim]{result['settings']['protocol_definition']}[/]")
    for k, v in result["paths"].items():
        c.print(f"  {esc(str(k))}: {esc(str(v))}")


def _print_clicks_summary_long(con: Any, summary: dict, title: str) -> None:
    """The clicks protocol's summary for a narrow terminal: a row per label and click count."""
    from rich.table import Table

    from .evaluate import OTHER_NOTE, _f, _pct, seconds_line

    t = Table(title=esc(title))
    for col in ("label", "objects", "clicks", "Dice", "NSD", "Other"):
        t.add_column(col, justify="left" if col == "label" else "right", overflow="fold")
    rows = list(summary["per_label"].items()) + [("mean", summary["overall"])]
    for i, (name, per_click) in enumerate(rows):
        bold = i == len(rows) - 1  # the mean
        for j, n in enumerate(summary["clicks"]):
            d = per_click.get(str(n))
            if d is None:
                continue
            cells = [esc(name) if j == 0 else "", str(d["objects"]), str(n), _f(d["dice"]), _f(d["nsd"]), _pct(d["other"])]
            t.add_row(*(f"[bold]{c}[/]" if bold and c else c for c in cells), end_section=j == len(summary["clicks"]) - 1)
    con.print(t)
    con.print(f"Other: {OTHER_NOTE}")
    con.print(seconds_line(summary))


for _typer_app in (app, points_app):  # every command shows a bare '--help' (see _BareHelp)
    for _info in _typer_app.registered_commands:
        _info.cls = _Command


def main() -> None:
    # NumPy's OpenBLAS starts a thread per core for the window sampling's small matrix products
    # and competes with torch's threads (--threads does not reach it): twice the encoder time on
    # 2 cores. One thread is as fast for those products. Set before NumPy is first imported.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
