"""Prompt files: clicks in patient space, parsed, validated and mapped onto the CT's voxel grid.

Three input forms, detected from the content:

* **bosam** (the documented format; JSON Schema in ``bosam_cli/schemas/prompts.schema.json``)::

    {"coordinate_system": "RAS",
     "objects": [{"label": 75, "name": "femur_left",
                  "clicks": [{"xyz": [88.5, 31.0, -612.2], "positive": true},
                             {"xyz": [90.1, 35.5, -590.0], "positive": false}]}]}

  ``coordinate_system`` is ``RAS`` or ``LPS`` (world millimetres) or ``voxel`` (i, j, k indices
  of the CT file's array; fractions allowed). ``positive`` defaults to true, ``name`` to
  ``object_<label>``; labels are integers 1..65535 and unique. Keys starting with ``_`` are
  ignored (comments).
* **3D Slicer markups** (``*.mrk.json`` as Slicer 5 saves it): each point-list (``Fiducial``)
  node is one object named after the node's ``name`` (``object_<label>`` if absent); labels are
  1, 2, ... in node order (node names are not parsed for numbers). ``coordinateSystem`` (LPS by
  default, as in Slicer's schema) is honoured; a control point whose label starts with ``-`` is
  a negative click; points whose ``positionStatus`` is not ``defined`` are skipped.
* **MONAI Label** style voxel prompts: ``{"label": 3, "foreground": [[i, j, k], ...],
  "background": [[i, j, k], ...]}`` or a list of such dicts. Foreground clicks come first, then
  background ones. A string ``label`` is taken as the name and gets the next free label id.

Rules for every form: clicks are kept in file order; an object needs at least one click and its
first click must be positive (the model starts an object from a positive click); every point
must map inside the CT (voxel centres +-0.5) unless the caller asks otherwise
(``check_inside=False``, used by ``bosam points check`` to report stray points instead).
Every problem is a :class:`~bosam_cli.errors.PromptError` whose one line names the file, the
JSON path (``objects[0].clicks[1].xyz``) and the problem.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PromptError
from .volume import LPS_TO_RAS, Volume

COORDINATE_SYSTEMS = ("RAS", "LPS", "voxel")
MIN_LABEL = 1
MAX_LABEL = 65535
SCHEMA_FILE = "prompts.schema.json"
XYZ_DECIMALS = 3  # canonical output rounds millimetres to micrometres

_TOP_KEYS = {"coordinate_system", "objects", "$schema", "description"}
_OBJECT_KEYS = {"label", "name", "clicks"}
_CLICK_KEYS = {"xyz", "positive"}
_MONAI_KEYS = {"label", "name", "foreground", "background"}


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class Click:
    """One click, in both frames.

    Attributes:
        ijk: (3,) float voxel index into the CT file's array (i, j, k), fractions allowed.
        ras: (3,) world position in RAS millimetres; ``volume.voxel_to_world(ijk) == ras``.
        positive: True for "this is the object", False for "this is not".
    """

    ijk: np.ndarray
    ras: np.ndarray
    positive: bool = True

    def __post_init__(self) -> None:
        self.ijk = np.asarray(self.ijk, dtype=np.float64).reshape(3)
        self.ras = np.asarray(self.ras, dtype=np.float64).reshape(3)
        self.positive = bool(self.positive)


@dataclass
class PromptObject:
    """One object to segment: its label id in the output label map, a name, clicks in order."""

    label: int
    name: str
    clicks: list[Click] = field(default_factory=list)


@dataclass
class PromptSet:
    """All objects of one prompt file.

    Attributes:
        objects: in file order.
        source: the file it came from (for messages and manifests).
        coordinate_system: the system the file declared (``RAS``, ``LPS``, ``voxel``; ``mixed``
            for a Slicer file whose nodes differ). Clicks always hold both voxel and RAS.
        format: ``bosam``, ``slicer`` or ``monai``.
    """

    objects: list[PromptObject]
    source: str = "<prompts>"
    coordinate_system: str = "RAS"
    format: str = "bosam"

    def to_json_dict(self) -> dict[str, Any]:
        """The canonical bosam form: RAS millimetres rounded to micrometres, every field explicit."""
        return {
            "coordinate_system": "RAS",
            "objects": [
                {
                    "label": int(o.label),
                    "name": o.name,
                    "clicks": [{"xyz": _rounded(c.ras), "positive": bool(c.positive)} for c in o.clicks],
                }
                for o in self.objects
            ],
        }

    def as_records(self) -> list[dict[str, Any]]:
        """One dict per click, in order: object (name), label, click (0-based index within the
        object, as in the JSON path), positive, ras (mm), voxel (float i, j, k)."""
        return [
            {
                "object": o.name,
                "label": int(o.label),
                "click": n,
                "positive": bool(c.positive),
                "ras": _rounded(c.ras),
                "voxel": _rounded(c.ijk),
            }
            for o in self.objects
            for n, c in enumerate(o.clicks)
        ]

    @property
    def n_clicks(self) -> int:
        return sum(len(o.clicks) for o in self.objects)


def _rounded(v: np.ndarray) -> list[float]:
    return [float(round(float(x), XYZ_DECIMALS)) + 0.0 for x in v]  # + 0.0 turns -0.0 into 0.0


def schema_path() -> Path:
    """Where the JSON Schema of the bosam prompt format is installed."""
    return Path(__file__).resolve().parent / "schemas" / SCHEMA_FILE


# ---------------------------------------------------------------------------------------------
# errors and small validators


class _Ctx:
    """What every validator needs: the file name for messages, the volume, the inside rule."""

    def __init__(self, source: str, volume: Volume, check_inside: bool) -> None:
        self.source = source
        self.volume = volume
        self.check_inside = check_inside

    def fail(self, jpath: str, problem: str) -> PromptError:
        where = f"{jpath}: " if jpath else ""
        return PromptError(f"{self.source}: {where}{problem}")


def _join(base: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{base}[{key}]"
    return f"{base}.{key}" if base else key


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def _require_dict(ctx: _Ctx, v: Any, jpath: str) -> dict:
    if not isinstance(v, dict):
        raise ctx.fail(jpath or "(top level)", f"expected a JSON object, got {_type_name(v)}")
    return v


def _require_list(ctx: _Ctx, v: Any, jpath: str) -> list:
    if not isinstance(v, list):
        raise ctx.fail(jpath, f"expected a list, got {_type_name(v)}")
    return v


def _check_keys(ctx: _Ctx, d: dict, allowed: set[str], jpath: str) -> None:
    for k in d:
        if not isinstance(k, str) or (k not in allowed and not k.startswith("_")):
            raise ctx.fail(_join(jpath, str(k)), f"unknown key (allowed: {', '.join(sorted(allowed - {'$schema'}))}; keys starting with _ are comments)")


def _label(ctx: _Ctx, v: Any, jpath: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ctx.fail(jpath, f"label must be an integer {MIN_LABEL}..{MAX_LABEL}, got {json.dumps(v)}")
    if not MIN_LABEL <= v <= MAX_LABEL:
        raise ctx.fail(jpath, f"label {v} out of range {MIN_LABEL}..{MAX_LABEL} (0 is background)")
    return int(v)


def _name(ctx: _Ctx, v: Any, jpath: str) -> str:
    """An object's name on one line: control characters (a line break split warnings, tables
    and DICOM values) become spaces, runs of white space one."""
    if not isinstance(v, str) or not v.strip():
        raise ctx.fail(jpath, f"name must be a non-empty string, got {json.dumps(v)}")
    one_line = " ".join("".join(" " if ord(ch) < 32 or 127 <= ord(ch) < 160 else ch for ch in v).split())
    if not one_line:
        raise ctx.fail(jpath, f"name must be a non-empty string, got {json.dumps(v)}")
    return one_line


def _positive(ctx: _Ctx, v: Any, jpath: str) -> bool:
    if not isinstance(v, bool):
        raise ctx.fail(jpath, f"positive must be true or false, got {json.dumps(v)}")
    return v


def _xyz(ctx: _Ctx, v: Any, jpath: str) -> np.ndarray:
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        got = f"{len(v)} values" if isinstance(v, (list, tuple)) else _type_name(v)
        raise ctx.fail(jpath, f"expected 3 numbers [x, y, z], got {got}")
    for n, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
            raise ctx.fail(f"{jpath}[{n}]", f"expected a number, got {_type_name(x)}")
        try:
            finite = math.isfinite(float(x))
        except OverflowError:  # an integer beyond any float
            finite = False
        if not finite:
            raise ctx.fail(f"{jpath}[{n}]", f"coordinate is {str(x)[:20]} (NaN, infinite or beyond any float)")
    return np.asarray(v, dtype=np.float64)


def _system(ctx: _Ctx, v: Any, jpath: str, allowed: tuple[str, ...] = COORDINATE_SYSTEMS) -> str:
    if v is None:
        raise ctx.fail(jpath, f"missing coordinate system (one of {', '.join(allowed)})")
    if not isinstance(v, str) or v not in allowed:
        raise ctx.fail(jpath, f"unknown coordinate system {json.dumps(v)} (expected one of {', '.join(allowed)})")
    return v


def _fmt(v: np.ndarray) -> str:
    return "(" + ", ".join(f"{float(x):.6g}" for x in v) + ")"


def _make_click(ctx: _Ctx, xyz: np.ndarray, system: str, positive: bool, jpath: str) -> Click:
    """Map one point to both frames (affines only) and apply the inside rule."""
    vol = ctx.volume
    if system == "voxel":
        ijk = xyz.copy()
        ras = vol.voxel_to_world(ijk)[0]
    else:
        ras = xyz if system == "RAS" else (LPS_TO_RAS[:3, :3] @ xyz)
        ijk = vol.world_to_voxel(ras)[0]
    if ctx.check_inside and not bool(vol.contains_voxel(ijk)[0]):
        where = (f"voxel {_fmt(xyz)} lies" if system == "voxel"
                 else f"point {_fmt(xyz)} {system} mm maps to voxel {_fmt(np.round(ijk, 2))},")
        raise ctx.fail(jpath, f"{where} outside the volume of shape {vol.shape}")
    return Click(ijk=ijk, ras=np.asarray(ras, dtype=np.float64), positive=positive)


def _finish_object(
    ctx: _Ctx, label: int, name: str, clicks: list[Click], jpath: str, what: str, first_path: str | None = None
) -> PromptObject:
    if not clicks:
        raise ctx.fail(jpath, f"empty object: no {what} (an object needs at least one positive click)")
    if not clicks[0].positive:
        raise ctx.fail(
            first_path or jpath,
            f"the first click of an object must be positive (object {name!r} starts with a negative click)",
        )
    return PromptObject(label=label, name=name, clicks=clicks)


def _unique_labels(ctx: _Ctx, objects: list[PromptObject], paths: list[str]) -> None:
    seen: dict[int, str] = {}
    for o, p in zip(objects, paths):
        if o.label in seen:
            raise ctx.fail(p, f"duplicate label id {o.label} (also used by {seen[o.label]}); label ids must be unique")
        seen[o.label] = p


# ---------------------------------------------------------------------------------------------
# the three formats


def _parse_bosam(ctx: _Ctx, obj: dict) -> PromptSet:
    _check_keys(ctx, obj, _TOP_KEYS, "")
    system = _system(ctx, obj.get("coordinate_system"), "coordinate_system")
    if "objects" not in obj:
        raise ctx.fail("objects", "missing (a list of objects with label and clicks)")
    objs = _require_list(ctx, obj["objects"], "objects")
    if not objs:
        raise ctx.fail("objects", "no objects (the list is empty)")
    out: list[PromptObject] = []
    label_paths: list[str] = []
    for oi, o in enumerate(objs):
        op = f"objects[{oi}]"
        o = _require_dict(ctx, o, op)
        _check_keys(ctx, o, _OBJECT_KEYS, op)
        if "label" not in o:
            raise ctx.fail(_join(op, "label"), f"missing (an integer {MIN_LABEL}..{MAX_LABEL})")
        label = _label(ctx, o["label"], _join(op, "label"))
        name = _name(ctx, o["name"], _join(op, "name")) if "name" in o else f"object_{label}"
        if "clicks" not in o:
            raise ctx.fail(_join(op, "clicks"), "missing (a list of clicks)")
        clicks_in = _require_list(ctx, o["clicks"], _join(op, "clicks"))
        clicks: list[Click] = []
        for ci, c in enumerate(clicks_in):
            cp = f"{op}.clicks[{ci}]"
            c = _require_dict(ctx, c, cp)
            _check_keys(ctx, c, _CLICK_KEYS, cp)
            if "xyz" not in c:
                raise ctx.fail(_join(cp, "xyz"), "missing (3 numbers)")
            xyz = _xyz(ctx, c["xyz"], _join(cp, "xyz"))
            positive = _positive(ctx, c.get("positive", True), _join(cp, "positive"))
            clicks.append(_make_click(ctx, xyz, system, positive, _join(cp, "xyz")))
        out.append(_finish_object(ctx, label, name, clicks, _join(op, "clicks"), "clicks", f"{op}.clicks[0].positive"))
        label_paths.append(_join(op, "label"))
    _unique_labels(ctx, out, label_paths)
    return PromptSet(out, ctx.source, system, "bosam")


def _slicer_units_ok(units: Any) -> bool:
    if units is None or units == "mm":
        return True
    return isinstance(units, list) and len(units) >= 1 and units[0] == "mm"


def _parse_slicer(ctx: _Ctx, obj: dict) -> PromptSet:
    nodes = _require_list(ctx, obj["markups"], "markups")
    if not nodes:
        raise ctx.fail("markups", "no markups nodes (the list is empty)")
    out: list[PromptObject] = []
    systems: set[str] = set()
    for mi, m in enumerate(nodes):
        mp = f"markups[{mi}]"
        m = _require_dict(ctx, m, mp)
        mtype = m.get("type")
        if mtype != "Fiducial":
            raise ctx.fail(_join(mp, "type"), f"only point lists (type Fiducial) can be clicks, got {json.dumps(mtype)}")
        system = _system(ctx, m.get("coordinateSystem", "LPS"), _join(mp, "coordinateSystem"), ("LPS", "RAS"))
        systems.add(system)
        if not _slicer_units_ok(m.get("coordinateUnits")):
            raise ctx.fail(_join(mp, "coordinateUnits"), f"expected mm, got {json.dumps(m.get('coordinateUnits'))}")
        label = mi + 1
        name = _name(ctx, m["name"], _join(mp, "name")) if m.get("name") not in (None, "") else f"object_{label}"
        points = _require_list(ctx, m.get("controlPoints", []), _join(mp, "controlPoints"))
        clicks: list[Click] = []
        for pi, p in enumerate(points):
            pp = f"{mp}.controlPoints[{pi}]"
            p = _require_dict(ctx, p, pp)
            if p.get("positionStatus", "defined") != "defined":
                continue  # placeholder or preview point: Slicer has no position for it yet
            plabel = p.get("label", "")
            if not isinstance(plabel, str):
                raise ctx.fail(_join(pp, "label"), f"expected a string, got {_type_name(plabel)}")
            if "position" not in p:
                raise ctx.fail(_join(pp, "position"), "missing (3 numbers)")
            xyz = _xyz(ctx, p["position"], _join(pp, "position"))
            positive = not plabel.strip().startswith("-")
            clicks.append(_make_click(ctx, xyz, system, positive, _join(pp, "position")))
        out.append(_finish_object(ctx, label, name, clicks, _join(mp, "controlPoints"), "defined control points"))
    system_out = systems.pop() if len(systems) == 1 else "mixed"
    return PromptSet(out, ctx.source, system_out, "slicer")


def _parse_monai(ctx: _Ctx, obj: dict | list) -> PromptSet:
    entries = obj if isinstance(obj, list) else [obj]
    prefix = (lambda i: f"[{i}]") if isinstance(obj, list) else (lambda i: "")
    if not entries:
        raise ctx.fail("(top level)", "no prompts (the list is empty)")
    parsed: list[tuple[int | None, str | None, list[Click], str]] = []
    for ei, e in enumerate(entries):
        ep = prefix(ei)
        e = _require_dict(ctx, e, ep)
        _check_keys(ctx, e, _MONAI_KEYS, ep)
        label: int | None = None
        name: str | None = _name(ctx, e["name"], _join(ep, "name")) if "name" in e else None
        if "label" in e and isinstance(e["label"], str):
            name = name or _name(ctx, e["label"], _join(ep, "label"))
        elif "label" in e:
            label = _label(ctx, e["label"], _join(ep, "label"))
        clicks: list[Click] = []
        for key, positive in (("foreground", True), ("background", False)):
            pts = _require_list(ctx, e.get(key, []), _join(ep, key))
            for pi, pt in enumerate(pts):
                pp = f"{_join(ep, key)}[{pi}]"
                clicks.append(_make_click(ctx, _xyz(ctx, pt, pp), "voxel", positive, pp))
        where = _join(ep, "foreground")
        if not clicks:
            raise ctx.fail(where, "empty object: no foreground or background points (an object needs at least one positive click)")
        if not clicks[0].positive:
            raise ctx.fail(where, "no foreground point: the first click of an object must be positive")
        parsed.append((label, name, clicks, ep))
    used = {p[0] for p in parsed if p[0] is not None}
    out: list[PromptObject] = []
    label_paths: list[str] = []
    next_free = MIN_LABEL
    for label, name, clicks, ep in parsed:
        if label is None:
            while next_free in used:
                next_free += 1
            label = next_free
            used.add(label)
        out.append(PromptObject(label, name or f"object_{label}", clicks))
        label_paths.append(_join(ep, "label"))
    _unique_labels(ctx, out, label_paths)
    return PromptSet(out, ctx.source, "voxel", "monai")


def _is_monai_entry(v: Any) -> bool:
    return isinstance(v, dict) and ("foreground" in v or "background" in v)


# ---------------------------------------------------------------------------------------------
# public API


def parse_prompts(obj: dict | list, volume: Volume, source: str = "<prompts>", *, check_inside: bool = True) -> PromptSet:
    """Validate already-decoded prompt JSON against ``volume`` and map every click to voxel+RAS.

    The format (bosam, Slicer markups, MONAI Label) is detected from the content. With
    ``check_inside=False`` points outside the volume are kept (for reporting) instead of refused.
    """
    ctx = _Ctx(source, volume, check_inside)
    if isinstance(obj, dict) and "markups" in obj:
        return _parse_slicer(ctx, obj)
    if isinstance(obj, dict) and ("objects" in obj or "coordinate_system" in obj):
        return _parse_bosam(ctx, obj)
    if _is_monai_entry(obj) or (isinstance(obj, list) and obj and all(_is_monai_entry(e) for e in obj)):
        return _parse_monai(ctx, obj)
    raise ctx.fail(
        "(top level)",
        "unrecognised prompt format: expected a bosam file (coordinate_system + objects), "
        "a 3D Slicer markups file (markups) or MONAI Label prompts (foreground/background)",
    )


def load_prompts(path: str | os.PathLike, volume: Volume, *, check_inside: bool = True) -> PromptSet:
    """Read a prompt file (bosam JSON, Slicer ``.mrk.json`` or MONAI Label JSON) for ``volume``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise PromptError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PromptError(f"{path}: is a folder, expected a JSON prompt file") from None
    except UnicodeDecodeError as exc:
        raise PromptError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise PromptError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as exc:
        raise PromptError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except _DuplicateKey as exc:
        raise PromptError(f"{path}: key {exc.args[0]!r} appears twice in one JSON object (which one is meant?)") from None
    except (RecursionError, ValueError) as exc:  # nesting beyond the parser, numbers beyond int()
        raise PromptError(f"{path}: not a usable JSON prompt file ({type(exc).__name__})") from None
    return parse_prompts(obj, volume, source=str(path), check_inside=check_inside)


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def click_from(
    volume: Volume,
    coords: Any,
    system: str,
    positive: bool = True,
    *,
    check_inside: bool = True,
    source: str = "<click>",
) -> Click:
    """One click from three numbers in ``system`` (RAS, LPS, voxel; any letter case), e.g. typed
    in an interactive session. Raises :class:`PromptError` for bad numbers, an unknown system or
    (unless ``check_inside=False``) a point outside the volume."""
    ctx = _Ctx(source, volume, check_inside)
    canon = {s.lower(): s for s in COORDINATE_SYSTEMS}.get(str(system).lower()) if isinstance(system, str) else None
    if canon is None:
        raise ctx.fail("", f"unknown coordinate system {json.dumps(system) if isinstance(system, str) else system!r} (expected one of {', '.join(COORDINATE_SYSTEMS)})")
    if isinstance(coords, np.ndarray):
        coords = coords.tolist()
    xyz = _xyz(ctx, list(coords) if isinstance(coords, tuple) else coords, "xyz")
    return _make_click(ctx, xyz, canon, bool(positive), "xyz")


def check_points(ct_path: str | os.PathLike, prompts_path: str | os.PathLike) -> list[dict[str, Any]]:
    """Where every click of a prompt file lands in a CT, before any inference.

    One dict per click with exactly the keys ``object`` (name), ``label``, ``click`` (0-based
    index within the object), ``positive``, ``ras`` (mm), ``voxel`` (float i, j, k in the CT
    file's array), ``hu`` (value of the nearest voxel; None outside) and ``inside``. Points
    outside the volume are reported (``inside: false``), not refused; every other problem with
    the prompt file is still an error.
    """
    from .volume import read_volume

    volume = read_volume(ct_path)
    prompts = load_prompts(prompts_path, volume, check_inside=False)
    records = prompts.as_records()
    clicks = [c for o in prompts.objects for c in o.clicks]
    if not clicks:
        return []
    ijk = np.stack([c.ijk for c in clicks])
    inside = volume.contains_voxel(ijk)
    values = volume.value_at(ijk)
    integer = volume.array.dtype.kind in "biu"
    for rec, ins, val in zip(records, inside, values):
        if not ins or not np.isfinite(val):
            rec["hu"] = None
        else:
            rec["hu"] = int(val) if integer else float(round(float(val), 3))
        rec["inside"] = bool(ins)
    return records
