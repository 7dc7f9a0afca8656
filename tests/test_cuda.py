"""The CUDA paths on a real GPU: torch engine, segment/demo, bench and training on ``cuda``.

Every test here needs a CUDA GPU and skips with the reason elsewhere (CI has none). What they
pin down: the GPU gives the same answer as the CPU (fp32 up to TF32 rounding; bf16/fp16 up to
their precision), the outputs say which device made them, a GPU training run resumes to the
weights of an uninterrupted one, and an ONNX Runtime without its CUDA provider is refused with
a message instead of silently running on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import engine_fixtures as fx

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def bosam(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "bosam_cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


@pytest.fixture(scope="module")
def window() -> np.ndarray:
    """A phantom window with bone in it (a trained model gives confident logits there)."""
    from bosam_cli.phantom import make_phantom

    ph = make_phantom(3)
    ct = ph.ct.array.astype(np.float32)
    lab = ph.labels.array
    c = np.argwhere(lab > 0).mean(0).astype(int)
    lo = [max(0, min(int(v) - 64, s - 128)) for v, s in zip(c, ct.shape)]
    win = np.full((128, 128, 128), -1000.0, np.float32)
    sub = ct[lo[0]:lo[0] + 128, lo[1]:lo[1] + 128, lo[2]:lo[2] + 128]
    win[:sub.shape[0], :sub.shape[1], :sub.shape[2]] = sub
    win = np.clip(win, -1000, 1000)
    return ((win - win.mean()) / win.std())[None, None].astype(np.float32)


def _engine(device: str, precision: str = "fp32"):
    from bosam_cli.segment import bundled_checkpoint
    from engines.registry import open_engine

    return open_engine("torch", checkpoint=bundled_checkpoint(), device=device, precision=precision)


def _click(eng, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    emb = eng.encode(image)
    pts = np.array([[[64, 64, 64], [40, 70, 60], [0, 0, 0]]], np.float32)
    labs = np.array([[1, 0, -1]], np.int64)
    first, _ = eng.decode(emb, pts[:, :1], labs[:, :1], np.zeros((1, 1, 32, 32, 32), np.float32))
    second, _ = eng.decode(emb, pts, labs, np.asarray(first, np.float32))
    return np.asarray(first, np.float64), np.asarray(second, np.float64)


def test_torch_engine_on_cuda_matches_the_cpu(window):
    cpu, gpu = _engine("cpu"), _engine("cuda")
    assert gpu.info.device.startswith("cuda") and gpu.info.details.get("gpu")
    for a, b in zip(_click(cpu, window), _click(gpu, window)):
        scale = np.abs(a).max()
        assert np.abs(a - b).max() <= 1e-2 * scale, "fp32 on CUDA (TF32 convolutions) drifted from the CPU"
        assert (np.sign(a) == np.sign(b))[np.abs(a) > 1e-2 * scale].all()


def test_a_gpu_index_that_does_not_exist_is_a_clear_error(tmp_path):
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match="CUDA GPU"):
        _engine(missing)
    r = bosam("demo", "-o", str(tmp_path / "demo"), "--device", missing)
    assert r.returncode != 0 and missing in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "demo" / "segmentation.nii.gz").exists()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_cuda_keeps_the_mask(window, precision):
    ref = _click(_engine("cuda"), window)
    got = _click(_engine("cuda", precision), window)
    for a, b in zip(ref, got):
        assert np.isfinite(b).all()
        assert _dice(a > 0, b > 0) >= 0.97
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] >= 0.99


def test_demo_on_cuda_gives_the_cpu_segmentation(tmp_path):
    runs = {}
    for device in ("cpu", "cuda"):
        r = bosam("demo", "-o", str(tmp_path / device), "--device", device, "--json")
        assert r.returncode == 0, r.stderr
        runs[device] = json.loads(r.stdout)
    assert runs["cuda"]["engine"]["device"].startswith("cuda")
    assert runs["cpu"]["engine"]["device"] == "cpu"
    seg = {d: np.asanyarray(nib.load(str(tmp_path / d / "segmentation.nii.gz")).dataobj) for d in runs}
    for obj in runs["cpu"]["objects"]:
        lab = obj["label"]
        assert _dice(seg["cpu"] == lab, seg["cuda"] == lab) >= 0.98, obj["name"]
    assert abs(runs["cpu"]["demo"]["mean_dice"] - runs["cuda"]["demo"]["mean_dice"]) <= 0.01


def test_bench_times_the_torch_engine_on_cuda():
    r = bosam("bench", "--engine", "torch", "--device", "cuda", "--preset", "tiny", "--repeats", "1",
              "--decoder-repeats", "2", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)["results"]
    assert len(res) == 1 and res[0]["device"].startswith("cuda")
    assert res[0]["encoder_s"]["median"] > 0 and res[0]["decoder_ms"]["1"]["median"] > 0


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory) -> Path:
    from bosam_cli.phantom import write_phantom_dataset

    return write_phantom_dataset(tmp_path_factory.mktemp("gpu-train") / "ds", [1, 2], shape=(40, 40, 32),
                                 spacing_mm=(3.0, 3.0, 3.0))


def test_cuda_training_resumes_to_the_uninterrupted_weights(phantom_data, tmp_path):
    common = ["train", "--data", str(phantom_data), "--preset", "tiny", "--device", "cuda", "--epochs", "2",
              "--steps-per-epoch", "2", "--clicks", "3", "--min-fg-mm3", "500", "--workers", "0", "--no-tensorboard"]
    r = bosam(*common, "--out", str(tmp_path / "whole"))
    assert r.returncode == 0, r.stderr
    r = bosam(*common, "--out", str(tmp_path / "split"), "--stop-after-steps", "3")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "split" / "final.pth").exists()
    r = bosam(*common, "--out", str(tmp_path / "split"), "--resume")
    assert r.returncode == 0, r.stderr
    whole = torch.load(tmp_path / "whole" / "final.pth", map_location="cpu", weights_only=True)
    split = torch.load(tmp_path / "split" / "final.pth", map_location="cpu", weights_only=True)
    assert whole["bosam"]["training"]["precision"] == "fp16"  # auto on CUDA: fp16 + GradScaler
    assert whole["bosam"]["training"]["click_sim_on"] == "device"  # auto on CUDA: clicks_torch
    worst = 0.0
    for k, v in whole["model_state_dict"].items():
        if v.is_floating_point():
            worst = max(worst, (v - split["model_state_dict"][k]).abs().max().item())
    # cuDNN's weight gradients are not bitwise reproducible; the runs must agree to rounding
    assert worst <= 1e-4, worst


def test_click_simulation_on_cuda_follows_the_cpu_rules():
    """clicks_torch on the GPU (what bosam train uses there): the same depths as on the CPU, and
    clicks that obey the simulators' rules."""
    from scipy import ndimage

    from bosam_cli.clicks_torch import erosion_depth, interior_clicks, uniform_clicks

    rng = np.random.default_rng(0)
    gt = ndimage.gaussian_filter(rng.standard_normal((3, 64, 64, 64)), (0, 4, 4, 4)) > 0.02
    pred = ndimage.gaussian_filter(rng.standard_normal((3, 64, 64, 64)), (0, 4, 4, 4)) > 0.02
    g, p = torch.from_numpy(gt).cuda(), torch.from_numpy(pred).cuda()
    for m in (g & ~p, p & ~g):
        assert torch.equal(erosion_depth(m).cpu(), erosion_depth(m.cpu()))
    gen = torch.Generator(device="cuda").manual_seed(0)
    for sim in (uniform_clicks, interior_clicks):
        pts, labs = sim(p, g, gen)
        assert pts.is_cuda and labs.is_cuda
        for b in range(3):
            i, j, k = (int(v) for v in pts[b, 0].cpu())
            assert gt[b, i, j, k] != pred[b, i, j, k] and int(labs[b, 0]) == int(gt[b, i, j, k])


def test_onnxruntime_without_its_cuda_provider_is_refused_on_cuda(tmp_path_factory):
    import onnxruntime as ort

    from bosam_cli.errors import EngineError
    from engines.registry import open_engine

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here: the CUDA provider exists")
    out, _ = fx.tiny_export(tmp_path_factory)
    with pytest.raises(EngineError, match="onnxruntime-gpu"):
        open_engine("onnxruntime", checkpoint=fx.tiny_checkpoint(tmp_path_factory), engine_dir=out, device="cuda")


def test_torchrun_with_more_processes_than_gpus_is_a_clear_error(phantom_data, tmp_path):
    import socket

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has a GPU for each of the two processes")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "bosam_cli", "train", "--data", str(phantom_data), "--out",
           str(tmp_path / "ddp"), "--preset", "tiny", "--epochs", "1", "--steps-per-epoch", "2", "--clicks", "2",
           "--workers", "0", "--no-tensorboard"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode != 0
    assert "torchrun started 2 processes" in res.stderr and "--device cpu" in res.stderr
    assert not (tmp_path / "ddp" / "last.pth").exists()
