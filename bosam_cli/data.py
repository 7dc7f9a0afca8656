"""nnU-Net-style CT datasets with bone labels, their integrity check, an optional decoded
cache, and the training patch sampler.

A dataset root holds ``imagesTr/`` (``X_0000.nii.gz`` or ``X.nii.gz``) and ``labelsTr/``
(``X.nii.gz``), optionally ``imagesVal/labelsVal`` and ``imagesTs/labelsTs``, and optionally a
``dataset.json`` naming the labels (nnU-Net v1 ``{"1": "femur"}`` or v2 ``{"femur": 1}``).
Like nnU-Net v2's ``file_ending``, the files may also be NRRD (``.nrrd``/``.nhdr``) or
MetaImage (``.mha``/``.mhd``); the data files beside a detached header are passed over.
Several roots can be used at once.

Training patches are model windows cut with the same ``windows.py`` code that ``bosam
segment`` uses (world-space window at the model spacing, axes along RAS, trilinear CT, nearest
labels, clamp + z-score), so a model sees in training exactly what it sees in use. Everything
random is drawn from a ``numpy.random.Generator`` the caller passes in, which makes every
patch a deterministic function of the caller's seed (training derives it from seed, rank,
epoch and step, so a resumed run draws the same patches).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from .errors import BosamError, VolumeError
from .volume import HU_CHECK_VERSION, VOLUME_SUFFIXES, Volume
from .windows import (
    DEFAULT_CLAMP_HU,
    DEFAULT_SIZE,
    DEFAULT_SPACING_MM,
    WindowGeometry,
    normalise,
    sample_labels,
    sample_window,
    window_at,
)

#: dataset splits (folder suffixes) in nnU-Net layout
SPLITS = ("Tr", "Val", "Ts")
CACHE_FORMAT = "bosam-cache/1"
#: the published patch rule: patches with <= 1000 foreground voxels at 1.5 mm are rejected
PUBLISHED_MIN_FG_MM3 = 1000 * 1.5**3
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
AFFINE_ATOL_MM = 1e-3


# ---------------------------------------------------------------------------------------------
# discovery


@dataclass(frozen=True)
class Case:
    """One image/label pair of a dataset.

    Attributes:
        name: case identifier (file name without ``_0000`` and extension).
        image: path of the CT (channel 0000).
        label: path of the label map.
        root: dataset root it belongs to.
        split: "Tr", "Val" or "Ts".
    """

    name: str
    image: Path
    label: Path
    root: Path
    split: str = "Tr"
    root_tag: str | None = None

    @property
    def key(self) -> str:
        """Unique across roots: ``<root name>/<split>/<case>`` (the root's tag from find_cases
        instead of its name when two roots share a folder name)."""
        return _case_key(self.root, self.split, self.name, self.root_tag)


def _case_key(root: Path, split: str, name: str, root_tag: str | None = None) -> str:
    """``<root name>/<split>/<case>``; the folder's own name for a root given as ``.`` or ``..``."""
    return f"{root_tag or _root_name(root)}/{split}/{name}"


@dataclass(frozen=True)
class Problem:
    """An integrity problem of one case or file.

    ``error`` problems refuse training/evaluation (unless skipped); ``warning`` ones are told.
    """

    case: str
    path: Path | None
    message: str
    severity: str = "error"

    def __str__(self) -> str:
        where = str(self.path) if self.path is not None else self.case
        return f"{where}: {self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"case": self.case, "path": str(self.path) if self.path else None, "message": self.message,
                "severity": self.severity}


#: data files that a detached header (.mhd, .nhdr) names; they lie beside it in the folder
_DETACHED_DATA = (".raw", ".zraw", ".raw.gz", ".raw.bz2")


def _volume_stem(name: str) -> tuple[str, str] | None:
    """(case stem, file ending) of a file ``read_volume`` reads; None for any other file."""
    low = name.lower()
    for ending in sorted(VOLUME_SUFFIXES, key=len, reverse=True):  # .nii.gz before .nii
        if low.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)], name[len(name) - len(ending):]
    return None


def _not_a_volume(p: Path) -> list[Problem]:
    if p.name.lower().endswith(_DETACHED_DATA):
        return []
    return [Problem(p.name, p, f"not a volume file ({', '.join(VOLUME_SUFFIXES)}); ignored", "warning")]


def _listing(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _volume_files(folder: Path, problems: list[Problem]) -> list[tuple[str, Path]]:
    """(case stem, path) of every volume file in ``folder``; other files are added to
    ``problems`` (the data files of detached headers silently)."""
    found = []
    for p in sorted(folder.iterdir()):
        if p.is_symlink() and not p.exists() and _volume_stem(p.name) is not None:
            problems.append(Problem(p.name, p, f"broken link to {os.readlink(p)} (the file it points to is missing)", "warning"))
        elif p.is_dir() and not p.name.startswith("."):  # nnU-Net reads no sub-folders: cases there are not seen
            problems.append(Problem(p.name, p, "a folder: its files are not read (cases lie directly in "
                                    f"{folder.name}/)", "warning"))
    for p in _listing(folder):
        parts = _volume_stem(p.name)
        if parts is None:
            problems += _not_a_volume(p)
        else:
            found.append((parts[0], p))
    return found


def find_cases(roots: Sequence[str | os.PathLike], splits: Sequence[str] = ("Tr",)) -> tuple[list[Case], list[Problem]]:
    """Pair images with labels in every root and split; returns (cases, problems).

    Raises BosamError (one line naming the folder) when a root is missing or holds none of the
    asked-for ``images<split>/labels<split>`` folder pairs; per-file problems (unpaired files,
    two files for one case, other channels) are returned, not raised.
    """
    if not roots:
        raise BosamError("no dataset given (--data DIR)")
    cases: list[Case] = []
    problems: list[Problem] = []
    seen_roots: set[Path] = set()
    tags = _root_tags([Path(r) for r in roots])
    for r in roots:
        root = Path(r)
        if not root.exists():
            raise BosamError(f"{root}: no such dataset folder")
        if not root.is_dir():
            raise BosamError(f"{root}: is a file; a dataset is a folder with imagesTr/ and labelsTr/")
        if root.resolve() in seen_roots:
            raise BosamError(f"{root}: dataset given twice")
        seen_roots.add(root.resolve())
        found_any = False
        channel, note = _ct_channel(root)
        if note:
            problems.append(Problem(str(root), root / "dataset.json", note, "warning"))
        half: list[tuple[Path, str]] = []  # images without labels (nnU-Net's unlabelled imagesTs/), or the reverse
        for split in splits:
            img_dir, lab_dir = root / f"images{split}", root / f"labels{split}"
            if not img_dir.is_dir() and not lab_dir.is_dir():
                continue
            if not img_dir.is_dir():
                half.append((img_dir, f"missing (found {lab_dir.name}/ but no {img_dir.name}/)"))
                continue
            if not lab_dir.is_dir():
                half.append((lab_dir, f"missing (found {img_dir.name}/ but no {lab_dir.name}/)"))
                continue
            found_any = True
            c, p = _pair_folder(root, split, img_dir, lab_dir, tags.get(root), channel)
            cases += c
            problems += p
        if not found_any:
            if half:
                raise BosamError(f"{half[0][0]}: {half[0][1]}")
            want = " or ".join(f"images{s}/+labels{s}/" for s in splits)
            raise BosamError(f"{root}: not an nnU-Net-style dataset (no {want})")
        problems += [Problem(str(root), folder, f"{msg}: that split is skipped", "warning") for folder, msg in half]
    return cases, problems


def _root_name(root: Path) -> str:
    """A root's folder name, also for ``.`` and ``..``."""
    return root.name if root.name not in ("", "..") else root.resolve().name


def _root_tags(roots: list[Path]) -> dict[Path, str]:
    """Names for roots that share a folder name (``siteA/Dataset001``, ``siteB/Dataset001``), so
    that case keys stay unique: the shortest distinguishing tail of their paths."""
    by_name: dict[str, list[Path]] = {}
    for r in roots:
        by_name.setdefault(_root_name(r), []).append(r)
    tags: dict[Path, str] = {}
    for same in by_name.values():
        if len(same) < 2:
            continue
        full = [r.resolve().parts for r in same]
        for depth in range(2, max(len(p) for p in full) + 1):
            tails = ["/".join(p[-depth:]) for p in full]
            if len(set(tails)) == len(tails):
                break
        for r, tail in zip(same, tails):
            tags[r] = tail
    return tags


def _ct_channel(root: Path) -> tuple[str, str | None]:
    """The channel suffix of the CT ("0000" unless dataset.json's ``channel_names`` (v2) or
    ``modality`` (v1) names another channel CT), and a note when it names several channels but
    no single CT."""
    path = root / "dataset.json"
    try:
        obj = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "0000", None  # read_label_names reports an unreadable dataset.json
    channels = obj.get("channel_names", obj.get("modality")) if isinstance(obj, dict) else None
    if not isinstance(channels, dict) or not channels:
        return "0000", None
    ct = [k for k, v in channels.items() if str(v).strip().lower() == "ct" and str(k).strip().isdigit()]
    if len(ct) == 1:
        return f"{int(ct[0]):04d}", None
    if len(channels) < 2:
        return "0000", None
    named = ", ".join(f"{k}: {v}" for k, v in channels.items())
    return "0000", f"channels {{{named}}} name no single CT channel; bosam reads _0000 as the CT"


def _pair_folder(root: Path, split: str, img_dir: Path, lab_dir: Path,
                 root_tag: str | None = None, ct_channel: str = "0000") -> tuple[list[Case], list[Problem]]:
    problems: list[Problem] = []
    labels: dict[str, list[Path]] = {}
    for stem, p in _volume_files(lab_dir, problems):
        labels.setdefault(stem, []).append(p)
    images: dict[str, list[Path]] = {}
    for stem, p in _volume_files(img_dir, problems):
        m = _CHANNEL.match(stem)
        name = stem
        # "<case>_0000" is channel 0 of <case>, unless the label is named after the whole stem
        # (a case id that itself ends in four digits, such as BONE_0001, without a channel suffix)
        if m and not (stem in labels and m.group("case") not in labels):
            name = m.group("case")
            if m.group("channel") != ct_channel:
                problems.append(Problem(name, p, f"channel {m.group('channel')} ignored: bosam reads one CT channel (_{ct_channel})", "warning"))
                continue
        images.setdefault(name, []).append(p)
    cases = []
    for name in sorted(set(images) | set(labels)):
        key = _case_key(root, split, name, root_tag)
        imgs, labs = images.get(name, []), labels.get(name, [])
        if len(imgs) > 1:
            problems.append(Problem(key, imgs[0], f"{len(imgs)} image files for case '{name}' ({', '.join(p.name for p in imgs)}): ambiguous"))
        if len(labs) > 1:
            problems.append(Problem(key, labs[0], f"{len(labs)} label files for case '{name}' ({', '.join(p.name for p in labs)}): ambiguous"))
        if len(imgs) > 1 or len(labs) > 1:
            continue
        if not labs:
            ending = _volume_stem(imgs[0].name)[1]  # type: ignore[index]
            problems.append(Problem(key, imgs[0], f"unpaired image: no label file {lab_dir.name}/{name}{ending}"))
        elif not imgs:
            ending = _volume_stem(labs[0].name)[1]  # type: ignore[index]
            problems.append(Problem(key, labs[0], f"unpaired label: no image {img_dir.name}/{name}_{ct_channel}{ending}"))
        else:
            cases.append(Case(name, imgs[0], labs[0], root, split, root_tag))
    return cases, problems


# ---------------------------------------------------------------------------------------------
# label names and the label filter


def read_label_names(root: str | os.PathLike) -> dict[int, str]:
    """Label names from a root's ``dataset.json`` (nnU-Net v1 or v2 form); {} when absent.

    v2 region entries (a name mapped to a list of several ids) are skipped: bosam segments one
    label id per object; a one-id list, or an id written as text, is that id.
    """
    return read_dataset_labels(root)[0]


def read_dataset_labels(root: str | os.PathLike) -> tuple[dict[int, str], dict[str, list[Any]]]:
    """(names, regions) of a root's ``dataset.json`` from one read: the names of
    ``read_label_names``, and the nnU-Net v2 region entries (a name mapped to several ids) that
    it skips. ({}, {}) when the file is absent."""
    path = Path(root) / "dataset.json"
    if not path.exists():
        return {}, {}
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BosamError(f"{path}: not valid JSON ({exc})") from None
    labels = obj.get("labels") if isinstance(obj, dict) else None
    if not isinstance(labels, dict):
        return {}, {}
    out: dict[int, str] = {}
    regions: dict[str, list[Any]] = {}
    for k, v in labels.items():
        if isinstance(v, list) and len(v) > 1:
            regions[str(k)] = v
            continue
        if isinstance(v, list) and len(v) == 1:  # v2: a one-id region is that id
            v = v[0]
        if isinstance(k, str) and k.strip().lstrip("-").isdigit():  # v1: "id" -> name
            out[int(k)] = str(v)
        elif isinstance(v, int) and not isinstance(v, bool):  # v2: name -> id
            out[int(v)] = str(k)
        elif isinstance(v, str) and v.strip().isdigit():  # v2 with the id written as text
            out[int(v)] = str(k)
    out.pop(0, None)
    return out, regions


def read_labelmap(path: str | os.PathLike) -> dict[str, Any]:
    """A label-map JSON like ``totalsegmentator_total_v2_labelmap.json``: ``labels`` (id ->
    {name, bone, group} or id -> name), optional ``bone_ids`` and ``bone_groups``."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise BosamError(f"{path}: no such label-map file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BosamError(f"{path}: not a valid label-map JSON ({exc})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("labels"), dict):
        raise BosamError(f"{path}: label map must be a JSON object with a 'labels' object")
    return obj


def _label_id(value: Any) -> int | None:
    """A label id written as a number or as digits; None for anything else."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def labelmap_names(labelmap: dict[str, Any]) -> dict[int, str]:
    """id -> name of a label map: ``{"75": "femur_left"}``, ``{"75": {"name": ...}}``, or keyed
    by name: ``{"femur_left": 75}`` (nnU-Net v2's direction) or ``{"femur_left": {"id": 75}}``."""
    out: dict[int, str] = {}
    for k, v in labelmap["labels"].items():
        if _label_id(k) is not None:
            name = v.get("name") if isinstance(v, dict) else v
            if name is not None:
                out[int(_label_id(k))] = str(name)  # type: ignore[arg-type]
        elif _label_id(v) is not None:
            out[int(_label_id(v))] = str(k)  # type: ignore[arg-type]
        elif isinstance(v, dict) and _label_id(v.get("id")) is not None:
            out[int(_label_id(v.get("id")))] = str(v.get("name", k))  # type: ignore[arg-type]
    out.pop(0, None)
    return out


def _labelmap_ids(entries: Any, labelmap: dict[str, Any], where: str) -> list[int]:
    """Ids of a label-map list (``bone_ids`` or a bone group): ids, or names of the map's labels."""
    if not isinstance(entries, list):
        raise BosamError(f"{where}: must be a list of label ids or names, not {json.dumps(entries)}")
    by_name = {n.lower(): i for i, n in labelmap_names(labelmap).items()}
    out = []
    for e in entries:
        i = _label_id(e)
        if i is None and isinstance(e, str):
            i = by_name.get(e.strip().lower())
        if i is None:
            raise BosamError(f"{where}: {json.dumps(e)} is neither a label id nor a label name of the map")
        out.append(i)
    return sorted(set(out))


def labelmap_bone_ids(labelmap: dict[str, Any]) -> list[int]:
    if "bone_ids" in labelmap:
        return _labelmap_ids(labelmap["bone_ids"], labelmap, "label map: bone_ids")
    out = []
    for k, v in labelmap["labels"].items():
        if isinstance(v, dict) and v.get("bone"):
            i = _label_id(k) if _label_id(k) is not None else _label_id(v.get("id"))
            if i is None:
                raise BosamError(f"label map: labels: bone entry {json.dumps(k)} has no label id")
            out.append(i)
    return sorted(i for i in set(out) if i > 0)


def _split_spec(spec: str | Sequence[str]) -> list[str]:
    return [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) for s in str(s).split(",") if s.strip()]


def _selected_id(text: str, where: str) -> int:
    """One id of a --labels list: label maps hold 1..65535 (uint16), as prompt files do. A range
    up to 99999999999 had been expanded into a set until the process was killed for memory."""
    from .prompts import MAX_LABEL

    if len(text.lstrip("0")) > 6 or int(text) > MAX_LABEL:
        raise BosamError(f"{where}: label id {text} is above {MAX_LABEL}, the largest a label map holds")
    return int(text)


def resolve_labels(
    spec: str | Sequence[str] | None,
    names: dict[int, str] | None = None,
    labelmap: dict[str, Any] | None = None,
    where: str = "--labels",
) -> list[int] | None:
    """Label ids selected by ``spec``; None means every label > 0.

    ``spec`` is a comma-separated list (or a list) of: ids (``25``), ranges (``25-50``), label
    names (``femur_left``), ``bone`` (the label map's bone ids), or a bone group of the label map
    (``spine``, ``rib`` ...). ``names`` are the dataset's own (dataset.json): a name it defines
    means its id there, before the label map's meaning of the same name or keyword.
    """
    if spec is None:
        return None
    items = _split_spec(spec)
    if not items:
        raise BosamError(f"{where}: empty selection (give ids, ranges, names or 'bone'; leave the option out for every label)")
    own = {n.lower(): i for i, n in (names or {}).items()}
    from_map = {n.lower(): i for i, n in labelmap_names(labelmap).items()} if labelmap else {}
    groups = labelmap.get("bone_groups") if labelmap else None
    groups = {str(k).lower(): v for k, v in groups.items()} if isinstance(groups, dict) else {}
    out: set[int] = set()
    for item in items:
        low = item.lower()
        if re.fullmatch(r"\d+", item):
            out.add(_selected_id(item, where))
        elif re.fullmatch(r"\d+-\d+", item):
            a, b = (_selected_id(x, where) for x in item.split("-"))
            if b < a:
                raise BosamError(f"{where}: empty range '{item}'")
            out.update(range(a, b + 1))
        elif low in own:
            out.add(own[low])
        elif low in ("bone", "bones"):
            if labelmap is None:
                raise BosamError(f"{where}: 'bone' needs a label map (--labelmap FILE.json with bone ids)")
            out.update(labelmap_bone_ids(labelmap))
        elif low in groups:
            out.update(_labelmap_ids(groups[low], labelmap, f"label map: bone_groups: {item}"))  # type: ignore[arg-type]
        elif low in from_map:
            out.add(from_map[low])
        else:
            known = ", ".join(sorted({**from_map, **own})[:8])
            if known:
                hint = f" (known names: {known}, ...)"
            elif labelmap is not None:
                hint = " (the label map names no labels and the dataset has no dataset.json label names)"
            else:
                hint = " (no dataset.json label names and no --labelmap)"
            raise BosamError(f"{where}: unknown label '{item}'{hint}")
    out.discard(0)
    if not out:
        raise BosamError(f"{where}: selects no label > 0")
    return sorted(out)


def listed_labels(spec: str | Sequence[str] | None, names: dict[int, str] | None = None,
                  labelmap: dict[str, Any] | None = None) -> dict[int, str]:
    """The ids that ``spec`` names one by one (an id or a name; not a range, 'bone' or a group),
    each with the item that named it: a user expects each of them in the data."""
    out: dict[int, str] = {}
    if spec is None:
        return out
    own = {n.lower() for n in (names or {}).values()}
    groups = labelmap.get("bone_groups") if labelmap else None
    groups = {str(k).lower() for k in groups} if isinstance(groups, dict) else set()
    for item in _split_spec(spec):
        low = item.lower()
        if re.fullmatch(r"\d+-\d+", item) or (low not in own and (low in ("bone", "bones") or low in groups)):
            continue
        for i in resolve_labels(item, names, labelmap) or []:
            out.setdefault(i, item)
    return out


# ---------------------------------------------------------------------------------------------
# scanning (integrity check) and the decoded cache


@dataclass
class CaseInfo:
    """What the integrity scan learnt about one case (kept for sampling).

    Attributes:
        case: the files.
        shape: voxel grid of image and label.
        affine: voxel -> RAS mm (4x4 nested list).
        labels: selected label id -> voxel count (only labels present).
        bboxes: label id -> [[lo, hi) per axis] voxel bounding box.
        cached: whether the decoded arrays come from the cache.
        ignore: ids of the dataset's ``ignore`` label (nnU-Net v2: voxels nobody annotated),
            never an object and never another structure.
    """

    case: Case
    shape: tuple[int, int, int]
    affine: list[list[float]]
    labels: dict[int, int] = field(default_factory=dict)
    bboxes: dict[int, list[list[int]]] = field(default_factory=dict)
    cached: bool = False
    ignore: tuple[int, ...] = ()

    @property
    def voxel_volume_mm3(self) -> float:
        return float(abs(np.linalg.det(np.asarray(self.affine)[:3, :3])))

    @property
    def spacing_mm(self) -> list[float]:
        a = np.asarray(self.affine)
        return [float(v) for v in np.sqrt((a[:3, :3] ** 2).sum(axis=0))]


def _image_array(arr: np.ndarray) -> np.ndarray:
    """CT as int16 when the values are integers that fit, else float32 (cache size, speed)."""
    if arr.dtype == np.int16:
        return arr
    if arr.dtype.kind in "iu" and arr.size and arr.min() >= -32768 and arr.max() <= 32767:
        return arr.astype(np.int16)
    return arr.astype(np.float32, copy=False)


def _label_array(arr: np.ndarray, path: Path) -> np.ndarray:
    """Label map as the smallest unsigned integer type; refuses non-integer or negative ids."""
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)):
            raise VolumeError(f"{path}: labels: NaN or infinite values")
        if not np.array_equal(arr, np.rint(arr)):
            raise VolumeError(f"{path}: labels: non-integer values (is this an image rather than a label map?)")
    elif arr.dtype.kind not in "biu":
        raise VolumeError(f"{path}: labels: unsupported dtype {arr.dtype}")
    lo = int(arr.min()) if arr.size else 0
    hi = int(arr.max()) if arr.size else 0
    if lo < 0:
        raise VolumeError(f"{path}: labels: negative label {lo}")
    if hi > 65535:
        raise VolumeError(f"{path}: labels: label {hi} > 65535")
    return arr.astype(np.uint8 if hi <= 255 else np.uint16, copy=False)


def _label_stats(labels: np.ndarray) -> tuple[dict[int, int], dict[int, list[list[int]]]]:
    from scipy import ndimage

    counts = np.bincount(labels.reshape(-1).astype(np.int64))
    present = {int(i): int(c) for i, c in enumerate(counts) if i > 0 and c > 0}
    boxes: dict[int, list[list[int]]] = {}
    if present:
        objs = ndimage.find_objects(labels.astype(np.int32, copy=False))
        for i in present:
            sl = objs[i - 1]
            boxes[i] = [[int(s.start), int(s.stop)] for s in sl]
    return present, boxes


def _file_sig(path: Path) -> list[int]:
    st = path.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def cache_folder(cache: str | os.PathLike, root: Path) -> Path:
    """Cache sub-folder of one dataset root (root name + hash of its absolute path)."""
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
    return Path(cache) / f"{_root_name(root)}-{digest}"


def _cache_paths(cache: str | os.PathLike, case: Case) -> tuple[Path, Path, Path]:
    base = cache_folder(cache, case.root) / case.split
    return base / f"{case.name}.json", base / f"{case.name}.image.npy", base / f"{case.name}.label.npy"


def _read_cache_entry(cache: str | os.PathLike | None, case: Case) -> dict[str, Any] | None:
    """The cache entry of a case when it exists and matches the source files (name, size,
    mtime: two channels of one case may share size and mtime)."""
    if cache is None:
        return None
    meta_p, img_p, lab_p = _cache_paths(cache, case)
    if not (meta_p.exists() and img_p.exists() and lab_p.exists()):
        return None
    try:
        meta = json.loads(meta_p.read_text())
        ok = (
            meta.get("format") == CACHE_FORMAT
            and Path(str(meta.get("image"))).name == case.image.name
            and Path(str(meta.get("label"))).name == case.label.name
            and meta.get("image_sig") == _file_sig(case.image)
            and meta.get("label_sig") == _file_sig(case.label)
        )
    except (OSError, json.JSONDecodeError):
        return None
    return meta if ok else None


def _write_cache_entry(cache: str | os.PathLike, case: Case, image: Volume, labels: np.ndarray,
                       present: dict[int, int], boxes: dict[int, list[list[int]]], hu_note: str | None = None) -> None:
    meta_p, img_p, lab_p = _cache_paths(cache, case)
    meta_p.parent.mkdir(parents=True, exist_ok=True)
    for arr, p in ((_image_array(image.array), img_p), (labels, lab_p)):
        tmp = p.with_name(p.name + ".tmp.npy")
        np.save(tmp, np.ascontiguousarray(arr))
        os.replace(tmp, p)
    meta = {
        "format": CACHE_FORMAT,
        "image": str(case.image),
        "label": str(case.label),
        "image_sig": _file_sig(case.image),
        "label_sig": _file_sig(case.label),
        "shape": list(image.shape),
        "affine": np.asarray(image.affine).tolist(),
        "labels": {str(k): v for k, v in present.items()},
        "bboxes": {str(k): v for k, v in boxes.items()},
        "hu_warning": hu_note,
        "hu_check": HU_CHECK_VERSION,
    }
    _write_cache_meta(meta_p, meta)


def _write_cache_meta(meta_p: Path, meta: dict[str, Any]) -> None:
    """A cache entry's JSON, replaced whole (the image and label arrays are written before it)."""
    tmp = meta_p.with_name(meta_p.name + ".tmp")
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_p)


#: how a case without any selected label is reported
NO_SELECTED_LABEL = "none of the selected labels is present"


def _select(present: dict[int, int], boxes: dict[int, list[list[int]]], label_ids: Sequence[int] | None,
            exclude: Sequence[int] = ()):
    keep = set(present if label_ids is None else label_ids) - set(exclude)
    return {k: v for k, v in present.items() if k in keep}, {k: v for k, v in boxes.items() if k in keep}


def ignore_label_ids(names: dict[int, str]) -> tuple[int, ...]:
    """Ids named ``ignore`` in a dataset.json (nnU-Net v2's label for voxels nobody annotated)."""
    return tuple(sorted(i for i, n in names.items() if n.strip().lower() == "ignore"))


def structure_voxels(labels: np.ndarray, ignore: Sequence[int] = ()) -> np.ndarray:
    """Voxels that a label map gives to some structure: > 0 and not an ``ignore`` label."""
    out = labels > 0
    for i in ignore:
        out &= labels != i
    return out


def scan_case(
    case: Case,
    label_ids: Sequence[int] | None = None,
    cache: str | os.PathLike | None = None,
    write_cache: bool = False,
    ignore: Sequence[int] = (),
) -> tuple[CaseInfo | None, list[Problem]]:
    """Read one case and check it: both files readable, same shape and affine, label map of
    non-negative integers that is not empty, and some selected label present.

    Returns (info, problems); info is None when the case has an error. With a valid cache
    entry nothing is decoded; with ``write_cache`` the decoded arrays are written to the cache.
    """
    from .volume import hu_warning, read_volume, require_finite

    entry = _read_cache_entry(cache, case)
    if entry is not None:
        present = {int(k): int(v) for k, v in entry["labels"].items()}
        boxes = {int(k): v for k, v in entry["bboxes"].items()}
        shape = tuple(int(s) for s in entry["shape"])
        affine = entry["affine"]
        hu_note = entry.get("hu_warning")
        if entry.get("hu_check") != HU_CHECK_VERSION:  # cached by an older check: judge the cached values again
            meta_p, img_p, _ = _cache_paths(cache, case)  # type: ignore[arg-type]
            hu_note = hu_warning(Volume(np.load(img_p, mmap_mode="r"), np.asarray(affine, np.float64), path=case.image))
            try:  # and keep the new verdict, so later scans need not read the image again
                _write_cache_meta(meta_p, {**entry, "hu_warning": hu_note, "hu_check": HU_CHECK_VERSION})
            except OSError:  # a read-only cache: judged again next time
                pass
        cached = True
    else:
        try:
            image = read_volume(case.image)
        except VolumeError as exc:
            return None, [Problem(case.key, case.image, _strip_path(str(exc), case.image))]
        try:
            label = read_volume(case.label)
        except VolumeError as exc:
            return None, [Problem(case.key, case.label, _strip_path(str(exc), case.label))]
        if image.shape != label.shape:
            return None, [Problem(case.key, case.label, f"shape {list(label.shape)} differs from the image's {list(image.shape)} ({case.image.name})")]
        diff = float(np.abs(image.affine - label.affine).max())
        if diff > AFFINE_ATOL_MM:
            return None, [Problem(case.key, case.label, f"affine differs from the image's ({case.image.name}) by up to {diff:.4g} mm: not on the same grid")]
        try:
            require_finite(image)
        except VolumeError as exc:
            return None, [Problem(case.key, case.image, _strip_path(str(exc), case.image))]
        try:
            labels = _label_array(label.array, case.label)
        except VolumeError as exc:
            return None, [Problem(case.key, case.label, _strip_path(str(exc), case.label))]
        present, boxes = _label_stats(labels)
        hu_note = hu_warning(image)
        if write_cache and cache is not None and present:
            _write_cache_entry(cache, case, image, labels, present, boxes, hu_note)
        shape = image.shape
        affine = np.asarray(image.affine).tolist()
        cached = write_cache and cache is not None and bool(present)
    if not present:
        return None, [Problem(case.key, case.label, "label map is empty (no voxel > 0)")]
    sel, sel_boxes = _select(present, boxes, label_ids, ignore)
    if not sel:
        ids = ", ".join(str(i) for i in sorted(present)[:12])
        return None, [Problem(case.key, case.label, f"{NO_SELECTED_LABEL} (present: {ids}); case skipped", "warning")]
    notes = [Problem(case.key, case.image, _strip_path(hu_note, case.image), "warning")] if hu_note else []
    return CaseInfo(case, shape, affine, sel, sel_boxes, cached, tuple(ignore)), notes  # type: ignore[arg-type]


def _strip_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


@dataclass
class ScanResult:
    """Cases that passed the integrity scan, and every problem found."""

    infos: list[CaseInfo]
    problems: list[Problem]
    label_names: dict[int, str]
    label_ids: list[int] | None
    roots: list[str]

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity != "error"]

    def summary(self) -> dict[str, Any]:
        """Plain-types description for checkpoints, reports and ``--json``."""
        per_label: dict[int, list[int]] = {}
        for info in self.infos:
            for lab, n in info.labels.items():
                per_label.setdefault(lab, []).append(n)
        return {
            "roots": list(self.roots),
            "cases": len(self.infos),
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "label_ids": sorted(per_label),
            "labels": {
                str(lab): {"name": self.label_names.get(lab, f"label_{lab}"), "cases": len(ns), "voxels": int(sum(ns))}
                for lab, ns in sorted(per_label.items())
            },
        }


def refuse_output_in_dataset(out: str | os.PathLike, roots: Sequence[str | os.PathLike], option: str) -> None:
    """An output folder inside a dataset's ``images*/`` or ``labels*/`` folder would be read back
    by every later command as a stray file of the dataset: refused, naming the option."""
    o = Path(out).resolve()
    for r in roots:
        root = Path(r).resolve()
        for sub in sorted(root.glob("images*")) + sorted(root.glob("labels*")):
            if sub.is_dir() and (o == sub or sub in o.parents):
                raise BosamError(f"{out}: is inside the dataset folder {sub}; choose a {option} outside "
                                 "the dataset's images and labels folders")


def _check_cache(cache: str | os.PathLike, roots: Sequence[str | os.PathLike], write: bool) -> list[Problem]:
    """A cache to read must exist (a mistyped path was silently ignored: training then decoded
    every file itself); one that holds nothing for a root is a warning. A cache to write must not
    go inside a dataset's images or labels folder."""
    c = Path(cache)
    if write:
        refuse_output_in_dataset(c, roots, "--cache")
        if c.exists() and not c.is_dir():
            raise BosamError(f"{c}: is a file; --cache is a folder")
        return []
    if not c.is_dir():
        raise BosamError(f"{c}: no such cache folder (--cache); write one with 'bosam prepare --cache'"
                         if not c.exists() else f"{c}: is a file; --cache is a folder written by 'bosam prepare --cache'")
    return [Problem(str(r), c, f"holds no cache of {r}; its files are read and decoded as they are", "warning")
            for r in roots if not cache_folder(c, Path(r)).is_dir()]


def scan_dataset(
    roots: Sequence[str | os.PathLike],
    labels: str | Sequence[str] | None = None,
    labelmap: str | os.PathLike | None = None,
    splits: Sequence[str] = ("Tr",),
    cache: str | os.PathLike | None = None,
    write_cache: bool = False,
    max_cases: int | None = None,
    on_case: Callable[[Case, CaseInfo | None, list[Problem]], None] | None = None,
    jobs: int = 1,
) -> ScanResult:
    """Find, read and check every case of the roots (``bosam prepare --check``, and the first
    thing training and evaluation do). ``max_cases`` stops after that many good cases.
    ``jobs`` > 1 reads that many cases at once in threads (decoding and cache writes release
    the GIL); results and ``on_case`` calls keep the case order."""
    cases, problems = find_cases(roots, splits)
    if cache is not None:
        problems += _check_cache(cache, roots, write_cache)
    lm = read_labelmap(labelmap) if labelmap else None
    read = [(str(r), *read_dataset_labels(r)) for r in roots]  # each dataset.json read once
    per_root = [(root, names) for root, names, _ in read]
    label_ids, names, name_problems, listed = _labels_over_roots(per_root, labels, lm)
    problems += name_problems
    for root, _, regions in read:
        for name, ids in regions.items():
            problems.append(Problem(str(root), Path(root) / "dataset.json", f"labels: {name!r} is a region of ids "
                                    f"{ids} (nnU-Net v2): bosam takes one id per object, so each id is a label of its "
                                    "own here, without that name", "warning"))
    ignore = {Path(root): ignore_label_ids(rn) for root, rn in per_root}
    for root, ids in ignore.items():
        chosen = sorted(set(ids) & set(label_ids or []))
        if chosen:
            problems.append(Problem(str(root), Path(root) / "dataset.json", f"label {chosen[0]} is the 'ignore' label "
                                    "(voxels nobody annotated): never an object, left out of --labels", "warning"))
    infos: list[CaseInfo] = []
    if jobs > 1 and max_cases is None and len(cases) > 1:
        pool = ThreadPoolExecutor(max_workers=jobs)
        results = pool.map(lambda c: scan_case(c, label_ids, cache, write_cache, ignore.get(c.root, ())), cases)
    else:
        pool = None
        results = (scan_case(c, label_ids, cache, write_cache, ignore.get(c.root, ())) for c in cases)
    try:
        for case, (info, probs) in zip(cases, results):
            problems += probs
            if info is not None:
                infos.append(info)
            if on_case is not None:
                on_case(case, info, probs)
            if max_cases is not None and len(infos) >= max_cases:
                break
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if max_cases is None and infos:
        found = {lab for info in infos for lab in info.labels}
        for i, item in listed.items():
            if i not in found:
                what = item if item == str(i) else f"{item} (id {i})"
                problems.append(Problem(", ".join(str(r) for r in roots), None,
                                        f"--labels: {what} is in no usable case", "warning"))
    return ScanResult(infos, problems, names, label_ids, [str(r) for r in roots])


def _labels_over_roots(per_root: list[tuple[str, dict[int, str]]], labels: str | Sequence[str] | None,
                       lm: dict[str, Any] | None) -> tuple[list[int] | None, dict[int, str], list[Problem], dict[int, str]]:
    """(selected ids, id -> name, problems, ids named one by one in ``labels``) for several roots,
    each given with its dataset.json names. Roots may number their labels differently: a
    ``--labels`` selection must mean the same ids in every root whose dataset.json names its
    labels (else a one-line BosamError naming both roots), and an id named differently in two
    roots is a warning (reports use the first root's name)."""
    lm_names = labelmap_names(lm) if lm else {}
    roots = [root for root, _ in per_root]
    from_roots: dict[int, str] = {}
    problems: list[Problem] = []
    for root, rn in per_root:
        for i, n in rn.items():
            if i in from_roots and from_roots[i] != n:
                problems.append(Problem(root, Path(root) / "dataset.json", f"label {i} is '{n}' here but "
                                        f"'{from_roots[i]}' in an earlier root; reports use '{from_roots[i]}'", "warning"))
            from_roots.setdefault(i, n)
    names = {**lm_names, **from_roots}  # a dataset's own names before the label map's
    label_ids = resolve_labels(labels, from_roots, lm)
    for i in label_ids or []:
        own, other = from_roots.get(i), lm_names.get(i)
        if own is not None and other is not None and own.lower() != other.lower():
            problems.append(Problem(", ".join(roots), None, f"--labels: label {i} is '{own}' in dataset.json "
                                    f"but '{other}' in the label map (reports use '{own}'); check that the two "
                                    "number labels alike", "warning"))
    named = [(root, rn) for root, rn in per_root if rn]
    if labels is not None and len(named) > 1:
        chosen = []
        for root, rn in named:
            try:
                chosen.append((root, resolve_labels(labels, rn, lm)))
            except BosamError as exc:
                raise BosamError(f"{root}/dataset.json: {exc}") from None
        (root_a, ids_a), = chosen[:1]
        for root_b, ids_b in chosen[1:]:
            if ids_b != ids_a:
                raise BosamError(f"--labels: selects ids {ids_a} in {root_a} but {ids_b} in {root_b} (their "
                                 "dataset.json files number the labels differently); give label ids, or train on "
                                 "roots that agree")
    return label_ids, names, problems, listed_labels(labels, from_roots, lm)


def refuse_errors(scan: ScanResult, skip_bad: bool, what: str = "training") -> None:
    """Raise one BosamError naming the first bad file when the scan found errors (unless
    ``skip_bad``), or when no usable case is left."""
    errs = scan.errors
    if errs and not skip_bad:
        more = f" (and {len(errs) - 1} more problem{'s' if len(errs) > 2 else ''}; run 'bosam prepare --check')" if len(errs) > 1 else ""
        raise BosamError(f"{errs[0]}{more}; fix the dataset or pass --skip-bad to leave bad cases out of {what}")
    if not scan.infos:
        # why the cases went: their errors (left out by --skip-bad), else the selection, before
        # any other warning (an ignored channel, a split without labels)
        unselected = [p for p in scan.problems if p.message.startswith(NO_SELECTED_LABEL)]
        if unselected and not errs:
            ids = ", ".join(str(i) for i in scan.label_ids) if scan.label_ids else "every label but 'ignore'"
            first = f": none of the selected labels ({ids}) is in any case (e.g. {unselected[0]})"
        else:
            reasons = errs or unselected or scan.problems
            first = f": {reasons[0]}" if reasons else ": no case found"
        raise BosamError(f"{', '.join(scan.roots)}: no usable case for {what}{first}")


# ---------------------------------------------------------------------------------------------
# loading


class CaseStore:
    """Decoded image/label volumes of scanned cases: memory-mapped from the cache when there is
    one, else decoded from NIfTI and kept in a small LRU. Thread-safe (the trainer prefetches)."""

    def __init__(self, infos: Sequence[CaseInfo], cache: str | os.PathLike | None = None, keep: int = 4) -> None:
        self.infos = list(infos)
        self.cache = cache
        self.keep = max(1, int(keep))
        self._lru: "OrderedDict[int, tuple[Volume, Volume]]" = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.infos)

    def load(self, index: int) -> tuple[Volume, Volume]:
        """(CT, labels) of case ``index``; the label array is unsigned integer."""
        with self._lock:
            if index in self._lru:
                self._lru.move_to_end(index)
                return self._lru[index]
        info = self.infos[index]
        entry = _read_cache_entry(self.cache, info.case) if self.cache is not None else None
        if entry is not None:
            _, img_p, lab_p = _cache_paths(self.cache, info.case)  # type: ignore[arg-type]
            affine = np.asarray(entry["affine"], dtype=np.float64)
            image = Volume(np.load(img_p, mmap_mode="r"), affine, None, info.case.image)
            label = Volume(np.load(lab_p, mmap_mode="r"), affine, None, info.case.label)
        else:
            from .volume import read_volume

            image = read_volume(info.case.image)
            raw = read_volume(info.case.label)
            label = Volume(_label_array(raw.array, info.case.label), raw.affine, raw.header, info.case.label)
        with self._lock:
            self._lru[index] = (image, label)
            while len(self._lru) > self.keep:
                self._lru.popitem(last=False)
        return image, label


# ---------------------------------------------------------------------------------------------
# patch sampling


@dataclass(frozen=True)
class PatchConfig:
    """How training windows are cut and augmented.

    Attributes:
        spacing_mm: model window spacing (1.5 mm: SAM-Med3D's training data).
        size: window side in voxels (the model's input, 128).
        clamp_hu: HU clamp before z-scoring (None: none).
        pad_value: HU of window voxels outside the CT (0, as the reference pads).
        max_shift_vox: the window centre is the chosen object voxel moved by up to this many
            window voxels per axis (always leaving that voxel inside the window).
        min_fg_mm3: patches whose object part is smaller than this (mm^3) are redrawn; the
            published rule (<= 1000 voxels at 1.5 mm) is 3375 mm^3. Objects smaller than this
            in total are never drawn.
        flip: random flips of the three window axes (p = 0.5 each), the published augmentation.
        intensity_scale: z-scored intensities are multiplied by 1 + U(-s, s).
        intensity_shift: ... and shifted by U(-t, t) (z units).
        spacing_jitter: window spacing multiplied by 1 + U(-j, j).
        max_tries: draws before the best patch so far is taken anyway.
    """

    spacing_mm: float = DEFAULT_SPACING_MM
    size: int = DEFAULT_SIZE
    clamp_hu: tuple[float, float] | None = DEFAULT_CLAMP_HU
    pad_value: float = 0.0
    max_shift_vox: int = 32
    min_fg_mm3: float = PUBLISHED_MIN_FG_MM3
    flip: bool = True
    intensity_scale: float = 0.1
    intensity_shift: float = 0.1
    spacing_jitter: float = 0.1
    max_tries: int = 10

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["clamp_hu"] = list(self.clamp_hu) if self.clamp_hu is not None else None
        return d


@dataclass
class Patch:
    """One training window.

    Attributes:
        image: (S, S, S) float32, clamped, z-scored, augmented.
        target: (S, S, S) bool, the object.
        case: case key; label: object label id.
        geom: the window before flipping (spacing after jitter).
        flips: which window axes were flipped (array axes of image/target).
        seed_ijk: the object voxel (CT grid) the window was placed on.
        foreground: voxels of the object in the window.
        others: (S, S, S) bool, voxels of every other label of the case (neighbouring bones,
            organs) in the window, flipped like ``target``.
    """

    image: np.ndarray
    target: np.ndarray
    case: str
    label: int
    geom: WindowGeometry
    flips: tuple[bool, bool, bool]
    seed_ijk: tuple[int, int, int]
    foreground: int
    others: np.ndarray | None = None


class PatchSampler:
    """Draws training windows from scanned cases (uniform case, then uniform label of it)."""

    def __init__(self, store: CaseStore, config: PatchConfig = PatchConfig()) -> None:
        self.store = store
        self.config = config
        self.pairs: list[list[int]] = []
        self.too_small: list[tuple[str, int]] = []
        for info in store.infos:
            ok = []
            for lab, n in sorted(info.labels.items()):
                if n * info.voxel_volume_mm3 < config.min_fg_mm3:
                    self.too_small.append((info.case.key, lab))
                else:
                    ok.append(lab)
            self.pairs.append(ok)
        self.usable = [i for i, labs in enumerate(self.pairs) if labs]
        if not self.usable:
            raise BosamError(
                f"every selected object is smaller than the patch rule's {config.min_fg_mm3:.0f} mm^3 "
                "(lower --min-fg-mm3)"
            )

    def min_fg_voxels(self, spacing_mm: float) -> int:
        """The patch rule in window voxels at ``spacing_mm`` (1000 at 1.5 mm by default)."""
        return max(1, int(math.floor(self.config.min_fg_mm3 / spacing_mm**3 + 1e-9)))

    def sample(self, rng: np.random.Generator) -> Patch:
        """One patch; every random choice comes from ``rng``."""
        cfg = self.config
        best: Patch | None = None
        for _ in range(max(1, cfg.max_tries)):
            case_index = self.usable[int(rng.integers(len(self.usable)))]
            labs = self.pairs[case_index]
            lab = labs[int(rng.integers(len(labs)))]
            patch = self._draw(case_index, lab, rng)
            if patch.foreground > self.min_fg_voxels(patch.geom.spacing_mm):
                return patch
            if best is None or patch.foreground > best.foreground:
                best = patch
        assert best is not None
        return best

    def _draw(self, case_index: int, lab: int, rng: np.random.Generator) -> Patch:
        cfg = self.config
        info = self.store.infos[case_index]
        image, labels = self.store.load(case_index)
        box = tuple(slice(lo, hi) for lo, hi in info.bboxes[lab])
        hits = np.flatnonzero(np.asarray(labels.array[box]) == lab)
        sub_shape = tuple(s.stop - s.start for s in box)
        flat = int(hits[int(rng.integers(hits.size))])
        seed = tuple(int(v) + s.start for v, s in zip(np.unravel_index(flat, sub_shape), box))
        spacing = cfg.spacing_mm * (1.0 + float(rng.uniform(-cfg.spacing_jitter, cfg.spacing_jitter))) if cfg.spacing_jitter else cfg.spacing_mm
        limit = max(0, min(cfg.max_shift_vox, cfg.size // 2 - 2))
        shift_vox = rng.uniform(-limit, limit, size=3) if limit else np.zeros(3)
        seed_ras = image.voxel_to_world(np.asarray(seed, dtype=np.float64))[0]
        geom = window_at(seed_ras + shift_vox * spacing, spacing, cfg.size, snap_vox=0)
        raw = sample_window(image, geom, cfg.pad_value)
        window_labels = sample_labels(labels, geom)
        target = window_labels == lab
        others = structure_voxels(window_labels, info.ignore) & ~target
        img = normalise(raw, cfg.clamp_hu)
        flips = tuple(bool(rng.random() < 0.5) for _ in range(3)) if cfg.flip else (False, False, False)
        if cfg.intensity_scale or cfg.intensity_shift:
            scale = 1.0 + float(rng.uniform(-cfg.intensity_scale, cfg.intensity_scale))
            shift = float(rng.uniform(-cfg.intensity_shift, cfg.intensity_shift))
            img *= np.float32(scale)
            img += np.float32(shift)
        axes = tuple(a for a in range(3) if flips[a])
        if axes:
            img = np.ascontiguousarray(np.flip(img, axes))
            target = np.ascontiguousarray(np.flip(target, axes))
            others = np.ascontiguousarray(np.flip(others, axes))
        return Patch(img, target, info.case.key, lab, geom, flips, seed, int(target.sum()), others)  # type: ignore[arg-type]

    def batch(self, rng: np.random.Generator, size: int) -> list[Patch]:
        return [self.sample(rng) for _ in range(size)]


def patch_rng(seed: int, *stream: int) -> np.random.Generator:
    """The generator of one batch: a pure function of the seed and the stream ids (rank, epoch,
    micro-step ...), so a resumed run draws exactly the patches an uninterrupted one would."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *[int(s) for s in stream]])


def describe_problems(problems: Iterable[Problem]) -> list[str]:
    return [f"{p.severity}: {p}" for p in problems]
