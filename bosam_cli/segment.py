"""``bosam segment``: CT + prompt file -> label map on the input grid, manifest, extras.

One Python function per CLI form, with the same options, so scripts get what the terminal
gets: ``segment_file`` (one CT), ``segment_batch`` (folders or a manifest), and
``interactive`` (commands read line by line).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, TextIO

import numpy as np

from .errors import BosamError, PromptError
from .session import ISLANDS, REFINE_HU, REFINES, Session
from .volume import (
    LABEL_MAP_SUFFIXES,
    VOLUME_SUFFIXES,
    Volume,
    geometry_warning,
    hu_warning,
    label_dtype,
    label_map_ending,
    make_output_folder,
    nifti_output_warning,
    read_volume,
    require_finite,
    write_label_map,
)
from .windows import DEFAULT_CLAMP_HU, DEFAULT_SPACING_MM, Intensity

OVERLAP_RULE = "highest blended logit wins; exact ties go to the object listed first"
BUNDLED_WEIGHTS = Path(__file__).parent / "weights" / "bosam-tiny.safetensors"
#: the default label map is <case>_bosam.nii.gz; a batch over a folder passes such files over
OUTPUT_SUFFIX = "_bosam"


#: the coarsest model window spacing taken (128 voxels: 6.4 m)
MAX_SPACING_MM = 50.0


@dataclass
class SegmentOptions:
    """Options of ``bosam segment`` (the CLI flags, one to one).

    Attributes:
        spacing_mm: model window spacing; None takes the checkpoint's, else 1.5 mm.
        clamp_hu: HU clamp before z-scoring; None takes the checkpoint's, else [-1000, 1000].
            An empty tuple disables clamping.
        max_windows: windows per object at most.
        per_object: also write one mask file per object.
        overlay: also write an overlay PNG.
        mesh: also write one STL mesh per object (patient mm, LPS as 3D Slicer reads meshes).
        islands: "clicked" keeps the connected pieces of each mask that hold a positive click;
            "all" keeps every piece (``session`` module docstring).
        refine: "hu" peels the soft-tissue rim (below ``refine_hu``) off each mask's surface;
            "none" keeps the model's mask (``session`` module docstring).
        refine_hu: HU threshold of ``refine="hu"``.
    """

    spacing_mm: float | None = None
    clamp_hu: tuple[float, ...] | None = None
    max_windows: int = 8
    per_object: bool = False
    overlay: bool = False
    mesh: bool = False
    islands: str = "clicked"
    refine: str = "hu"
    refine_hu: float = REFINE_HU


def bundled_checkpoint() -> Path | None:
    return BUNDLED_WEIGHTS if BUNDLED_WEIGHTS.exists() else None


def resolve_checkpoint(checkpoint: str | os.PathLike | None) -> str:
    """The checkpoint to use: the one given, else the bundled model."""
    if checkpoint is not None:
        return str(checkpoint)
    bundled = bundled_checkpoint()
    if bundled is None:
        raise BosamError("no --checkpoint given and no bundled model is installed")
    return str(bundled)


def ct_warnings(volume: Volume, label_map: Path) -> list[str]:
    """What the CT or its label map's format may get wrong without an error: non-HU values,
    geometry viewers disagree about, a sheared grid written to NIfTI."""
    return [w for w in (hu_warning(volume), geometry_warning(volume), nifti_output_warning(volume, label_map)) if w]


def window_spacing(spacing_mm: float | None, metadata: dict[str, Any]) -> float:
    """The model window spacing: ``--spacing`` when given, else the checkpoint's, else 1.5 mm;
    a finite spacing in (0, MAX_SPACING_MM] or one BosamError line."""
    spacing = float(spacing_mm if spacing_mm is not None else (metadata.get("spacing_mm") or DEFAULT_SPACING_MM))
    if not (np.isfinite(spacing) and 0 < spacing <= MAX_SPACING_MM):
        raise BosamError(f"--spacing must be a window spacing in (0, {MAX_SPACING_MM:g}] mm, got {spacing}")
    return spacing


def make_session(engine: Any, options: SegmentOptions, metadata: dict[str, Any] | None = None) -> Session:
    """A session configured from options, falling back to the checkpoint's metadata."""
    meta = metadata or {}
    spacing = window_spacing(options.spacing_mm, meta)
    if options.clamp_hu is not None:
        clamp = tuple(options.clamp_hu) or None
    else:
        m = (meta.get("intensity") or {}).get("clamp_hu", list(DEFAULT_CLAMP_HU))
        clamp = tuple(m) if m else None
    if int(options.max_windows) < 1:
        raise BosamError(f"--max-windows must be 1 or more, got {options.max_windows}")
    if options.islands not in ISLANDS:
        raise BosamError(f"--islands must be one of {', '.join(ISLANDS)}, not {options.islands!r}")
    if options.refine not in REFINES:
        raise BosamError(f"--refine must be one of {', '.join(REFINES)}, not {options.refine!r}")
    if not np.isfinite(options.refine_hu):
        raise BosamError(f"--refine-hu must be a finite number of HU, got {options.refine_hu}")
    return Session(
        engine,
        spacing_mm=float(spacing),
        intensity=Intensity(clamp_hu=clamp),  # type: ignore[arg-type]
        max_windows=options.max_windows,
        click_memory=str(meta.get("click_memory") or "newest"),
        islands=options.islands,
        refine=options.refine,
        refine_hu=float(options.refine_hu),
    )


def engine_metadata(engine: Any) -> dict[str, Any]:
    """Checkpoint metadata (spacing, intensity) an engine carries, if any."""
    model = getattr(engine, "model", None)
    meta = getattr(model, "checkpoint_metadata", None) or getattr(engine, "metadata", None) or {}
    return dict(meta)


# ---------------------------------------------------------------------------------------------
# one CT


#: endings that name a file, never an output folder
_NOT_A_FOLDER = (".json", ".txt", ".csv", ".png", ".jpg", ".stl", ".npy", ".gz", ".zip", ".nii.bz2", ".img", ".hdr", ".dicom")


def output_paths(ct_path: Path, out: str | os.PathLike | None) -> dict[str, Path]:
    """Where the outputs of one CT go. ``out`` may be a label map path (.nii.gz, .nii, .nrrd,
    .mha, or .dcm for a DICOM SEG: per-object masks take the same format) or a folder (NIfTI
    there)."""
    stem = case_name(ct_path)
    if out is None:
        label_map = Path.cwd() / f"{stem}{OUTPUT_SUFFIX}.nii.gz"
    else:
        out = Path(out)
        name = out.name.lower()
        if name.endswith((*LABEL_MAP_SUFFIXES, ".mhd", ".nhdr")):
            label_map = out
        elif not out.is_dir() and (out.exists() or name.endswith(_NOT_A_FOLDER)):
            # it was read as a folder to make: '-o seg.txt' made a folder 'seg.txt', '-o ct.json' failed oddly
            raise BosamError(f"{out}: is {'a file' if out.exists() else 'a file name'}, not a label map or a folder; "
                             f"-o takes a label map path ({', '.join(LABEL_MAP_SUFFIXES)}) or a folder")
        else:
            label_map = out / f"{stem}.nii.gz"
    base = label_map.name[: -len(label_map_ending(label_map))]  # refuses .mhd/.nhdr before any work
    parent = label_map.parent
    return {
        "label_map": label_map,
        "manifest": parent / f"{base}.json",
        "objects_dir": parent / f"{base}_objects",
        "overlay": parent / f"{base}_overlay.png",
        "meshes_dir": parent / f"{base}_meshes",
        "points": parent / f"{base}_points.json",
    }


def case_name(path: Path) -> str:
    """A CT's or prompt file's name without its file ending (a folder's own name for ``.``)."""
    name = path.name if path.name not in ("", "..") else Path.cwd().joinpath(path).resolve().name
    for suffix in (*VOLUME_SUFFIXES, ".dcm", ".mrk.json", ".json"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "object"


def segment_volume(session: Session, volume: Volume, prompts: Any) -> dict[str, Any]:
    """Run every object's clicks in file order; returns labels and per-object facts."""
    session.set_volume(volume)
    measure, session.measure_clicks = session.measure_clicks, False
    reports: dict[int, list[dict[str, Any]]] = {}
    for obj in prompts.objects:
        session.add_object(obj.label, obj.name)
        reports[obj.label] = []
        for click in obj.clicks:
            rep = session.add_click(obj.label, xyz=np.asarray(click.ras, dtype=float), positive=click.positive)
            reports[obj.label].append(rep.as_dict())
    labels = session.label_map()
    session.measure_clicks = measure
    return {"labels": labels, "reports": reports}


def segment_file(
    ct: str | os.PathLike,
    points: str | os.PathLike,
    out: str | os.PathLike | None,
    engine: Any,
    options: SegmentOptions = SegmentOptions(),
    session: Session | None = None,
) -> dict[str, Any]:
    """Segment one CT from one prompt file; writes the label map and its manifest (plus the
    extras asked for) and returns the manifest. Nothing is written when an input is bad."""
    from engines.manifest import engine_warnings

    from .prompts import load_prompts
    from .atomic import all_or_nothing, remove_when_committed, staged, write_json
    from .report import object_stats

    t0 = time.perf_counter()
    ct_path = Path(ct)
    # staged: inputs written earlier in the caller's all-or-nothing block (the demo's phantom)
    volume = require_finite(read_volume(staged(ct_path)))
    if staged(ct_path) != ct_path:  # messages and warnings name the CT, never its staged temporary file
        volume.path = ct_path
    t_read = time.perf_counter()
    prompts = load_prompts(staged(points), volume)
    t_prompts = time.perf_counter()
    paths = output_paths(ct_path, out)
    writes = ["label_map", "manifest"] + (["overlay"] if options.overlay else []) + \
        (["objects_dir"] if options.per_object else []) + (["meshes_dir"] if options.mesh else [])
    guard_outputs({k: paths[k] for k in writes}, [ct_path, Path(points), *_series_files(volume)])
    guard_series_folder(paths["label_map"], volume)
    check_output_format(paths["label_map"], volume)
    session = session or make_session(engine, options, engine_metadata(engine))
    before = dict(session.timings)
    counts_before = dict(session.counts)
    result = segment_volume(session, volume, prompts)
    labels = result["labels"]
    t_seg = time.perf_counter()

    names = {obj.label: obj.name for obj in prompts.objects}
    written: list[Path] = []
    # every file of the run or none: a failure part-way keeps the previous run's files as they were
    with all_or_nothing():
        written.append(write_label_map(labels, volume, paths["label_map"], names))
        objects = []
        for i, obj in enumerate(prompts.objects):
            state = session.objects[obj.label]
            got = session.object_logits(obj.label)
            box = got[0] if got is not None else tuple(slice(0, 0) for _ in range(3))  # the object is nowhere else
            entry: dict[str, Any] = {
                "label": obj.label,
                "name": obj.name,
                "clicks": [
                    {"positive": c.positive, "ras": _r(c.ras), "voxel": _r(c.ijk)} for c in obj.clicks
                ],
                **object_stats(int(np.count_nonzero(labels[box] == obj.label)), volume),
                "voxels_before_overlap_rule": session.voxel_count(obj.label),
                "windows": len(state.windows),
                "window_centres_ras": [_r(w.geom.centre_ras_mm) for w in state.windows],
                "truncated": state.truncated,
                "encoder_calls": sum(r["encoder_calls"] for r in result["reports"][obj.label]),
                "decoder_calls": sum(r["decoder_calls"] for r in result["reports"][obj.label]),
            }
            if options.per_object:
                p = paths["objects_dir"] / f"{obj.label}_{_safe_name(obj.name)}{label_map_ending(paths['label_map'])}"
                mask = np.zeros(labels.shape, np.uint8, order="F")
                mask[box] = labels[box] == obj.label
                written.append(write_label_map(mask, volume, p, {1: obj.name}))
                entry["mask_file"] = str(p)
            if options.mesh:
                from .report import mask_to_mesh, write_stl

                shift = np.eye(4)
                shift[:3, 3] = [sl.start for sl in box]
                verts, faces = mask_to_mesh(labels[box] == obj.label, volume.affine @ shift)
                p = paths["meshes_dir"] / f"{obj.label}_{_safe_name(obj.name)}.stl"
                written.append(write_stl(verts, faces, p, name=obj.name))
                entry["mesh_file"] = str(p)
                entry["mesh_faces"] = int(len(faces))
            objects.append(entry)
        if options.overlay:
            from .report import write_overlay

            written.append(write_overlay(volume, labels, objects, paths["overlay"]))
        t_write = time.perf_counter()
        stale = _stale_extras(paths, written)

        timings = {k: round(session.timings[k] - before.get(k, 0.0), 4) for k in session.timings}
        warnings = ct_warnings(volume, paths["label_map"]) + engine_warnings(engine)
        for o in objects:
            if not o["voxels"]:
                why = ("every voxel went to other objects by the overlap rule" if o["voxels_before_overlap_rule"]
                       else "the model found nothing at its clicks")
                warnings.append(f"object {o['label']} ({o['name']}): empty mask: {why}")
            dropped = max((r.get("dropped_clicks", 0) for r in result["reports"][o["label"]]), default=0)
            if dropped:
                warnings.append(
                    f"object {o['label']} ({o['name']}): {len(o['clicks'])} clicks, but the engine takes at most "
                    f"{session.max_points} points per decoder call: up to {dropped} older click(s) were left out, so the "
                    "mask differs from the torch engine's (bosam export --max-points N raises the limit)")
        manifest = {
            "tool": "bosam segment",
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": _versions(),
            "input": {
                "ct": str(ct_path),
                "points": str(points),
                "shape": list(volume.shape),
                "affine": np.round(volume.affine, 6).tolist(),
                "spacing_mm": _r(volume.spacing_mm),
                "axcodes": volume.axcodes,
                "coordinate_system": getattr(prompts, "coordinate_system", None),
            },
            "output": {
                "label_map": str(paths["label_map"]),
                "dtype": str(label_dtype(int(labels.max(initial=0)))),  # as written: by the largest label present
                **_seg_segments(paths["label_map"], labels, names),
                "files": [str(p) for p in written] + [str(paths["manifest"])],
                # masks and meshes of the previous run here that this run replaces by nothing
                "removed_from_previous_run": [str(p) for p in stale],
            },
            "checkpoint": {
                "path": getattr(getattr(engine, "model", None), "checkpoint_path", None)
                or engine.info.details.get("checkpoint_path"),
                "sha256": engine.info.checkpoint_sha256,
                "preset": engine.info.preset,
            },
            "engine": engine.info.as_dict(),
            "model_window": {
                "size": session.size,
                "spacing_mm": session.spacing_mm,
                "axes": "RAS",
                "clamp_hu": list(session.intensity.clamp_hu) if session.intensity.clamp_hu else None,
                "max_windows_per_object": session.max_windows,
                "click_memory": session.click_memory,
                "islands": session.islands,
                "refine": session.refine,
                "refine_hu": session.refine_hu if session.refine == "hu" else None,
            },
            "overlap_rule": OVERLAP_RULE,
            "objects": objects,
            "warnings": warnings,
            "calls": {k: session.counts[k] - counts_before.get(k, 0) for k in session.counts},
            "timings_s": {
                "read": round(t_read - t0, 4),
                "prompts": round(t_prompts - t_read, 4),
                "sample_windows": timings["sample_s"],
                "encoder": timings["encoder_s"],
                "decoder": timings["decoder_s"],
                "map_back": timings["map_back_s"],
                "segment_other": round((t_seg - t_prompts) - sum(timings.values()), 4),
                "write": round(t_write - t_seg, 4),
                "total": round(time.perf_counter() - t0, 4),
            },
        }
        write_json(manifest, paths["manifest"])
        remove_when_committed(stale)
    return manifest


def _stale_extras(paths: dict[str, Path], written: list[Path]) -> list[Path]:
    """The per-object masks and meshes that the previous run into this output listed in its
    manifest and that this run does not write again (objects since removed, no --per-object or
    --mesh this time): only files inside this output's own ``_objects/`` and ``_meshes/``
    folders, not through a linked folder. Anything else there is the user's and stays."""
    try:
        old = json.loads(paths["manifest"].read_text())
        listed = [(o.get(k), folder) for o in old.get("objects", [])
                  for k, folder in (("mask_file", "objects_dir"), ("mesh_file", "meshes_dir"))]
    except (OSError, ValueError, AttributeError, TypeError):
        return []
    keep = {os.path.realpath(p) for p in written}
    stale = []
    for name, folder in listed:
        if not isinstance(name, str) or paths[folder].is_symlink():
            continue
        f = paths[folder] / Path(name).name  # by name in this output's folder, wherever that run was started
        if f.is_file() and not f.is_symlink() and os.path.realpath(f) not in keep:
            stale.append(f)
    return stale


def guard_outputs(paths: dict[str, Path], inputs: Iterable[Path | None]) -> None:
    """Refuse, before any work, outputs that would overwrite an input (``-o`` pointing at the
    CT's own file or folder, a manifest named like the prompt file beside it, a file of the
    CT's DICOM series). ``paths`` holds only what the command will write."""
    given = [Path(p) for p in inputs if p is not None]
    for key in ("label_map", "manifest", "overlay", "points"):
        if key in paths and paths[key].is_dir():
            raise BosamError(f"{paths[key]}: is a folder, where bosam would write its {key.replace('_', ' ')} file")
    for key in ("objects_dir", "meshes_dir"):  # found only when writing, it had cost the old result
        if key in paths and paths[key].exists() and not paths[key].is_dir():
            raise BosamError(f"{paths[key]}: is a file, where bosam would make its {key[:-4]} folder")
    for out in paths.values():
        for inp in given:
            if _same_file(out, inp):
                raise BosamError(f"{out}: would overwrite the input {inp}; choose another output (-o)")


def _series_files(volume: Volume) -> list[Path]:
    """The files a DICOM CT was read from (its other slices count as inputs too)."""
    return [Path(f) for f in volume.meta.get("files", [])] if str(volume.meta.get("format", "")).startswith("dicom") else []


def guard_series_folder(label_map: Path, volume: Volume) -> None:
    """A NIfTI/NRRD/MetaImage label map written into the CT's DICOM series folder turns that
    folder into a batch of CTs for every later command: refused (a DICOM SEG there is skipped
    when the series is read again, and allowed)."""
    series = _series_files(volume)
    if not series or label_map_ending(label_map) == ".dcm":
        return
    # the folder given (a series is found in its sub-folders too), and every folder down to the slices
    given = Path(volume.path) if volume.path is not None else series[0].parent
    top = (given if given.is_dir() else given.parent).resolve()
    folders = {top}
    for f in {Path(f).parent.resolve() for f in series}:
        while f != top and top in f.parents:
            folders.add(f)
            f = f.parent
    if label_map.parent.resolve() in folders:
        raise BosamError(f"{label_map}: would go into the CT's DICOM series folder {top}, which then "
                         "reads as a folder of CTs; choose an -o outside it")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_output_format(label_map: Path, volume: Volume) -> None:
    """Refuse, before any work, a label map format this CT cannot have: a DICOM SEG needs a CT
    read from a DICOM series with the UIDs a SEG references."""
    if label_map_ending(label_map) == ".dcm":
        from .dicom_seg import check_source

        check_source(volume, label_map)


def _seg_segments(label_map: Path, labels: np.ndarray, names: dict[int, str]) -> dict[str, Any]:
    """For a DICOM SEG output, which segment number holds which label (the manifest's record)."""
    if label_map_ending(label_map) != ".dcm":
        return {}
    from .dicom_seg import segment_map

    return {"dicom_seg_segments": [{"segment_number": n, "label": lab, "name": name}
                                   for n, lab, name in segment_map(labels, names)]}


def _r(v: Any, nd: int = 3) -> list[float]:
    return [round(float(x), nd) for x in np.asarray(v, dtype=float).reshape(-1)]


def _versions() -> dict[str, Any]:
    from .runtime_info import versions

    return versions()


# ---------------------------------------------------------------------------------------------
# batch


@dataclass
class Case:
    ct: Path
    points: Path
    out: Path | None = None


def _is_image_file(p: Path) -> bool:
    n = p.name.lower()
    return n.endswith(VOLUME_SUFFIXES)


def find_cases(ct: str | os.PathLike, points: str | os.PathLike | None) -> list[Case]:
    """Cases of a batch: a folder of CTs with a folder of prompt files matched by case name
    (``case.nii.gz`` <-> ``case.json`` / ``case.mrk.json``), or a CSV / JSON manifest with
    columns ``ct``, ``points`` and optional ``out`` (relative paths are relative to it)."""
    ct = Path(ct)
    if ct.is_file() and ct.suffix.lower() in (".csv", ".json"):
        return _cases_from_manifest(ct)
    if not ct.is_dir():
        raise BosamError(f"{ct}: not a folder of CTs or a .csv/.json manifest")
    if points is None:
        raise BosamError(f"{ct}: a batch (a folder of CTs) needs --points, a folder of prompt files named like the CTs")
    if not Path(points).is_dir():
        raise BosamError(f"{points}: a batch needs --points to be a folder of prompt files")
    prompt_files = {case_name(p): p for p in sorted(Path(points).iterdir()) if p.name.lower().endswith(".json")}
    cases = []
    for img in sorted(p for p in ct.iterdir() if _is_image_file(p)):
        name = case_name(img)
        if name.endswith(OUTPUT_SUFFIX):  # the label map of an earlier run here, not a CT
            continue
        if name in prompt_files:
            cases.append(Case(img, prompt_files[name]))
        else:
            cases.append(Case(img, Path(points) / f"{name}.json"))  # reported as missing later
    if not cases:
        raise BosamError(f"{ct}: no CT files ({', '.join(VOLUME_SUFFIXES)}) in this folder")
    return cases


def _cases_from_manifest(path: Path) -> list[Case]:
    base = path.parent
    rows: list[dict[str, Any]]
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:  # Excel's "CSV UTF-8" starts with a BOM
                rows = list(csv.DictReader(f))
        else:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(data, dict) and "cases" not in data:
                hint = " (a prompt file? give the CT first, then --points)" if "objects" in data else ""
                raise BosamError(f"{path}: cases: missing; a batch manifest lists cases{hint}")
            rows = data["cases"] if isinstance(data, dict) else data
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError, RecursionError) as exc:
        raise BosamError(f"{path}: not a readable batch manifest ({type(exc).__name__}: {exc})") from None
    if not isinstance(rows, list):
        raise BosamError(f"{path}: cases: expected a list of rows with 'ct' and 'points', got {type(rows).__name__}")
    cases = []
    for i, row in enumerate(rows):
        if isinstance(row, dict):  # spaces around cells, as spreadsheets leave them
            row = {str(k).strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
        if not isinstance(row, dict) or not row.get("ct") or not row.get("points"):
            empty = [k for k in ("ct", "points") if isinstance(row, dict) and k in row and not row[k]]
            found = (f"; found {', '.join(repr(k) for k in row)}" if isinstance(row, dict) else "") if not empty else \
                f"; {' and '.join(repr(k) for k in empty)} {'is' if len(empty) == 1 else 'are'} empty"
            raise BosamError(f"{path}: row {i + 1} needs 'ct' and 'points'{found}")
        out = row.get("out")
        cases.append(
            Case(base / str(row["ct"]), base / str(row["points"]), (base / str(out)) if out else None)
        )
    if not cases:
        raise BosamError(f"{path}: manifest lists no cases")
    return cases


def is_batch(ct: str | os.PathLike) -> bool:
    """A folder holding image files, or a CSV/JSON manifest (a DICOM folder is one CT)."""
    p = Path(ct)
    if p.is_file():
        return p.suffix.lower() in (".csv", ".json")
    return p.is_dir() and any(_is_image_file(c) for c in p.iterdir())


def segment_batch(
    cases: Iterable[Case],
    out_dir: str | os.PathLike | None,
    engine: Any,
    options: SegmentOptions = SegmentOptions(),
    on_case: Callable[[Case, dict[str, Any] | None, str | None], None] | None = None,
) -> list[dict[str, Any]]:
    """Segment every case with one engine; a failing case is recorded and skipped."""
    cases = list(cases)
    _refuse_shared_outputs(cases, out_dir)
    session = make_session(engine, options, engine_metadata(engine))
    results = []
    for case in cases:
        out = case.out or (Path(out_dir) if out_dir else None)  # None: <case>_bosam.nii.gz here
        try:
            if not case.points.exists():
                raise PromptError(f"{case.points}: no prompt file for this CT")
            manifest = segment_file(case.ct, case.points, out, engine, options, session=session)
            row = {"ct": str(case.ct), "ok": True, "manifest": manifest, "error": None}
        except (BosamError, OSError, ValueError) as exc:
            row = {"ct": str(case.ct), "ok": False, "manifest": None, "error": str(exc)}
        results.append(row)
        if on_case:
            on_case(case, row["manifest"], row["error"])
    return results


def _refuse_shared_outputs(cases: list[Case], out_dir: str | os.PathLike | None) -> None:
    """Before any work: a case's output that is another case's input, or an output two cases
    would write (one label map for several CTs, two rows with one 'out', a.nii and a.nii.gz in
    one folder, x.nii beside x.nii.gz sharing x.json). Paths are compared with symbolic links
    resolved: an 'out' through a linked folder had overwritten another case's CT."""
    def key(p: Path) -> str:
        return os.path.realpath(p)

    inputs = {key(p): case.ct for case in cases for p in (case.ct, case.points)}
    claimed: dict[str, tuple[Path, str]] = {}
    for case in cases:
        try:
            paths = output_paths(case.ct, case.out or (Path(out_dir) if out_dir else None))
        except BosamError:
            continue  # reported with its case
        for what in ("label_map", "manifest", "overlay", "objects_dir", "meshes_dir"):
            k = key(paths[what])
            name = what.replace("_dir", " folder").replace("_", " ")
            if what in ("label_map", "manifest") and k in inputs:
                raise BosamError(f"{paths[what]}: the {name} of {case.ct} would overwrite an input of the batch "
                                 f"(of {inputs[k]}); choose another output (-o)")
            if k in claimed:
                other, _ = claimed[k]
                same_name = case_name(other) == case_name(case.ct)
                hint = ("give each case its own 'out' (CTs of one name share an output folder)" if same_name
                        else "give -o a folder, or each case its own 'out'")
                raise BosamError(f"{paths[what]}: both {other} and {case.ct} would write this {name}; {hint}")
            claimed[k] = (case.ct, what)


# ---------------------------------------------------------------------------------------------
# interactive

INTERACTIVE_HELP = """commands (coordinates in the session's system):
  + x y z            positive click          - x y z     negative click
  object N [name]    switch to (or create) object label N
  undo               undo the last click     reset       clear the current object
  save [path]        write the label map and the clicks (<name>_points.json) now;
                     both are also rewritten after every click
  list               objects, clicks, voxels
  help               this text               quit        save and leave"""


def session_prompts(session: Session) -> dict[str, Any]:
    """The session's clicks as a prompt file (RAS mm, full precision): ``bosam segment --points``
    on it gives the same label map, and ``--interactive --points`` continues the session."""
    objects = [
        {"label": lab, "name": st.name,
         "clicks": [{"xyz": [float(v) for v in c.ras], "positive": c.positive} for c in st.clicks]}
        for lab, st in session.objects.items() if st.clicks
    ]
    return {"_source": "bosam segment --interactive", "coordinate_system": "RAS", "objects": objects}


def _check_writable(path: Path) -> None:
    """One line now if ``path``'s folder cannot be written (made if missing, a file tried)."""
    import tempfile

    make_output_folder(path)
    try:
        with tempfile.TemporaryFile(dir=path.parent):
            pass
    except OSError as exc:
        raise BosamError(f"{path}: cannot write there ({exc.strerror or exc})") from None


def _os_error_text(exc: OSError) -> str:
    """'<file>: <reason>' of an OSError, as the session prints a write that failed."""
    return f"{exc.filename2 or exc.filename or ''}: {exc.strerror or exc}"


def _plain_number(text: str, what: str) -> float:
    """A decimal number as people type it; Python's float() also takes '1_0', 'nan' and 'inf'."""
    if not re.fullmatch(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", text):
        raise ValueError(f"{what}, got {text!r}")
    return float(text)


def interactive(
    ct: str | os.PathLike,
    out: str | os.PathLike | None,
    engine: Any,
    options: SegmentOptions = SegmentOptions(),
    coordinate_system: str = "RAS",
    points: str | os.PathLike | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """A scriptable session: reads commands line by line, prints one line per event.

    Returns the number of commands that failed (the CLI exits non-zero if any did).
    """
    from .atomic import all_or_nothing, write_json
    from .prompts import MAX_LABEL, MIN_LABEL, click_from, load_prompts

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    system = coordinate_system.upper() if coordinate_system.lower() != "voxel" else "voxel"
    if system not in ("RAS", "LPS", "voxel"):
        raise PromptError(f"--coords: unknown coordinate system {coordinate_system!r} (use RAS, LPS or voxel)")
    ct_path = Path(ct)
    volume = require_finite(read_volume(ct_path))
    paths = output_paths(ct_path, out)
    inputs = [ct_path, Path(points) if points is not None else None, *_series_files(volume)]

    def guard(target_paths: dict[str, Path]) -> None:
        # the session's prompt file may be the --points file it started from: rewriting it is
        # how a continued session is saved
        guard_outputs({"label_map": target_paths["label_map"]}, inputs)
        guard_series_folder(target_paths["label_map"], volume)
        guard_outputs({"points": target_paths["points"]}, [ct_path, *_series_files(volume)])

    guard(paths)
    check_output_format(paths["label_map"], volume)
    _check_writable(paths["label_map"])  # before any clicking, not at the first autosave
    session = make_session(engine, options, engine_metadata(engine))
    session.set_volume(volume)
    current = 1
    failures = 0

    def say(msg: str) -> None:
        stdout.write(msg + "\n")
        stdout.flush()

    def save(path: Path | None = None) -> bool:
        """Write the label map and the session's prompt file; False when there was nothing a
        DICOM SEG could hold (any earlier SEG and prompt file of this target are removed)."""
        target_paths = output_paths(ct_path, path or paths["label_map"])
        target = target_paths["label_map"]  # 'save DIR' writes DIR/<ct>.nii.gz, as -o DIR does
        guard(target_paths)
        names = {lab: st.name for lab, st in session.objects.items() if st.clicks}
        points_file = target_paths["points"]
        if not names and label_map_ending(target) == ".dcm":
            target.unlink(missing_ok=True)
            points_file.unlink(missing_ok=True)
            say(f"nothing to write to {target}: a DICOM SEG needs an object with clicks")
            return False
        with all_or_nothing():  # the label map and its prompt file replace the old pair together
            write_label_map(session.label_map(), volume, target, names)
            if names:
                write_json(session_prompts(session), points_file)
        if not names:  # no clicks left: no prompt file (one without objects could not be loaded again)
            points_file.unlink(missing_ok=True)
        return True

    def autosave() -> str:
        """Rewrite the outputs after a change; the change stands even when that fails (the
        session says so, and counts it as a failure), so a retyped click is not applied twice."""
        nonlocal failures
        try:
            save()
            return ""
        except (OSError, BosamError) as exc:
            failures += 1
            what = _os_error_text(exc) if isinstance(exc, OSError) else str(exc)
            return f"; applied, but NOT SAVED ({what}); 'save PATH' writes elsewhere"

    if points is not None:
        prompts = load_prompts(points, volume)
        for obj in prompts.objects:
            session.add_object(obj.label, obj.name)
            for c in obj.clicks:
                session.add_click(obj.label, xyz=np.asarray(c.ras), positive=c.positive)
            current = obj.label
        save()
        say(f"loaded {points}: {len(prompts.objects)} objects")
    for note in ct_warnings(volume, paths["label_map"]):
        say(f"warning: {note}")
    say(f"bosam interactive on {ct_path.name} {volume.shape} ({volume.axcodes}); coordinates {system}; "
        f"engine {engine.info.name}/{engine.info.device}; output {paths['label_map']}; 'help' lists commands")
    for raw in stdin:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        cmd = parts[0].lower()
        try:
            if cmd in ("+", "-"):
                if len(parts) != 4:
                    raise ValueError(f"'{cmd}' needs three coordinates")
                coords = [_plain_number(v, f"'{cmd}' needs three coordinates") for v in parts[1:]]
                click = click_from(volume, coords, system, cmd == "+")
                state = session.objects.get(current)
                if cmd == "-" and not (state and any(c.positive for c in state.clicks)):
                    raise ValueError(f"object {current} has no positive click yet: the first click of an object must be positive")
                rep = session.add_click(current, xyz=np.asarray(click.ras), positive=click.positive)
                unsaved = autosave()
                new = f", {rep.new_windows} new window(s), encoder {rep.encoder_s * 1000:.0f} ms" if rep.encoder_calls else ", no new window"
                say(
                    f"object {current} click {cmd}: decoder {rep.decoder_s * 1000:.1f} ms "
                    f"({rep.decoder_calls} call(s)){new}; {rep.voxels} voxels in {rep.windows} window(s)"
                    + (f"; {rep.note}" if rep.note else "") + unsaved
                )
            elif cmd == "object":
                if len(parts) < 2:
                    raise ValueError("'object' needs a label number")
                if not re.fullmatch(r"[0-9]+", parts[1]):
                    raise ValueError(f"'object' needs a label number, got {parts[1]!r}")
                label = int(parts[1])
                if not MIN_LABEL <= label <= MAX_LABEL:
                    raise ValueError(f"object label must be {MIN_LABEL}..{MAX_LABEL} (0 is background), not {label}")
                current = label
                session.add_object(current, " ".join(parts[2:]) or None)
                say(f"object {current} ({session.objects[current].name}) selected")
            elif cmd == "undo":
                ok = session.undo()
                say(("undone" if ok else "nothing to undo") + autosave())
            elif cmd == "reset":
                session.reset(current)
                say(f"object {current} cleared" + autosave())
            elif cmd == "save":
                target = Path(parts[1]) if len(parts) > 1 else None
                if save(target):
                    say(f"saved {target or paths['label_map']}")
            elif cmd == "list":
                for lab, st in session.objects.items():
                    say(f"object {lab} {st.name}: {len(st.clicks)} clicks, {session.voxel_count(lab)} voxels, "
                        f"{len(st.windows)} windows")
            elif cmd == "help":
                say(INTERACTIVE_HELP)
            elif cmd in ("quit", "exit", "q"):
                break
            else:
                raise ValueError(f"unknown command {parts[0]!r} (try 'help')")
        except (ValueError, BosamError) as exc:
            failures += 1
            say(f"error: {exc}")
        except OSError as exc:  # a save target that cannot be written: the session goes on
            failures += 1
            say(f"error: {_os_error_text(exc)}")
    if save():
        say(f"saved {paths['label_map']}")
    return failures
