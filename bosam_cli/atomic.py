"""File outputs and hashes. Outputs are atomic: written beside the target, fsynced, then
renamed over it.

A crash or an error leaves either the old file or the new one, never a partial file. An error
removes the temporary file; a hard kill (SIGKILL, power loss) mid-write can leave a hidden
``.<name>.<random>.tmp`` beside the target, which ``remove_stale_temps`` clears (training does so
for its checkpoints when it starts). New files get the usual permissions (0666 minus the umask)
rather than ``mkstemp``'s private 0600.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


def current_umask() -> int:
    """The process's umask (read by setting and restoring it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
