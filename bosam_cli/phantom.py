"""Synthetic CT phantoms with exact bone labels (TotalSegmentator v2 ids).

Used as the default input of ``bosam demo``, by tests, and as training data for the bundled
model. A phantom is a CT-like torso section (thoracic, thoracolumbar, lumbar or pelvic region)
built from analytic shapes in patient coordinates (RAS millimetres) and then sampled onto a voxel
grid. Orientation, spacing and shape change only the grid, never the anatomy: the same seed gives
the same bones at the same world positions whatever grid is asked for.

Anatomy (typical adult sizes times a per-seed scale of 0.8-1.05):

* air outside an elliptic body with a flattened back; a subcutaneous fat layer (-120..-80 HU)
  over a muscle wall (35..60 HU); an abdominal cavity of mixed fat and soft tissue; paraspinal
  and psoas muscles; optionally the CT table.
* non-bone structures of bone-like HU that a model must not leak into: contrast-enhanced aorta
  and iliac arteries (150..350 HU), IVC, kidneys with an enhancing cortex (150..250 HU), bowel
  loops holding gas, fluid or oral contrast (200..450 HU), small aortic calcifications
  (450..900 HU), costal cartilage (100..220 HU), intervertebral discs (70..110 HU); liver, spleen,
  bladder, lung bases (-880..-820 HU) and the spinal canal.
* bones with a cortical shell (800..1500 HU; 0.5..1.1 mm thick, 4-5 mm along the femoral shaft)
  around cancellous bone (a mean of 80..380 HU, osteopenic to dense, with a smooth texture of
  20..50 HU RMS whose peaks reach about 3x that, so a low-density bone has patches near or below
  0 HU, as fatty marrow gives) or, in the femoral shaft, fatty marrow (-60..40 HU): vertebrae (body, pedicles,
  lamina, spinous and transverse processes, articular processes, spinal canal) stacked on
  intervertebral discs with a lordotic/kyphotic curve; ribs (curved tubes descending from their
  vertebra, carved 1.5 mm away from it); sacrum with S1 (one fused bone split into two labels
  the way TotalSegmentator does); hips (iliac wing, acetabular cup, pubic and ischial rami,
  separated from the sacrum by the sacroiliac joint and from each other by the symphysis);
  proximal femurs (head, neck, trochanters, shaft) in the acetabulum with a joint space.

Acquisition: partial volume (every structure's occupancy of a voxel is ramped over the voxel's
extent along the surface normal, so thin cortex and ribs at 3 mm slices get plausible averaged
HU instead of aliasing), a Gaussian point-spread function (0.4..0.8 mm), and Gaussian noise
(10..30 HU, lightly correlated). Labels are exact: voxel centre inside the bone's geometry.

Everything is deterministic from the seed. Independent random streams are used for the anatomy,
the grid and the noise, so overriding the grid keeps the anatomy.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .volume import Volume

__all__ = [
    "KINDS",
    "REGIONS",
    "ORIENTATIONS",
    "TS_LABELS",
    "TISSUE_NAMES",
    "PhantomObject",
    "Phantom",
    "make_phantom",
    "phantom_clicks",
    "write_phantom_dataset",
    "orientation_affine",
]

# ---------------------------------------------------------------------------------------------
# label ids: the subset of TotalSegmentator v2 'total' that phantoms use (embedded so that the
# package does not depend on the shared data folder at run time; checked against the shared
# labelmap JSON by the tests when it is present).

TS_LABELS: dict[str, int] = {
    "sacrum": 25,
    "vertebrae_S1": 26,
    "vertebrae_L5": 27,
    "vertebrae_L4": 28,
    "vertebrae_L3": 29,
    "vertebrae_L2": 30,
    "vertebrae_L1": 31,
    "vertebrae_T12": 32,
    "vertebrae_T11": 33,
    "vertebrae_T10": 34,
    "vertebrae_T9": 35,
    "femur_left": 75,
    "femur_right": 76,
    "hip_left": 77,
    "hip_right": 78,
    **{f"rib_left_{n}": 91 + n for n in range(1, 13)},
    **{f"rib_right_{n}": 103 + n for n in range(1, 13)},
}

#: bone kinds a phantom can hold ("long_bone" is accepted as an alias of "femur").
KINDS: tuple[str, ...] = ("vertebra", "rib", "pelvis", "femur")

#: region presets: vertebral levels (bottom to top) and the kinds they hold.
REGIONS: dict[str, dict[str, Any]] = {
    "thoracic": {"levels": ("T12", "T11", "T10", "T9"), "kinds": ("vertebra", "rib")},
    "thoracolumbar": {"levels": ("L2", "L1", "T12", "T11"), "kinds": ("vertebra", "rib")},
    "lumbar": {"levels": ("L4", "L3", "L2", "L1"), "kinds": ("vertebra",)},
    "pelvis": {"levels": ("L5", "L4"), "kinds": ("vertebra", "pelvis", "femur")},
    "all": {"levels": ("L5", "L4", "L3", "L2", "L1", "T12"), "kinds": KINDS},
}
_REGION_WEIGHTS = {"thoracic": 0.2, "thoracolumbar": 0.25, "lumbar": 0.25, "pelvis": 0.3}

#: storage orientations drawn when none is given (nibabel axis codes: the direction each voxel
#: axis points to). Axial storage dominates, as in real CT; PIR/ASL are sagittal-first storage.
ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS", "LPI", "RPI", "RAI", "PIR", "ASL")
_ORIENTATION_WEIGHTS = (0.25, 0.25, 0.15, 0.08, 0.07, 0.05, 0.1, 0.05)

#: tissue classes of ``Phantom.tissue`` (the structure owning each voxel centre).
TISSUE_NAMES: dict[int, str] = {
    0: "air",
    1: "fat",
    2: "soft_tissue",
    3: "muscle",
    4: "organ",
    5: "enhanced",  # contrast vessels, kidney, oral contrast: 100-450 HU, not bone
    6: "calcification",
    7: "cartilage_disc",
    8: "fluid",
    9: "lung_gas",
    10: "bone",
    11: "table",
}
_T = {name: code for code, name in TISSUE_NAMES.items()}

MAX_VOXELS = 4_000_000  # default grids are kept below this (coarser spacing / smaller FOV)
HU_MIN, HU_MAX = -1024, 3071


# ---------------------------------------------------------------------------------------------
# public data classes


@dataclass(frozen=True)
class PhantomObject:
    """One labelled bone of a phantom: TotalSegmentator id, name, kind, voxels on the grid."""

    label: int
    name: str
    kind: str
    voxels: int


@dataclass
class Phantom:
    """A synthetic CT and its exact bone labels on the same grid.

    Attributes:
        ct: int16 Hounsfield units.
        labels: uint8 TotalSegmentator v2 ids (0 background; bones only).
        objects: the bones with at least one voxel on the grid, in label order.
        label_names: id -> name for every id in ``objects``.
        tissue: uint8 tissue class of each voxel (``TISSUE_NAMES``), e.g. to measure leaks into
            contrast-enhanced soft tissue.
        region: the region preset the anatomy follows (``REGIONS``).
        seed: the seed it was made from.
        info: scale, contrast phase, noise, spacing, orientation ... (plain JSON types).
    """

    ct: Volume
    labels: Volume
    objects: list[PhantomObject]
    label_names: dict[int, str]
    tissue: Volume
    region: str
    seed: int
    info: dict[str, Any] = field(default_factory=dict)

    def object(self, name_or_label: str | int) -> PhantomObject:
        """The object with this name or label id (KeyError if absent)."""
        for obj in self.objects:
            if obj.name == name_or_label or obj.label == name_or_label:
                return obj
        raise KeyError(name_or_label)

    def save(self, directory: str | os.PathLike, stem: str = "phantom") -> dict[str, Path]:
        """Write ``<stem>_ct.nii.gz``, ``<stem>_labels.nii.gz`` and ``<stem>.json`` (objects,
        names, info) into ``directory`` atomically. Returns the paths by role."""
        from .atomic import make_dirs, write_json
        from .volume import write_label_map, write_volume

        directory = Path(directory)
        make_dirs(directory)
        paths = {
            "ct": write_volume(self.ct.array, self.ct, directory / f"{stem}_ct.nii.gz"),
            "labels": write_label_map(self.labels.array, self.labels, directory / f"{stem}_labels.nii.gz"),
        }
        meta = {
            "seed": self.seed,
            "region": self.region,
            "objects": [vars(o) for o in self.objects],
            "label_names": {str(k): v for k, v in self.label_names.items()},
            "info": self.info,
        }
        paths["meta"] = write_json(meta, directory / f"{stem}.json")
        return paths


# ---------------------------------------------------------------------------------------------
# geometry: shapes give a "depth" in millimetres, > 0 inside, < 0 outside (an approximate signed
# distance), evaluated on world coordinate arrays P = (x, y, z) of any (broadcast) shape.

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]


def _rot(ax_deg: float = 0.0, ay_deg: float = 0.0, az_deg: float = 0.0) -> np.ndarray:
    """Rotation matrix R = Rz @ Ry @ Rx (angles in degrees); columns are the rotated axes."""
    ax, ay, az = (math.radians(a) for a in (ax_deg, ay_deg, az_deg))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _unit(v: Sequence[float]) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def _ellipsoid_depth(q0: np.ndarray, q1: np.ndarray, q2: np.ndarray, r: Sequence[float]) -> np.ndarray:
    """Approximate signed depth of an axis-aligned ellipsoid with radii r (exact for spheres)."""
    a, b, c = (float(v) for v in r)
    k0 = np.sqrt((q0 / a) ** 2 + (q1 / b) ** 2 + (q2 / c) ** 2)
    k1 = np.sqrt((q0 / (a * a)) ** 2 + (q1 / (b * b)) ** 2 + (q2 / (c * c)) ** 2)
    out = np.full(np.broadcast(k0, k1).shape, min(a, b, c), dtype=k0.dtype)
    np.divide(k0 * (1.0 - k0), k1, out=out, where=k1 > 1e-9)
    return out


def _ellipse_depth(q0: np.ndarray, q1: np.ndarray, a: Any, b: Any) -> np.ndarray:
    """Approximate signed depth of an ellipse (2-D) with semi-axes a, b (arrays allowed)."""
    a = float(a) if np.ndim(a) == 0 else a
    b = float(b) if np.ndim(b) == 0 else b
    k0 = np.sqrt((q0 / a) ** 2 + (q1 / b) ** 2)
    k1 = np.sqrt((q0 / (a * a)) ** 2 + (q1 / (b * b)) ** 2)
    out = np.broadcast_to(np.minimum(a, b), np.broadcast(k0, k1).shape).astype(k0.dtype, copy=True)
    np.divide(k0 * (1.0 - k0), k1, out=out, where=k1 > 1e-9)
    return out


def _wrap(angle: np.ndarray) -> np.ndarray:
    return (angle + np.pi) % (2.0 * np.pi) - np.pi


class _Shape:
    """Base class: ``depth(P)`` and a world axis-aligned bounding box ``lo``, ``hi``."""

    lo: np.ndarray
    hi: np.ndarray

    def depth(self, p: Coords) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def eval_box(self, ctx: "_Ctx", sl: tuple[slice, slice, slice]) -> np.ndarray:
        """Depth on the voxels of sub-box ``sl`` (composites evaluate each part in its own box)."""
        return np.broadcast_to(self.depth(ctx.coords(sl)), ctx.sub_shape(sl))

    def _local(self, p: Coords, centre: np.ndarray, rot: np.ndarray) -> Coords:
        """World -> local coordinates q = rot.T @ (p - centre) (rot columns = local axes)."""
        # Python floats keep float32 coordinates float32 (NumPy scalars would promote them)
        d = (p[0] - float(centre[0]), p[1] - float(centre[1]), p[2] - float(centre[2]))
        out = []
        for i in range(3):
            acc = None
            for j in range(3):
                r = float(rot[j, i])
                if abs(r) < 1e-12:
                    continue
                term = d[j] if r == 1.0 else r * d[j]
                acc = term if acc is None else acc + term
            out.append(acc if acc is not None else 0.0 * d[0])
        return tuple(out)  # type: ignore[return-value]


def _box_of(centre: np.ndarray, rot: np.ndarray, half: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    ext = np.abs(rot) @ np.asarray(half, dtype=np.float64)
    return centre - ext, centre + ext


class _Ellipsoid(_Shape):
    def __init__(self, centre: Sequence[float], radii: Sequence[float], rot: np.ndarray | None = None):
        self.c = np.asarray(centre, dtype=np.float64)
        self.r = np.asarray(radii, dtype=np.float64)
        self.rot = np.eye(3) if rot is None else rot
        ext = np.sqrt((self.rot * self.r[None, :]) ** 2 @ np.ones(3))
        self.lo, self.hi = self.c - ext, self.c + ext

    def depth(self, p: Coords) -> np.ndarray:
        return _ellipsoid_depth(*self._local(p, self.c, self.rot), self.r)


class _Cylinder(_Shape):
    """Elliptic cylinder: semi-axes a, b across its local third axis, half height h (None:
    infinitely long, which is cheaper to evaluate)."""

    def __init__(self, centre: Sequence[float], a: float, b: float, h: float | None, rot: np.ndarray | None = None):
        self.c = np.asarray(centre, dtype=np.float64)
        self.a, self.b, self.h = float(a), float(b), None if h is None else float(h)
        self.rot = np.eye(3) if rot is None else rot
        self.lo, self.hi = _box_of(self.c, self.rot, (a, b, 1e7 if h is None else h))

    def depth(self, p: Coords) -> np.ndarray:
        q = self._local(p, self.c, self.rot)
        radial = _ellipse_depth(q[0], q[1], self.a, self.b)
        return radial if self.h is None else np.minimum(radial, self.h - np.abs(q[2]))


class _Slab(_Shape):
    """Between two planes normal to world axis ``axis``: lo < p[axis] < hi."""

    def __init__(self, axis: int, lo: float, hi: float):
        self.axis, self.a, self.b = axis, float(lo), float(hi)
        self.lo, self.hi = np.full(3, -1e7), np.full(3, 1e7)
        self.lo[axis], self.hi[axis] = lo, hi

    def depth(self, p: Coords) -> np.ndarray:
        q = p[self.axis]
        return np.minimum(q - self.a, self.b - q)


class _Capsule(_Shape):
    """Segment a -> b swept by an ellipse (r1 across, r2 along ``up``), with rounded ends."""

    def __init__(self, a: Sequence[float], b: Sequence[float], r1: float, r2: float, up: Sequence[float] = (0, 0, 1)):
        self.a = np.asarray(a, dtype=np.float64)
        axis = np.asarray(b, dtype=np.float64) - self.a
        self.length = float(np.linalg.norm(axis))
        t = axis / self.length
        upv = np.asarray(up, dtype=np.float64)
        if abs(float(np.dot(upv, t))) > 0.95:
            upv = np.array([1.0, 0.0, 0.0]) if abs(t[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
        e2 = _unit(upv - np.dot(upv, t) * t)
        e1 = np.cross(e2, t)
        self.rot = np.stack([t, e1, e2], axis=1)
        self.r1, self.r2 = float(r1), float(r2)
        rmax = max(r1, r2)
        ends = np.stack([self.a, self.a + axis])
        self.lo, self.hi = ends.min(0) - rmax, ends.max(0) + rmax

    def depth(self, p: Coords) -> np.ndarray:
        q = self._local(p, self.a, self.rot)
        along = np.maximum(np.maximum(-q[0], q[0] - self.length), 0.0)
        return _ellipsoid_depth(along, q[1], q[2], (min(self.r1, self.r2), self.r1, self.r2))


class _ArcTube(_Shape):
    """A tube along an elliptic arc (ribs, lamina): arc in the local (0, 1) plane around ``centre``
    with semi-axes A, B, from angle ``t0`` to ``t1`` (radians, polar angle of the ellipse
    parameter; the arc goes the short way from t0 through the mid angle), dropping ``drop`` mm
    along the local third axis from start to end. Cross-section: ``rt`` radially, ``rh`` along
    the third axis, tapering to ``taper`` times at the end. ``progress`` = the part of a longer
    arc this piece is (drop and taper follow the whole arc; see ``_arc_tube``)."""

    def __init__(
        self,
        centre: Sequence[float],
        A: float,
        B: float,
        t0: float,
        t1: float,
        rt: float,
        rh: float,
        drop: float = 0.0,
        rot: np.ndarray | None = None,
        taper: float = 1.0,
        progress: tuple[float, float] = (0.0, 1.0),
    ):
        self.c = np.asarray(centre, dtype=np.float64)
        self.p0, self.p1 = progress
        self.A, self.B, self.rt, self.rh, self.drop, self.taper = A, B, rt, rh, drop, taper
        self.rot = np.eye(3) if rot is None else rot
        self.mid = 0.5 * (t0 + t1)
        self.half = 0.5 * abs(t1 - t0)
        self.direction = 1.0 if t1 >= t0 else -1.0
        ts = np.linspace(t0, t1, 33)
        prog = self.p0 + (self.p1 - self.p0) * np.linspace(0.0, 1.0, 33)
        pts_local = np.stack([A * np.cos(ts), B * np.sin(ts), -drop * prog], axis=1)
        pts = pts_local @ self.rot.T + self.c
        r = max(rt, rh)
        self.lo, self.hi = pts.min(0) - r, pts.max(0) + r

    def depth(self, p: Coords) -> np.ndarray:
        q0, q1, q2 = self._local(p, self.c, self.rot)
        theta = np.arctan2(q1 / self.B, q0 / self.A)
        delta = _wrap(theta - self.mid)
        clamped = np.clip(delta, -self.half, self.half)
        local = (self.direction * clamped + self.half) / (2.0 * self.half)  # 0 at t0, 1 at t1
        progress = self.p0 + (self.p1 - self.p0) * local
        tc = self.mid + clamped
        r_local = np.sqrt((self.A * np.cos(tc)) ** 2 + (self.B * np.sin(tc)) ** 2)
        rho = np.sqrt((q0 / self.A) ** 2 + (q1 / self.B) ** 2)
        radial = (rho - 1.0) * r_local
        excess = np.maximum(np.abs(delta) - self.half, 0.0) * r_local
        height = q2 + self.drop * progress
        scale = 1.0 + (self.taper - 1.0) * progress
        return _ellipsoid_depth(radial / scale, height / scale, excess, (self.rt, self.rh, min(self.rt, self.rh))) * scale


def _arc_tube(*args: Any, pieces: int = 1, **kw: Any) -> _Shape:
    """An ``_ArcTube`` split into ``pieces`` consecutive pieces (a union): each gets its own tight
    bounding box, which makes long curved tubes (ribs) far cheaper to evaluate."""
    if pieces <= 1:
        return _ArcTube(*args, **kw)
    centre, A, B, t0, t1, rt, rh = args[:7]
    edges = np.linspace(t0, t1, pieces + 1)
    prog = np.linspace(0.0, 1.0, pieces + 1)
    return _Union(
        *(
            _ArcTube(centre, A, B, edges[i], edges[i + 1], rt, rh, *args[7:], progress=(prog[i], prog[i + 1]), **kw)
            for i in range(pieces)
        )
    )


class _HalfSpace(_Shape):
    """Signed distance to a plane, positive on the side ``normal`` points to (unbounded)."""

    def __init__(self, point: Sequence[float], normal: Sequence[float]):
        self.p = np.asarray(point, dtype=np.float64)
        self.n = _unit(normal)
        self.lo, self.hi = np.full(3, -np.inf), np.full(3, np.inf)

    def depth(self, p: Coords) -> np.ndarray:
        out = None
        for j in range(3):
            if abs(self.n[j]) < 1e-12:
                continue
            term = (p[j] - float(self.p[j])) * float(self.n[j])
            out = term if out is None else out + term
        return out


class _Union(_Shape):
    def __init__(self, *shapes: _Shape):
        self.shapes = shapes
        self.lo = np.min([s.lo for s in shapes], axis=0)
        self.hi = np.max([s.hi for s in shapes], axis=0)

    def depth(self, p: Coords) -> np.ndarray:
        out = self.shapes[0].depth(p)
        for s in self.shapes[1:]:
            out = np.maximum(out, s.depth(p))
        return out

    def eval_box(self, ctx: "_Ctx", sl: tuple[slice, slice, slice]) -> np.ndarray:
        out = np.full(ctx.sub_shape(sl), -ctx.floor_mm, dtype=ctx.dtype)
        for part in self.shapes:
            hit = ctx.overlap(sl, part.lo, part.hi)
            if hit is not None:
                np.maximum(out[hit[1]], part.eval_box(ctx, hit[0]), out=out[hit[1]])
        return out


class _Intersect(_Shape):
    """Inside all shapes; bounded by the first one."""

    def __init__(self, first: _Shape, *others: _Shape):
        self.shapes = (first, *others)
        self.lo, self.hi = first.lo, first.hi

    def depth(self, p: Coords) -> np.ndarray:
        out = self.shapes[0].depth(p)
        for s in self.shapes[1:]:
            out = np.minimum(out, s.depth(p))
        return out

    def eval_box(self, ctx: "_Ctx", sl: tuple[slice, slice, slice]) -> np.ndarray:
        out = np.array(self.shapes[0].eval_box(ctx, sl), dtype=ctx.dtype)
        for other in self.shapes[1:]:
            if not np.all(np.isfinite(other.lo)):  # unbounded (half-space): everywhere
                np.minimum(out, other.eval_box(ctx, sl), out=out)
                continue
            hit = ctx.overlap(sl, other.lo, other.hi)
            part = np.full(out.shape, -ctx.floor_mm, dtype=ctx.dtype)
            if hit is not None:
                part[hit[1]] = other.eval_box(ctx, hit[0])
            np.minimum(out, part, out=out)
        return out


class _Subtract(_Shape):
    """``keep`` minus ``cut`` (grown by ``gap`` mm)."""

    def __init__(self, keep: _Shape, cut: _Shape, gap: float = 0.0):
        self.keep, self.cut, self.gap = keep, cut, gap
        self.lo, self.hi = keep.lo, keep.hi

    def depth(self, p: Coords) -> np.ndarray:
        return np.minimum(self.keep.depth(p), -(self.cut.depth(p) + self.gap))

    def eval_box(self, ctx: "_Ctx", sl: tuple[slice, slice, slice]) -> np.ndarray:
        out = np.array(self.keep.eval_box(ctx, sl), dtype=ctx.dtype)
        hit = ctx.overlap(sl, self.cut.lo - self.gap, self.cut.hi + self.gap)
        if hit is not None:
            np.minimum(out[hit[1]], -(self.cut.eval_box(ctx, hit[0]) + self.gap), out=out[hit[1]])
        return out


def _framed(shape: _Shape, centre: Sequence[float], rot: np.ndarray) -> _Shape:
    """``shape`` (defined in a local frame) placed in the world, with the frame pushed down to the
    primitives so that composites keep per-part bounding boxes."""
    if isinstance(shape, _Union):
        return _Union(*(_framed(p, centre, rot) for p in shape.shapes))
    if isinstance(shape, _Intersect):
        return _Intersect(*(_framed(p, centre, rot) for p in shape.shapes))
    if isinstance(shape, _Subtract):
        return _Subtract(_framed(shape.keep, centre, rot), _framed(shape.cut, centre, rot), shape.gap)
    return _Framed(shape, centre, rot)


class _Framed(_Shape):
    """A shape defined in a local frame (origin ``centre``, axes = columns of ``rot``)."""

    def __init__(self, shape: _Shape, centre: Sequence[float], rot: np.ndarray):
        self.shape, self.c, self.rot = shape, np.asarray(centre, dtype=np.float64), rot
        lo, hi = shape.lo, shape.hi
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        world = corners @ rot.T + self.c
        self.lo, self.hi = world.min(0), world.max(0)

    def depth(self, p: Coords) -> np.ndarray:
        return self.shape.depth(self._local(p, self.c, self.rot))


class _Ctx:
    """Where shapes are evaluated: the grid (voxel -> anatomy affine), the dtype, and the depth
    floor: composites report at least ``-floor_mm`` and evaluate parts in boxes grown by it, so
    that values change smoothly at part-box edges (no false partial volume there)."""

    def __init__(self, affine: np.ndarray, shape: tuple[int, int, int], dtype: type, floor_mm: float):
        self.affine, self.inv = affine, np.linalg.inv(affine)
        self.shape, self.dtype, self.floor_mm = shape, dtype, floor_mm

    @staticmethod
    def sub_shape(sl: tuple[slice, ...]) -> tuple[int, int, int]:
        return tuple(x.stop - x.start for x in sl)  # type: ignore[return-value]

    def coords(self, sl: tuple[slice, slice, slice]) -> Coords:
        return _coords(self.affine, sl, self.dtype)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        return _subbox(np.asarray(lo) - self.floor_mm, np.asarray(hi) + self.floor_mm, self.inv, self.shape)

    def overlap(self, sl: tuple[slice, ...], lo: np.ndarray, hi: np.ndarray) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
        """(absolute, relative-to-sl) slices of the part of ``sl`` inside the grown box lo..hi."""
        other = self.box(lo, hi)
        if other is None:
            return None
        start = [max(a.start, b.start) for a, b in zip(sl, other)]
        stop = [min(a.stop, b.stop) for a, b in zip(sl, other)]
        if any(b <= a for a, b in zip(start, stop)):
            return None
        absolute = tuple(slice(a, b) for a, b in zip(start, stop))
        relative = tuple(slice(a - s.start, b - s.start) for a, b, s in zip(start, stop, sl))
        return absolute, relative


class _Bounded(_Shape):
    """A shape with an explicit (tighter or looser) bounding box."""

    def __init__(self, shape: _Shape, lo: Sequence[float], hi: Sequence[float]):
        self.shape = shape
        self.lo, self.hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)

    def depth(self, p: Coords) -> np.ndarray:
        return self.shape.depth(p)


class _Func(_Shape):
    """A custom depth function with a given box."""

    def __init__(self, fn: Callable[[Coords], np.ndarray], lo: Sequence[float], hi: Sequence[float]):
        self.fn = fn
        self.lo, self.hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)

    def depth(self, p: Coords) -> np.ndarray:
        return self.fn(p)


# ---------------------------------------------------------------------------------------------
# intensities

HUField = float | Callable[[Coords], np.ndarray]


class _Texture:
    """A smooth world-fixed intensity variation: a sum of a few plane waves (grid independent)."""

    def __init__(self, rng: np.random.Generator, amplitude_hu: float, wavelength_mm: tuple[float, float], waves: int = 5):
        dirs = rng.normal(size=(waves, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lam = rng.uniform(*wavelength_mm, size=waves)
        self.k = dirs * (2 * np.pi / lam)[:, None]
        self.phase = rng.uniform(0, 2 * np.pi, size=waves)
        self.amp = amplitude_hu / math.sqrt(waves / 2.0)

    def __call__(self, p: Coords) -> np.ndarray:
        out = 0.0
        for k, ph in zip(self.k.tolist(), self.phase.tolist()):
            out = out + np.cos(p[0] * k[0] + p[1] * k[1] + p[2] * k[2] + ph)
        return float(self.amp) * out


def _hu_field(base: float, texture: _Texture | None) -> HUField:
    base = float(base)
    if texture is None:
        return base
    return lambda p: base + texture(p)


@dataclass
class _Layer:
    """A layer of a structure: from ``depth_mm`` below its surface inwards (until the next layer)."""

    depth_mm: float | Callable[[Coords], np.ndarray]
    hu: HUField
    tissue: int


@dataclass
class _Structure:
    """A painted structure made of nested layers (fat over muscle over cavity; cortex over
    cancellous bone; kidney cortex over medulla ...).

    Bones (``label`` > 0) write their label where the voxel centre is inside, and are ramped with
    a normal-aware partial-volume width; soft structures use a fixed width.
    """

    name: str
    shape: _Shape
    layers: list[_Layer]
    label: int = 0
    kind: str = ""
    carve: list["_Structure"] = field(default_factory=list)
    carve_gap_mm: float = 1.5
    sublabel: Callable[[Coords], np.ndarray] | None = None  # bones split into two ids (S1/sacrum)
    fov: tuple[np.ndarray, np.ndarray] | None = None  # box used to size the default field of view


# ---------------------------------------------------------------------------------------------
# anatomy


@dataclass(frozen=True)
class _Level:
    rx: float  # vertebral body half width (mm, adult)
    ry: float  # half depth
    hh: float  # half height
    disc: float  # height of the disc below it
    tilt: float  # degrees; > 0 leans the top forward (lordosis)


_LEVELS: dict[str, _Level] = {
    "L5": _Level(25.0, 18.0, 13.5, 11.0, 20.0),
    "L4": _Level(24.5, 17.5, 13.5, 11.0, 10.0),
    "L3": _Level(24.0, 17.0, 13.0, 10.5, 2.0),
    "L2": _Level(23.0, 16.5, 12.5, 10.0, -3.0),
    "L1": _Level(22.0, 16.0, 12.5, 9.0, -6.0),
    "T12": _Level(20.0, 15.5, 12.0, 8.0, -8.0),
    "T11": _Level(18.5, 15.0, 11.5, 7.0, -9.0),
    "T10": _Level(17.0, 14.5, 11.0, 6.0, -10.0),
    "T9": _Level(16.0, 14.0, 10.5, 6.0, -10.0),
}
#: ribs (adult mm): end angle (degrees around the cage from posterior), drop from head to tip,
#: tube half thickness and half height
_RIBS: dict[int, tuple[float, float, float, float]] = {
    9: (150.0, 42.0, 3.6, 6.5),
    10: (140.0, 45.0, 3.5, 6.0),
    11: (105.0, 35.0, 3.3, 5.2),
    12: (78.0, 24.0, 3.0, 4.5),
}


@dataclass
class _Anatomy:
    region: str
    kinds: tuple[str, ...]
    scale: float
    contrast: str
    structures: list[_Structure]  # painting order; bones last
    offset_mm: np.ndarray  # anatomy -> world shift
    bone_lo: np.ndarray
    bone_hi: np.ndarray
    body_lo: np.ndarray
    body_hi: np.ndarray
    spine_xy: np.ndarray
    levels: tuple[str, ...]


class _AnatomyBuilder:
    """Draws one anatomy from the anatomy random stream. All lengths in millimetres."""

    def __init__(self, rng: np.random.Generator, region: str, kinds: tuple[str, ...]):
        self.rng = rng
        self.region = region
        self.kinds = kinds
        self.s = float(rng.uniform(0.8, 1.05))
        self.contrast = str(rng.choice(["native", "arterial", "portal"], p=[0.25, 0.35, 0.4]))
        self.oral_contrast = bool(rng.random() < 0.3)
        self.bones: list[_Structure] = []
        self.soft: list[_Structure] = []
        self.vertebrae: dict[str, dict[str, Any]] = {}  # bottom-up
        self.cage: dict[str, Any] | None = None  # rib cage ellipse (bounds the lungs)
        self.femur_heads: list[np.ndarray] = []
        self.hips: list[_Structure] = []
        # bone intensities of this "patient"
        u = rng.uniform
        self.cortical_hu = float(u(800, 1500))
        # cancellous HU from osteopenic to dense; cortical shells are thin (real vertebral and rib
        # shells are ~0.4-0.8 mm): at thick slices the cortex then averages out as in real CT
        self.cancellous = {
            "vertebra": u(100, 300),
            "rib": u(120, 300),
            "pelvis": u(100, 300),
            "femur": u(150, 380),
            "sacrum": u(80, 260),
        }
        self.cortex_mm = {"vertebra": u(0.5, 0.9), "rib": u(0.4, 0.8), "pelvis": u(0.6, 1.1), "sacrum": u(0.5, 0.9)}
        self.marrow_hu = float(u(-60, 40))
        self.bone_texture = lambda: _Texture(rng, float(u(20, 50)), (4.0, 14.0))

    # -- helpers -------------------------------------------------------------------------------

    def u(self, a: float, b: float) -> float:
        return float(self.rng.uniform(a, b))

    def bone(self, name: str, kind: str, shape: _Shape, cancellous: HUField, cortex_mm: float | Callable = 1.2, **kw: Any) -> _Structure:
        layers = [_Layer(0.0, self.cortical_hu * self.u(0.9, 1.1), _T["bone"]), _Layer(cortex_mm, cancellous, _T["bone"])]
        st = _Structure(name=name, shape=shape, layers=layers, label=TS_LABELS[name], kind=kind, **kw)
        self.bones.append(st)
        return st

    def soft_structure(
        self,
        name: str,
        shape: _Shape,
        hu: float,
        tissue: str,
        texture: float = 6.0,
        wall_mm: float = 0.0,
        wall_hu: float | None = None,
        wall_tissue: str | None = None,
    ) -> None:
        """A soft-tissue structure of ``hu`` (with a world-fixed texture of that amplitude),
        optionally inside a wall of ``wall_hu`` and ``wall_mm`` thickness."""
        tex = _Texture(self.rng, texture, (15.0, 60.0)) if texture > 0 else None
        inner = _Layer(wall_mm if wall_hu is not None else 0.0, _hu_field(hu, tex), _T[tissue])
        layers = [inner] if wall_hu is None else [_Layer(0.0, float(wall_hu), _T[wall_tissue or tissue]), inner]
        self.soft.append(_Structure(name, shape, layers))

    # -- spine -----------------------------------------------------------------------------------

    def build_spine(self, levels: Sequence[str], base: np.ndarray) -> None:
        """Stack vertebrae bottom-up from ``base`` (centre of the bottom disc's lower face)."""
        s = self.s
        draw = "vertebra" in self.kinds
        point = np.asarray(base, dtype=np.float64)
        prev_axis = None
        for name in levels:
            lv = _LEVELS[name]
            rx, ry, hh = lv.rx * s * self.u(0.95, 1.05), lv.ry * s * self.u(0.95, 1.05), lv.hh * s * self.u(0.95, 1.05)
            tilt = lv.tilt + self.u(-3, 3)
            rot = _rot(-tilt, self.u(-2.5, 2.5), self.u(-3, 3))  # lean about x; small bend and twist
            axis = rot[:, 2]
            gap = lv.disc * s * self.u(0.85, 1.15)
            disc_axis = axis if prev_axis is None else _unit(axis + prev_axis)
            lower_face = point + gap * disc_axis
            centre = lower_face + hh * axis
            # the disc below this vertebra (between the previous top face and this lower face)
            disc_rot = _rot(-math.degrees(math.atan2(disc_axis[1], disc_axis[2])), 0, 0)
            disc_centre = point + 0.5 * gap * disc_axis
            disc = _Cylinder(disc_centre, rx * 1.04, ry * 1.04, 0.5 * gap + 1.0, disc_rot)
            self.soft_structure(
                f"disc_below_{name}", disc, self.u(70, 95), "cartilage_disc", texture=5.0, wall_mm=3.0 * s, wall_hu=self.u(90, 115)
            )
            thoracic = name.startswith("T")
            v = self.vertebra_shape(name, rx, ry, hh, thoracic)
            framed = _framed(v["shape"], centre, rot)
            info = {"centre": centre, "rot": rot, "rx": rx, "ry": ry, "hh": hh, "frame": framed, **v}
            self.vertebrae[name] = info
            canal = _Framed(_Cylinder((0, v["vc"], 0), v["cx"], v["cy"], hh + gap), centre, rot)
            self.soft_structure(f"canal_{name}", canal, self.u(15, 35), "fluid", texture=3.0)
            if draw:
                tex = self.bone_texture()
                base_hu = self.cancellous["vertebra"] * self.u(0.9, 1.1)
                info["structure"] = self.bone(f"vertebrae_{name}", "vertebra", framed, _hu_field(base_hu, tex), self.cortex_mm["vertebra"])
            point = centre + hh * axis
            prev_axis = axis

    def vertebra_shape(self, name: str, rx: float, ry: float, hh: float, thoracic: bool) -> dict[str, Any]:
        """A vertebra in its local frame (u right, v anterior, w up), centred on its body."""
        s = self.s
        cx, cy = (9.0 if thoracic else 11.0) * s, 8.0 * s
        vc = -(ry + cy + 2.0 * s)  # canal centre (posterior of the body)
        body = _Cylinder((0, 0, 0), rx, ry, hh)
        parts: list[_Shape] = [body]
        arch_a, arch_b = cx + 4.0 * s, cy + 4.5 * s
        parts.append(_ArcTube((0, vc, -0.05 * hh), arch_a, arch_b, -np.pi - 0.35, 0.35, 3.2 * s, 0.75 * hh))
        sp_len, sp_drop, sp_h = (30.0 * s, 20.0 * s, 5.5 * s) if thoracic else (27.0 * s, 5.0 * s, 11.0 * s)
        sp_start = np.array([0.0, vc - arch_b + 1.0 * s, 0.0])
        parts.append(_Capsule(sp_start, sp_start + (0, -sp_len, -sp_drop), 3.2 * s, sp_h))
        facet_reach = hh + 0.5 * _LEVELS[name].disc * s + 2.0 * s
        for side in (-1.0, 1.0):
            pedicle_a, pedicle_b = (side * 0.6 * rx, -0.5 * ry, 0.15 * hh), (side * (cx + 2.5 * s), vc + 0.3 * cy, 0.15 * hh)
            parts.append(_Capsule(pedicle_a, pedicle_b, 4.5 * s, 6.5 * s))
            if thoracic:
                reach, dv, dw = (rx + (8.0 if name == "T12" else 20.0) * s, vc - 12.0 * s, 2.0 * s)
                tp_r = (4.0 * s, 5.0 * s)
            else:
                reach, dv, dw = (rx + 26.0 * s, vc + 3.0 * s, 0.0)
                tp_r = (3.5 * s, 5.0 * s)
            parts.append(_Capsule((side * (cx + 3.0 * s), vc + 1.0 * s, 0.1 * hh), (side * reach, dv, dw), *tp_r))
            # articular processes: superior pair lateral of the inferior pair of the level above
            sup = (side * (cx + 6.5 * s), vc - 2.0 * s)
            inf = (side * cx, vc - 6.0 * s)
            parts.append(_Capsule((*sup, 0.0), (*sup, facet_reach), 2.6 * s, 2.6 * s))
            parts.append(_Capsule((*inf, 0.0), (*inf, -facet_reach), 2.6 * s, 2.6 * s))
        canal = _Cylinder((0, vc, 0), cx, cy, 4 * hh)
        shape = _Subtract(_Union(*parts), canal)
        tip_v = vc - arch_b - sp_len - sp_h
        return {"shape": shape, "vc": vc, "cx": cx, "cy": cy, "tip_v": tip_v}

    # -- ribs --------------------------------------------------------------------------------------

    def build_ribs(self) -> None:
        s = self.s
        for name, v in self.vertebrae.items():
            if not name.startswith("T"):
                continue
            n = int(name[1:])
            if n not in _RIBS:
                continue
            end_deg, drop, rt, rh = _RIBS[n]
            c, rot, rx, ry, hh = v["centre"], v["rot"], v["rx"], v["ry"], v["hh"]
            A = (125.0 + 2.0 * (n - 9)) * s * self.u(0.93, 1.07)
            B = 95.0 * s * self.u(0.93, 1.07)
            self.cage = {"vertebra": v, "yc": c[1] + 46.0 * s, "A": A, "B": B}  # the last (highest) level wins
            for side, side_name in ((1.0, "right"), (-1.0, "left")):
                head = c + rot @ np.array([side * (0.84 * rx + 5.0 * s), -0.55 * ry, 0.3 * hh])
                phi0 = math.asin(min(0.95, (rx + 30.0 * s) / A))
                yc = c[1] + 46.0 * s
                start_z = head[2] + 3.0 * s
                # arc parameter t: posterior is -pi/2; right side runs towards 0, left towards -pi
                t0 = -np.pi / 2 + side * phi0
                t1 = -np.pi / 2 + side * math.radians(end_deg + self.u(-8, 8))
                d = drop * s * self.u(0.8, 1.2)
                shaft = _arc_tube((0.0, yc, start_z), A, B, t0, t1, rt * s, rh * s, d, taper=0.8, pieces=5)
                start = np.array([A * math.cos(t0), yc + B * math.sin(t0), start_z])
                neck = _Capsule(head, start, 3.3 * s, 4.5 * s)
                rib = _Union(neck, shaft)
                if "rib" in self.kinds:
                    tex = self.bone_texture()
                    st = self.bone(
                        f"rib_{side_name}_{n}", "rib", rib, _hu_field(self.cancellous["rib"] * self.u(0.9, 1.1), tex), self.cortex_mm["rib"]
                    )
                    st.carve = [vv["structure"] for vv in self.vertebrae.values() if "structure" in vv]
                if n <= 10:  # costal cartilage continues the rib towards the sternum (not bone)
                    t2 = t1 + side * math.radians(30.0)
                    z_end = start_z - d
                    cart = _arc_tube((0.0, yc, z_end), A * 0.98, B * 0.98, t1, t2, rt * s * 0.9, rh * s * 0.8, -8.0 * s, pieces=2)
                    self.soft_structure(f"cartilage_{side_name}_{n}", cart, self.u(100, 220), "cartilage_disc", texture=15.0)

    # -- pelvis and femurs -----------------------------------------------------------------------

    def build_pelvis(self, base: np.ndarray) -> None:
        """Sacrum (+S1), hips and femurs around the sacral base point ``base``."""
        s = self.s
        beta = math.radians(self.u(35, 45))  # sacral slope
        axis_down = np.array([0.0, -math.sin(beta), -math.cos(beta)])
        normal = np.array([0.0, math.cos(beta), -math.sin(beta)])
        rot = np.stack([np.array([-1.0, 0.0, 0.0]), normal, axis_down], axis=1)  # local u, n, t (right-handed)
        sacrum_local = _Subtract(
            _Union(
                _Cylinder((0, 0, 13.0 * s), 24.0 * s, 17.0 * s, 13.0 * s),
                _Ellipsoid((0, -8.0 * s, 25.0 * s), (52.0 * s, 17.0 * s, 26.0 * s)),
                _Ellipsoid((0, -12.0 * s, 62.0 * s), (30.0 * s, 12.0 * s, 40.0 * s)),
            ),
            _Cylinder((0, -22.0 * s, 40.0 * s), 9.0 * s, 5.0 * s, 60.0 * s),
        )
        sacrum = _framed(sacrum_local, base, rot)
        split_t = 24.0 * s

        def s1_label(p: Coords) -> np.ndarray:
            t = (p[0] - base[0]) * axis_down[0] + (p[1] - base[1]) * axis_down[1] + (p[2] - base[2]) * axis_down[2]
            return np.where(t < split_t, TS_LABELS["vertebrae_S1"], TS_LABELS["sacrum"])

        sac_st = None
        if "pelvis" in self.kinds:
            tex = self.bone_texture()
            sac_st = self.bone("sacrum", "pelvis", sacrum, _hu_field(self.cancellous["sacrum"], tex), self.cortex_mm["sacrum"], sublabel=s1_label)

        head_r = 23.0 * s * self.u(0.93, 1.07)
        joint = 2.5 * s
        for side, side_name in ((1.0, "right"), (-1.0, "left")):
            F = base + np.array([side * 88.0, 40.0, -95.0]) * s * np.array([self.u(0.95, 1.05), 1, self.u(0.95, 1.05)])
            femur = self.femur_shape(F, side, head_r)
            fem_st = None
            if "femur" in self.kinds:
                tex = self.bone_texture()
                z_n = femur["neck_base"][2]
                canc = self.cancellous["femur"] * self.u(0.9, 1.1)
                marrow = self.marrow_hu

                def interior(p: Coords, z_n: float = z_n, canc: float = canc, tex: _Texture = tex) -> np.ndarray:
                    t = np.clip((z_n - 25.0 * s - p[2]) / (40.0 * s), 0.0, 1.0)
                    return canc * (1.0 - t) + marrow * t + tex(p) * (1.0 - 0.7 * t)

                def cortex(p: Coords, z_n: float = z_n) -> np.ndarray:
                    t = np.clip((z_n - 25.0 * s - p[2]) / (40.0 * s), 0.0, 1.0)
                    return 1.0 + 4.0 * s * t  # thin at head and neck, ~4-5 mm along the shaft

                fov_lo = femur["shape"].lo.copy()
                fov_lo[2] = z_n - 50.0 * s  # the view ends just below the lesser trochanter
                fem_st = self.bone(f"femur_{side_name}", "femur", femur["shape"], interior, cortex, fov=(fov_lo, femur["shape"].hi))
            if "pelvis" in self.kinds:
                hip = self.hip_shape(F, side, head_r + joint, base)
                tex = self.bone_texture()
                hip_st = self.bone(f"hip_{side_name}", "pelvis", hip, _hu_field(self.cancellous["pelvis"], tex), self.cortex_mm["pelvis"])
                hip_st.carve = [c for c in (sac_st, fem_st) if c is not None]
                hip_st.carve_gap_mm = 2.5 * s
                self.hips.append(hip_st)
            self.femur_heads.append(F)

    def femur_shape(self, F: np.ndarray, side: float, head_r: float) -> dict[str, Any]:
        s = self.s
        neck_dir = _unit((side * 0.74, -0.12, -0.62))
        N = F + 48.0 * s * neck_dir
        head = _Ellipsoid(F, (head_r, head_r, head_r))
        neck = _Capsule(F, N, 13.0 * s, 15.5 * s, up=(0, 0, 1))
        greater = _Ellipsoid(N + np.array([side * 10.0, -10.0, 12.0]) * s, (13.0 * s, 16.0 * s, 20.0 * s))
        lesser = _Ellipsoid(N + np.array([-side * 14.0, -9.0, -30.0]) * s, (8.0 * s, 8.0 * s, 11.0 * s))
        top = N + np.array([side * 3.0, 0.0, 8.0]) * s
        bottom = top + np.array([-side * 0.14, 0.02, -1.0]) * 300.0 * s
        shaft = _Capsule(top, bottom, 14.0 * s, 14.0 * s)
        return {"shape": _Union(head, neck, greater, lesser, shaft), "neck_base": N}

    def hip_shape(self, F: np.ndarray, side: float, cup_r: float, base: np.ndarray) -> _Shape:
        """Os coxae: acetabular cup around the femoral head, iliac wing, pubic and ischial rami."""
        s = self.s
        cup_out = cup_r + 11.0 * s
        cup = _Intersect(
            _Subtract(_Ellipsoid(F, (cup_out, cup_out, cup_out)), _Ellipsoid(F, (cup_r, cup_r, cup_r))),
            _HalfSpace(F - 0.3 * cup_out * _unit((-side * 0.55, -0.15, 0.8)), (-side * 0.55, -0.15, 0.8)),
        )
        z_low, z_crest = F[2] + 18.0 * s, base[2] + self.u(30, 50) * s
        c_top = np.array([side * 45.0 * s, base[1] + 35.0 * s])
        c_bot = np.array([F[0] - side * 8.0 * s, F[1] - 12.0 * s])
        a_top, b_top, a_bot, b_bot = 66.0 * s, 56.0 * s, 26.0 * s, 22.0 * s
        th_top, th_bot = 8.0 * s, 16.0 * s
        # angles of the wing arc: from posteromedial (SI joint) through lateral to anterolateral
        if side > 0:
            t_lo, t_hi = math.radians(-110.0), math.radians(35.0)
        else:
            t_lo, t_hi = math.radians(145.0), math.radians(290.0)
        mid, half = 0.5 * (t_lo + t_hi), 0.5 * (t_hi - t_lo)

        def wing(p: Coords) -> np.ndarray:
            lam = np.clip((p[2] - z_low) / (z_crest - z_low), 0.0, 1.0)
            lam_c = lam**0.7
            cx = c_bot[0] + (c_top[0] - c_bot[0]) * lam_c
            cy = c_bot[1] + (c_top[1] - c_bot[1]) * lam_c
            a = a_bot + (a_top - a_bot) * lam
            b = b_bot + (b_top - b_bot) * lam
            th = th_bot + (th_top - th_bot) * lam
            qx, qy = p[0] - cx, p[1] - cy
            band = 0.5 * th - np.abs(_ellipse_depth(qx, qy, a, b))
            theta = np.arctan2(qy / b, qx / a)
            r_local = np.sqrt((a * np.cos(theta)) ** 2 + (b * np.sin(theta)) ** 2)
            ang = (half * (0.75 + 0.25 * lam) - np.abs(_wrap(theta - mid))) * r_local
            return np.minimum(np.minimum(band, ang), np.minimum(z_crest - p[2], p[2] - (z_low - 14.0 * s)))

        # The band is thin in a big box: cover it with cells (height x angle), each evaluating the
        # same function in its own tight box; the union of identical functions is the wing.
        cells = []
        lam_edges, ang_edges = np.linspace(0.0, 1.0, 4), np.linspace(t_lo, t_hi, 5)
        for l0, l1 in zip(lam_edges[:-1], lam_edges[1:]):
            for a0, a1 in zip(ang_edges[:-1], ang_edges[1:]):
                lam = np.linspace(l0, l1, 6)[:, None]
                ang = np.linspace(a0, a1, 9)[None, :]
                cx = c_bot[0] + (c_top[0] - c_bot[0]) * lam**0.7
                cy = c_bot[1] + (c_top[1] - c_bot[1]) * lam**0.7
                xs = cx + (a_bot + (a_top - a_bot) * lam) * np.cos(ang)
                ys = cy + (b_bot + (b_top - b_bot) * lam) * np.sin(ang)
                z0 = z_low + (z_crest - z_low) * l0 - (15.0 * s if l0 == 0.0 else 0.0)
                z1 = z_low + (z_crest - z_low) * l1
                pad = 0.5 * th_bot + 1.0
                cells.append(_Func(wing, (xs.min() - pad, ys.min() - pad, z0 - 1.0), (xs.max() + pad, ys.max() + pad, z1 + 1.0)))
        wing_shape = _Union(*cells)
        sym = np.array([side * 11.0 * s, F[1] + 55.0 * s, F[2] - 20.0 * s])
        isch = np.array([side * 52.0 * s, F[1] - 15.0 * s, F[2] - 62.0 * s])
        pubic_sup = _Capsule(F + np.array([-side * 18.0, 14.0, -4.0]) * s, sym, 8.5 * s, 10.0 * s)
        ischium = _Capsule(F + np.array([-side * 5.0, -18.0, -18.0]) * s, isch, 11.0 * s, 13.0 * s)
        ramus = _Capsule(isch + np.array([-side * 8.0, 8.0, 2.0]) * s, sym + np.array([0.0, -6.0, -18.0]) * s, 6.5 * s, 7.0 * s)
        return _Union(cup, wing_shape, pubic_sup, ischium, ramus)

    # -- soft tissue -------------------------------------------------------------------------------

    def build_soft_tissue(self, bone_lo: np.ndarray, bone_hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Body, fat, muscles, organs and vessels; returns the body's bounding box."""
        s, u = self.s, self.u
        verts = list(self.vertebrae.values())
        spine_y = float(np.mean([v["centre"][1] for v in verts]))
        z_lo, z_hi = bone_lo[2] - 60.0, bone_hi[2] + 60.0
        z_mid = 0.5 * (z_lo + z_hi)
        x_ext = max(abs(bone_lo[0]), abs(bone_hi[0]))
        ab = max(x_ext + u(20, 45) * s, u(125, 165) * s)
        y_post = min(bone_lo[1], min(v["centre"][1] + v["tip_v"] for v in verts)) - u(12, 30) * s
        y_ant = max(bone_hi[1] + u(15, 35) * s, spine_y + u(130, 175) * s)
        yb, bb = 0.5 * (y_post + y_ant), 0.5 * (y_ant - y_post)
        outline = _Intersect(
            _Cylinder((0.0, yb, z_mid), ab, bb, None),
            _HalfSpace((0.0, y_post + 0.1 * bb, 0.0), (0, 1, 0)),
        )
        fat = u(6, 30) * s
        muscle = u(7, 14) * s
        # table
        if self.rng.random() < 0.7:
            ty = y_post + 0.1 * bb - u(8, 20)
            table = _Slab(1, ty - 24.0, ty)
            self.soft_structure(
                "table", table, -750.0, "table", texture=0.0, wall_mm=2.0, wall_hu=u(150, 350), wall_tissue="table"
            )
        body_layers = [
            _Layer(0.0, u(-120, -80), _T["fat"]),
            _Layer(fat, u(35, 60), _T["muscle"]),
            _Layer(fat + muscle, _hu_field(u(-60, 0), _Texture(self.rng, 35.0, (15.0, 60.0))), _T["soft_tissue"]),
        ]
        self.soft.append(_Structure("body", outline, body_layers))
        ph = self.contrast
        def enh(native: float, arterial: float, portal: float) -> float:
            """HU of an enhancing structure in this contrast phase."""
            return native if ph == "native" else (arterial if ph == "arterial" else portal)

        enhanced = "enhanced" if ph != "native" else "soft_tissue"
        # paraspinal muscles: along the posterior column, lateral of the spinous processes
        top_v, bot_v = verts[-1], verts[0]
        for side in (-1.0, 1.0):
            pa = np.array([side * 28.0 * s, bot_v["centre"][1] - bot_v["ry"] - 40.0 * s, bot_v["centre"][2] - 40.0 * s])
            pb = np.array([side * 28.0 * s, top_v["centre"][1] - top_v["ry"] - 40.0 * s, top_v["centre"][2] + 40.0 * s])
            muscle_shape = _Capsule(pa, pb, 24.0 * s, 20.0 * s, up=(0, 1, 0))
            self.soft_structure("paraspinal", muscle_shape, u(40, 60), "muscle", texture=6.0)
        lumbar = [v for name, v in self.vertebrae.items() if name.startswith("L")]
        if lumbar:  # psoas: thin at L1, thick low down
            top, bot = lumbar[-1], lumbar[0]
            for side in (-1.0, 1.0):
                pa = bot["centre"] + np.array([side * (bot["rx"] + 18.0 * s), 5.0 * s, -30.0 * s])
                pb = top["centre"] + np.array([side * (top["rx"] + 8.0 * s), 0.0, 10.0 * s])
                muscle_shape = _Capsule(pa, pb, 18.0 * s, 16.0 * s, up=(0, 1, 0))
                self.soft_structure("psoas", muscle_shape, u(40, 55), "muscle", texture=5.0)
        # organs by level
        names = set(self.vertebrae)
        thoracic = bool(names & {"T9", "T10", "T11"})
        if thoracic or "T12" in names:
            ref = self.vertebrae.get("T11") or self.vertebrae.get("T12")
            c = ref["centre"]
            liver = _Ellipsoid(c + np.array([60.0, 60.0, -10.0]) * s, np.array([80, 70, 95]) * s)  # patient's right
            self.soft_structure("liver", liver, enh(u(55, 65), u(70, 85), u(100, 125)), "organ", texture=8.0)
            spleen = _Ellipsoid(c + np.array([-80.0, 15.0, -15.0]) * s, np.array([25, 45, 50]) * s, _rot(0, 0, -30))
            self.soft_structure("spleen", spleen, enh(u(40, 50), u(90, 130), u(105, 125)), "organ", texture=8.0)
        cage = self.cage
        if cage is not None:  # lung bases: inside the rib cage, beside the spine, above the diaphragm
            ref = cage["vertebra"]
            yc, A, B = cage["yc"], cage["A"], cage["B"]
            z_dome = ref["centre"][2] - u(55, 80) * s  # centre of the diaphragm dome ellipsoid
            top = bone_hi[2] + 60.0
            for side in (-1.0, 1.0):
                inside = _Intersect(
                    _Cylinder((0.0, yc, 0.0), A - 11.0 * s, B - 11.0 * s, None),
                    _HalfSpace((side * (ref["rx"] + 14.0 * s), 0.0, 0.0), (side, 0.0, 0.0)),
                    _HalfSpace((0.0, 0.0, z_dome - 15.0 * s), (0.0, 0.0, 1.0)),
                )
                dome = _Ellipsoid((side * 45.0 * s, yc + 25.0 * s, z_dome), (95.0 * s, 110.0 * s, 75.0 * s))
                lo = (min(side * (ref["rx"] + 14.0 * s), side * A), yc - B, z_dome - 16.0 * s)
                hi = (max(side * (ref["rx"] + 14.0 * s), side * A), yc + B, top)
                lung = _Bounded(_Subtract(inside, dome), lo, hi)
                self.soft_structure("lung", lung, u(-880, -820), "lung_gas", texture=25.0)
        kidney_levels = [n for n in ("L1", "L2", "T12") if n in names]
        if kidney_levels:
            c = self.vertebrae[kidney_levels[0]]["centre"]
            rx = self.vertebrae[kidney_levels[0]]["rx"]
            for side in (-1.0, 1.0):
                kc = c + np.array([side * (rx + 50.0 * s), 8.0 * s, (-10.0 if side > 0 else 5.0) * s])
                kidney = _Ellipsoid(kc, (24 * s, 19 * s, 52 * s), _rot(0, side * 15, side * 30))
                self.soft_structure(
                    "kidney", kidney, enh(u(25, 35), u(80, 120), u(130, 200)), "enhanced" if ph != "native" else "organ",
                    texture=10.0, wall_mm=6.0 * s, wall_hu=enh(u(25, 35), u(170, 260), u(150, 230)),
                )
        # bowel loops in the anterior cavity (not in purely thoracic sections)
        if self.region != "thoracic":
            for _ in range(int(self.rng.integers(3, 8))):
                bc = np.array([u(-0.6, 0.6) * ab, u(spine_y + 45 * s, y_ant - 35 * s), u(z_lo + 40, z_hi - 40)])
                r = u(12, 25) * s
                content = self.rng.choice(["gas", "fluid", "feces", "oral"], p=[0.35, 0.3, 0.2, 0.15])
                if content == "oral" and not self.oral_contrast:
                    content = "fluid"
                hu, tissue = {
                    "gas": (u(-980, -900), "lung_gas"),
                    "fluid": (u(0, 25), "fluid"),
                    "feces": (u(-120, 40), "soft_tissue"),
                    "oral": (u(200, 450), "enhanced"),
                }[content]
                loop = _Ellipsoid(bc, (r * u(0.8, 1.3), r, r * u(0.8, 1.6)), _rot(0, 0, u(0, 180)))
                self.soft_structure(
                    "bowel", loop, hu, tissue, texture=15.0, wall_mm=2.5 * s, wall_hu=u(30, 60), wall_tissue="soft_tissue"
                )
        # vessels: aorta (bifurcating at L4), IVC; aortic wall calcifications
        bottom_z, top_z = bone_lo[2] - 30.0, bone_hi[2] + 30.0
        ao_r = u(9, 12) * s
        ao_y = lambda v: v["centre"][1] + v["ry"] + ao_r + u(3, 8) * s  # noqa: E731
        ao_x = -(0.25 * verts[0]["rx"] + 6.0 * s)
        aorta_bottom = bottom_z
        if "L4" in names or "L5" in names:
            aorta_bottom = self.vertebrae["L4"]["centre"][2] if "L4" in names else self.vertebrae["L5"]["centre"][2] + 30 * s
        ay_lo, ay_hi = ao_y(verts[0]), ao_y(verts[-1])
        a_lo = np.array([ao_x, ay_lo, aorta_bottom])
        aorta = _Capsule(a_lo, (ao_x, ay_hi, top_z), ao_r, ao_r)
        art_hu = enh(u(35, 45), u(220, 350), u(150, 200))
        self.soft_structure("aorta", aorta, art_hu, enhanced, texture=4.0)
        if aorta_bottom > bottom_z:
            for side in (-1.0, 1.0):
                end = a_lo + np.array([side * 55.0 * s, 15.0 * s, -(aorta_bottom - bottom_z)])
                self.soft_structure("iliac_artery", _Capsule(a_lo, end, 0.6 * ao_r, 0.6 * ao_r), art_hu, enhanced, texture=4.0)
        ivc_x = 0.3 * verts[0]["rx"] + 12.0 * s
        ivc = _Capsule((ivc_x, ay_lo - 2 * s, bottom_z), (ivc_x, ay_hi - 2 * s, top_z), 12.0 * s, 9.0 * s, up=(0, 1, 0))
        self.soft_structure("ivc", ivc, enh(u(35, 45), u(80, 130), u(130, 170)), enhanced, texture=4.0)
        for _ in range(int(self.rng.choice([0, 0, 1, 2, 3]))):
            t = u(0.1, 0.9)
            ang = u(0, 2 * np.pi)
            on_axis = a_lo + t * (np.array([ao_x, ay_hi, top_z]) - a_lo)
            pc = on_axis + np.array([math.cos(ang), math.sin(ang), 0.0]) * ao_r * 0.9  # in the wall
            rr = u(1.2, 2.8)
            self.soft_structure("calcification", _Ellipsoid(pc, (rr, rr, rr * u(1, 2))), u(450, 900), "calcification", texture=0.0)
        if self.region in ("pelvis", "all"):
            F = self.femur_heads
            if F:
                mid = 0.5 * (F[0] + F[1])
                bladder = _Ellipsoid(mid + np.array([0.0, 30.0, 15.0]) * s, np.array([40, 30, 35]) * s)
                self.soft_structure(
                    "bladder", bladder, u(5, 15), "fluid", texture=2.0, wall_mm=2.5 * s, wall_hu=u(30, 50), wall_tissue="soft_tissue"
                )
                for side, Fh in zip((1.0, -1.0), F):
                    glut = _Ellipsoid(Fh + np.array([side * 15.0 * s, -60.0 * s, 30.0 * s]), (55 * s, 35 * s, 80 * s))
                    self.soft_structure("gluteus", glut, u(40, 60), "muscle", texture=6.0)
                    thigh_top, thigh_bottom = Fh + np.array([side * 15.0, 10.0, -30.0]) * s, Fh + np.array([side * 5.0, 10.0, -320.0]) * s
                    thigh = _Capsule(thigh_top, thigh_bottom, 45 * s, 45 * s)
                    self.soft_structure("thigh", thigh, u(40, 60), "muscle", texture=6.0)
        lo = np.array([-ab, y_post, z_lo])
        hi = np.array([ab, y_ant, z_hi])
        return lo, hi


def _resolve_kinds(kinds: Sequence[str] | None, rng: np.random.Generator) -> tuple[str, tuple[str, ...]]:
    """Region preset and kinds: drawn from the seed, or the smallest preset covering ``kinds``."""
    region = str(rng.choice(list(_REGION_WEIGHTS), p=list(_REGION_WEIGHTS.values())))
    if kinds is None:
        return region, tuple(REGIONS[region]["kinds"])
    wanted = []
    for k in kinds:
        k = "femur" if k == "long_bone" else k
        if k not in KINDS:
            raise ValueError(f"unknown phantom kind {k!r}; choose from {', '.join(KINDS)} (or long_bone)")
        if k not in wanted:
            wanted.append(k)
    if not wanted:
        raise ValueError("kinds must name at least one bone kind")
    has_rib = "rib" in wanted
    has_pelvic = bool({"pelvis", "femur"} & set(wanted))
    if has_rib and has_pelvic:
        region = "all"
    elif has_pelvic:
        region = "pelvis"
    elif has_rib:
        region = region if region in ("thoracic", "thoracolumbar") else "thoracolumbar"
    else:
        region = region if region in ("lumbar", "thoracolumbar", "thoracic") else "lumbar"
    return region, tuple(k for k in KINDS if k in wanted)


def _build_anatomy(seed: int, kinds: Sequence[str] | None) -> _Anatomy:
    rng = np.random.default_rng([int(seed), 1])
    region, kinds_t = _resolve_kinds(kinds, rng)
    b = _AnatomyBuilder(rng, region, kinds_t)
    levels = list(REGIONS[region]["levels"])
    if region == "lumbar" and rng.random() < 0.5:
        levels = ["L5", "L4", "L3", "L2"]
    base = np.zeros(3)
    if region in ("pelvis", "all"):
        b.build_pelvis(base)
    b.build_spine(levels, base)
    for hip in b.hips:  # the spine is built after the pelvis: keep a gap to L5's transverse processes too
        hip.carve += [v["structure"] for v in b.vertebrae.values() if "structure" in v]
    if any(lv.startswith("T") for lv in levels):
        b.build_ribs()
    # bounding box of the bones that size the field of view (all planned bones, drawn or not)
    boxes = [(st.fov if st.fov is not None else (st.shape.lo, st.shape.hi)) for st in b.bones]
    for v in b.vertebrae.values():  # vertebrae bound the view even when not drawn
        boxes.append((v["frame"].lo, v["frame"].hi))
    bone_lo = np.min([bx[0] for bx in boxes], axis=0)
    bone_hi = np.max([bx[1] for bx in boxes], axis=0)
    body_lo, body_hi = b.build_soft_tissue(bone_lo, bone_hi)
    offset = np.array([rng.uniform(-30, 30), rng.uniform(-40, 160), rng.uniform(-400, 200)])
    return _Anatomy(
        region=region,
        kinds=kinds_t,
        scale=b.s,
        contrast=b.contrast,
        structures=b.soft + b.bones,
        offset_mm=offset,
        bone_lo=bone_lo,
        bone_hi=bone_hi,
        body_lo=body_lo,
        body_hi=body_hi,
        spine_xy=np.mean([v["centre"][:2] for v in b.vertebrae.values()], axis=0),
        levels=tuple(levels),
    )


# ---------------------------------------------------------------------------------------------
# grid

_AXIS_OF = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}


def _check_orientation(orientation: str) -> str:
    code = str(orientation).upper()
    if len(code) != 3 or any(c not in _AXIS_OF for c in code) or len({_AXIS_OF[c][0] for c in code}) != 3:
        raise ValueError(
            f"orientation must be three axis codes, one of each of R/L, A/P, S/I (e.g. RAS, LPS, PIR); got {orientation!r}"
        )
    return code


def orientation_affine(orientation: str, spacing_mm: Sequence[float]) -> np.ndarray:
    """The 3x3 voxel -> RAS matrix of an axis-aligned grid: column a is ``spacing_mm[a]`` times
    the world direction named by letter a of ``orientation`` (nibabel axis codes)."""
    code = _check_orientation(orientation)
    m = np.zeros((3, 3))
    for a, letter in enumerate(code):
        w, sign = _AXIS_OF[letter]
        m[w, a] = sign * float(spacing_mm[a])
    return m


@dataclass
class _Grid:
    affine_anat: np.ndarray  # voxel -> anatomy coordinates
    shape: tuple[int, int, int]
    orientation: str
    oblique_deg: tuple[float, float, float]
    psf_mm: float
    noise_hu: float
    fov_mode: str


def _draw_grid(
    seed: int,
    anat: _Anatomy,
    shape: Sequence[int] | None,
    spacing_mm: Sequence[float] | None,
    orientation: str | None,
) -> _Grid:
    """Grid parameters from the grid stream; every value is drawn whether it is overridden or
    not, so that overriding one does not change the others."""
    rng = np.random.default_rng([int(seed), 2])
    drawn_orientation = str(rng.choice(ORIENTATIONS, p=_ORIENTATION_WEIGHTS))
    inplane, slice_sp = float(rng.uniform(0.6, 1.0)), float(rng.uniform(0.8, 3.0))
    oblique = bool(rng.random() < 0.3)
    angles = rng.uniform(-1.0, 1.0, size=3) * np.array([8.0, 4.0, 4.0]) * float(oblique)
    fov_fraction = float(rng.uniform(0.0, 1.0))
    fov_mode = str(rng.choice(["body", "bones", "spine"], p=[0.45, 0.3, 0.25]))
    margin_z = float(rng.uniform(4.0, 12.0))
    jitter = rng.uniform(-3.0, 3.0, size=3)
    psf_mm = float(rng.uniform(0.4, 0.8))
    noise_hu = float(rng.uniform(10.0, 30.0))

    code = _check_orientation(orientation) if orientation is not None else drawn_orientation
    world_axis = [_AXIS_OF[c][0] for c in code]  # world axis of each voxel axis
    voxel_axis = [world_axis.index(w) for w in range(3)]  # voxel axis of each world axis
    if spacing_mm is not None:
        sp = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
        if sp.size != 3 or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise ValueError(f"spacing_mm must be three positive numbers (voxel axes i, j, k), got {spacing_mm!r}")
    else:
        sp = np.array([(inplane, inplane, slice_sp)[world_axis[a]] for a in range(3)])

    # in-plane field of view (square, as CT reconstructions are): the whole body, the bones, or
    # a targeted spine view (which may cut lateral bones, as spine CT does)
    bone_ext = anat.bone_hi - anat.bone_lo
    body_ext = anat.body_hi - anat.body_lo
    l_bones = max(bone_ext[0], bone_ext[1]) + 20.0
    if fov_mode == "body":
        side = max(body_ext[0], body_ext[1]) + 5.0 + 20.0 * fov_fraction
    elif fov_mode == "bones":
        side = l_bones + 20.0 * fov_fraction
    else:
        side = min(l_bones, (140.0 + 70.0 * fov_fraction) * anat.scale)
    l_min = min(side, l_bones)
    fov_world = np.array([side, side, bone_ext[2] + 2.0 * margin_z])

    if shape is not None:
        n = np.asarray(shape, dtype=np.int64).reshape(-1)
        if n.size != 3 or np.any(n < 1):
            raise ValueError(f"shape must be three positive sizes, got {shape!r}")
        if spacing_mm is None:  # fit the default view into the given shape
            sp = np.array([fov_world[world_axis[a]] / n[a] for a in range(3)])
    else:
        def counts(fov: np.ndarray, spacing: np.ndarray) -> np.ndarray:
            return np.array([max(16, int(math.ceil(fov[world_axis[a]] / spacing[a]))) for a in range(3)])

        n = counts(fov_world, sp)
        if np.prod(n) > MAX_VOXELS:  # first shrink the in-plane view towards the bones
            shrink = math.sqrt(MAX_VOXELS / float(np.prod(n)))
            fov_world[:2] = np.maximum(l_min, fov_world[:2] * shrink)
            n = counts(fov_world, sp)
        if np.prod(n) > MAX_VOXELS and spacing_mm is None:
            # then coarsen: in-plane up to 1.5 mm (the model's spacing), slices up to 3 mm, then all
            inplane_axes = [a for a in range(3) if world_axis[a] != 2]
            slice_axis = [a for a in range(3) if world_axis[a] == 2]
            for axes, limit in ((inplane_axes, 1.5), (slice_axis, 3.0)):
                need = float(np.prod(n)) / MAX_VOXELS
                if need <= 1.0:
                    break
                f = need ** (1.0 / len(axes))
                for a in axes:
                    sp[a] = max(sp[a], min(limit, sp[a] * f * 1.01))
                n = counts(fov_world, sp)
            if np.prod(n) > MAX_VOXELS:  # finally shorten the scan range (cuts the end bones)
                fov_world[2] *= MAX_VOXELS / float(np.prod(n))
                n = counts(fov_world, sp)
        if np.prod(n) > MAX_VOXELS:  # a given spacing: crop the view instead
            f = (float(np.prod(n)) / MAX_VOXELS) ** (1.0 / 3.0)
            n = np.maximum(16, np.floor(n / f)).astype(np.int64)
    fov_actual = np.array([n[voxel_axis[w]] * sp[voxel_axis[w]] for w in range(3)])

    bone_c = 0.5 * (anat.bone_lo + anat.bone_hi)
    body_c = 0.5 * (anat.body_lo + anat.body_hi)
    centre = bone_c.copy()
    if fov_mode == "spine":
        centre[:2] = anat.spine_xy + np.array([0.0, 15.0 * anat.scale])
    else:
        for w in range(2):  # prefer the body centre while the bones stay in view
            lo_ok = anat.bone_hi[w] + 8.0 - 0.5 * fov_actual[w]
            hi_ok = anat.bone_lo[w] - 8.0 + 0.5 * fov_actual[w]
            if lo_ok <= hi_ok:
                centre[w] = float(np.clip(body_c[w] if fov_mode == "body" else bone_c[w], lo_ok, hi_ok))
    centre = centre + jitter

    m = _rot(*angles) @ orientation_affine(code, sp)
    affine = np.eye(4)
    affine[:3, :3] = m
    affine[:3, 3] = centre - m @ ((n.astype(np.float64) - 1.0) / 2.0)
    return _Grid(affine, tuple(int(v) for v in n), code, tuple(float(a) for a in angles), psf_mm, noise_hu, fov_mode)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# rendering


def _subbox(lo: np.ndarray, hi: np.ndarray, inv_affine: np.ndarray, shape: tuple[int, ...]) -> tuple[slice, slice, slice] | None:
    """Voxel index slices covering a world box (None when it misses the grid)."""
    lo = np.maximum(lo, -1e6)
    hi = np.minimum(hi, 1e6)
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    ijk = corners @ inv_affine.T
    a = np.floor(ijk[:, :3].min(0)).astype(np.int64) - 1
    b = np.ceil(ijk[:, :3].max(0)).astype(np.int64) + 2
    a = np.maximum(a, 0)
    b = np.minimum(b, np.asarray(shape))
    if np.any(b <= a):
        return None
    return tuple(slice(int(x), int(y)) for x, y in zip(a, b))  # type: ignore[return-value]


def _coords(affine: np.ndarray, sl: tuple[slice, slice, slice], dtype: type) -> Coords:
    """Anatomy coordinates of the voxel centres of a sub-box, as three full arrays."""
    idx = [np.arange(s.start, s.stop, dtype=dtype) for s in sl]
    axes = (idx[0][:, None, None], idx[1][None, :, None], idx[2][None, None, :])
    out = []
    for r in range(3):
        terms = [float(affine[r, a]) * axes[a] for a in range(3) if abs(affine[r, a]) > 1e-12]
        arr = terms[0] + float(affine[r, 3])  # only the voxel axes this world axis depends on
        for t in terms[1:]:
            arr = arr + t
        out.append(arr)
    return tuple(out)  # type: ignore[return-value]


def _ramp_width(d: np.ndarray, min_mm: float, max_mm: float) -> np.ndarray | float:
    """Extent of a voxel along the surface normal, from the depth's change per voxel step.

    For a depth field with unit gradient and normal n, the change per index step along axis a is
    spacing_a * (n . axis_a); the root sum of squares is the voxel's width across the surface
    (the slice spacing for an end plate, the pixel size for a lateral wall)."""
    if min(d.shape) < 2:
        return max_mm
    g = np.gradient(d)
    return np.clip(np.sqrt(g[0] ** 2 + g[1] ** 2 + g[2] ** 2), min_mm, max_mm)


def _eval(field_: HUField | float, p: Coords) -> np.ndarray | float:
    return field_(p) if callable(field_) else field_


def _paint(
    st: _Structure,
    ctx: _Ctx,
    hu: np.ndarray,
    tissue: np.ndarray,
    labels: np.ndarray,
    best: np.ndarray,
    ramp_mm: tuple[float, float, float],
) -> None:
    """Composite one structure into the HU, tissue and label arrays (in place).

    With f_i the partial-volume occupancy of layer i (depth beyond the layer's start, ramped over
    the voxel width): HU = previous * (1 - f_0) + sum_i HU_i * (f_i - f_(i+1)). Bones use a
    normal-aware ramp width (``ramp_mm`` = min, max) and write their label where the voxel centre
    is inside and deeper than in any bone painted before; soft structures use a fixed width
    (``ramp_mm[2]``).
    """
    sl = ctx.box(st.shape.lo, st.shape.hi)
    if sl is None:
        return
    sub_shape = ctx.sub_shape(sl)
    is_bone = st.label > 0
    d = st.shape.eval_box(ctx, sl)
    if st.carve:
        d = np.array(d)
    if st.carve:
        # Keep a joint space to neighbouring bones: depth <= -(neighbour depth + gap). The term
        # only matters where it is below the cortex plus a voxel; it is capped at ``cap`` and the
        # neighbour is evaluated with a floor beyond it, so box edges leave no seams.
        starts = [lay.depth_mm for lay in st.layers]
        cortex = max(float(v) for v in starts) if not any(callable(v) for v in starts) else 6.0
        cap = cortex + ramp_mm[1] + 1.0
        ctx_carve = _Ctx(ctx.affine, ctx.shape, ctx.dtype, cap + st.carve_gap_mm + 1.0)
        for other in st.carve:
            hit = ctx_carve.overlap(sl, other.shape.lo - st.carve_gap_mm, other.shape.hi + st.carve_gap_mm)
            if hit is not None:
                term = np.minimum(-(other.shape.eval_box(ctx_carve, hit[0]) + st.carve_gap_mm), cap)
                np.minimum(d[hit[1]], term, out=d[hit[1]])
    width: np.ndarray | float = _ramp_width(d, ramp_mm[0], ramp_mm[1]) if is_bone else ramp_mm[2]
    f_in = np.clip(0.5 + d / width, 0.0, 1.0)
    touched_mask = f_in > 0.0
    n_touched = int(np.count_nonzero(touched_mask))
    if n_touched == 0:
        return
    if n_touched < 0.4 * f_in.size:  # sparse: work on the touched voxels only
        sel: Any = np.nonzero(touched_mask)
        p = ctx.coords(sl)
        pt = tuple(np.broadcast_to(c, sub_shape)[sel] for c in p)
        d_t, f_t = d[sel], f_in[sel]
        w_t = width[sel] if isinstance(width, np.ndarray) else width
    else:
        sel = (slice(None),) * 3
        pt, d_t, f_t, w_t = ctx.coords(sl), d, f_in, width
    hu_sub = hu[sl]
    new = hu_sub[sel] * (1.0 - f_t)
    tis = np.array(np.broadcast_to(tissue[sl][sel], d_t.shape))
    for i, layer in enumerate(st.layers):
        start = _eval(layer.depth_mm, pt)
        start = float(start) if np.ndim(start) == 0 else start
        f_next = f_t if i == 0 else np.clip(0.5 + (d_t - start) / w_t, 0.0, 1.0)
        if i > 0:
            new = new - _eval(st.layers[i - 1].hu, pt) * f_next
        new = new + _eval(layer.hu, pt) * f_next
        tis[d_t > start] = layer.tissue
    hu_sub[sel] = new
    tissue[sl][sel] = tis
    if is_bone:
        b_sub, l_sub = best[sl], labels[sl]
        win = (d_t > 0.0) & (d_t > b_sub[sel])
        if np.any(win):
            idx = tuple(t[win] for t in sel) if isinstance(sel, tuple) and isinstance(sel[0], np.ndarray) else np.nonzero(win)
            if st.sublabel is not None:
                lab = st.sublabel(tuple(np.broadcast_to(c, sub_shape)[idx] for c in ctx.coords(sl)))
            else:
                lab = st.label
            l_sub[idx] = lab
            b_sub[idx] = d[idx]


def _noise_gain(sigmas: Sequence[float], truncate: float) -> float:
    """Standard deviation of unit white noise after ``gaussian_filter`` with these sigmas."""
    from scipy.ndimage import gaussian_filter1d

    gain = 1.0
    for s in sigmas:
        if s <= 0:
            continue
        r = int(truncate * s + 0.5)
        delta = np.zeros(2 * r + 1)
        delta[r] = 1.0
        gain *= float(np.sqrt((gaussian_filter1d(delta, s, truncate=truncate, mode="constant") ** 2).sum()))
    return gain


def _render(anat: _Anatomy, grid: _Grid, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from scipy.ndimage import gaussian_filter

    shape = grid.shape
    hu = np.full(shape, -1000.0, dtype=np.float32)
    tissue = np.zeros(shape, dtype=np.uint8)
    labels = np.zeros(shape, dtype=np.uint8)
    best = np.zeros(shape, dtype=np.float32)
    spacing = np.sqrt((grid.affine_anat[:3, :3] ** 2).sum(axis=0))
    ramp_mm = (0.25 * float(spacing.min()), float(spacing.max()), float(np.median(spacing)))
    floor_mm = 2.0 * float(spacing.max()) + 1.0
    ctx_bone = _Ctx(grid.affine_anat, shape, np.float64, floor_mm)
    ctx_soft = _Ctx(grid.affine_anat, shape, np.float32, floor_mm)
    for st in anat.structures:
        _paint(st, ctx_bone if st.label > 0 else ctx_soft, hu, tissue, labels, best, ramp_mm)
    # acquisition: point-spread function and (correlated) noise
    rng = np.random.default_rng([int(seed), 3])
    truncate = 3.0
    sigmas = [grid.psf_mm / s if grid.psf_mm / s > 0.15 else 0.0 for s in spacing]
    gain = _noise_gain(sigmas, truncate)
    hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(grid.noise_hu / gain)
    hu = gaussian_filter(hu, sigmas, mode="nearest", truncate=truncate)
    ct = np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16)
    return ct, labels, tissue


# ---------------------------------------------------------------------------------------------
# public API

_NAME_OF = {v: k for k, v in TS_LABELS.items()}


def make_phantom(
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    spacing_mm: tuple[float, float, float] | None = None,
    orientation: str | None = None,
    kinds: Sequence[str] | None = None,
) -> Phantom:
    """Make a synthetic CT with exact bone labels, deterministically from ``seed``.

    Args:
        seed: non-negative integer; the anatomy, the grid and the noise each use their own
            stream derived from it.
        shape: voxels along i, j, k. Default: the field of view divided by the spacing. The
            view covers the bones' height plus a margin and, in-plane, a seeded choice of the
            whole body, the bones, or a targeted spine view. Default grids stay under
            ``MAX_VOXELS``: the in-plane view shrinks towards the bones, then the spacing coarsens
            (in-plane up to 1.5 mm, slices up to 3 mm), then the scan range shortens.
        spacing_mm: voxel size along i, j, k. Default: in-plane 0.6-1.0 mm on the two voxel
            axes that run along R/L and A/P, 0.8-3.0 mm on the axis along S/I (axial slices);
            with ``shape`` given, the default view divided by ``shape``. A given spacing without
            a shape keeps the view but crops it (centred) to ``MAX_VOXELS``.
        orientation: nibabel axis codes of the storage order (``RAS``, ``LPS``, ``PIR`` ...).
            Default: drawn from ``ORIENTATIONS``; with probability 0.3 the grid is also rotated
            obliquely by up to 8 degrees (through the affine, like every orientation change).
        kinds: bone kinds to include (``KINDS``; ``long_bone`` = ``femur``). Default: a region
            preset drawn from the seed with all its kinds. Given kinds select the smallest
            preset holding them and leave the other kinds' bones out (soft tissue stays).

    Returns:
        A ``Phantom``: int16 CT, uint8 labels and tissue map on one grid, the bones present.
    """
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    anat = _build_anatomy(int(seed), kinds)
    grid = _draw_grid(int(seed), anat, shape, spacing_mm, orientation)
    ct, labels, tissue = _render(anat, grid, int(seed))
    affine = grid.affine_anat.copy()
    affine[:3, 3] += anat.offset_mm
    counts = np.bincount(labels.ravel(), minlength=256)
    kind_of = {st.label: st.kind for st in anat.structures if st.label > 0}
    if kind_of.get(TS_LABELS["sacrum"]):
        kind_of[TS_LABELS["vertebrae_S1"]] = kind_of[TS_LABELS["sacrum"]]
    present = [int(lab) for lab in np.flatnonzero(counts[1:]) + 1]
    objects = [PhantomObject(lab, _NAME_OF[lab], kind_of[lab], int(counts[lab])) for lab in present]
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    info = {
        "region": anat.region,
        "kinds": list(anat.kinds),
        "levels": list(anat.levels),
        "scale": round(anat.scale, 4),
        "contrast": anat.contrast,
        "shape": list(grid.shape),
        "spacing_mm": [round(float(s), 5) for s in spacing],
        "orientation": grid.orientation,
        "oblique_deg": [round(a, 3) for a in grid.oblique_deg],
        "psf_mm": round(grid.psf_mm, 3),
        "noise_hu": round(grid.noise_hu, 2),
        "fov_mode": grid.fov_mode,
    }
    ct_vol = Volume(ct, affine, None, None, {"phantom": info})
    return Phantom(
        ct=ct_vol,
        labels=Volume(labels, affine.copy(), None, None, {"phantom": info}),
        objects=objects,
        label_names={o.label: o.name for o in objects},
        tissue=Volume(tissue, affine.copy(), None, None, {"tissue_names": TISSUE_NAMES}),
        region=anat.region,
        seed=int(seed),
        info=info,
    )


def phantom_clicks(phantom: Phantom, per_object: int = 1, seed: int = 0) -> dict[int, list[tuple[int, int, int]]]:
    """Interior voxel clicks for every object: first its deepest voxel (largest distance to the
    border in millimetres, ``clicks.first_click``), then ``per_object - 1`` distinct voxels drawn
    uniformly among those at least half that deep (deterministic from ``seed``).

    Returns {label id: [(i, j, k), ...]} in voxel indices of ``phantom.labels``.
    """
    from scipy import ndimage

    from .clicks import border_edt

    if per_object < 1:
        raise ValueError("per_object must be >= 1")
    rng = np.random.default_rng([int(seed), 4])
    labels = phantom.labels.array
    spacing = phantom.labels.spacing_mm
    boxes = ndimage.find_objects(labels)
    out: dict[int, list[tuple[int, int, int]]] = {}
    for obj in phantom.objects:
        box = boxes[obj.label - 1]
        if box is None:
            continue
        offset = np.array([s.start for s in box])
        dist = border_edt(labels[box] == obj.label, spacing)
        flat = dist.ravel()
        order = [int(np.argmax(flat))]
        if per_object > 1:
            pool = np.flatnonzero(flat >= 0.5 * flat[order[0]])
            pool = pool[pool != order[0]]
            take = min(per_object - 1, pool.size)
            order += [int(v) for v in rng.choice(pool, size=take, replace=False)]
        out[obj.label] = [tuple(int(v) for v in np.unravel_index(f, dist.shape) + offset) for f in order]  # type: ignore[misc]
    return out


def _write_phantom_case(root: Path, sd: int, kwargs: dict[str, Any]) -> None:
    from .volume import write_label_map, write_volume

    ph = make_phantom(sd, **kwargs)
    write_volume(ph.ct.array, ph.ct, root / "imagesTr" / f"phantom_{sd:05d}_0000.nii.gz")
    write_label_map(ph.labels.array, ph.labels, root / "labelsTr" / f"phantom_{sd:05d}.nii.gz")


def write_phantom_dataset(root: str | os.PathLike, seeds: Sequence[int] | int, jobs: int = 1, **kwargs: Any) -> Path:
    """Write phantoms as an nnU-Net-style dataset: ``imagesTr/phantom_NNNNN_0000.nii.gz``,
    ``labelsTr/phantom_NNNNN.nii.gz`` and ``dataset.json`` (label names -> TotalSegmentator
    ids). ``seeds``: a list of seeds, or a count (seeds 0..n-1). ``jobs`` > 1 makes that many
    phantoms at once in worker processes (each phantom depends on its seed alone, so the files
    are the same). ``kwargs`` go to ``make_phantom``. Returns ``root``."""
    root = Path(root)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    if jobs > 1 and len(seed_list) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for f in [pool.submit(_write_phantom_case, root, sd, kwargs) for sd in seed_list]:
                f.result()
    else:
        for sd in seed_list:
            _write_phantom_case(root, sd, kwargs)
    dataset = {
        "name": "bosam_phantoms",
        "description": "Synthetic CT phantoms with exact bone labels (bosam_cli.phantom)",
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **dict(sorted(TS_LABELS.items(), key=lambda kv: kv[1]))},
        "numTraining": len(seed_list),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return root
