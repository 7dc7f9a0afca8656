"""Engine folders are checked when opened: each engine file against the size and sha256 its
manifest records, every manifest field a runtime or segment uses, a folder of random weights
warned about, clicks beyond the engine's point limit reported, and export's scratch folder
never named in an error. Real exports (the shared tiny one, one random-init CLI export) and
real ONNX Runtime throughout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import engine_fixtures as fx
from bosam_cli.errors import EngineError


def _copy(src: Path, dst: Path, manifest_changes: dict | None = None, meta_changes: dict | None = None) -> Path:
    """A copy of an engine folder (ONNX files hard-linked, or copied when they are to be edited)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".onnx":
            os.link(f, dst / f.name)
        elif f.is_file():
            shutil.copyfile(f, dst / f.name)
    man = json.loads((dst / "manifest.json").read_text())
    man.update(manifest_changes or {})
    for key, value in (meta_changes or {}).items():  # dotted keys inside model_metadata
        node = man.setdefault("model_metadata", {})
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    (dst / "manifest.json").write_text(json.dumps(man))
    return dst


@pytest.fixture(scope="module")
def ct(tmp_path_factory) -> Path:
    """A 40^3 CT at 1 mm: air around a soft-tissue block holding a bone cube."""
    arr = np.full((40, 40, 40), -1000, np.int16)
    arr[5:35, 5:35, 5:35] = 40
    arr[14:26, 14:26, 14:26] = 900
    path = tmp_path_factory.mktemp("ct") / "ct40.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), str(path))
    return path


def _prompt(path: Path, clicks: list[list[int]]) -> Path:
    path.write_text(json.dumps({"coordinate_system": "voxel", "objects": [
        {"label": 1, "name": "cube", "clicks": [{"xyz": c, "positive": True} for c in clicks]}]}))
    return path


# ---------------------------------------------------------------------------------------------
# H1: the engine files are the manifest's


def test_export_records_each_engine_files_size_and_sha256(exported):
    from bosam_cli.atomic import sha256_file

    out, _ = exported
    man = json.loads((out / "manifest.json").read_text())
    for name, key in (("encoder.onnx", "encoder"), ("decoder.onnx", "decoder")):
        assert man[key]["sha256"] == sha256_file(out / name) and man[key]["bytes"] == (out / name).stat().st_size


def test_an_onnx_file_from_another_export_is_refused(tmp_path, monkeypatch, exported, ckpt):
    """An encoder.onnx or decoder.onnx that is not the one exported with the manifest is
    refused naming the file, whether its size differs or only its bytes (one weight changed)."""
    import onnx
    from onnx import numpy_helper

    from engines.registry import open_engine

    out, _ = exported
    # same size, other weights: only the sha256 tells
    same_size = _copy(out, tmp_path / "same_size")
    (same_size / "encoder.onnx").unlink()
    model = onnx.load(str(out / "encoder.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += 1.0
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, str(same_size / "encoder.onnx"))
    assert (same_size / "encoder.onnx").stat().st_size == (out / "encoder.onnx").stat().st_size
    for kind in ("onnxruntime", "auto"):
        with pytest.raises(EngineError, match=r"same_size/encoder\.onnx: does not match the engine's manifest \(sha256 "
                                              r"[0-9a-f]{12}\.\.\..*export again") as e:
            open_engine(kind, checkpoint=ckpt, engine_dir=same_size, device="cpu", threads=1)
        assert "\n" not in str(e.value)
    # the other graph in place of the decoder: another size
    swapped = _copy(out, tmp_path / "swapped")
    (swapped / "decoder.onnx").unlink()
    shutil.copyfile(out / "encoder.onnx", swapped / "decoder.onnx")
    with pytest.raises(EngineError, match=r"swapped/decoder\.onnx: does not match the engine's manifest \(\d+ bytes"):
        open_engine("onnxruntime", engine_dir=swapped, device="cpu", threads=1)
    # the default folder that --engine auto finds under the working directory is checked too
    monkeypatch.chdir(tmp_path)
    default = _copy(same_size, tmp_path / "engines" / ckpt.stem)
    with pytest.raises(EngineError, match=f"{default.name}/encoder.onnx: does not match"):
        open_engine("auto", checkpoint=ckpt, device="cpu", threads=1)
    # the untouched folder opens
    eng = open_engine("onnxruntime", checkpoint=ckpt, engine_dir=_copy(out, tmp_path / "good"), device="cpu", threads=1)
    assert eng.info.name == "onnxruntime"


def test_a_manifest_without_file_records_is_refused(tmp_path, exported):
    """Every export of this bosam version records the files; a manifest without the records (the
    version check passes only manifests of this version) is refused, not trusted."""
    from engines.registry import open_engine

    out, man = exported
    enc = dict(man["encoder"])
    del enc["sha256"]
    folder = _copy(out, tmp_path / "nosha", {"encoder": enc})
    with pytest.raises(EngineError, match=r"nosha/manifest.json: encoder.sha256: expected the sha256 of encoder.onnx"):
        open_engine("onnxruntime", engine_dir=folder, device="cpu")


# ---------------------------------------------------------------------------------------------
# H3, M9, L1: manifest fields are checked when read


@pytest.mark.parametrize("changes, meta, message", [
    ({"img_size": 64}, None, r"img_size: 64 does not fit encoder.onnx, whose 'image' has shape \[1, 1, 128, 128, 128\]"),
    ({"mask_size": 16}, None, r"mask_size: 16 does not fit decoder.onnx"),
    ({"embed_shape": [1, 384, 8, 8, 8]}, None, r"embed_shape: \[1, 384, 8, 8, 8\] does not fit encoder.onnx"),
    ({"max_points": "many"}, None, r"max_points: expected the decoder's point limit .*got \"many\""),
    ({"max_points": 0}, None, r"max_points: expected .*got 0"),
    ({"precision": None}, None, r"precision: expected fp32 or fp16, got null"),
    ({"img_size": True}, None, r"img_size: expected .*got true"),
    (None, {"click_memory": "bogus"}, r"model_metadata.click_memory: expected newest or all, got \"bogus\""),
    (None, {"spacing_mm": "nan"}, r"model_metadata.spacing_mm: expected a window spacing in \(0, 50\] mm, got \"nan\""),
    (None, {"spacing_mm": -1.5}, r"model_metadata.spacing_mm: expected .*got -1.5"),
    (None, {"intensity.clamp_hu": [1000, -1000]},
     r"model_metadata.intensity.clamp_hu: expected \[low, high\] HU with low < high.*got \[1000, -1000\]"),
    (None, {"intensity.clamp_hu": [-1000]}, r"model_metadata.intensity.clamp_hu: expected .*got \[-1000\]"),
])
def test_bad_manifest_fields_are_one_line_errors(tmp_path, exported, changes, meta, message):
    from engines.registry import open_engine

    out, _ = exported
    folder = _copy(out, tmp_path / "eng", changes, meta)
    with pytest.raises(EngineError, match=message) as e:
        open_engine("onnxruntime", engine_dir=folder, device="cpu", threads=1)
    assert type(e.value).__name__ == "ManifestError"
    text = str(e.value)
    assert text.startswith(f"{folder / 'manifest.json'}: ") and "\n" not in text and "export again" in text


def test_a_manifest_without_precision_names_the_field(tmp_path, exported):
    from engines.registry import open_engine

    out, man = exported
    folder = _copy(out, tmp_path / "noprec")
    on_disk = json.loads((folder / "manifest.json").read_text())
    del on_disk["precision"]
    (folder / "manifest.json").write_text(json.dumps(on_disk))
    with pytest.raises(EngineError, match=r"manifest.json: precision: expected fp32 or fp16, it is missing"):
        open_engine("onnxruntime", engine_dir=folder, device="cpu")


def test_a_bad_manifest_is_one_line_and_exit_2_from_segment(tmp_path, exported, ct):
    out, _ = exported
    folder = _copy(out, tmp_path / "eng", None, {"intensity.clamp_hu": [1000, -1000]})
    r = fx.run_cli("segment", str(ct), "-p", str(_prompt(tmp_path / "p.json", [[20, 20, 20]])), "-o",
                   str(tmp_path / "o.nii.gz"), "--engine", "onnxruntime", "--engine-dir", str(folder), "--threads", "1")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"error: {folder / 'manifest.json'}: model_metadata.intensity.clamp_hu: expected "
                                "[low, high] HU with low < high, or null (no clamp), got [1000, -1000]; export again "
                                "(bosam export)")
    assert not (tmp_path / "o.nii.gz").exists()


def test_manifest_limits_are_segments_own():
    from bosam_cli.segment import MAX_SPACING_MM
    from bosam_cli.session import CLICK_MEMORIES
    from engines import manifest

    assert manifest.CLICK_MEMORIES == CLICK_MEMORIES and manifest.MAX_SPACING_MM == MAX_SPACING_MM


# ---------------------------------------------------------------------------------------------
# M8: clicks beyond the engine's point limit are reported


def test_clicks_beyond_the_engines_point_limit_are_a_warning(tmp_path, exported, ct):
    """With click memory "all", an object with more clicks than the engine's max_points gets only
    the newest max_points per decoder call: the manifest says so, and how to raise the limit."""
    out, _ = exported
    folder = _copy(out, tmp_path / "eng", {"max_points": 2}, {"click_memory": "all"})
    clicks = [[20, 20, 20], [18, 20, 20], [20, 22, 20], [21, 19, 20]]
    r = fx.run_cli("segment", str(ct), "-p", str(_prompt(tmp_path / "p.json", clicks)), "-o", str(tmp_path / "o.nii.gz"),
                   "--engine", "onnxruntime", "--engine-dir", str(folder), "--threads", "1")
    assert r.returncode == 0, r.stderr
    man = json.loads((tmp_path / "o.json").read_text())
    assert man["model_window"]["click_memory"] == "all"
    (warning,) = [w for w in man["warnings"] if "points per decoder call" in w]
    assert warning.startswith("object 1 (cube): 4 clicks, but the engine takes at most 2 points per decoder call: "
                              "up to 2 older click(s) were left out")
    assert "bosam export --max-points N" in warning and "points per decoder call" in r.stdout + r.stderr
    # within the limit: no such warning
    r = fx.run_cli("segment", str(ct), "-p", str(_prompt(tmp_path / "p2.json", clicks[:2])), "-o",
                   str(tmp_path / "o2.nii.gz"), "--engine", "onnxruntime", "--engine-dir", str(folder), "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert not [w for w in json.loads((tmp_path / "o2.json").read_text())["warnings"] if "decoder call" in w]


# ---------------------------------------------------------------------------------------------
# H2: a folder exported from random weights is warned about


def test_a_random_weights_engine_is_warned_about(tmp_path, ct, exported):
    """bosam export --preset without --checkpoint exports random weights (for tests and
    benchmarks); segmenting with that folder and no -c (which would refuse it) warns, printed
    and in the manifest. An in-memory model's export (no checkpoint file either) says that."""
    eng_dir = tmp_path / "rand"
    r = fx.run_cli("export", "--preset", "tiny", "-o", str(eng_dir), "--max-points", "2", "--threads", "2")
    assert r.returncode == 0, r.stderr
    man = json.loads((eng_dir / "manifest.json").read_text())
    assert man["checkpoint_sha256"] is None
    r = fx.run_cli("segment", str(ct), "-p", str(_prompt(tmp_path / "p.json", [[20, 20, 20]])), "-o",
                   str(tmp_path / "o.nii.gz"), "--engine", "onnxruntime", "--engine-dir", str(eng_dir), "--threads", "1")
    assert r.returncode == 0, r.stderr
    (warning,) = [w for w in json.loads((tmp_path / "o.json").read_text())["warnings"] if "randomly initialised" in w]
    assert warning.startswith(f"{eng_dir}: exported from a randomly initialised 'tiny' model") and "meaningless" in warning
    assert "randomly initialised 'tiny' model" in r.stdout + r.stderr
    # interactive: printed before the session starts
    r = subprocess.run([sys.executable, "-m", "bosam_cli", "segment", str(ct), "-i", "--coords", "voxel", "-o",
                        str(tmp_path / "i.nii.gz"), "--engine", "onnxruntime", "--engine-dir", str(eng_dir),
                        "--threads", "1"], input="quit\n", capture_output=True, text=True, timeout=300)
    assert "randomly initialised 'tiny' model" in r.stderr, r.stderr
    assert man["random_init"] is True
    # a checkpoint's export: no warning; an in-memory model's: its own words
    from engines.manifest import engine_warnings
    from engines.registry import open_engine

    out, _ = exported
    assert engine_warnings(open_engine("onnxruntime", engine_dir=out, device="cpu")) == []
    held = _copy(out, tmp_path / "held", {"checkpoint_sha256": None, "random_init": False})
    (w,) = engine_warnings(open_engine("onnxruntime", engine_dir=held, device="cpu"))
    assert "a model held in memory" in w


# ---------------------------------------------------------------------------------------------
# L1: export never names its scratch folder


def test_export_names_its_target_not_its_scratch_folder(tmp_path, tiny_model):
    """mkdtemp of the scratch folder beside the target fails (here: the target's parent is a
    file; a read-only disk does the same): the error names the target, and nothing is left."""
    from export import export_onnx

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(EngineError) as e:
        export_onnx(tiny_model, blocker / "eng", max_points=2)
    assert str(e.value).startswith(f"{blocker / 'eng'}: cannot write the engine folder (") and ".tmp-" not in str(e.value)


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -rm to mount a read-only tmpfs")
def test_export_to_a_read_only_disk_names_the_target(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    script = (f"mount -t tmpfs -o ro tmpfs {ro} && exec {sys.executable} -m bosam_cli export --preset tiny "
              f"-o {ro / 'eng'} --max-points 2 --threads 1")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300, cwd=fx.REPO,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: {ro / 'eng'}: cannot write the engine folder (Read-only file system)"
