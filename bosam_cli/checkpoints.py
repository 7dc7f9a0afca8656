"""Safe loading and saving of SAM-Med3D / SAM-Med3D-turbo / BoSAM / BoSAM-LoRA / bosam checkpoints.

Nothing here executes pickled code: ``.pth`` files go through ``torch.load(weights_only=True)``
with an allow-list of the plain classes those files legitimately hold (``argparse.Namespace``
of the training arguments, paths, NumPy scalars); safetensors files hold no code at all.
Every accepted layout becomes one plain 324-key SAM-Med3D state dict before it meets a model.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from . import __version__
from .atomic import atomic_write_bytes, sha256_file
from .errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors", ".st")
STATE_DICT_CONTAINER_KEYS = ("model_state_dict", "state_dict", "model")


@dataclass
class Checkpoint:
    """A checkpoint read from disk, normalised to the plain SAM-Med3D layout."""

    path: Path
    sha256: str
    #: how the weights were stored: state-dict, training-checkpoint, bosam, bosam-lora, safetensors
    layout: str
    state_dict: dict[str, torch.Tensor]
    #: bosam metadata (plain types) when the file carries it, else {}
    metadata: dict[str, Any] = field(default_factory=dict)
    #: other top-level entries of a training checkpoint (names only; never used for loading)
    extra_keys: list[str] = field(default_factory=list)
    #: notes on conversions applied (prefix stripped, LoRA merged ...)
    notes: list[str] = field(default_factory=list)
    #: the raw training container (optimizer, scheduler ... states) when asked for
    container: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------
# reading


def _allowed_globals() -> list[Any]:
    """Plain classes that published training checkpoints pickle beside their weights."""
    import argparse
    import pathlib

    allowed: list[Any] = [argparse.Namespace, pathlib.PurePosixPath, pathlib.PureWindowsPath]
    # A concrete path of the other OS cannot be instantiated here ("cannot instantiate
    # 'WindowsPath' on your system"): its pure twin stands in. Python 3.13 pickles paths as
    # pathlib._local.*; older Pythons as pathlib.*.
    posix = pathlib.PurePosixPath if os.name == "nt" else pathlib.PosixPath
    windows = pathlib.WindowsPath if os.name == "nt" else pathlib.PureWindowsPath
    for mod in ("pathlib", "pathlib._local"):
        allowed += [(posix, f"{mod}.PosixPath"), (windows, f"{mod}.WindowsPath"),
                    (pathlib.PurePosixPath, f"{mod}.PurePosixPath"), (pathlib.PureWindowsPath, f"{mod}.PureWindowsPath")]
    try:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        scalar = core.multiarray.scalar
        reconstruct = core.multiarray._reconstruct
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed.append((scalar, f"{mod}.scalar"))
            allowed.append((reconstruct, f"{mod}._reconstruct"))
        allowed += [np.dtype, np.ndarray]
        allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    except Exception:  # pragma: no cover - numpy is a dependency
        pass
    return allowed


_UNSAFE_GLOBAL = re.compile(r"GLOBAL\s+([\w\.]+)", re.IGNORECASE)


def _torch_load(path: Path) -> Any:
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise CheckpointError(f"{path}: file is empty, not a checkpoint")
    try:
        # torch warns (two lines) about old pickle protocols; the outcome is reported in one line
        with warnings.catch_warnings(), torch.serialization.safe_globals(_allowed_globals()):
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
        text = str(exc)
        if "Weights only load failed" in text and "Unsupported operand" not in text:
            m = _UNSAFE_GLOBAL.search(text)
            what = m.group(1) if m else "an object outside the allow-list"
            raise CheckpointError(
                f"{path}: refused: the file needs '{what}', which is not plain data; bosam never "
                "executes pickled code (re-save only the model_state_dict, or use safetensors)"
            ) from None
        if magic == b"PK\x03\x04":
            first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first})") from None
        raise CheckpointError(f"{path}: not a PyTorch or safetensors checkpoint") from None


def _is_safetensors(path: Path) -> bool:
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < (1 << 30) and head[8:9] == b"{"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        tensors = load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors file ({exc})") from None
    meta: dict[str, Any] = {}
    if "bosam" in raw_meta:
        try:
            meta = json.loads(raw_meta["bosam"])
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: safetensors metadata 'bosam' is not valid JSON") from None
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path}: safetensors metadata 'bosam' is a JSON {type(meta).__name__}, not an object")
    return tensors, meta


def _all_tensors(d: Mapping[str, Any]) -> bool:
    return bool(d) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _strip_prefix(sd: dict[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], bool]:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix) :]: v for k, v in sd.items()}, True
    return sd, False


def _merge_bosam_lora(sd: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """BoSAM ``LoRA_Sam3D`` state dict -> plain state dict with the q/v deltas merged."""
    from .model.lora import merge_qkv_delta

    base = {k[len("sam.") :]: v for k, v in sd.items() if k.startswith("sam.")}
    w_as = {int(k.split(".")[1]): v for k, v in sd.items() if re.fullmatch(r"w_As\.\d+\.weight", k)}
    w_bs = {int(k.split(".")[1]): v for k, v in sd.items() if re.fullmatch(r"w_Bs\.\d+\.weight", k)}
    out: dict[str, torch.Tensor] = {}
    blocks = set()
    for key, value in base.items():
        if ".attn.qkv.linear_" in key:
            continue
        if ".attn.qkv.qkv." in key:
            blocks.add(int(key.split("blocks.")[1].split(".")[0]))
            key = key.replace(".attn.qkv.qkv.", ".attn.qkv.")
        out[key] = value
    for i in sorted(blocks):
        pre = f"image_encoder.blocks.{i}.attn.qkv"

        def pick(branch: str, ab: str, idx: int) -> torch.Tensor:
            own = base.get(f"{pre}.linear_{ab}_{branch}.weight")
            listed = (w_as if ab == "a" else w_bs).get(idx)
            if own is not None and listed is not None and not torch.equal(own, listed):
                raise CheckpointError(
                    f"{path}: LoRA tensors of block {i} ({branch}) differ between "
                    f"'sam.{pre}.linear_{ab}_{branch}' and 'w_{ab.upper()}s.{idx}'"
                )
            t = own if own is not None else listed
            if t is None:
                raise CheckpointError(f"{path}: LoRA layout without the {ab.upper()} tensor of block {i} ({branch})")
            return t

        out[f"{pre}.weight"] = merge_qkv_delta(
            out[f"{pre}.weight"],
            pick("q", "a", 2 * i),
            pick("q", "b", 2 * i),
            pick("v", "a", 2 * i + 1),
            pick("v", "b", 2 * i + 1),
        )
    return out


def _merge_bosam_lora_ours(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A live bosam LoRA model's state dict (``attn.qkv.qkv`` + ``linear_*``) -> plain."""
    return _merge_bosam_lora({f"sam.{k}": v for k, v in sd.items()}, Path("<state dict>"))


def normalise_state_dict(sd: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Strip wrappers and merge LoRA; returns (plain state dict, layout, notes)."""
    notes: list[str] = []
    sd = dict(sd)
    for prefix in ("module.", "_orig_mod.", "module."):  # DDP, torch.compile, or both (either order)
        sd, stripped = _strip_prefix(sd, prefix)
        if stripped:
            notes.append(f"stripped '{prefix}' prefix")
    if sd and all(re.fullmatch(r"w_[AB]s\.\d+\.weight", k) for k in sd):
        raise CheckpointError(f"{path}: holds only LoRA adapters ({len(sd)} w_As/w_Bs tensors) and no base model; "
                              "load the full LoRA checkpoint BoSAM's training saved (its 'sam.' weights with them)")
    # BoSAM's LoRA_Sam3D: the wrapped model under 'sam.', its A/B tensors in w_As/w_Bs lists and/or
    # inside the wrapped qkv modules; ours: the wrapped qkv modules without the 'sam.' prefix
    lora_sam = any(k.startswith("sam.") for k in sd) and (
        any(k.startswith(("w_As.", "w_Bs.")) for k in sd) or any(k.startswith("sam.") and ".attn.qkv.qkv." in k for k in sd))
    if not (lora_sam or any(".attn.qkv.qkv." in k for k in sd)):
        return sd, "state-dict", notes
    try:
        merged = _merge_bosam_lora(sd, path) if lora_sam else _merge_bosam_lora_ours(sd)
    except KeyError as exc:
        raise CheckpointError(f"{path}: LoRA layout without its base weight {exc}") from None
    except RuntimeError as exc:  # A and B of mismatched ranks or shapes
        raise CheckpointError(f"{path}: LoRA tensors do not fit together ({str(exc).splitlines()[0]})") from None
    notes.append("merged BoSAM LoRA deltas into qkv" if lora_sam else "merged LoRA deltas into qkv")
    return merged, "bosam-lora", notes


def read_checkpoint(path: str | os.PathLike, keep_container: bool = False) -> Checkpoint:
    """Read any supported checkpoint file without executing code; weights normalised."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():  # /dev/zero or a pipe: hashing it never ended
        raise CheckpointError(f"{path}: not a regular file (a device or a pipe), not a checkpoint file")
    digest = sha256_file(path)
    metadata: dict[str, Any] = {}
    extra: list[str] = []
    container: dict[str, Any] | None = None
    if _is_safetensors(path):
        raw, metadata = _read_safetensors(path)
        layout = "safetensors"
    else:
        obj = _torch_load(path)
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict or checkpoint dict")
        if _all_tensors(obj):
            raw, layout = dict(obj), "state-dict"
        else:
            inner_key = next((k for k in STATE_DICT_CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner_key is None:
                raise CheckpointError(
                    f"{path}: no weights found: expected a state dict or a dict with 'model_state_dict' "
                    f"(top-level keys: {', '.join(map(str, list(obj)[:8]))})"
                )
            raw = dict(obj[inner_key])
            if not raw:
                raise CheckpointError(f"{path}: '{inner_key}' is empty: the file holds no weights")
            if not _all_tensors(raw):
                raise CheckpointError(f"{path}: '{inner_key}' holds non-tensor entries")
            layout = "training-checkpoint"
            extra = [str(k) for k in obj if k != inner_key]
            meta = obj.get("bosam")
            if isinstance(meta, Mapping):
                metadata = dict(meta)
                layout = "bosam"
            if keep_container:
                container = dict(obj)
    sd, inner_layout, notes = normalise_state_dict(raw, path)
    if inner_layout == "bosam-lora":
        layout = "bosam-lora"
    return Checkpoint(path, digest, layout, sd, metadata, extra, notes, container)


# --------------------------------------------------------------------------------------------
# matching a state dict to a model


def _shape_map(sd: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def describe_mismatch(expected: Mapping[str, tuple[int, ...]], got: Mapping[str, tuple[int, ...]]) -> str:
    """'N missing (a, b, ...), M unexpected (...), K shape conflicts (key: file [..] vs model [..])'."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    conflicts = [k for k in expected if k in got and tuple(expected[k]) != tuple(got[k])]

    def few(keys: list[str]) -> str:
        head = ", ".join(keys[:4])
        return head + (", ..." if len(keys) > 4 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({few(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({few(unexpected)})")
    if conflicts:
        items = [f"{k}: file {list(got[k])} vs model {list(expected[k])}" for k in conflicts[:3]]
        parts.append(f"{len(conflicts)} shape conflicts ({'; '.join(items)}{', ...' if len(conflicts) > 3 else ''})")
    return ", ".join(parts)


def _preset_shapes(name: str) -> dict[str, tuple[int, ...]]:
    from .model import build_preset

    with torch.device("meta"):
        model = build_preset(name)
    return _shape_map(model.state_dict())


def detect_preset(sd: Mapping[str, torch.Tensor], path: Path | str = "<state dict>") -> str:
    """Name of the preset whose keys and shapes equal the state dict's exactly."""
    from .model import PRESETS

    got = _shape_map(sd)
    best: tuple[int, str, str] | None = None
    for name in PRESETS:
        expected = _preset_shapes(name)
        if expected == got:
            return name
        diff = describe_mismatch(expected, got)
        score = sum(1 for k in expected if k in got and expected[k] == got[k])
        if best is None or score > best[0]:
            best = (score, name, diff)
    assert best is not None
    raise CheckpointError(f"{path}: weights fit no known model; closest is preset '{best[1]}': {best[2]}")


def load_state_dict_strict(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], path: Path | str) -> None:
    """Strict load with an error that lists missing, unexpected and mis-shaped keys."""
    expected = _shape_map(model.state_dict())
    got = _shape_map(sd)
    if expected != got:
        preset = getattr(model, "preset", None) or "model"
        raise CheckpointError(f"{path}: weights do not fit preset '{preset}': {describe_mismatch(expected, got)}")
    model.load_state_dict(sd, strict=True)


def load_model(
    path: str | os.PathLike | None = None,
    preset: str | None = None,
    device: str | torch.device = "cpu",
    checkpoint: Checkpoint | None = None,
):
    """Build a Sam3D in eval mode: from a checkpoint (preset detected from shapes unless given)
    or, without a path, randomly initialised (preset default ``sam-med3d``)."""
    from .model import build_from_arch, build_preset

    if checkpoint is None and path is not None:
        checkpoint = read_checkpoint(path)
    if checkpoint is None:
        model = build_preset(preset or "sam-med3d")
    else:
        meta = checkpoint.metadata
        if preset is None and isinstance(meta.get("arch"), Mapping):
            try:
                model = build_from_arch(dict(meta["arch"]), preset=meta.get("preset"))
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"{checkpoint.path}: metadata 'arch' is not a valid architecture ({exc})") from None
        else:
            name = preset or detect_preset(checkpoint.state_dict, checkpoint.path)
            model = build_preset(name)
        load_state_dict_strict(model, checkpoint.state_dict, checkpoint.path)
        model.checkpoint_sha256 = checkpoint.sha256
        model.checkpoint_path = str(checkpoint.path)
        model.checkpoint_metadata = dict(checkpoint.metadata)
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# saving


def _check_plain(value: Any, where: str) -> None:
    if value is None or isinstance(value, (str, bool, int, float)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"metadata key {where}.{k!r} is not a string")
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(f"metadata {where} is a {type(value).__name__}; only plain types are stored")


def model_metadata(model, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Plain-types metadata describing a model: preset, architecture, bosam version."""
    meta: dict[str, Any] = dict(getattr(model, "checkpoint_metadata", {}) or {})
    meta.update(
        format="bosam-checkpoint/1",
        bosam_version=__version__,
        preset=getattr(model, "preset", None),
        arch=dict(getattr(model, "arch", {}) or {}),
    )
    if extra:
        meta.update(extra)
    _check_plain(meta, "bosam")
    return json.loads(json.dumps(meta))  # tuples -> lists


def save_checkpoint(
    model,
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint in the SAM-Med3D layout (``model_state_dict``, plain keys, LoRA merged)
    plus a plain-types ``bosam`` metadata dict, atomically. ``.safetensors`` paths get safetensors.

    ``extra`` holds further top-level entries (optimizer state ...) for ``.pth`` files.
    """
    from .model.lora import plain_state_dict

    path = Path(path)
    meta = model_metadata(model, metadata)
    _check_plain(meta, "bosam")
    sd = {k: v.detach().cpu().contiguous() for k, v in plain_state_dict(model).items()}
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        from safetensors.torch import save

        atomic_write_bytes(path, save(sd, metadata={"bosam": json.dumps(meta)}))
        return path
    payload: dict[str, Any] = {"model_state_dict": sd, "bosam": meta}
    for k, v in (extra or {}).items():
        if k in payload:
            raise ValueError(f"extra entry {k!r} would overwrite {k!r}")
        payload[k] = v
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


def count_parameters(sd: Mapping[str, torch.Tensor], buffers: Iterable[str] = ()) -> int:
    skip = set(buffers)
    return int(sum(v.numel() for k, v in sd.items() if k not in skip))
