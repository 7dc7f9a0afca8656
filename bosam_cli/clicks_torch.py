"""Training click simulation on the training device (torch), batched over windows.

``clicks.py`` simulates one click at a time on host NumPy arrays with an exact distance
transform. On a GPU that costs a device-to-host copy of the 128³ prediction and tens of
milliseconds of host work per decoder call, which bounds a training step (benchmarks/RESULTS.md).
Here the same two training simulators run on the tensors where the prediction already is, for
the whole batch at once, with no host round trip except one emptiness check every few erosions:

``uniform_clicks``
    ``clicks.uniform_error_click`` for every window: uniform over FN u FP, positive iff in FN.
``interior_clicks``
    ``clicks.ritm_click`` with the chessboard depth (``erosion_depth``: how many 3x3x3 erosions
    a voxel survives, the outside of the window counting as background) in place of the
    Euclidean distance transform: the region (FN or FP) with the larger maximum depth, uniform
    among its voxels deeper than half that maximum (FP on a tie, as ``ritm_click``).

A window without any error gets a padding point (label -1). Random choices come from a
``torch.Generator`` on the device, which ``ClickLoop`` seeds from its per-step NumPy generator,
so a resumed run draws the same clicks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["erosion_depth", "uniform_clicks", "interior_clicks", "sim_clicks"]

#: rounds of erosion between two emptiness checks (each check waits for the device)
_CHECK_EVERY = 4


def erosion_depth(mask: torch.Tensor) -> torch.Tensor:
    """Chessboard distance of every ``mask`` voxel to the nearest non-mask voxel, the outside of
    the array counting as non-mask; 0 outside the mask.

    Args:
        mask: (B, X, Y, Z) bool.

    Returns:
        (B, X, Y, Z) int32: the number of 3x3x3 erosions (with a background border) each voxel
        survives, which equals ``scipy.ndimage.distance_transform_cdt(padded, 'chessboard')``
        cropped back.
    """
    if mask.ndim != 4:
        raise ValueError(f"expected (B, X, Y, Z) masks, got shape {tuple(mask.shape)}")
    depth = torch.zeros(mask.shape, dtype=torch.int32, device=mask.device)
    cur = mask.bool()
    dtype = torch.float16 if mask.is_cuda else torch.float32
    for k in range(max(mask.shape[1:]) // 2 + 1):
        if k % _CHECK_EVERY == 0 and not bool(cur.any()):
            break
        depth += cur
        background = F.pad((~cur).to(dtype)[:, None], (1, 1, 1, 1, 1, 1), value=1.0)
        cur = F.max_pool3d(background, kernel_size=3, stride=1)[:, 0] == 0
    return depth


def _pick(candidates: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One uniformly random True position per row of (B, N) ``candidates`` (flat index; 0 for
    an empty row): the arg-max of i.i.d. uniform keys over the candidates."""
    keys = torch.rand(candidates.shape, generator=generator, device=candidates.device)
    return keys.masked_fill_(~candidates, -1.0).argmax(1)


def _as_points(idx: torch.Tensor, valid: torch.Tensor, gt_flat: torch.Tensor,
               shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, 3) float voxel points and (B, 1) int64 labels (1 FN, 0 FP, -1 no error)."""
    _, y, z = shape
    ijk = torch.stack((idx // (y * z), (idx // z) % y, idx % z), dim=1).to(torch.float32)
    positive = gt_flat.gather(1, idx[:, None])[:, 0]
    labels = torch.where(valid, positive.long(), torch.full_like(idx, -1))
    return ijk[:, None, :], labels[:, None]


def uniform_clicks(pred: torch.Tensor, gt: torch.Tensor,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window, a click uniform over its error region (FN u FP), positive iff in FN.

    Args:
        pred, gt: (B, X, Y, Z) bool on one device.

    Returns:
        points (B, 1, 3) float32 voxel indices and labels (B, 1) int64: 1 / 0, or -1 where the
        prediction has no error (the point is then a padding point the model ignores).
    """
    gt_flat = gt.flatten(1)
    err = pred.flatten(1) ^ gt_flat
    return _as_points(_pick(err, generator), err.any(1), gt_flat, tuple(gt.shape[1:]))


def interior_clicks(pred: torch.Tensor, gt: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window, a click deep inside the larger error region (``clicks.ritm_click`` with the
    chessboard depth): the region, FN or FP, with the larger maximum ``erosion_depth`` (FP on a
    tie), then uniform among its voxels deeper than half that maximum. Same outputs as
    ``uniform_clicks``."""
    fn, fp = gt & ~pred, pred & ~gt
    dfn, dfp = erosion_depth(fn).flatten(1), erosion_depth(fp).flatten(1)
    fn_max, fp_max = dfn.amax(1), dfp.amax(1)
    positive = fn_max > fp_max
    depth = torch.where(positive[:, None], dfn, dfp)
    dmax = torch.maximum(fn_max, fp_max)
    candidates = depth.to(torch.float32) * 2 > dmax[:, None].to(torch.float32)
    return _as_points(_pick(candidates, generator), dmax > 0, gt.flatten(1), tuple(gt.shape[1:]))


def sim_clicks(pred: torch.Tensor, gt: torch.Tensor, interior: list[bool],
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``interior_clicks`` for the windows where ``interior[i]``, ``uniform_clicks`` for the
    others (``--click-sim mixed`` draws ``interior`` per window; ``uniform`` is all False)."""
    if len(interior) != pred.shape[0]:
        raise ValueError(f"interior has {len(interior)} entries for {pred.shape[0]} windows")
    pts, labs = uniform_clicks(pred, gt, generator)
    if any(interior):
        sel = torch.tensor(interior, device=pred.device)
        ipts, ilabs = interior_clicks(pred, gt, generator)
        pts = torch.where(sel[:, None, None], ipts, pts)
        labs = torch.where(sel[:, None], ilabs, labs)
    return pts, labs
