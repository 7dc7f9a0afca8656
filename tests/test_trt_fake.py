"""The TensorRT path against a fake ``tensorrt`` module (no GPU, no TensorRT needed).

The fake records what the builder is asked (network flags, optimisation profiles, timing
cache, workspace) and serialises a "plan" as JSON describing the ONNX I/O; its runtime
executes plans with the torch model on CPU tensors, so ``TrtEngine``'s buffer, shape and
address plumbing runs for real. The API names follow the TensorRT 10/11 Python API.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import engine_fixtures as fx
from bosam_cli.errors import EngineError

# --------------------------------------------------------------------------------------------
# the fake module


class _Enum:
    def __init__(self, name: str, value: int) -> None:
        self.name, self.value = name, value

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"DataType.{self.name}"


class FakeTRT(types.ModuleType):
    """A stand-in for ``tensorrt``; ``calls`` records every builder-side request."""

    def __init__(self, version: str = "10.99.0", strongly_typed_member: bool = True) -> None:
        super().__init__("tensorrt")
        self.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # torch.export probes it
        self.__version__ = version
        self.calls: list[tuple] = []
        self.fail_parse: str | None = None
        self.fail_build = False
        self.fail_deserialize = False
        self.builder_raises: Exception | None = None
        self.runtime_raises: Exception | None = None
        self.current_device = 0  # the CUDA device current in the thread (see device_scope)
        self.kernels: dict[str, object] = {}
        self.memory = None
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level=None):
                self.level = level

        class NetworkDefinitionCreationFlag:
            pass

        if strongly_typed_member:
            NetworkDefinitionCreationFlag.STRONGLY_TYPED = _Enum("STRONGLY_TYPED", 1)

        class MemoryPoolType:
            WORKSPACE = _Enum("WORKSPACE", 0)

        class TensorIOMode:
            INPUT = _Enum("INPUT", 1)
            OUTPUT = _Enum("OUTPUT", 2)

        class DataType:
            FLOAT = _Enum("FLOAT", 0)
            HALF = _Enum("HALF", 1)
            INT32 = _Enum("INT32", 3)
            INT64 = _Enum("INT64", 12)
            BOOL = _Enum("BOOL", 4)

        onnx_to_trt = {1: "FLOAT", 10: "HALF", 6: "INT32", 7: "INT64", 9: "BOOL"}

        class Tensor:
            def __init__(self, name, shape, dtype):
                self.name, self.shape, self.dtype = name, shape, dtype

        class Network:
            def __init__(self, flags):
                self.flags = flags
                self.inputs: list[Tensor] = []
                self.outputs: list[Tensor] = []
                self.source = None

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class ParserError:
            def __init__(self, text):
                self.text = text

            def desc(self):
                return self.text

        class OnnxParser:
            def __init__(self, network, logger):
                self.network = network
                self.errors: list[ParserError] = []

            def parse_from_file(self, path):
                import onnx

                fake.calls.append(("parse", Path(path).name))
                if fake.fail_parse:
                    self.errors = [ParserError(fake.fail_parse), ParserError("second error")]
                    return False
                model = onnx.load(path, load_external_data=False)

                def tensors(values):
                    out = []
                    for v in values:
                        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
                        out.append(Tensor(v.name, dims, onnx_to_trt[v.type.tensor_type.elem_type]))
                    return out

                self.network.inputs = tensors(model.graph.input)
                self.network.outputs = tensors(model.graph.output)
                self.network.source = Path(path).stem
                return True

            @property
            def num_errors(self):
                return len(self.errors)

            def get_error(self, i):
                return self.errors[i]

        class TimingCache:
            def __init__(self, data: bytes):
                self.data = bytes(data)

            def serialize(self):
                return self.data + b"entry;"

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, min, opt, max):  # noqa: A002 - TensorRT's keyword names
                self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

        class Config:
            def __init__(self):
                self.cache = None
                self.profiles: list[Profile] = []

            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", pool.name, size))

            def clear_flag(self, flag):
                fake.calls.append(("clear_flag", flag.name))

            def create_timing_cache(self, data):
                fake.calls.append(("create_timing_cache", bytes(data)))
                return TimingCache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("set_timing_cache", ignore_mismatch))
                self.cache = cache
                return True

            def get_timing_cache(self):
                return self.cache

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)
                fake.calls.append(("profile", dict(profile.shapes)))
                return len(self.profiles) - 1

        class Builder:
            def __init__(self, logger):
                if fake.builder_raises is not None:
                    raise fake.builder_raises
                fake.calls.append(("builder", fake.current_device))

            def create_network(self, flags=0):
                fake.calls.append(("create_network", flags))
                return Network(flags)

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                if fake.fail_build:
                    return None
                plan = {
                    "source": network.source,
                    "flags": network.flags,
                    "io": [(t.name, "in", t.dtype, list(t.shape)) for t in network.inputs]
                    + [(t.name, "out", t.dtype, list(t.shape)) for t in network.outputs],
                    "profiles": [{k: [list(s) for s in v] for k, v in p.shapes.items()} for p in config.profiles],
                }
                return json.dumps(plan).encode()

        class Context:
            def __init__(self, engine):
                self.engine = engine
                self.shapes = {n: tuple(s) for n, (_, _, s) in engine.io.items()}
                self.addresses = {}

            def set_input_shape(self, name, shape):
                fake.calls.append(("set_input_shape", name, tuple(shape)))
                lo, _, hi = self.engine.profile[name]
                if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)):
                    return False
                self.shapes[name] = tuple(shape)
                return True

            def set_tensor_address(self, name, ptr):
                self.addresses[name] = ptr

            def execute_async_v3(self, stream):
                import torch

                views = {}
                for name, (mode, _, _) in self.engine.io.items():
                    shape = self.shapes[name]
                    assert -1 not in shape, f"{name}: shape not set"
                    base = fake.memory.by_ptr[self.addresses[name]]
                    views[name] = base.reshape(-1)[: int(np.prod(shape))].view(shape)
                ins = {k: v for k, v in views.items() if self.engine.io[k][0] == "in"}
                outs = fake.kernels[self.engine.source](**ins)
                with torch.no_grad():
                    for name, value in outs.items():
                        views[name].copy_(value)
                return True

        class Engine:
            def __init__(self, plan):
                self.source = plan["source"]
                self.io = {n: (m, t, s) for n, m, t, s in plan["io"]}
                self.names = [n for n, *_ in plan["io"]]
                self.profile = {k: tuple(tuple(x) for x in v) for k, v in (plan["profiles"] or [{}])[0].items()}

            @property
            def num_io_tensors(self):
                return len(self.names)

            def get_tensor_name(self, i):
                return self.names[i]

            def get_tensor_mode(self, name):
                return TensorIOMode.INPUT if self.io[name][0] == "in" else TensorIOMode.OUTPUT

            def get_tensor_dtype(self, name):
                return getattr(DataType, self.io[name][1])

            def get_tensor_shape(self, name):
                return tuple(self.io[name][2])

            def create_execution_context(self):
                return Context(self)

        class Runtime:
            def __init__(self, logger):
                if fake.runtime_raises is not None:  # pybind11: a factory returning nullptr raises
                    raise fake.runtime_raises
                fake.calls.append(("runtime", fake.current_device))

            def deserialize_cuda_engine(self, data):
                if fake.fail_deserialize:
                    return None
                fake.calls.append(("deserialize", fake.current_device))
                return Engine(json.loads(bytes(data)))

        for obj in (Logger, NetworkDefinitionCreationFlag, MemoryPoolType, TensorIOMode, DataType, OnnxParser,
                    Builder, Runtime):
            setattr(self, obj.__name__, obj)

    def of(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind]


class CpuMemory:
    """Stand-in for the torch CUDA memory of TrtEngine: CPU tensors, indexed by address."""

    name = "cuda:0"
    gpu_name = "Fake GPU"
    stream_handle = 0

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.by_ptr: dict[int, object] = {}

    def empty(self, shape, dtype):
        t = self.torch.empty(shape, dtype=getattr(self.torch, dtype))
        self.by_ptr[t.data_ptr()] = t
        return t

    def copy_in(self, dst, arr):
        dst.copy_(self.torch.from_numpy(np.ascontiguousarray(arr)).to(dst.dtype))

    def to_numpy(self, t):
        return t.float().numpy().copy()

    @staticmethod
    def ptr(t):
        return t.data_ptr()

    def on_stream(self):
        return contextlib.nullcontext()

    def synchronize(self):
        pass


GPU = {"index": 0, "name": "Fake GPU 9000", "compute_capability": "8.9"}


@pytest.fixture
def fake_trt(monkeypatch, tmp_path, folder):  # folder first: export before the fake is installed
    import export.trt_build as tb

    fake = FakeTRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tb, "cuda_device", lambda index=0: dict(GPU, index=index))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return fake


@pytest.fixture
def folder(tmp_path, tmp_path_factory):
    """A fresh copy of the tiny fp32 export (ONNX files linked, manifest copied)."""
    src, _ = fx.tiny_export(tmp_path_factory)
    dst = tmp_path / "engines" / "tiny"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".onnx":
            (dst / f.name).symlink_to(f)
        else:
            shutil.copyfile(f, dst / f.name)
    return dst


# --------------------------------------------------------------------------------------------
# building


def test_build_clears_tf32_where_tensorrt_has_the_flag(fake_trt, folder):
    """TensorRT 10 runs fp32 layers in TF32 by default (logits ~3e-4 off torch, over the
    contract tolerance); every build clears the flag. A TensorRT without BuilderFlag.TF32 is
    left alone (the default fake has no BuilderFlag at all)."""
    from export import build_trt_engines

    man = build_trt_engines(folder)
    assert fake_trt.of("clear_flag") == []
    assert [p["tf32_cleared"] for p in man["tensorrt"]["plans"].values()] == [False, False]
    fake_trt.BuilderFlag = types.SimpleNamespace(TF32=_Enum("TF32", 7))
    man = build_trt_engines(folder)
    assert [c[1] for c in fake_trt.of("clear_flag")] == ["TF32", "TF32"]  # encoder and decoder
    assert [p["tf32_cleared"] for p in man["tensorrt"]["plans"].values()] == [True, True]


def test_build_profile_flags_cache_and_manifest(fake_trt, folder, tmp_path):
    from export import build_trt_engines
    from export.trt_build import default_timing_cache

    man = build_trt_engines(folder, workspace_gib=2)
    # strongly typed networks, no precision builder flags anywhere
    assert [c[1] for c in fake_trt.of("create_network")] == [1 << 1, 1 << 1]
    assert not hasattr(fake_trt, "BuilderFlag")
    assert ("workspace", "WORKSPACE", 2 << 30) in fake_trt.calls
    # one profile, decoder only, on both dynamic inputs: min 1, opt 5, max 16
    (profile,) = [c[1] for c in fake_trt.of("profile")]
    assert profile == {
        "points": ((1, 1, 3), (1, 5, 3), (1, fx.MAX_POINTS, 3)),
        "labels": ((1, 1), (1, 5), (1, fx.MAX_POINTS)),
    }
    assert [c[1] for c in fake_trt.of("parse")] == ["encoder.onnx", "decoder.onnx"]
    # the plans and the manifest
    assert (folder / "encoder.plan").is_file() and (folder / "decoder.plan").is_file()
    on_disk = json.loads((folder / "manifest.json").read_text())
    trt = on_disk["tensorrt"]
    assert trt["version"] == "10.99.0" and trt["gpu"] == GPU["name"] and trt["compute_capability"] == "8.9"
    assert trt["strongly_typed"] and trt["max_points"] == fx.MAX_POINTS and trt["opt_points"] == 5
    assert on_disk["versions"]["tensorrt"] == "10.99.0" and man["tensorrt"] == trt
    assert trt["plans"]["decoder.plan"]["profile"]["points"]["max"] == [1, fx.MAX_POINTS, 3]
    assert trt["plans"]["encoder.plan"]["profile"] == {}
    # timing cache: keyed by TensorRT version and GPU, written after each build, reused next time
    cache = Path(trt["timing_cache"])
    assert cache == default_timing_cache("10.99.0", GPU) and cache.is_relative_to(tmp_path / "cache")
    assert "trt10.99.0" in cache.name and "fake-gpu-9000" in cache.name and "sm89" in cache.name
    assert cache.read_bytes() == b"entry;entry;"
    first = [c[1] for c in fake_trt.of("create_timing_cache")]
    assert first == [b"", b"entry;"]  # the decoder build already reads the encoder's cache
    assert all(c[1] is False for c in fake_trt.of("set_timing_cache"))
    fake_trt.calls.clear()
    man = build_trt_engines(folder, max_points=8, opt_points=12)
    assert [c[1] for c in fake_trt.of("create_timing_cache")] == [b"entry;entry;", b"entry;entry;entry;"]
    assert man["tensorrt"]["plans"]["encoder.plan"]["timing_cache_reused"] is True
    (profile,) = [c[1] for c in fake_trt.of("profile")]
    assert profile["points"] == ((1, 1, 3), (1, 8, 3), (1, 8, 3))  # opt clipped to max


def test_tensorrt_11_without_the_flag_member(monkeypatch, folder):
    import export.trt_build as tb

    fake = FakeTRT(version="11.4.0", strongly_typed_member=False)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(tb, "cuda_device", lambda index=0: GPU)
    man = tb.build_trt_engines(folder, timing_cache=folder / "t.cache")
    assert [c[1] for c in fake.of("create_network")] == [0, 0]  # 11.x: strongly typed is the only mode
    assert man["tensorrt"]["version"] == "11.4.0" and (folder / "t.cache").is_file()


def test_build_errors_are_one_line(fake_trt, folder):
    from export import build_trt_engines

    fake_trt.fail_parse = "In node 12 (Foo): UNSUPPORTED_NODE: No importer registered for op: Foo"
    with pytest.raises(EngineError, match=r"parser rejected encoder.onnx: In node 12 .*Foo \(\+1 more\)") as e:
        build_trt_engines(folder)
    assert "\n" not in str(e.value)
    assert not (folder / "encoder.plan").exists()
    fake_trt.fail_parse = None
    fake_trt.fail_build = True
    with pytest.raises(EngineError, match="failed to build an engine from encoder.onnx"):
        build_trt_engines(folder)
    fake_trt.fail_build = False
    fake_trt.builder_raises = RuntimeError("CUDA initialization failure with error: 35")
    with pytest.raises(EngineError, match="could not create a builder.*error: 35"):
        build_trt_engines(folder)
    fake_trt.builder_raises = None
    with pytest.raises(EngineError, match="exceeds the 16"):
        build_trt_engines(folder, max_points=64)
    assert json.loads((folder / "manifest.json").read_text())["tensorrt"] is None


def test_build_refuses_unready_onnx(fake_trt, folder):
    import onnx

    from export import build_trt_engines

    model = onnx.load(str(folder / "decoder.onnx"))
    model.graph.node[0].op_type = "NonZero"
    (folder / "decoder.onnx").unlink()
    onnx.save(model, str(folder / "decoder.onnx"))
    with pytest.raises(EngineError, match="decoder.onnx is not TensorRT-ready"):
        build_trt_engines(folder)
    assert fake_trt.of("parse") == []


def test_missing_tensorrt_or_gpu(monkeypatch, tmp_path, folder):
    import export.trt_build as tb
    from export import build_trt_engines

    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    with pytest.raises(EngineError, match="TensorRT is not installed") as e:
        build_trt_engines(folder)
    assert "\n" not in str(e.value)

    class Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path=None, target=None):
            return importlib.machinery.ModuleSpec(name, self) if name == "tensorrt" else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise OSError("libnvinfer.so.10: cannot open shared object file: No such file or directory")

    monkeypatch.delitem(sys.modules, "tensorrt")
    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    with pytest.raises(EngineError, match="libraries do not load.*libnvinfer"):
        build_trt_engines(folder)

    import torch

    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, Broken)])
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTRT())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(EngineError, match="no CUDA GPU"):
        build_trt_engines(folder)
    assert not (folder / "encoder.plan").exists()
    with pytest.raises(EngineError, match="no CUDA GPU"):
        tb.check_trt_prerequisites()


# --------------------------------------------------------------------------------------------
# the engine on the fake runtime


@pytest.fixture
def trt_engine(fake_trt, folder, tmp_path_factory):
    import torch

    from engines.trt_engine import TrtEngine
    from export import build_trt_engines

    model = fx.tiny_model(tmp_path_factory)

    def encoder(image):
        with torch.no_grad():
            return {"embedding": model.image_encoder(image)}

    def decoder(embedding, points, labels, mask_prompt):
        with torch.no_grad():
            lo, io = model.decode(embedding, points, labels, mask_prompt)
        return {"low_res_logits": lo, "iou": io}

    build_trt_engines(folder)
    fake_trt.kernels = {"encoder": encoder, "decoder": decoder}
    fake_trt.memory = CpuMemory()
    return TrtEngine(folder, memory=fake_trt.memory), model


def test_trt_engine_runs_plans(trt_engine, fake_trt):
    import torch

    eng, model = trt_engine
    assert eng.info.name == "tensorrt" and eng.info.details["built_for_gpu"] == GPU["name"]
    assert eng.info.details["tensorrt"] == "10.99.0" and eng.max_points == fx.MAX_POINTS
    image = np.random.default_rng(3).standard_normal((1, 1, 128, 128, 128)).astype(np.float32)
    emb = eng.encode(image)
    assert emb.engine == "tensorrt" and emb.shape == (1, 192, 8, 8, 8)
    assert isinstance(emb.data, torch.Tensor) and emb.data.data_ptr() in fake_trt.memory.by_ptr  # stays "on device"
    with torch.no_grad():
        ref_emb = model.image_encoder(torch.from_numpy(image))
    mask = np.zeros((1, 1, 32, 32, 32), np.float32)
    for n in (1, 3, fx.MAX_POINTS):
        points = np.random.default_rng(n).random((1, n, 3)).astype(np.float32) * 127
        labels = np.ones((1, n), np.int64)
        lo, io = eng.decode(emb, points, labels, mask)
        assert ("set_input_shape", "points", (1, n, 3)) in fake_trt.calls
        assert ("set_input_shape", "labels", (1, n)) in fake_trt.calls
        with torch.no_grad():
            rl, ri = model.decode(ref_emb, torch.from_numpy(points), torch.from_numpy(labels), torch.from_numpy(mask))
        np.testing.assert_allclose(lo, rl.numpy(), atol=1e-5)
        np.testing.assert_allclose(io, ri.numpy(), atol=1e-5)
        assert lo.dtype == np.float32 and lo.shape == (1, 1, 32, 32, 32)
    with pytest.raises(ValueError, match="exceed the 16"):
        eng.decode(emb, np.zeros((1, 17, 3), np.float32), np.ones((1, 17), np.int64), mask)
    from engines.base import Embedding

    with pytest.raises(ValueError, match="not from this TensorRT engine"):
        eng.decode(Embedding(np.zeros((1, 192, 8, 8, 8), np.float32), (1, 192, 8, 8, 8), "onnxruntime"),
                   np.zeros((1, 1, 3), np.float32), np.ones((1, 1), np.int64), mask)


def test_trt_engine_refusals(fake_trt, folder):
    from engines.trt_engine import TrtEngine
    from export import build_trt_engines

    with pytest.raises(EngineError, match="no TensorRT plans here"):
        TrtEngine(folder, memory=CpuMemory())
    build_trt_engines(folder)
    fake_trt.fail_deserialize = True
    with pytest.raises(EngineError, match=r"cannot load this plan .*Fake GPU 9000, sm 8.9.*rebuild"):
        TrtEngine(folder, memory=CpuMemory())
    fake_trt.fail_deserialize = False
    fake_trt.runtime_raises = TypeError("pybind11::init(): factory function returned nullptr")
    with pytest.raises(EngineError, match="TensorRT could not create a runtime .*nullptr"):
        TrtEngine(folder, memory=CpuMemory())
    fake_trt.runtime_raises = None
    (folder / "decoder.plan").unlink()
    with pytest.raises(EngineError, match="decoder.plan: missing"):
        TrtEngine(folder, memory=CpuMemory())


def test_a_plan_from_another_build_is_refused(fake_trt, folder):
    """The plans are checked against the size and sha256 the build recorded in the manifest."""
    from bosam_cli.atomic import sha256_file
    from engines.trt_engine import TrtEngine
    from export import build_trt_engines

    man = build_trt_engines(folder)
    for name in ("encoder.plan", "decoder.plan"):
        rec = man["tensorrt"]["plans"][name]
        assert rec["sha256"] == sha256_file(folder / name) and rec["bytes"] == (folder / name).stat().st_size
    plan = (folder / "decoder.plan").read_bytes()
    other = bytearray(plan)
    other[len(other) // 2] ^= 1
    (folder / "decoder.plan").write_bytes(bytes(other))  # same size, other bytes
    with pytest.raises(EngineError, match=r"decoder.plan: does not match the engine's manifest \(sha256 "):
        TrtEngine(folder, memory=CpuMemory())
    (folder / "decoder.plan").write_bytes(plan + b" ")
    with pytest.raises(EngineError, match=r"decoder.plan: does not match the engine's manifest \(\d+ bytes"):
        TrtEngine(folder, memory=CpuMemory())


def test_engines_are_deserialised_with_their_device_current(fake_trt, folder, monkeypatch):
    """TensorRT binds an engine to the CUDA device current when it is built or deserialised:
    with device 1 asked for, the builders, the runtime and both plans are made while device 1
    is current."""
    import contextlib

    import export.trt_build as tb
    from engines.trt_engine import TrtEngine
    from export import build_trt_engines

    @contextlib.contextmanager
    def scope(index):
        before, fake_trt.current_device = fake_trt.current_device, index
        try:
            yield
        finally:
            fake_trt.current_device = before

    monkeypatch.setattr(tb, "cuda_device_scope", scope)
    build_trt_engines(folder, device=1)
    assert [c for c in fake_trt.calls if c[0] == "builder"] == [("builder", 1), ("builder", 1)]
    fake_trt.calls.clear()
    TrtEngine(folder, device=1, memory=CpuMemory())
    assert [c for c in fake_trt.calls if c[0] in ("runtime", "deserialize")] == [
        ("runtime", 1), ("deserialize", 1), ("deserialize", 1)]
    assert fake_trt.current_device == 0


def test_auto_skips_tensorrt_without_gpu(fake_trt, folder, monkeypatch):
    import torch

    from engines.registry import open_engine
    from export import build_trt_engines

    build_trt_engines(folder)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    eng = open_engine("auto", engine_dir=folder)
    assert eng.info.name == "onnxruntime"
    assert any("tensorrt:" in n and "no CUDA GPU" in n for n in eng.info.details["auto"])


def test_manifest_versions_name_tensorrt_without_importing_it(tmp_path):
    """Every manifest records the TensorRT version; importing tensorrt for that loads its CUDA
    libraries (seconds, and warnings on a machine without a GPU). The installed distribution's
    metadata is read instead."""
    site = tmp_path / "site"
    (site / "tensorrt").mkdir(parents=True)
    (site / "tensorrt" / "__init__.py").write_text("raise SystemExit('tensorrt was imported')\n")
    info = site / "tensorrt_cu13-10.14.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: tensorrt-cu13\nVersion: 10.14.1\n")
    code = ("import sys; from bosam_cli.runtime_info import versions; v = versions(with_torch=False); "
            "print(v['tensorrt'], 'tensorrt' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(fx.REPO)])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["10.14.1", "False"]


def test_tensorrt_engine_refuses_a_cuda_index_past_the_last_gpu(monkeypatch):
    """'--engine tensorrt --device cuda:3' on a one-GPU machine: one line, not torch's traceback."""
    import torch

    from engines.trt_engine import _TorchCudaMemory

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(EngineError, match=r"CUDA device 3 does not exist \(1 visible\)"):
        _TorchCudaMemory(3)
