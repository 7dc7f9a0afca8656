"""Volume = voxel array in file order + 4x4 affine (voxel i,j,k -> world RAS mm) + header.

One coordinate rule everywhere: ``affine @ [i, j, k, 1] = [x, y, z, 1]`` in RAS millimetres
(nibabel's convention). Nothing in bosam flips axes by hand; every conversion is an affine.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


def is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a CT or label volume: NIfTI (.nii/.nii.gz), a DICOM series folder, or NRRD."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file or folder")
    if path.is_dir():
        from .volume_io import read_dicom_series

        return read_dicom_series(path)
    name = path.name.lower()
    if name.endswith(".nrrd") or name.endswith(".nhdr"):
        from .volume_io import read_nrrd

        return read_nrrd(path)
    if is_nifti(path):
        return read_nifti(path)
    raise VolumeError(f"{path}: unsupported file type (expected .nii, .nii.gz, .nrrd or a DICOM folder)")


def read_nifti(path: str | os.PathLike) -> Volume:
    """NIfTI-1/2 with nibabel: keeps the stored dtype, applies scl_slope/inter when set."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for bad files
        raise VolumeError(f"{path}: cannot read NIfTI ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{path}: not a NIfTI image")
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    elif len(shape) == 5 and shape[3] == 1 and shape[4] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise VolumeError(f"{path}: dim: expected a 3-D volume, got shape {tuple(img.shape)}")
    try:
        arr = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - truncated gzip, short data ...
        raise VolumeError(f"{path}: corrupt or truncated NIfTI data ({type(exc).__name__}: {exc})") from None
    arr = arr.reshape(shape, order="A") if arr.ndim != 3 else arr
    affine = _nifti_affine(img, path)
    return Volume(arr, affine, img.header.copy(), path)


def _nifti_affine(img: Any, path: Path) -> np.ndarray:
    """sform when its code is set, else qform when set, else nibabel's best affine."""
    hdr = img.header
    sform, scode = hdr.get_sform(coded=True)
    if sform is not None and int(scode) > 0:
        return np.asarray(sform, dtype=np.float64)
    qform, qcode = hdr.get_qform(coded=True)
    if qform is not None and int(qcode) > 0:
        return np.asarray(qform, dtype=np.float64)
    aff = img.affine
    if aff is None:
        raise VolumeError(f"{path}: no usable affine in header")
    return np.asarray(aff, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# writing


def label_dtype(max_label: int) -> np.dtype:
    """uint8 up to 255, uint16 up to 65535."""
    if max_label < 0:
        raise VolumeError("labels must be non-negative")
    if max_label <= 255:
        return np.dtype(np.uint8)
    if max_label <= 65535:
        return np.dtype(np.uint16)
    raise VolumeError(f"label {max_label} does not fit uint16")


def write_label_map(labels: np.ndarray, like: Volume, path: str | os.PathLike) -> Path:
    """Write ``labels`` on exactly ``like``'s grid (shape, affine, qform/sform codes), atomically."""
    import nibabel as nib

    path = Path(path)
    if tuple(labels.shape) != like.shape:
        raise VolumeError(f"{path}: label map shape {labels.shape} differs from the CT grid {like.shape}")
    dtype = label_dtype(int(labels.max()) if labels.size else 0)
    data = labels.astype(dtype, copy=False)
    img = _nifti_like(data, like)
    if not is_nifti(path):
        raise VolumeError(f"{path}: output must end in .nii or .nii.gz")
    return _atomic_nifti_save(img, path)


def write_volume(array: np.ndarray, like: Volume, path: str | os.PathLike) -> Path:
    """Write any array on ``like``'s grid (same shape, affine and codes), atomically."""
    path = Path(path)
    if tuple(array.shape) != like.shape:
        raise VolumeError(f"{path}: array shape {array.shape} differs from the grid {like.shape}")
    return _atomic_nifti_save(_nifti_like(array, like), path)


def _nifti_like(data: np.ndarray, like: Volume) -> Any:
    import nibabel as nib

    if like.header is not None and isinstance(like.header, nib.Nifti1Header):
        hdr = like.header.copy()
        sform, scode = like.header.get_sform(coded=True)
        qform, qcode = like.header.get_qform(coded=True)
        img_cls = nib.Nifti2Image if isinstance(like.header, nib.Nifti2Header) else nib.Nifti1Image
        img = img_cls(data, None, header=hdr)
        img.header.set_data_shape(data.shape)
        img.header.set_data_dtype(data.dtype)
        # Exactly the input's geometry and codes (including code 0 where the input had 0).
        img.header.set_sform(like.affine if sform is None else sform, code=int(scode))
        img.header.set_qform(like.affine if qform is None else qform, code=int(qcode))
        if int(scode) == 0 and int(qcode) == 0:
            img.header.set_sform(like.affine, code=0)
        img.header["scl_slope"] = np.nan
        img.header["scl_inter"] = np.nan
        img.header["cal_min"] = 0
        img.header["cal_max"] = 0
        img.header["dim"][4:] = 1
        img.header["dim"][0] = 3
        return img
    img = nib.Nifti1Image(data, like.affine)
    img.header.set_sform(like.affine, code=1)
    img.header.set_qform(like.affine, code=1)
    return img


def _atomic_nifti_save(img: Any, path: Path) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.lower().endswith(".gz") else ".nii"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
