"""The ONNX Runtime form of an exported decoder: pattern rewrites of the exporter's small standard
nodes into ONNX Runtime's fused CPU kernels.

torch.onnx (dynamo) writes every RMSNorm, rotary embedding and projection as a chain of small
standard nodes (~2,000 for a 30-layer decoder). ONNX Runtime's own session optimizations do not
fuse them (its RMSNorm fusion expects Div, the exporter writes Reciprocal), so each costs a kernel
launch per token. This pass rewrites, by pattern only (no model-type branches):

* ``layer_norm``: a LayerNorm written out as small ops (Cohere's module: mean, centre, variance, scale)
  -> the standard ``LayerNormalization`` op, which ``skip_layer_norm`` then takes like the exporter's own.
* ``skip_rms_norm``: residual ``Add`` + RMSNorm (Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul/Mul) ->
  ``com.microsoft.SkipSimplifiedLayerNormalization`` (its 4th output is the residual sum).
* ``rms_norm``: an RMSNorm with no residual Add before it (the first layer's, Gemma's norms after
  attention and MLP, per-head q/k norms) -> the same kernel reading ``x`` as input and skip, with 4 x
  epsilon: the norm of 2x with 4 eps is the norm of x with eps, exactly in binary floating point.
  (ONNX Runtime's plain ``SimplifiedLayerNormalization`` is registered in the ONNX domain, which the
  ONNX checker rejects.) The kernel takes 2-D or 3-D input: 4-D heads (Qwen3's, Gemma 3's q/k norm)
  are flattened to (rows, head size) for it and reshaped back. A norm without a weight (nanochat's)
  gets a unit gamma.
* ``skip_layer_norm``: residual ``Add`` + ``LayerNormalization`` (the exporter writes LayerNorm as
  that one op) -> ``com.microsoft.SkipLayerNormalization``, as above (Phi, GPT-J, StableLM, Falcon; OPT's
  norms read a Reshape of the residual sum, on which the kernel would save no node: they stay).
* ``gelu``: PyTorch's gelu(approximate="tanh") (Gemma's MLPs, SigLIP's towers: eight element-wise nodes, which
  ONNX Runtime's own FastGelu fusion does not match as exported) -> ``com.microsoft.FastGelu`` (fp32; the image
  stages' form takes it too).
* ``rotary``: rotate-half RoPE (Slice/Neg/Concat/Mul/Add on q and k, cos/sin computed from
  ``position_ids`` and a constant ``inv_freq``) -> ``com.microsoft.RotaryEmbedding`` with
  constant cos/sin caches of ``max_positions`` rows (the attention rewrite then rotates inside its
  kernel with the same caches; a rotate_half written Concat(x2, -x1), nanochat's, gets the sine
  negated); RoPE on neighbouring channel pairs (GPT-J's layout: Cohere, GLM) -> the same op with
  ``interleaved``, its caches the exported angle sub-graph's own values.
* ``attention``: each layer's attention, from the q/k/v projections to the o_proj input
  (heads Reshape/Transpose, rotary, KV Concat, repeat_kv, scores, additive mask, Softmax, output
  Transpose/Reshape) -> ``com.microsoft.GroupQueryAttention`` (rotary inside, reading the packed
  q/k/v), with the same external inputs and outputs; left padding and masked holes keep the
  exported graph's answers (attention_fuse.py says how).
* ``packed_matmul``: the q/k/v MatMuls a fused attention reads (sharing one activation, constant 2-D
  weights; each through a constant bias Add or none, alike) -> one MatMul over the concatenated
  weights (and one Add of the concatenated biases: Qwen2's, Phi's, OPT's), which the attention kernel reads
  packed; found from the kernel's inputs, so an MLP on the same activation (Phi's, Cohere's) stays apart.
  Other MatMuls sharing an activation (the MLP's gate/up; q/k/v through a per-head norm) stay apart:
  the ``Split`` a packed MatMul needs there cost more than the packing saved (0.8-1.0 ms of a 14-15 ms
  fp32 step on the demo, benchmarks/README.md).

The result is for ONNX Runtime only: TensorRT does not read com.microsoft ops, so TensorRT targets
keep the standard graph. A decoder none of the patterns match is written unchanged, and the report
says why. Contrib op contracts: onnxruntime docs/ContribOperators.md (SkipSimplifiedLayerNormalization,
RotaryEmbedding, GroupQueryAttention; the installed runtime's own schemas:
``onnxruntime.capi.onnxruntime_pybind11_state.get_all_operator_schema()``).
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExportError
from .attention_fuse import fold_packed_qkv, fuse_attention
from .graph_info import (EXTERNAL_TENSOR_MIN_BYTES, live_nodes, read_tensor, reads, save_graph, set_external_data,
                         topological_order, uses_external_data)
from .patterns import last_axis_slice, layer_norm, rms_norm, tanh_gelu, unsqueeze_axis

MS_DOMAIN = "com.microsoft"
FUSIONS = ("layer_norm", "rms_norm", "skip_rms_norm", "skip_layer_norm", "gelu", "rotary", "packed_matmul",
           "attention")


#: why a decoder whose attention is not causal everywhere keeps its attention as exported
NOT_CAUSAL = ("some of a prompt's tokens attend to each other both ways (not causal), and GroupQueryAttention's "
              "kernel masks causally")


@dataclass
class FuseReport:
    """What ``fuse_decoder`` did; ``fusions`` counts each rewrite applied."""

    fusions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FUSIONS, 0))
    nodes_before: int = 0
    nodes_after: int = 0
    reason: str = ""  # why nothing was fused (empty when something was)
    notes: list[str] = field(default_factory=list)  # patterns seen but left alone, and why
    # whether the graph runs on one KV buffer written in place (contract.scheme.KV_IN_PLACE), else why not
    kv_in_place: bool = False
    kv_copied_because: str = ""

    @property
    def fused(self) -> bool:
        return any(self.fusions.values())

    def to_dict(self) -> dict:
        return {"fusions": dict(self.fusions), "nodes_before": self.nodes_before,
                "nodes_after": self.nodes_after, "reason": self.reason, "notes": list(self.notes),
                "kv_in_place": self.kv_in_place, "kv_copied_because": self.kv_copied_because}


class Weights:
    """How the pass reads initializers and makes new ones. By default in the proto (a graph held in
    memory). For a graph loaded with ``load_external_data=False`` (``source_dir``: its folder),
    external tensors are read from their file when a rewrite needs one, and new large ones (packed
    projections) are appended to the ``spill`` file: the model's weights never sit in memory whole
    (``save_graph`` later copies both into the output's data file, file to file)."""

    def __init__(self, source_dir: Path | None = None, spill: Path | None = None):
        self.source_dir, self.spill = source_dir, spill

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        return read_tensor(tensor, self.source_dir)

    def make(self, array: np.ndarray, name: str) -> onnx.TensorProto:
        if self.spill is None or array.nbytes < EXTERNAL_TENSOR_MIN_BYTES:
            return numpy_helper.from_array(array, name)
        tensor = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        with open(self.spill, "ab") as f:
            offset = f.tell()
            np.ascontiguousarray(array).tofile(f)
        set_external_data(tensor, os.fspath(Path(self.spill).absolute()), offset, array.nbytes)
        return tensor


class _Graph:
    """Producer/consumer indexes over a GraphProto and the rewrites queued on it."""

    def __init__(self, model: onnx.ModelProto, weights: Weights | None = None):
        self.weights = weights or Weights()
        self.model, self.graph = model, model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.outputs = {o.name for o in self.graph.output}
        self.types = {v.name: v.type.tensor_type for v in
                      (*self.graph.input, *self.graph.value_info, *self.graph.output)}
        self.reindex()
        self.removed: set[int] = set()  # id() of nodes to drop
        self.added: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []

    def reindex(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.graph.node:
            for i in reads(n):
                if i:
                    self.consumers[i].append(n)

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return self.weights.read(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name in ("value_float", "value_int"):
                    return np.array(helper.get_attribute_value(a))
                if a.name in ("value_floats", "value_ints"):
                    return np.array(helper.get_attribute_value(a))
        return None

    def ones(self, width: int) -> str:
        """A (width,) fp32 initializer of ones: the unit gamma of a norm written without a weight
        (the kernels all take one); one per width."""
        name = f"unit_gamma_{width}"
        if name not in self.inits and all(t.name != name for t in self.new_inits):
            self.new_inits.append(numpy_helper.from_array(np.ones(width, np.float32), name))
        return name

    def scalar(self, name: str) -> float | None:
        v = self.const(name)
        return float(v.reshape(-1)[0]) if v is not None and v.size == 1 else None

    def parent(self, node: onnx.NodeProto, index: int, op: str | tuple[str, ...]) -> onnx.NodeProto | None:
        if index >= len(node.input):
            return None
        p = self.producer.get(node.input[index])
        ops = (op,) if isinstance(op, str) else op
        return p if p is not None and p.op_type in ops and id(p) not in self.removed else None

    def sole_consumer(self, name: str, op: str | tuple[str, ...]) -> onnx.NodeProto | None:
        """The one consumer of ``name`` when it has exactly one and is not a graph output."""
        users = self.consumers.get(name, [])
        ops = (op,) if isinstance(op, str) else op
        if len(users) != 1 or name in self.outputs or users[0].op_type not in ops or id(users[0]) in self.removed:
            return None
        return users[0]

    def other_input(self, node: onnx.NodeProto, name: str) -> str | None:
        """The other input of a binary node one of whose inputs is ``name``."""
        if len(node.input) != 2 or name not in node.input:
            return None
        return node.input[1] if node.input[0] == name else node.input[0]

    def shape(self, name: str) -> list | None:
        t = self.types.get(name)
        if t is None or not t.HasField("shape"):
            return None
        return [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]

    def elem_type(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].data_type
        t = self.types.get(name)
        return t.elem_type if t is not None else None

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def replace(self, old: list[onnx.NodeProto], new: list[onnx.NodeProto]) -> None:
        self.removed.update(id(n) for n in old)
        self.added += new

    def commit(self) -> None:
        """Apply the queued rewrites, drop what nothing reads any more, restore topological order.

        The initializers (the weights) are never copied: new ones are moved in one at a time and
        dead ones deleted in place. Rebuilding the list copied every weight once per commit, and
        protobuf kept the copies alive: 11x the model's size at peak on a 540 MB decoder."""
        nodes = [n for n in self.graph.node if id(n) not in self.removed] + self.added
        names = set(self.inits) | {t.name for t in self.new_inits}
        while self.new_inits:  # pop first: the list's reference would keep the moved-out original alive
            self.graph.initializer.add().CopyFrom(self.new_inits.pop(0))
        nodes = live_nodes(nodes, self.outputs)
        del self.graph.node[:]
        self.graph.node.extend(topological_order(nodes, {i.name for i in self.graph.input} | names,
                                                 "the fused graph"))
        used = {i for n in self.graph.node for i in reads(n)} | self.outputs
        self.inits = {}  # no Python handle on a tensor being deleted: protobuf would copy it out to keep it valid
        inits = self.graph.initializer
        for index in reversed([i for i, t in enumerate(inits) if t.name not in used]):
            del inits[index]
        self.inits = {t.name: t for t in inits}
        self.removed, self.added = set(), []
        self.reindex()


# ---------------------------------------------------------------- GELU (tanh approximation)

def fuse_tanh_gelu(g: _Graph) -> int:
    """Each fp32 x * 0.5 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (``patterns.tanh_gelu``: Gemma's and
    SigLIP's activation, eight element-wise nodes as exported, which ONNX Runtime 1.32's own FastGelu fusion does
    not match) -> ``com.microsoft.FastGelu`` (one pass over the tensor: 16-19 ms against 37 ms on 2,000 x 3,072
    floats, 2 threads; its CPU kernel is fp32 only). Returns how many were rewritten."""
    fused = 0
    for tanh in [n for n in g.graph.node if n.op_type == "Tanh"]:
        found = tanh_gelu(g, tanh)
        if found is None or g.elem_type(found[0]) != onnx.TensorProto.FLOAT:
            continue
        x, result = found
        g.replace([result], [helper.make_node("FastGelu", [x], list(result.output), name=f"{result.name}_fast_gelu",
                                              domain=MS_DOMAIN)])
        fused += 1
    return fused


# ---------------------------------------------------------------- RMSNorm (+ residual Add)

def _residual_add(g: _Graph, norm_first: onnx.NodeProto, x: str) -> onnx.NodeProto | None:
    """The residual ``Add`` producing a norm's input ``x`` (``norm_first`` reads it), when the skip kernels
    can take its operands: input and skip of one shape (batch, sequence, hidden), neither constant, the
    Add not already taken by another norm on the same sum; else None."""
    residual = g.parent(norm_first, 0, "Add")
    a, b = (residual.input if residual is not None else ("", ""))
    shapes = [g.shape(a), g.shape(b), g.shape(x)]
    if residual is None or id(residual) in g.removed or a in g.inits or b in g.inits \
            or any(s is None or len(s) != 3 for s in shapes) or not shapes[0] == shapes[1] == shapes[2]:
        return None
    return residual


def _skip_outputs(g: _Graph, x: str, y: str, norm_nodes: list[onnx.NodeProto]) -> list[str]:
    """The skip kernel's outputs: the norm's ``y``, and the residual sum ``x`` as its 4th output when
    anything besides the norm reads it (the next residual Add)."""
    ids = {id(n) for n in norm_nodes}
    others = [c for c in g.consumers[x] if id(c) not in ids] or x in g.outputs
    return [y, "", "", x] if others else [y]


def _fuse_skip_rms_norm(g: _Graph, report: FuseReport) -> None:
    standalone = 0
    for reduce in [n for n in g.graph.node if n.op_type == "ReduceMean"]:
        match = rms_norm(g, reduce)
        if match is None:
            continue
        x, gamma, eps, nodes, y = match
        gamma = gamma or g.ones(g.shape(reduce.input[0])[-1])  # rms_norm: static when weightless
        residual = _residual_add(g, nodes[0], x)
        if residual is None:
            alone = _rms_norm_alone(g, x, gamma, eps, y, reduce.name)
            if alone:
                g.replace(nodes, alone)
                report.fusions["rms_norm"] += 1
            else:
                standalone += 1
            continue
        # of the norm's nodes the square and the normalising Mul read x
        fused = helper.make_node("SkipSimplifiedLayerNormalization", [*residual.input, gamma],
                                 _skip_outputs(g, x, y, nodes),
                                 name=f"{residual.name}_skip_rms_norm", domain=MS_DOMAIN, epsilon=eps)
        g.replace([residual, *nodes], [fused])
        report.fusions["skip_rms_norm"] += 1
    if standalone:
        report.notes.append(f"{standalone} RMSNorm(s) with no residual Add before them left as written: their input "
                            "is not fp32 of a known rank with a static last axis")


def _rms_norm_alone(g: _Graph, x: str, gamma: str, eps: float, y: str, name: str) -> list[onnx.NodeProto]:
    """An RMSNorm with no residual Add before it as the skip kernel reading ``x`` as input and skip with
    4x epsilon (the norm of 2x with 4 eps is the norm of x with eps: exact, powers of two). The kernel
    takes 2-D or 3-D input: 4-D heads (a per-head q/k norm) go through it flattened to (rows, head
    size) and back to ``x``'s shape (4 nodes for 7). [] where ``x`` is not fp32 of such a shape."""
    shape = g.shape(x)
    if g.elem_type(x) != onnx.TensorProto.FLOAT or not shape or not isinstance(shape[-1], int):
        return []
    epsilon = float(np.float32(eps) * np.float32(4))
    if len(shape) in (2, 3):
        return [helper.make_node("SkipSimplifiedLayerNormalization", [x, x, gamma], [y], name=f"{name}_rms_norm",
                                 domain=MS_DOMAIN, epsilon=epsilon)]
    if len(shape) != 4:
        return []
    rows, normed, like = f"{name}_rows", f"{name}_rows_normed", f"{name}_shape"
    return [helper.make_node("Constant", [], [f"{rows}_shape"], name=f"{rows}_shape",
                             value=helper.make_tensor(f"{rows}_shape", onnx.TensorProto.INT64, [2], [-1, shape[-1]])),
            helper.make_node("Reshape", [x, f"{rows}_shape"], [rows], name=rows),
            helper.make_node("SkipSimplifiedLayerNormalization", [rows, rows, gamma], [normed],
                             name=f"{name}_rms_norm", domain=MS_DOMAIN, epsilon=epsilon),
            helper.make_node("Shape", [x], [like], name=like),
            helper.make_node("Reshape", [normed, like], [y], name=f"{name}_rms_norm_back")]


def _fuse_layer_norm(g: _Graph, report: FuseReport) -> int:
    """A LayerNorm written out as small ops (Cohere's own module: ReduceMean / Sub / Pow / ReduceMean /
    Add / Sqrt / Reciprocal / Mul / Mul, no bias) -> the standard ``LayerNormalization`` op (opset 17+,
    fp32 statistics as written), which ``_fuse_skip_layer_norm`` then joins to its residual Add as it
    does the exporter's own. Returns how many were rewritten."""
    if max((o.version for o in g.model.opset_import if o.domain in ("", "ai.onnx")), default=0) < 17:
        return 0
    for reduce in [n for n in g.graph.node if n.op_type == "ReduceMean"]:
        match = layer_norm(g, reduce)
        if match is None or g.elem_type(match[0]) != onnx.TensorProto.FLOAT \
                or any(id(n) in g.removed for n in match[3]):
            continue
        x, gamma, eps, nodes, y = match
        gamma = gamma or g.ones(g.shape(reduce.input[0])[-1])  # rms_norm: static when weightless
        g.replace(nodes, [helper.make_node("LayerNormalization", [x, gamma], [y], name=f"{reduce.name}_layer_norm",
                                           axis=-1, epsilon=eps)])
        report.fusions["layer_norm"] += 1
    return report.fusions["layer_norm"]


def _fuse_skip_layer_norm(g: _Graph, report: FuseReport) -> None:
    """Residual ``Add`` + ``LayerNormalization`` over the hidden axis (Phi's, GPT-J's, StableLM's, Falcon's)
    -> ``com.microsoft.SkipLayerNormalization`` (beta optional, as in the op); a norm with
    no such Add before it (the first layer's) is already one node and stays. A norm whose mean / inverse
    standard deviation outputs are read is left alone (the kernel's are not the same outputs)."""
    for norm in [n for n in g.graph.node if n.op_type == "LayerNormalization"]:
        x, shape = norm.input[0], g.shape(norm.input[0])
        gamma = g.inits.get(norm.input[1])
        if len(norm.output) > 1 and any(norm.output[1:]) or shape is None or len(shape) != 3 \
                or g.attr(norm, "axis", -1) not in (-1, 2) or gamma is None or list(gamma.dims) != [shape[2]] \
                or g.elem_type(x) != onnx.TensorProto.FLOAT:
            continue
        residual = _residual_add(g, norm, x)
        if residual is None:
            continue
        fused = helper.make_node("SkipLayerNormalization", [*residual.input, *norm.input[1:3]],
                                 _skip_outputs(g, x, norm.output[0], [norm]), name=f"{residual.name}_skip_layer_norm",
                                 domain=MS_DOMAIN, epsilon=g.attr(norm, "epsilon", 1e-5))
        g.replace([residual, norm], [fused])
        report.fusions["skip_layer_norm"] += 1


# ---------------------------------------------------------------- rotary embedding (rotate half)

def _frequencies(g: _Graph, name: str):
    """The rotary's inverse frequencies ``name``: a constant -> ("", (table,)); or Where(cond, a, b) of two
    constant tables, picked by a condition per call (a scalar: Hugging Face's longrope, the long factors
    when the call's largest position is past the original context) or per row (batch, 1, 1) (longrope as
    vlm-export loads it, adapters.loading.longrope_per_row) -> (cond, (a, b)). Else None."""
    table = g.const(name)
    if table is not None:
        return "", (table.reshape(-1).astype(np.float32),)
    where = g.producer.get(name)
    cond = None if where is None or where.op_type != "Where" else g.shape(where.input[0])
    if cond is None or not (cond == [] or len(cond) == 3 and cond[1:] == [1, 1]):
        return None
    tables = [g.const(i) for i in where.input[1:]]
    if any(t is None for t in tables) or tables[0].size != tables[1].size:
        return None
    return where.input[0], tuple(t.reshape(-1).astype(np.float32) for t in tables)


def _angle_source(g: _Graph, trig: onnx.NodeProto, op: str):
    """Follow cos/sin back: [Mul(scale)] <- Cos|Sin <- [Concat(f, f)] <- Mul(Cast(Unsqueeze(pos, -1)), inv_freq)
    (the Concat where cos/sin span the whole head, rotate_half's; none where they span half of it, the
    split halves'). ``trig`` is the Unsqueeze feeding the rotary Mul. Returns (position_ids, condition,
    inverse-frequency tables, scale) (``_frequencies``) or None."""
    if trig.op_type != "Unsqueeze":
        return None
    if unsqueeze_axis(g, trig) != 1:
        return None  # (batch, sequence, dim) -> (batch, 1, sequence, dim): broadcast over heads
    node, scale = g.producer.get(trig.input[0]), 1.0
    if node is not None and node.op_type == "Mul":
        for i in (0, 1):
            s = g.scalar(node.input[1 - i])
            if s is not None and g.producer.get(node.input[i]) is not None:
                node, scale = g.producer[node.input[i]], s
                break
    if node is None or node.op_type != op:
        return None
    freq = g.producer.get(node.input[0])
    if freq is not None and freq.op_type == "Concat":
        if len(freq.input) != 2 or freq.input[0] != freq.input[1] or g.attr(freq, "axis") not in (-1, 2):
            return None
        freq = g.producer.get(freq.input[0])
    if freq is None or freq.op_type != "Mul":
        return None
    for i in (0, 1):
        freqs = _frequencies(g, freq.input[1 - i])
        cast = g.producer.get(freq.input[i])
        if freqs is not None and cast is not None and cast.op_type == "Cast":
            break
    else:
        return None
    unsq = g.producer.get(cast.input[0])
    if unsq is None or unsq.op_type != "Unsqueeze":
        return None
    if unsqueeze_axis(g, unsq) not in (-1, 2):
        return None
    pos = unsq.input[0]
    if g.elem_type(pos) != onnx.TensorProto.INT64 or len(g.shape(pos) or []) != 2:
        return None
    return pos, *freqs, scale


def _rotary_caches(g: _Graph, index: int, condition: str, tables, cos_scale: float, sin_scale: float,
                   max_positions: int, positions: str) -> tuple[str, str, str]:
    """Position-indexed cos/sin caches for the inverse-frequency ``tables``: (cos, sin, the positions to
    index them with). One table: caches (max_positions, half) read at ``positions``. Two tables picked per
    call or per row by ``condition`` (as the exported graph picks its frequencies): ONE pair of caches holding the
    second table's rows then the first's (2 x max_positions, half), read at ``positions`` + max_positions
    when the condition holds. Offsetting the positions costs an Add on (batch, sequence) integers; picking
    whole caches with a Where would copy both pairs every call (~50 MB at 128k positions)."""
    names = (f"rotary_cos_cache_{index}", f"rotary_sin_cache_{index}")
    # the exporter's sub-graph casts position_ids to float and multiplies in fp32: same here
    angles = np.concatenate([np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
                             for inv_freq in tables[::-1]])  # Where(cond, then, else): else first
    g.new_inits += [g.weights.make((np.cos(angles) * np.float32(cos_scale)).astype(np.float32), names[0]),
                    g.weights.make((np.sin(angles) * np.float32(sin_scale)).astype(np.float32), names[1])]
    if not condition:
        return (*names, positions)
    p = f"rotary_positions_{index}"
    offset = numpy_helper.from_array(np.array(max_positions, np.int64), f"{p}_offset")
    g.new_inits.append(offset)
    # a condition per row (batch, 1, 1) -> (batch, 1), a scalar -> (1, 1): broadcast over each row's positions
    rows = numpy_helper.from_array(np.array([-1, 1], np.int64), f"{p}_rows")
    g.new_inits.append(rows)
    g.replace([], [helper.make_node("Cast", [condition], [f"{p}_picked3"], name=f"{p}_picked3", to=onnx.TensorProto.INT64),
                   helper.make_node("Reshape", [f"{p}_picked3", rows.name], [f"{p}_picked"], name=f"{p}_picked"),
                   helper.make_node("Mul", [f"{p}_picked", offset.name], [f"{p}_shift"], name=f"{p}_shift"),
                   helper.make_node("Add", [positions, f"{p}_shift"], [p], name=p)])
    g.types[p] = g.types[positions]  # (batch, sequence) int64: _angle_source checked it
    return (*names, p)


def _rotate_half_input(g: _Graph, cat: onnx.NodeProto | None) -> tuple[str, float] | None:
    """``cat`` = Concat(-x[..., h:], x[..., :h]) on the last axis of a 4-D ``x``, h half its width
    (Llama's rotate_half): (x, 1.0); Concat(x[..., h:], -x[..., :h]) (nanochat's: the same rotation
    with the sine's sign flipped): (x, -1.0); else None."""
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 2 or g.attr(cat, "axis") not in (-1, 3):
        return None
    halves = []  # (the Slice, negated) for the Concat's first and second input
    for name in cat.input:
        node = g.producer.get(name)
        negated = node is not None and node.op_type == "Neg"
        node = g.producer.get(node.input[0]) if negated else node
        if node is None or node.op_type != "Slice":
            return None
        halves.append((node, negated))
    (upper, upper_negated), (lower, lower_negated) = halves
    x = lower.input[0]
    shape = g.shape(x)
    if upper_negated == lower_negated or shape is None or len(shape) != 4 or not isinstance(shape[3], int):
        return None
    half = shape[3] // 2
    upper_range = last_axis_slice(g, upper, x) or (0, 0)  # [half, end) or [half, INT_MAX)
    if last_axis_slice(g, lower, x) != (0, half) or upper_range[0] != half or upper_range[1] < 2 * half:
        return None
    return x, 1.0 if upper_negated else -1.0


def _half(g: _Graph, name: str) -> tuple[str, int] | None:
    """``name`` = the first (0) or second (1) half of a 4-D x's last axis, by Split or Slice: (x, which)."""
    node = g.producer.get(name)
    if node is None or node.op_type not in ("Split", "Slice"):
        return None
    x = node.input[0]
    shape = g.shape(x)
    if shape is None or len(shape) != 4 or not isinstance(shape[3], int) or shape[3] % 2:
        return None
    half = shape[3] // 2
    if node.op_type == "Split":
        sizes = g.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if len(node.output) != 2 or g.attr(node, "axis", 0) not in (-1, 3) \
                or (sizes is not None and list(sizes.reshape(-1)) != [half, half]):
            return None
        return x, list(node.output).index(name)
    span = last_axis_slice(g, node, x)
    if span == (0, half):
        return x, 0
    return (x, 1) if span is not None and span[0] == half and span[1] >= 2 * half else None


def _split_halves_rotary(g: _Graph, cat: onnx.NodeProto) -> tuple[str, str, str, list[onnx.NodeProto]] | None:
    """``cat`` = Concat(x1 * cos - x2 * sin, x2 * cos + x1 * sin) on the last axis, x1 and x2 the halves of a
    4-D x (gpt-oss's rotary: the same rotation as rotate_half's, written on the halves, cos/sin half as
    wide): (x, cos, sin, the nodes it replaces), else None."""
    if cat.op_type != "Concat" or len(cat.input) != 2 or g.attr(cat, "axis") not in (-1, 3):
        return None
    sub, add = (g.producer.get(i) for i in cat.input)
    if sub is None or add is None or sub.op_type != "Sub" or add.op_type != "Add":
        return None
    terms = {}  # (which half, the Sub's or the Add's) -> (x, the other factor, the Mul)
    for outer in (sub, add):
        if g.sole_consumer(outer.output[0], "Concat") is not cat:
            return None
        for name in outer.input:
            mul = g.producer.get(name)
            if mul is None or mul.op_type != "Mul" or g.sole_consumer(name, outer.op_type) is not outer:
                return None
            found = next(((h, mul.input[1 - i]) for i, h in enumerate(map(lambda n: _half(g, n), mul.input)) if h), None)
            if found is None:
                return None
            (x, which), factor = found
            terms[which, outer.op_type] = (x, factor, mul, name)
    if len(terms) != 4 or len({t[0] for t in terms.values()}) != 1:
        return None
    x = terms[0, "Sub"][0]
    cos, sin = terms[0, "Sub"][1], terms[1, "Sub"][1]
    # x1 * cos - x2 * sin: the Sub's first input is x1's product; x2 * cos + x1 * sin, in either order
    if sub.input[0] != terms[0, "Sub"][3] or terms[1, "Add"][1] != cos or terms[0, "Add"][1] != sin:
        return None
    return x, cos, sin, [cat, sub, add, *(t[2] for t in terms.values())]


def _rotate_pairs_input(g: _Graph, reshape: onnx.NodeProto | None) -> str | None:
    """``reshape`` = (-x[..., 1::2], x[..., 0::2]) stacked on a new last axis and flattened back, each
    pair of neighbouring channels rotated (GPT-J's layout, Cohere's and GLM's rotate_half):
    Reshape(Concat(Unsqueeze(Neg(Slice(x, 1::2)), -1), Unsqueeze(Slice(x, 0::2), -1), axis=-1)) of a
    4-D ``x``: x, else None."""
    if reshape is None or reshape.op_type != "Reshape":
        return None
    cat = g.producer.get(reshape.input[0])
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 2 or g.attr(cat, "axis") not in (-1, 4):
        return None
    unsq = [g.producer.get(i) for i in cat.input]
    if any(u is None or u.op_type != "Unsqueeze" or unsqueeze_axis(g, u) not in (-1, 4) for u in unsq):
        return None
    neg, even = (g.producer.get(u.input[0]) for u in unsq)
    if neg is None or neg.op_type != "Neg" or even is None or even.op_type != "Slice":
        return None
    x = even.input[0]
    shape, out = g.shape(x), g.shape(reshape.output[0])
    if shape is None or len(shape) != 4 or not isinstance(shape[3], int) or shape[3] % 2 \
            or out is None or len(out) != 4 or out[3] != shape[3]:
        return None
    odd_range = last_axis_slice(g, g.producer.get(neg.input[0]), x, step=2) or (0, 0)
    even_range = last_axis_slice(g, even, x, step=2) or (1, 0)
    if (even_range[0], odd_range[0]) != (0, 1) or min(even_range[1], odd_range[1]) < shape[3]:
        return None
    return x


def _pair_angles(g: _Graph, cos: str, sin: str, width: int, max_positions: int):
    """The angles of a pairwise rotary: ``cos``/``sin`` are (batch, 1, sequence, width), each angle
    repeated for its pair of channels, computed by the graph from ``position_ids`` alone. Exporters spell
    that sub-graph several ways (Cohere repeats the frequencies before the cosine, GLM repeats half of a
    rotate-half table after it), so it is run as it is, by ONNX Runtime, on every position below
    ``max_positions``: the values are the exported graph's own. Returns (positions input, cos table, sin
    table), each (max_positions, width / 2), or why not (the graph then stays as exported)."""
    nodes, inits, inputs, stack, seen = {}, set(), set(), [cos, sin], set()
    graph_inputs = {i.name for i in g.graph.input}
    while stack:
        name = stack.pop()
        if name in seen or not name:
            continue
        seen.add(name)
        node = g.producer.get(name)
        if node is not None:
            nodes[id(node)] = node
            stack += list(node.input)
        elif name in graph_inputs:
            inputs.add(name)
        elif name in g.inits:
            inits.add(name)
        else:
            return f"its angles read {name}, which nothing in the graph computes"
    positions = inputs.pop() if len(inputs) == 1 else ""
    if not positions or g.elem_type(positions) != onnx.TensorProto.INT64 or len(g.shape(positions) or []) != 2:
        return (f"its angles are computed from {sorted(inputs) or 'no graph input'}, "
                "not from one (batch, sequence) int64 input")
    try:
        import onnxruntime as ort

        graph = helper.make_graph(
            topological_order(list(nodes.values()), {positions, *inits}, "the rotary angles"), "rotary_angles",
            [helper.make_tensor_value_info(positions, onnx.TensorProto.INT64, [1, None])],
            [helper.make_empty_tensor_value_info(cos), helper.make_empty_tensor_value_info(sin)],
            [numpy_helper.from_array(g.const(name), name) for name in sorted(inits)])
        model = helper.make_model(graph, opset_imports=list(g.model.opset_import), ir_version=g.model.ir_version)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

        def angles(ids: list[int]) -> list[np.ndarray] | None:
            outs = session.run(None, {positions: np.array([ids], np.int64)})
            # broadcast over the heads of a (batch, heads, sequence, head size) x, the layout RotaryEmbedding
            # reads (GPT-J rotates before its head transpose: (1, sequence, 1, width))
            ok = all(o.shape == (1, 1, len(ids), width) for o in outs)
            return [o.reshape(len(ids), width) for o in outs] if ok else None

        last = max_positions - 1
        # a short call and a long one, positions out of order: each must read the table's own rows (a table
        # picked by the call's largest position, as longrope's, gives the short call other angles)
        probes = [[min(3, last), 0, min(2, last), min(1, last)], [last, 0, max_positions // 2, min(5, last)]]
        short = angles(probes[0])
        if short is None:
            return ("its angles are not (1, 1, sequence, rotated channels): "
                    "not broadcast over (batch, heads, sequence, head size)")
        table, long = angles(list(range(max_positions))), angles(probes[1])
    except Exception as e:  # noqa: BLE001 - the reason goes to the report; the graph stays as exported
        why = (str(e).splitlines() or [type(e).__name__])[0][:160]
        return f"its angle sub-graph did not run alone on ONNX Runtime ({why})"
    if table is None or long is None or not all(
            np.allclose(got, t[ids], rtol=0, atol=1e-6) for ids, probe in zip(probes, (short, long))
            for got, t in zip(probe, table)):
        return "a position's angles depend on the other positions of the call"
    if not all(np.array_equal(t[:, 0::2], t[:, 1::2]) for t in table):
        return "its angles are not repeated for each pair of channels"
    return positions, *(np.ascontiguousarray(t[:, 0::2], dtype=np.float32) for t in table)


def _fuse_rotary(g: _Graph, report: FuseReport, max_positions: int) -> None:
    caches: dict[tuple, tuple[str, str, str]] = {}
    pairs: dict[tuple[str, str], tuple | str] = {}  # a pairwise rotary's angle tensors -> their tables, or why not
    skipped: dict[str, int] = defaultdict(int)

    def angle_caches(cos_in: str, sin_in: str, width: int, sin_sign: float = 1.0) -> tuple[str, str, str] | None:
        """The caches for cos/sin made from positions and inverse frequencies (``_angle_source``) that
        rotate ``width`` channels, one pair per distinct table and sign of the sine; None for anything else."""
        cos_u, sin_u = g.producer.get(cos_in), g.producer.get(sin_in)
        cos_src = cos_u and _angle_source(g, cos_u, "Cos")
        sin_src = sin_u and _angle_source(g, sin_u, "Sin")
        if not cos_src or not sin_src or cos_src[:2] != sin_src[:2] or len(cos_src[2]) != len(sin_src[2]) \
                or not all(np.array_equal(a, b) for a, b in zip(cos_src[2], sin_src[2])) \
                or cos_src[2][0].size != width // 2:
            return None
        pos, condition, tables, cos_scale = cos_src
        sin_scale = sin_src[3] * sin_sign
        key = (pos, condition, tuple(t.tobytes() for t in tables), cos_scale, sin_scale)
        if key not in caches:
            caches[key] = _rotary_caches(g, len(caches), condition, tables, cos_scale, sin_scale, max_positions, pos)
        return caches[key]

    for add in [n for n in g.graph.node if n.op_type == "Add"]:
        muls = [g.producer.get(i) for i in add.input]
        if len(muls) != 2 or any(m is None or m.op_type != "Mul" for m in muls):
            continue
        # one Mul holds x * cos, the other rotated(x) * sin: rotate_half(x) = Concat(-x2, x1) (or
        # Concat(x2, -x1), the sine's sign flipped), or the pairs' rotation (-x[1::2], x[0::2]) interleaved,
        # whose cos/sin repeat each angle twice
        for cos_mul, sin_mul in (muls, muls[::-1]):
            if any(g.sole_consumer(m.output[0], "Add") is not add for m in muls):
                break  # a product read elsewhere too must stay
            found = None
            for rotated in filter(None, map(g.producer.get, sin_mul.input)):
                half = _rotate_half_input(g, rotated)
                if half is not None:
                    found = half[0], rotated.output[0], False, half[1]
                    break
                x = _rotate_pairs_input(g, rotated)
                if x is not None:
                    found = x, rotated.output[0], True, 1.0
                    break
            if found is None or found[0] not in cos_mul.input:
                continue
            x, rotated, interleaved, sin_sign = found
            cos_in, sin_in = g.other_input(cos_mul, x) or "", g.other_input(sin_mul, rotated) or ""
            width = g.shape(x)[3]
            if interleaved:
                if (cos_in, sin_in) not in pairs:
                    pairs[cos_in, sin_in] = _pair_angles(g, cos_in, sin_in, width, max_positions)
                angles = pairs[cos_in, sin_in]
                if isinstance(angles, str):
                    skipped[angles] += 1
                    break
                pos, tables = angles[0], angles[1:]
                key = ("pairs", pos, *(hashlib.sha256(t.tobytes()).hexdigest() for t in tables))
                if key not in caches:  # one pair of caches per distinct table, as the rotate-half ones
                    names = (f"rotary_cos_cache_{len(caches)}", f"rotary_sin_cache_{len(caches)}")
                    g.new_inits += [g.weights.make(t, name) for t, name in zip(tables, names)]
                    caches[key] = (*names, pos)
                cos, sin, positions = caches[key]
            else:
                found_caches = angle_caches(cos_in, sin_in, width, sin_sign)
                if found_caches is None:
                    continue
                cos, sin, positions = found_caches
            fused = helper.make_node("RotaryEmbedding", [x, positions, cos, sin], [add.output[0]],
                                     name=f"{add.name}_rotary", domain=MS_DOMAIN, interleaved=int(interleaved))
            # the Slices/Neg/Concat and the angle sub-graph now feed nothing: dead-node removal drops them
            g.replace([add, cos_mul, sin_mul], [fused])
            report.fusions["rotary"] += 1
            break
    for cat in [n for n in g.graph.node if n.op_type == "Concat"]:
        halves = _split_halves_rotary(g, cat)
        found_caches = halves and angle_caches(halves[1], halves[2], g.shape(halves[0])[3])
        if found_caches:
            cos, sin, positions = found_caches
            g.replace(halves[3], [helper.make_node("RotaryEmbedding", [halves[0], positions, cos, sin], [cat.output[0]],
                                                   name=f"{cat.name}_rotary", domain=MS_DOMAIN, interleaved=0)])
            report.fusions["rotary"] += 1
    for reason, count in skipped.items():
        report.notes.append(f"{count} pairwise rotary embedding(s) left unfused: {reason}")


# ---------------------------------------------------------------- packed projections

def _fuse_packed_matmul(g: _Graph, report: FuseReport) -> None:
    for attention in [n for n in g.graph.node if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]:
        found = _projections(g, attention)
        if found is None:
            continue
        nodes, adds = found
        act, reads = nodes[0].input[0], list(attention.input[:3])
        weights = [g.weights.read(g.inits[n.input[1]]) for n in nodes]
        name = f"{nodes[0].name}_packed"
        sizes = numpy_helper.from_array(np.array([w.shape[1] for w in weights], np.int64), f"{name}_split")
        packed = g.weights.make(np.concatenate(weights, axis=1), f"{name}_weight")
        del weights  # one layer's weights in memory at a time
        g.new_inits += [packed, sizes]
        new = [helper.make_node("MatMul", [act, packed.name], [f"{name}_out"], name=name)]
        if adds:  # the projections' biases, packed alike: one Add after the packed MatMul
            bias = g.weights.make(np.concatenate([g.const(g.other_input(a, n.output[0]))
                                                  for a, n in zip(adds, nodes)]), f"{name}_bias")
            g.new_inits.append(bias)
            new.append(helper.make_node("Add", [new[0].output[0], bias.name], [f"{name}_biased"], name=f"{name}_add"))
        new.append(helper.make_node("Split", [new[-1].output[0], sizes.name], reads, name=f"{name}_split", axis=-1))
        g.replace(nodes + adds, new)
        report.fusions["packed_matmul"] += 1


def _projections(g: _Graph, attention: onnx.NodeProto) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]] | None:
    """The q, k, v MatMuls (and their bias Adds, Qwen2's and Phi's: all or none) an attention kernel reads,
    when they can be one MatMul: one activation, constant fp32 2-D weights, each output read by this
    kernel alone (``fold_packed_qkv`` then gives it the packed output itself: no Split is left). Other
    MatMuls on the same activation - the MLP beside the attention, Phi's or Cohere's - stay as they are."""
    reads = list(attention.input[:3])
    if "" in reads or len(set(reads)) != 3 or any(g.sole_consumer(r, "GroupQueryAttention") is not attention
                                                  for r in reads):
        return None
    nodes, adds = [], []
    for read in reads:
        node, add = g.producer.get(read), None
        if node is not None and node.op_type == "Add":
            add, node = node, next((g.producer[i] for i in node.input
                                    if i in g.producer and g.producer[i].op_type == "MatMul"), None)
            if node is None or g.sole_consumer(node.output[0], "Add") is not add:
                return None
            adds.append(add)
            bias = g.const(g.other_input(add, node.output[0]))
        if node is None or node.op_type != "MatMul" or node.input[1] not in g.inits or node.output[0] in g.outputs:
            return None
        weight = g.inits[node.input[1]]
        if len(weight.dims) != 2 or weight.data_type != onnx.TensorProto.FLOAT or (add is not None and (
                bias is None or bias.dtype != np.float32 or bias.shape != (weight.dims[1],))):
            return None
        nodes.append(node)
    if len(adds) not in (0, 3) or len({n.input[0] for n in nodes}) != 1 \
            or len({g.inits[n.input[1]].dims[0] for n in nodes}) != 1:
        return None
    return nodes, adds


# ---------------------------------------------------------------- entry points

def fuse_model(model: onnx.ModelProto, max_positions: int = 4096, weights: Weights | None = None,
               layer_windows: Sequence[int | None] | None = (), causal: bool = True) -> FuseReport:
    """Rewrite ``model`` in place (see the module docstring); returns what was fused. ``weights``:
    where external initializers are read from and new ones go (default: the proto). ``layer_windows``,
    ``causal``: as ``fuse_decoder``'s."""
    if max_positions < 1:
        raise ExportError(f"max_positions must be positive, not {max_positions}")
    report = FuseReport(nodes_before=len(model.graph.node))
    g = _Graph(model, weights)
    if _fuse_layer_norm(g, report):
        g.commit()  # before the RMSNorm matcher, which would take a written-out LayerNorm's inner half
    _fuse_skip_rms_norm(g, report)
    _fuse_skip_layer_norm(g, report)
    report.fusions["gelu"] += fuse_tanh_gelu(g)
    g.commit()
    _fuse_rotary(g, report, max_positions)
    g.commit()
    # after rotary (its caches go into the kernel), before packing q/k/v
    if causal:
        fuse_attention(g, report, layer_windows, max_positions)
        g.commit()
    else:
        report.notes.append(f"attention left unfused: {NOT_CAUSAL}")
        report.kv_copied_because = f"no attention over the KV cache fused: {NOT_CAUSAL}"
    _fuse_packed_matmul(g, report)
    g.commit()
    if fold_packed_qkv(g):  # the attention kernel reads the packed q/k/v itself
        g.commit()
    report.nodes_after = len(model.graph.node)
    if report.fused:
        if MS_DOMAIN not in {o.domain for o in model.opset_import}:
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    else:
        report.reason = ("no RMSNorm or LayerNorm after a residual Add, no rotary embedding and no attention "
                         "matched; the graph is left unfused")
    return report


def load_structure(src: Path, what: str) -> tuple[onnx.ModelProto, bool]:
    """The graph at ``src`` without its external weights (a pass reads the few it rewrites), and whether it has any;
    ExportError naming ``what`` when it is missing or unreadable."""
    if not src.is_file():
        raise ExportError(f"no {what} graph at {src}")
    try:
        model = onnx.load(os.fspath(src), load_external_data=False)
    except Exception as e:
        raise ExportError(f"cannot read the ONNX graph {src}: {str(e).splitlines()[0]}") from None
    return model, any(uses_external_data(t) for t in model.graph.initializer)


def fuse_decoder(src: Path, dst: Path, max_positions: int = 4096,
                 layer_windows: Sequence[int | None] | None = (), causal: bool = True) -> FuseReport:
    """Write the fused form of the decoder graph ``src`` to ``dst`` (``src`` unchanged).

    ``max_positions``: rows of the rotary cos/sin caches - the largest position id + 1 the
    decoder will see (the build's max_sequence). ``layer_windows``: each layer's attention window
    (None: the whole sequence) in the order the decoder runs them, which the graph cannot show
    (``DecoderGeometry.layer_windows``); empty: no layer has one; None: some layers have one, which
    is not known. ``causal`` False: the decoder's attention is not causal everywhere
    (``DecoderGeometry.prefill_blocks``), so it is left as exported. A graph nothing matches is
    copied unchanged and the report's ``reason`` says why.

    A graph whose weights are in an external data file (every graph past 1.8 GB) is fused without
    loading them: the pass reads the few it rewrites, spills the packed ones to a scratch file
    beside ``dst`` and copies all of them into ``dst`` (its data file past the threshold, else the
    one-file graph, a tensor at a time) (peak memory: one layer's
    projections, not the model; the demo's 540 MB decoder, held in memory, peaks at ~3.5 GB, most
    of it protobuf serialising the model once)."""
    src, dst = Path(src), Path(dst)
    model, external = load_structure(src, "decoder")
    spill = dst.with_name(dst.name + ".spill")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        report = fuse_model(model, max_positions, Weights(src.parent, spill if external else None), layer_windows,
                            causal)
        save_graph(model, dst, src.parent)
    finally:
        spill.unlink(missing_ok=True)
    return report

