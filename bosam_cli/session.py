"""Interactive session: a CT -> model windows -> cached embeddings -> clicks -> masks.

The only stateful object of inference. Verbs: ``set_volume``, ``add_click``, ``undo``,
``reset``, ``mask``, ``label_map``.

How an object is segmented:

* Its first positive click opens a window centred on it (snapped to a world lattice so that
  nearby objects share windows and cached embeddings).
* Every click is one decoder call per window that contains it: the new point alone, with that
  window's previous low-res logits as the mask prompt (zeros for a window's first call), which
  is how the published weights were trained.
* When the mask touches a window face (inside the CT), the object grows into the neighbour
  window half a window further along that axis (50 % overlap). The neighbour is seeded with a
  positive point at the deepest voxel of the known mask inside it, then gets the object's
  clicks that fall inside it, in order; a piece of the known mask inside it that the
  neighbour's mask still leaves out (a branch) gets a seed of its own (up to two more). When
  the neighbour already exists and the mask reaching it is new to it, it gets such a seed
  too (once per click), or blending the two windows would erase that mask in their overlap.
  A grown window is dropped again when no remaining window's mask touches a face it shares
  with it (e.g. after a negative click removed a leak), unless a positive click of the user
  lies in it. At most ``max_windows`` windows per object.
* Logits of overlapping windows are blended on the CT grid with weights that ramp up from each
  window face, then thresholded at 0.
* Islands (``islands="clicked"``, the default): of the thresholded mask, only the connected
  pieces (26-connectivity) that hold one of the object's positive clicks are kept, or, for a
  click just outside the mask, the pieces within one model output voxel of it (the low-res
  logits' spacing, 6 mm for 128^3 windows at 1.5 mm; at least one CT voxel); detached
  blobs elsewhere (typically on a neighbouring bone) are dropped. When no positive click is on
  or next to the mask, the mask is kept whole. ``islands="all"`` keeps every piece.
* Surface refinement (``refine="hu"``, the default), before the islands rule: the masks come
  from low-res logits (6 mm voxels), so their surface takes in a rim of whatever lies next to
  the bone. Of the voxels within one model output voxel of the outside (per axis: a cube of
  +-6 mm), those below ``refine_hu`` (75 HU: fat, fluid, muscle; cortical bone is hundreds
  of HU) that are not enclosed by bone and connect to the outside through such voxels are
  removed. Enclosed: bone-like HU (150 or more) within 30 mm along at least five of the six
  axis directions, which is what fatty marrow sees where a partial mask cuts through a bone or
  a 3 mm CT does not resolve its cortex, and what a soft-tissue rim outside a bone does not.
  The outside is the non-mask voxels and the box faces inside the CT, less the CT's own edge
  (a bone cut by the field of view goes on there) and less the marrow of a shaft (bone on both
  sides along two axes) that the mask stops part-way along: the ring of marrow inside a long
  bone's cortex is a rim along the whole shaft, which peeling from the cut would hollow out.
  Marrow behind an intact cortex is not reached anyway, deeper voxels are never touched, and a
  piece holding a positive click stays. ``refine="none"`` keeps the model's mask as it is.

Overlap rule between objects: a voxel claimed by several objects goes to the one with the
highest blended logit there; exact ties go to the object created first.
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .volume import Volume, label_dtype
from .windows import (
    DEFAULT_SPACING_MM,
    Intensity,
    WindowGeometry,
    box_of,
    logits_to_grid,
    lowres_positive_extent,
    window_at,
    window_image,
)


@dataclass
class SessionClick:
    """A click as the session keeps it: world RAS mm and voxel of the CT, sign."""

    ras: np.ndarray
    ijk: np.ndarray
    positive: bool


@dataclass
class WindowState:
    geom: WindowGeometry
    logits: np.ndarray  # (M, M, M) float32 low-res logits
    parent: tuple | None = None  # key of the window it grew from (None: opened by a click)
    decoder_calls: int = 0


@dataclass
class ObjectState:
    label: int
    name: str
    clicks: list[SessionClick] = field(default_factory=list)
    windows: list[WindowState] = field(default_factory=list)
    truncated: bool = False

    def window_keys(self) -> list[tuple]:
        return [w.geom.key for w in self.windows]


@dataclass
class ClickReport:
    """What one click cost and changed (printed by the interactive session)."""

    label: int
    positive: bool
    decoder_calls: int = 0
    encoder_calls: int = 0
    decoder_s: float = 0.0
    encoder_s: float = 0.0
    sample_s: float = 0.0
    windows: int = 0
    new_windows: int = 0
    voxels: int = 0
    note: str = ""
    #: most clicks left out of one decoder call: the engine's point limit (click memory "all")
    dropped_clicks: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


#: how decoder calls get an object's clicks (see ``Session``); train.py's --click-memory
CLICK_MEMORIES = ("newest", "all")
#: which connected pieces of an object's mask are kept (see the module docstring)
ISLANDS = ("clicked", "all")
#: surface refinement of an object's mask (see the module docstring)
REFINES = ("hu", "none")
#: below this HU a voxel at the mask's surface counts as soft tissue (``refine="hu"``)
REFINE_HU = 75.0
#: a surface voxel with bone-like HU (this or more) within ENCLOSED_MM along at least
#: ENCLOSED_DIRECTIONS of the six axis directions is enclosed by bone (marrow): never peeled
ENCLOSED_HU = 150.0
ENCLOSED_MM = 30.0
ENCLOSED_DIRECTIONS = 5


class Session:
    """Segment objects in one CT from clicks.

    Args:
        engine: anything with the engine contract (``engines.base``): ``encode``, ``decode``,
            ``info`` (``img_size``, ``mask_size``).
        spacing_mm: model window spacing (1.5 mm for the published weights).
        intensity: clamp and padding of the CT before z-scoring.
        max_windows: windows per object at most (growth stops there; the object is marked
            truncated).
        grow: grow objects into neighbour windows when their mask touches a face.
        snap_vox: lattice (in window voxels) that window centres snap to; 0 centres exactly.
        ramp_vox: width of the blending ramp at window faces, in window voxels.
        cache_size: image embeddings kept (LRU).
        click_memory: "newest": each decoder call gets the click just made and the window's
            previous logits (the published models' loop); "all": every click of the object that
            lies in the window (newest last, at most the engine's ``max_points``) with the
            previous logits, for models trained that way (their checkpoint says so).
        islands: "clicked" keeps the connected pieces of each mask that hold a positive click
            (module docstring); "all" keeps every piece. The decoder's own state (the low-res
            logits fed back as mask prompts) is the same either way.
        refine: "hu" peels the soft-tissue rim off each mask's surface (module docstring);
            "none" keeps the thresholded logits. Like islands, it leaves the decoder's state
            alone.
        refine_hu: the HU below which ``refine="hu"`` peels.
    """

    def __init__(
        self,
        engine: Any,
        spacing_mm: float = DEFAULT_SPACING_MM,
        intensity: Intensity = Intensity(),
        max_windows: int = 8,
        grow: bool = True,
        snap_vox: int = 16,
        ramp_vox: float = 16.0,
        cache_size: int = 32,
        measure_clicks: bool = True,
        click_memory: str = "newest",
        islands: str = "clicked",
        refine: str = "hu",
        refine_hu: float = REFINE_HU,
    ) -> None:
        if click_memory not in CLICK_MEMORIES:
            raise ValueError(f"click_memory must be one of {', '.join(CLICK_MEMORIES)}, not {click_memory!r}")
        if islands not in ISLANDS:
            raise ValueError(f"islands must be one of {', '.join(ISLANDS)}, not {islands!r}")
        if refine not in REFINES:
            raise ValueError(f"refine must be one of {', '.join(REFINES)}, not {refine!r}")
        if not np.isfinite(refine_hu):
            raise ValueError(f"refine_hu must be a finite number of HU, not {refine_hu!r}")
        self.islands = islands
        self.refine = refine
        self.refine_hu = float(refine_hu)
        self.engine = engine
        self.click_memory = click_memory
        self.max_points = getattr(engine, "max_points", None)
        self.spacing_mm = float(spacing_mm)
        self.intensity = intensity
        self.max_windows = int(max_windows)
        self.grow = grow
        self.snap_vox = int(snap_vox)
        self.ramp_vox = float(ramp_vox)
        self.cache_size = int(cache_size)
        self.measure_clicks = measure_clicks
        self.size = int(engine.info.img_size)
        self.mask_size = int(engine.info.mask_size)
        self.volume: Volume | None = None
        self.objects: "OrderedDict[int, ObjectState]" = OrderedDict()
        self._embeddings: "OrderedDict[tuple, Any]" = OrderedDict()
        self._history: list[tuple[int, ObjectState | None]] = []
        self._grid_cache: dict[int, tuple] = {}
        self.timings: dict[str, float] = {"encoder_s": 0.0, "decoder_s": 0.0, "sample_s": 0.0, "map_back_s": 0.0}
        self.counts: dict[str, int] = {"encoder_calls": 0, "decoder_calls": 0}

    # -- verbs ----------------------------------------------------------------------------------
    def set_volume(self, volume: Volume) -> None:
        """Start on a new CT: forgets objects, clicks and cached embeddings."""
        self.volume = volume
        self.objects.clear()
        self._embeddings.clear()
        self._history.clear()
        self._grid_cache.clear()

    def add_object(self, label: int, name: str | None = None) -> ObjectState:
        if label < 1:
            raise ValueError("object labels must be >= 1")
        if label not in self.objects:
            self.objects[label] = ObjectState(label, name or f"object_{label}")
        elif name:
            self.objects[label].name = name
        return self.objects[label]

    def add_click(
        self,
        label: int,
        xyz: np.ndarray | None = None,
        voxel: np.ndarray | None = None,
        positive: bool = True,
        name: str | None = None,
    ) -> ClickReport:
        """Add one click to object ``label`` at world RAS mm ``xyz`` or CT voxel ``voxel``."""
        vol = self._need_volume()
        if (xyz is None) == (voxel is None):
            raise ValueError("give exactly one of xyz (RAS mm) or voxel (i, j, k)")
        if xyz is None:
            ijk = np.asarray(voxel, dtype=np.float64).reshape(3)
            ras = vol.voxel_to_world(ijk)[0]
        else:
            ras = np.asarray(xyz, dtype=np.float64).reshape(3)
            ijk = vol.world_to_voxel(ras)[0]
        if not vol.contains_voxel(ijk)[0]:
            raise ValueError(f"click at voxel {np.round(ijk, 2).tolist()} lies outside the volume {vol.shape}")
        existed = label in self.objects
        state = self.add_object(label, name)
        self._history.append((label, copy.deepcopy(state) if existed else None))
        self._grid_cache.pop(label, None)
        click = SessionClick(ras, ijk, bool(positive))
        state.clicks.append(click)
        report = ClickReport(label=label, positive=bool(positive))

        containing = [w for w in state.windows if w.geom.contains(ras[None])[0]]
        opened = None
        if not containing:
            if not positive:
                report.note = "negative click outside the object's windows: nothing to remove there"
            elif len(state.windows) >= self.max_windows:
                report.note = f"window limit ({self.max_windows}) reached; click not applied"
            else:
                geom = window_at(ras, self.spacing_mm, self.size, self.snap_vox)
                win = WindowState(geom, np.zeros((self.mask_size,) * 3, np.float32))
                state.windows.append(win)
                report.new_windows += 1
                containing = [win]
                opened = win
        for win in containing:
            self._decode(win, self._points_for(state, win.geom, [(ras, bool(positive))], report=report), report)
            if win is opened and self.click_memory == "newest":
                # the object's earlier clicks in the new window (negative ones made where it had
                # no window yet), in order, as a grown window gets them
                for c in state.clicks[:-1]:
                    if win.geom.contains(c.ras[None])[0]:
                        self._decode(win, [(c.ras, c.positive)], report)
        if self.grow and state.windows:
            self._grow(state, report)
            self._prune(state)
        state.truncated = self._truncated(state)
        report.windows = len(state.windows)
        if self.measure_clicks and state.windows:
            report.voxels = self.voxel_count(label)
        return report

    def undo(self, label: int | None = None) -> bool:
        """Undo the last click (of ``label`` if given, else the last click of the session)."""
        for i in range(len(self._history) - 1, -1, -1):
            lab, snapshot = self._history[i]
            if label is None or lab == label:
                del self._history[i]
                if snapshot is None:
                    self.objects.pop(lab, None)
                else:
                    self.objects[lab] = snapshot
                self._grid_cache.pop(lab, None)
                return True
        return False

    def reset(self, label: int | None = None) -> None:
        """Forget one object's clicks and masks, or every object's (embeddings stay cached)."""
        if label is None:
            self.objects.clear()
            self._history.clear()
            self._grid_cache.clear()
        else:
            state = self.objects.get(label)
            if state is not None:  # the object keeps its name and its place in the order
                self.objects[label] = ObjectState(label, state.name)
            self._history = [h for h in self._history if h[0] != label]
            self._grid_cache.pop(label, None)

    def mask(self, label: int) -> np.ndarray:
        """Boolean mask of one object on the CT grid (before the overlap rule between objects)."""
        vol = self._need_volume()
        out = np.zeros(vol.shape, dtype=bool)
        got = self.object_logits(label)
        if got is not None:
            box, logits = got
            out[box] = logits > 0
        return out

    def voxel_count(self, label: int) -> int:
        """Voxels of ``mask(label)`` without building the full-size mask."""
        got = self.object_logits(label)
        return 0 if got is None else int(np.count_nonzero(got[1] > 0))

    def object_logits(self, label: int) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """(box, blended logits on ``volume.array[box]``) of one object; None when empty.

        Voxels of the box that no window covers hold -inf.
        """
        if label in self._grid_cache:
            return self._grid_cache[label]
        vol = self._need_volume()
        state = self.objects.get(label)
        result = None
        if state is not None and state.windows:
            t0 = time.perf_counter()
            result = self._blend(state, vol)
            reach_mm = self.spacing_mm * self.size / self.mask_size  # one low-res logit voxel
            if result is not None and self.refine == "hu":
                box = result[0]
                result = (box, peel_soft_surface(result[1], vol.array[box], vol.spacing_mm, reach_mm, self.refine_hu,
                                                 _positive_voxels(state.clicks, box, vol.shape),
                                                 (vol.array, tuple(sl.start for sl in box))))
            if result is not None and self.islands == "clicked":
                result = (result[0], keep_clicked_islands(result[1], result[0], state.clicks, vol.spacing_mm, reach_mm,
                                                          vol.shape))
            self.timings["map_back_s"] += time.perf_counter() - t0
        self._grid_cache[label] = result
        return result

    def label_map(self) -> np.ndarray:
        """All objects in one label map on the CT grid (overlap rule in the module docstring)."""
        vol = self._need_volume()
        max_label = max(self.objects, default=0)
        labels = np.zeros(vol.shape, dtype=label_dtype(max_label), order="F")  # NIfTI order: written without a transposing copy
        owners: dict[int, tuple[tuple[slice, slice, slice], np.ndarray]] = {}
        for lab in self.objects:
            got = self.object_logits(lab)
            if got is None:
                continue
            box, logits = got  # the session's cached array: no copy per object (a Fortran copy
            region = logits > 0  # of each doubled the memory of a map of 30 large bones)
            if not region.any():
                continue
            current = labels[box]
            take = region & (current == 0)
            conflict = region & (current != 0)
            if conflict.any():
                idx = np.nonzero(conflict)
                mine = logits[idx]
                theirs = np.full(mine.shape, -np.inf, dtype=np.float32)
                owner_ids = current[idx]
                for other in np.unique(owner_ids):
                    obox, ologits = owners[int(other)]
                    sel = owner_ids == other
                    gi = [idx[a][sel] + box[a].start - obox[a].start for a in range(3)]
                    theirs[sel] = ologits[gi[0], gi[1], gi[2]]
                win = mine > theirs
                take[tuple(i[win] for i in idx)] = True
            current[take] = lab
            labels[box] = current
            owners[lab] = (box, logits)
        return labels

    def embedding_cache_info(self) -> dict[str, int]:
        return {"cached": len(self._embeddings), "limit": self.cache_size}

    # -- internals ------------------------------------------------------------------------------
    def _need_volume(self) -> Volume:
        if self.volume is None:
            raise RuntimeError("call set_volume first")
        return self.volume

    def _embedding(self, geom: WindowGeometry, report: ClickReport) -> Any:
        key = geom.key
        if key in self._embeddings:
            self._embeddings.move_to_end(key)
            return self._embeddings[key]
        t0 = time.perf_counter()
        image = window_image(self._need_volume(), geom, self.intensity)
        t1 = time.perf_counter()
        emb = self.engine.encode(image)
        t2 = time.perf_counter()
        report.sample_s += t1 - t0
        report.encoder_s += t2 - t1
        report.encoder_calls += 1
        self.timings["sample_s"] += t1 - t0
        self.timings["encoder_s"] += t2 - t1
        self.counts["encoder_calls"] += 1
        self._embeddings[key] = emb
        while len(self._embeddings) > self.cache_size:
            self._embeddings.popitem(last=False)
        return emb

    def _points_for(self, state: ObjectState, geom: WindowGeometry, new: list[tuple[np.ndarray, bool]],
                    include_new: bool = True, report: ClickReport | None = None) -> list[tuple[np.ndarray, bool]]:
        """The points of one decoder call in window ``geom``. ``new``: the click just made (already
        the last of ``state.clicks``), or a grown window's seed point. "newest": ``new`` alone;
        "all": the object's clicks inside the window, oldest first and ``new`` last, the newest
        ``max_points`` of them when the engine has a limit (``report`` notes how many were left
        out: the mask then differs from an engine without the limit)."""
        if self.click_memory == "newest":
            return new
        clicks = state.clicks[:-1] if include_new else state.clicks
        pts = [(c.ras, c.positive) for c in clicks if geom.contains(c.ras[None])[0]] + new
        if not self.max_points or len(pts) <= self.max_points:
            return pts
        dropped = len(pts) - self.max_points
        if report is not None and dropped > report.dropped_clicks:
            report.dropped_clicks = dropped
            note = (f"{dropped} older click(s) left out: the engine takes {self.max_points} points per call "
                    "(bosam export --max-points N raises the limit)")
            kept = [n for n in report.note.split("; ") if n and "older click(s) left out" not in n]
            report.note = "; ".join([*kept, note])
        return pts[-self.max_points:]

    def _decode(self, win: WindowState, points: list[tuple[np.ndarray, bool]], report: ClickReport) -> None:
        emb = self._embedding(win.geom, report)
        ras = np.stack([p for p, _ in points])
        point = win.geom.world_to_window(ras).astype(np.float32)[None]  # (1, N, 3)
        label = np.array([[1 if pos else 0 for _, pos in points]], dtype=np.int64)
        t0 = time.perf_counter()
        logits, _ = self.engine.decode(emb, point, label, win.logits[None, None])
        dt = time.perf_counter() - t0
        win.logits = np.asarray(logits, dtype=np.float32).reshape(win.logits.shape)
        win.decoder_calls += 1
        report.decoder_calls += 1
        report.decoder_s += dt
        self.timings["decoder_s"] += dt
        self.counts["decoder_calls"] += 1

    def _face_touch(self, win: WindowState) -> list[tuple[int, int, np.ndarray]]:
        """Faces (axis, side) the positive mask touches, with the touching low-res voxels."""
        pos = win.logits > 0
        m = self.mask_size
        out = []
        for axis in range(3):
            for side, idx in ((-1, 0), (1, m - 1)):
                slab = np.take(pos, idx, axis=axis)
                if slab.any():
                    uv = np.argwhere(slab)
                    vox = np.insert(uv, axis, idx, axis=1).astype(np.float64)
                    out.append((axis, side, vox))
        return out

    def _lowres_to_world(self, geom: WindowGeometry, vox: np.ndarray) -> np.ndarray:
        aff = geom.lowres_affine(self.mask_size)
        return vox @ aff[:3, :3].T + aff[:3, 3]

    def _grow(self, state: ObjectState, report: ClickReport) -> None:
        vol = self._need_volume()
        queue = list(state.windows)
        refreshed: set[tuple] = set()
        while queue:
            win = queue.pop(0)
            for axis, side, vox in self._face_touch(win):
                geom = win.geom.shifted(axis, side)
                if geom.key in state.window_keys():
                    # the neighbour exists: it learns about mask that now reaches it (once per
                    # click), or the blend of the two would erase that mask in the overlap
                    other = next(w for w in state.windows if w.geom.key == geom.key)
                    seed = None if geom.key in refreshed else self._uncovered_seed(win, other)
                    if seed is not None:
                        refreshed.add(geom.key)
                        self._decode_seed(state, other, seed, report)
                        queue.append(other)
                    continue
                # grow only where the touching mask lies inside the CT
                world = self._lowres_to_world(win.geom, vox)
                if not vol.contains_voxel(vol.world_to_voxel(world)).any():
                    continue
                if len(state.windows) >= self.max_windows:
                    continue
                seed = self._seed_point(win, geom)
                if seed is None:
                    continue
                new = WindowState(geom, np.zeros((self.mask_size,) * 3, np.float32), win.geom.key)
                state.windows.append(new)
                report.new_windows += 1
                if self.click_memory == "all":  # one call: the seed and the object's clicks there
                    self._decode(new, self._points_for(state, geom, [(seed, True)], include_new=False), report)
                else:
                    self._decode(new, [(seed, True)], report)
                    for c in state.clicks:
                        if geom.contains(c.ras[None])[0]:
                            self._decode(new, [(c.ras, c.positive)], report)
                for _ in range(2):  # pieces of the parent's mask that the first seed did not reach
                    seed = self._uncovered_seed(win, new)
                    if seed is None:
                        break
                    self._decode_seed(state, new, seed, report)
                refreshed.add(geom.key)
                queue.append(new)

    def _decode_seed(self, state: ObjectState, win: WindowState, seed: np.ndarray, report: ClickReport) -> None:
        """One more decoder call in ``win`` with a positive seed point (and, with click memory
        "all", the object's clicks in that window before it)."""
        points = (self._points_for(state, win.geom, [(seed, True)], include_new=False, report=report)
                  if self.click_memory == "all" else [(seed, True)])
        self._decode(win, points, report)

    def _uncovered_seed(self, parent: WindowState, child: WindowState, min_voxels: int = 8) -> np.ndarray | None:
        """The deepest voxel of ``parent``'s mask, well inside ``child``'s window, that
        ``child``'s mask leaves out, when at least ``min_voxels`` low-res voxels are left out."""
        from scipy.ndimage import distance_transform_edt

        pos = parent.logits > 0
        if not pos.any():
            return None
        vox = np.argwhere(pos).astype(np.float64)
        world = self._lowres_to_world(parent.geom, vox)
        inside = child.geom.contains(world, margin_vox=self.size / 16)
        if inside.sum() < min_voxels:
            return None
        aff = child.geom.lowres_affine(self.mask_size)
        idx = np.rint((world[inside] - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T).astype(int)
        idx = np.clip(idx, 0, self.mask_size - 1)
        missed = child.logits[idx[:, 0], idx[:, 1], idx[:, 2]] <= 0
        if missed.sum() < min_voxels:
            return None
        depth = distance_transform_edt(np.pad(pos, 1))[1:-1, 1:-1, 1:-1][pos][inside][missed]
        return world[inside][missed][int(np.argmax(depth))]

    def _truncated(self, state: ObjectState) -> bool:
        """The object is cut short by the window limit: a positive click lies outside all its
        windows, or its mask touches a face inside the CT with no window beyond it."""
        if any(c.positive and not any(w.geom.contains(c.ras[None])[0] for w in state.windows) for c in state.clicks):
            return True
        if len(state.windows) < self.max_windows or not self.grow:
            return False
        vol = self._need_volume()
        keys = set(state.window_keys())
        for win in state.windows:
            for axis, side, vox in self._face_touch(win):
                if win.geom.shifted(axis, side).key in keys:
                    continue
                if vol.contains_voxel(vol.world_to_voxel(self._lowres_to_world(win.geom, vox))).any():
                    return True
        return False

    def _seed_point(self, win: WindowState, geom: WindowGeometry) -> np.ndarray | None:
        """Deepest voxel of ``win``'s mask that lies well inside window ``geom`` (world mm)."""
        from scipy.ndimage import distance_transform_edt

        pos = win.logits > 0
        if not pos.any():
            return None
        depth = distance_transform_edt(np.pad(pos, 1))[1:-1, 1:-1, 1:-1]
        vox = np.argwhere(pos).astype(np.float64)
        world = self._lowres_to_world(win.geom, vox)
        inside = geom.contains(world, margin_vox=self.size / 16)
        if not inside.any():
            inside = geom.contains(world)
            if not inside.any():
                return None
        d = depth[pos][inside]
        return world[inside][int(np.argmax(d))]

    def _prune(self, state: ObjectState) -> None:
        """Drop grown windows the object no longer reaches: a window stays when a click opened
        it, a positive click lies in it, or the mask of a window that stays touches the face
        they share (any such window, not only the one it grew from: a negative click that cuts
        one path leaves the others)."""
        by_key = {w.geom.key: w for w in state.windows}
        keep = {w.geom.key for w in state.windows
                if w.parent is None or any(c.positive and w.geom.contains(c.ras[None])[0] for c in state.clicks)}
        todo = list(keep)
        while todo:
            win = by_key[todo.pop()]
            for axis, side, _ in self._face_touch(win):
                key = win.geom.shifted(axis, side).key
                if key in by_key and key not in keep:
                    keep.add(key)
                    todo.append(key)
        state.windows = [w for w in state.windows if w.geom.key in keep]

    def _blend(self, state: ObjectState, vol: Volume) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        boxes = []
        for w in state.windows:
            ext = lowres_positive_extent(w.logits)
            if ext is None:
                continue
            b = box_of(w.geom.lowres_affine(self.mask_size), ext, vol)
            if b is not None:
                boxes.append(b)
        if not boxes:
            return None
        box = tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(3))
        shape = tuple(s.stop - s.start for s in box)
        if len(state.windows) == 1:
            values, weights = logits_to_grid(state.windows[0].logits, state.windows[0].geom, vol, box, self.ramp_vox)
            return box, np.where(weights > 0, values, -np.inf).astype(np.float32)
        num = np.zeros(shape, np.float32)
        den = np.zeros(shape, np.float32)
        full = [(-0.5, self.size - 0.5)] * 3
        for w in state.windows:
            wb = box_of(w.geom.affine, full, vol, pad=0)
            if wb is None:
                continue
            # the part of the union box this window covers, in box-relative and CT indices
            sub = tuple(slice(max(wb[a].start, box[a].start), min(wb[a].stop, box[a].stop)) for a in range(3))
            if any(sl.stop <= sl.start for sl in sub):
                continue
            values, weights = logits_to_grid(w.logits, w.geom, vol, sub, self.ramp_vox)
            rel = tuple(slice(sub[a].start - box[a].start, sub[a].stop - box[a].start) for a in range(3))
            num[rel] += values * weights
            den[rel] += weights
        blended = np.full(shape, -np.inf, np.float32)
        np.divide(num, den, out=blended, where=den > 0)
        return box, blended


def keep_clicked_islands(logits: np.ndarray, box: tuple[slice, slice, slice], clicks: list[SessionClick],
                         spacing_mm: Any, reach_mm: float, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``logits`` (on ``volume[box]``, voxels of ``spacing_mm``) with every connected piece of
    ``logits > 0`` that no positive click holds or comes within ``reach_mm`` of (per axis, at
    least one voxel) set to -inf, in place. Unchanged when there is nothing to drop or no click
    reaches the mask."""
    mask = logits > 0
    pieces, n = _pieces(mask)
    if n <= 1:
        return logits
    keep = np.zeros(n + 1, bool)
    reach = _vox_within(reach_mm, spacing_mm)
    for ijk in _positive_voxels(clicks, box, shape):
        near = tuple(slice(max(v - r, 0), max(v + r + 1, 0)) for v, r in zip(ijk, reach))
        hit = pieces[near]
        keep[np.unique(hit[hit > 0])] = True
    if not keep.any():
        return logits
    logits[~keep[pieces] & mask] = -np.inf  # in place: the array is the session's own blend
    return logits


def peel_soft_surface(logits: np.ndarray, hu: np.ndarray, spacing_mm: Any, depth_mm: float, threshold_hu: float,
                      keep: list[tuple[int, int, int]] = (),
                      context: tuple[np.ndarray, tuple[int, ...]] | None = None) -> np.ndarray:
    """``logits`` (on a CT box ``hu``, voxels of ``spacing_mm``) with the soft-tissue rim of
    ``logits > 0`` set to -inf, in place: the voxels below ``threshold_hu`` that lie within
    ``depth_mm`` of the mask's surface (per axis, at least one voxel; beyond a face of the box
    inside the CT is outside, beyond the CT's own edge is not: a bone cut by the field of view,
    such as a femoral shaft leaving a pelvic CT, goes on there), are not enclosed by bone
    (``_bone_around``: bone-like HU within ``ENCLOSED_MM`` along at least
    ``ENCLOSED_DIRECTIONS`` of the six axis directions) and connect to the outside through such
    voxels (6-connectivity; a shaft's marrow, bone on both sides along two axes, is not the
    outside). A rim piece holding one of the ``keep`` voxels (box indices of
    positive clicks) stays. ``context``: (the whole CT, the box's first voxel in it), so that the
    enclosure test sees bone beyond the box and the CT's edge is known; None: ``hu`` is the CT."""
    mask = logits > 0
    if not mask.any():
        return logits
    depth = _vox_within(depth_mm, spacing_mm)
    around, origin = context if context is not None else (hu, (0, 0, 0))
    # per axis, whether the box's low / high face lies inside the CT (beyond it: outside)
    open_lo = [origin[a] > 0 for a in range(3)]
    open_hi = [origin[a] + mask.shape[a] < around.shape[a] for a in range(3)]
    # rim: the voxels with a non-mask voxel (or an open box face) within the depth along every
    # axis-aligned box around them; the rest of the mask is out of reach
    near_outside = ~mask
    for a in range(3):
        d = int(depth[a])
        padded = _padded(near_outside.shape, a, d, d, False)
        _axis(padded, a, 0, d)[...] = open_lo[a]
        _axis(padded, a, d + mask.shape[a], 2 * d + mask.shape[a])[...] = open_hi[a]
        _axis(padded, a, d, d + mask.shape[a])[...] = near_outside
        near_outside = _axis(_window_any(padded, 2 * d + 1, a), a, 0, mask.shape[a])
    rim = mask & near_outside & (hu < threshold_hu)
    if not rim.any():
        return logits
    # marrow where the mask's surface cuts through a bone (or behind a cortex the CT does not
    # resolve) is enclosed by bone; the rim outside a bone is not
    used = [np.flatnonzero(rim.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    # the rim's bounding box and one voxel more (the outside voxels next to the rim)
    first = [max(int(u[0]) - 1, 0) for u in used]
    last = [min(int(u[-1]) + 2, mask.shape[a]) for a, u in enumerate(used)]
    rim_box = tuple(slice(first[a], last[a]) for a in range(3))
    directions, axes = _bone_around(around, [first[a] + origin[a] for a in range(3)],
                                    [last[a] + origin[a] for a in range(3)], spacing_mm, ENCLOSED_HU, ENCLOSED_MM)
    enclosed = directions >= ENCLOSED_DIRECTIONS
    rim[rim_box] &= ~enclosed
    if not rim.any():
        return logits
    # the outside of the mask, less the marrow of a bone that the mask stops part-way along
    # (bone on both sides along two axes: a shaft's canal, where the rest of the canal is
    # itself a rim that would peel): a rim piece whose only outside is such marrow stays, and
    # so does one that meets an open box face (the windows' limit) only in such marrow
    marrow = np.zeros_like(mask)
    marrow[rim_box] = enclosed | (axes >= 2)
    outside = ~mask & ~marrow
    touch = np.zeros_like(rim)  # rim voxels with a face on the outside or on an open box face
    for a in range(3):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[a], hi[a] = slice(0, -1), slice(1, None)
        touch[tuple(hi)] |= outside[tuple(lo)]
        touch[tuple(lo)] |= outside[tuple(hi)]
        lo[a], hi[a] = 0, -1
        if open_lo[a]:
            touch[tuple(lo)] |= ~marrow[tuple(lo)]
        if open_hi[a]:
            touch[tuple(hi)] |= ~marrow[tuple(hi)]
    touch &= rim
    if not touch.any():
        return logits
    pieces, n = _pieces(rim, connectivity=6)
    peel = np.zeros(n + 1, bool)
    peel[np.unique(pieces[touch])] = True
    for v in keep:
        if all(0 <= v[a] < rim.shape[a] for a in range(3)):
            peel[pieces[v]] = False
    peel[0] = False
    logits[peel[pieces]] = -np.inf  # in place: the array is the session's own blend
    return logits


def _bone_around(hu: np.ndarray, lo: list[int], hi: list[int], spacing_mm: Any, bright_hu: float,
                 reach_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """For every voxel of the box ``lo:hi`` of ``hu``: in how many of the six axis directions a
    voxel of at least ``bright_hu`` lies within ``reach_mm`` (the voxel itself included), and
    along how many of the three axes it does on both sides; beyond ``hu`` nothing is bright. Per
    axis, one running "any" over the box and the reach on either side: window k covers k - r ..
    k (behind), window k + r covers k .. k + r (ahead)."""
    shape = tuple(h - low for low, h in zip(lo, hi))
    directions = np.zeros(shape, np.uint8)
    axes = np.zeros(shape, np.uint8)
    for a in range(3):
        n, r = hu.shape[a], _reach_vox(reach_mm, spacing_mm, a)
        start, stop = max(lo[a] - r, 0), min(hi[a] + r, n)
        region = [slice(lo[b], hi[b]) for b in range(3)]
        region[a] = slice(start, stop)
        # bright voxels of lo - r .. hi + r along the axis (False beyond the CT)
        bright = _padded(shape, a, r, r, False)
        first = start - (lo[a] - r)
        np.greater_equal(hu[tuple(region)], bright_hu, out=_axis(bright, a, first, first + stop - start))
        window = _window_any(bright, r + 1, a)
        behind, ahead = _axis(window, a, 0, shape[a]), _axis(window, a, r, r + shape[a])
        directions += behind
        directions += ahead
        axes += behind & ahead
    return directions, axes


def _axis(arr: np.ndarray, axis: int, first: int, stop: int) -> np.ndarray:
    """``arr[first:stop]`` along ``axis`` (a view)."""
    idx = [slice(None)] * arr.ndim
    idx[axis] = slice(first, stop)
    return arr[tuple(idx)]


def _padded(shape: tuple[int, ...], axis: int, before: int, after: int, value: bool) -> np.ndarray:
    """A bool array of ``value``, ``shape`` with ``before`` + ``after`` more layers along ``axis``."""
    shape = list(shape)
    shape[axis] += before + after
    return np.full(shape, value, dtype=bool)


def _window_any(arr: np.ndarray, width: int, axis: int) -> np.ndarray:
    """In place: ``arr[k] = any(arr[k : k + width])`` along ``axis`` (the window cut at the end).
    Doubling spans (1, 2, 4, ...) and one last overlapping step: log2(width) ORs of shifted views,
    a few times faster than SciPy's running maximum on bool volumes."""
    n = arr.shape[axis]
    span = 1
    while 2 * span <= width and span < n:
        _axis(arr, axis, 0, n - span)[...] |= _axis(arr, axis, span, n)
        span *= 2
    rest = width - span
    if 0 < rest < n:
        _axis(arr, axis, 0, n - rest)[...] |= _axis(arr, axis, rest, n)
    return arr


def _vox_within(mm: float, spacing_mm: Any) -> np.ndarray:
    """``mm`` in CT voxels per axis, rounded half up, at least one (the islands' and the peeling's
    reach). The slack keeps a spacing stored as float32 (0.800000011920929 for 0.8 mm) on the
    same side of a half as the exact value."""
    return np.maximum(1, np.floor(mm / np.asarray(spacing_mm, float) + 0.5 + 1e-4)).astype(int)


def _reach_vox(reach_mm: float, spacing_mm: Any, axis: int) -> int:
    """Whole voxels along ``axis`` within ``reach_mm``."""
    return int(np.floor(reach_mm / float(np.asarray(spacing_mm, float)[axis]) + 1e-4))  # float32 slack


def _positive_voxels(clicks: list[SessionClick], box: tuple[slice, slice, slice],
                     shape: tuple[int, ...] | None = None) -> list[tuple[int, int, int]]:
    """Box-relative voxel indices of the positive clicks: the voxel each lies in (a click on the
    CT's outermost half-voxel, up to index shape - 0.5, is in the last voxel)."""
    start = np.array([sl.start for sl in box])
    out = []
    for c in clicks:
        if c.positive:
            v = np.floor(np.asarray(c.ijk, dtype=np.float64) + 0.5)
            if shape is not None:
                v = np.clip(v, 0, np.asarray(shape) - 1)
            out.append(tuple(int(x) for x in v.astype(int) - start))
    return out


def _pieces(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """(labels, count) of the connected pieces of ``mask`` (26- or 6-connectivity): cc3d
    (5-8x faster on a full window's box), else SciPy."""
    try:
        import cc3d
    except ImportError:  # cc3d is a dependency; SciPy keeps installs without it working
        structure = np.ones((3, 3, 3), bool) if connectivity == 26 else ndimage.generate_binary_structure(3, 1)
        pieces, n = ndimage.label(mask, structure=structure)
        return pieces, int(n)
    pieces, n = cc3d.connected_components(mask, connectivity=connectivity, return_N=True)
    return pieces, int(n)
