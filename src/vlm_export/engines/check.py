"""TensorRT compatibility of a build, checked without TensorRT.

TensorRT cannot be installed on the development and CI machines, so a graph meant for TensorRT is
never parsed by it before a user's GPU run. This walks every graph of a build (and the Triton
configs the ``tensorrt`` repository target renders for it) and checks them against the documented
constraints of the TensorRT version the user targets, reporting every violation with its node and
rule. A build that violates nothing may still fail on TensorRT: the report says so; only a build on
a GPU can show that it builds.

Where each rule comes from (the tables below are a compact reading of these, not copies):

* ``opset``, ``op-support``, ``op-dtype``: the ONNX-TensorRT parser's operator support list,
  ``docs/operators.md`` of onnx/onnx-tensorrt (tags 10.0-GA and 10.1-GA: opset 9 to 20; the 10.15
  release: opset 9 to 24), its changelog for what each release added, and the parser source
  (``onnxOpImporters.cpp``, 10.1-GA) for what it asserts.
* ``qdq-*``: the same list (``DequantizeLinear``: INT8, FP8, INT4 (+FP4 from 10.8), "x_zero_point
  must be zero"), the TensorRT 10 developer guide, "Working with Quantized Types" / quantization
  schemes ("symmetric"; "INT4 quantization requires per-block scales. The supported block sizes are
  {64, 128}. The block dimension should be one of the last two dimensions"; INT4 is weight-only),
  the Quantize/Dequantize operator pages ("the scale tensor must be a build-time constant"; block
  quantization "supported for DataType::kINT4 only"), the parser's own asserts ("Scale coefficients
  must all be positive", "Quantization to INT4 is not supported for tensors with an odd last
  dimension", "Only a single blocking dimension is allowed"), and NVIDIA/TensorRT#3360 with
  onnx/onnx-tensorrt#850 (INT32 DequantizeLinear - a bias quantized to int32 - is rejected).
* ``profile-*``: TensorRT's optimization-profile contract (every dynamic input dim in every
  profile, 0 <= min <= opt <= max, fixed dims as built).
* ``triton-*``: Triton's model_config.proto (``ModelInstanceGroup.profile``: "If not specified, the
  server will select the first optimization profile by default") and the tensorrt backend's rules
  for ``platform: tensorrt_plan``, GPU instances and ``max_batch_size`` (a batch dim that is the
  first dim of every input and output, dynamic in the plan).

Data types: the parser's per-op type column lists what is supported and tested, yet TensorRT 10
computes INT32/INT64 natively in layers the column lists as float-only (its Cumulative layer takes
int64, where the CumSum row says FP32/FP16/BF16), so ints are not reported against that column;
types TensorRT has no representation for, quantized types (INT8/FP8/INT4/FP4, "available only
through quantization") and UINT8 ("only supported as network input or output") outside the ops
that list them are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import BuildError

# ---------------------------------------------------------------------------------------------
# What each TensorRT version documents (onnx/onnx-tensorrt docs/operators.md, grouped by the
# types each op lists; an op absent here is "N" or unknown to that parser)

_F = "FP32 FP16 BF16"
_FI = _F + " INT32 INT64"
_FIB = _FI + " BOOL"


def _table(*groups: tuple[str, str]) -> dict[str, frozenset[str]]:
    return {op: frozenset(types.split()) for types, ops in groups for op in ops.split()}


_OPS_10_0 = _table(
    (_F, "Acos Acosh Asin Asinh Atan Atanh AveragePool BatchNormalization Ceil Celu Clip Conv ConvTranspose "
         "Cos Cosh CumSum Dropout Einsum Elu Erf Exp Floor Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool "
         "GroupNormalization GRU HardSigmoid HardSwish Hardmax ImageScaler InstanceNormalization IsInf "
         "LayerNormalization LeakyRelu Log LogSoftmax LRN LSTM LpNormalization LpPool MatMul MaxPool "
         "MeanVarianceNormalization ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike "
         "RandomUniform RandomUniformLike Reciprocal Resize RNN Round ScaledTanh Scan Selu Sigmoid Sin Sinh "
         "Softmax Softplus Softsign Sqrt Tan Tanh ThresholdedRelu Upsample"),
    (_FI, "Abs Add ArgMax ArgMin DepthToSpace Div Equal Greater GreaterOrEqual IsNaN Less LessOrEqual Max Min "
          "Mod Mul Neg Pad Range ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin "
          "ReduceProd ReduceSum ReduceSumSquare Relu Scatter ScatterElements ScatterND Shrink Sign SpaceToDepth "
          "Sub Sum TopK"),
    (_FIB, "Concat Constant ConstantOfShape Expand EyeLike Flatten Gather GatherElements GatherND Identity If "
           "Loop OneHot Reshape ReverseSequence Shape Size Slice Split Squeeze Tile Transpose Trilu Unsqueeze "
           "Where"),
    ("FP32 FP16", "GridSample Mish NonMaxSuppression NonZero RoiAlign"),
    ("BOOL", "And Not Or Xor"),
    (_FIB + " UINT8", "Cast CastLike"),
    ("INT8 FP8 INT4", "DequantizeLinear"),
    (_FI + " INT8", "Gelu"),
    (_FI + " FP8", "Mean"),
)
_OPS_10_1 = {**_OPS_10_0, **_table(("FP32 FP16", "DeformConv"))}  # changelog 10.1: DeformConv
_OPS_10_15 = {**_OPS_10_1, **_table(  # changelog 10.4-10.15 and the 10.15 list
    ("FP32 FP16", "BlackmanWindow HammingWindow HannWindow"),
    ("FP32", "STFT"),
    (_F, "RMSNormalization RotaryEmbedding"),
    (_F + " INT32", "TensorScatter"),
    (_F + " INT8 FP8", "Attention"),
    (_FI, "Pow"),  # 10.8/10.12: integer exponents and bases
    (_FIB + " FP8 FP4 INT4", "Constant ConstantOfShape"),
    ("INT8 FP8 FP4 INT4", "DequantizeLinear"),  # 10.8: FLOAT4E2M1
)}
_TYPES_10 = frozenset("FP32 FP16 BF16 DOUBLE INT32 INT64 INT8 UINT8 BOOL FP8 INT4".split())


@dataclass(frozen=True)
class TensorRTSpec:
    """What one TensorRT release documents for the ONNX it parses."""

    version: str
    opset: tuple[int, int]  # ai.onnx opsets, inclusive
    types: frozenset[str]  # ONNX types it represents (DOUBLE is cast down to FP32)
    ops: Mapping[str, frozenset[str]]  # ai.onnx op -> the types its row lists
    qdq_types: frozenset[str]  # what Q/DQ may quantize to
    block_sizes: Mapping[str, tuple[int, ...]]  # type -> block sizes of block quantization


_INT4_BLOCKS = {"INT4": (64, 128)}  # "INT4 ... supported block sizes are {64, 128}" (quantization schemes)
SPECS = {
    "10.0": TensorRTSpec("10.0", (9, 20), _TYPES_10, _OPS_10_0, frozenset({"INT8", "FP8", "INT4"}), _INT4_BLOCKS),
    "10.1": TensorRTSpec("10.1", (9, 20), _TYPES_10, _OPS_10_1, frozenset({"INT8", "FP8", "INT4"}), _INT4_BLOCKS),
    # FP4 weights are NVFP4: blocks of 16 (TensorRT's DynamicQuantize: "blocks of 16 elements")
    "10.15": TensorRTSpec("10.15", (9, 24), _TYPES_10 | {"FP4"}, _OPS_10_15,
                          frozenset({"INT8", "FP8", "INT4", "FP4"}), {**_INT4_BLOCKS, "FP4": (16,)}),
}
#: the version checked when none is named: the newest whose tables are above
DEFAULT_TENSORRT = "10.15"

_TYPE_NAMES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
               TensorProto.DOUBLE: "DOUBLE", TensorProto.INT32: "INT32", TensorProto.INT64: "INT64",
               TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8", TensorProto.BOOL: "BOOL",
               TensorProto.FLOAT8E4M3FN: "FP8", TensorProto.INT4: "INT4", TensorProto.FLOAT4E2M1: "FP4"}
_QUANTIZED = frozenset({"INT8", "FP8", "INT4", "FP4"})
_ONNX_DOMAINS = ("", "ai.onnx")
_RANDOM = ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli")


def type_name(elem_type: int) -> str:
    return _TYPE_NAMES.get(elem_type) or TensorProto.DataType.Name(elem_type)


def _release(version: str) -> tuple[int, int] | None:
    parts = str(version).strip().split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        return None


def spec_for(version: str | None) -> TensorRTSpec:
    """The tables for ``version`` (MAJOR.MINOR, or a full version such as 10.15.1.29): its own, or for a
    release of a known major without tables of its own (10.5, the TensorRT of Triton 24.10) the newest
    documented below it, whose parser it contains (``table_used`` says which). BuildError listing the
    known ones for any other (another major, or older than every table)."""
    if version is None:
        return SPECS[DEFAULT_TENSORRT]
    asked = _release(version)
    below = [key for key in SPECS if asked and _release(key)[0] == asked[0] and _release(key) <= asked]
    if not below:
        raise BuildError(f"no compatibility tables for TensorRT {version}; known: {', '.join(SPECS)} "
                         f"(default {DEFAULT_TENSORRT})")
    return SPECS[max(below, key=_release)]


def table_used(version: str | None) -> str:
    """How a report names the TensorRT ``version`` it checked: "10.15", or "10.5 (the 10.1 tables)"."""
    spec = spec_for(version)
    asked = ".".join(str(version).strip().split(".")[:2]) if version is not None else spec.version
    return spec.version if asked == spec.version else f"{asked} (the {spec.version} tables, the newest at or below it)"


# ---------------------------------------------------------------------------------------------
# The report

@dataclass(frozen=True)
class Violation:
    graph: str
    node: str
    rule: str
    detail: str


@dataclass
class CompatibilityReport:
    tensorrt: str  # the TensorRT version checked against
    graphs: list[str]  # graphs checked
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def lines(self) -> list[str]:
        lines = [f"{v.graph}: {v.node}: {v.rule}: {v.detail}" for v in self.violations]
        failed = [g for g in self.graphs if any(v.graph == g for v in self.violations)]
        passed = len(self.graphs) - len(failed)
        verdict = f"{passed} of {len(self.graphs)} graphs passed the TensorRT {self.tensorrt} checks"
        if failed:
            verdict += f" ({', '.join(failed)} did not)"
        lines.append(verdict + "; passing does not guarantee that TensorRT builds them: only a build on a GPU "
                               "with TensorRT can show that")
        return lines


# ---------------------------------------------------------------------------------------------
# One graph: what is known of its tensors without running it

class _Graph:
    """Constants, producers, types and shapes of a graph's tensors (outer scopes included)."""

    def __init__(self, graph: onnx.GraphProto, base_dir: Path | None, types: dict, shapes: dict,
                 outer: "_Graph | None" = None):
        self.graph, self.base_dir, self.types, self.shapes, self.outer = graph, base_dir, types, shapes, outer
        self.initializers = {t.name: t for t in graph.initializer}
        self.producers = {o: n for n in graph.node for o in n.output if o}
        # build-time constants: initializers, Constants, and what is computed from constants only
        # (nodes are in topological order, as ONNX requires; a graph's names shadow outer ones)
        self.constants = ({c for c in outer.constants if c not in self.producers} if outer else set()) \
            | set(self.initializers)
        for node in graph.node:
            if node.op_type == "Constant" or node.input and node.op_type not in _RANDOM and all(
                    i in self.constants for i in node.input if i):
                self.constants.update(o for o in node.output if o)

    def initializer(self, name: str):
        if name in self.initializers:
            return self.initializers[name]
        return self.outer.initializer(name) if self.outer and name not in self.producers else None

    def producer(self, name: str):
        if name in self.producers:
            return self.producers[name]
        return self.outer.producer(name) if self.outer and name not in self.initializers else None

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def value(self, name: str) -> np.ndarray | None:
        """The value of an initializer or a Constant's output; None when it is neither, or its
        external data cannot be read."""
        tensor = self.initializer(name)
        node = self.producer(name) if tensor is None else None
        if node is not None and node.op_type == "Constant":
            tensor = next((a.t for a in node.attribute if a.name == "value"), None)
        if tensor is None:
            return None
        if tensor.data_location == TensorProto.EXTERNAL:
            if self.base_dir is None:
                return None
            tensor = TensorProto.FromString(tensor.SerializeToString())
            try:
                onnx.external_data_helper.load_external_data_for_tensor(tensor, str(self.base_dir))
            except (OSError, ValueError):
                return None
            tensor.data_location = TensorProto.DEFAULT
            del tensor.external_data[:]
        return numpy_helper.to_array(tensor)

    def elem_type(self, name: str) -> int | None:
        tensor = self.initializer(name)
        if tensor is not None:
            return tensor.data_type
        node = self.producer(name)
        if node is not None and node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return value.data_type if value is not None else None
        return self.types.get(name)

    def shape(self, name: str) -> tuple | None:
        """Dims (int, or None where unknown), or None when the rank is unknown."""
        tensor = self.initializer(name)
        node = self.producer(name) if tensor is None else None
        if node is not None and node.op_type == "Constant":
            tensor = next((a.t for a in node.attribute if a.name == "value"), None)
        return tuple(tensor.dims) if tensor is not None else self.shapes.get(name)


def _inferred(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, tuple]]:
    """Types and shapes of every named tensor, from ONNX shape inference (what it cannot infer
    stays unknown, and the checks that need it are skipped)."""
    # inference needs the weights' types and shapes, not their bytes: it runs on a copy without them
    # (minutes -> seconds on a 500 MB decoder); small initializers (shapes, axes) keep their values
    light = onnx.ModelProto(ir_version=model.ir_version, opset_import=model.opset_import, functions=model.functions)
    light.graph.node.extend(model.graph.node)
    light.graph.input.extend(model.graph.input)
    light.graph.output.extend(model.graph.output)
    light.graph.value_info.extend(model.graph.value_info)
    for tensor in model.graph.initializer:
        small = tensor.data_location != TensorProto.EXTERNAL and tensor.ByteSize() < 1 << 16
        light.graph.initializer.append(tensor if small else TensorProto(name=tensor.name, dims=tensor.dims,
                                                                        data_type=tensor.data_type))
    try:
        inferred = onnx.shape_inference.infer_shapes(light)
    except Exception:  # noqa: BLE001 - a graph inference cannot handle is still checked, with less known
        inferred = model
    types, shapes = {}, {}

    def collect(graph: onnx.GraphProto) -> None:
        for info in [*graph.input, *graph.output, *graph.value_info]:
            tensor = info.type.tensor_type
            if info.type.HasField("tensor_type") and tensor.elem_type:
                types[info.name] = tensor.elem_type
                if tensor.HasField("shape"):
                    shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None
                                              for d in tensor.shape.dim)
        for node in graph.node:
            for graph_attr in _subgraphs(node):
                collect(graph_attr)

    collect(inferred.graph)
    return types, shapes


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else ''})"


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


# ---------------------------------------------------------------------------------------------
# Rules on graphs. Each yields (node, rule, detail).

def rule_opset(model: onnx.ModelProto, spec: TensorRTSpec) -> Iterator[tuple[str, str, str]]:
    """The ai.onnx opset is in the parser's documented range (docs/operators.md, first line). The
    parser does not refuse a newer opset by itself (10.1-GA ModelImporter.cpp only warns below 7):
    it reads each op as the ops it knows, so a newer op's attributes may go unread."""
    lo, hi = spec.opset
    for entry in model.opset_import:
        if entry.domain in _ONNX_DOMAINS and not lo <= entry.version <= hi:
            yield ("opset_import", "opset",
                   f"ai.onnx opset {entry.version} is outside the opsets TensorRT {spec.version}'s parser "
                   f"documents ({lo}-{hi})")


def rule_op_support(node: onnx.NodeProto, spec: TensorRTSpec, functions: set) -> Iterator[tuple[str, str, str]]:
    """An op the parser imports: ai.onnx ops in the support list; model-local functions are inlined
    by the parser (their bodies are checked); any other domain (com.microsoft's MatMulNBits,
    SkipLayerNormalization, GroupQueryAttention, ...) only a registered plugin of that name reads."""
    if (node.domain, node.op_type) in functions:
        return
    if node.domain not in _ONNX_DOMAINS:
        yield (_node_name(node), "op-support",
               f"{node.domain}::{node.op_type} is not an ONNX op; TensorRT {spec.version}'s parser has no importer "
               "for it (only a TensorRT plugin registered under that name could read it)")
    elif node.op_type not in spec.ops:
        yield (_node_name(node), "op-support",
               f"{node.op_type} is not supported by TensorRT {spec.version}'s ONNX parser (operators.md)")


# which inputs carry the op's data type (index 0 unless listed); Q/DQ are checked by the Q/DQ rules
_TYPED_INPUTS = {"Where": (1, 2), "Pow": (0, 1)}
_TYPED_OUTPUTS = {"Constant": (0,), "ConstantOfShape": (0,), "Cast": (0,), "CastLike": (0,)}


def rule_op_dtype(node: onnx.NodeProto, g: _Graph, spec: TensorRTSpec) -> Iterator[tuple[str, str, str]]:
    """Data types TensorRT cannot take at this op (see the module docstring for which are reported)."""
    if node.domain not in _ONNX_DOMAINS or node.op_type not in spec.ops \
            or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        return
    listed = spec.ops[node.op_type]
    tensors = [node.input[i] for i in _TYPED_INPUTS.get(node.op_type, (0,)) if i < len(node.input)]
    tensors += [node.output[i] for i in _TYPED_OUTPUTS.get(node.op_type, ()) if i < len(node.output)]
    for name in (t for t in tensors if t):
        elem = g.elem_type(name)
        if elem is None:
            continue
        kind = type_name(elem)
        computed = "FP32" if kind == "DOUBLE" else kind  # the parser casts DOUBLE down to FLOAT
        if kind not in spec.types:
            yield (_node_name(node), "op-dtype", f"{name} is {kind}, a type TensorRT {spec.version} does not represent")
        elif computed in listed or computed in ("INT32", "INT64"):
            continue
        elif kind in _QUANTIZED:
            yield (_node_name(node), "op-dtype",
                   f"{name} is {kind} into {node.op_type}: TensorRT takes quantized types only through "
                   f"Q/DQ ({node.op_type} lists {', '.join(sorted(listed))})")
        elif kind == "UINT8":
            yield (_node_name(node), "op-dtype",
                   f"{name} is UINT8 into {node.op_type}: TensorRT takes UINT8 only as a network input or output "
                   "(through Cast)")
        else:
            yield (_node_name(node), "op-dtype",
                   f"{name} is {kind}; TensorRT {spec.version}'s {node.op_type} takes {', '.join(sorted(listed))}")


def _qdq_type(node: onnx.NodeProto, g: _Graph) -> str | None:
    """The quantized type of a Q/DQ node: DQ's input (its Q's type when a Q makes it); Q's zero
    point, else its output_dtype, else INT8 (what TensorRT's parser takes when neither is given,
    where ONNX would say UINT8)."""
    if node.op_type == "DequantizeLinear":
        source = g.producer(node.input[0])
        if source is not None and source.op_type == "QuantizeLinear" and source.domain in _ONNX_DOMAINS:
            return _qdq_type(source, g)
        elem = g.elem_type(node.input[0])
    elif len(node.input) > 2 and node.input[2]:
        elem = g.elem_type(node.input[2])
    else:
        elem = _attr(node, "output_dtype") or TensorProto.INT8
    return type_name(elem) if elem else None


def rule_qdq(node: onnx.NodeProto, g: _Graph, spec: TensorRTSpec) -> Iterator[tuple[str, str, str]]:
    """Explicit quantization as TensorRT takes it: symmetric, constant positive scales, INT8/FP8
    (INT4/FP4 weights in blocks), no INT32 dequantize."""
    if node.domain not in _ONNX_DOMAINS or node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
        return
    name, x = _node_name(node), node.input[0]
    kind = _qdq_type(node, g)
    if node.op_type == "DequantizeLinear" and kind == "INT32":
        yield (name, "qdq-int32-dequantize",
               f"{x} is INT32: TensorRT rejects an INT32 DequantizeLinear (a bias quantized to int32; "
               "NVIDIA/TensorRT#3360, onnx/onnx-tensorrt#850) - keep biases float (QuantizeBias=False)")
    elif kind is not None and kind not in spec.qdq_types:
        yield (name, "qdq-type", f"quantizes to {kind}; TensorRT {spec.version} quantizes to "
                                 f"{', '.join(sorted(spec.qdq_types))} only")
    scale = node.input[1] if len(node.input) > 1 else ""
    if scale and not g.is_constant(scale):
        yield (name, "qdq-scale-constant", f"scale {scale} is not a build-time constant")
    scale_value = g.value(scale) if scale else None
    if scale_value is not None and scale_value.size and not np.all(scale_value.astype(np.float32) > 0):
        yield (name, "qdq-scale-positive", f"scale {scale} has coefficients <= 0; TensorRT takes positive scales only")
    zero = node.input[2] if len(node.input) > 2 else ""
    zero_value = g.value(zero) if zero else None
    if zero_value is not None and np.any(zero_value.astype(np.float32) != 0):
        yield (name, "qdq-symmetric", f"zero point {zero} is not 0: TensorRT quantizes symmetrically only")
    yield from _rule_blocks(node, g, spec, kind, scale)


def _rule_blocks(node: onnx.NodeProto, g: _Graph, spec: TensorRTSpec, kind: str | None, scale: str
                 ) -> Iterator[tuple[str, str, str]]:
    """Block quantization (a ``block_size``, or a scale of the input's rank): only for the types
    and block sizes TensorRT lists, blocked along one of the last two dims; INT4/FP4 are weight-only
    and need blocks; INT4 tensors need an even last dim."""
    name, x = _node_name(node), node.input[0]
    x_shape, s_shape = g.shape(x), g.shape(scale) if scale else None
    block = int(_attr(node, "block_size", 0) or 0)
    blocked = block > 0 or bool(x_shape and s_shape and len(x_shape) == len(s_shape) >= 2 and int(np.prod(
        [d or 0 for d in s_shape])) > 1)
    weight_only = kind in ("INT4", "FP4")
    if weight_only and not g.is_constant(x):
        yield (name, "qdq-weight-only", f"{kind} quantizes weights only in TensorRT; {x} is not a constant weight")
    if weight_only and not blocked:
        yield (name, "qdq-block", f"{kind} needs per-block scales in TensorRT; {scale} is per-tensor or per-channel")
    if kind == "INT4" and x_shape and x_shape[-1] is not None and x_shape[-1] % 2:
        yield (name, "qdq-int4-shape", f"{x} has an odd last dim ({x_shape[-1]}): TensorRT packs INT4 in pairs")
    if not blocked:
        return
    rank = len(x_shape) if x_shape else None
    axis = int(_attr(node, "axis", 1))
    axis = axis + rank if rank is not None and axis < 0 else axis
    if not block and x_shape and s_shape and x_shape[axis] and s_shape[axis]:
        block = x_shape[axis] // s_shape[axis]
    allowed = spec.block_sizes.get(kind or "")
    if allowed is None:
        yield (name, "qdq-block", f"block quantization of {kind} (block size {block or '?'}): TensorRT "
                                  f"{spec.version} block-quantizes {', '.join(sorted(spec.block_sizes))} weights only")
        return
    if block and block not in allowed:
        yield (name, "qdq-block", f"block size {block}: TensorRT {spec.version} takes {kind} blocks of "
                                  f"{' or '.join(map(str, allowed))}")
    if rank is not None and axis < rank - 2:
        yield (name, "qdq-block", f"blocked along axis {axis} of a rank-{rank} tensor: TensorRT blocks one of "
                                  "the last two dims")
    if x_shape and s_shape and len(x_shape) == len(s_shape) and all(d is not None for d in (*x_shape, *s_shape)):
        split = [i for i, (d, s) in enumerate(zip(x_shape, s_shape)) if s != d]
        if len(split) > 1:
            yield (name, "qdq-block", f"scale {scale} {list(s_shape)} blocks {len(split)} dims of {list(x_shape)}: "
                                      "TensorRT allows a single blocking dim")


def rule_profiles(model: onnx.ModelProto, profiles: list) -> Iterator[tuple[str, str, str]]:
    """Every dynamic dim of every graph input has a range in every profile, 0 <= min <= opt <= max,
    fixed dims as the graph has them, one range per named dim, and no profile names an input the
    graph lacks."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = {i.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                       for d in i.type.tensor_type.shape.dim]
              for i in model.graph.input if i.name not in initializers}
    for index, profile in enumerate(profiles):
        named: dict[str, tuple[tuple, str]] = {}
        for input_name in sorted(set(profile) - set(inputs)):
            yield (input_name, "profile-coverage", f"profile {index} names {input_name}, which is not a graph input")
        for input_name, dims in inputs.items():
            dynamic = [i for i, d in enumerate(dims) if not isinstance(d, int)]
            if input_name not in profile:
                if dynamic:
                    yield (input_name, "profile-coverage",
                           f"profile {index} gives no range for dynamic dims "
                           f"{', '.join(str(dims[i] or f'#{i}') for i in dynamic)}")
                continue
            lo, opt, hi = (tuple(s) for s in profile[input_name])
            if not len(lo) == len(opt) == len(hi) == len(dims):
                yield (input_name, "profile-coverage",
                       f"profile {index} has rank {len(lo)} shapes for a rank-{len(dims)} input")
                continue
            for i, dim in enumerate(dims):
                triple = (lo[i], opt[i], hi[i])
                label = dim if isinstance(dim, str) else f"dim {i}"
                if not 0 <= triple[0] <= triple[1] <= triple[2]:
                    yield (input_name, "profile-range",
                           f"profile {index} {label}: min {triple[0]}, opt {triple[1]}, max {triple[2]} "
                           "(needs 0 <= min <= opt <= max)")
                if isinstance(dim, int) and triple != (dim, dim, dim):
                    yield (input_name, "profile-fixed-dim",
                           f"profile {index} dim {i} is {triple[0]}..{triple[2]}, the graph fixes it to {dim}")
                elif isinstance(dim, str):
                    seen = named.setdefault(dim, (triple, input_name))
                    if seen[0] != triple:
                        yield (input_name, "profile-dim-consistent",
                               f"profile {index} {dim}: {triple} here, {seen[0]} for {seen[1]}")


def check_graph(model: onnx.ModelProto, name: str, tensorrt_version: str, profiles: list | None = None,
                base_dir: Path | None = None) -> list[Violation]:
    """Every violation of ``model`` (the graph called ``name``) against TensorRT ``tensorrt_version``.
    ``profiles``: the optimization profiles it will be built with (input name -> (min, opt, max)
    shapes, as ``stage_profiles`` gives them), checked when given. ``base_dir``: where its external
    data lies (zero points and scales stored there are read from it)."""
    spec = spec_for(tensorrt_version)
    found = list(rule_opset(model, spec))
    functions = {(f.domain, f.name) for f in model.functions}
    types, shapes = _inferred(model)

    def walk(graph: onnx.GraphProto, outer: _Graph | None) -> None:
        g = _Graph(graph, base_dir, types, shapes, outer)
        for node in graph.node:
            found.extend(rule_op_support(node, spec, functions))
            found.extend(rule_op_dtype(node, g, spec))
            found.extend(rule_qdq(node, g, spec))
            for sub in _subgraphs(node):
                walk(sub, g)

    walk(model.graph, None)
    for function in model.functions:  # the parser inlines them: check their bodies too
        body = onnx.GraphProto(node=function.node, name=function.name)
        g = _Graph(body, base_dir, {}, {})
        for node in body.node:
            found.extend(rule_op_support(node, spec, functions))
            found.extend(rule_qdq(node, g, spec))
    if profiles is not None:
        found.extend(rule_profiles(model, profiles))
    return [Violation(name, node, rule, detail) for node, rule, detail in found]


# ---------------------------------------------------------------------------------------------
# Rules on the Triton configs of the tensorrt target

def _plan_profiles(manifest: dict, stage: str) -> list:
    from ..contract.profiles import stage_profiles

    engine = (manifest.get("engines") or {}).get(stage)
    return engine["profiles"] if engine and engine.get("profiles") else stage_profiles(manifest, stage)


def unused_inputs(model: onnx.ModelProto) -> list[str]:
    """The graph inputs no node reads (in the graph or its sub-graphs): TensorRT leaves them out of the
    plan ("Unused Input"), as an ALiBi decoder's ``position_ids``, which every decoder stage declares."""
    read: set[str] = set()
    graphs = [model.graph]
    while graphs:
        for node in graphs.pop().node:
            read.update(node.input)
            graphs += [a.g for a in node.attribute if a.type == onnx.AttributeProto.GRAPH]
            graphs += list(next((a.graphs for a in node.attribute if a.type == onnx.AttributeProto.GRAPHS), []))
    return [i.name for i in model.graph.input if i.name not in read]


def check_configs(configs: dict[str, dict], manifest: dict, build_dir: Path | None = None) -> list[Violation]:
    """The configs of every graph model (a model named after a stage of ``manifest``) as Triton's
    tensorrt backend needs them: ``platform: tensorrt_plan``, GPU instances, every optimization
    profile of the plan listed by every instance group (Triton's scheduler hands a request to any
    instance, and an instance without ``profile`` runs profile 0 only), a ``max_batch_size``
    > 0 only where the first dim of every input and output is one dynamic batch dim whose range
    in every profile holds 1..max_batch_size, and (with ``build_dir``) no input the plan will lack
    (``unused_inputs``: Triton refuses a config, and requests, naming an input its plan does not have)."""
    from ..contract.profiles import dim_ranges
    from ..manifest import served_entry

    found = []
    ranges = dim_ranges(manifest)
    for stage, graph in manifest["graphs"].items():
        cfg = configs.get(stage)
        if cfg is None:  # run inside another model (the python target's in-process decoder)
            continue
        where = lambda node, rule, detail: found.append(Violation(stage, node, rule, detail))  # noqa: E731
        if build_dir is not None:
            model = onnx.load(str(Path(build_dir) / served_entry(manifest, stage, "tensorrt")["file"]),
                              load_external_data=False)
            for name in unused_inputs(model):
                where(f"config.input.{name}", "triton-unused-input",
                      f"{name} is read by no node of the graph: TensorRT leaves it out of the plan and Triton then "
                      "refuses this config and the requests that send it; serve the stage with the onnxruntime "
                      "or python target")
        if cfg.get("platform") != "tensorrt_plan":
            where("config.platform", "triton-platform",
                  f"platform is {cfg.get('platform') or cfg.get('backend')!r}; a TensorRT plan needs tensorrt_plan")
        groups = cfg.get("instance_group") or []
        if not groups:
            where("config.instance_group", "triton-kind", "no instance_group: say KIND_GPU (plans run on GPUs only)")
        count = len(_plan_profiles(manifest, stage))
        everyone = [str(i) for i in range(count)]
        for i, group in enumerate(groups):
            if group.get("kind", "KIND_AUTO") != "KIND_GPU":
                where(f"config.instance_group[{i}]", "triton-kind",
                      f"kind {group.get('kind', 'KIND_AUTO')}; a TensorRT plan runs on KIND_GPU instances only")
            listed = [str(p) for p in group.get("profile", [])]
            bad = [p for p in listed if p not in everyone]
            if bad:
                where(f"config.instance_group[{i}]", "triton-profiles",
                      f"profile {', '.join(bad)} is not one of the plan's {count} profiles (0-{count - 1})")
            if count > 1 and sorted(set(listed) & set(everyone)) != sorted(everyone):
                missing = [p for p in everyone if p not in listed]
                where(f"config.instance_group[{i}]", "triton-profiles",
                      f"the plan has {count} optimization profiles and this group lists "
                      f"{listed or 'none'} (missing {', '.join(missing)}); without them Triton runs profile "
                      f"{listed[0] if listed else 0} only and requests outside it fail")
        batch = cfg.get("max_batch_size", 0)
        if batch > 0:
            tensors = [*graph["inputs"], *graph["outputs"]]
            firsts = {t["shape"][0] if t["shape"] else None for t in tensors}
            dim = next(iter(firsts)) if len(firsts) == 1 else None
            if not isinstance(dim, str):
                where("config.max_batch_size", "triton-max-batch",
                      f"max_batch_size {batch} but the first dims of the inputs and outputs are "
                      f"{sorted(map(str, firsts))}, not one dynamic batch dim: use max_batch_size 0")
            else:
                for index, profile in enumerate(ranges[stage]):
                    lo, _, hi = profile.get(dim, (None, None, None))
                    if lo is None or lo > 1 or hi < batch:
                        where("config.max_batch_size", "triton-max-batch",
                              f"max_batch_size {batch} but profile {index} gives {dim} "
                              f"{'no range' if lo is None else f'{lo}..{hi}'} (needs 1..{batch} at least)")
        for kind in ("input", "output"):
            declared = {t["name"]: t for t in cfg.get(kind, [])}
            for info in graph[f"{kind}s"]:
                tensor = declared.get(info["name"], {})
                dims = tensor.get("reshape", {}).get("shape", tensor.get("dims"))  # what the plan sees
                if dims is not None and len(dims) + (batch > 0) != len(info["shape"]):
                    where(f"config.{kind}.{info['name']}", "triton-dims",
                          f"dims {dims} with max_batch_size {batch} do not give the graph's rank {len(info['shape'])}")
    return found


# ---------------------------------------------------------------------------------------------

def check_build(build_dir: Path, tensorrt_version: str | None = None,
                configs: dict[str, dict] | None = None) -> CompatibilityReport:
    """Every graph of the build at ``build_dir`` (with the profiles its engines will be built with)
    against TensorRT ``tensorrt_version`` (default DEFAULT_TENSORRT), and ``configs``, the Triton
    configs the ``tensorrt`` target renders for it, when given (the repository sits above the
    engines: its renderer runs ``check_configs`` itself, the CLI passes them to ``--check-only``)."""
    from ..manifest import read_manifest, served_entry
    from ..contract.profiles import stage_profiles

    spec = spec_for(tensorrt_version)
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    violations = []
    for stage in manifest["graphs"]:
        path = build_dir / served_entry(manifest, stage, "tensorrt")["file"]
        # weights stay on disk: only the zero points and scales the rules read are loaded
        model = onnx.load(str(path), load_external_data=False)
        try:
            profiles = stage_profiles(manifest, stage)
        except BuildError as e:
            violations.append(Violation(stage, "profiles", "profile-coverage", str(e)))
            profiles = None
        violations += check_graph(model, stage, spec.version, profiles, base_dir=path.parent)
    if configs is not None:
        violations += check_configs(configs, manifest, build_dir)
    return CompatibilityReport(table_used(tensorrt_version), list(manifest["graphs"]), violations)
