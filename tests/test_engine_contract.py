"""One contract, every engine available here: torch always, ONNX Runtime CPU on an exported
tiny model, TensorRT when TensorRT and a CUDA GPU are present (skipped with the reason otherwise).

Each engine must match the torch model run directly (fp32 tolerance of the export check),
take N = 1, 3, 10 points, ignore the coordinates of -1 padding points, use the mask prompt
(feeding back the previous logits changes the answer), keep an embedding usable across clicks,
and refuse bad shapes and foreign embeddings with ValueError.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import engine_fixtures as fx
from engines.base import Embedding

ENGINES = ["torch", "onnxruntime-cpu", "tensorrt"]


def _trt_skip_reason() -> str | None:
    from bosam_cli.runtime_info import tensorrt_version

    if tensorrt_version() is None:
        return "TensorRT is not installed here"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU here"
    return None


@pytest.fixture(scope="module")
def ref_model(tmp_path_factory):
    return fx.tiny_model(tmp_path_factory)


@pytest.fixture(scope="module", params=ENGINES)
def engine(request, tmp_path_factory):
    kind = request.param
    ckpt = fx.tiny_checkpoint(tmp_path_factory)
    if kind == "torch":
        from engines.torch_engine import TorchEngine

        return TorchEngine(fx.tiny_model(tmp_path_factory), device="cpu")
    out, _ = fx.tiny_export(tmp_path_factory)
    from engines.registry import open_engine

    if kind == "onnxruntime-cpu":
        return open_engine("onnxruntime", checkpoint=ckpt, engine_dir=out, device="cpu", threads=2)
    reason = _trt_skip_reason()
    if reason:
        pytest.skip(reason)
    from export import build_trt_engines

    trt_dir = tmp_path_factory.mktemp("trt") / "tiny-trt"
    shutil.copytree(out, trt_dir)
    build_trt_engines(trt_dir)
    return open_engine("tensorrt", checkpoint=ckpt, engine_dir=trt_dir)


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(7).standard_normal((1, 1, 128, 128, 128)).astype(np.float32)


@pytest.fixture(scope="module")
def encoded(engine, image):
    return engine.encode(image)


@pytest.fixture(scope="module")
def ref_embedding(ref_model, image):
    import torch

    with torch.inference_mode():
        return ref_model.image_encoder(torch.from_numpy(image))


def _ref_decode(model, emb, points, labels, mask):
    import torch

    with torch.inference_mode():
        lo, io = model.decode(emb, torch.from_numpy(points), torch.from_numpy(labels), torch.from_numpy(mask))
    return lo.numpy(), io.numpy()


def _clicks(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    points = (rng.random((1, n, 3)) * 127).astype(np.float32)
    labels = np.ones((1, n), np.int64)
    labels[0, 1::2] = 0
    return points, labels


def _close(got, ref, precision="fp32"):
    scale = float(np.abs(ref).max())
    tol = (1e-4 + 1e-4 * scale) if precision == "fp32" else (2e-2 + 2e-2 * scale)
    diff = float(np.abs(got - ref).max())
    assert diff <= tol, f"max abs difference {diff:.3g} > {tol:.3g}"


ZERO = np.zeros((1, 1, 32, 32, 32), np.float32)


def test_encode_shape(engine, encoded):
    assert isinstance(encoded, Embedding)
    assert tuple(encoded.shape) == (1, 192, 8, 8, 8)
    assert encoded.engine == engine.info.name
    info = engine.info
    assert (info.img_size, info.mask_size, tuple(info.embed_shape)) == (128, 32, (192, 8, 8, 8))
    assert info.preset == "tiny" and info.precision == "fp32"
    assert set(info.as_dict()) >= {"engine", "device", "precision", "checkpoint_sha256"}


@pytest.mark.parametrize("n", [1, 3, 10])
def test_decode_matches_torch(engine, encoded, ref_model, ref_embedding, n):
    points, labels = _clicks(n, seed=n)
    logits, iou = engine.decode(encoded, points, labels, ZERO)
    assert logits.shape == (1, 1, 32, 32, 32) and logits.dtype == np.float32
    assert iou.shape == (1, 1) and iou.dtype == np.float32
    ref_lo, ref_io = _ref_decode(ref_model, ref_embedding, points, labels, ZERO)
    _close(logits, ref_lo, engine.info.precision)
    _close(iou, ref_io, engine.info.precision)


def test_padding_points_are_ignored(engine, encoded, ref_model, ref_embedding):
    points, labels = _clicks(3, seed=3)
    labels[0, 2] = -1
    a, _ = engine.decode(encoded, points, labels, ZERO)
    moved = points.copy()
    moved[0, 2] = [5.0, 100.0, 60.0]
    b, _ = engine.decode(encoded, moved, labels, ZERO)
    np.testing.assert_allclose(a, b, atol=1e-5)
    ref_lo, _ = _ref_decode(ref_model, ref_embedding, points, labels, ZERO)
    _close(a, ref_lo, engine.info.precision)
    # but a padding point is not the same as no point (the transformer sees one more token)
    c, _ = engine.decode(encoded, points[:, :2], labels[:, :2], ZERO)
    assert np.abs(a - c).max() > 0


def test_mask_prompt_feedback_changes_result(engine, encoded, ref_model, ref_embedding):
    points, labels = _clicks(2, seed=11)
    first, _ = engine.decode(encoded, points, labels, ZERO)
    second, _ = engine.decode(encoded, points, labels, first)
    assert np.abs(second - first).max() > 1e-3
    ref_lo, _ = _ref_decode(ref_model, ref_embedding, points, labels, first)
    _close(second, ref_lo, engine.info.precision)
    # labels given as int32 are accepted too
    again, _ = engine.decode(encoded, points, labels.astype(np.int32), ZERO)
    np.testing.assert_allclose(again, first, atol=1e-5)


def test_embedding_survives_many_clicks(engine, encoded):
    points, labels = _clicks(1, seed=5)
    first, _ = engine.decode(encoded, points, labels, ZERO)
    for n in (4, 7, 2):
        engine.decode(encoded, *_clicks(n, seed=n), ZERO)
    again, _ = engine.decode(encoded, points, labels, ZERO)
    np.testing.assert_allclose(again, first, atol=1e-6)


def test_bad_inputs_raise(engine, encoded):
    points, labels = _clicks(2)
    bad = [
        lambda: engine.encode(np.zeros((1, 1, 64, 64, 64), np.float32)),
        lambda: engine.encode(np.zeros((128, 128, 128), np.float32)),
        lambda: engine.decode(encoded, np.zeros((1, 0, 3), np.float32), np.zeros((1, 0), np.int64), ZERO),
        lambda: engine.decode(encoded, np.zeros((2, 1, 3), np.float32), np.ones((2, 1), np.int64), ZERO),
        lambda: engine.decode(encoded, np.zeros((1, 2, 2), np.float32), labels, ZERO),
        lambda: engine.decode(encoded, points, np.ones((1, 3), np.int64), ZERO),
        lambda: engine.decode(encoded, points, np.array([[1, 2]]), ZERO),
        lambda: engine.decode(encoded, points, labels, np.zeros((1, 1, 16, 16, 16), np.float32)),
        lambda: engine.decode(Embedding(None, (1, 192, 8, 8, 8), "someone-else"), points, labels, ZERO),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(ValueError):
            call()
            pytest.fail(f"bad input #{i} was accepted")
