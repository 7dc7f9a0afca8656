"""A CPU-only "TensorRT readiness" lint for the exported ONNX files (runs in CI, ~1 s).

Checks, for TensorRT 10.x and 11.x:

* ``onnx.checker`` (full check, with strict shape inference);
* opset of the default domain within 9..20 (TensorRT 10.0's parser range; 11.x accepts more)
  and IR version <= 10; no custom-domain ops;
* every op on the onnx-tensorrt operator matrix (``docs/operators.md``, 10.x/11.x, "Y" rows);
* no op that TensorRT handles badly or that signals data-dependent shapes: NonZero, Scatter,
  ScatterND, ScatterElements, Loop, If, Scan, OneHot, Unique, Einsum, Mod, and GatherND whose
  indices are computed at run time; ``Shape``/``Size`` (shape arithmetic) are warnings;
* restrictions from the matrix that this graph family can hit: Slice/Squeeze/Unsqueeze/Reduce
  axes, CumSum axis and TopK K must be build-time constants; Conv/ConvTranspose weights must
  be constants; LayerNormalization only its first output; Resize only nearest/linear with a
  supported coordinate transformation and no antialiasing;
* no float64 or string tensors;
* the only dynamic dimension is the number of points: axis 1 of ``points`` and ``labels``,
  one shared symbol; outputs fully static.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engines.manifest import POINTS_DIM

#: "Y" rows of onnx-tensorrt docs/operators.md for TensorRT 10.x (kept for 11.x, whose
#: parser range is a superset).
TRT_SUPPORTED_OPS = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool
    BatchNormalization BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape
    Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum
    Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
    GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If
    ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual
    Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence
    RMSNormalization RNN RoiAlign RotaryEmbedding Round STFT ScaledTanh Scan Scatter
    ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus
    Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter ThresholdedRelu Tile
    TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)
RISKY_OPS = {
    "NonZero": "data-dependent output shape",
    "Scatter": "in-place scatter (slow, data-dependent)",
    "ScatterND": "in-place scatter (an index_put / slice write in the model)",
    "ScatterElements": "in-place scatter (a boolean-mask write in the model)",
    "Loop": "control flow",
    "If": "control flow",
    "Scan": "control flow",
    "OneHot": "from repeat_interleave; use expand",
    "Unique": "data-dependent output shape; unsupported",
    "Einsum": "generic layer; rewrite as MatMul",
    "Mod": "shape arithmetic from padding code",
    "Attention": "opset-23 Attention is only in recent TensorRT releases",
}
SHAPE_OPS = {"Shape": "shape arithmetic left in the graph", "Size": "shape arithmetic left in the graph"}
CONST_INPUTS = {  # op -> input positions that TensorRT needs as build-time constants
    "Slice": (3,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "CumSum": (1,),
    "TopK": (1,),
    "Conv": (1,),
    "ConvTranspose": (1,),
    **{op: (1,) for op in (
        "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
        "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")},
}
RESIZE_MODES = {"nearest", "linear"}
RESIZE_COORDS = {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"}
OPSET_RANGE = (9, 20)
MAX_IR = 10
MAX_RANK = 8  # nvinfer1::Dims::MAX_DIMS
NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike"}


@dataclass
class ReadinessReport:
    path: str
    opset: int | None = None
    ir_version: int | None = None
    nodes: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)
    dynamic_dims: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    targets: tuple[str, ...] = ("TensorRT 10.x", "TensorRT 11.x")

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self, brief: bool = False) -> dict[str, Any]:
        d = {
            "ok": self.ok,
            "targets": list(self.targets),
            "opset": self.opset,
            "ir_version": self.ir_version,
            "nodes": self.nodes,
            "dynamic_dims": list(self.dynamic_dims),
            "errors": list(self.errors),
            "warnings": list(self.warnings),
        }
        if not brief:
            d["path"] = self.path
            d["op_counts"] = dict(self.op_counts)
        return d


def _dims(v: Any) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in v.type.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            out.append(int(d.dim_value))
        elif d.HasField("dim_param"):
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def check_trt_readiness(onnx_path: str | Path, max_points: int | None = None) -> ReadinessReport:
    """Lint one ONNX file for TensorRT; ``report.ok`` is False when TensorRT would (likely) fail.

    ``max_points`` is informational (the profile's max); the dynamic-dimension rule is that the
    only non-static axis is axis 1 of ``points``/``labels`` (one shared symbol).
    """
    import onnx

    path = Path(onnx_path)
    rep = ReadinessReport(path=str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001 - any checker failure is a readiness error
        rep.errors.append(f"onnx.checker: {str(exc).strip().splitlines()[0][:300]}")
    model = onnx.load(str(path))
    g = model.graph
    rep.ir_version = int(model.ir_version)
    rep.nodes = len(g.node)
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            rep.opset = int(imp.version)
        elif any(n.domain == imp.domain for n in g.node):
            rep.errors.append(f"custom domain '{imp.domain}' ops are not parsed by TensorRT without plugins")
    if rep.opset is None or not OPSET_RANGE[0] <= rep.opset <= OPSET_RANGE[1]:
        rep.errors.append(f"opset {rep.opset} outside TensorRT 10's range {OPSET_RANGE[0]}..{OPSET_RANGE[1]}")
    if rep.ir_version > MAX_IR:
        rep.errors.append(f"IR version {rep.ir_version} > {MAX_IR} (set ir_version explicitly)")

    counts = Counter(n.op_type for n in g.node)
    rep.op_counts = dict(sorted(counts.items()))
    for op, k in sorted(counts.items()):
        if op not in TRT_SUPPORTED_OPS:
            rep.errors.append(f"{op} (x{k}) is not on the onnx-tensorrt operator matrix")
        if op in RISKY_OPS:
            rep.errors.append(f"{op} (x{k}): {RISKY_OPS[op]}")
        if op in SHAPE_OPS:
            rep.warnings.append(f"{op} (x{k}): {SHAPE_OPS[op]}")

    # build-time constants
    static_shape: dict[str, bool] = {}
    types: dict[str, int] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001
        inferred = model
    for v in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
            dims = _dims(v)
            if len(dims) > MAX_RANK:
                rep.errors.append(f"tensor '{v.name}' has {len(dims)} dimensions; TensorRT allows at most {MAX_RANK}")
            static_shape[v.name] = bool(v.type.tensor_type.HasField("shape")) and all(isinstance(d, int) for d in dims)
    const: set[str] = {i.name for i in g.initializer}
    for i in g.initializer:
        types[i.name] = i.data_type
    for n in g.node:
        if n.op_type == "Constant":
            const.update(n.output)
        elif n.op_type in ("Shape", "Size") and n.input and static_shape.get(n.input[0], False):
            const.update(n.output)
        elif n.op_type not in NONDETERMINISTIC and n.input and all((not x) or x in const for x in n.input):
            const.update(o for o in n.output if o)

    for n in g.node:
        label = n.name or n.op_type
        for pos in CONST_INPUTS.get(n.op_type, ()):
            if pos < len(n.input) and n.input[pos] and n.input[pos] not in const:
                rep.errors.append(f"{n.op_type} '{label}': input {pos} must be a build-time constant for TensorRT")
        if n.op_type == "GatherND" and len(n.input) > 1 and n.input[1] not in const:
            rep.errors.append(f"GatherND '{label}': indices computed at run time (data-dependent gather)")
        if n.op_type == "Range" and not all(x in const for x in n.input if x):
            rep.warnings.append(f"Range '{label}': bounds computed at run time")
        if n.op_type == "LayerNormalization" and any(o for o in n.output[1:]):
            used = {x for m in g.node for x in m.input} | {o.name for o in g.output}
            if any(o in used for o in n.output[1:] if o):
                rep.errors.append(f"LayerNormalization '{label}': only the first output is supported")
        if n.op_type == "Resize":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            mode = attrs.get("mode", b"nearest")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            coord = attrs.get("coordinate_transformation_mode", b"half_pixel")
            coord = coord.decode() if isinstance(coord, bytes) else coord
            if mode not in RESIZE_MODES:
                rep.errors.append(f"Resize '{label}': mode {mode!r} (TensorRT: nearest or linear)")
            if coord not in RESIZE_COORDS:
                rep.errors.append(f"Resize '{label}': coordinate_transformation_mode {coord!r}")
            if attrs.get("antialias", 0):
                rep.errors.append(f"Resize '{label}': antialiasing is not supported")

    bad_types = {11: "float64", 8: "string"}
    for name, t in sorted(types.items()):
        if t in bad_types:
            (rep.errors if t == 8 else rep.warnings).append(f"tensor '{name}' is {bad_types[t]}")

    # dynamic dimensions
    symbols: set[str] = set()
    for v in g.input:
        if v.name in const:
            continue
        for axis, d in enumerate(_dims(v)):
            if isinstance(d, int):
                continue
            where = f"input {v.name}[{axis}]={d}"
            if v.name in ("points", "labels") and axis == 1 and isinstance(d, str):
                symbols.add(d)
                rep.dynamic_dims.append(where)
            else:
                rep.errors.append(f"dynamic dimension {where}: only the number of points may be dynamic")
    if len(symbols) > 1:
        rep.errors.append(f"points and labels use different dynamic symbols {sorted(symbols)}; they must share one")
    elif symbols and symbols != {POINTS_DIM}:
        rep.warnings.append(f"the points axis is named {symbols.pop()!r}, not {POINTS_DIM!r}")
    for v in g.output:
        dims = _dims(v)
        if not all(isinstance(d, int) for d in dims):
            rep.errors.append(f"output {v.name} has a dynamic shape {dims}; outputs must be static")
    if max_points is not None and not rep.dynamic_dims:
        rep.warnings.append("the decoder has no dynamic points axis (export specialised N)")
    return rep
