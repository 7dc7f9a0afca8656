"""Label maps as DICOM Segmentation objects (highdicom), for a CT read from a DICOM series.

A DICOM SEG goes back to the PACS or viewer the CT came from (OHIF, 3D Slicer, most PACS viewers)
and references the CT's own slices: every frame names the SOP instance (and, for an enhanced
multi-frame CT, the frame) it segments and carries that slice's position and orientation. So it
can only be written for a CT read from DICOM, whose files the volume remembers in slice order
(``Volume.meta["files"]``; for a multi-frame file, ``meta["frame_slices"]`` maps its frames to
the volume's slices).

* Each object is one segment (``BINARY``, 1 bit per voxel; frames without any voxel of a segment
  are left out). Segment numbers are 1, 2, ... in the given object order, labelled with the
  object names made valid DICOM text (no backslash or control character, at most 64
  characters; UTF-8 when a name is not ASCII); the label map values they stand for are listed
  in ``segment_map``.
* Every segment is typed "Anatomical Structure / Bone" (SNOMED CT 91723000 / 272673000),
  semi-automatic, by the algorithm "bosam" of the family "Artificial Intelligence".
* Patient and study attributes are copied from the CT by highdicom. Anonymised exports often
  drop type 2 attributes (birth date, sex, accession number, study ID, referring physician,
  slice thickness); they are filled in empty (the slice gap for the thickness) on in-memory
  copies, never in the CT's files. A series without ``StudyInstanceUID`` or
  ``FrameOfReferenceUID`` cannot be referenced and is refused before any work.

highdicom is imported inside the functions (``pip install 'bosam[io]'``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path
from .errors import VolumeError
from .volume import Volume, _one_line, make_output_folder

#: attributes a SEG copies from its source that must exist and not be empty
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID", "SOPClassUID")
#: type 2 patient/study attributes highdicom copies: filled in empty where an export dropped them
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
          "StudyDate", "StudyTime", "ReferringPhysicianName")


def _highdicom() -> Any:
    try:
        import highdicom
    except ImportError:  # pragma: no cover - depends on the install
        raise VolumeError("writing DICOM SEG needs highdicom (pip install 'bosam[io]')") from None
    return highdicom


def check_source(like: Volume, path: str | os.PathLike) -> list[Any]:
    """The CT's slice headers (in the volume's slice order) that a SEG at ``path`` would
    reference, or a one-line VolumeError when ``like`` is no DICOM series a SEG can reference.
    Called before any segmentation, so a bad request costs nothing and writes nothing."""
    import pydicom

    _highdicom()
    path = Path(path)
    multiframe = like.meta.get("format") == "dicom-multiframe"
    if multiframe and not like.meta.get("frame_slices"):
        raise VolumeError(f"{path}: the frames of the multi-frame CT {like.name} do not map one to one onto its "
                          "slices; write the label map as .nii.gz, .nrrd or .mha")
    files = like.meta.get("files") if like.meta.get("format") in ("dicom", "dicom-multiframe") else None
    if not files:
        raise VolumeError(f"{path}: a DICOM SEG references the CT's DICOM slices, but {like.name} is not a DICOM "
                          "series; write the label map as .nii.gz, .nrrd or .mha")
    if len(files) != (1 if multiframe else like.shape[2]):
        raise VolumeError(f"{path}: {like.name} has {like.shape[2]} slices but {len(files)} files")
    headers = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except Exception as exc:  # noqa: BLE001 - the file changed since it was read
            raise VolumeError(f"{f}: cannot read the DICOM header again for the SEG ({_one_line(exc)})") from None
        for key in _REQUIRED:
            if not str(ds.get(key, "") or "").strip():
                raise VolumeError(f"{f}: {key}: missing, so a DICOM SEG cannot reference this series; "
                                  "write the label map as .nii.gz, .nrrd or .mha")
        headers.append(ds)
    return headers


#: the longest value of a DICOM LO (long string) attribute, such as SegmentLabel
_LO_MAX = 64


def dicom_text(text: str, limit: int = _LO_MAX) -> str:
    """``text`` as a valid single DICOM LO/SH value: a backslash (the value separator, which
    would make it several values) and control characters (line breaks, tabs, ESC ...) become a
    space, runs of spaces one, the ends stripped, and at most ``limit`` characters kept."""
    out = "".join(" " if ch == "\\" or ord(ch) < 32 or 127 <= ord(ch) < 160 else ch for ch in str(text))
    return " ".join(out.split())[:limit].strip()


def segment_map(labels: np.ndarray, names: Mapping[int, str] | None) -> list[tuple[int, int, str]]:
    """(segment number, label value, name) for every segment: the objects of ``names`` in
    their order, else every non-zero value of ``labels`` in increasing order. The name is the
    SEG's SegmentLabel: the object's name made a valid DICOM LO value (:func:`dicom_text`)."""
    if names:
        items = list(names.items())
    else:
        items = [(int(v), f"label {int(v)}") for v in np.unique(labels) if v]
    return [(n, int(lab), dicom_text(name) or f"label {lab}") for n, (lab, name) in enumerate(items, start=1)]


def write_dicom_seg(labels: np.ndarray, like: Volume, path: str | os.PathLike,
                    names: Mapping[int, str] | None = None) -> Path:
    """Write ``labels`` (on ``like``'s grid: column, row, slice) as a DICOM SEG at ``path``,
    atomically. ``names`` maps label values to segment names, in segment order; a value of
    ``labels`` that it leaves out is an error (it would be dropped silently otherwise)."""
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    from . import __version__

    path = Path(path)
    headers = check_source(like, path)
    segments = segment_map(labels, names)
    if not segments:
        raise VolumeError(f"{path}: a DICOM SEG needs at least one segment, and there is no object")
    present = {int(v) for v in np.unique(labels) if v}
    missing = present - {lab for _, lab, _ in segments}
    if missing:
        raise VolumeError(f"{path}: labels: values {sorted(missing)} have no segment name")
    # label value -> segment number, as a lookup table over the label map's values
    lut = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.uint16)
    for number, lab, _ in segments:
        if lab < lut.size:
            lut[lab] = number
    frames = lut[np.asarray(labels)].transpose(2, 1, 0)  # (slice, row, column), as the source frames
    if like.meta.get("format") == "dicom-multiframe":  # one source file: its frames in their own order
        frames = frames[like.meta["frame_slices"]]
    frames = frames.astype(np.uint8 if len(segments) <= 255 else np.uint16)

    gap = float(abs(np.linalg.det(like.affine[:3, :3])) / np.prod(like.spacing_mm[:2]))
    sources = []
    for ds in headers:
        ds = ds.copy()
        for key in _TYPE2:
            if key not in ds:
                setattr(ds, key, None)
        if not ds.get("SliceThickness"):
            ds.SliceThickness = round(gap, 6)
        sources.append(ds)

    algorithm = hd.AlgorithmIdentificationSequence(
        name="bosam", version=__version__, family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Bone,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, _, name in segments
    ]
    extra: dict[str, Any] = {}
    if not all(name.isascii() for _, _, name in segments):
        # a name beyond ASCII needs a character set that holds it (the source's is copied, and
        # is often the default, ASCII only): UTF-8, which holds the copied patient names too
        extra["specific_character_set"] = "ISO_IR 192"
    try:
        series_number = int(float(str(headers[0].get("SeriesNumber", "") or 0)))
    except ValueError:
        series_number = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # highdicom's advice on the source's person-name style
        try:
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=frames,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                # with no voxel in any segment, highdicom keeps every frame anyway (and logs so
                # to stderr); bosam has already warned about the empty masks
                omit_empty_frames=bool(frames.any()),
                series_instance_uid=hd.UID(),
                series_number=series_number + 1000 if 0 <= series_number < 2**31 - 1001 else 1000,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="bosam",
                manufacturer_model_name="bosam",
                software_versions=__version__,
                device_serial_number="0",
                series_description="bosam bone segmentation",
                content_label="BOSAM",
                content_description="bosam: bones segmented from clicks",
                **extra,
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise VolumeError(f"{path}: cannot build a DICOM SEG on {like.name} ({_one_line(exc)})") from None
    make_output_folder(path)
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return path
