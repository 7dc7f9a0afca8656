"""fp32 ONNX -> mixed-precision ONNX (fp16 compute, fp32 islands, fp32 inputs and outputs).

TensorRT 11 has no ``BuilderFlag.FP16``: a strongly typed network runs each layer in the
type the ONNX gives it, so the precision plan must be in the graph. The plan here:

* heavy ops (MatMul, Gemm, Conv, ConvTranspose) run in fp16, with fp16 weights;
* LayerNormalization, Softmax, every Reduce*, Exp/Log/Pow/Sqrt/Reciprocal stay fp32 (fp16
  overflows in variance and exp sums are the classic failures: NVIDIA/TensorRT #3657);
* the Fourier positional encoding (every float ancestor of a Sin/Cos node: point coordinates,
  their projection by the Gaussian matrix, the 2*pi scaling) stays fp32: its angles reach
  tens of radians, where fp16 steps are ~0.01 rad;
* any other node follows its inputs: fp32 when all its non-constant float inputs are fp32
  (so the small glue between two fp32 ops stays fp32), fp16 otherwise;
* graph inputs and outputs stay float32 (``keep_io_types``), so engines need no changes;
* Cast nodes are inserted only at precision boundaries, one per (tensor, precision).

The result keeps the input's opset and sets ``ir_version`` explicitly (<= 10).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from bosam_cli.errors import EngineError

FP32_OPS = frozenset(
    {
        "LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
        "Softmax", "LogSoftmax",
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceLogSumExp", "ReduceLogSum",
        "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceProd", "CumSum",
        "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "Sin", "Cos", "Range",
    }
)
HEAVY_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum"})
#: ops whose float ancestors stay fp32 (positional encodings)
ANCHOR_OPS = frozenset({"Sin", "Cos"})
#: for these ops only the listed inputs follow the node precision (others have fixed types)
FOLLOW_INPUTS = {"Resize": (0,), "Upsample": (0,)}
FP16_MAX = 65504.0

_FLOAT = 1
_FLOAT16 = 10


def _elem_types(model: Any) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    g = inferred.graph
    types: dict[str, int] = {}
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    return types


def convert_to_mixed_fp16(src: str | Path, dst: str | Path, max_ir_version: int = 10) -> dict[str, Any]:
    """Convert ``src`` (fp32 ONNX) to mixed precision at ``dst`` (may equal src); returns notes."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    if model.functions:
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    graph = model.graph
    for node in graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise EngineError(f"{src}: fp16 conversion does not handle control flow ({node.op_type} {node.name})")

    # Float Constant nodes become initializers, so that constants are converted once, offline.
    inits: dict[str, Any] = {i.name: i for i in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = node.attribute[0].t
            if t.data_type == _FLOAT:
                arr = numpy_helper.to_array(t)
                inits[node.output[0]] = numpy_helper.from_array(arr, node.output[0])
                continue
        nodes.append(node)

    # Build a model copy without those Constant nodes to infer every tensor's type.
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(inits.values())
    types = _elem_types(model)
    for node in nodes:
        for out in node.output:
            if out and out not in types:
                raise EngineError(f"{src}: fp16 conversion cannot infer the type of tensor '{out}' ({node.op_type})")

    def is_float(name: str) -> bool:
        return types.get(name) == _FLOAT

    producer = {out: n for n in nodes for out in n.output if out}
    graph_inputs = {v.name for v in graph.input}

    # fp32 anchors: float ancestors of Sin/Cos
    pe_nodes: set[int] = set()
    stack = [n for n in nodes if n.op_type in ANCHOR_OPS]
    while stack:
        n = stack.pop()
        if id(n) in pe_nodes:
            continue
        pe_nodes.add(id(n))
        for name in n.input:
            if name and is_float(name) and name in producer:
                stack.append(producer[name])

    # Decide each node's precision in topological order.
    prec: dict[str, str] = {name: "fp32" for name in graph_inputs if is_float(name)}
    node_prec: dict[int, str] = {}
    for n in nodes:
        follow = FOLLOW_INPUTS.get(n.op_type, tuple(range(len(n.input))))
        dyn = [n.input[i] for i in follow if i < len(n.input) and n.input[i] and is_float(n.input[i])
               and n.input[i] not in inits]
        if n.op_type in FP32_OPS or id(n) in pe_nodes:
            p = "fp32"
        elif n.op_type in HEAVY_OPS:
            p = "fp16"
        elif not dyn:
            p = "fp32"
        else:
            p = "fp32" if all(prec.get(t) == "fp32" for t in dyn) else "fp16"
        node_prec[id(n)] = p
        for out in n.output:
            if out and is_float(out):
                prec[out] = p

    # Rewrite: fp16 copies of weights, Casts at boundaries, Cast attributes.
    new_nodes: list[Any] = []
    half_inits: dict[str, str] = {}
    casts: dict[tuple[str, str], str] = {}
    stats: Counter[str] = Counter()
    clipped = 0

    def half_init(name: str) -> str:
        nonlocal clipped
        if name not in half_inits:
            arr = numpy_helper.to_array(inits[name]).astype(np.float32)
            over = int((np.abs(arr) > FP16_MAX).sum())
            clipped += over
            arr16 = np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16)
            new_name = f"{name}__fp16"
            inits[new_name] = numpy_helper.from_array(arr16, new_name)
            half_inits[name] = new_name
        return half_inits[name]

    def cast_to(name: str, p: str) -> str:
        key = (name, p)
        if key not in casts:
            out = f"{name}__to_{p}"
            to = onnx.TensorProto.FLOAT16 if p == "fp16" else onnx.TensorProto.FLOAT
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to, name=f"cast_{out}"))
            casts[key] = out
            stats["casts"] += 1
        return casts[key]

    for n in nodes:
        p = node_prec[id(n)]
        stats[f"{p}_nodes"] += 1
        follow = FOLLOW_INPUTS.get(n.op_type, tuple(range(len(n.input))))
        for i in follow:
            if i >= len(n.input):
                continue
            name = n.input[i]
            if not name or not is_float(name):
                continue
            if name in inits:
                if p == "fp16":
                    n.input[i] = half_init(name)
            elif prec.get(name, "fp32") != p:
                n.input[i] = cast_to(name, p)
        if n.op_type == "Cast" and p == "fp16":
            for a in n.attribute:
                if a.name == "to" and a.i == onnx.TensorProto.FLOAT:
                    a.i = onnx.TensorProto.FLOAT16
        if n.op_type in ("ConstantOfShape",) and p == "fp16":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type == _FLOAT:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float16), a.t.name))
        new_nodes.append(n)

    # Outputs stay float32.
    for out in graph.output:
        if prec.get(out.name) == "fp16":
            internal = f"{out.name}__fp16"
            for n in new_nodes:
                for i, name in enumerate(n.output):
                    if name == out.name:
                        n.output[i] = internal
                for i, name in enumerate(n.input):
                    if name == out.name:
                        n.input[i] = internal
            new_nodes.append(helper.make_node("Cast", [internal], [out.name], to=onnx.TensorProto.FLOAT,
                                              name=f"cast_{out.name}_out"))
            stats["casts"] += 1

    used = {name for n in new_nodes for name in n.input}
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(t for name, t in inits.items() if name in used)
    del graph.value_info[:]
    model.ir_version = min(int(model.ir_version), max_ir_version)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    fp32_ops = Counter(n.op_type for n in nodes if node_prec[id(n)] == "fp32")
    return {
        "fp16_nodes": stats["fp16_nodes"],
        "fp32_nodes": stats["fp32_nodes"],
        "casts_inserted": stats["casts"],
        "fp16_initializers": len(half_inits),
        "weights_clipped_to_fp16_range": clipped,
        "fp32_ops": dict(sorted(fp32_ops.items())),
    }
