"""A classical baseline with the ``Session`` surface: click-seeded HU-threshold region growing.

For each object: the voxels at or above ``threshold_hu`` that lie within ``radius_mm`` of one of
its positive clicks, the connected components of those that contain a positive click, with
the parts geodesically nearer (mm along paths inside the mask) to a negative click than to
every positive click cut away (after enclosed holes, such as the marrow inside a cortical
shell, are filled). A positive click on a voxel below the threshold snaps to the nearest
voxel above it within ``snap_mm`` (of a piece of at least ``SPECK_MM3``, when there is one:
a noisy voxel or a calcification next to the click is passed over); the clicked voxel itself
joins the mask either way (the user said it is object).

It is what a user gets from a threshold tool with seed points, and ``bosam evaluate
--baseline threshold`` runs it through the very protocol code the model goes through.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from .session import ClickReport
from .volume import Volume, label_dtype


@dataclass
class _Object:
    clicks: list[tuple[np.ndarray, bool]] = field(default_factory=list)  # (ijk float, positive)
    box: tuple[slice, slice, slice] | None = None
    mask: np.ndarray | None = None


#: connected bone pieces smaller than this (mm³) are passed over when a click snaps to bone
SPECK_MM3 = 50.0


class ThresholdSegmenter:
    """Region growing from clicks above an HU threshold (see the module docstring).

    Args:
        threshold_hu: bone threshold (cortical bone is several hundred HU; ~200 also takes in
            much cancellous bone).
        radius_mm: growth limit around every positive click.
        snap_mm: how far a positive click below the threshold looks for bone (the deepest voxel
            of a vertebral body is cancellous bone, often under 200 HU, ~15 mm from its cortex).
        connectivity: 1 (faces, 6-neighbourhood: leaks least through thin joints), 2 or 3.
        fill_holes: fill enclosed cavities of the result.
    """

    name = "threshold"

    def __init__(self, threshold_hu: float = 200.0, radius_mm: float = 50.0, snap_mm: float = 15.0,
                 connectivity: int = 1, fill_holes: bool = True) -> None:
        self.threshold_hu = float(threshold_hu)
        self.radius_mm = float(radius_mm)
        self.snap_mm = float(snap_mm)
        self.structure = ndimage.generate_binary_structure(3, int(connectivity))
        self.fill_holes = fill_holes
        self.volume: Volume | None = None
        self.objects: dict[int, _Object] = {}
        self.timings: dict[str, float] = {"compute_s": 0.0}

    def describe(self) -> dict[str, Any]:
        return {"engine": "baseline-threshold", "threshold_hu": self.threshold_hu, "radius_mm": self.radius_mm,
                "snap_mm": self.snap_mm, "fill_holes": self.fill_holes}

    # -- Session verbs ----------------------------------------------------------------------------
    def set_volume(self, volume: Volume) -> None:
        self.volume = volume
        self.objects.clear()

    def add_object(self, label: int, name: str | None = None) -> _Object:
        return self.objects.setdefault(int(label), _Object())

    def reset(self, label: int | None = None) -> None:
        if label is None:
            self.objects.clear()
        else:
            self.objects.pop(int(label), None)

    def add_click(self, label: int, xyz: np.ndarray | None = None, voxel: np.ndarray | None = None,
                  positive: bool = True, name: str | None = None) -> ClickReport:
        vol = self._need_volume()
        if (xyz is None) == (voxel is None):
            raise ValueError("give exactly one of xyz (RAS mm) or voxel (i, j, k)")
        ijk = np.asarray(voxel, dtype=np.float64).reshape(3) if voxel is not None else vol.world_to_voxel(xyz)[0]
        if not vol.contains_voxel(ijk)[0]:
            raise ValueError(f"click at voxel {np.round(ijk, 2).tolist()} lies outside the volume {vol.shape}")
        obj = self.add_object(label, name)
        obj.clicks.append((ijk, bool(positive)))
        t0 = time.perf_counter()
        self._grow(obj)
        dt = time.perf_counter() - t0
        self.timings["compute_s"] += dt
        voxels = int(obj.mask.sum()) if obj.mask is not None else 0
        return ClickReport(int(label), bool(positive), voxels=voxels)

    def mask(self, label: int) -> np.ndarray:
        vol = self._need_volume()
        out = np.zeros(vol.shape, dtype=bool)
        obj = self.objects.get(int(label))
        if obj is not None and obj.mask is not None and obj.box is not None:
            out[obj.box] = obj.mask
        return out

    def object_logits(self, label: int) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """(box, pseudo-logits +10 inside / -10 outside) of one object; None when empty."""
        obj = self.objects.get(int(label))
        if obj is None or obj.mask is None or obj.box is None or not obj.mask.any():
            return None
        return obj.box, np.where(obj.mask, 10.0, -10.0).astype(np.float32)

    def label_map(self) -> np.ndarray:
        vol = self._need_volume()
        out = np.zeros(vol.shape, dtype=label_dtype(max(self.objects, default=0)))
        for lab in self.objects:
            m = self.mask(lab)
            out[m & (out == 0)] = lab
        return out

    # -- internals -------------------------------------------------------------------------------
    def _need_volume(self) -> Volume:
        if self.volume is None:
            raise RuntimeError("call set_volume first")
        return self.volume

    def _grow(self, obj: _Object) -> None:
        vol = self._need_volume()
        pos = [c for c, p in obj.clicks if p]
        neg = [c for c, p in obj.clicks if not p]
        if not pos:
            obj.box, obj.mask = None, None
            return
        spacing = vol.spacing_mm
        reach = np.ceil((self.radius_mm + self.snap_mm) / spacing).astype(int) + 1
        shape = np.asarray(vol.shape)
        pts = np.rint(np.asarray(pos)).astype(int)
        lo = np.maximum(pts.min(axis=0) - reach, 0)
        hi = np.minimum(pts.max(axis=0) + reach + 1, shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        sub_shape = tuple(int(b - a) for a, b in zip(lo, hi))
        lin = vol.affine[:3, :3]
        idx = np.indices(sub_shape, dtype=np.float32).reshape(3, -1).T + lo.astype(np.float32)

        def dist2_mm(c: np.ndarray) -> np.ndarray:
            d = (idx - c.astype(np.float32)) @ lin.T.astype(np.float32)
            return (d * d).sum(axis=1).reshape(sub_shape)

        bone = np.asarray(vol.array[box], dtype=np.float32) >= self.threshold_hu
        pos_d2 = [dist2_mm(c) for c in pos]
        near_pos = np.minimum.reduce(pos_d2)
        region = bone & (near_pos <= self.radius_mm**2)
        # a click below the threshold snaps to the nearest bone, passing over specks (noise,
        # calcifications) smaller than SPECK_MM3 when a bigger piece lies within snap_mm
        comps, n = ndimage.label(region, structure=self.structure)
        sizes = np.bincount(comps.ravel(), minlength=n + 1) * float(abs(np.linalg.det(lin)))
        solid = region & (sizes >= SPECK_MM3)[comps]
        seeds, clicked = [], []
        for c, d2 in zip(pos, pos_d2):
            v = tuple(int(x) for x in np.rint(c) - lo)
            if region[v]:
                seeds.append(v)
                continue
            near = d2 <= self.snap_mm**2
            cand = solid & near if (solid & near).any() else region & near
            if cand.any():  # the nearest bone grows, and the clicked voxel is the object's too
                flat = np.flatnonzero(cand.ravel())
                seeds.append(tuple(int(x) for x in np.unravel_index(flat[np.argmin(d2.ravel()[flat])], sub_shape)))
            else:  # no bone near the click: the click voxel itself
                region[v] = True
                seeds.append(v)
            clicked.append(v)
        comps, _ = ndimage.label(region, structure=self.structure)
        keep_ids = {int(comps[s]) for s in seeds} - {0}
        mask = np.isin(comps, list(keep_ids))
        # a positive click marks its own voxel as object, bone-like HU or not; set after the
        # components, so that a click in a joint space does not bridge two bones
        for v in clicked:
            mask[v] = True
        if self.fill_holes and mask.any():
            mask = ndimage.binary_fill_holes(mask)
        neg_in = [v for v in (tuple(int(x) for x in np.rint(c) - lo) for c in neg)
                  if all(0 <= v[a] < sub_shape[a] for a in range(3)) and mask[v]]
        if neg_in:
            mask &= ~self._nearer_to_negative(mask, seeds, neg_in, spacing)
            comps, _ = ndimage.label(mask, structure=self.structure)
            keep_ids = {int(comps[s]) for s in seeds} - {0}
            mask = np.isin(comps, list(keep_ids))
            for v in clicked:
                mask[v] = True
        obj.box, obj.mask = box, mask  # type: ignore[assignment]

    @staticmethod
    def _nearer_to_negative(mask: np.ndarray, pos: list, neg: list, spacing_mm: np.ndarray) -> np.ndarray:
        """Voxels of ``mask`` whose geodesic distance (mm, paths inside the mask) to a negative
        click is smaller than to every positive seed: the part a negative click cuts off."""
        from skimage.graph import MCP_Geometric

        cost = np.where(mask, 1.0, np.inf)
        d_pos, _ = MCP_Geometric(cost, sampling=tuple(float(s) for s in spacing_mm)).find_costs([p for p in pos if mask[p]])
        d_neg, _ = MCP_Geometric(cost, sampling=tuple(float(s) for s in spacing_mm)).find_costs(neg)
        return mask & (d_neg < d_pos)
