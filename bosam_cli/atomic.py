"""File outputs and hashes. Outputs are atomic: written beside the target, fsynced, then
renamed over it.

A crash or an error leaves either the old file or the new one, never a partial file. An error
removes the temporary file; a hard kill (SIGKILL, power loss) mid-write can leave a hidden
``.<name>.<random>.tmp`` beside the target, which ``remove_stale_temps`` clears (training does so
for its checkpoints when it starts). New files get the usual permissions (0666 minus the umask)
rather than ``mkstemp``'s private 0600.

A command that writes several files (segment's label map, manifest, overlay, meshes ...) wraps
them in ``all_or_nothing()``: each file is finished as its temporary file, and all of them are
renamed over their targets only when the last one is written. A failure part-way (a full disk, a
bad mesh) leaves the previous run's files as they were and removes the folders it created.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


class _Stage:
    """The files finished inside one ``all_or_nothing`` block, and the folders it created."""

    def __init__(self) -> None:
        self.files: list[tuple[Path, Path]] = []  # (temporary file, target), in write order
        self.folders: list[Path] = []  # outermost first
        self.removals: list[Path] = []  # files to remove once the new ones are in place


_STAGE: contextvars.ContextVar[_Stage | None] = contextvars.ContextVar("bosam_stage", default=None)


def make_dirs(folder: str | os.PathLike) -> list[Path]:
    """``mkdir -p``, returning the folders it created (outermost first). Inside
    ``all_or_nothing`` they are removed again, when empty, if the block fails."""
    missing: list[Path] = []
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    missing.reverse()
    stage = _STAGE.get()
    for d in missing:
        d.mkdir(exist_ok=True)
        if stage is not None:
            stage.folders.append(d)
    return missing


@contextlib.contextmanager
def all_or_nothing() -> Iterator[None]:
    """Commit every ``atomic_path`` file of the block together, when the block succeeds.

    Until then each target keeps its old content (read a staged file through ``staged``). On a
    failure the temporary files and the (empty) folders the block created are removed. A nested
    block joins the outer one."""
    if _STAGE.get() is not None:
        yield
        return
    stage = _Stage()
    token = _STAGE.set(stage)
    try:
        yield
    except BaseException:
        _STAGE.reset(token)
        _discard(stage)
        raise
    _STAGE.reset(token)
    try:
        for i, (tmp, path) in enumerate(stage.files):
            os.replace(tmp, path)
    except BaseException:  # a rename refused (rare: the targets' folders were checked when written)
        for tmp, _ in stage.files[i:]:
            tmp.unlink(missing_ok=True)
        raise
    _remove(stage.removals)


def remove_when_committed(paths: "list[Path]") -> None:
    """Remove ``paths`` (files an earlier run wrote, which this one replaces by nothing) when
    the enclosing ``all_or_nothing`` block commits, after its new files are in place; at once
    outside a block. A folder left empty by a removal goes too."""
    stage = _STAGE.get()
    if stage is None:
        _remove(paths)
    else:
        stage.removals.extend(paths)


def _remove(paths: "list[Path]") -> None:
    for p in paths:
        Path(p).unlink(missing_ok=True)
    for folder in {Path(p).parent for p in paths}:
        try:
            folder.rmdir()  # only when empty
        except OSError:
            pass


def _discard(stage: _Stage) -> None:
    for tmp, _ in stage.files:
        tmp.unlink(missing_ok=True)
    for d in reversed(stage.folders):
        try:
            d.rmdir()
        except OSError:  # not empty: something else wrote there meanwhile
            pass


def staged(path: str | os.PathLike) -> Path:
    """Where ``path``'s newest content lies: its temporary file while an ``all_or_nothing`` block
    holds it, else ``path`` itself."""
    path = Path(path)
    stage = _STAGE.get()
    for tmp, target in reversed(stage.files if stage is not None else []):
        if os.path.abspath(target) == os.path.abspath(path):
            return tmp
    return path


def current_umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    except OSError as exc:  # a read-only or full file system: name the output, not the temp file
        raise _naming(exc, path) from exc
    os.close(fd)
    stage = _STAGE.get()
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        if stage is None:
            os.replace(tmp, path)
        else:
            stage.files.append((Path(tmp), path))
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(exc, path) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _naming(exc: OSError, path: Path) -> OSError:
    """``exc`` naming the output ``path`` when it named no file (a write() on a full disk) or the
    hidden temporary file beside it (which the user never asked for)."""
    named = str(exc.filename) if exc.filename is not None else None
    if named is None or Path(named).name.startswith(f".{path.name}."):
        return OSError(exc.errno, exc.strerror or str(exc), str(path))
    return exc


def remove_stale_temps(folder: str | os.PathLike, names: "list[str] | tuple[str, ...]") -> list[Path]:
    """Remove the temporary files that ``atomic_path`` left for ``names`` in ``folder`` when a
    write was killed; returns what was removed. Only for a folder no other writer is using."""
    removed = []
    for name in names:
        for p in Path(folder).glob(f".{name}.*.tmp*"):
            if p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def json_default(o: Any) -> Any:
    """JSON for NumPy scalars and arrays and paths (``json.dumps(default=...)``)."""
    import numpy as np

    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer, np.floating, np.bool_)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Pretty JSON, written atomically."""
    return atomic_write_bytes(path, json.dumps(obj, indent=2, default=json_default).encode() + b"\n")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
