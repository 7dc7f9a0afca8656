"""What a run leaves besides the label map: overlay PNGs, STL meshes, JSON manifests."""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .atomic import atomic_write_bytes
from .volume import Volume

# distinct colours for objects (RGB)
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
]


def colour(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


# ---------------------------------------------------------------------------------------------
# manifests


# ---------------------------------------------------------------------------------------------
# meshes


def mask_to_mesh(mask: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes (scikit-image) of a boolean mask -> (vertices in world mm, faces).

    Faces are wound so that normals point out of the object in world space, whatever the
    handedness of the voxel grid.
    """
    from skimage.measure import marching_cubes

    if not mask.any():
        return np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64)
    used = [np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    lo = [max(int(u[0]) - 1, 0) for u in used]
    hi = [min(int(u[-1]) + 2, s) for u, s in zip(used, mask.shape)]
    sub = np.pad(mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32), 1)
    verts, faces, _, _ = marching_cubes(sub, level=0.5)
    verts = verts - 1 + np.asarray(lo, dtype=np.float64)
    world = verts @ affine[:3, :3].T + affine[:3, 3]
    # scikit-image winds the faces of a mask (object above the level) so that the right-hand
    # normals point into it on the voxel grid; a left-handed affine mirrors that once more
    if np.linalg.det(affine[:3, :3]) > 0:
        faces = faces[:, ::-1]
    return world, faces.astype(np.int64)


#: RAS -> LPS: mesh files are written in LPS millimetres, as DICOM, ITK and 3D Slicer (which
#: assumes LPS for a mesh file that does not say otherwise) place them
RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def write_stl(vertices: np.ndarray, faces: np.ndarray, path: str | os.PathLike, name: str = "bosam") -> Path:
    """Binary STL of a mesh with ``vertices`` in RAS mm, atomically. The file holds LPS mm and
    says so in its header (``SPACE=LPS``, the tag 3D Slicer reads and writes). Normals from the
    winding (right-hand rule); the two mirrored axes leave the winding as it is."""
    tri = (vertices * RAS_TO_LPS)[faces].astype(np.float32)  # (F, 3, 3)
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    norm = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.where(norm > 0, normals / np.maximum(norm, 1e-12), 0).astype(np.float32)
    tag = b" SPACE=LPS"
    # "bosam " first: a binary STL header must not start with "solid" (that marks ASCII STL)
    header = (b"bosam " + name.encode("ascii", "replace")[: 80 - 6 - len(tag)] + tag).ljust(80, b" ")
    rec = np.zeros(len(faces), dtype=[("n", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    rec["n"] = normals
    rec["v"] = tri
    buf = io.BytesIO()
    buf.write(header)
    buf.write(struct.pack("<I", len(faces)))
    buf.write(rec.tobytes())
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


# ---------------------------------------------------------------------------------------------
# overlays


@dataclass
class OverlayView:
    """One display slice of an overlay: ``ct`` and ``labels`` (rows, cols), the spacing of its
    rows and columns in mm, and the clicks lying on it as (row, col, positive)."""

    ct: np.ndarray
    labels: np.ndarray
    spacing_mm: tuple[float, float]
    clicks: list[tuple[float, float, bool]]


def overlay_views(ct: Volume, labels: np.ndarray, clicks: Sequence[dict[str, Any]],
                  max_click_offset_vox: float = 3.0) -> list[OverlayView]:
    """Axial, coronal and sagittal slices through an object's first click (the volume's centre
    without clicks), with anterior/superior up and patient right on the image left
    (radiological). The CT is shown in its closest-RAS storage order (no resampling); a click is
    drawn on a slice it lies within ``max_click_offset_vox`` display voxels of. ``clicks``: dicts
    with ``voxel`` (CT indices) and ``positive``, as in the manifest."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(ct.affine)
    # inv_ornt_aff maps display indices back to stored ones; its inverse takes stored to display
    to_display = np.linalg.inv(nib.orientations.inv_ornt_aff(ornt, ct.shape))
    ras_ct = nib.orientations.apply_orientation(np.asarray(ct.array), ornt)  # views, no copies
    ras_lab = nib.orientations.apply_orientation(labels, ornt)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = ct.spacing_mm
    nx, ny, nz = ras_ct.shape

    def display(ijk: Any) -> np.ndarray:
        return (to_display @ np.append(np.asarray(ijk, dtype=np.float64), 1.0))[:3]

    centre = display(clicks[0]["voxel"]) if clicks else (np.asarray(ras_ct.shape) - 1) / 2
    cut_at = [int(np.clip(round(c), 0, n - 1)) for c, n in zip(centre, ras_ct.shape)]
    x, y, z = cut_at
    # display index x grows towards the patient's right (shown on the left), y towards anterior
    # and z towards superior (both shown up)
    cuts = [
        (lambda a: a[:, :, z].T[::-1, ::-1], (spacing[1], spacing[0]), 2, lambda p: (ny - 1 - p[1], nx - 1 - p[0])),
        (lambda a: a[:, y, :].T[::-1, ::-1], (spacing[2], spacing[0]), 1, lambda p: (nz - 1 - p[2], nx - 1 - p[0])),
        (lambda a: a[x, :, :].T[::-1, :], (spacing[2], spacing[1]), 0, lambda p: (nz - 1 - p[2], p[1])),
    ]
    views = []
    for cut, sp, normal, project in cuts:
        shown = []
        for c in clicks:
            p = display(c["voxel"])
            if abs(p[normal] - cut_at[normal]) <= max_click_offset_vox:
                row, col = project(p)
                shown.append((float(row), float(col), bool(c["positive"])))
        views.append(OverlayView(np.asarray(cut(ras_ct), dtype=np.float32), np.asarray(cut(ras_lab)),
                                 (float(sp[0]), float(sp[1])), shown))
    return views


def write_overlay(
    ct: Volume,
    labels: np.ndarray,
    objects: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    window_hu: tuple[float, float] = (-300.0, 1200.0),
    max_side: int = 320,
) -> Path:
    """One PNG: a row per object with axial, coronal and sagittal slices through its first
    click (``overlay_views``), the object's mask tinted in its colour and its clicks drawn
    (+ green, - red)."""
    from PIL import Image, ImageDraw

    rows = []
    lo, hi = window_hu
    for k, obj in enumerate(objects):
        tiles = []
        for view in overlay_views(ct, labels, obj.get("clicks", [])):
            grey = np.clip((view.ct - lo) / (hi - lo), 0, 1)
            rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
            for j, o in enumerate(objects):
                m = view.labels == o["label"]
                if m.any():
                    col = np.asarray(colour(j), dtype=np.float32)
                    alpha = 0.55 if j == k else 0.25
                    rgb[m] = (rgb[m] * (1 - alpha) + col * alpha).astype(np.uint8)
            tile = Image.fromarray(rgb)
            sr, sc = view.spacing_mm
            h_mm, w_mm = rgb.shape[0] * sr, rgb.shape[1] * sc
            scale = max_side / max(h_mm, w_mm)
            size = (max(1, int(round(w_mm * scale))), max(1, int(round(h_mm * scale))))
            tile = tile.resize(size, Image.NEAREST)
            draw = ImageDraw.Draw(tile)
            for r_px, c_px, positive in view.clicks:
                # pixel centres: index i spans [i, i + 1) before scaling
                px, py = (c_px + 0.5) * size[0] / rgb.shape[1], (r_px + 0.5) * size[1] / rgb.shape[0]
                fill = (0, 255, 0) if positive else (255, 40, 40)
                s = 5
                draw.line([(px - s, py), (px + s, py)], fill=fill, width=2)
                if positive:
                    draw.line([(px, py - s), (px, py + s)], fill=fill, width=2)
            tiles.append(tile)
        row_h = max(t.size[1] for t in tiles)
        row = Image.new("RGB", (sum(t.size[0] for t in tiles) + 8 * (len(tiles) - 1), row_h + 18), (0, 0, 0))
        x = 0
        for t in tiles:
            row.paste(t, (x, 18))
            x += t.size[0] + 8
        ImageDraw.Draw(row).text((4, 3), f"{obj['label']} {obj.get('name', '')}", fill=colour(k))
        rows.append(row)
    if not rows:
        rows = [Image.new("RGB", (64, 32))]
    width = max(r.size[0] for r in rows)
    canvas = Image.new("RGB", (width, sum(r.size[1] for r in rows)), (0, 0, 0))
    y = 0
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.size[1]
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def object_stats(mask_voxels: int, volume: Volume) -> dict[str, float]:
    return {"voxels": int(mask_voxels), "volume_mm3": round(float(mask_voxels) * volume.voxel_volume_mm3, 3)}


def files_listing(paths: Iterable[Path]) -> list[str]:
    return [str(p) for p in paths]
