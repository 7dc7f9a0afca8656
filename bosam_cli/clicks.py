"""Click simulation, shared by training (``train.py``) and evaluation (``evaluate.py``).

A simulated user looks at the current prediction and the ground truth and places one new click in
an error region: a *positive* click inside a false negative (object missed), a *negative* click
inside a false positive (leak). Everything here works on boolean 3-D NumPy arrays in one grid's
voxel order (i, j, k); a torch tensor can be passed after ``.cpu().numpy()``. No torch import.

Generators, and who uses them (facts in ``reference/FACTS.md`` section 5 and 6):

``first_click`` / ``center_click``
    ``bosam evaluate``'s default ``clicks`` protocol: the first click at the deepest voxel of the
    object, each next one at the deepest voxel of the error regions, measured in millimetres
    (spacing-aware distance transform). Deterministic.
``uniform_error_click``
    The published training simulator: uniform over FN u FP, positive iff in FN. With an empty
    prediction the first click is a uniformly random object voxel.
``ritm_click``
    The published validation's generator for clicks 1 and 2 (RITM-style, voxel units).
``bosam_protocol_click``
    The published validation's full sequence: ``ritm_click`` for steps 0 and 1, then
    ``uniform_error_click``.
``training_schedule``
    Which decoder steps of the published iterative training loop receive a new point.

Distances are always measured with a one-voxel background border around the array (pad, EDT,
crop): a region cut by the array's edge has its centre inside the visible part rather than on
the edge. Error regions are cropped to their bounding box before the transform, which is exact
and keeps a click on a 512x512x400 CT cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

__all__ = [
    "SimClick",
    "Click",
    "error_masks",
    "border_edt",
    "center_click",
    "first_click",
    "uniform_error_click",
    "ritm_click",
    "bosam_protocol_click",
    "training_schedule",
]

RngLike = np.random.Generator | int | None


@dataclass(frozen=True)
class SimClick:
    """One simulated click.

    Attributes:
        ijk: voxel index in the array order of the masks it was computed from.
        positive: True for a foreground click (false negative region), False for a background
            click (false positive region). SAM label 1 / 0.
    """

    ijk: tuple[int, int, int]
    positive: bool

    @property
    def label(self) -> int:
        """SAM point label: 1 positive, 0 negative."""
        return 1 if self.positive else 0


Click = SimClick


# ---------------------------------------------------------------------------------------------
# helpers


def _as_rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _as_masks(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred_b = np.asarray(pred).astype(bool, copy=False)
    gt_b = np.asarray(gt).astype(bool, copy=False)
    if pred_b.shape != gt_b.shape:
        raise ValueError(f"prediction shape {pred_b.shape} differs from ground truth shape {gt_b.shape}")
    if gt_b.ndim != 3:
        raise ValueError(f"expected 3-D masks, got shape {gt_b.shape}")
    return pred_b, gt_b


def _spacing(spacing_mm: Sequence[float] | None) -> tuple[float, float, float] | None:
    if spacing_mm is None:
        return None
    sp = tuple(float(s) for s in np.asarray(spacing_mm, dtype=np.float64).reshape(-1))
    if len(sp) != 3 or not all(np.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing_mm must be three positive numbers, got {spacing_mm!r}")
    return sp  # type: ignore[return-value]


def error_masks(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false negatives, false positives) = (gt & ~pred, pred & ~gt) as boolean arrays."""
    pred_b, gt_b = _as_masks(pred, gt)
    return gt_b & ~pred_b, pred_b & ~gt_b


def border_edt(mask: np.ndarray, spacing_mm: Sequence[float] | None = None) -> np.ndarray:
    """Distance of each ``mask`` voxel to the nearest non-mask voxel, outside of the array counting
    as non-mask (a one-voxel zero border: pad, EDT, crop). Zero outside the mask.

    Units: voxels when ``spacing_mm`` is None, millimetres otherwise. Computed on the mask's
    bounding box only (exact, since everything outside it is background).
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    out = np.zeros(mask.shape, dtype=np.float64)
    box = _bbox(mask)
    if box is None:
        return out
    sub = np.pad(mask[box], 1, mode="constant", constant_values=False)
    dist = ndimage.distance_transform_edt(sub, sampling=_spacing(spacing_mm))
    out[box] = dist[1:-1, 1:-1, 1:-1]
    return out


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding-box slices of a boolean array, or None when it is empty."""
    if not mask.any():
        return None
    slices = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        slices.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(slices)


def _to_ijk(flat_index: int, shape: tuple[int, ...]) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.unravel_index(int(flat_index), shape))  # type: ignore[return-value]


def _pick(candidates_flat: np.ndarray, rng: np.random.Generator | None) -> int:
    """First candidate (deterministic) or a uniformly random one when an rng is given."""
    if rng is None or len(candidates_flat) == 1:
        return int(candidates_flat[0])
    return int(candidates_flat[rng.integers(len(candidates_flat))])


def _nearest_to_centroid(candidates_flat: np.ndarray, shape: tuple[int, ...], spacing: Sequence[float] | None) -> int:
    """The candidate nearest (in mm when ``spacing`` is given) to the candidates' centroid; the
    first in C order among equally near ones."""
    if len(candidates_flat) == 1:
        return int(candidates_flat[0])
    pts = np.stack(np.unravel_index(candidates_flat, shape), axis=1).astype(np.float64)
    if spacing is not None:
        pts *= np.asarray(spacing, np.float64)
    d2 = ((pts - pts.mean(axis=0)) ** 2).sum(axis=1)
    return int(candidates_flat[int(np.argmin(d2))])


# ---------------------------------------------------------------------------------------------
# generators


def center_click(
    pred: np.ndarray,
    gt: np.ndarray,
    rng: RngLike = None,
    spacing_mm: Sequence[float] | None = None,
) -> SimClick | None:
    """The click at the centre of the largest error region.

    False negatives and false positives are treated as separate regions (a FN voxel next to a FP
    voxel is a border for both). Each region's distance to its own border is computed (spacing-
    aware when ``spacing_mm`` is given, see ``border_edt``); the click goes to the voxel with the
    largest distance overall, i.e. the centre of the error component with the largest inscribed
    ball. That is where a user clicks: the worst mistake, far from any edge where a click would be
    ambiguous. Positive iff that voxel is a false negative.

    Ties: between FN and FP, the false negative wins; among voxels, the one nearest (in mm) to
    the centroid of the tied voxels (first in C order among equals), or a uniformly random one
    when ``rng`` is given (a Generator or a seed). Thin objects and thick slices tie over long
    stretches (a rib at 3 mm slices is 3 mm deep almost everywhere): the centroid rule puts the
    click midway along them, not at whichever end comes first in memory, possibly the CT's last
    slice.

    Returns None when the prediction equals the ground truth.
    """
    fn, fp = error_masks(pred, gt)
    sp = _spacing(spacing_mm)
    best: tuple[float, bool, np.ndarray] | None = None
    for region, positive in ((fn, True), (fp, False)):
        if not region.any():
            continue
        dist = border_edt(region, sp)
        dmax = float(dist.max())
        if best is None or dmax > best[0] * (1.0 + 1e-9):
            best = (dmax, positive, dist)
    if best is None:
        return None
    dmax, positive, dist = best
    candidates = np.flatnonzero(dist.ravel() >= dmax * (1.0 - 1e-9))
    if rng is None:
        return SimClick(_to_ijk(_nearest_to_centroid(candidates, dist.shape, sp), dist.shape), positive)
    return SimClick(_to_ijk(_pick(candidates, _as_rng(rng)), dist.shape), positive)


def first_click(gt: np.ndarray, spacing_mm: Sequence[float] | None = None) -> SimClick:
    """The first click of the evaluate protocol: positive, at the voxel of ``gt`` farthest from the
    object's border (ties: the tied voxel nearest their centroid). Equals ``center_click(zeros, gt)``.

    Raises ValueError when ``gt`` is empty (there is nothing to click on).
    """
    gt_b = np.asarray(gt).astype(bool, copy=False)
    click = center_click(np.zeros_like(gt_b), gt_b, None, spacing_mm)
    if click is None:
        raise ValueError("first_click: the ground-truth mask is empty")
    return click


def uniform_error_click(pred: np.ndarray, gt: np.ndarray, rng: RngLike) -> SimClick | None:
    """A click drawn uniformly over the error region FN u FP; positive iff it falls in FN.

    The published training simulator (FACTS.md section 5): with an empty prediction the first
    click is a uniformly random object voxel. Returns None when there is no error.
    """
    fn, fp = error_masks(pred, gt)
    errors = np.flatnonzero((fn | fp).ravel())
    if errors.size == 0:
        return None
    flat = int(errors[_as_rng(rng).integers(errors.size)])
    return SimClick(_to_ijk(flat, fn.shape), bool(fn.ravel()[flat]))


def ritm_click(pred: np.ndarray, gt: np.ndarray, rng: RngLike) -> SimClick | None:
    """The published validation's generator for clicks 1 and 2 (FACTS.md section 6, step 4).

    Distances (voxel units) of the FN and of the FP region to their borders, each with a one-voxel
    zero border; the region with the larger maximum distance is chosen (FP on a tie, as the
    original's strict ``fn > fp`` comparison does); the click is uniform among the voxels of the
    chosen region whose distance exceeds half that maximum; positive iff the region is FN.
    Unlike the original, an empty error region does not crash: None when there is no error.
    """
    fn, fp = error_masks(pred, gt)
    fn_dist = border_edt(fn)
    fp_dist = border_edt(fp)
    fn_max = float(fn_dist.max()) if fn.any() else 0.0
    fp_max = float(fp_dist.max()) if fp.any() else 0.0
    if fn_max == 0.0 and fp_max == 0.0:
        return None
    positive = fn_max > fp_max
    dist, dmax = (fn_dist, fn_max) if positive else (fp_dist, fp_max)
    candidates = np.flatnonzero(dist.ravel() > dmax / 2.0)
    flat = int(candidates[_as_rng(rng).integers(candidates.size)])
    return SimClick(_to_ijk(flat, dist.shape), positive)


def bosam_protocol_click(step: int, pred: np.ndarray, gt: np.ndarray, rng: RngLike) -> SimClick | None:
    """Click ``step`` (0-based) of BoSAM's published validation: ``ritm_click`` for steps 0 and 1,
    ``uniform_error_click`` afterwards (FACTS.md section 6). The caller thresholds the upsampled
    previous logits at 0.5 (not 0) to get ``pred``, as the original does."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < 2:
        return ritm_click(pred, gt, rng)
    return uniform_error_click(pred, gt, rng)


def training_schedule(num_clicks: int, rng: RngLike) -> list[bool]:
    """Which of ``num_clicks`` decoder steps of one training sample get a new point.

    The published iterative loop (FACTS.md section 5; SAM-Med3D 11 steps, BoSAM 10) calls the
    decoder ``num_clicks`` times with the previous low-res logits as mask prompt. Each step feeds
    one new simulated point (True), except two mask-prompt-only steps (False) that teach the
    model to refine from its own mask: one random step drawn uniformly from 2..8 (the published
    ``randint(2, 9)``, whatever the loop length; 2..num_clicks - 2 in loops shorter than 10)
    and the last step. Step 0 always has a point.

    Short loops: 1 step -> [True]; 2 or 3 steps -> only the last step is point-free (the random
    range is empty). Note the published code still samples (and discards) a click on the
    point-free steps; callers reproducing its RNG stream must do the same.
    """
    if num_clicks < 1:
        raise ValueError(f"num_clicks must be >= 1, got {num_clicks}")
    schedule = [True] * num_clicks
    if num_clicks == 1:
        return schedule
    schedule[-1] = False
    if num_clicks >= 4:
        schedule[int(_as_rng(rng).integers(2, min(9, num_clicks - 1)))] = False
    return schedule
