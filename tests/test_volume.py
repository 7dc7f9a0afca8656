"""Volumes: NIfTI corner cases, label maps on the exact input grid, DICOM series and NRRD.

Every synthetic file is built in tmp_path with the field's own writers (nibabel, pydicom,
pynrrd); the expected geometry is computed independently of bosam from the construction.
"""

from __future__ import annotations

import gzip
import os
import random
from pathlib import Path
from typing import Any, Callable

import nibabel as nib
import numpy as np
import pytest

from bosam_cli.errors import VolumeError
from bosam_cli.volume import Volume, read_nifti, read_volume, write_label_map, write_volume

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
CT_SM = DATA / "totalsegmentator" / "example_ct_sm.nii.gz"
VERSE = DATA / "verse_mask_only" / "sub-verse004_seg-vert_msk.nii.gz"
needs_ct_sm = pytest.mark.skipif(not CT_SM.exists(), reason=f"shared test data not found: {CT_SM}")
needs_verse = pytest.mark.skipif(not VERSE.exists(), reason=f"shared test data not found: {VERSE}")


def rotation(axis, degrees: float) -> np.ndarray:
    """Rodrigues: a proper rotation matrix about ``axis``."""
    a = np.asarray(axis, dtype=float)
    a = a / np.linalg.norm(a)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


def oblique_affine(spacing=(0.7, 0.9, 2.5), origin=(-120.5, 33.25, -610.0)) -> np.ndarray:
    aff = np.eye(4)
    aff[:3, :3] = rotation([1, 2, 3], 23.0) @ np.diag(spacing)
    aff[:3, 3] = origin
    return aff


def save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, scode: int = 2, qcode: int = 0, slope=np.nan, inter=np.nan) -> Path:
    img = nib.Nifti1Image(data, None)
    img.header.set_data_dtype(data.dtype)
    img.header.set_sform(affine, code=scode)
    img.header.set_qform(affine, code=qcode)
    img.header["scl_slope"] = slope
    img.header["scl_inter"] = inter
    nib.save(img, str(path))
    return path


def ct_like(shape=(7, 6, 5), dtype=np.int16) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(-1024, 3000, size=shape).astype(dtype)


def assert_one_line_naming(exc: pytest.ExceptionInfo, path: Path, *fields: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    for f in fields:
        assert f in msg, msg


# ---------------------------------------------------------------------------------------------
# NIfTI reading


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32, np.float64])
def test_nifti_keeps_stored_dtype_and_values(tmp_path, dtype):
    data = ct_like(dtype=dtype)
    aff = oblique_affine()
    vol = read_volume(save_nifti(tmp_path / "ct.nii.gz", data, aff))
    assert vol.array.dtype == dtype
    np.testing.assert_array_equal(vol.array, data)
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)
    assert vol.meta["affine_source"] == "sform"
    assert not isinstance(vol.array, np.memmap)


def test_nifti_sform_only_ignores_qform_matrix(tmp_path):
    aff = oblique_affine()
    img = nib.Nifti1Image(ct_like(), None)
    img.header.set_sform(aff, code=2)
    img.header.set_qform(np.diag([5.0, 5.0, 5.0, 1.0]), code=0)  # stale matrix, code 0: must be ignored
    nib.save(img, str(tmp_path / "s.nii"))
    vol = read_nifti(tmp_path / "s.nii")
    np.testing.assert_allclose(vol.affine, aff, atol=1e-5)


def test_nifti_qform_only(tmp_path):
    aff = oblique_affine()
    img = nib.Nifti1Image(ct_like(), None)
    img.header.set_qform(aff, code=1)
    img.header.set_sform(np.diag([9.0, 9.0, 9.0, 1.0]), code=0)  # stale, code 0
    nib.save(img, str(tmp_path / "q.nii.gz"))
    vol = read_nifti(tmp_path / "q.nii.gz")
    assert vol.meta["affine_source"] == "qform"
    np.testing.assert_allclose(vol.affine, aff, atol=1e-4)  # quaternion storage is float32


def test_nifti_sform_wins_over_a_different_qform(tmp_path):
    sform = oblique_affine()
    qform = np.diag([2.0, 2.0, 2.0, 1.0])
    img = nib.Nifti1Image(ct_like(), None)
    img.header.set_sform(sform, code=2)
    img.header.set_qform(qform, code=1)
    nib.save(img, str(tmp_path / "both.nii"))
    np.testing.assert_allclose(read_nifti(tmp_path / "both.nii").affine, sform, atol=1e-5)


def test_nifti_without_codes_falls_back_to_pixdim(tmp_path):
    img = nib.Nifti1Image(ct_like(), None)
    img.header.set_zooms((0.5, 0.75, 2.0))
    img.header.set_sform(None, code=0)
    img.header.set_qform(None, code=0)
    nib.save(img, str(tmp_path / "analyze.nii"))
    vol = read_nifti(tmp_path / "analyze.nii")
    assert vol.meta["affine_source"] == "pixdim"
    np.testing.assert_allclose(vol.spacing_mm, [0.5, 0.75, 2.0])


def test_nifti_nan_slope_means_no_scaling(tmp_path):
    data = ct_like()
    vol = read_nifti(save_nifti(tmp_path / "nan.nii.gz", data, np.eye(4), slope=np.nan, inter=np.nan))
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, data)


def test_nifti_integer_scaling_gives_int16_and_fractional_gives_float32(tmp_path):
    raw = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4) * 100
    vol = read_nifti(save_nifti(tmp_path / "u16.nii", raw, np.eye(4), slope=1.0, inter=-1024.0))
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, raw.astype(np.int32) - 1024)
    vol = read_nifti(save_nifti(tmp_path / "half.nii", raw, np.eye(4), slope=0.5, inter=-1024.0))
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array, raw * 0.5 - 1024)


def test_nifti_trailing_singleton_4th_dim_accepted(tmp_path):
    data = ct_like()[..., None]
    vol = read_nifti(save_nifti(tmp_path / "t1.nii.gz", data, oblique_affine()))
    assert vol.shape == (7, 6, 5)
    np.testing.assert_array_equal(vol.array, data[..., 0])


def test_nifti_real_4d_refused(tmp_path):
    path = save_nifti(tmp_path / "dwi.nii.gz", np.zeros((4, 4, 4, 3), np.int16), np.eye(4))
    with pytest.raises(VolumeError) as exc:
        read_nifti(path)
    assert_one_line_naming(exc, path, "dim", "(4, 4, 4, 3)")


def test_nifti_2d_refused(tmp_path):
    path = save_nifti(tmp_path / "slice.nii", np.zeros((4, 4), np.int16), np.eye(4))
    with pytest.raises(VolumeError) as exc:
        read_volume(path)
    assert_one_line_naming(exc, path, "dim")


def test_nifti_truncated_gz_refused(tmp_path):
    good = save_nifti(tmp_path / "good.nii.gz", ct_like((20, 20, 20)), np.eye(4))
    raw = good.read_bytes()
    bad = tmp_path / "truncated.nii.gz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeError) as exc:
        read_volume(bad)
    assert_one_line_naming(exc, bad, "image data")


def test_nifti_truncated_uncompressed_refused(tmp_path):
    good = save_nifti(tmp_path / "good.nii", ct_like((20, 20, 20)), np.eye(4))
    bad = tmp_path / "short.nii"
    bad.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(VolumeError) as exc:
        read_volume(bad)
    assert_one_line_naming(exc, bad, "image data")  # nibabel's message spans two lines
    assert "truncated: dim declares (20, 20, 20) (16000 bytes) but the file holds 1000 bytes" in str(exc.value)


def test_nifti_declaring_more_than_memory_says_so(tmp_path, monkeypatch):
    """A header that declares far more voxels than fit (a corrupt dim field, a 30000³ volume):
    one line naming 'dim' and the size, not "corrupt or truncated (MemoryError)"."""
    from bosam_cli import volume as volume_mod

    path = save_nifti(tmp_path / "big.nii.gz", ct_like((20, 20, 20)), np.eye(4))
    monkeypatch.setattr(volume_mod, "_fast_gz_nifti", lambda p: None)

    def no_memory(self):
        raise MemoryError()

    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "get_unscaled", no_memory)
    with pytest.raises(VolumeError) as exc:
        read_volume(path)
    assert_one_line_naming(exc, path, "dim: (20, 20, 20) declares 16000 bytes of voxel data, more than this machine can hold")


def test_nifti_garbage_refused(tmp_path):
    bad = tmp_path / "garbage.nii.gz"
    bad.write_bytes(b"this is not a gzip file at all" * 20)
    with pytest.raises(VolumeError) as exc:
        read_volume(bad)
    assert_one_line_naming(exc, bad, "header")
    bad2 = tmp_path / "gz_of_garbage.nii.gz"
    bad2.write_bytes(gzip.compress(b"\x00" * 400))
    with pytest.raises(VolumeError) as exc:
        read_volume(bad2)
    assert_one_line_naming(exc, bad2, "header")


def test_nifti_singular_sform_refused(tmp_path):
    img = nib.Nifti1Image(ct_like(), None)
    img.header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=2)
    nib.save(img, str(tmp_path / "flat.nii"))
    with pytest.raises(VolumeError) as exc:
        read_nifti(tmp_path / "flat.nii")
    assert_one_line_naming(exc, tmp_path / "flat.nii", "srow", "sform")


def test_read_volume_unknown_suffix_and_missing(tmp_path):
    (tmp_path / "ct.vtk").write_bytes(b"x")
    with pytest.raises(VolumeError, match="unsupported file type"):
        read_volume(tmp_path / "ct.vtk")
    with pytest.raises(VolumeError, match="no such file"):
        read_volume(tmp_path / "absent.nii.gz")


def test_oblique_world_voxel_round_trip(tmp_path):
    aff = oblique_affine()
    vol = read_nifti(save_nifti(tmp_path / "obl.nii.gz", ct_like(), aff))
    ijk = np.array([[0, 0, 0], [6, 5, 4], [3.25, 1.5, 2.75]])
    xyz = (aff @ np.c_[ijk, np.ones(3)].T).T[:, :3]
    np.testing.assert_allclose(vol.voxel_to_world(ijk), xyz, atol=1e-4)
    np.testing.assert_allclose(vol.world_to_voxel(xyz), ijk, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# label maps


GEOMETRY_FIELDS = ("sform_code", "qform_code", "srow_x", "srow_y", "srow_z", "quatern_b", "quatern_c",
                   "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z", "pixdim", "dim", "xyzt_units")


def assert_same_grid(src: Path, out: Path) -> None:
    a, b = nib.load(str(src)).header, nib.load(str(out)).header
    for k in GEOMETRY_FIELDS:
        if k == "pixdim":
            np.testing.assert_array_equal(a[k][:4], b[k][:4], err_msg=k)
        elif k == "dim":
            np.testing.assert_array_equal(a[k][1:4], b[k][1:4], err_msg=k)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    np.testing.assert_array_equal(read_nifti(src).affine, read_nifti(out).affine)


@pytest.mark.parametrize("codes", [(2, 0), (0, 1), (1, 1), (0, 0)], ids=["sform-only", "qform-only", "both", "none"])
def test_label_map_on_exact_input_grid(tmp_path, codes):
    src = save_nifti(tmp_path / "ct.nii.gz", ct_like(), oblique_affine(), scode=codes[0], qcode=codes[1])
    ct = read_nifti(src)
    labels = (ct.array > 500).astype(np.int64) * 7
    out = write_label_map(labels, ct, tmp_path / "out" / "labels.nii.gz")
    assert_same_grid(src, out)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), labels)


def test_label_map_dtype_by_range(tmp_path):
    ct = read_nifti(save_nifti(tmp_path / "ct.nii", ct_like(), np.eye(4)))
    lab = np.zeros(ct.shape, np.int32)
    lab[0, 0, 0] = 255
    assert nib.load(str(write_label_map(lab, ct, tmp_path / "a.nii"))).get_data_dtype() == np.uint8
    lab[0, 0, 0] = 256
    assert nib.load(str(write_label_map(lab, ct, tmp_path / "b.nii"))).get_data_dtype() == np.uint16
    lab[0, 0, 0] = 65535
    assert nib.load(str(write_label_map(lab, ct, tmp_path / "c.nii"))).get_data_dtype() == np.uint16


@pytest.mark.parametrize(
    "value, dtype, problem",
    [(65536, np.int32, "0..65535"), (-1, np.int16, "0..65535"), (1.5, np.float64, "non-integer"), (np.nan, np.float32, "NaN")],
)
def test_label_map_bad_values_refused_without_output(tmp_path, value, dtype, problem):
    ct = read_nifti(save_nifti(tmp_path / "ct.nii", ct_like(), np.eye(4)))
    lab = np.zeros(ct.shape, dtype)
    lab[1, 1, 1] = value
    out = tmp_path / "bad.nii.gz"
    with pytest.raises(VolumeError) as exc:
        write_label_map(lab, ct, out)
    assert_one_line_naming(exc, out, problem)
    assert not out.exists()


def test_label_map_shape_and_suffix_refused(tmp_path):
    ct = read_nifti(save_nifti(tmp_path / "ct.nii", ct_like(), np.eye(4)))
    with pytest.raises(VolumeError, match="differs from the CT grid"):
        write_label_map(np.zeros((7, 6, 4), np.uint8), ct, tmp_path / "x.nii.gz")
    for name in ("x.mhd", "x.nhdr", "x.png"):  # detached headers cannot be renamed atomically
        with pytest.raises(VolumeError, match=r"written as \.nii\.gz, \.nii, \.nrrd, \.mha"):
            write_label_map(np.zeros(ct.shape, np.uint8), ct, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii"]


@pytest.mark.parametrize("name, module", [("labels.nrrd", "nrrd"), ("labels.mha", "SimpleITK")])
def test_label_map_as_nrrd_or_metaimage_keeps_the_grid(tmp_path, name, module):
    """Grand-challenge pipelines read and write .mha, Slicer users .nrrd: an oblique LPS-stored
    CT's label map reads back with the same voxels and affine, written atomically."""
    pytest.importorskip(module)
    affine = np.eye(4)
    affine[:3, :3] = rotation([1, -2, 0.5], 19.0) @ np.diag([-0.7, -0.8, 2.5])
    affine[:3, 3] = [120.0, -33.5, 610.25]
    ct = Volume(ct_like((9, 8, 7)), affine)
    labels = np.zeros(ct.shape, np.uint16)
    labels[2:5, 1:6, 3] = 7
    labels[6, 7, 6] = 300  # above 255: uint16
    write_label_map(labels, ct, tmp_path / name)
    back = read_volume(tmp_path / name)
    assert back.array.dtype == np.uint16
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(back.affine, affine, atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp file left behind


@pytest.mark.parametrize("name", ["labels.nii.gz", "labels.nii"])
def test_label_map_write_is_atomic(tmp_path, monkeypatch, name):
    ct = read_nifti(save_nifti(tmp_path / "ct.nii", ct_like(), np.eye(4)))
    out = tmp_path / name
    write_label_map(np.ones(ct.shape, np.uint8), ct, out)
    before = out.read_bytes()

    def half_write_then_fail(img, file_map=None, **kw):
        holder = (file_map or img.file_map)["image"]
        if holder.fileobj is not None:
            holder.fileobj.write(b"partial")
        else:
            Path(holder.filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_file_map", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_label_map(np.full(ct.shape, 2, np.uint8), ct, out)
    assert out.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ct.nii", name])  # no temp left


def test_all_or_nothing_renames_every_file_at_the_end_or_none(tmp_path):
    """Inside the block a target keeps its old content (``staged`` finds the new one); the
    files appear together when the block ends; a failure leaves the old files and removes the
    folders the block made; a nested block joins the outer one."""
    from bosam_cli.atomic import all_or_nothing, atomic_write_bytes, remove_when_committed, staged

    old = tmp_path / "a.txt"
    old.write_text("old")
    with all_or_nothing():
        atomic_write_bytes(old, b"new")
        with all_or_nothing():
            atomic_write_bytes(tmp_path / "sub" / "deeper" / "b.txt", b"b")
        assert old.read_text() == "old" and staged(old).read_text() == "new" and staged(old) != old
        assert not (tmp_path / "sub" / "deeper" / "b.txt").exists()
        rel = Path(os.path.relpath(old))  # the same file spelled another way
        assert staged(rel) == staged(old) != old
    assert old.read_text() == "new" and (tmp_path / "sub" / "deeper" / "b.txt").read_text() == "b"
    assert staged(old) == old

    gone = tmp_path / "sub" / "old_mesh.stl"  # removed with the commit, not before, not on a failure
    gone.write_text("x")
    with pytest.raises(RuntimeError, match="bad mesh"):
        with all_or_nothing():
            remove_when_committed([gone])
            raise RuntimeError("bad mesh")
    assert gone.exists()
    with all_or_nothing():
        remove_when_committed([gone])
        assert gone.exists()
    assert not gone.exists()
    with pytest.raises(RuntimeError, match="bad mesh"):
        with all_or_nothing():
            atomic_write_bytes(old, b"newer")
            atomic_write_bytes(tmp_path / "made" / "here" / "c.txt", b"c")
            raise RuntimeError("bad mesh")
    assert old.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "sub"]  # no temp, no new folder


def test_a_failed_atomic_write_names_the_output_not_its_temporary_file(tmp_path, monkeypatch):
    """A read-only file system refuses the hidden temporary file; the error named it
    (".seg.nii.gz.u5024p9h.tmp.nii.gz: Read-only file system"), now the output the user asked for."""
    import errno
    import tempfile

    ct = read_nifti(save_nifti(tmp_path / "ct.nii", ct_like(), np.eye(4)))

    def read_only(prefix="", suffix="", dir=None):
        raise OSError(errno.EROFS, "Read-only file system", str(Path(dir) / f"{prefix}u5024p9h{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(OSError) as err:
        write_label_map(np.ones(ct.shape, np.uint8), ct, tmp_path / "seg.nii.gz")
    assert err.value.filename == str(tmp_path / "seg.nii.gz") and err.value.strerror == "Read-only file system"


def test_gz_fast_path_reads_and_writes_what_nibabel_does(tmp_path, monkeypatch):
    """With isal (the default install) .nii.gz files are read and written through it; the
    result equals nibabel's own gzip path byte for byte after decompression, and files either
    path writes read back identically."""
    import gzip

    pytest.importorskip("isal")
    from bosam_cli import volume as volume_mod

    src = save_nifti(tmp_path / "ct.nii.gz", ct_like((21, 17, 9)), np.diag([0.7, -0.8, 2.5, 1.0]))
    fast = read_volume(src)
    labels = (fast.array > 0).astype(np.uint8) * 3
    a = write_label_map(labels, fast, tmp_path / "fast.nii.gz")
    monkeypatch.setattr(volume_mod, "_igzip", lambda: None)
    slow = read_volume(src)
    b = write_label_map(labels, slow, tmp_path / "slow.nii.gz")
    assert np.array_equal(fast.array, slow.array) and fast.array.dtype == slow.array.dtype
    assert np.array_equal(fast.affine, slow.affine)
    assert gzip.decompress(a.read_bytes()) == gzip.decompress(b.read_bytes())
    for p in (a, b):
        back = read_volume(p)
        assert np.array_equal(back.array, labels) and np.allclose(back.affine, fast.affine)


@pytest.mark.parametrize("isal", [True, False])
def test_same_image_gives_the_same_gz_file(tmp_path, monkeypatch, isal):
    """The gzip header holds no name (the temp file's would leak) and no time: writing the same
    image twice, a second apart, gives identical files (seeded phantom datasets are reproducible)."""
    import time

    from bosam_cli import volume as volume_mod

    if isal:
        pytest.importorskip("isal")
    else:
        monkeypatch.setattr(volume_mod, "_igzip", lambda: None)
    ct = read_nifti(save_nifti(tmp_path / "ct.nii", ct_like((13, 11, 7)), np.diag([0.7, -0.8, 2.5, 1.0])))
    labels = (ct.array > 0).astype(np.uint8)
    a = write_label_map(labels, ct, tmp_path / "a" / "seg.nii.gz").read_bytes()
    time.sleep(1.1)
    b = write_label_map(labels, ct, tmp_path / "b" / "seg.nii.gz").read_bytes()
    assert a == b
    assert a[3] & 0x08 == 0  # FNAME flag: no file name stored
    assert a[4:8] == bytes(4)  # MTIME 0
    assert np.array_equal(read_volume(tmp_path / "a" / "seg.nii.gz").array, labels)


def test_label_map_permissions_follow_umask(tmp_path):
    ct = read_nifti(save_nifti(tmp_path / "ct.nii", ct_like(), np.eye(4)))
    old = os.umask(0o022)
    try:
        out = write_label_map(np.zeros(ct.shape, np.uint8), ct, tmp_path / "l.nii.gz")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644  # not mkstemp's private 0600


def test_write_volume_on_a_new_affine_updates_both_forms(tmp_path):
    src = save_nifti(tmp_path / "ct.nii", ct_like(), np.eye(4), scode=2, qcode=1)
    ct = read_nifti(src)
    moved = Volume(ct.array, oblique_affine(), ct.header, ct.path)
    out = write_volume(ct.array, moved, tmp_path / "moved.nii.gz")
    back = read_nifti(out)
    np.testing.assert_allclose(back.affine, moved.affine, atol=1e-5)
    hdr = nib.load(str(out)).header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (2, 1)
    np.testing.assert_allclose(hdr.get_qform(), moved.affine, atol=1e-4)


def test_label_map_for_a_headerless_volume(tmp_path):
    vol = Volume(np.zeros((3, 4, 5), np.int16), oblique_affine(), None, None)
    out = write_label_map(np.ones(vol.shape, np.uint8), vol, tmp_path / "l.nii")
    back = read_nifti(out)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    assert int(back.header["sform_code"]) == 1


# ---------------------------------------------------------------------------------------------
# real files


@needs_ct_sm
def test_real_ct_sm(tmp_path):
    ct = read_volume(CT_SM)
    hdr = nib.load(str(CT_SM)).header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (2, 0)
    assert np.isnan(hdr["scl_slope"])
    assert ct.shape == (122, 101, 30)
    assert ct.array.dtype == np.int16
    assert ct.axcodes == "RAS"
    np.testing.assert_allclose(np.diag(ct.affine)[:3], [3, 3, 3])
    np.testing.assert_allclose(ct.affine[:3, 3], [-177.956, 11.319, 94.302], atol=1e-3)
    assert -1100 <= ct.array.min() and ct.array.max() <= 1207
    out = write_label_map((ct.array > 200).astype(np.uint8) * 31, ct, tmp_path / "bone.nii.gz")
    assert_same_grid(CT_SM, out)


@needs_verse
def test_real_verse_mask_oblique_pir_float_labels(tmp_path):
    m = read_volume(VERSE)
    assert m.shape == (161, 338, 61)
    assert m.array.dtype == np.float64
    assert m.axcodes == "PIR"
    np.testing.assert_allclose(m.spacing_mm, [1.0, 1.0, 2.0], atol=1e-3)
    assert set(np.unique(m.array).tolist()) == {0.0, *map(float, range(16, 25))}
    out = write_label_map(m.array, m, tmp_path / "vert.nii.gz")
    assert_same_grid(VERSE, out)
    back = read_nifti(out)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, m.array.astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# DICOM


def ct_image_dataset(series_uid: str, rows: int, cols: int, *, signed: bool = False,
                     sop_class: str = "1.2.840.10008.5.1.4.1.1.2") -> Any:
    """A DICOM dataset with file meta (explicit VR little endian, a new SOP instance UID) and the
    image pixel attributes of 16-bit grey CT data; the caller adds geometry and pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID = "CT", series_uid
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, int(signed)
    return ds


def write_dicom_series(folder: Path, *, rows=6, cols=5, n=4, slope="1", intercept="-1024", series_uid=None,
                       skip_slice=None, seed=0) -> dict:
    """An oblique axial-ish CT series in LPS, files in shuffled order with meaningless names.

    Raw pixel (row r, column c) of slice k holds 100*k + 10*r + c, so the expected volume is
    known exactly. Returns the geometry used, for independent expectations.
    """
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rot = rotation([0.3, -1.0, 0.4], 17.0)
    row_dir = np.round(rot[:, 0], 6)  # DS strings hold 16 characters
    col_dir = np.round(rot[:, 1], 6)
    normal = np.cross(row_dir, col_dir)
    spacing_between_rows, spacing_between_cols, gap = 0.8, 0.7, 2.5
    origin_lps = np.array([-100.5, 80.25, -300.0])
    series_uid = series_uid or generate_uid()
    order = list(range(n))
    random.Random(seed).shuffle(order)
    for k in order:
        if k == skip_slice:
            continue
        ds = ct_image_dataset(series_uid, rows, cols)
        ds.SeriesDescription = "oblique test"
        ds.PixelSpacing = [spacing_between_rows, spacing_between_cols]
        ds.ImageOrientationPatient = [float(x) for x in (*row_dir, *col_dir)]
        pos = origin_lps + k * gap * normal
        ds.ImagePositionPatient = [float(f"{x:.6f}") for x in pos]
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        r, c = np.mgrid[0:rows, 0:cols]
        ds.PixelData = (100 * k + 10 * r + c).astype(np.uint16).tobytes()
        ds.save_as(folder / f"IM{random.Random(k + seed).randrange(10**6):06d}", enforce_file_format=True)
    return dict(row_dir=row_dir, col_dir=col_dir, normal=normal, origin_lps=origin_lps,
                d_row=spacing_between_rows, d_col=spacing_between_cols, gap=gap, n=n, rows=rows, cols=cols)


def expected_ras(g: dict, ijk: np.ndarray) -> np.ndarray:
    """DICOM PS3.3 C.7.6.2.1.1: position of column i, row j of slice k, then LPS -> RAS by sign."""
    lps = (g["origin_lps"] + ijk[:, :1] * g["d_col"] * g["row_dir"] + ijk[:, 1:2] * g["d_row"] * g["col_dir"]
           + ijk[:, 2:3] * g["gap"] * g["normal"])
    return lps * np.array([-1.0, -1.0, 1.0])


def test_dicom_oblique_series_geometry_and_values(tmp_path):
    pytest.importorskip("pydicom")
    g = write_dicom_series(tmp_path / "series")
    (tmp_path / "series" / "README.txt").write_text("not dicom")
    vol = read_volume(tmp_path / "series")
    assert vol.shape == (g["cols"], g["rows"], g["n"])  # (column i, row j, slice k)
    assert vol.array.dtype == np.int16
    i, j, k = np.meshgrid(np.arange(g["cols"]), np.arange(g["rows"]), np.arange(g["n"]), indexing="ij")
    np.testing.assert_array_equal(vol.array, 100 * k + 10 * j + i - 1024)
    corners = np.array([[0, 0, 0], [4, 0, 0], [0, 5, 0], [0, 0, 3], [4, 5, 3], [2.5, 1.25, 0.5]])
    np.testing.assert_allclose(vol.voxel_to_world(corners), expected_ras(g, corners), atol=1e-3)
    assert vol.axcodes == "LPS"  # i runs to the patient's left, as DICOM columns do: no array was flipped
    assert vol.meta["n_slices"] == g["n"]


@pytest.mark.parametrize("syntax, plugin", [("RLELossless", None), ("JPEG2000Lossless", "openjpeg")])
def test_dicom_compressed_series_reads_as_the_uncompressed_one(tmp_path, syntax, plugin):
    """PACS exports are often compressed; RLE decodes in pydicom itself, JPEG 2000 through
    pylibjpeg-openjpeg (the io and test extras)."""
    pydicom = pytest.importorskip("pydicom")
    if plugin:
        pytest.importorskip(plugin)
    from pydicom import uid as uids

    write_dicom_series(tmp_path / "plain", rows=40, cols=36, n=5)
    (tmp_path / "packed").mkdir()
    for f in (tmp_path / "plain").iterdir():
        ds = pydicom.dcmread(f)
        ds.compress(getattr(uids, syntax))
        ds.save_as(tmp_path / "packed" / f.name, enforce_file_format=True)
    assert pydicom.dcmread(next((tmp_path / "packed").iterdir())).file_meta.TransferSyntaxUID == getattr(uids, syntax)
    plain, packed = read_volume(tmp_path / "plain"), read_volume(tmp_path / "packed")
    np.testing.assert_array_equal(packed.array, plain.array)
    np.testing.assert_array_equal(packed.affine, plain.affine)


def test_dicom_undecodable_pixel_data_is_one_line_naming_the_file(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.uid import RLELossless

    write_dicom_series(tmp_path / "s", rows=40, cols=36, n=3)
    bad = sorted((tmp_path / "s").iterdir())[1]
    ds = pydicom.dcmread(bad)
    ds.compress(RLELossless)
    ds.PixelData = ds.PixelData[:64]  # cut short
    ds.save_as(bad, enforce_file_format=True)
    with pytest.raises(VolumeError) as exc:
        read_volume(tmp_path / "s")
    assert_one_line_naming(exc, bad, "PixelData: cannot decode")
    assert "RLE Lossless" in str(exc.value) and "pip install -e '.[io]'" in str(exc.value)


def test_dicom_jpeg_ls_series_decodes(tmp_path):
    """JPEG-LS (decoded by pylibjpeg-libjpeg, which also reads JPEG Lossless): pydicom's own
    JPEG-LS frame of its MR_small test image, as the slices of a series, reads as the
    uncompressed image."""
    pydicom = pytest.importorskip("pydicom")
    pytest.importorskip("libjpeg")
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    packed, plain = get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), get_testdata_file("MR_small.dcm")
    if packed is None or plain is None:
        pytest.skip("pydicom's bundled MR_small test files are absent")
    expected = pydicom.dcmread(plain).pixel_array
    uid = generate_uid()
    (tmp_path / "s").mkdir()
    for k in range(3):
        ds = pydicom.dcmread(packed)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        ds.PixelSpacing = [0.8, 0.8]
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.save_as(tmp_path / "s" / f"{k}.dcm", enforce_file_format=True)
    vol = read_volume(tmp_path / "s")
    assert vol.shape == (expected.shape[1], expected.shape[0], 3)
    for k in range(3):
        np.testing.assert_array_equal(vol.array[:, :, k], expected.T.astype(np.int64) - 1024)


def test_a_nifti_without_sform_or_qform_is_placed_from_pixdim_with_a_warning(tmp_path):
    from bosam_cli.volume import geometry_warning

    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), None)
    img.header.set_zooms((0.8, 0.9, 2.5))
    nib.save(img, str(tmp_path / "nocodes.nii.gz"))
    hdr = nib.load(str(tmp_path / "nocodes.nii.gz")).header
    assert int(hdr["sform_code"]) == int(hdr["qform_code"]) == 0
    vol = read_volume(tmp_path / "nocodes.nii.gz")
    np.testing.assert_allclose(vol.affine, nib.load(str(tmp_path / "nocodes.nii.gz")).affine)  # nibabel's rule
    note = geometry_warning(vol)
    assert note.startswith(f"{tmp_path / 'nocodes.nii.gz'}: sform_code and qform_code are 0") and "voxel clicks" in note
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.eye(4)), str(tmp_path / "coded.nii.gz"))
    assert geometry_warning(read_volume(tmp_path / "coded.nii.gz")) is None


def test_sform_and_qform_that_disagree_are_warned_about_where_itk_viewers_read_the_qform(tmp_path):
    from bosam_cli.volume import geometry_warning

    data = np.zeros((30, 20, 10), np.int16)
    qform = np.diag([0.8, 0.8, 2.0, 1.0])
    sform = qform.copy()
    sform[:3, 3] = [12.0, -5.0, 30.0]  # a registration moved it

    def save(name, scode, s_aff):
        img = nib.Nifti1Image(data, None)
        img.header.set_qform(qform, code=1)
        img.header.set_sform(s_aff, code=scode)
        nib.save(img, str(tmp_path / name))
        return read_volume(tmp_path / name)

    aligned = save("aligned.nii.gz", 2, sform)
    np.testing.assert_allclose(aligned.affine, sform)  # bosam reads the sform
    note = geometry_warning(aligned)
    assert note.startswith(f"{tmp_path / 'aligned.nii.gz'}: sform and qform place the CT up to 32.7 mm") and "sform_code is 2" in note
    assert geometry_warning(save("scanner.nii.gz", 1, sform)) is None  # code 1 and orthogonal: ITK reads the sform too
    assert geometry_warning(save("agree.nii.gz", 4, qform)) is None
    sheared = qform.copy()
    sheared[1, 2] = 2.0 * np.sin(np.deg2rad(20))  # a gantry tilt kept in the sform
    note = geometry_warning(save("tilt.nii.gz", 1, sheared))
    assert note is not None and "the sform is sheared" in note
    img = nib.Nifti1Image(data, sheared)  # nibabel's default for a sheared affine: sform code 2, qform code 0
    nib.save(img, str(tmp_path / "tilt_noq.nii.gz"))
    assert int(img.header["qform_code"]) == 0
    note = geometry_warning(read_volume(tmp_path / "tilt_noq.nii.gz"))
    assert note is not None and "the sform is sheared" in note


def test_a_nifti_declared_in_metres_is_warned_about(tmp_path):
    from bosam_cli.volume import geometry_warning

    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.diag([0.8, 0.8, 2.0, 1.0]))
    img.header.set_xyzt_units("meter")
    nib.save(img, str(tmp_path / "m.nii.gz"))
    vol = read_volume(tmp_path / "m.nii.gz")
    np.testing.assert_allclose(vol.affine, np.diag([0.8, 0.8, 2.0, 1.0]))  # read as mm, as nibabel does
    note = geometry_warning(vol)
    assert note is not None and "declared in meters" in note
    img.header.set_xyzt_units("mm")
    nib.save(img, str(tmp_path / "mm.nii.gz"))
    assert geometry_warning(read_volume(tmp_path / "mm.nii.gz")) is None


def test_skew_is_measured_in_float64_on_large_oblique_grids():
    """An orthogonal grid rotated close to 180 degrees (every LPS-stored CT read as RAS) is not
    sheared, however large; a gantry tilt is, by millimetres."""
    from scipy.spatial.transform import Rotation

    from bosam_cli.volume import affine_skew_mm

    rng = np.random.default_rng(0)
    shape = (512, 512, 600)
    for _ in range(200):
        rot = Rotation.from_euler("z", 180.0).as_matrix() @ Rotation.from_rotvec(rng.normal(size=3) * 0.01).as_matrix()
        aff = np.eye(4)
        aff[:3, :3] = rot * np.array([0.7, 0.7, 1.25])
        assert affine_skew_mm(aff, shape) < 1e-6
    tilt = np.diag([0.7, 0.7, 1.25, 1.0])
    tilt[1, 2] = 1.25 * np.sin(np.deg2rad(15))
    assert affine_skew_mm(tilt, shape) > 50.0


def test_hu_warning_reads_the_distribution_not_just_the_lowest_value():
    from bosam_cli.volume import hu_warning

    rng = np.random.default_rng(0)
    body = np.concatenate([rng.normal(-1000, 15, 40_000), rng.normal(-90, 20, 30_000),  # air, fat
                           rng.normal(45, 15, 60_000), rng.normal(500, 200, 10_000)])  # muscle, bone
    fov = np.full(60_000, -3024.0)  # outside the circular field of view

    def vol(values):
        return Volume(np.asarray(values).astype(np.float32).reshape(-1, 100, 20), np.eye(4))

    assert hu_warning(vol(np.concatenate([body, fov]))) is None  # HU with padding
    assert hu_warning(vol(body)) is None
    raw = body + 1024
    note = hu_warning(vol(np.concatenate([raw.clip(0), np.full(60_000, -2000.0)])))  # intercept dropped, GE padding
    assert note is not None and "no voxel below 0 apart from the padding value -2000" in note
    noisy = raw.copy()
    noisy[:50] = -5.0  # a few noisy air voxels below 0
    note = hu_warning(vol(noisy))
    assert note is not None and "looks like HU + 1024" in note
    note = hu_warning(vol(np.concatenate([body - 1024, np.full(60_000, -2048.0)])))  # intercept applied twice
    assert note is not None and "applied twice" in note
    assert hu_warning(vol(rng.normal(900, 300, 20_000))) is None  # a small crop of bone and marrow: not judged
    # a wrist in a 200 mm field of view: mostly air, ~5 % soft tissue, some bone (HU, no padding)
    wrist = np.concatenate([rng.normal(-1000, 15, 150_000), rng.normal(40, 30, 8_000), rng.normal(700, 300, 4_000)])
    assert hu_warning(vol(wrist)) is None


def write_enhanced_ct(series: Path, path: Path, *, order: list[int]) -> None:
    """The single-slice series at ``series`` as one enhanced (multi-frame) CT file: frames in
    ``order``, orientation and spacing shared, positions per frame, the rescale shared."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import generate_uid

    import pydicom

    slices = sorted((pydicom.dcmread(f) for f in series.iterdir()), key=lambda d: int(d.pixel_array[0, 0]))
    first = slices[0]
    ds = ct_image_dataset(generate_uid(), first.Rows, first.Columns,
                          sop_class="1.2.840.10008.5.1.4.1.1.2.1")  # Enhanced CT Image Storage
    ds.SeriesDescription = "enhanced test"
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid()
    ds.NumberOfFrames = len(order)
    shared, orient, measures, rescale = Dataset(), Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = first.ImageOrientationPatient
    measures.PixelSpacing, measures.SliceThickness = first.PixelSpacing, 2.5
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = first.RescaleSlope, first.RescaleIntercept, "HU"
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for k in order:
        fg, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = slices[k].ImagePositionPatient
        fg.PlanePositionSequence = Sequence([pos])
        frames.append(fg)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = b"".join(slices[k].PixelData for k in order)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_dicom_enhanced_multiframe_ct_reads_as_its_single_slice_series(tmp_path):
    """Newer scanners export one enhanced CT file per series: every voxel comes out at the
    world position, with the HU value, of the same voxel of the single-slice series."""
    pytest.importorskip("highdicom")
    g = write_dicom_series(tmp_path / "series", rows=6, cols=5, n=5)
    classic = read_volume(tmp_path / "series")
    enhanced_file = tmp_path / "enh" / "sub" / "ENHANCED"
    write_enhanced_ct(tmp_path / "series", enhanced_file, order=[3, 0, 4, 1, 2])
    for source in (enhanced_file, tmp_path / "enh"):  # the file, or its folder
        vol = read_volume(source)
        assert vol.shape == classic.shape and vol.array.dtype == np.int16
        assert vol.meta["format"] == "dicom-multiframe" and vol.meta["n_slices"] == g["n"]
        ijk = np.argwhere(np.ones(vol.shape, bool)).astype(float)
        world = vol.voxel_to_world(ijk)
        back = classic.world_to_voxel(world)
        np.testing.assert_allclose(back, np.round(back), atol=1e-3)  # lands on the series' voxels
        idx = np.round(back).astype(int)
        np.testing.assert_array_equal(vol.array.reshape(-1), classic.array[idx[:, 0], idx[:, 1], idx[:, 2]])
        np.testing.assert_allclose(world, expected_ras(g, idx.astype(float)), atol=1e-3)
    # beside a single-slice series, it is one more series to choose from
    write_enhanced_ct(tmp_path / "series", tmp_path / "series" / "zz_enhanced", order=[0, 1, 2, 3, 4])
    with pytest.raises(VolumeError, match=r"2 series found.*multi-frame"):
        read_volume(tmp_path / "series")
    assert read_volume(tmp_path / "series" / "zz_enhanced").meta["format"] == "dicom-multiframe"


def edit_enhanced(path: Path, change) -> None:
    """Read the enhanced file at ``path``, let ``change(ds)`` break it, and save it again as it
    is (no validation), as a faulty export would hold it."""
    import pydicom

    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [3, 0, 4, 1, 2]],
                         ids=["forward", "reversed", "shuffled"])
def test_dicom_enhanced_ct_slices_run_along_the_normal_as_its_series_and_itk(tmp_path, order):
    """``voxel`` prompts index the array: an enhanced file gives the array and affine of the
    same scan as a single-slice series (slices sorted along row x column, as ITK sorts them),
    whatever the order of its frames; highdicom's own slice order (the reverse) mirrored every
    voxel click along k."""
    pytest.importorskip("highdicom")
    write_dicom_series(tmp_path / "series", rows=6, cols=5, n=5)
    classic = read_volume(tmp_path / "series")
    enhanced_file = tmp_path / "enh" / "ENHANCED.dcm"
    write_enhanced_ct(tmp_path / "series", enhanced_file, order=order)
    vol = read_volume(enhanced_file)
    np.testing.assert_array_equal(vol.array, classic.array)
    np.testing.assert_allclose(vol.affine, classic.affine, atol=1e-4)
    assert vol.meta["frame_slices"] == order  # frame f of the file is slice order[f]
    if order == sorted(order):  # ITK (GDCM) keeps an enhanced file's frames in file order
        sitk = pytest.importorskip("SimpleITK")
        img = sitk.ReadImage(str(enhanced_file))
        direction = np.asarray(img.GetDirection()).reshape(3, 3)
        np.testing.assert_allclose(np.asarray(img.GetOrigin()) * [-1, -1, 1], vol.affine[:3, 3], atol=1e-3)
        np.testing.assert_allclose(direction * np.array([[-1], [-1], [1]]),
                                   vol.affine[:3, :3] / np.linalg.norm(vol.affine[:3, :3], axis=0), atol=1e-4)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0), vol.array)


def _drop_position(ds: Any) -> None:
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence


def assert_broken_enhanced_refused(tmp_path: Path, order: list, change: Callable[[Any], None], fields: list) -> None:
    """An enhanced CT of a 5-slice series (frames in ``order``), edited by ``change``, is refused
    in one line naming the file and ``fields``."""
    pytest.importorskip("highdicom")
    write_dicom_series(tmp_path / "series", rows=6, cols=5, n=5)
    enhanced_file = tmp_path / "enh" / "ENHANCED.dcm"
    write_enhanced_ct(tmp_path / "series", enhanced_file, order=order)
    edit_enhanced(enhanced_file, change)
    with pytest.raises(VolumeError) as exc:
        read_volume(enhanced_file)
    assert_one_line_naming(exc, enhanced_file, *fields)


@pytest.mark.parametrize("change, fields", [
    (lambda ds: setattr(ds, "NumberOfFrames", 4), ["NumberOfFrames: 4, but PerFrameFunctionalGroupsSequence has 5",
                                                   "PixelData holds 5 frames"]),
    (lambda ds: setattr(ds, "NumberOfFrames", 1), ["NumberOfFrames: 1, but"]),
    (lambda ds: setattr(ds, "NumberOfFrames", 6), ["NumberOfFrames: 6, but"]),
    (lambda ds: ds.PerFrameFunctionalGroupsSequence.pop(2),
     ["PerFrameFunctionalGroupsSequence: 4 items (one per frame), but NumberOfFrames is 5"]),
    (lambda ds: setattr(ds, "PerFrameFunctionalGroupsSequence", []),
     ["PerFrameFunctionalGroupsSequence: 0 items"]),
    (_drop_position, ["PlanePositionSequence: frame 3"]),
    (lambda ds: setattr(ds, "PixelData", ds.PixelData[:100]), ["PixelData: 100 bytes", "needs 300"]),
], ids=["fewer", "one", "more", "item-missing", "no-items", "no-position", "truncated"])
def test_dicom_enhanced_ct_frame_counts_that_disagree_are_refused_naming_the_field(tmp_path, change, fields):
    """A NumberOfFrames below the frames present silently dropped slices (1 read one slice);
    a missing per-frame item was reported as frames sharing a position, a frame without a
    plane position as a KeyError, an empty per-frame sequence as an IndexError."""
    assert_broken_enhanced_refused(tmp_path, [0, 1, 2, 3, 4], change, fields)


def _frame_rescale(slopes: list, intercept="-1024") -> Callable[[Any], None]:
    """Move the rescale from the shared functional group into every frame's own, frame f with
    slope ``slopes[f]``."""
    def change(ds: Any) -> None:
        from pydicom.dataset import Dataset
        from pydicom.sequence import Sequence

        del ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence
        for fg, slope in zip(ds.PerFrameFunctionalGroupsSequence, slopes):
            item = Dataset()
            item.RescaleSlope, item.RescaleIntercept, item.RescaleType = slope, intercept, "HU"
            fg.PixelValueTransformationSequence = Sequence([item])
    return change


def _shared_rescale(keyword: str, raw: str) -> Callable[[Any], None]:
    def change(ds: Any) -> None:
        setattr(ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0], keyword, raw)
    return change


@pytest.mark.parametrize("change, fields", [
    (_shared_rescale("RescaleSlope", "0"), ["PixelValueTransformationSequence.RescaleSlope (shared", "0 would make"]),
    (_shared_rescale("RescaleSlope", "1e30"), ["PixelValueTransformationSequence.RescaleSlope (shared", "1e+30"]),
    (_shared_rescale("RescaleSlope", "1e7"), ["PixelValueTransformationSequence.RescaleSlope (shared", "1e+07"]),
    (_shared_rescale("RescaleIntercept", "1e30"), ["PixelValueTransformationSequence.RescaleIntercept (shared"]),
    (_shared_rescale("RescaleSlope", "nan"), ["PixelValueTransformationSequence.RescaleSlope (shared", "nan"]),
    (_frame_rescale(["1", "1", "0", "1", "1"]), ["PixelValueTransformationSequence.RescaleSlope (frame 3)"]),
    (_frame_rescale(["1", "1", "1", "inf", "1"]), ["PixelValueTransformationSequence.RescaleSlope (frame 4)", "inf"]),
    (_frame_rescale(["1", "-1", "1", "1", "1"]),
     ["PixelValueTransformationSequence.RescaleSlope (frame 2): -1", "other sign in 4 of the 5 frames"]),
], ids=["slope0", "slope1e30", "slope1e7", "intercept1e30", "slope-nan", "frame-slope0", "frame-slope-inf",
        "frame-slopes-of-both-signs"])
@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # the corrupt values written
def test_dicom_enhanced_ct_bad_rescale_is_refused_as_in_a_series(tmp_path, change, fields):
    """The series' rescale rules hold for the shared and per-frame Pixel Value Transformation
    of an enhanced CT: a slope of 0 was read as 1, 1e30 gave voxels of 1e33, one frame's slope
    of -1 gave a wrong HU warning."""
    assert_broken_enhanced_refused(tmp_path, [2, 0, 1, 4, 3], change, fields)


def test_dicom_enhanced_ct_per_frame_rescale_of_one_sign_is_applied_per_frame(tmp_path):
    pytest.importorskip("highdicom")
    write_dicom_series(tmp_path / "series", rows=6, cols=5, n=5)
    classic = read_volume(tmp_path / "series")
    enhanced_file = tmp_path / "enh" / "ENHANCED.dcm"
    write_enhanced_ct(tmp_path / "series", enhanced_file, order=[0, 1, 2, 3, 4])
    edit_enhanced(enhanced_file, _frame_rescale(["1", "1", "2", "1", "1"]))
    vol = read_volume(enhanced_file)
    want = classic.array.astype(np.float64)
    want[:, :, 2] = (want[:, :, 2] + 1024) * 2 - 1024
    np.testing.assert_array_equal(vol.array, want)


def test_dicom_enhanced_ct_is_read_in_hu_even_with_a_real_world_value_mapping(tmp_path):
    """highdicom applies a RealWorldValueMappingSequence instead of the rescale when the file
    holds one: an identity mapping gave the stored values (HU + 1024 here), with no error."""
    pytest.importorskip("highdicom")
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    write_dicom_series(tmp_path / "series", rows=6, cols=5, n=5)
    classic = read_volume(tmp_path / "series")
    enhanced_file = tmp_path / "enh" / "ENHANCED.dcm"
    write_enhanced_ct(tmp_path / "series", enhanced_file, order=[3, 1, 0, 2, 4])

    def add_mapping(ds: Any) -> None:
        mapping, unit = Dataset(), Dataset()
        mapping.RealWorldValueSlope, mapping.RealWorldValueIntercept = 1.0, 0.0
        mapping.RealWorldValueFirstValueMapped, mapping.RealWorldValueLastValueMapped = 0, 65535
        mapping.LUTLabel, mapping.LUTExplanation = "RAW", "stored values"
        unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "1", "UCUM", "no units"
        mapping.MeasurementUnitsCodeSequence = Sequence([unit])
        ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence = Sequence([mapping])

    edit_enhanced(enhanced_file, add_mapping)
    np.testing.assert_array_equal(read_volume(enhanced_file).array, classic.array)


def test_dicom_enhanced_ct_without_the_preamble_is_read(tmp_path):
    """Detected as an enhanced CT with force=True, the file was then read without it."""
    pytest.importorskip("highdicom")
    import pydicom

    write_dicom_series(tmp_path / "series", rows=6, cols=5, n=5)
    enhanced_file = tmp_path / "enh" / "ENHANCED.dcm"
    write_enhanced_ct(tmp_path / "series", enhanced_file, order=[1, 0, 2, 4, 3])
    want = read_volume(enhanced_file)
    ds = pydicom.dcmread(enhanced_file)
    ds.preamble = None
    ds.save_as(enhanced_file, enforce_file_format=False)
    assert enhanced_file.read_bytes()[128:132] != b"DICM"
    for source in (enhanced_file, enhanced_file.parent):
        vol = read_volume(source)
        np.testing.assert_array_equal(vol.array, want.array)
        np.testing.assert_allclose(vol.affine, want.affine)


def test_dicom_fractional_rescale_gives_float32(tmp_path):
    pytest.importorskip("pydicom")
    write_dicom_series(tmp_path / "s", slope="0.5", intercept="-1000.25")
    vol = read_volume(tmp_path / "s")
    assert vol.array.dtype == np.float32
    assert vol.array[1, 2, 3] == pytest.approx((300 + 20 + 1) * 0.5 - 1000.25)


def test_dicom_several_series_refused_with_their_uids(tmp_path):
    pytest.importorskip("pydicom")
    write_dicom_series(tmp_path / "mix", series_uid="1.2.3.4.1", seed=1)
    write_dicom_series(tmp_path / "mix" / "sub", series_uid="1.2.3.4.2", seed=2)
    with pytest.raises(VolumeError) as exc:
        read_volume(tmp_path / "mix")
    assert_one_line_naming(exc, tmp_path / "mix", "SeriesInstanceUID", "1.2.3.4.1", "1.2.3.4.2", "one file of the series")
    # one file picks its series out of the folder (as viewers open a series from one file)
    in_sub = read_volume(next(p for p in (tmp_path / "mix" / "sub").iterdir()))
    np.testing.assert_array_equal(in_sub.array, read_volume(tmp_path / "mix" / "sub").array)
    assert in_sub.meta["series_instance_uid"] == "1.2.3.4.2"
    top = read_volume(next(p for p in (tmp_path / "mix").iterdir() if p.is_file()))
    assert top.meta["series_instance_uid"] == "1.2.3.4.1" and top.meta["n_slices"] == 4
    assert all(Path(f).parent == tmp_path / "mix" for f in top.meta["files"])
    (tmp_path / "notes.dcm").write_bytes(b"not dicom")
    with pytest.raises(VolumeError) as exc:
        read_volume(tmp_path / "notes.dcm")
    assert_one_line_naming(exc, tmp_path / "notes.dcm")


def test_dicom_thin_slices_with_positions_rounded_to_a_tenth(tmp_path):
    """A 0.625 mm series whose positions are written with one decimal (gaps 0.6 and 0.7) reads,
    with the mean step; a missing slice in it is still refused."""
    import pydicom

    g = write_dicom_series(tmp_path / "s", n=9)
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(f)
        k = int(ds.pixel_array[0, 0]) // 100
        ds.ImagePositionPatient = [round(float(v), 1) for v in g["origin_lps"] + k * 0.625 * g["normal"]]
        ds.save_as(f)
    vol = read_volume(tmp_path / "s")
    step = vol.affine[:3, 2] * np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(step, 0.625 * g["normal"], atol=0.02)
    victim = next(f for f in (tmp_path / "s").iterdir() if int(pydicom.dcmread(f).pixel_array[0, 0]) // 100 == 4)
    victim.unlink()
    with pytest.raises(VolumeError, match="slice spacing is not uniform"):
        read_volume(tmp_path / "s")
    # a 0.1 mm micro-CT: the rounding allowance stays below half a gap, so a missing slice shows
    g = write_dicom_series(tmp_path / "micro", n=12)
    for f in (tmp_path / "micro").iterdir():
        ds = pydicom.dcmread(f)
        k = int(ds.pixel_array[0, 0]) // 100
        if k == 6:
            f.unlink()
            continue
        ds.ImagePositionPatient = [float(f"{v:.6f}") for v in g["origin_lps"] + k * 0.1 * g["normal"]]
        ds.save_as(f)
    with pytest.raises(VolumeError, match="slice spacing is not uniform"):
        read_volume(tmp_path / "micro")


def test_dicom_missing_slice_refused(tmp_path):
    pytest.importorskip("pydicom")
    write_dicom_series(tmp_path / "gap", n=5, skip_slice=2)
    with pytest.raises(VolumeError) as exc:
        read_volume(tmp_path / "gap")
    assert_one_line_naming(exc, tmp_path / "gap", "ImagePositionPatient", "not uniform")


def slice_files(folder: Path) -> dict[int, Path]:
    """Slice index k -> file of a series from ``write_dicom_series`` (its pixel (0, 0) is 100 k)."""
    import pydicom

    return {int(pydicom.dcmread(f).pixel_array[0, 0]) // 100: f for f in folder.iterdir()}


def set_raw(f: Path, keyword: str, raw: bytes, vr: str = "DS") -> None:
    """Write ``raw`` as the value of ``keyword`` in ``f`` as it is (no validation), as a
    corrupt export would hold it."""
    import pydicom
    from pydicom.dataelem import RawDataElement
    from pydicom.datadict import tag_for_keyword
    from pydicom.tag import Tag

    ds = pydicom.dcmread(f)
    tag = Tag(tag_for_keyword(keyword))
    ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    ds.save_as(f)


@pytest.mark.parametrize("field", ["ImagePositionPatient", "PixelData"])
@pytest.mark.parametrize("which", [0, 2, 4])
def test_dicom_slice_without_position_or_pixels_is_refused_not_skipped(tmp_path, field, which):
    """A file of the series that lacks its position or its pixels is a broken slice, not a
    report: skipped, the first or last one would shift every click by a slice, a middle one
    give a misleading 'missing slice'. Objects of the series that are no slices stay passed
    over: a presentation state and a screenshot (other SOP classes, no position)."""
    pydicom = pytest.importorskip("pydicom")
    write_dicom_series(tmp_path / "s", n=5)
    files = slice_files(tmp_path / "s")
    uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    state = ct_image_dataset(uid, 6, 5, sop_class="1.2.840.10008.5.1.4.1.1.11.1")  # grayscale presentation state
    for key in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
                "HighBit", "PixelRepresentation"):
        delattr(state, key)
    state.save_as(tmp_path / "s" / "PS0001", enforce_file_format=True)
    shot = ct_image_dataset(uid, 6, 5, sop_class="1.2.840.10008.5.1.4.1.1.7")  # secondary capture
    shot.PixelData = np.zeros((6, 5), np.uint16).tobytes()
    shot.save_as(tmp_path / "s" / "SC0001", enforce_file_format=True)
    # a dose report's screen save stored as CT Image Storage in the series itself, no position:
    # its ImageType says what it is (it had refused the whole series)
    screen = ct_image_dataset(uid, 6, 5)
    screen.ImageType = ["DERIVED", "SECONDARY", "SCREEN SAVE"]
    screen.PixelData = np.zeros((6, 5), np.uint16).tobytes()
    screen.save_as(tmp_path / "s" / "DOSE0001", enforce_file_format=True)
    assert read_volume(tmp_path / "s").shape == (5, 6, 5)

    ds = pydicom.dcmread(files[which])
    delattr(ds, field)
    ds.save_as(files[which])
    with pytest.raises(VolumeError) as exc:
        read_volume(tmp_path / "s")
    assert_one_line_naming(exc, files[which], f"{field}: missing", uid)
    with pytest.raises(VolumeError) as exc:  # the series picked by one of its good files
        read_volume(files[(which + 1) % 5])
    assert_one_line_naming(exc, files[which], f"{field}: missing")


def test_dicom_series_whose_every_slice_lacks_its_position_names_a_file(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    write_dicom_series(tmp_path / "s", n=3)
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(f)
    with pytest.raises(VolumeError) as exc:
        read_volume(tmp_path / "s")
    assert_one_line_naming(exc, sorted((tmp_path / "s").iterdir())[0], "ImagePositionPatient: missing")


@pytest.mark.parametrize("field, raw", [
    ("RescaleIntercept", b"inf"), ("RescaleIntercept", b"-inf"), ("RescaleSlope", b"nan"),
    ("RescaleSlope", b"1e30"), ("RescaleIntercept", b"1e300"), ("RescaleSlope", b"abc"), ("RescaleSlope", b"0"),
    ("RescaleSlope", b"0.0"),
])
def test_dicom_bad_rescale_value_is_one_line_naming_file_and_field(tmp_path, field, raw):
    """Not a number, not finite, no CT's magnitude (which overflowed the int16 path), or a slope
    of 0 (which made every voxel the intercept, and was read as 1): refused, naming the slice."""
    pytest.importorskip("pydicom")
    write_dicom_series(tmp_path / "s", n=4)
    bad = slice_files(tmp_path / "s")[2]
    set_raw(bad, field, raw + b" " * (len(raw) % 2))
    with pytest.raises(VolumeError) as exc:
        read_volume(tmp_path / "s")
    assert_one_line_naming(exc, bad, f"{field}:")


def test_dicom_rescale_slopes_of_both_signs_refused_naming_the_odd_slice(tmp_path):
    pytest.importorskip("pydicom")
    write_dicom_series(tmp_path / "s", n=5)
    bad = slice_files(tmp_path / "s")[3]
    set_raw(bad, "RescaleSlope", b"-1")
    with pytest.raises(VolumeError) as exc:
        read_volume(tmp_path / "s")
    assert_one_line_naming(exc, bad, "RescaleSlope: -1", "other sign in 4 of the 5 slices")


def test_dicom_whole_rescale_too_large_for_int16_gives_float32(tmp_path):
    pytest.importorskip("pydicom")
    write_dicom_series(tmp_path / "s", slope="1000", intercept="-1024")
    vol = read_volume(tmp_path / "s")
    assert vol.array.dtype == np.float32
    assert vol.array[1, 2, 3] == (300 + 20 + 1) * 1000 - 1024


@pytest.mark.parametrize("field", ["Rows", "PixelSpacing", "ImageOrientationPatient"])
def test_dicom_odd_first_file_is_the_one_named(tmp_path, field):
    """The slice that differs is named even when it sorts first (the reference is what most
    slices share, not the first file)."""
    pydicom = pytest.importorskip("pydicom")
    write_dicom_series(tmp_path / "s", n=4)
    first = sorted((tmp_path / "s").iterdir())[0]
    ds = pydicom.dcmread(first)
    if field == "Rows":
        ds.Rows = 0
    elif field == "PixelSpacing":
        ds.PixelSpacing = [1.5, 1.5]
    else:
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.save_as(first)
    with pytest.raises(VolumeError) as exc:
        read_volume(tmp_path / "s")
    assert_one_line_naming(exc, first, field)
    others = [f for f in (tmp_path / "s").iterdir() if f != first]
    assert not any(str(f) in str(exc.value) for f in others), str(exc.value)


def test_dicom_series_of_another_modality_is_read_with_a_warning(tmp_path):
    """An MR or PET series (or a CT labelled so) is read, and the note reaches the segment
    manifest's warnings (through geometry_warning); a CT gets none."""
    pydicom = pytest.importorskip("pydicom")
    from bosam_cli.volume import geometry_warning

    write_dicom_series(tmp_path / "s", n=3)
    assert geometry_warning(read_volume(tmp_path / "s")) is None
    for f in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(f)
        ds.Modality = "MR"
        ds.save_as(f)
    note = geometry_warning(read_volume(tmp_path / "s"))
    assert note and "Modality: MR, not CT" in note and "\n" not in note


def test_dicom_empty_folder_refused(tmp_path):
    pytest.importorskip("pydicom")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(VolumeError) as exc:
        read_volume(tmp_path / "empty")
    assert_one_line_naming(exc, tmp_path / "empty", "no DICOM image")


# ---------------------------------------------------------------------------------------------
# NRRD


def write_nrrd(path: Path, data: np.ndarray, space: str, directions: np.ndarray, origin) -> Path:
    import nrrd

    nrrd.write(str(path), data, {"space": space, "space directions": directions, "space origin": np.asarray(origin, float)})
    return path


@pytest.mark.parametrize("space, to_ras", [("left-posterior-superior", [-1, -1, 1]), ("right-anterior-superior", [1, 1, 1])])
def test_nrrd_space_to_ras(tmp_path, space, to_ras):
    pytest.importorskip("nrrd")
    directions = (rotation([2, -1, 1], 31.0) @ np.diag([0.6, 0.8, 1.5])).T  # row a: step of axis a
    origin = np.array([12.5, -40.0, 300.0])
    data = ct_like((5, 6, 7))
    vol = read_volume(write_nrrd(tmp_path / "ct.nrrd", data, space, directions, origin))
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, data)
    ijk = np.array([[0, 0, 0], [4, 5, 6], [1.5, 2.0, 3.25]])
    in_space = origin + ijk @ directions
    np.testing.assert_allclose(vol.voxel_to_world(ijk), in_space * np.array(to_ras), atol=1e-6)


def test_nrrd_without_space_refused(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    path = tmp_path / "plain.nrrd"
    nrrd.write(str(path), ct_like((3, 3, 3)))
    with pytest.raises(VolumeError) as exc:
        read_volume(path)
    assert_one_line_naming(exc, path, "space")


def test_nrrd_4d_refused(tmp_path):
    nrrd = pytest.importorskip("nrrd")
    path = tmp_path / "vec.nrrd"
    nrrd.write(str(path), np.zeros((2, 3, 3, 3), np.float32))
    with pytest.raises(VolumeError) as exc:
        read_volume(path)
    assert_one_line_naming(exc, path, "dimension")


def test_a_fourth_axis_of_size_one_is_dropped_in_nrrd_and_metaimage(tmp_path):
    """Some pipelines store a 3-D CT with a trailing non-spatial axis of size 1 (as NIfTI's
    4-D-with-one-volume files, which are read as 3-D): read as the 3-D image, same geometry."""
    nrrd = pytest.importorskip("nrrd")
    sitk = pytest.importorskip("SimpleITK")
    data = ct_like((4, 5, 6))
    want = np.diag([-0.8, -0.9, 2.5, 1.0])
    want[:3, 3] = [-1.0, -2.0, 3.0]
    header = {"space": "left-posterior-superior", "space origin": [1.0, 2.0, 3.0], "kinds": ["domain"] * 3 + ["list"],
              "space directions": np.array([[0.8, 0, 0], [0, 0.9, 0], [0, 0, 2.5], [np.nan] * 3])}
    nrrd.write(str(tmp_path / "ct4.nrrd"), data[..., None], header)
    img = sitk.GetImageFromArray(data.transpose(2, 1, 0)[None], isVector=False)
    img.SetSpacing((0.8, 0.9, 2.5, 1.0))
    img.SetOrigin((1.0, 2.0, 3.0, 0.0))
    sitk.WriteImage(img, str(tmp_path / "ct4.mha"))
    for name in ("ct4.nrrd", "ct4.mha"):
        vol = read_volume(tmp_path / name)
        np.testing.assert_array_equal(vol.array, data)
        np.testing.assert_allclose(vol.affine, want, atol=1e-9)
    nrrd.write(str(tmp_path / "two.nrrd"), np.stack([data, data], -1), header)  # two volumes: still refused
    with pytest.raises(VolumeError, match=r"dimension: expected a 3-D image, got 4-D of shape \(4, 5, 6, 2\)"):
        read_volume(tmp_path / "two.nrrd")


# ---------------------------------------------------------------------------------------------
# MetaImage


def write_metaimage(path: Path, data: np.ndarray, spacing, direction: np.ndarray, origin) -> Path:
    sitk = pytest.importorskip("SimpleITK")

    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))  # sitk arrays are (k, j, i)
    img.SetSpacing([float(v) for v in spacing])
    img.SetDirection([float(v) for v in np.asarray(direction).ravel()])
    img.SetOrigin([float(v) for v in origin])
    sitk.WriteImage(img, str(path))
    return path


@pytest.mark.parametrize("suffix", [".mha", ".mhd"])
def test_metaimage_lps_geometry_to_ras(tmp_path, suffix):
    """An oblique MetaImage (ITK's LPS) lands in RAS as ITK itself places its voxels."""
    sitk = pytest.importorskip("SimpleITK")
    direction = rotation([1, 2, -1], 23.0)
    spacing = [0.7, 0.9, 2.5]
    origin = [-101.5, 33.0, -250.0]
    data = ct_like((5, 6, 7))
    path = write_metaimage(tmp_path / f"ct{suffix}", data, spacing, direction, origin)
    vol = read_volume(path)
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, data)
    ijk = np.array([[0, 0, 0], [4, 5, 6], [1.5, 2.0, 3.25]])
    itk = sitk.ReadImage(str(path))
    lps = np.array([itk.TransformContinuousIndexToPhysicalPoint([float(v) for v in p]) for p in ijk])
    np.testing.assert_allclose(vol.voxel_to_world(ijk), lps * np.array([-1, -1, 1]), atol=1e-6)
    expected = (np.asarray(origin) + ijk @ (direction * np.asarray(spacing)).T) * np.array([-1, -1, 1])
    np.testing.assert_allclose(vol.voxel_to_world(ijk), expected, atol=1e-6)


def test_metaimage_and_nifti_of_one_ct_are_the_same_volume(tmp_path):
    """The same CT saved by ITK as .mha and by nibabel as .nii.gz reads as one volume."""
    pytest.importorskip("SimpleITK")
    data = ct_like((6, 5, 4))
    affine = np.diag([-0.8, -0.8, 3.0, 1.0])  # LPS-stored, as scanners write
    affine[:3, 3] = [150.0, 120.0, -40.0]
    nii = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(nii))
    lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    mha = write_metaimage(tmp_path / "ct.mha", data, spacing, lps / spacing, np.diag([-1.0, -1.0, 1.0]) @ affine[:3, 3])
    a, b = read_volume(nii), read_volume(mha)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-6)


def test_metaimage_4d_and_corrupt_refused(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    path = tmp_path / "vec.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 3, 3), np.float32), isVector=False), str(path))
    with pytest.raises(VolumeError) as exc:
        read_volume(path)
    assert_one_line_naming(exc, path, "NDims")
    bad = tmp_path / "bad.mha"
    bad.write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\nElementType = MET_SHORT\nElementDataFile = LOCAL\n\x00\x01")
    with pytest.raises(VolumeError) as exc:
        read_volume(bad)
    assert_one_line_naming(exc, bad, "ElementDataFile: 2 bytes of voxel data after the header, but DimSize 4 4 4 of "
                           "MET_SHORT needs 128 (a truncated file?)")



def test_a_detached_metaimage_without_its_data_is_one_line_naming_the_field(tmp_path):
    """A .mhd whose ElementDataFile is missing names that field and file (ITK said only that the
    header "cannot be read"); a short data file is one stderr line through the CLI, with what
    MetaIO would print on the C++ stderr said by bosam's own check of the header instead."""
    import subprocess
    import sys

    pytest.importorskip("SimpleITK")
    header = "ObjectType = Image\nNDims = 3\nDimSize = 40 40 40\nElementType = MET_SHORT\nElementDataFile = {}\n"
    (tmp_path / "gone.mhd").write_text(header.format("gone.raw"))
    with pytest.raises(VolumeError, match=r"gone\.mhd: ElementDataFile: gone\.raw: no such file beside the header$"):
        read_volume(tmp_path / "gone.mhd")
    (tmp_path / "short.mhd").write_text(header.format("short.raw"))
    (tmp_path / "short.raw").write_bytes(bytes(100))
    (tmp_path / "p.json").write_text('{"coordinate_system": "voxel", "objects": [{"label": 1, "clicks": [{"xyz": [1, 2, 3]}]}]}')
    r = subprocess.run([sys.executable, "-m", "bosam_cli", "points", "check", str(tmp_path / "short.mhd"),
                        str(tmp_path / "p.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'short.mhd'}: ElementDataFile: 100 bytes of voxel data in short.raw, but DimSize 40 40 40 "
        "of MET_SHORT needs 128000 (a truncated file?)"], r.stderr
    # compressed data that do not uncompress, or not to the declared size
    (tmp_path / "zip.mhd").write_text(header.format("short.raw").replace("ElementType", "CompressedData = True\nElementType"))
    r = subprocess.run([sys.executable, "-m", "bosam_cli", "points", "check", str(tmp_path / "zip.mhd"),
                        str(tmp_path / "p.json")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'zip.mhd'}: CompressedData: the voxel data do not uncompress (Error -3 while decompressing "
        "data: unknown compression method); the file is corrupt"], r.stderr  # SimpleITK read it, printing 'Uncompress failed'
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(6, 5, 4))
    sitk.WriteImage(img, str(tmp_path / "z.mha"), True)  # compressed, as written by ITK: read as it is
    np.testing.assert_array_equal(read_volume(tmp_path / "z.mha").array, sitk.GetArrayFromImage(img).transpose(2, 1, 0))
    data = (tmp_path / "z.mha").read_bytes()
    (tmp_path / "zcut.mha").write_bytes(data[:-20])
    with pytest.raises(VolumeError, match=r"zcut\.mha: CompressedData: the voxel data uncompress to \d+ bytes, but DimSize needs 240"):
        read_volume(tmp_path / "zcut.mha")
