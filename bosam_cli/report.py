"""What a run leaves besides the label map: overlay PNGs, STL meshes, JSON manifests."""

from __future__ import annotations

import io
import os
import struct
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
    nz = np.nonzero(mask)
    lo = [max(int(a.min()) - 1, 0) for a in nz]
    hi = [min(int(a.max()) + 2, s) for a, s in zip(nz, mask.shape)]
    sub = np.pad(mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32), 1)
    verts, faces, _, _ = marching_cubes(sub, level=0.5)
    verts = verts - 1 + np.asarray(lo, dtype=np.float64)
    world = verts @ affine[:3, :3].T + affine[:3, 3]
    if np.linalg.det(affine[:3, :3]) < 0:
        faces = faces[:, ::-1]
    return world, faces.astype(np.int64)


def write_stl(vertices: np.ndarray, faces: np.ndarray, path: str | os.PathLike, name: str = "bosam") -> Path:
    """Binary STL, atomically. Normals from the winding (right-hand rule)."""
    tri = vertices[faces].astype(np.float32)  # (F, 3, 3)
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    norm = np.linalg.norm(normals, axis=1, keepdims=True)
    normals = np.where(norm > 0, normals / np.maximum(norm, 1e-12), 0).astype(np.float32)
    header = name.encode()[:80].ljust(80, b" ")
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


def _canonical(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Transform taking voxel indices to closest-RAS display indices, and that orientation."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(volume.affine)
    return ornt, nib.orientations.inv_ornt_aff(ornt, volume.shape)


def _display_slices(arr: np.ndarray, ornt: np.ndarray, centre_ras_idx: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices of a closest-RAS view, each (rows, cols) ready to show
    with anterior/superior up and patient right on the image left (radiological)."""
    import nibabel as nib

    ras = nib.orientations.apply_orientation(arr, ornt)
    x, y, z = (int(np.clip(round(c), 0, s - 1)) for c, s in zip(centre_ras_idx, ras.shape))
    axial = ras[:, :, z].T[::-1, :]  # rows: anterior at top; cols: R..L? index x increases to right (R)
    coronal = ras[:, y, :].T[::-1, :]
    sagittal = ras[x, :, :].T[::-1, :]
    # radiological convention: patient right on image left; x increases towards R, so flip cols
    return [axial[:, ::-1], coronal[:, ::-1], sagittal]


def write_overlay(
    ct: Volume,
    labels: np.ndarray,
    objects: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    window_hu: tuple[float, float] = (-300.0, 1200.0),
    max_side: int = 320,
) -> Path:
    """One PNG: a row per object with axial, coronal and sagittal slices through its first
    click, the object's mask tinted in its colour and its clicks drawn (+ green, - red)."""
    from PIL import Image, ImageDraw

    ornt, to_ras_idx = _canonical(ct)
    spacing = ct.spacing_mm
    # spacing and shape along display axes (closest-RAS order)
    order = [int(o) for o in ornt[:, 0]]
    ras_sp = np.empty(3)
    for src_axis, dst_axis in enumerate(order):
        ras_sp[dst_axis] = spacing[src_axis]
    shape_ras = np.empty(3, dtype=int)
    for src_axis, dst_axis in enumerate(order):
        shape_ras[dst_axis] = ct.shape[src_axis]

    rows = []
    lo, hi = window_hu
    for k, obj in enumerate(objects):
        clicks = obj.get("clicks", [])
        centre_ijk = np.asarray(clicks[0]["voxel"]) if clicks else np.asarray(ct.shape) / 2
        c_ras = (to_ras_idx @ np.append(centre_ijk, 1.0))[:3]
        cts = _display_slices(np.asarray(ct.array, dtype=np.float32), ornt, c_ras)
        labs = _display_slices(labels, ornt, c_ras)
        # physical aspect: (rows, cols) spacings per view
        view_sp = [(ras_sp[1], ras_sp[0]), (ras_sp[2], ras_sp[0]), (ras_sp[2], ras_sp[1])]
        tiles = []
        for v, (img, lab) in enumerate(zip(cts, labs)):
            grey = np.clip((img - lo) / (hi - lo), 0, 1)
            rgb = np.repeat((grey * 255).astype(np.uint8)[..., None], 3, axis=2)
            for j, o in enumerate(objects):
                m = lab == o["label"]
                if m.any():
                    col = np.asarray(colour(j), dtype=np.float32)
                    alpha = 0.55 if j == k else 0.25
                    rgb[m] = (rgb[m] * (1 - alpha) + col * alpha).astype(np.uint8)
            tile = Image.fromarray(rgb)
            sr, sc = view_sp[v]
            h_mm, w_mm = img.shape[0] * sr, img.shape[1] * sc
            scale = max_side / max(h_mm, w_mm)
            size = (max(1, int(round(w_mm * scale))), max(1, int(round(h_mm * scale))))
            tile = tile.resize(size, Image.NEAREST)
            draw = ImageDraw.Draw(tile)
            for c in clicks:
                p = (to_ras_idx @ np.append(np.asarray(c["voxel"], float), 1.0))[:3]
                pt = _project(p, v, shape_ras)
                if pt is None or abs(p[[2, 1, 0][v]] - c_ras[[2, 1, 0][v]]) > 3:
                    continue
                r_px, c_px = pt
                yx = (c_px * size[0] / img.shape[1], r_px * size[1] / img.shape[0])
                fill = (0, 255, 0) if c["positive"] else (255, 40, 40)
                s = 5
                draw.line([(yx[0] - s, yx[1]), (yx[0] + s, yx[1])], fill=fill, width=2)
                if c["positive"]:
                    draw.line([(yx[0], yx[1] - s), (yx[0], yx[1] + s)], fill=fill, width=2)
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


def _project(p_ras_idx: np.ndarray, view: int, shape_ras: np.ndarray) -> tuple[float, float] | None:
    """(row, col) of a closest-RAS index point in display slice ``view`` (see _display_slices)."""
    x, y, z = p_ras_idx
    nx, ny, nz = shape_ras
    if view == 0:  # axial: rows = reversed y, cols = reversed x
        return (ny - 1 - y, nx - 1 - x)
    if view == 1:  # coronal: rows = reversed z, cols = reversed x
        return (nz - 1 - z, nx - 1 - x)
    return (nz - 1 - z, y)  # sagittal: rows = reversed z, cols = y


def object_stats(mask_voxels: int, volume: Volume) -> dict[str, float]:
    return {"voxels": int(mask_voxels), "volume_mm3": round(float(mask_voxels) * volume.voxel_volume_mm3, 3)}


def files_listing(paths: Iterable[Path]) -> list[str]:
    return [str(p) for p in paths]
