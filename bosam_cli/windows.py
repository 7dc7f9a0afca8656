"""The model window: a 128^3 grid at the model spacing with axes along RAS, and the two
interpolations that connect it to a CT on its own grid.

A window is itself a small volume with an affine ``window voxel (d0, d1, d2) -> RAS mm``:
d0 runs towards patient Right (+x), d1 Anterior (+y), d2 Superior (+z), as in SAM-Med3D's
RAS+ training data. CT is sampled into the window straight from the original array through the
composed affine (one trilinear interpolation, no full-volume resampling), and window logits are
sampled back onto the original voxel grid the same way. When the composed affine is an axis
permutation with scaling (any CT whose axes are along patient axes, whatever their order and
signs) both run as three separable 1-D interpolations; oblique grids use scipy's
``map_coordinates`` on the same coordinates.

Everything here is NumPy/SciPy, so runtime-only deployments need no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .volume import Volume

#: HU clamp of SAM-Med3D's CT preprocessing
DEFAULT_CLAMP_HU = (-1000.0, 1000.0)
DEFAULT_SPACING_MM = 1.5
DEFAULT_SIZE = 128


# ---------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class WindowGeometry:
    """A cubic model window in patient space.

    Attributes:
        origin_ras_mm: world position of window voxel (0, 0, 0).
        spacing_mm: isotropic voxel size.
        size: voxels per side (128).
    """

    origin_ras_mm: tuple[float, float, float]
    spacing_mm: float = DEFAULT_SPACING_MM
    size: int = DEFAULT_SIZE

    @property
    def affine(self) -> np.ndarray:
        """Window voxel (d0, d1, d2) -> RAS mm."""
        a = np.diag([self.spacing_mm, self.spacing_mm, self.spacing_mm, 1.0])
        a[:3, 3] = self.origin_ras_mm
        return a

    def lowres_affine(self, mask_size: int) -> np.ndarray:
        """Affine of the decoder's low-res logits grid (mask_size^3 over the same extent).

        Low-res voxel u covers window voxels [f*u, f*u + f) with f = size / mask_size; its
        centre is at window index f*u + (f - 1) / 2 (trilinear, align_corners=False).
        """
        f = self.size / mask_size
        scale = np.diag([f, f, f, 1.0])
        scale[:3, 3] = (f - 1) / 2
        return self.affine @ scale

    @property
    def centre_ras_mm(self) -> np.ndarray:
        return np.asarray(self.origin_ras_mm) + self.spacing_mm * (self.size // 2)

    @property
    def key(self) -> tuple:
        """Hashable identity for embedding caches."""
        return (tuple(round(v, 4) for v in self.origin_ras_mm), round(self.spacing_mm, 6), self.size)

    def world_to_window(self, xyz_ras_mm: np.ndarray) -> np.ndarray:
        """(N, 3) RAS mm -> (N, 3) float window voxel indices (d0, d1, d2)."""
        xyz = np.asarray(xyz_ras_mm, dtype=np.float64).reshape(-1, 3)
        return (xyz - np.asarray(self.origin_ras_mm)) / self.spacing_mm

    def window_to_world(self, d012: np.ndarray) -> np.ndarray:
        q = np.asarray(d012, dtype=np.float64).reshape(-1, 3)
        return q * self.spacing_mm + np.asarray(self.origin_ras_mm)

    def contains(self, xyz_ras_mm: np.ndarray, margin_vox: float = 0.0) -> np.ndarray:
        """Whether points lie inside the window, at least ``margin_vox`` voxels from its faces."""
        q = self.world_to_window(xyz_ras_mm)
        lo, hi = -0.5 + margin_vox, self.size - 0.5 - margin_vox
        return np.all((q >= lo) & (q <= hi), axis=1)

    def centrality(self, xyz_ras_mm: np.ndarray) -> np.ndarray:
        """Distance in voxels from each point to the nearest window face (larger = more central)."""
        q = self.world_to_window(xyz_ras_mm)
        return np.min(np.minimum(q + 0.5, self.size - 0.5 - q), axis=1)

    def shifted(self, axis: int, steps: int) -> "WindowGeometry":
        """The window moved by ``steps`` half-windows along window axis ``axis``."""
        origin = list(self.origin_ras_mm)
        origin[axis] += steps * (self.size // 2) * self.spacing_mm
        return WindowGeometry(tuple(origin), self.spacing_mm, self.size)  # type: ignore[arg-type]


def window_at(
    xyz_ras_mm: Sequence[float],
    spacing_mm: float = DEFAULT_SPACING_MM,
    size: int = DEFAULT_SIZE,
    snap_vox: int = 16,
) -> WindowGeometry:
    """The window that puts a point near its centre voxel (size // 2 on every axis).

    With ``snap_vox`` > 0 the centre is snapped to a world lattice of ``snap_vox`` voxels, so that
    nearby objects share windows (and their cached embeddings) and neighbour windows line up.
    The point then sits within ``snap_vox / 2`` voxels of the centre.
    """
    c = np.asarray(xyz_ras_mm, dtype=np.float64)
    if snap_vox:
        step = snap_vox * spacing_mm
        c = np.round(c / step) * step
    origin = c - spacing_mm * (size // 2)
    return WindowGeometry(tuple(float(v) for v in origin), float(spacing_mm), int(size))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# coordinate plumbing shared by both interpolation directions


@dataclass
class _Mapping:
    """dst voxel index -> src voxel index, separable when ``perm`` is set."""

    matrix: np.ndarray  # (4, 4): src_index = matrix @ dst_index
    dst_shape: tuple[int, int, int]
    perm: tuple[int, int, int] | None  # src axis used by each dst axis
    coords_1d: list[np.ndarray] | None  # per dst axis: src coordinate along src axis perm[a]

    def full_coords(self, matrix: np.ndarray | None = None) -> np.ndarray:
        """(3, *dst_shape) float64 src coordinates of every dst voxel (general path)."""
        m = self.matrix if matrix is None else matrix
        idx = [np.arange(n, dtype=np.float64) for n in self.dst_shape]
        return np.stack(
            [
                m[r, 0] * idx[0][:, None, None] + m[r, 1] * idx[1][None, :, None] + m[r, 2] * idx[2][None, None, :] + m[r, 3]
                for r in range(3)
            ]
        )

    def src_extent(self) -> tuple[np.ndarray, np.ndarray]:
        """Min and max src coordinate per src axis over the dst grid (a linear map: corners)."""
        hi = np.asarray(self.dst_shape, dtype=np.float64) - 1
        corners = np.array([[a, b, c, 1.0] for a in (0, hi[0]) for b in (0, hi[1]) for c in (0, hi[2])])
        src = corners @ self.matrix[:3].T
        return src.min(axis=0), src.max(axis=0)


def _mapping(src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int]) -> _Mapping:
    m = np.linalg.inv(src_affine) @ dst_affine
    dst_shape = tuple(int(n) for n in dst_shape)  # type: ignore[assignment]
    r = m[:3, :3]
    scale = np.abs(r).max()
    nz = np.abs(r) > 1e-9 * max(scale, 1e-30)
    perm = None
    coords = None
    if nz.sum(axis=0).tolist() == [1, 1, 1] and nz.sum(axis=1).tolist() == [1, 1, 1]:
        perm = tuple(int(np.argmax(nz[:, a])) for a in range(3))
        coords = [r[perm[a], a] * np.arange(dst_shape[a], dtype=np.float64) + m[perm[a], 3] for a in range(3)]
    return _Mapping(m, dst_shape, perm, coords)  # type: ignore[arg-type]


def _interp_axis(arr: np.ndarray, axis: int, c: np.ndarray, order: int, edge: bool, cval: float) -> np.ndarray:
    """1-D interpolation of ``arr`` along ``axis`` at float positions ``c``.

    ``edge``: positions beyond the ends take the end values; otherwise values beyond are ``cval``
    and linear interpolation blends towards it within one voxel (grid-constant semantics).
    """
    n = arr.shape[axis]
    if order == 0:
        idx = np.floor(c + 0.5).astype(np.int64)
        if edge:
            return np.take(arr, np.clip(idx, 0, n - 1), axis=axis)
        inside = (idx >= 0) & (idx < n)
        out = np.take(arr, np.clip(idx, 0, n - 1), axis=axis)
        if not inside.all():
            shape = [1] * arr.ndim
            shape[axis] = len(c)
            out = np.where(inside.reshape(shape), out, np.asarray(cval, dtype=out.dtype))
        return out
    weights, bias = _lerp_matrix(np.asarray(c, dtype=np.float64), n, edge, cval)
    # the interpolation as a matmul along ``axis`` (BLAS; no gathers, no copies of ``arr``)
    if axis == arr.ndim - 1:
        out = arr @ weights.T
    elif axis == 0:
        out = (weights @ arr.reshape(n, -1)).reshape((len(c),) + arr.shape[1:])
    else:
        out = np.matmul(weights, arr.reshape(arr.shape[:axis] + (n, -1))).reshape(
            arr.shape[:axis] + (len(c),) + arr.shape[axis + 1 :]
        )
    if bias is not None:
        shape = [1] * arr.ndim
        shape[axis] = len(c)
        out += bias.reshape(shape)
    return out


def _lerp_matrix(c: np.ndarray, n: int, edge: bool, cval: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Linear interpolation at positions ``c`` of a length-``n`` axis as a (len(c), n) float32
    matrix, plus the constant each output gets from neighbours beyond the ends (``cval`` times
    their weight; None with ``edge``, where positions are clamped to the ends)."""
    if edge:
        c = np.clip(c, 0, n - 1)
    i0 = np.floor(c).astype(np.int64)
    w = c - i0
    rows = np.arange(len(c))
    weights = np.zeros((len(c), n), dtype=np.float64)
    outside = np.zeros(len(c), dtype=np.float64)
    for idx, wt in ((i0, 1.0 - w), (i0 + 1, w)):
        inside = (idx >= 0) & (idx < n)
        if edge:
            np.add.at(weights, (rows, np.clip(idx, 0, n - 1)), wt)
        else:
            np.add.at(weights, (rows[inside], idx[inside]), wt[inside])
            outside += np.where(inside, 0.0, wt)
    bias = None if edge or cval == 0 or not outside.any() else (outside * cval).astype(np.float32)
    return weights.astype(np.float32), bias


def resample(
    src: np.ndarray,
    src_affine: np.ndarray,
    dst_shape: Sequence[int],
    dst_affine: np.ndarray,
    order: int = 1,
    edge: bool = False,
    cval: float = 0.0,
) -> np.ndarray:
    """Sample ``src`` (on ``src_affine``) at the voxel centres of a ``dst_shape`` grid.

    Args:
        order: 1 trilinear, 0 nearest.
        edge: extend ``src`` with its border values (else with ``cval``, blended within one voxel).

    Only the block of ``src`` that the destination touches is converted to float32, so sampling
    a 128^3 window out of a 512x512x300 int16 CT stays cheap.
    """
    if order not in (0, 1):
        raise ValueError("order must be 0 or 1")
    mp = _mapping(src_affine, dst_affine, dst_shape)
    out_dtype = np.float32 if order == 1 else src.dtype
    if mp.perm is not None:
        assert mp.coords_1d is not None
        # Crop the src block the destination needs (plus one voxel for interpolation).
        lo, hi, coords = [0, 0, 0], [0, 0, 0], list(mp.coords_1d)
        for a in range(3):
            p = mp.perm[a]
            n = src.shape[p]
            lo[p] = int(np.clip(np.floor(coords[a].min()) - 1, 0, n - 1))
            hi[p] = int(np.clip(np.ceil(coords[a].max()) + 2, lo[p] + 1, n))
        block = src[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        block = np.transpose(block, mp.perm)
        if order == 1:
            block = block.astype(np.float32)
        for a in range(3):
            block = _interp_axis(block, a, coords[a] - lo[mp.perm[a]], order, edge, cval)
        return np.ascontiguousarray(block, dtype=out_dtype)
    cmin, cmax = mp.src_extent()
    lo = [int(np.clip(np.floor(cmin[a]) - 1, 0, src.shape[a] - 1)) for a in range(3)]
    hi = [int(np.clip(np.ceil(cmax[a]) + 2, lo[a] + 1, src.shape[a])) for a in range(3)]
    block = src[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    block = block.astype(np.float32) if order == 1 else block
    shift = np.eye(4)
    shift[:3, 3] = [-v for v in lo]
    m_block = shift @ mp.matrix  # dst index -> block index
    out = _map_affine(block, m_block, mp, order, edge, cval)
    return out.astype(out_dtype, copy=False)


def _map_affine(block: np.ndarray, m: np.ndarray, mp: _Mapping, order: int, edge: bool, cval: float) -> np.ndarray:
    """Interpolate ``block`` at ``m @ dst index`` for every voxel of the dst grid: torch's
    ``grid_sample`` when torch is installed (vectorised, many times faster), else scipy's
    ``map_coordinates``. Same semantics either way: voxel centres at integer indices; beyond
    the block either its edge values (``edge``) or ``cval`` blended in within one voxel."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:  # runtime-only deployments
        torch = None  # type: ignore[assignment]
    if torch is not None and order == 1 and min(block.shape) > 1:
        n = np.asarray(block.shape, dtype=np.float64)
        # grid_sample wants (x, y, z) = (block axis 2, 1, 0) normalised to [-1, 1]
        a = m[[2, 1, 0], :] * (2.0 / (n[[2, 1, 0]] - 1))[:, None]
        a[:, 3] -= 1.0
        a = a.astype(np.float32)
        i, j, k = (np.arange(d, dtype=np.float32) for d in mp.dst_shape)
        grid = (
            a[:, 0] * i[:, None, None, None]
            + a[:, 1] * j[None, :, None, None]
            + a[:, 2] * k[None, None, :, None]
            + a[:, 3]
        )
        shift = 0.0 if edge else float(cval)
        vol = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32) - np.float32(shift))[None, None]
        with torch.inference_mode():
            out = F.grid_sample(
                vol, torch.from_numpy(grid)[None], mode="bilinear",
                padding_mode="border" if edge else "zeros", align_corners=True,
            )
        return out.numpy()[0, 0] + np.float32(shift)
    from scipy.ndimage import map_coordinates

    coords = mp.full_coords(m)
    if edge:
        for ax in range(3):
            np.clip(coords[ax], 0, block.shape[ax] - 1, out=coords[ax])
    return map_coordinates(block, coords, order=order, mode="nearest" if edge else "grid-constant", cval=cval, prefilter=False)


def box_of(src_affine: np.ndarray, src_extent: Sequence[tuple[float, float]], dst: Volume, pad: int = 1) -> tuple[slice, slice, slice] | None:
    """Bounding box (slices) of ``dst`` voxels covered by the index-space box ``src_extent``
    of a grid with affine ``src_affine``; None when it misses ``dst`` entirely."""
    corners = np.array(
        [[src_extent[0][i], src_extent[1][j], src_extent[2][k]] for i in (0, 1) for j in (0, 1) for k in (0, 1)]
    )
    world = corners @ src_affine[:3, :3].T + src_affine[:3, 3]
    idx = dst.world_to_voxel(world)
    lo = np.floor(idx.min(axis=0)).astype(int) - pad
    hi = np.ceil(idx.max(axis=0)).astype(int) + 1 + pad
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.asarray(dst.shape))
    if np.any(hi <= lo):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))  # type: ignore[return-value]


def box_affine(volume: Volume, box: tuple[slice, slice, slice]) -> np.ndarray:
    """Affine of the sub-grid ``volume.array[box]``."""
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in box]
    return volume.affine @ shift


# ---------------------------------------------------------------------------------------------
# CT -> window


@dataclass(frozen=True)
class Intensity:
    """Intensity steps of SAM-Med3D's CT preprocessing.

    Attributes:
        clamp_hu: clip HU to this range before normalising (None: no clamp).
        pad_value: HU given to window voxels outside the CT (0, as in the reference crop/pad).
    """

    clamp_hu: tuple[float, float] | None = DEFAULT_CLAMP_HU
    pad_value: float = 0.0


def sample_window(volume: Volume, geom: WindowGeometry, pad_value: float = 0.0) -> np.ndarray:
    """Raw HU of ``volume`` at the window's voxel centres (trilinear), (S, S, S) float32."""
    return resample(volume.array, volume.affine, (geom.size,) * 3, geom.affine, order=1, cval=pad_value)


def sample_labels(labels: Volume, geom: WindowGeometry) -> np.ndarray:
    """Label ids at the window's voxel centres (nearest), (S, S, S) in the labels' dtype."""
    return resample(labels.array, labels.affine, (geom.size,) * 3, geom.affine, order=0, cval=0)


def normalise(raw_hu: np.ndarray, clamp_hu: tuple[float, float] | None = DEFAULT_CLAMP_HU) -> np.ndarray:
    """Clamp, then z-score with mean/std (unbiased) of the voxels > 0, applied to all voxels."""
    x = raw_hu.astype(np.float32, copy=True)
    if clamp_hu is not None:
        np.clip(x, clamp_hu[0], clamp_hu[1], out=x)
    fg = x[x > 0]
    if fg.size < 2:
        fg = x.reshape(-1)
    mean = float(fg.mean(dtype=np.float64))
    std = float(fg.std(dtype=np.float64, ddof=1)) if fg.size > 1 else 0.0
    if not np.isfinite(std) or std < 1e-6:
        std = 1.0
    x -= np.float32(mean)
    x /= np.float32(std)
    return x


def window_image(volume: Volume, geom: WindowGeometry, intensity: Intensity = Intensity()) -> np.ndarray:
    """The engine input for a window: (1, 1, S, S, S) float32, clamped and z-scored."""
    raw = sample_window(volume, geom, intensity.pad_value)
    return normalise(raw, intensity.clamp_hu)[None, None]


# ---------------------------------------------------------------------------------------------
# window logits -> CT grid


def blend_weight_1d(q: np.ndarray, size: int, ramp_vox: float) -> np.ndarray:
    """Weight of window positions ``q`` (window voxel units): 0 outside the window, rising
    linearly over ``ramp_vox`` voxels from each face, 1 in the interior."""
    d = np.minimum(q + 0.5, size - 0.5 - q)
    return np.clip(d / ramp_vox, 0.0, 1.0).astype(np.float32)


def logits_to_grid(
    lowres_logits: np.ndarray,
    geom: WindowGeometry,
    target: Volume,
    box: tuple[slice, slice, slice],
    ramp_vox: float = 16.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Window low-res logits sampled onto ``target.array[box]``, and blending weights there.

    The logits are interpolated trilinearly straight from the low-res grid (the same function
    that upsampling to 128^3 with align_corners=False computes, evaluated at the CT voxel
    centres); weights are 0 where the window does not cover the voxel.
    """
    m = lowres_logits.shape[-1]
    logits = np.asarray(lowres_logits, dtype=np.float32).reshape(m, m, m)
    dst_aff = box_affine(target, box)
    shape = tuple(s.stop - s.start for s in box)
    values = resample(logits, geom.lowres_affine(m), shape, dst_aff, order=1, edge=True)
    # window coordinates of the box voxels, for coverage and blending weights
    mp = _mapping(geom.affine, dst_aff, shape)
    if mp.perm is not None:
        assert mp.coords_1d is not None
        w_axes = [blend_weight_1d(mp.coords_1d[a], geom.size, ramp_vox) for a in range(3)]
        # coords_1d[a] is the window coordinate along window axis perm[a] for box axis a
        weights = w_axes[0][:, None, None] * w_axes[1][None, :, None] * w_axes[2][None, None, :]
    else:
        m = mp.matrix.astype(np.float32)
        i, j, k = (np.arange(n, dtype=np.float32) for n in shape)
        weights = np.ones(shape, dtype=np.float32)
        for a in range(3):  # window coordinate along window axis a, one axis at a time
            q = m[a, 0] * i[:, None, None] + m[a, 1] * j[None, :, None] + (m[a, 2] * k + m[a, 3])[None, None, :]
            weights *= blend_weight_1d(q, geom.size, ramp_vox)
    return values, weights


def lowres_positive_extent(lowres_logits: np.ndarray, threshold: float = 0.0) -> list[tuple[float, float]] | None:
    """Index-space extent (per axis, in low-res voxels, +-1 voxel) of logits > threshold."""
    m = lowres_logits.shape[-1]
    pos = np.asarray(lowres_logits).reshape(m, m, m) > threshold
    if not pos.any():
        return None
    ext = []
    for a in range(3):
        other = tuple(i for i in range(3) if i != a)
        idx = np.nonzero(pos.any(axis=other))[0]
        ext.append((float(idx[0] - 1), float(idx[-1] + 1)))
    return ext
