"""Optional CT inputs besides NIfTI: a DICOM series folder (pydicom), NRRD (pynrrd) and
MetaImage .mha/.mhd (SimpleITK).

Both become a :class:`~bosam_cli.volume.Volume` under the one coordinate rule: the array in file
order and a 4x4 affine from voxel (i, j, k) to world RAS millimetres. DICOM and most NRRD files
describe geometry in LPS; the change to RAS is one more affine (``LPS_TO_RAS @ affine_lps``),
never a flip of the array. pydicom, pynrrd and SimpleITK are imported inside the functions,
so they stay optional (``pip install bosam[io]``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import VolumeError
from .volume import LPS_TO_RAS, Volume, _one_line, make_output_folder

# Relative tolerance on slice gaps and on direction cosines. Scanners write positions with ~6
# significant digits; a missing slice doubles a gap, far beyond this.
_GAP_RTOL = 0.01
_POSITION_ROUNDING_MM = 0.1
_COSINE_TOL = 1e-3


# ---------------------------------------------------------------------------------------------
# DICOM


def read_dicom_series_of(file: str | os.PathLike) -> Volume:
    """The DICOM series that ``file`` belongs to, from the files of its folder (searched
    recursively): how a series is picked out of a folder that holds several."""
    try:
        import pydicom
    except ImportError:  # pragma: no cover - depends on the install
        raise VolumeError(f"{file}: reading DICOM needs pydicom (pip install 'bosam[io]')") from None
    file = Path(file)
    try:
        ds = pydicom.dcmread(file, stop_before_pixels=True, force=True)
    except Exception as exc:  # noqa: BLE001 - not DICOM, truncated
        raise VolumeError(f"{file}: not a readable DICOM file ({_one_line(exc)})") from None
    if _is_multiframe(ds):
        if not _is_multiframe_ct(ds):
            raise VolumeError(f"{file}: SOPClassUID: {ds.get('SOPClassUID', 'missing')} is not a CT image "
                              "(a segmentation, dose or other multi-frame object)")
        return read_enhanced_dicom(file)
    uid = ds.get("SeriesInstanceUID")
    if not uid:
        raise VolumeError(f"{file}: SeriesInstanceUID: missing, so its series cannot be told apart; pass its folder")
    return read_dicom_series(file.parent, series_uid=str(uid))


def read_dicom_series(folder: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read one DICOM image series from a folder (searched recursively) into a RAS volume.

    * Files that are not DICOM, or DICOM objects without ``ImagePositionPatient`` or
      ``PixelData`` (reports, presentation states, screenshots, DICOMDIR), are skipped; but a
      file of the series read that is one of its slices (the SOP class of its other slices)
      and lacks either is refused, naming it: skipped, it would take a slice off the volume.
      Several ``SeriesInstanceUID`` values are refused with a message listing them, unless
      ``series_uid`` picks one (give one file of the series to ``read_volume`` for that).
    * Slices are sorted along the slice normal ``row x column`` of ``ImageOrientationPatient``;
      the slice step is the mean difference of ``ImagePositionPatient`` (so a gantry tilt
      becomes a sheared affine, not a wrong one). Non-uniform gaps (a missing slice), duplicate
      positions, and orientation/size/spacing that differ between slices are refused, naming
      the slice that differs from the most slices.
    * ``RescaleSlope``/``RescaleIntercept`` are applied per slice: int16 when all slopes and
      intercepts are whole numbers and the values fit, else float32. A value that is not a
      finite number, a slope of 0, a magnitude over 1e6, or slopes of both signs are refused.
    * The array is indexed (column i, row j, slice k); the affine maps it to RAS mm.
    """
    try:
        import pydicom
        from pydicom.errors import InvalidDicomError
    except ImportError:  # pragma: no cover - depends on the install
        raise VolumeError(f"{folder}: reading DICOM needs pydicom (pip install 'bosam[io]')") from None

    folder = Path(folder)
    if not folder.is_dir():
        raise VolumeError(f"{folder}: not a folder (a DICOM series is read from a folder)")
    slices: dict[str, list[tuple[Path, Any]]] = {}
    multiframe: dict[str, list[Path]] = {}
    # single-frame objects without PixelData or ImagePositionPatient: reports, presentation
    # states, screenshots ... or a broken slice of a series, told apart once the series is known
    incomplete: dict[str, list[tuple[Path, Any]]] = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        if f.name.startswith(".") or f.name.upper() == "DICOMDIR":
            continue
        try:
            ds = pydicom.dcmread(f)
        except InvalidDicomError:
            try:  # DICOM without the 128-byte preamble is common in older exports
                ds = pydicom.dcmread(f, force=True)
            except Exception:  # noqa: BLE001 - not DICOM at all
                continue
        except Exception:  # noqa: BLE001 - unreadable file: skip, like any non-DICOM file
            continue
        if _is_multiframe(ds):
            if "PixelData" in ds and _is_multiframe_ct(ds):
                multiframe.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(f)
            continue
        if "PixelData" not in ds or "ImagePositionPatient" not in ds:
            incomplete.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
            continue
        slices.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    for uid, files in multiframe.items():  # an enhanced CT: the whole volume in one file
        if uid not in slices:
            slices[uid] = [(f, None) for f in files]
    if series_uid is not None:
        if series_uid not in slices:
            _refuse_broken_slice(series_uid, [], incomplete.get(series_uid, []))
            raise VolumeError(f"{folder}: SeriesInstanceUID: no image slices of series {series_uid} in this folder")
        slices = {series_uid: slices[series_uid]}
    if not slices:
        for uid, others in sorted(incomplete.items()):
            _refuse_broken_slice(uid, [], others)
        raise VolumeError(f"{folder}: ImagePositionPatient: no DICOM image slices found in this folder")
    if len(slices) > 1:
        listing = "; ".join(
            f"{uid or '<none>'} ({len(v)} files, "
            f"{str(v[0][1].get('SeriesDescription', '') if v[0][1] is not None else 'multi-frame').strip() or 'no description'})"
            for uid, v in sorted(slices.items())
        )
        raise VolumeError(f"{folder}: SeriesInstanceUID: {len(slices)} series found; pass a folder holding one, "
                          f"or one file of the series to read: {listing}")
    (uid, items), = slices.items()
    if items[0][1] is None:
        if len(items) > 1:
            raise VolumeError(f"{folder}: NumberOfFrames: series {uid} is split over {len(items)} multi-frame files; "
                              "give the file to read")
        return read_enhanced_dicom(items[0][0])
    _refuse_broken_slice(uid, items, incomplete.get(uid, []))
    return _assemble_series(folder, uid, items)


def _image_type(ds: Any) -> tuple[str, ...]:
    """ImageType's values, upper case (``("ORIGINAL", "PRIMARY", "AXIAL")``); () when absent."""
    value = ds.get("ImageType")
    if value is None:
        return ()
    values = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip().upper() for v in values)


def _refuse_broken_slice(uid: str, items: list[tuple[Path, Any]], others: list[tuple[Path, Any]]) -> None:
    """A one-line VolumeError for the first file of series ``uid`` that is one of its image
    slices but lacks ``ImagePositionPatient`` or ``PixelData``: left out, it would silently
    take the first or last slice off the volume (shifting every click) or leave a gap. A file
    of the series is such a slice when its SOP class is that of the series' complete slices
    (``items``), or, when there are none, when it holds an image (``Rows``/``Columns`` and
    ``PixelData``). Other objects of the series (reports, presentation states, screenshots of
    another SOP class) stay passed over."""
    classes = {str(ds.get("SOPClassUID", "")) for _, ds in items}
    kinds = {_image_type(ds) for _, ds in items} - {()}
    for f, ds in others:
        sop = str(ds.get("SOPClassUID", ""))
        image_like = "Rows" in ds and "Columns" in ds
        kind = _image_type(ds)
        if {"SCREEN SAVE", "LOCALIZER"} & set(kind) or (kind and kinds and kind not in kinds):
            continue  # a screen save or scout stored in the series (often as CT Image Storage): not a slice
        if items:
            broken = sop in classes and (bool(sop) or image_like or "PixelData" in ds)
        else:
            broken = image_like and "PixelData" in ds
        if not broken:
            continue
        missing = [key for key in ("ImagePositionPatient", "PixelData") if key not in ds]
        what = (f"a slice of series {uid} (SOP class {sop or 'not given'}, as its other {len(items)} slices)"
                if items else f"an image of series {uid}")
        raise VolumeError(f"{f}: {'/'.join(missing)}: missing, although the file is {what}; the series cannot be "
                          "read without it (left out, the volume would lose a slice): export the series again")


#: multi-frame image storage classes read as a CT volume: Enhanced CT, Legacy Converted Enhanced
#: CT. Other multi-frame objects (a DICOM SEG written beside the series, RT dose, parametric maps)
#: are passed over like any non-image file.
_MULTIFRAME_CT = ("1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")


def _is_multiframe(ds: Any) -> bool:
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return frames > 1 or "PerFrameFunctionalGroupsSequence" in ds


def _is_multiframe_ct(ds: Any) -> bool:
    return _is_multiframe(ds) and str(ds.get("SOPClassUID", "")) in _MULTIFRAME_CT


def read_enhanced_dicom(file: str | os.PathLike) -> Volume:
    """An enhanced (multi-frame) CT, the whole volume in one file, through highdicom: frames
    sorted in space from their per-frame plane positions, the shared or per-frame rescale
    applied. The array is (column i, row j, slice k) as for a series of single slices, slices
    sorted along the slice normal ``row x column`` (as ITK orders a series), whatever the order
    of the frames in the file. Read with ``force=True`` (a file without the 128-byte preamble,
    as for a series). Before highdicom sees it, the file's own counts and values are checked,
    each refusal one line naming the file and the field: ``NumberOfFrames`` against the
    per-frame functional groups and (uncompressed) the ``PixelData`` length, every frame's
    ``PlanePositionSequence``, and the Pixel Value Transformation values with the series'
    rescale rules. ``FrameOfReferenceUID`` is not needed to read it (as for a series): only a
    DICOM SEG written on it needs it, and that writer refuses. A file whose frames do not form
    one regular 3-D grid (several stacks, uneven gaps) is refused with highdicom's reason."""
    file = Path(file)
    try:
        import highdicom as hd
        import pydicom
        from pydicom.uid import generate_uid
    except ImportError:  # pragma: no cover - depends on the install
        raise VolumeError(f"{file}: reading a multi-frame (enhanced) DICOM needs highdicom (pip install 'bosam[io]')") from None
    try:
        ds = pydicom.dcmread(file, force=True)  # as the series path and the file's detection read it
    except Exception as exc:  # noqa: BLE001 - not DICOM, truncated
        raise VolumeError(f"{file}: not a readable DICOM file ({_one_line(exc)})") from None
    _check_frames(ds, file)
    _check_frame_rescale(ds, file)
    if not str(ds.get("FrameOfReferenceUID", "") or "").strip():
        # highdicom builds no volume without one; the grid does not depend on it, and the file
        # on disk keeps lacking it, so a DICOM SEG on this CT is still refused naming it
        ds.FrameOfReferenceUID = generate_uid()
    try:
        image = hd.Image.from_dataset(ds, copy=False)
        # HU through the modality (rescale) transform, checked above; highdicom would otherwise
        # apply a real-world value mapping instead, when the file has one (stored values, not HU)
        grid = image.get_volume(dtype=np.float32, apply_real_world_transform=False, apply_modality_transform=True)
    except Exception as exc:  # noqa: BLE001 - not one regular volume, undecodable frames
        raise VolumeError(f"{file}: multi-frame DICOM: not one regular 3-D volume ({_one_line(exc)})") from None
    values = np.asarray(grid.array)
    if values.ndim != 3:
        raise VolumeError(f"{file}: multi-frame DICOM: expected one grey value per voxel, got shape {values.shape}")
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = grid.affine[:3, 2]  # highdicom's array is (slice, row, column)
    affine_lps[:3, 1] = grid.affine[:3, 1]
    affine_lps[:3, 2] = grid.affine[:3, 0]
    affine_lps[:3, 3] = grid.affine[:3, 3]
    array = values.transpose(2, 1, 0)
    # highdicom picks its own slice direction; the rule for DICOM is ITK's: k grows along the
    # normal row x column (row: the step of i along a row; column: the step of j down a column)
    normal = np.cross(affine_lps[:3, 0], affine_lps[:3, 1])
    if float(affine_lps[:3, 2] @ normal) < 0:
        array = array[:, :, ::-1]  # a view: the int16 or contiguous copy below has positive strides
        affine_lps[:3, 3] = affine_lps[:3, 3] + (array.shape[2] - 1) * affine_lps[:3, 2]
        affine_lps[:3, 2] = -affine_lps[:3, 2]
    if np.all(np.isfinite(array)) and np.array_equal(array, np.round(array)) and array.size \
            and array.min() >= -32768 and array.max() <= 32767:
        array = array.astype(np.int16)
    else:
        array = np.ascontiguousarray(array)
    meta = {
        "format": "dicom-multiframe",
        "series_instance_uid": str(image.get("SeriesInstanceUID", "")),
        "modality": str(image.get("Modality", "")),
        "series_description": str(image.get("SeriesDescription", "")),
        "n_slices": int(array.shape[2]),
        "files": [str(file)],
        "frame_slices": _frame_slices(image, affine_lps, int(array.shape[2])),
    }
    return Volume(array, LPS_TO_RAS @ affine_lps, None, file, meta)


def _check_frames(ds: Any, file: Path) -> None:
    """A one-line VolumeError when a multi-frame file's frame count is not one number:
    ``NumberOfFrames``, the items of ``PerFrameFunctionalGroupsSequence`` and (uncompressed)
    the frames ``PixelData`` holds must agree (a lower ``NumberOfFrames`` silently dropped
    slices; a missing item was reported as frames sharing a position); and every frame needs a
    plane position (its own, or a shared one)."""
    try:
        raw = ds.get("NumberOfFrames")
        n = int(raw)
    except Exception:  # noqa: BLE001 - absent, empty, not a number
        raise VolumeError(f"{file}: NumberOfFrames: expected a whole number of frames, got {ds.get('NumberOfFrames')!r}") from None
    if n < 1:
        raise VolumeError(f"{file}: NumberOfFrames: expected at least 1, got {n}")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        raise VolumeError(f"{file}: PerFrameFunctionalGroupsSequence: missing, so the frames cannot be placed in space")
    items = len(per_frame)
    pixel_frames = None  # the whole frames PixelData holds, when it is uncompressed
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    data = ds.get("PixelData")
    if data is None:
        raise VolumeError(f"{file}: PixelData: missing")
    try:
        bits, rows, cols = int(ds.BitsAllocated), int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except Exception:  # noqa: BLE001 - absent or not numbers: highdicom says which
        bits = rows = cols = samples = 0
    frame_bytes = rows * cols * samples * bits // 8
    if ts is not None and not ts.is_encapsulated and bits % 8 == 0 and frame_bytes > 0:
        have = len(data.value if hasattr(data, "value") else data)
        pixel_frames = have // frame_bytes
        if have < n * frame_bytes and pixel_frames != items:  # (when it is items, NumberOfFrames is named below)
            raise VolumeError(f"{file}: PixelData: {have} bytes, but NumberOfFrames {n} of Rows x Columns {rows}x{cols} "
                              f"at BitsAllocated {bits} needs {n * frame_bytes} (a truncated file?)")
    holds = f" and PixelData holds {pixel_frames} frames" if pixel_frames is not None else ""
    if items != n or (pixel_frames is not None and pixel_frames > n):
        if pixel_frames is not None and pixel_frames == n and items != n:  # an item missing (or one too many)
            what = f"PerFrameFunctionalGroupsSequence: {items} items (one per frame), but NumberOfFrames is {n}{holds}"
        else:
            what = f"NumberOfFrames: {n}, but PerFrameFunctionalGroupsSequence has {items} items (one per frame){holds}"
        raise VolumeError(f"{file}: {what}; read, the volume would lose or misplace slices: export the file again")
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    for index, fg in enumerate(per_frame):
        group = fg if "PlanePositionSequence" in fg else shared
        try:
            position = group.PlanePositionSequence[0].ImagePositionPatient
            ok = len(position) == 3 and all(np.isfinite(float(v)) for v in position)
        except Exception:  # noqa: BLE001 - absent, empty, not numbers
            ok = False
        if not ok:
            raise VolumeError(f"{file}: PlanePositionSequence: frame {index + 1} (PerFrameFunctionalGroupsSequence item "
                              f"{index + 1}) has no ImagePositionPatient of three finite numbers, so it cannot be "
                              "placed in the volume: export the file again")


def _check_frame_rescale(ds: Any, file: Path) -> None:
    """The series' rescale rules (:func:`_rescale`: a finite number, magnitude at most 1e6, no
    slope of 0; slopes of one sign over the frames) on the Pixel Value Transformation of the
    shared and of every per-frame functional group, refused in one line naming the file, the
    frame and the field."""
    field = "PixelValueTransformationSequence."

    def transformation(group: Any) -> Any:
        try:
            seq = group.get("PixelValueTransformationSequence") if group is not None else None
        except Exception:  # noqa: BLE001 - a malformed sequence: highdicom says what it finds
            return None
        return seq[0] if seq else None

    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_item = transformation(shared[0] if shared else None)
    default = (1.0, 0.0)
    if shared_item is not None:
        default = _rescale(shared_item, file, prefix=field, where=" (shared functional group)")
    slopes = []
    for index, fg in enumerate(ds.get("PerFrameFunctionalGroupsSequence") or []):
        item = transformation(fg)
        slopes.append(default[0] if item is None else
                      _rescale(item, file, prefix=field, where=f" (frame {index + 1})")[0])
    odd = _odd_slope_sign(slopes)
    if odd is not None:
        k, others = odd
        raise VolumeError(f"{file}: {field}RescaleSlope (frame {k + 1}): {slopes[k]:g} here but of the other sign "
                          f"in {others} of the {len(slopes)} frames; the header is corrupt")


def _frame_slices(ds: Any, affine_lps: np.ndarray, n_slices: int) -> list[int] | None:
    """The volume's slice index of every frame of a multi-frame file, in frame order (what a
    DICOM SEG on it references), from the frames' plane positions; None when a frame does not
    lie on a slice of the grid."""
    try:
        frames = ds.PerFrameFunctionalGroupsSequence
        positions = np.array([[float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient] for fg in frames])
    except (AttributeError, IndexError, TypeError, ValueError):
        return None
    step = affine_lps[:3, 2]
    k = (positions - affine_lps[:3, 3]) @ step / float(step @ step)
    on_grid = positions - (affine_lps[:3, 3] + np.round(k)[:, None] * step)
    if np.abs(on_grid).max(initial=0.0) > 0.01 + 0.01 * float(np.linalg.norm(step)) or \
            np.round(k).min(initial=0) < 0 or np.round(k).max(initial=0) >= n_slices:
        return None
    return [int(v) for v in np.round(k)]


def _floats(ds: Any, keyword: str, n: int, f: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.asarray([float(x) for x in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise VolumeError(f"{f}: {keyword}: expected {n} finite numbers, got {value!r}")
    return arr


def _odd_slope_sign(slopes: Any) -> tuple[int, int] | None:
    """When the slopes of a series' slices (or an enhanced CT's frames) are not all of one sign,
    one of them is corrupt: (index of the first slope of the rarer sign, how many have the other
    sign); None when all share one sign."""
    negative = np.asarray(slopes, dtype=np.float64) < 0
    n = negative.size
    if not 0 < np.count_nonzero(negative) < n:
        return None
    odd = negative if np.count_nonzero(negative) <= n // 2 else ~negative
    return int(np.argmax(odd)), n - int(np.count_nonzero(odd))


def _int_field(ds: Any, keyword: str, f: Path, default: int | None = None) -> int:
    try:
        return int(ds.get(keyword, default))
    except (TypeError, ValueError):
        raise VolumeError(f"{f}: {keyword}: expected a whole number, got {ds.get(keyword)!r}") from None


def _reference(items: list[tuple[Path, Any]], key: Callable[[Path, Any], Any]) -> tuple[Path, Any]:
    """The file (and dataset) whose ``key`` most slices share: the reference the others are
    compared with, so that the odd file is the one an error names, even when it sorts first."""
    keys = [key(f, ds) for f, ds in items]
    counts: dict[Any, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    best = max(counts.values())
    return items[next(i for i, k in enumerate(keys) if counts[k] == best)]


#: rescale values beyond these are no CT's (slopes are about 1, intercepts about -1024): a
#: corrupt header, refused rather than turned into voxels of 1e30 HU
_MAX_RESCALE_SLOPE = 1e6
_MAX_RESCALE_INTERCEPT = 1e6


def _rescale(ds: Any, f: Path, prefix: str = "", where: str = "") -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept) of one slice: 1 and 0 when absent or empty; a value
    that is not a number, not finite, a slope of 0 or a magnitude no CT has is a one-line
    VolumeError naming the file and the field (for an enhanced CT, ``prefix`` names its
    functional group sequence and ``where`` the frame, as ``RescaleSlope (frame 3)``)."""
    out = []
    for name, default, limit in (("RescaleSlope", 1.0, _MAX_RESCALE_SLOPE),
                                 ("RescaleIntercept", 0.0, _MAX_RESCALE_INTERCEPT)):
        keyword, name = name, prefix + name + where
        try:
            raw = ds.get(keyword)
        except Exception as exc:  # noqa: BLE001 - pydicom converting a malformed value
            raise VolumeError(f"{f}: {name}: not a number ({_one_line(exc)})") from None
        if raw is None or (isinstance(raw, (str, bytes)) and not raw.strip()):
            out.append(default)
            continue
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise VolumeError(f"{f}: {name}: not a number: {raw!r}") from None
        if not np.isfinite(value) or abs(value) > limit:
            raise VolumeError(f"{f}: {name}: {value:g} is no CT rescale value (expected a finite number of "
                              f"magnitude at most {limit:g})")
        if keyword == "RescaleSlope" and value == 0:
            raise VolumeError(f"{f}: {name}: 0 would make every voxel of the slice the intercept; "
                              "the header is corrupt")
        out.append(value)
    return out[0], out[1]


def _assemble_series(folder: Path, uid: str, items: list[tuple[Path, Any]]) -> Volume:
    for f, ds in items:
        if _int_field(ds, "SamplesPerPixel", f, 1) != 1:
            raise VolumeError(f"{f}: SamplesPerPixel: colour images are not CT ({ds.SamplesPerPixel} samples)")
    # The reference geometry is what most slices share, so that a bad first file is the one named.
    f0, ds0 = _reference(items, lambda f, ds: tuple(np.round(_floats(ds, "ImageOrientationPatient", 6, f), 3)))
    iop = _floats(ds0, "ImageOrientationPatient", 6, f0)
    row_dir, col_dir = iop[:3], iop[3:]  # row_dir: along a row (column index grows); col_dir: down a column
    if abs(np.linalg.norm(row_dir) - 1) > 1e-2 or abs(np.linalg.norm(col_dir) - 1) > 1e-2 or abs(row_dir @ col_dir) > 1e-2:
        raise VolumeError(f"{f0}: ImageOrientationPatient: direction cosines are not orthonormal: {iop.tolist()}")
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    f0, ds0 = _reference(items, lambda f, ds: tuple(np.round(_floats(ds, "PixelSpacing", 2, f), 4)))
    spacing_rc = _floats(ds0, "PixelSpacing", 2, f0)  # (between rows, between columns) in mm
    if np.any(spacing_rc <= 0):
        raise VolumeError(f"{f0}: PixelSpacing: must be positive, got {spacing_rc.tolist()}")
    f0, ds0 = _reference(items, lambda f, ds: (_int_field(ds, "Rows", f), _int_field(ds, "Columns", f)))
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    n_like = sum(1 for _, ds in items if (int(ds.Rows), int(ds.Columns)) == (rows, cols))

    positions = []
    for f, ds in items:
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, f), iop, atol=_COSINE_TOL):
            raise VolumeError(f"{f}: ImageOrientationPatient: differs from the other slices of series {uid}")
        if not np.allclose(_floats(ds, "PixelSpacing", 2, f), spacing_rc, rtol=1e-4):
            raise VolumeError(f"{f}: PixelSpacing: differs from the other slices of series {uid}")
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise VolumeError(f"{f}: Rows/Columns: {ds.Rows}x{ds.Columns} differs from the {rows}x{cols} of "
                              f"{n_like} of the {len(items)} slices of series {uid}")
        positions.append(_floats(ds, "ImagePositionPatient", 3, f))
    positions_lps = np.asarray(positions)
    depth = positions_lps @ normal
    order = np.argsort(depth, kind="stable")
    depth = depth[order]
    positions_lps = positions_lps[order]
    items = [items[i] for i in order]

    n = len(items)
    if n > 1:
        gaps = np.diff(depth)
        if np.min(gaps) < 1e-3:
            k = int(np.argmin(gaps))
            raise VolumeError(
                f"{items[k + 1][0]}: ImagePositionPatient: same slice position as {items[k][0].name} "
                f"(several acquisitions or echoes in one series?)"
            )
        mean_gap = float(np.mean(gaps))
        # 1 % of the gap, or the 0.1 mm that positions written with one decimal are off by
        # (a 0.625 mm series then shows gaps of 0.6 and 0.7); a missing slice doubles a gap
        # (never half a gap or more: in a 0.1 mm micro-CT a missing slice must still show)
        if np.max(np.abs(gaps - mean_gap)) > max(_GAP_RTOL * mean_gap, min(_POSITION_ROUNDING_MM, 0.4 * mean_gap)) + 1e-3:
            raise VolumeError(
                f"{folder}: ImagePositionPatient: slice spacing is not uniform "
                f"(gaps {gaps.min():.4g} to {gaps.max():.4g} mm; a missing slice?)"
            )
        step_lps = (positions_lps[-1] - positions_lps[0]) / (n - 1)
    else:
        thickness = ds0.get("SpacingBetweenSlices") or ds0.get("SliceThickness") or 1.0
        step_lps = normal * float(thickness)

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * spacing_rc[1]  # i: column index
    affine_lps[:3, 1] = col_dir * spacing_rc[0]  # j: row index
    affine_lps[:3, 2] = step_lps  # k: slice index, along the normal
    affine_lps[:3, 3] = positions_lps[0]
    affine_ras = LPS_TO_RAS @ affine_lps

    rescale = np.array([_rescale(ds, f) for f, ds in items], dtype=np.float64).reshape(n, 2)
    slopes, intercepts = rescale[:, 0], rescale[:, 1]
    odd = _odd_slope_sign(slopes)
    if odd is not None:
        k, others = odd
        raise VolumeError(f"{items[k][0]}: RescaleSlope: {slopes[k]:g} here but of the other sign in "
                          f"{others} of the {n} slices of series {uid}; the header is corrupt")
    exact = bool(np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts)))
    # Filled slice by slice, so peak memory is the output plus one slice (no float64 volume).
    array = np.empty((cols, rows, n), dtype=np.int16 if exact else np.float32)
    for k, (f, ds) in enumerate(items):
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - missing decoder plugin, bad data
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
            name = f"{ts} {ts.name}" if ts is not None and getattr(ts, "name", "") not in ("", str(ts)) else str(ts)
            hint = ("; compressed DICOM needs the decoders that pip install -e '.[io]' adds"
                    if getattr(ts, "is_compressed", False) else "")
            raise VolumeError(f"{f}: PixelData: cannot decode (TransferSyntaxUID {name}; {_one_line(exc)}){hint}") from None
        if pixels.shape != (rows, cols):
            raise VolumeError(f"{f}: PixelData: shape {pixels.shape} does not match Rows x Columns {rows}x{cols}")
        # pixel_array is indexed [row, column]; the volume is [column i, row j, slice k].
        if array.dtype == np.int16:
            values = pixels.astype(np.int64) * int(slopes[k]) + int(intercepts[k])
            if values.min() >= -32768 and values.max() <= 32767:
                array[:, :, k] = values.T
                continue
            array = array.astype(np.float32)  # does not fit int16: float32 from here on
        array[:, :, k] = (pixels.astype(np.float64) * slopes[k] + intercepts[k]).T
    meta = {
        "format": "dicom",
        "series_instance_uid": uid,
        "modality": str(ds0.get("Modality", "")),
        "series_description": str(ds0.get("SeriesDescription", "")),
        "n_slices": n,
        "files": [str(f) for f, _ in items],
    }
    return Volume(array, affine_ras, None, folder, meta)


# ---------------------------------------------------------------------------------------------
# NRRD

_SPACE_TO_RAS = {
    "right-anterior-superior": np.eye(4),
    "ras": np.eye(4),
    "left-posterior-superior": LPS_TO_RAS,
    "lps": LPS_TO_RAS,
    "left-anterior-superior": np.diag([-1.0, 1.0, 1.0, 1.0]),
    "las": np.diag([-1.0, 1.0, 1.0, 1.0]),
}


def read_nrrd(path: str | os.PathLike) -> Volume:
    """Read a 3-D NRRD (.nrrd or .nhdr + data) with pynrrd into a RAS volume.

    Geometry comes from ``space`` (right-anterior-superior, left-posterior-superior,
    left-anterior-superior or their abbreviations), ``space directions`` (one vector per axis,
    which carries spacing and orientation) and ``space origin``; the affine is
    ``space_to_RAS @ [directions | origin]``. Files without ``space``/``space directions`` are
    refused: bosam will not guess where a CT lies in the patient. The array keeps the stored
    dtype, in the axis order of the file (pynrrd's Fortran order, i fastest).
    """
    try:
        import nrrd
    except ImportError:  # pragma: no cover - depends on the install
        raise VolumeError(f"{path}: reading NRRD needs pynrrd (pip install 'bosam[io]')") from None

    path = Path(path)
    try:
        data, header = nrrd.read(str(path))
    except Exception as exc:  # noqa: BLE001 - pynrrd raises NRRDError, OSError, ValueError ...
        raise VolumeError(f"{path}: cannot read NRRD ({_one_line(exc)})") from None
    dim = int(header.get("dimension", data.ndim))
    if dim == 4 and data.ndim == 4:  # a 3-D image stored with one non-spatial axis of size 1
        data, header = _drop_singleton_nrrd_axis(data, header, path)
        dim = data.ndim  # 3 when that axis was dropped; any other 4-D image stays 4-D (and is refused)
    if dim != 3 or data.ndim != 3:
        raise VolumeError(f"{path}: dimension: expected a 3-D image, got {dim}-D of shape {tuple(data.shape)}")
    if data.dtype.kind not in "biuf":
        raise VolumeError(f"{path}: type: unsupported voxel type {data.dtype}")
    space = header.get("space")
    if space is None:
        raise VolumeError(f"{path}: space: missing (need right-anterior-superior or left-posterior-superior to place the image in patient space)")
    to_ras = _SPACE_TO_RAS.get(str(space).strip().lower())
    if to_ras is None:
        raise VolumeError(f"{path}: space: unsupported space {space!r} (expected right-anterior-superior, left-posterior-superior or left-anterior-superior)")
    units = header.get("space units")
    if units is not None and any(str(u).strip().lower() not in ("mm", "") for u in units):
        raise VolumeError(f"{path}: space units: expected mm, got {list(units)}")
    directions = header.get("space directions")
    if directions is None:
        raise VolumeError(f"{path}: space directions: missing")
    try:
        directions = np.asarray(directions, dtype=np.float64)
    except (TypeError, ValueError):
        raise VolumeError(f"{path}: space directions: not numeric: {directions!r}") from None
    if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
        raise VolumeError(f"{path}: space directions: expected three finite 3-vectors, got {directions.tolist()}")
    origin = header.get("space origin")
    origin = np.zeros(3) if origin is None else np.asarray(origin, dtype=np.float64)
    if origin.shape != (3,) or not np.all(np.isfinite(origin)):
        raise VolumeError(f"{path}: space origin: expected three finite numbers, got {origin.tolist()}")
    if abs(np.linalg.det(directions)) < 1e-12:
        raise VolumeError(f"{path}: space directions: singular matrix {directions.tolist()}")
    affine_space = np.eye(4)
    affine_space[:3, :3] = directions.T  # row a of 'space directions' is the step of axis a
    affine_space[:3, 3] = origin
    meta = {"format": "nrrd", "space": str(space), "nrrd_header": dict(header)}
    return Volume(np.asarray(data), to_ras @ affine_space, None, path, meta)


def _drop_singleton_nrrd_axis(data: np.ndarray, header: dict, path: Path) -> tuple[np.ndarray, dict]:
    """A 4-D NRRD whose one non-spatial axis ('none' in ``space directions``) has size 1, as
    3-D; anything else stays 4-D (and is refused)."""
    directions = header.get("space directions")
    if directions is None:
        return data, header
    rows = [None if r is None else np.asarray(r, dtype=np.float64) for r in directions]
    extra = [a for a, r in enumerate(rows) if r is None or not np.all(np.isfinite(r))]
    if len(rows) != 4 or len(extra) != 1 or data.shape[extra[0]] != 1:
        return data, header
    axis = extra[0]
    header = dict(header)
    header["space directions"] = np.stack([r for a, r in enumerate(rows) if a != axis])
    return np.take(data, 0, axis=axis), header


# ---------------------------------------------------------------------------------------------
# MetaImage


#: bytes per value of the MetaImage element types
_MET_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
              "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4,
              "MET_DOUBLE": 8}


def _metaimage_data_problem(path: Path) -> str | None:
    """What is wrong with a MetaImage's voxel data before SimpleITK reads it: a missing data
    file, or (uncompressed data) fewer bytes than ``DimSize`` and ``ElementType`` declare. ITK
    says only that the file "cannot be read", and prints the reason on the C++ stderr, a second
    line that no Python code can take back without touching every thread's stderr. None when
    the header is one this check does not follow (SimpleITK then says what it finds)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return None
    fields: dict[str, str] = {}
    offset = 0
    for raw in head.split(b"\n"):
        offset += len(raw) + 1
        key, eq, value = raw.decode("latin-1").partition("=")
        if not eq:
            return None
        fields[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    else:
        return None
    name = fields["ElementDataFile"]
    if name.upper().startswith("LIST") or " " in name or "%" in name:
        return None  # a list or a pattern of slice files
    local = name.upper() == "LOCAL"
    if not local and not (path.parent / name).is_file():
        return f"ElementDataFile: {name}: no such file beside the header"
    try:
        size = [int(v) for v in fields.get("DimSize", "").split()]
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        item = _MET_BYTES[fields.get("ElementType", "")]
    except (ValueError, KeyError):
        return None
    compressed = fields.get("CompressedData", "False").lower() == "true"
    if "HeaderSize" in fields or not size:
        return None
    need = int(np.prod(size, dtype=np.float64)) * channels * item
    if compressed:  # ITK reads data that do not uncompress without an error (garbage voxels)
        return _inflate_problem(path if local else path.parent / name, offset if local else 0, need)
    have = (path.stat().st_size - offset) if local else (path.parent / name).stat().st_size
    if have < need:
        where = "after the header" if local else f"in {name}"
        return (f"ElementDataFile: {max(have, 0)} bytes of voxel data {where}, but DimSize {fields['DimSize']} of "
                f"{fields['ElementType']} needs {need} (a truncated file?)")
    return None


def _inflate_problem(data_file: Path, offset: int, need: int) -> str | None:
    """Inflate compressed MetaImage data in chunks, keeping only the count: fewer bytes than
    ``need``, or a stream zlib refuses, is the problem SimpleITK would not report."""
    import zlib

    inflater = zlib.decompressobj(47)  # zlib or gzip wrapper, as MetaIO writers differ
    got = 0
    try:
        with open(data_file, "rb") as f:
            f.seek(offset)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                got += len(inflater.decompress(chunk))
                if inflater.eof:
                    break
            got += len(inflater.flush())
    except zlib.error as exc:
        return f"CompressedData: the voxel data do not uncompress ({exc}); the file is corrupt"
    if got < need:
        return f"CompressedData: the voxel data uncompress to {got} bytes, but DimSize needs {need} (a truncated file?)"
    return None


def _itk_reason(exc: BaseException) -> str:
    """ITK's reason without the C++ source location and object address."""
    text = " ".join(str(exc).split())
    text = re.sub(r"^.*?ERROR:\s*", "", text)  # "Exception thrown in ... .cxx:490: ITK ERROR: "
    return re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", text)  # "MetaImageIO(0x55e0...): "


def read_metaimage(path: str | os.PathLike) -> Volume:
    """Read a 3-D MetaImage (.mha, or .mhd + raw data) with SimpleITK into a RAS volume.

    MetaImage geometry is ITK's, in LPS: world = Origin + Direction @ diag(Spacing) @ (i, j, k).
    The affine is ``LPS_TO_RAS`` times that. SimpleITK's array is (k, j, i); the volume keeps it
    as (i, j, k) (a transposed view, Fortran order, like nibabel's). Only scalar 3-D images are
    read (a fourth axis of size 1 is dropped): 2-D, 4-D and vector images are refused.
    """
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover - depends on the install
        raise VolumeError(f"{path}: reading MetaImage needs SimpleITK (pip install 'bosam[io]')") from None

    path = Path(path)
    problem = _metaimage_data_problem(path)
    if problem:
        raise VolumeError(f"{path}: {problem}")
    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:  # noqa: BLE001 - SimpleITK raises RuntimeError with multi-line text
        raise VolumeError(f"{path}: cannot read MetaImage ({_itk_reason(exc)})") from None
    dim = img.GetDimension()
    if dim == 4 and img.GetSize()[3] == 1:  # a 3-D image stored with a fourth axis of size 1
        try:
            img = sitk.Extract(img, list(img.GetSize()[:3]) + [0], [0, 0, 0, 0])
        except Exception as exc:  # noqa: BLE001 - the 3-D part of the direction is not a rotation
            raise VolumeError(f"{path}: TransformMatrix: the 3-D part of the 4-D geometry is not usable "
                              f"({_one_line(exc)})") from None
        dim = img.GetDimension()
    if dim != 3:
        raise VolumeError(f"{path}: NDims: expected a 3-D image, got {dim}-D of size {list(img.GetSize())}")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{path}: ElementNumberOfChannels: expected one value per voxel, got "
                          f"{img.GetNumberOfComponentsPerPixel()}")
    data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    if data.dtype.kind not in "biuf":
        raise VolumeError(f"{path}: ElementType: unsupported voxel type {data.dtype}")
    spacing = np.asarray(img.GetSpacing(), dtype=np.float64)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        raise VolumeError(f"{path}: ElementSpacing: expected three positive numbers, got {spacing.tolist()}")
    if abs(np.linalg.det(direction)) < 1e-6 or not np.all(np.isfinite(origin)):
        raise VolumeError(f"{path}: TransformMatrix/Offset: not a usable geometry "
                          f"(direction {direction.tolist()}, origin {origin.tolist()})")
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * spacing[None, :]  # column a: the step of axis a
    affine_lps[:3, 3] = origin
    meta = {"format": "metaimage"}
    return Volume(data, LPS_TO_RAS @ affine_lps, None, path, meta)


# ---------------------------------------------------------------------------------------------
# label maps in NRRD / MetaImage


def write_label_map_other(data: np.ndarray, affine_ras: np.ndarray, path: str | os.PathLike) -> Path:
    """``data`` (i, j, k) with the RAS ``affine_ras`` as a gzip-compressed .nrrd (pynrrd, space
    left-posterior-superior) or .mha (SimpleITK, ITK's LPS geometry), atomically. Both keep the
    voxel order and geometry exactly (oblique grids included): ``read_volume`` gives back the
    same array and affine."""
    from .atomic import atomic_path

    path = Path(path)
    lps = LPS_TO_RAS @ np.asarray(affine_ras, dtype=np.float64)  # the sign flip is its own inverse
    make_output_folder(path)
    if path.name.lower().endswith(".nrrd"):
        try:
            import nrrd
        except ImportError:  # pragma: no cover - depends on the install
            raise VolumeError(f"{path}: writing NRRD needs pynrrd (pip install 'bosam[io]')") from None
        header = {"space": "left-posterior-superior", "space directions": lps[:3, :3].T,
                  "space origin": lps[:3, 3], "encoding": "gzip", "kinds": ["domain"] * 3}
        with atomic_path(path, suffix=".nrrd") as tmp:
            nrrd.write(str(tmp), np.asfortranarray(data), header, index_order="F")
        return path
    try:
        import SimpleITK as sitk
    except ImportError:  # pragma: no cover - depends on the install
        raise VolumeError(f"{path}: writing MetaImage needs SimpleITK (pip install 'bosam[io]')") from None
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data).transpose(2, 1, 0)))  # sitk: (k, j, i)
    img.SetSpacing([float(v) for v in spacing])
    img.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    img.SetOrigin([float(v) for v in lps[:3, 3]])
    with atomic_path(path, suffix=".mha") as tmp:
        sitk.WriteImage(img, str(tmp), True)
    return path
