"""Volume = voxel array in file order + 4x4 affine (voxel i,j,k -> world RAS mm) + header.

One coordinate rule everywhere: ``affine @ [i, j, k, 1] = [x, y, z, 1]`` in RAS millimetres
(nibabel's convention). Nothing in bosam flips axes by hand; every conversion is an affine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .errors import VolumeError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3-D image or label map on its own voxel grid.

    Attributes:
        array: voxel values in file order (i, j, k); dtype as stored (int16 CT stays int16).
        affine: (4, 4) float64, voxel (i, j, k) -> world RAS millimetres.
        header: the nibabel header the file came with (keeps qform/sform codes), or None.
        path: where it was read from, for messages.
    """

    array: np.ndarray
    affine: np.ndarray
    header: Any = None
    path: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4):
            raise VolumeError(f"{self.name}: affine must be 4x4, got {self.affine.shape}")
        if self.array.ndim != 3:
            raise VolumeError(f"{self.name}: expected a 3-D volume, got shape {tuple(self.array.shape)}")
        if not np.all(np.isfinite(self.affine)) or abs(np.linalg.det(self.affine[:3, :3])) < 1e-12:
            raise VolumeError(f"{self.name}: affine is singular or not finite")

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "<volume>"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> np.ndarray:
        """Voxel size along i, j, k in millimetres (column norms of the affine)."""
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3])))

    @property
    def axcodes(self) -> str:
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    def voxel_to_world(self, ijk: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices (float ok) -> (N, 3) RAS millimetres."""
        ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, xyz_ras_mm: np.ndarray) -> np.ndarray:
        """(N, 3) RAS millimetres -> (N, 3) float voxel indices."""
        xyz = np.asarray(xyz_ras_mm, dtype=np.float64).reshape(-1, 3)
        inv = np.linalg.inv(self.affine)
        return xyz @ inv[:3, :3].T + inv[:3, 3]

    def contains_voxel(self, ijk: np.ndarray) -> np.ndarray:
        """Whether each (float) voxel index lies within the array (voxel centres +-0.5)."""
        ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        upper = np.asarray(self.shape, dtype=np.float64) - 0.5
        return np.all((ijk >= -0.5) & (ijk <= upper), axis=1)

    def value_at(self, ijk: np.ndarray) -> np.ndarray:
        """Nearest-voxel values at (float) voxel indices; NaN outside the array."""
        ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        out = np.full(len(ijk), np.nan)
        inside = self.contains_voxel(ijk)
        idx = np.clip(np.rint(ijk[inside]).astype(int), 0, np.asarray(self.shape) - 1)
        out[inside] = self.array[idx[:, 0], idx[:, 1], idx[:, 2]]
        return out

    def with_array(self, array: np.ndarray) -> "Volume":
        """A volume on the same grid (affine, header) holding another array."""
        if tuple(array.shape) != self.shape:
            raise VolumeError(f"{self.name}: array shape {array.shape} does not match grid {self.shape}")
        return Volume(array, self.affine.copy(), self.header, self.path, dict(self.meta))


# ---------------------------------------------------------------------------------------------
# reading


#: file endings read_volume reads (besides a DICOM series folder), in the order messages list them
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a CT or label volume: NIfTI (.nii/.nii.gz), a DICOM series folder (or one file of
    a series: the series it belongs to, from the files of its folder), NRRD or MetaImage
    (.mha/.mhd)."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    if path.is_dir():
        from .volume_io import read_dicom_series

        return read_dicom_series(path)
    name = path.name.lower()
    if name.endswith(".dcm") or (not name.endswith(VOLUME_SUFFIXES) and _has_dicom_preamble(path)):
        from .volume_io import read_dicom_series_of

        return read_dicom_series_of(path)
    if name.endswith(".nrrd") or name.endswith(".nhdr"):
        from .volume_io import read_nrrd

        return read_nrrd(path)
    if name.endswith(".mha") or name.endswith(".mhd"):
        from .volume_io import read_metaimage

        return read_metaimage(path)
    if is_nifti(path):
        return read_nifti(path)
    raise VolumeError(f"{path}: unsupported file type (expected {', '.join(VOLUME_SUFFIXES)}, a DICOM folder or file)")


def _has_dicom_preamble(path: Path) -> bool:
    """A DICOM Part 10 file: "DICM" after the 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _one_line(exc: BaseException) -> str:
    """An exception as ``Type: message`` on one line (library messages can span lines)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a NIfTI-1/2 file (.nii or .nii.gz) with nibabel into a :class:`Volume`.

    * The array is loaded into memory (no memmap, so the file may be replaced later, e.g. by an
      output written over it) in the stored dtype: int16/int32/float CT stays as it is.
    * ``scl_slope``/``scl_inter`` are applied when set (NaN or 0 slope means "no scaling"); a
      scaled integer image becomes int16 when slope and intercept are integers and the values
      fit, otherwise float32.
    * The affine is the sform when ``sform_code > 0``, else the qform when ``qform_code > 0``,
      else nibabel's fallback from ``pixdim`` (ANALYZE-style files, recorded in ``meta``).
    * A trailing singleton 4th (and 5th) dimension is dropped; a real 4-D image is refused.

    Every problem is a :class:`VolumeError` with one line naming the file and the header field.
    """
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file")
    img = _fast_gz_nifti(path)
    if img is None:
        try:
            img = nib.load(str(path), mmap=False)
        except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
            raise VolumeError(f"{path}: header: cannot read as NIfTI ({_one_line(exc)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{path}: header: not a NIfTI image ({type(img).__name__})")
    full_shape = tuple(int(s) for s in img.shape)
    shape = full_shape
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        what = f"{len(full_shape)}-D image" if len(shape) > 3 else f"{len(shape)}-D image"
        raise VolumeError(f"{path}: dim: expected a 3-D volume (a trailing size-1 4th dim is fine), got a {what} of shape {full_shape}")
    if min(shape) < 1:
        raise VolumeError(f"{path}: dim: empty volume of shape {full_shape}")
    declared = int(np.prod(full_shape, dtype=np.float64)) * np.dtype(img.get_data_dtype()).itemsize
    if not path.name.lower().endswith(".gz") and path.stat().st_size < int(img.header["vox_offset"]) + declared:
        raise VolumeError(f"{path}: image data: truncated: dim declares {full_shape} ({_size(declared)}) "
                          f"but the file holds {_size(path.stat().st_size)}")
    try:
        raw = np.asarray(img.dataobj.get_unscaled())
    except MemoryError:
        raise VolumeError(f"{path}: dim: {full_shape} declares {_size(declared)} of voxel data, more than this "
                          "machine can hold (or a corrupt header)") from None
    except Exception as exc:  # noqa: BLE001 - truncated gzip, short data ...
        raise VolumeError(f"{path}: image data: corrupt or truncated ({_one_line(exc)})") from None
    if raw.dtype.kind not in "biuf":
        raise VolumeError(f"{path}: datatype: unsupported voxel type {img.get_data_dtype()} (need integer or float)")
    raw = raw.reshape(shape)
    arr = _apply_scaling(raw, img.dataobj.slope, img.dataobj.inter, path)
    affine, source = _nifti_affine(img.header, path)
    hdr = img.header.copy()
    meta: dict[str, Any] = {"affine_source": source, "format": "nifti"}
    try:
        meta["spatial_unit"] = str(hdr.get_xyzt_units()[0])
    except Exception:  # noqa: BLE001 - an unknown unit code reads as unknown
        meta["spatial_unit"] = "unknown"
    if source == "sform":
        meta["sform_code"], meta["qform_code"] = int(hdr["sform_code"]), int(hdr["qform_code"])
        meta["sform_skew_mm"] = affine_skew_mm(affine, shape)
        if int(hdr["qform_code"]) > 0:
            try:
                qform = np.asarray(hdr.get_qform(), dtype=np.float64)
            except Exception:  # noqa: BLE001 - an unusable qform is not read, by bosam or by viewers that prefer the sform
                qform = None
            if qform is not None and np.all(np.isfinite(qform)):
                meta["qform_offset_mm"] = grid_offset_mm(affine, qform, shape)
    return Volume(arr, affine, hdr, path, meta)


def _size(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n} bytes"


def _grid_corners(shape: tuple[int, ...]) -> np.ndarray:
    """(8, 3) voxel indices of a grid's corners."""
    return np.array([[i, j, k] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)], np.float64)


def grid_offset_mm(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> float:
    """How far apart (mm, largest over the grid's 8 corners) two voxel -> world affines put a grid."""
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    return float(np.max(np.linalg.norm(_grid_corners(shape) @ diff[:3, :3].T + diff[:3, 3], axis=1)))


def affine_skew_mm(affine: np.ndarray, shape: tuple[int, ...]) -> float:
    """How far (mm, largest over the grid's corners) the nearest rotation-and-scaling affine,
    which is all a NIfTI qform or an ITK direction matrix holds, places the grid from
    ``affine``: ~0 for an orthogonal grid (oblique or not), several mm for a gantry-tilted
    (sheared) one. Computed in float64 (a qform's float32 quaternion alone is off by up to
    ~1 mm on a large grid rotated close to 180 degrees, as every LPS-stored CT is)."""
    lin = np.asarray(affine, np.float64)[:3, :3]
    scale = np.linalg.norm(lin, axis=0)
    u, _, vt = np.linalg.svd(lin / scale)
    nearest = (u @ vt) * scale
    return float(np.max(np.linalg.norm(_grid_corners(shape) @ (lin - nearest).T, axis=1)))


def _igzip() -> Any:
    """python-isal's gzip module (2-3x faster than zlib both ways), or None when not installed."""
    try:
        from isal import igzip
    except ImportError:
        return None
    return igzip


def _fast_gz_nifti(path: Path) -> Any:
    """A .nii.gz decompressed in one go with isal and parsed by nibabel from memory; None when
    isal is missing or anything is off, so that nibabel's own reader (and its precise errors)
    takes over."""
    import nibabel as nib

    igzip = _igzip()
    if igzip is None or not path.name.lower().endswith(".gz"):
        return None
    try:
        data = igzip.decompress(path.read_bytes())
        for cls in (nib.Nifti1Image, nib.Nifti2Image):
            size = cls.header_class.sizeof_hdr
            if len(data) >= size and cls.header_class.may_contain_header(data[:size]):
                return cls.from_bytes(data)
    except Exception:  # noqa: BLE001 - fall back to nibabel's reader for its error messages
        return None
    return None


def _apply_scaling(raw: np.ndarray, slope: float | None, inter: float | None, path: Path) -> np.ndarray:
    """Apply NIfTI ``scl_slope``/``scl_inter``; exact integers stay int16 where they fit."""
    slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
    inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
    if slope == 1.0 and inter == 0.0:
        return raw
    if raw.dtype.kind in "biu" and slope.is_integer() and inter.is_integer() and raw.size:
        r_min, r_max = float(raw.min()), float(raw.max())
        lo = min(r_min * slope, r_max * slope) + inter
        hi = max(r_min * slope, r_max * slope) + inter
        if -32768 <= lo and hi <= 32767:
            # every intermediate fits int32; one int32 array, scaled in place (a full-size CT's
            # uint16 + intercept made three int32 temporaries: 2.7 GB against 1 GB as int16)
            out = raw.astype(np.int32)
            if slope != 1.0:
                out *= int(slope)
            out += int(inter)
            return out.astype(np.int16)
    out = raw.astype(np.float32) * np.float32(slope) + np.float32(inter)
    if not np.all(np.isfinite(out)):
        raise VolumeError(f"{path}: scl_slope/scl_inter: scaling ({slope}, {inter}) gives non-finite values")
    return out


def _usable(m: np.ndarray | None) -> bool:
    return m is not None and bool(np.all(np.isfinite(m))) and abs(float(np.linalg.det(m[:3, :3]))) > 1e-12


def _nifti_affine(hdr: Any, path: Path) -> tuple[np.ndarray, str]:
    """The voxel -> RAS mm affine from a NIfTI header, and its source: sform, else qform, else pixdim."""
    scode = int(hdr["sform_code"])
    qcode = int(hdr["qform_code"])
    if scode > 0:
        sform = hdr.get_sform()
        if not _usable(sform):
            raise VolumeError(f"{path}: srow_x/srow_y/srow_z: sform (sform_code={scode}) is singular or not finite")
        return np.asarray(sform, dtype=np.float64), "sform"
    if qcode > 0:
        try:
            qform = hdr.get_qform()
        except Exception as exc:  # noqa: BLE001 - bad quaternion, pixdim ...
            raise VolumeError(f"{path}: quatern_b/c/d, pixdim: invalid qform ({_one_line(exc)})") from None
        if not _usable(qform):
            raise VolumeError(f"{path}: pixdim: qform (qform_code={qcode}) is singular or not finite, pixdim={list(map(float, hdr['pixdim'][1:4]))}")
        return np.asarray(qform, dtype=np.float64), "qform"
    base = hdr.get_base_affine()
    if not _usable(base):
        raise VolumeError(f"{path}: pixdim: no sform/qform and pixdim {list(map(float, hdr['pixdim'][1:4]))} gives no usable affine")
    return np.asarray(base, dtype=np.float64), "pixdim"


# ---------------------------------------------------------------------------------------------
# checks of a CT's values


def require_finite(volume: Volume) -> Volume:
    """``volume``, or a :class:`VolumeError` naming the file when voxels are NaN or infinite
    (they would turn every model window they touch into NaN, and its masks into nothing)."""
    arr = volume.array
    if arr.dtype.kind == "f":
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
        if bad:
            where = volume.path if volume.path is not None else "CT"
            raise VolumeError(f"{where}: image data: {bad} voxels are NaN or infinite (fill them, e.g. with -1000 HU "
                              "outside the scan's field of view)")
    return volume


#: bumped when ``hu_warning``'s rules change, so that dataset caches recompute their verdicts
HU_CHECK_VERSION = 2


def hu_warning(volume: Volume) -> str | None:
    """A one-line warning when a CT's values do not look like Hounsfield units, else None.

    The model's normalisation and ``--refine hu`` both read the values as HU, so a CT on another
    scale gives wrong masks without any error. Looked at on up to ~2 M evenly spaced voxels,
    leaving out a padding value (the lowest value, below -1100, when many voxels hold exactly
    it: the outside of a circular field of view, e.g. -2000 or -3024):

    * nothing below 0: no air (-1000) or fat (about -100), most likely HU + 1024 stored without
      its rescale intercept (or not a CT);
    * much at 824..1224 and almost nothing below -500 (no air, no lung): the same 1024 offset,
      with a few noisy voxels below 0;
    * under 1 % at -200..200 (soft tissue) but much at -1224..-824 and something below -1300,
      or over 5 % below -1300 (far under air): a rescale intercept applied twice (data already
      in HU saved with a leftover ``scl_inter`` of -1024).

    The soft-tissue rules need 50 000 voxels or more (a crop of one bone need hold none).
    """
    arr = volume.array
    if arr.size == 0 or arr.dtype.kind == "b":
        return None
    sample = np.asarray(arr).ravel(order="K")[:: max(1, arr.size // 2_000_000)].astype(np.float32, copy=False)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return None
    where = f"{volume.path}: " if volume.path is not None else ""
    lowest = float(sample.min())
    # -1000/-1024 are air, often clipped to exactly that; padding values lie well below (-2000, -3024 ...)
    padding = lowest < -1100 and float(np.count_nonzero(sample == lowest)) / sample.size > 0.005
    rest = sample[sample != lowest] if padding else sample
    if rest.size == 0:
        return None
    aside = f" apart from the padding value {lowest:g}" if padding else ""
    convert = ("bosam reads the values as HU, so convert it first (e.g. subtract 1024 where the rescale intercept "
               "was dropped)")
    if float(rest.min()) >= 0:
        return (f"{where}no voxel below 0{aside} (lowest {float(rest.min()):g}, highest {float(rest.max()):g}): this "
                f"does not look like a CT in Hounsfield units (air -1000, fat about -100); {convert}")
    if rest.size < 50_000:  # a small crop (of one bone, say) need not hold any soft tissue
        return None
    twice = ("the rescale intercept looks applied twice (e.g. data already in HU saved with scl_inter -1024); bosam "
             "reads the values as HU, so fix the scaling first")
    shifted = float(np.mean((rest >= 824) & (rest <= 1224)))
    if shifted > 0.2 and float(np.mean(rest < -500)) < 0.01:
        return (f"{where}{100 * shifted:.0f} % of the voxels{aside} lie at 824..1224 and almost none below -500 (air, "
                f"lung): this looks like HU + 1024 without its rescale intercept; {convert}")
    soft = float(np.mean((rest >= -200) & (rest <= 200)))
    down = float(np.mean((rest >= -1224) & (rest <= -824)))
    # a wrist in a wide field of view is mostly air but ~5 % soft tissue; shifted data also hold
    # values far under air (its air, or a padding value shifted with it)
    if soft < 0.01 and down > 0.2 and lowest < -1300:
        return (f"{where}{100 * down:.0f} % of the voxels{aside} lie at -1224..-824 and only {100 * soft:.0f} % at "
                f"-200..200 (soft tissue in HU): {twice}")
    very_low = float(np.mean(rest < -1300))
    if very_low > 0.05:
        return f"{where}{100 * very_low:.0f} % of the voxels{aside} are below -1300, far under air (-1000 HU): {twice}"
    return None


def geometry_warning(volume: Volume) -> str | None:
    """A one-line warning when viewers disagree about where a NIfTI CT lies in patient space, so
    that world clicks (RAS/LPS mm) taken in one may fall elsewhere here:

    * neither sform nor qform (both codes 0): bosam (as nibabel) builds the affine from the
      voxel sizes alone; ITK-based viewers flip x and y;
    * spatial units declared as metres or microns: bosam (as nibabel) reads mm regardless;
      ITK-based viewers scale;
    * a sheared sform (over 0.5 mm from the nearest orthogonal grid at a corner): ITK-based
      viewers (3D Slicer, ITK-SNAP, SimpleITK) cannot hold a shear and read the qform or an
      orthogonalised sform;
    * an sform and a qform that place the grid more than 1 mm apart where those viewers read
      the qform: when the sform's code is not 1 (scanner; registration tools write 2 or 4
      beside a scanner qform).

    bosam reads the sform, as nibabel and FSL do. For a DICOM CT, whose geometry needs no
    warning, the note is its ``Modality`` when that is not CT (an MR or PET series is read and
    segmented, but its values are no Hounsfield units).
    """
    where = f"{volume.path}: " if volume.path is not None else ""
    meta = volume.meta
    if meta.get("affine_source") == "pixdim":
        return (f"{where}sform_code and qform_code are 0: the file does not say where the CT lies in patient space, "
                "so bosam places it from the voxel sizes alone (as nibabel does; ITK-based viewers differ); "
                "give voxel clicks, or world clicks taken on this same file")
    unit = meta.get("spatial_unit")
    if unit in ("meter", "micron"):
        return (f"{where}xyzt_units: the voxel sizes are declared in {unit}s; bosam reads the affine as millimetres "
                "(as nibabel does, whatever the unit), while ITK-based viewers (3D Slicer, ITK-SNAP) scale it to mm, so "
                "the CT's size and world clicks differ between them: set the unit to mm if the numbers are mm, or "
                "convert the file")
    skew = float(meta.get("sform_skew_mm") or 0.0)
    if skew > 0.5:
        return (f"{where}the sform is sheared (gantry tilt?): ITK-based viewers (3D Slicer, ITK-SNAP) cannot hold a "
                f"shear and place this CT differently (the qform, or the sform made orthogonal: up to {skew:.1f} mm "
                "off), so world clicks taken in them land elsewhere: give voxel clicks, or clicks from a viewer that "
                "reads the sform (bosam reads it, as nibabel and FSL do)")
    offset = float(meta.get("qform_offset_mm") or 0.0)
    if offset > 1.0 and meta.get("sform_code") != 1:
        return (f"{where}sform and qform place the CT up to {offset:.1f} mm apart; bosam uses the sform (as nibabel "
                f"and FSL do), while ITK-based viewers (3D Slicer, ITK-SNAP) use the qform here (its sform_code is "
                f"{meta.get('sform_code')}, not 1), so world clicks taken in them land elsewhere: give voxel clicks, "
                "or clicks from a viewer that reads the sform")
    modality = str(meta.get("modality") or "").strip()
    if meta.get("format") in ("dicom", "dicom-multiframe") and modality and modality.upper() != "CT":
        return (f"{where}Modality: {modality}, not CT: bosam segments bones in CT values (Hounsfield units); "
                "check the masks, or that this series is a CT labelled wrongly")
    return None


def nifti_output_warning(volume: Volume, path: str | os.PathLike) -> str | None:
    """A one-line warning when a NIfTI output cannot say where a non-NIfTI CT's grid lies for
    every reader: a sheared grid (a gantry-tilted DICOM series) is exact in the sform, but a
    qform holds no shear, and ITK-based viewers place such a file by its qform, up to the
    returned distance off. NRRD, MetaImage and DICOM SEG outputs hold the grid exactly."""
    name = Path(path).name.lower()
    if not name.endswith((".nii", ".nii.gz")) or volume.meta.get("format") == "nifti":
        return None  # a NIfTI CT's own header is reused: viewers place both files alike
    skew = affine_skew_mm(volume.affine, volume.shape)
    if skew <= 0.5:
        return None
    return (f"{path}: the CT's grid is sheared (gantry tilt?): a NIfTI file holds that exactly only in its sform, and "
            f"ITK-based viewers (3D Slicer, ITK-SNAP) read its qform, up to {skew:.1f} mm off; write the label map "
            "as .nrrd, .mha or .dcm (DICOM SEG) for such a CT")


# ---------------------------------------------------------------------------------------------
# writing


def label_dtype(max_label: int) -> np.dtype:
    """The smallest label dtype: uint8 up to 255, uint16 up to 65535."""
    if max_label < 0:
        raise VolumeError("labels must be non-negative")
    if max_label <= 255:
        return np.dtype(np.uint8)
    if max_label <= 65535:
        return np.dtype(np.uint16)
    raise VolumeError(f"label {max_label} does not fit uint16")


def write_label_map(labels: np.ndarray, like: Volume, path: str | os.PathLike,
                    names: Mapping[int, str] | None = None) -> Path:
    """Write ``labels`` on exactly ``like``'s grid (shape, affine, qform/sform codes), atomically.

    The dtype is uint8 when every label is <= 255, else uint16; float label arrays are accepted
    when every value is a whole number (label maps are often stored as float64). The file
    appears complete or not at all (temp file in the same folder + rename). A ``.dcm`` path
    writes a DICOM SEG referencing ``like``'s DICOM slices, one segment per entry of ``names``
    (label value -> name, in segment order).
    """
    path = Path(path)
    ending = label_map_ending(path)
    labels = np.asarray(labels)
    if tuple(labels.shape) != like.shape:
        raise VolumeError(f"{path}: label map shape {tuple(labels.shape)} differs from the CT grid {like.shape}")
    if labels.dtype.kind not in "biuf":
        raise VolumeError(f"{path}: labels: unsupported dtype {labels.dtype}")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)):
            raise VolumeError(f"{path}: labels: NaN or infinite values in the label map")
        if not np.array_equal(labels, np.rint(labels)):
            raise VolumeError(f"{path}: labels: non-integer values in the label map")
    lo = int(labels.min()) if labels.size else 0
    hi = int(labels.max()) if labels.size else 0
    if lo < 0 or hi > 65535:
        raise VolumeError(f"{path}: labels: values must be in 0..65535, got {lo}..{hi}")
    data = labels.astype(label_dtype(hi), copy=False)
    if ending == ".dcm":
        from .dicom_seg import write_dicom_seg

        return write_dicom_seg(data, like, path, names)
    if ending in (".nrrd", ".mha"):
        from .volume_io import write_label_map_other

        return write_label_map_other(data, like.affine, path)
    return _atomic_nifti_save(_nifti_like(data, like), path)


#: file endings write_label_map writes: NIfTI, single-file NRRD / MetaImage (a detached
#: .nhdr/.mhd header would name a data file that the atomic rename cannot carry along), or a
#: DICOM SEG (only for a CT read from a DICOM series)
LABEL_MAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm")


def label_map_ending(path: str | os.PathLike) -> str:
    """The file ending of a label map path (one of ``LABEL_MAP_SUFFIXES``); a VolumeError for a
    path write_label_map cannot write, so callers can refuse it before any work is done."""
    path = Path(path)
    for ending in LABEL_MAP_SUFFIXES:
        if path.name.lower().endswith(ending):
            return ending
    raise VolumeError(f"{path}: a label map is written as {', '.join(LABEL_MAP_SUFFIXES)}")


def write_volume(array: np.ndarray, like: Volume, path: str | os.PathLike) -> Path:
    """Write any array on ``like``'s grid (same shape, affine and codes), atomically."""
    path = Path(path)
    if not is_nifti(path):
        raise VolumeError(f"{path}: output must end in .nii or .nii.gz")
    array = np.asarray(array)
    if tuple(array.shape) != like.shape:
        raise VolumeError(f"{path}: array shape {tuple(array.shape)} differs from the grid {like.shape}")
    return _atomic_nifti_save(_nifti_like(array, like), path)


def _nifti_like(data: np.ndarray, like: Volume) -> Any:
    """A NIfTI image of ``data`` with ``like``'s geometry.

    When ``like`` came from a NIfTI file and still has that file's affine, the header's
    sform/qform matrices and codes are kept as they were (including code 0, and a qform that
    differs from the sform); otherwise both forms are set to ``like.affine`` with the header's
    codes (scanner code 1 when the source had neither, e.g. DICOM or NRRD input).
    """
    import nibabel as nib

    if like.header is not None and isinstance(like.header, nib.Nifti1Header):
        hdr = like.header.copy()
        img_cls = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
        scode, qcode = int(hdr["sform_code"]), int(hdr["qform_code"])
        try:
            hdr_affine, _ = _nifti_affine(hdr, like.path or Path("<header>"))
        except VolumeError:
            hdr_affine = None
        same = hdr_affine is not None and np.allclose(hdr_affine, like.affine, rtol=0, atol=1e-5)
        if not same:
            if scode == 0 and qcode == 0:
                scode = qcode = 1
            hdr.set_sform(like.affine, code=scode)
            hdr.set_qform(like.affine, code=qcode)
        img = img_cls(data, None, header=hdr)
        img.header.set_data_shape(data.shape)
        img.header.set_data_dtype(data.dtype)
        img.header["scl_slope"] = np.nan
        img.header["scl_inter"] = np.nan
        img.header["cal_min"] = 0
        img.header["cal_max"] = 0
        return img
    img = nib.Nifti1Image(data, like.affine)
    img.header.set_sform(like.affine, code=1)
    img.header.set_qform(like.affine, code=1)
    img.header.set_xyzt_units("mm")
    return img


def make_output_folder(path: Path) -> None:
    """Create ``path``'s folder, or a one-line VolumeError naming ``path``."""
    from .atomic import make_dirs

    try:
        make_dirs(path.parent)
    except OSError as exc:
        raise VolumeError(f"{path}: cannot create the output folder ({_one_line(exc)})") from None


def _atomic_nifti_save(img: Any, path: Path) -> Path:
    """Save through a temp file in the target folder, fsync, then rename over ``path``.

    On any failure the temp file is removed and ``path`` is untouched. The file gets the usual
    permissions (0666 minus the umask) rather than mkstemp's private 0600.
    """
    import nibabel as nib

    make_output_folder(path)
    gz = path.name.lower().endswith(".gz")
    with atomic_path(path, suffix=".nii.gz" if gz else ".nii") as tmp:
        if not gz:
            nib.save(img, str(tmp))
        else:
            # nibabel's bytes before compression, level 1 as nibabel's default, through isal when
            # installed; the gzip header gets no name (not the temp file's) and no time, so the
            # same image always gives the same file
            import gzip

            igzip = _igzip()
            gzip_file = gzip.GzipFile if igzip is None else igzip.IGzipFile
            with open(tmp, "wb") as raw, gzip_file(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as f:
                img.to_file_map({"image": nib.FileHolder(fileobj=f)})
    return path
