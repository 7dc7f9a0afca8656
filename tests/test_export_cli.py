"""``bosam export`` and ``bosam bench`` through a subprocess, on the tiny preset."""

from __future__ import annotations

import json
import os

import pytest

import engine_fixtures as fx


def _one_error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert lines, "no error message"
    assert lines[-1].startswith("error: "), proc.stderr[-1500:]
    assert "Traceback" not in proc.stderr
    return lines[-1]


def test_export_prints_verification_table(tmp_path_factory):
    proc, out, manifest = fx.fp16_cli_export(tmp_path_factory)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout
    assert "verification" in text and "max abs" in text and "Dice" in text
    assert "encoder" in text and "end-to-end" in text and "N=8, rand. mask, 2 pad" in text
    assert "TensorRT readiness of encoder.onnx: ready" in text
    assert "TensorRT readiness of decoder.onnx: ready" in text
    assert f"wrote {out}" in text.replace("\n", "")
    assert "[torch.onnx]" not in text  # exporter chatter stays off stdout
    assert manifest["precision"] == "fp16" and manifest["verification"]["passed"]
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "manifest.json"]


def test_export_trt_fails_cleanly_here(tmp_path, ckpt):
    from bosam_cli.runtime_info import tensorrt_version

    if tensorrt_version() is not None:
        pytest.skip("TensorRT is installed here; the refusal path is tested in test_trt_fake")
    out = tmp_path / "with-trt"
    proc = fx.run_cli("export", "--checkpoint", str(ckpt), "-o", str(out), "--trt", "--max-points", "4")
    assert proc.returncode != 0
    line = _one_error_line(proc)
    assert "TensorRT" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_argument_errors(tmp_path, ckpt):
    proc = fx.run_cli("export", "--checkpoint", str(ckpt), "-o", str(tmp_path / "x"), "--precision", "int8")
    assert proc.returncode == 2 and "precision" in _one_error_line(proc)
    proc = fx.run_cli("export", "--checkpoint", str(tmp_path / "nope.pth"), "-o", str(tmp_path / "x"))
    assert proc.returncode == 2 and "nope.pth" in _one_error_line(proc)
    assert list(tmp_path.iterdir()) == []


def test_export_defaults_to_the_bundled_model_where_segment_looks(tmp_path):
    """`bosam export` with no checkpoint exports the bundled model (segment's default) into
    engines/<its stem> under the current folder, where `--engine auto` looks; the folder gets
    the usual permissions, not mkdtemp's private 0700."""
    from bosam_cli.atomic import sha256_file
    from bosam_cli.segment import bundled_checkpoint

    bundled = bundled_checkpoint()
    assert bundled is not None
    old = os.umask(0o022)
    try:
        proc = fx.run_cli("export", "--max-points", "2", "--threads", "2", cwd=tmp_path)
    finally:
        os.umask(old)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "engines" / bundled.stem
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["checkpoint_sha256"] == sha256_file(bundled) and manifest["verification"]["passed"]
    assert folder.stat().st_mode & 0o777 == 0o755


def test_bench_json(exported, ckpt):
    out, _ = exported
    proc = fx.run_cli(
        "bench", "--engine", "all", "--checkpoint", str(ckpt), "--engine-dir", str(out),
        "--repeats", "1", "--decoder-repeats", "2", "--threads", "2", "--json",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    engines = [r["engine"] for r in report["results"]]
    assert engines[:2] == ["torch", "onnxruntime"]
    for r in report["results"]:
        assert r["encoder_s"]["n"] == 1 and r["encoder_s"]["median"] > 0
        assert set(r["decoder_ms"]) == {"1", "10"}
        for d in r["decoder_ms"].values():
            assert d["n"] == 2 and 0 < d["min"] <= d["median"]
        assert r["preset"] == "tiny"
    ort = report["results"][1]
    assert ort["details"]["providers"][0] in fx.ort_default_providers() and ort["details"]["threads"] == 2
    if "tensorrt" not in engines:
        (skip,) = report["skipped"]
        assert skip["engine"] == "tensorrt" and "TensorRT" in skip["reason"]
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["threads"] == 2


def test_bench_table_and_explicit_engine_errors(exported, ckpt):
    out, _ = exported
    proc = fx.run_cli(
        "bench", "--engine", "onnxruntime", "--engine-dir", str(out), "--repeats", "1", "--decoder-repeats", "1",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "onnxruntime" in proc.stdout and "click 10 pts" in proc.stdout and "encoder s" in proc.stdout
    from bosam_cli.runtime_info import tensorrt_version

    if tensorrt_version() is None:
        proc = fx.run_cli("bench", "--engine", "tensorrt", "--engine-dir", str(out), "--repeats", "1")
        assert proc.returncode == 2 and "TensorRT" in _one_error_line(proc)
    proc = fx.run_cli("bench", "--engine", "onnxruntime", "--checkpoint", str(ckpt), "--engine-dir", str(out),
                      "--precision", "fp16", "--repeats", "1")
    assert proc.returncode == 2 and "are fp32, not fp16" in _one_error_line(proc)


def test_bench_refuses_an_unknown_engine_and_endless_repeats_in_one_line(exported):
    out, _ = exported
    for flags, text in ((["--engine", "foo"], "--engine must be torch, onnxruntime, tensorrt or all, not 'foo'"),
                        (["--repeats", "100000000"], "--repeats must be 1 .. 1000 and --decoder-repeats 1 .. 10000")):
        proc = fx.run_cli("bench", "--engine-dir", str(out), *flags)
        assert proc.returncode == 2 and _one_error_line(proc) == f"error: {text}", proc.stderr
