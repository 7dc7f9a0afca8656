"""``bosam evaluate``: how good is a model (or the threshold baseline) after 1, 5, 10 clicks.

Two protocols, both driven by simulated users from ``clicks.py``:

``clicks`` (default; bosam's own)
    Per case and per label, on the CT's original voxel grid, through the segmenter's
    ``add_click``/``mask`` surface (for a model: the very ``Session`` that ``bosam segment``
    uses). Click 1 at the deepest voxel of the object; each next click at the centre of the
    largest error region (false negatives -> positive click, false positives -> negative),
    distances in millimetres. Dice and normalised surface Dice (NSD, 2 mm tolerance, MONAI)
    after every click, and the time each click took.

``bosam`` (BoSAM's published ``validation.py`` definition, FACTS.md section 6)
    One 128^3 crop per case, cases in a seeded shuffled order: the case cropped to 128^3
    around the merged bone mask's bounding box, then inside that crop centred on a random
    voxel of the mask (zero padding), then re-centred on the bounding box of the mask inside
    that crop (torchio CropOrPad rule; a case whose first crop holds no mask voxel is replaced
    by a random other case, as published); z-scored on the crop; clicks 1-2 RITM, later ones uniform in
    the error region, simulated on ``upsampled logits > 0.5``; one new point per decoder call
    with the previous low-res logits; Dice on the crop with ``logits > 0`` (rounded to 4
    decimals); every selected label merged into one mask; the figure for N clicks is the mean
    over cases of the *best* Dice among the first N clicks; seed 2023. ``grid="native"`` (as
    published) cuts the crop from the stored voxel array at its own spacing, clamping HU only
    for paths containing ``/ct_``; ``grid="model"`` cuts it as a model window (1.5 mm, RAS,
    the checkpoint's clamp). The random streams are NumPy's, not the original's torch/NumPy
    mix, so individual crops and clicks differ from a run of the original script. The script
    centres the crop on a voxel of label 1 (its label files are binary); in a multi-label map
    bosam draws from every selected label. An empty label file is a dataset error here
    (``--skip-bad`` leaves the case out), where the script's loader would draw another case.

Outputs: ``evaluation.csv`` (one row per case, label and click), ``evaluation.json`` (settings,
summary, rows) and ``evaluation.md`` (a Markdown table).
"""

from __future__ import annotations

import csv
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .clicks import bosam_protocol_click, center_click, first_click
from .data import CaseStore, ScanResult, structure_voxels
from .session import REFINE_HU, ClickReport
from .volume import Volume
from .windows import WindowGeometry, normalise, resample, sample_labels, sample_window, window_at

PROTOCOLS = ("clicks", "bosam")
BOSAM_GRIDS = ("native", "model")
DEFAULT_CLICKS = (1, 5, 10)
NSD_TOLERANCE_MM = 2.0
BOSAM_SEED = 2023
CSV_FIELDS = ["protocol", "case", "label", "label_name", "click", "positive", "voxel", "dice", "nsd",
              "seconds", "encoder_s", "decoder_s", "gt_voxels", "pred_voxels", "other_voxels", "note"]
PROTOCOL_TEXT = {
    "clicks": "bosam 'clicks' protocol: per case and label on the original CT grid through the segment Session; "
              "click 1 at the object's deepest voxel, each next click at the centre of the largest error region "
              "(mm distance transform); Dice and NSD@{tol} mm after each click",
    "bosam": "BoSAM published protocol (its validation script): one 128^3 crop per case (random bone "
             "voxel, re-centred on the label bbox), RITM clicks 1-2 then uniform error-region clicks, one new point "
             "+ previous logits per decoder call, Dice on the crop with all selected labels merged, per-case BEST Dice "
             "of the first N clicks, mean over cases, seed {seed}; crop grid: {grid}",
}


@dataclass
class ClickRecord:
    """The state after one click of one object."""

    protocol: str
    case: str
    label: int
    label_name: str
    click: int
    positive: bool | None
    voxel: list[int] | None
    dice: float
    nsd: float | None
    seconds: float
    encoder_s: float = 0.0
    decoder_s: float = 0.0
    gt_voxels: int = 0
    pred_voxels: int = 0
    other_voxels: int = 0  # predicted voxels in other labelled structures of the case (clicks protocol)
    note: str = ""

    @property
    def other_share(self) -> float | None:
        """Share of the predicted voxels that lie in other labelled structures; None for an empty
        prediction (it leaks nothing, but counting it as 0 % would reward predicting nothing)."""
        return self.other_voxels / self.pred_voxels if self.pred_voxels else None


# ---------------------------------------------------------------------------------------------
# metrics


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """2|P n G| / (|P| + |G|); 1.0 when both are empty."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / denom


def _bbox_union(a: np.ndarray, b: np.ndarray, margin: int) -> tuple[slice, slice, slice] | None:
    m = a | b
    if not m.any():
        return None
    out = []
    for axis in range(3):
        other = tuple(x for x in range(3) if x != axis)
        hit = np.flatnonzero(m.any(axis=other))
        out.append(slice(max(0, int(hit[0]) - margin), min(m.shape[axis], int(hit[-1]) + 1 + margin)))
    return tuple(out)  # type: ignore[return-value]


def surface_dice(pred: np.ndarray, gt: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """Normalised surface Dice at ``tolerance_mm`` (MONAI ``compute_surface_dice``), computed
    on the bounding box of both masks plus a margin, with the grid's spacing. 1.0 when both are
    empty, 0.0 when exactly one is."""
    import torch
    from monai.metrics import compute_surface_dice

    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    if not p.any() and not g.any():
        return 1.0
    if not p.any() or not g.any():
        return 0.0
    margin = int(math.ceil(tolerance_mm / float(min(spacing_mm)))) + 2
    box = _bbox_union(p, g, margin)
    assert box is not None
    p, g = np.pad(p[box], 1), np.pad(g[box], 1)

    def onehot(m: np.ndarray) -> "torch.Tensor":
        return torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_surface_dice(onehot(p), onehot(g), [float(tolerance_mm)],
                                     spacing=[float(s) for s in spacing_mm])
    return float(value.reshape(-1)[0])


# ---------------------------------------------------------------------------------------------
# protocol "clicks"


def _next_click(pred: np.ndarray, gt: np.ndarray, spacing_mm: Sequence[float], margin: int = 4):
    """``center_click`` computed in the bounding box of object u prediction (plus a margin)."""
    box = _bbox_union(pred, gt, margin)
    if box is None:
        return None
    c = center_click(pred[box], gt[box], None, spacing_mm)
    if c is None:
        return None
    ijk = tuple(int(v) + s.start for v, s in zip(c.ijk, box))
    return ijk, c.positive


def _pick_labels(labels: dict[int, int], limit: int | None) -> list[int]:
    if limit is None or limit >= len(labels):
        return sorted(labels)
    largest = sorted(labels, key=lambda k: (-labels[k], k))[:limit]
    return sorted(largest)


def run_clicks_protocol(
    segmenter: Any,
    scan: ScanResult,
    n_clicks: int,
    max_cases: int | None = None,
    labels_per_case: int | None = None,
    nsd_tolerance_mm: float | None = NSD_TOLERANCE_MM,
    cache: str | None = None,
    on_record: Callable[[ClickRecord], None] | None = None,
) -> list[ClickRecord]:
    """Run the ``clicks`` protocol with any segmenter that has ``set_volume``, ``add_click``,
    ``mask`` and ``reset`` (a ``Session``, the threshold baseline, a test double).

    After the object is segmented perfectly no further click exists; the remaining rows repeat
    the last metrics with ``note="no error left"``. ``nsd_tolerance_mm=None`` skips NSD. Each row
    also counts the predicted voxels that the case's label map gives to another structure
    (``other_voxels``: a neighbouring bone, an organ; whatever the label file holds, whether or
    not ``--labels`` evaluates it).
    """
    store = CaseStore(scan.infos[:max_cases] if max_cases else scan.infos, cache, keep=1)
    records: list[ClickRecord] = []
    for index, info in enumerate(store.infos):
        image, labels = store.load(index)
        segmenter.set_volume(image)
        spacing = [float(s) for s in image.spacing_mm]
        labelled = structure_voxels(np.asarray(labels.array), info.ignore)
        # nnU-Net's 'ignore' voxels were never annotated: no metric counts them, no click goes there
        annotated = ~np.isin(np.asarray(labels.array), info.ignore) if info.ignore else None
        for lab in _pick_labels(info.labels, labels_per_case):
            name = scan.label_names.get(lab, f"label_{lab}")
            gt = np.asarray(labels.array) == lab
            gt_voxels = int(gt.sum())
            segmenter.reset(lab)
            c = first_click(gt, spacing)
            click: tuple[tuple[int, int, int], bool] | None = (c.ijk, True)
            last: ClickRecord | None = None
            for k in range(1, n_clicks + 1):
                if click is None:
                    assert last is not None
                    rec = ClickRecord(**{**asdict(last), "click": k, "positive": None, "voxel": None,
                                         "seconds": 0.0, "encoder_s": 0.0, "decoder_s": 0.0, "note": "no error left"})
                else:
                    ijk, positive = click
                    t0 = time.perf_counter()
                    report = segmenter.add_click(lab, voxel=np.asarray(ijk, dtype=np.float64), positive=positive)
                    pred = segmenter.mask(lab)
                    dt = time.perf_counter() - t0
                    if annotated is not None:
                        pred = pred & annotated
                    nsd = surface_dice(pred, gt, spacing, nsd_tolerance_mm) if nsd_tolerance_mm else None
                    rec = ClickRecord(
                        "clicks", info.case.key, lab, name, k, positive, [int(v) for v in ijk], dice_score(pred, gt), nsd,
                        dt, float(getattr(report, "encoder_s", 0.0)), float(getattr(report, "decoder_s", 0.0)),
                        gt_voxels, int(pred.sum()), int(np.count_nonzero(pred & labelled & ~gt)),
                        str(getattr(report, "note", "") or ""),
                    )
                    click = _next_click(pred, gt, spacing) if k < n_clicks else None
                records.append(rec)
                last = rec
                if on_record is not None:
                    on_record(rec)
            segmenter.reset(lab)
    return records


# ---------------------------------------------------------------------------------------------
# protocol "bosam"


def upsample_lowres(lowres_logits: np.ndarray, size: int) -> np.ndarray:
    """(m, m, m) low-res logits -> (size,)^3, trilinear, align_corners=False (what the
    reference's F.interpolate computes), in NumPy through ``windows.resample``."""
    m = lowres_logits.shape[-1]
    geom = WindowGeometry((0.0, 0.0, 0.0), 1.0, size)
    return resample(np.asarray(lowres_logits, np.float32).reshape(m, m, m), geom.lowres_affine(m), (size,) * 3,
                    geom.affine, order=1, edge=True)


class CropSegmenter:
    """An engine on one fixed 128^3 crop, as BoSAM's validation runs it: the crop is the model
    input as is (no window placement), each click is one decoder call with that single point
    and the previous low-res logits (zeros first). Surface of ``Session`` plus ``logits``."""

    def __init__(self, engine: Any, clamp_hu: tuple[float, float] | None) -> None:
        self.engine = engine
        self.clamp_hu = clamp_hu
        self.size = int(engine.info.img_size)
        self.m = int(engine.info.mask_size)
        self.volume: Volume | None = None
        self._emb = None
        self._low: np.ndarray | None = None
        self._up: np.ndarray | None = None

    def set_volume(self, volume: Volume) -> None:
        if volume.shape != (self.size,) * 3:
            raise ValueError(f"crop must be {self.size}^3, got {volume.shape}")
        self.volume = volume
        t0 = time.perf_counter()
        self._emb = self.engine.encode(normalise(np.asarray(volume.array, np.float32), self.clamp_hu)[None, None])
        self.encoder_s = time.perf_counter() - t0
        self.reset()

    def reset(self, label: int | None = None) -> None:
        self._low = np.zeros((1, 1, self.m, self.m, self.m), np.float32)
        self._up = None

    def add_click(self, label: int, voxel: np.ndarray, positive: bool = True, xyz: Any = None) -> Any:
        pts = np.asarray(voxel, np.float32).reshape(1, 1, 3)
        labs = np.array([[1 if positive else 0]], np.int64)
        t0 = time.perf_counter()
        low, _ = self.engine.decode(self._emb, pts, labs, self._low)
        dt = time.perf_counter() - t0
        self._low = np.asarray(low, np.float32).reshape(1, 1, self.m, self.m, self.m)
        self._up = None
        return ClickReport(label, positive, decoder_calls=1, decoder_s=dt)

    def logits(self, label: int = 1) -> np.ndarray:
        if self._up is None:
            assert self._low is not None
            self._up = upsample_lowres(self._low[0, 0], self.size)
        return self._up

    def mask(self, label: int = 1) -> np.ndarray:
        return self.logits(label) > 0


def _crop_with_pad(array: np.ndarray, start: Sequence[int], size: int, pad: float) -> np.ndarray:
    """``array[start : start + size]`` per axis, zero-padded (``pad``) where it leaves the array."""
    out = np.full((size,) * 3, pad, dtype=array.dtype)
    src, dst = [], []
    for a in range(3):
        lo, hi = int(start[a]), int(start[a]) + size
        s0, s1 = max(lo, 0), min(hi, array.shape[a])
        if s1 <= s0:
            return out
        src.append(slice(s0, s1))
        dst.append(slice(s0 - lo, s1 - lo))
    out[tuple(dst)] = array[tuple(src)]
    return out


def croporpad_start(mask: np.ndarray, size: int) -> list[int]:
    """Start indices of a ``size`` crop centred on ``mask``'s bounding box by torchio's
    CropOrPad rule: bbox [min, max + 1), centre c = its mean, minus 0.5 when c is
    half-integer (even ``size``), start = c - size / 2."""
    starts = []
    for axis in range(3):
        other = tuple(x for x in range(3) if x != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        lo, hi = int(hit[0]), int(hit[-1]) + 1
        c = (lo + hi) / 2.0
        if c != int(c):
            c -= 0.5
        starts.append(int(c) - size // 2)
    return starts


def bosam_crop(image: Volume, merged: np.ndarray, rng: np.random.Generator, grid: str, spacing_mm: float,
               size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The published crop: ``CropOrPad(label, size)`` of the whole case (centred on the label's
    bounding box), then ``pcc`` inside that crop: centred on a random label voxel (zero padding
    beyond the first crop), then re-centred on the label's bounding box in it. Returns (raw HU
    crop, GT crop, crop affine), or None when the first crop holds no label voxel (labels far
    apart around an empty centre: the published loader then takes another case)."""
    if grid == "native":
        start0 = croporpad_start(merged, size)
        img0 = _crop_with_pad(np.asarray(image.array), start0, size, 0)
        gt0 = _crop_with_pad(merged, start0, size, False)
        aff0 = image.affine @ _shift(start0)
    else:  # the same on a window resampled to the model's grid, centred on the box centre
        box = [np.flatnonzero(merged.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
        centre_vox = np.array([(b[0] + b[-1]) / 2.0 for b in box])
        geom = window_at(image.voxel_to_world(centre_vox)[0], spacing_mm, size, snap_vox=0)
        img0 = sample_window(image, geom, 0.0)
        gt0 = sample_labels(Volume(merged.astype(np.uint8), image.affine), geom) > 0
        aff0 = geom.affine
    fg = np.flatnonzero(gt0.ravel())
    if fg.size == 0:
        return None
    centre = np.unravel_index(int(fg[int(rng.integers(fg.size))]), gt0.shape)
    start1 = [int(c) - size // 2 for c in centre]
    img1 = _crop_with_pad(img0, start1, size, 0)
    gt1 = _crop_with_pad(gt0, start1, size, False)
    start2 = croporpad_start(gt1, size)
    img2 = _crop_with_pad(img1, start2, size, 0)
    gt2 = _crop_with_pad(gt1, start2, size, False)
    return img2, gt2, aff0 @ _shift(start1) @ _shift(start2)


def _shift(start: Sequence[int]) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = start
    return m


def run_bosam_protocol(
    make_segmenter: Callable[[tuple[float, float] | None], Any],
    scan: ScanResult,
    n_clicks: int,
    grid: str = "native",
    spacing_mm: float = 1.5,
    clamp_hu: tuple[float, float] | None = (-1000.0, 1000.0),
    seed: int = BOSAM_SEED,
    max_cases: int | None = None,
    size: int = 128,
    on_record: Callable[[ClickRecord], None] | None = None,
    cache: str | None = None,
) -> list[ClickRecord]:
    """BoSAM's published validation (module docstring). ``make_segmenter(clamp)`` gives a
    segmenter for a 128^3 crop volume (``CropSegmenter`` for a model). Dice is recorded for every
    click; ``summarise`` takes the per-case best of the first N."""
    if grid not in BOSAM_GRIDS:
        raise ValueError(f"grid must be one of {BOSAM_GRIDS}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(scan.infos)).tolist()
    if max_cases:
        order = order[:max_cases]
    store = CaseStore(scan.infos, cache, keep=1)
    records: list[ClickRecord] = []
    used: dict[str, int] = {}
    for index in order:
        for attempt in range(len(scan.infos) + 1):
            if attempt:  # no label in the first crop: another random case, as published
                index = int(rng.integers(len(scan.infos)))
            info = scan.infos[index]
            image, labels = store.load(index)
            merged = np.isin(np.asarray(labels.array), sorted(info.labels))
            crop = bosam_crop(image, merged, rng, grid, spacing_mm, size)
            if crop is not None:
                break
        if crop is None:
            continue
        raw, gt, affine = crop
        # a case drawn again as a replacement is a sample of its own (best-of-N is per sample)
        used[info.case.key] = used.get(info.case.key, 0) + 1
        sample_key = info.case.key if used[info.case.key] == 1 else f"{info.case.key}#{used[info.case.key]}"
        if grid == "native":
            clamp = (-1000.0, 1000.0) if "/ct_" in str(info.case.image) else None
        else:
            clamp = clamp_hu
        seg = make_segmenter(clamp)
        t0 = time.perf_counter()
        seg.set_volume(Volume(raw, affine))
        enc_s = time.perf_counter() - t0
        seg.reset(1)
        pred_for_clicks = np.zeros(gt.shape, bool)
        gt_voxels = int(gt.sum())
        last: ClickRecord | None = None
        for k in range(n_clicks):
            c = bosam_protocol_click(k, pred_for_clicks, gt, rng)
            if c is None:
                assert last is not None or gt_voxels == 0
                if last is None:
                    break
                rec = ClickRecord(**{**asdict(last), "click": k + 1, "positive": None, "voxel": None, "seconds": 0.0,
                                     "encoder_s": 0.0, "decoder_s": 0.0, "note": "no error left"})
            else:
                t0 = time.perf_counter()
                report = seg.add_click(1, voxel=np.asarray(c.ijk, np.float64), positive=c.positive)
                logits = _crop_logits(seg, gt.shape)
                dt = time.perf_counter() - t0
                pred = logits > 0
                pred_for_clicks = logits > 0.5
                rec = ClickRecord(
                    "bosam", sample_key, 0, "+".join(scan.label_names.get(i, str(i)) for i in sorted(info.labels))[:80],
                    k + 1, c.positive, list(c.ijk), round(dice_score(pred, gt), 4) if gt_voxels or pred.any() else float("nan"),
                    None, dt + (enc_s if k == 0 else 0.0), enc_s if k == 0 else 0.0, float(getattr(report, "decoder_s", 0.0)),
                    gt_voxels, int(pred.sum()),
                )
            records.append(rec)
            last = rec
            if on_record is not None:
                on_record(rec)
    return records


def _crop_logits(seg: Any, shape: tuple[int, ...]) -> np.ndarray:
    if hasattr(seg, "logits"):
        return seg.logits(1)
    got = seg.object_logits(1)
    out = np.full(shape, -10.0, np.float32)
    if got is not None:
        box, logits = got
        out[box] = np.where(np.isfinite(logits), logits, -10.0)
    return out


# ---------------------------------------------------------------------------------------------
# summary and outputs


def summarise(records: Sequence[ClickRecord], clicks: Sequence[int], protocol: str) -> dict[str, Any]:
    """Mean Dice (and NSD) at each asked click count: per label and overall for ``clicks``;
    mean over cases of the per-case best of the first N for ``bosam``."""
    clicks = sorted(set(int(c) for c in clicks))
    out: dict[str, Any] = {"protocol": protocol, "clicks": clicks}
    if protocol == "bosam":
        by_case: dict[str, list[ClickRecord]] = {}
        for r in records:
            by_case.setdefault(r.case, []).append(r)
        table = {}
        for n in clicks:
            best = []
            for rs in by_case.values():
                vals = [r.dice for r in sorted(rs, key=lambda r: r.click)[:n] if not math.isnan(r.dice)]
                if vals:
                    best.append(max(vals))
            table[str(n)] = {"dice": _mean(best), "cases": len(best)}
        out["best_of_n"] = table
        out["cases"] = len(by_case)
        out["mean"] = {k: v["dice"] for k, v in table.items()}
    else:
        per_label: dict[str, dict[str, Any]] = {}
        overall: dict[str, Any] = {}
        for n in clicks:
            at = [r for r in records if r.click == n]
            overall[str(n)] = {"dice": _mean([r.dice for r in at]),
                               "nsd": _mean([r.nsd for r in at if r.nsd is not None]),
                               "other": _mean([r.other_share for r in at]), "objects": len(at)}
            for r in at:
                e = per_label.setdefault(f"{r.label} {r.label_name}", {})
                e.setdefault(str(n), []).append(r)
        out["overall"] = overall
        out["per_label"] = {
            name: {n: {"dice": _mean([r.dice for r in rs]), "nsd": _mean([r.nsd for r in rs if r.nsd is not None]),
                       "other": _mean([r.other_share for r in rs]), "objects": len(rs)} for n, rs in d.items()}
            for name, d in sorted(per_label.items(), key=lambda kv: int(kv[0].split()[0]))
        }
        out["objects"] = len({(r.case, r.label) for r in records})
        out["mean"] = {k: v["dice"] for k, v in overall.items()}
    timed = [r for r in records if r.note != "no error left"]
    first = [r.seconds for r in timed if r.click == 1]
    later = [r.seconds for r in timed if r.click > 1]
    out["seconds_per_click"] = {"first": _mean(first), "later": _mean(later), "all": _mean([r.seconds for r in timed])}
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else None


def markdown_table(summary: dict[str, Any], title: str) -> str:
    """The summary as a Markdown table (rows: labels, or the BoSAM best-of-N figure)."""
    clicks = summary["clicks"]
    lines = [f"### {title}", ""]
    if summary["protocol"] == "bosam":
        lines.append("| metric | " + " | ".join(f"{n} click{'s' if n > 1 else ''}" for n in clicks) + " |")
        lines.append("|---|" + "---:|" * len(clicks))
        row = [_f(summary["best_of_n"][str(n)]["dice"]) for n in clicks]
        lines.append(f"| Dice, per-case best of first N, mean over {summary['cases']} cases | " + " | ".join(row) + " |")
    else:
        head = " | ".join(f"Dice@{n} | NSD@{n} | Other@{n}" for n in clicks)
        lines.append(f"| label | objects | {head} |")
        lines.append("|---|---:|" + "---:|---:|---:|" * len(clicks))
        for name, d in summary["per_label"].items():
            cells = " | ".join(f"{_f(d[str(n)]['dice'])} | {_f(d[str(n)]['nsd'])} | {_pct(d[str(n)]['other'])}"
                               for n in clicks if str(n) in d)
            lines.append(f"| {name} | {d[str(clicks[0])]['objects']} | {cells} |")
        ov = summary["overall"]
        cells = " | ".join(f"**{_f(ov[str(n)]['dice'])}** | **{_f(ov[str(n)]['nsd'])}** | **{_pct(ov[str(n)]['other'])}**"
                           for n in clicks)
        lines.append(f"| **mean** | {summary['objects']} | {cells} |")
        lines += ["", f"Other@n: {OTHER_NOTE}"]
    lines += ["", seconds_line(summary)]
    return "\n".join(lines) + "\n"


#: what the Other@n column measures (under every table of the clicks protocol)
OTHER_NOTE = ("share of the predicted voxels that the label map gives to another structure (a neighbouring bone, "
              "an organ), mean over the objects with a non-empty mask.")


def seconds_line(summary: dict[str, Any]) -> str:
    t = summary["seconds_per_click"]
    return f"Seconds per click: first {_f(t['first'], 2)}, later {_f(t['later'], 2)}."


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def write_outputs(out_dir: str | Path, records: Sequence[ClickRecord], summary: dict[str, Any],
                  settings: dict[str, Any], title: str) -> dict[str, Path]:
    """``evaluation.csv``, ``evaluation.json``, ``evaluation.md`` in ``out_dir``: all three or none."""
    from .atomic import all_or_nothing

    with all_or_nothing():
        return _write_outputs(Path(out_dir), records, summary, settings, title)


def _write_outputs(out: Path, records: Sequence[ClickRecord], summary: dict[str, Any],
                   settings: dict[str, Any], title: str) -> dict[str, Path]:
    from .atomic import atomic_write_bytes, write_json

    paths = {"csv": out / "evaluation.csv", "json": out / "evaluation.json", "markdown": out / "evaluation.md"}
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in records:
        row = asdict(r)
        row["voxel"] = " ".join(str(v) for v in r.voxel) if r.voxel else ""
        row["positive"] = "" if r.positive is None else ("+" if r.positive else "-")
        for k in ("dice", "nsd"):
            row[k] = "" if row[k] is None else f"{row[k]:.4f}"
        for k in ("seconds", "encoder_s", "decoder_s"):
            row[k] = f"{row[k]:.4f}"
        w.writerow(row)
    atomic_write_bytes(paths["csv"], buf.getvalue().encode())
    doc = {"settings": settings, "summary": summary, "records": [asdict(r) for r in records]}
    write_json(doc, paths["json"])
    atomic_write_bytes(paths["markdown"], markdown_table(summary, title).encode())
    return paths


# ---------------------------------------------------------------------------------------------
# the command's core


@dataclass
class EvaluateOptions:
    """Options of ``bosam evaluate`` (the CLI flags, one to one)."""

    clicks: list[int] = field(default_factory=lambda: list(DEFAULT_CLICKS))
    protocol: str = "clicks"
    labels: str | None = None
    labelmap: str | None = None
    cases: int | None = None
    splits: tuple[str, ...] = ("Tr", "Val", "Ts")
    nsd_tolerance_mm: float = NSD_TOLERANCE_MM
    seed: int = BOSAM_SEED
    bosam_grid: str = "native"
    spacing_mm: float | None = None
    clamp_hu: tuple[float, ...] | None = None
    max_windows: int = 8
    islands: str = "clicked"
    refine: str = "hu"
    refine_hu: float = REFINE_HU
    skip_bad: bool = False
    cache: str | None = None


#: the most clicks ``--clicks`` may ask for per object (published protocols stop at 10-20)
MAX_CLICKS = 100


def parse_clicks(text: str) -> list[int]:
    """"1,5,10" -> [1, 5, 10] (each >= 1)."""
    from .errors import BosamError

    try:
        parts = [v.strip() for v in str(text).split(",")]
        if any(not v for v in parts):  # '1,,2' or a trailing comma: a count was lost
            raise ValueError
        vals = sorted({int(v) for v in parts})
    except ValueError:
        raise BosamError(f"--clicks: expected comma-separated click counts like 1,5,10, got {text!r}") from None
    if not vals or vals[0] < 1:
        raise BosamError(f"--clicks: click counts must be >= 1, got {text!r}")
    if vals[-1] > MAX_CLICKS:
        raise BosamError(f"--clicks: at most {MAX_CLICKS} clicks per object, got {vals[-1]}")
    return vals


def evaluate(
    data: Sequence[str],
    options: EvaluateOptions,
    engine: Any = None,
    baseline: Any = None,
    out_dir: str | Path | None = None,
    on_record: Callable[[ClickRecord], None] | None = None,
) -> dict[str, Any]:
    """Evaluate a model ``engine`` (or a ``baseline`` segmenter) on datasets ``data``; writes
    the outputs to ``out_dir`` when given and returns {settings, summary, records, paths}."""
    from .data import refuse_errors, refuse_output_in_dataset, scan_dataset
    from .errors import BosamError
    from .segment import SegmentOptions, engine_metadata, make_session, window_spacing

    if options.protocol not in PROTOCOLS:
        raise BosamError(f"--protocol must be one of {', '.join(PROTOCOLS)}, not {options.protocol!r}")
    if options.bosam_grid not in BOSAM_GRIDS:
        raise BosamError(f"--bosam-grid must be one of {', '.join(BOSAM_GRIDS)}, not {options.bosam_grid!r}")
    if (engine is None) == (baseline is None):
        raise BosamError("evaluate needs exactly one of a model engine or a baseline")
    if out_dir is not None:
        refuse_output_in_dataset(out_dir, data, "--out")
    clicks = sorted(set(options.clicks))
    n = max(clicks)
    scan = scan_dataset(data, options.labels, options.labelmap, options.splits, options.cache)
    refuse_errors(scan, options.skip_bad, "evaluation")
    seg_opts = SegmentOptions(spacing_mm=options.spacing_mm, clamp_hu=options.clamp_hu, max_windows=options.max_windows,
                              islands=options.islands, refine=options.refine, refine_hu=options.refine_hu)
    meta = engine_metadata(engine) if engine is not None else {}
    spacing = window_spacing(options.spacing_mm, meta)
    if options.clamp_hu is not None:
        clamp = tuple(options.clamp_hu) or None
    else:
        c = (meta.get("intensity") or {}).get("clamp_hu", [-1000.0, 1000.0])
        clamp = tuple(c) if c else None
    t0 = time.perf_counter()
    if options.protocol == "clicks":
        segmenter = baseline if baseline is not None else make_session(engine, seg_opts, meta)
        records = run_clicks_protocol(segmenter, scan, n, options.cases, None, options.nsd_tolerance_mm,
                                      options.cache, on_record)
        text = PROTOCOL_TEXT["clicks"].format(tol=options.nsd_tolerance_mm)
    else:
        if baseline is not None:
            def make(cl: Any) -> Any:
                return baseline
        else:
            def make(cl: Any) -> Any:
                return CropSegmenter(engine, cl)
        size = int(engine.info.img_size) if engine is not None else 128
        records = run_bosam_protocol(make, scan, n, options.bosam_grid, spacing, clamp, options.seed, options.cases,
                                     size, on_record, options.cache)
        text = PROTOCOL_TEXT["bosam"].format(seed=options.seed, grid=options.bosam_grid)
    summary = summarise(records, clicks, options.protocol)
    notes = [str(p) for p in scan.warnings]
    if baseline is None:
        from engines.manifest import engine_warnings

        notes += engine_warnings(engine)  # an engine folder of random weights
    if options.protocol == "bosam" and options.labels is None:
        notes.append("protocol bosam merged every label > 0 into one mask; for bones only pass --labels bone "
                     "--labelmap FILE (or the bone ids)")
    elif options.labels is None:
        notes.append("no --labels: every label of the label maps was evaluated, organs too if they hold any; "
                     "for bones only pass --labels bone --labelmap FILE (or the bone ids)")
    who = baseline.describe() if baseline is not None else engine.info.as_dict()
    in_session = options.protocol == "clicks" and baseline is None  # the model through the segment session
    settings = {
        "protocol": options.protocol,
        "protocol_definition": text,
        "data": list(map(str, data)),
        "dataset": scan.summary(),
        "problems": [p.as_dict() for p in scan.problems],
        "clicks": clicks,
        "labels": options.labels,
        "cases": options.cases,
        "seed": options.seed,
        "bosam_grid": options.bosam_grid if options.protocol == "bosam" else None,
        "spacing_mm": spacing,
        "clamp_hu": ("[-1000, 1000] for image paths containing '/ct_', none for others (the published rule)"
                     if options.protocol == "bosam" and options.bosam_grid == "native" else (list(clamp) if clamp else None)),
        "islands": options.islands if in_session else None,
        "refine": options.refine if in_session else None,
        "refine_hu": options.refine_hu if in_session and options.refine == "hu" else None,
        "segmenter": who,
        "checkpoint": meta.get("checkpoint_path") or getattr(getattr(engine, "model", None), "checkpoint_path", None),
        "checkpoint_sha256": who.get("checkpoint_sha256") if isinstance(who, dict) else None,
        "nsd_tolerance_mm": options.nsd_tolerance_mm if options.protocol == "clicks" else None,
        "seconds": time.perf_counter() - t0,
        "warnings": notes,
    }
    title = f"bosam evaluate — {'BoSAM published protocol' if options.protocol == 'bosam' else 'clicks protocol'}" \
            f" — {'baseline ' + baseline.name if baseline is not None else (who.get('preset') or 'model')}"
    result = {"settings": settings, "summary": summary, "records": records, "title": title, "paths": {}}
    if out_dir is not None:
        result["paths"] = write_outputs(out_dir, records, summary, settings, title)
    return result
