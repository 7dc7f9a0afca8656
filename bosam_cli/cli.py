"""The ``bosam`` command line: thin Typer commands over the core functions.

Heavy imports (torch, onnxruntime, nibabel) happen inside the commands, so ``bosam --help``
stays instant.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from . import __version__

app = typer.Typer(
    name="bosam",
    help="Promptable 3-D bone segmentation in CT from a few clicks (SAM-Med3D / BoSAM compatible).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def fail(message: str, code: int = 2) -> None:
    """Print one error line to stderr and exit non-zero."""
    _console(stderr=True).print(f"[bold red]error:[/] {message}", soft_wrap=True)
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
        con.print(f"[yellow]warning:[/] {w}")
    ck = report.get("checkpoint")
    if ck:
        t = Table(title=f"checkpoint {ck['path']}", show_header=False)
        for k in ("layout", "preset", "parameters", "tensors", "sha256"):
            t.add_row(k, f"{ck[k]:,}" if isinstance(ck[k], int) else str(ck[k]))
        if ck["conversions"]:
            t.add_row("conversions", "; ".join(ck["conversions"]))
        if ck["other_entries"]:
            t.add_row("other entries", ", ".join(ck["other_entries"]))
        for k, v in ck["metadata"].items():
            t.add_row(f"metadata.{k}", json.dumps(v) if not isinstance(v, str) else v)
        con.print(t)


points_app = typer.Typer(help="Prompt files: check where clicks land before inference.", no_args_is_help=True)
app.add_typer(points_app, name="points")


@points_app.command("check")
@handle_errors
def points_check(
    ct: Path = typer.Argument(..., help="CT: .nii/.nii.gz, .nrrd or a DICOM series folder."),
    prompts: Path = typer.Argument(..., help="Prompt file: bosam JSON, Slicer .mrk.json or MONAI Label JSON."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for machines."),
) -> None:
    """Where every click lands: object, click, +/-, RAS mm, voxel i,j,k, HU there, inside or not."""
    from .prompts import check_points

    records = check_points(ct, prompts)
    if as_json:
        print_json(records)
        return
    from rich.table import Table

    t = Table(title=f"clicks of {prompts} in {ct}")
    for col in ("object", "label", "click", "+/-", "RAS mm", "voxel i,j,k", "HU", "inside"):
        t.add_column(col, justify="right" if col in ("label", "click", "HU") else "left")
    for r in records:
        t.add_row(
            r["object"],
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
    outside = sum(not r["inside"] for r in records)
    if outside:
        con.print(f"[yellow]warning:[/] {outside} of {len(records)} clicks fall outside the volume; segmentation would refuse this file")


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
