"""SmoothQuant-style int8 for a decoder graph (issue 16, item 4): int8 compute in prefill that keeps
its answers.

Static per-tensor W8A8 fails on LLM decoders: SmolLM2's MatMul inputs carry a few channels in the
thousands, so one range per tensor leaves every other channel a handful of codes (the demo's
decoder: logits cosine -0.67). Two remedies, used together:

* **Smoothing** (Xiao et al., "SmoothQuant", 2023): per input channel ``j`` of a MatMul,
  ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``; ``X / s`` is folded into whatever produces ``X``
  (a normalisation's weight, a per-channel ``Mul``, or the output columns of the linear layer that is
  multiplied in, as the MLP's up projection is for the down projection's input) and ``diag(s) W``
  into the MatMul's weight. Exact in real arithmetic: it only moves the outliers' range from the
  activations (quantized per tensor or per token) into the weights (quantized per output channel).
  ``max|X_j|`` comes from the same image+text calibration pairs as every int8 stage.
* **Per-token dynamic activations** (the ONNX Runtime form): each token's row gets its own scale at
  run time, so a token with a huge activation (the first token's "attention sink") does not flatten
  every other token's. Written as ONNX Runtime's integer kernels read it: ``QuantizeLinear`` to uint8
  with zero point 128 (symmetric codes), ``MatMulIntegerToFloat`` on uint8 weight codes (int32
  accumulation, per-channel weight scales applied in the GEMM's output stage), then the row scale.

TensorRT reads neither contrib ops nor Q/DQ scales computed at run time, so its form (the standard
graph) is the same smoothing and per-token scheme in standard ops: ``x / scale`` through a
symmetric ``QuantizeLinear``/``DequantizeLinear`` pair of constant scale 1 into the MatMul, whose
weights are per-channel ``DequantizeLinear``, and the row scale applied to the product. (Static
per-tensor Q/DQ on the smoothed demo decoder was measured and fails: last-token logits cosine -0.68 on
8 held-out prompts; the first token's activations dwarf the others', which only per-token scales absorb.)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..atomic import write_text
from ..cpu import INT8_DOT_PRODUCT, INT8_DOT_PRODUCT_METADATA
from ..errors import ExportError
from ..export.graph_info import set_metadata
from .probe import activations

#: SmoothQuant's migration strength; 0.5 is the paper's default for most models
SMOOTH_ALPHA = 0.5
#: per-channel symmetric int8 weights
WEIGHT_QMAX = 127
#: the ONNX Runtime form's two integer kernels (``per_token_int8``'s ``kernel``): int8 weights (U8S8),
#: exact and ~2x faster than fp32 on CPUs with VNNI or AMX (``cpu.int8_dot_product``; the demo's
#: prefill: 45 vs 95 ms on a Xeon with AMX), or the weights as uint8 codes + 128 (U8U8): on x86 with
#: AVX2 only, the U8S8 kernel adds pairs of u8 x s8 products in int16 (vpmaddubsw), which saturates
#: (measured on an AMD EPYC: 22% error on a row of a 64-deep MatMul, up to 40% of the largest output on
#: random full-range codes), while U8U8 widens to int16 first and is exact, at about fp32's speed.
#: 7-bit weights or activations (ONNX Runtime's reduce_range advice) are exact too, but cost the demo
#: decoder's last-token logits cosine 0.936 / 0.960 (8 held-out prompts) against 0.988-0.998 with 8 bits.
KERNELS = ("u8s8", "u8u8")
WEIGHT_ZERO_POINT = 128
ACTIVATION_ZERO_POINT = 128  # uint8 codes centred on 128: symmetric activations in unsigned form
ACTIVATION_QMAX = 127
MS_DOMAIN = "com.microsoft"
#: normalisations whose output is ``normalised * gamma (+ beta)``: (gamma input, beta input or None)
NORMS = {"SimplifiedLayerNormalization": (1, None), "RMSNormalization": (1, None), "LayerNormalization": (1, 2),
         "SkipSimplifiedLayerNormalization": (2, None), "SkipLayerNormalization": (2, 3)}


@dataclass
class _Fold:
    """Where ``X / s`` goes: per-channel vectors of ``X``'s producer (``vectors``), or the columns
    ``[start, stop)`` of the weight that produces the factor multiplied into ``X`` (``columns``)."""

    vectors: tuple[str, ...] = ()
    columns: tuple[str, int, int] | None = None


@dataclass
class _Group:
    """MatMuls that read one activation tensor, and how their input is smoothed (None: not)."""

    tensor: str
    matmuls: list[onnx.NodeProto]
    fold: _Fold | None


def weighted_matmuls(model: onnx.ModelProto, keep: Iterable[str] = ()) -> list[onnx.NodeProto]:
    """MatMuls whose B is a 2-D float initializer read by nothing else (the quantizable ones; a tied
    LM head reads a Transpose and is kept out by the caller anyway)."""
    inits = {i.name: i for i in model.graph.initializer}
    uses = _uses(model)
    keep = set(keep)
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.name not in keep and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2 and inits[n.input[1]].data_type == TensorProto.FLOAT
            and uses[n.input[1]] == 1]


def _uses(model: onnx.ModelProto) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for out in model.graph.output:
        uses[out.name] = uses.get(out.name, 0) + 1
    return uses


def untie(model: onnx.ModelProto, matmuls: Iterable[str]) -> list[str]:
    """Give each of the named MatMuls whose B is the ``Transpose`` of a 2-D initializer (a tied LM
    head: the embedding table, also read by the token lookup) its own transposed copy, so that it
    can be smoothed and quantized like any weight while the lookup keeps the fp32 table. Returns
    the MatMuls untied. (``weight_only._targets`` finds such weights for the weight-only forms too.)"""
    from .weight_only import _targets, drop_unused

    names = set(matmuls)
    inits = {i.name for i in model.graph.initializer}
    others = {n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in names}
    untied = []
    for target in _targets(model, others):
        if target.node.input[1] in inits:  # its own weight already
            continue
        weight = f"{target.node.name}_weight"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(target.weight()), weight))
        target.node.input[1] = weight
        untied.append(target.node.name)
    if untied:
        drop_unused(model.graph)  # the Transpose, now read by nothing
    return untied


def gemms_as_matmuls(model: onnx.ModelProto) -> list[str]:
    """Rewrite each Gemm ``A x B (+ C)`` whose B is a 2-D float initializer it alone reads (OPT's fc1 /
    fc2, which read 2-D hidden states) as a MatMul of the same name on B as [K, N] (+ an Add of C),
    so it is smoothed, quantized and ranked like any layer; ``--keep-node`` names still match.
    Returns the Gemms rewritten."""
    from .weight_only import _targets

    uses = _uses(model)
    targets = {t.index: t for t in _targets(model, set()) if t.node.op_type == "Gemm" and uses[t.source.name] == 1
               and t.source.data_type == TensorProto.FLOAT}
    nodes = []
    for index, node in enumerate(model.graph.node):
        t = targets.get(index)
        if t is None:
            nodes.append(node)
            continue
        if t.transposed:  # its own weight: nothing else reads it
            t.source.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(t.weight()), t.source.name))
        product = f"{node.name}_product" if t.bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], t.source.name], [product], name=node.name))
        if t.bias:
            nodes.append(helper.make_node("Add", [product, t.bias], [node.output[0]], name=f"{node.name}_bias"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return [t.node.name for t in targets.values()]


def groups(model: onnx.ModelProto, keep: Iterable[str] = ()) -> list[_Group]:
    """The quantizable MatMuls grouped by their input, each with the fold its smoothing uses (None
    where the input has consumers that are not quantized MatMuls, or no producer to fold into)."""
    targets = weighted_matmuls(model, keep)
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for node in targets:
        by_input.setdefault(node.input[0], []).append(node)
    uses = _uses(model)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = []
    for tensor, matmuls in by_input.items():
        fold = _fold(tensor, matmuls[0], producers, inits, uses) if uses[tensor] == len(matmuls) else None
        found.append(_Group(tensor, matmuls, fold))
    return found


def _fold(tensor: str, matmul: onnx.NodeProto, producers, inits, uses: dict[str, int]) -> _Fold | None:
    k = inits[matmul.input[1]].dims[0]

    def vector(name: str) -> bool:  # a per-channel constant of X, read only here
        return name in inits and list(inits[name].dims) == [k] and uses[name] == 1

    node = producers.get(tensor)
    if node is None:
        return None
    if node.op_type in NORMS and node.output[0] == tensor:
        gamma, beta = NORMS[node.op_type]
        names = [node.input[i] for i in (gamma, beta) if i is not None and len(node.input) > i and node.input[i]]
        return _Fold(vectors=tuple(names)) if names and all(vector(n) for n in names) else None
    if node.op_type != "Mul":
        return None
    constant = [name for name in node.input if vector(name)]
    if constant:
        return _Fold(vectors=(constant[0],))
    for operand in node.input:  # X = f(...) * (A @ W)[:, columns]: scale those columns of W
        columns = _linear_columns(operand, producers, inits, uses)
        if columns:
            return _Fold(columns=columns)
    return None


def _linear_columns(name: str, producers, inits, uses) -> tuple[str, int, int] | None:
    """``name`` as columns of one constant-weight MatMul's output, read only through ``name``:
    the MatMul's output itself, or one piece of its last-axis Split (packed gate/up)."""
    if uses.get(name) != 1 or name not in producers:
        return None
    node = producers[name]

    def weight_of(matmul) -> str | None:
        w = matmul.input[1] if matmul.op_type == "MatMul" else None
        return w if w in inits and len(inits[w].dims) == 2 and uses[w] == 1 else None

    if node.op_type == "MatMul" and weight_of(node):
        return weight_of(node), 0, inits[node.input[1]].dims[1]
    if node.op_type != "Split" or uses.get(node.input[0]) != 1 or node.input[0] not in producers:
        return None
    source = producers[node.input[0]]
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    if source.op_type != "MatMul" or not weight_of(source) or axis != -1 or len(node.input) < 2 \
            or node.input[1] not in inits:
        return None
    sizes = numpy_helper.to_array(inits[node.input[1]]).tolist()
    index = list(node.output).index(name)
    start = int(sum(sizes[:index]))
    return source.input[1], start, start + int(sizes[index])


def channel_maxima(model: onnx.ModelProto, tensors: list[str], feeds: Iterable[Mapping[str, np.ndarray]],
                   threads: int = 2) -> dict[str, np.ndarray]:
    """``max |x|`` per last-axis channel of each of ``tensors`` over every token of every feed,
    from ONNX Runtime running ``model`` (fp32) with those tensors as extra outputs."""
    maxima: dict[str, np.ndarray] = {}
    for values in activations(model, tensors, feeds, threads):
        for name, value in values.items():
            m = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
            maxima[name] = m if name not in maxima else np.maximum(maxima[name], m)
    if not maxima:
        raise ExportError("no calibration inputs to measure the activations' channel ranges")
    return maxima


def save_calibration(path: Path, maxima: Mapping[str, np.ndarray], fallback: Mapping | None = None) -> None:
    """Keep the channel maxima (and the fp32 fallback chosen on them, ``sensitivity.Fallback.to_dict``)."""
    write_text(path, json.dumps({"channel_max": {k: v.astype(float).tolist() for k, v in maxima.items()},
                                 "fp32_fallback": dict(fallback) if fallback is not None else None}))


def load_calibration(path: Path) -> tuple[dict[str, np.ndarray], dict | None] | None:
    """The cached channel maxima and fp32 fallback, or None when missing or unreadable (then they
    are measured again)."""
    try:
        data = json.loads(path.read_text())
        maxima = {k: np.asarray(v, np.float32) for k, v in data["channel_max"].items()}
        fallback = data["fp32_fallback"]
        return maxima, (dict(fallback) if fallback is not None else None)
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return None


def smooth(model: onnx.ModelProto, maxima: Mapping[str, np.ndarray], alpha: float = SMOOTH_ALPHA,
           keep: Iterable[str] = ()) -> dict:
    """Fold SmoothQuant's per-channel scales into ``model`` in place (same function in real
    arithmetic). Returns what the manifest records: alpha, how many inputs were smoothed and into
    what, and the largest activation range before and after."""
    _own_vectors(model, keep)
    inits = {i.name: i for i in model.graph.initializer}
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(inits[name]).astype(np.float32)
        return arrays[name]

    done = {"norm_or_scale": 0, "linear_columns": 0}
    unsmoothed, before, after = [], 0.0, 0.0
    for group in groups(model, keep):
        x = maxima.get(group.tensor)
        if group.fold is None or x is None:
            unsmoothed += [n.name for n in group.matmuls]
            continue
        w = np.max([np.abs(array(n.input[1])).max(axis=1) for n in group.matmuls], axis=0)
        # s_j = max|X_j|^alpha / max|W_j|^(1-alpha); a channel never seen non-zero keeps s = 1
        s = np.where((x > 0) & (w > 0),
                     np.power(np.maximum(x, 1e-12), alpha) / np.power(np.maximum(w, 1e-12), 1 - alpha), 1.0)
        s = np.clip(s, 1e-5, 1e5).astype(np.float32)
        before, after = max(before, float(x.max())), max(after, float((x / s).max()))
        for node in group.matmuls:
            arrays[node.input[1]] = array(node.input[1]) * s[:, None]
        if group.fold.vectors:
            for name in group.fold.vectors:
                arrays[name] = array(name) / s
            done["norm_or_scale"] += 1
        else:
            weight, start, stop = group.fold.columns
            arrays[weight] = array(weight).copy()
            arrays[weight][:, start:stop] /= s
            done["linear_columns"] += 1
    for name, value in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return {"alpha": alpha, "smoothed_inputs": done, "unsmoothed_matmuls": unsmoothed,
            "activation_max_before": round(before, 2), "activation_max_after": round(after, 2)}


def _own_vectors(model: onnx.ModelProto, keep: Iterable[str]) -> None:
    """Give each producer of a quantized MatMul's input (a norm, a ``Mul``) private copies of the 1-D
    constants it reads: an exporter may share one tensor between layers (a fresh model's norm
    weights are all ones), and each layer's smoothing divides its own copy."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    uses = _uses(model)
    for tensor in {n.input[0] for n in weighted_matmuls(model, keep)}:
        node = producers.get(tensor)
        if node is None or (node.op_type not in NORMS and node.op_type != "Mul"):
            continue
        for k, name in enumerate(node.input):
            if name in inits and len(inits[name].dims) == 1 and uses[name] > 1:
                copy = onnx.TensorProto()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}__{node.name or node.output[0]}"
                model.graph.initializer.append(copy)
                node.input[k] = copy.name
                uses[name] -= 1


#: the two written forms of per-token int8 (``per_token_int8``)
FORMS = ("onnxruntime", "qdq")


def int8_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [K, N] rounded to nearest: per-output-channel symmetric int8 codes [K, N] and scales [N]."""
    scale = np.maximum(np.abs(w).max(axis=0) / WEIGHT_QMAX, np.finfo(np.float32).tiny).astype(np.float32)
    return np.clip(np.rint(w / scale), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8), scale


def per_token_int8(model: onnx.ModelProto, keep: Iterable[str] = (), form: str = "onnxruntime",
                   kernel: str = "u8u8", weights: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> int:
    """Rewrite every quantizable MatMul of ``model`` (in place) to int8 with per-token dynamic
    activations: per row of the input ``scale = max|x| / 127``, codes ``round(x / scale)``; weights
    per-channel symmetric (``WEIGHT_QMAX``); the product times ``scale``. MatMuls reading one input
    share its quantization. ``form``:

    * ``onnxruntime``: activations as uint8 codes + 128 (symmetric values), weights as int8
      (``kernel`` u8s8) or as uint8 codes + 128 (u8u8; see ``KERNELS``), into ``MatMulIntegerToFloat``,
      whose int32 GEMM applies the weight scales in its output stage (ONNX Runtime's CPU kernels);
    * ``qdq``: standard ops only, symmetric int8 with zero point 0: ``QuantizeLinear`` /
      ``DequantizeLinear`` at the constant scale 1/127 on ``x / max|x|`` (constant scales, as
      TensorRT's explicit quantization requires), per-channel ``DequantizeLinear`` on the weights,
      ``MatMul``, then the row's ``max|x|`` (after the MatMul, so the Q/DQ pair feeds it directly).

    ``weights``: per MatMul name, its int8 codes and scales chosen elsewhere (GPTQ); the others are
    rounded to nearest (``int8_weights``). Returns how many MatMuls were rewritten."""
    if form not in FORMS:
        raise ExportError(f"per-token int8 form {form!r} is not one of {', '.join(FORMS)}")
    if kernel not in KERNELS:
        raise ExportError(f"int8 kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    targets = weighted_matmuls(model, keep)
    if not targets:
        raise ExportError("no MatMul with constant weights to quantize in this graph")
    ort_form = form == "onnxruntime"
    zero_point = np.array(ACTIVATION_ZERO_POINT, np.uint8) if ort_form else np.array(0, np.int8)
    new_inits = [numpy_helper.from_array(np.array([-1], np.int64), "pt_axes"),
                 numpy_helper.from_array(np.array(1.0 / ACTIVATION_QMAX, np.float32), "pt_inv_qmax"),
                 numpy_helper.from_array(np.array(np.finfo(np.float32).tiny, np.float32), "pt_tiny"),
                 numpy_helper.from_array(zero_point, "pt_zero_point")]
    unsigned_weights = ort_form and kernel == "u8u8"
    if ort_form:
        weight_zero_point = np.array(WEIGHT_ZERO_POINT if unsigned_weights else 0, np.uint8 if unsigned_weights else np.int8)
        new_inits.append(numpy_helper.from_array(weight_zero_point, "pt_weight_zero_point"))
    quantized: dict[str, tuple[str, str]] = {}  # input -> (its codes, its row scale)
    replaced: dict[str, list[onnx.NodeProto]] = {}
    for node in targets:
        x, name = node.input[0], node.name or node.output[0]
        nodes = []
        if x not in quantized:
            p = f"{x}_pt"
            nodes += [helper.make_node("Abs", [x], [f"{p}_abs"], name=f"{p}_abs"),
                      helper.make_node("ReduceMax", [f"{p}_abs", "pt_axes"], [f"{p}_absmax"], name=f"{p}_absmax",
                                       keepdims=1),
                      # x / max|x| in [-1, 1], quantized at scale 1/127: the 1/127 is a constant of the
                      # Q/DQ and integer GEMM scales, and the row's max|x| multiplies the product
                      # (one op fewer per input than a computed scale; decode runs ~100 of them a step)
                      helper.make_node("Max", [f"{p}_absmax", "pt_tiny"], [f"{p}_scale"], name=f"{p}_scale"),
                      helper.make_node("Div", [x, f"{p}_scale"], [f"{p}_scaled"], name=f"{p}_scaled"),
                      helper.make_node("QuantizeLinear", [f"{p}_scaled", "pt_inv_qmax", "pt_zero_point"], [f"{p}_q"],
                                       name=f"{p}_q")]
            codes = f"{p}_q"
            if not ort_form:
                nodes.append(helper.make_node("DequantizeLinear", [codes, "pt_inv_qmax", "pt_zero_point"], [f"{p}_dq"],
                                              name=f"{p}_dq"))
                codes = f"{p}_dq"
            quantized[x] = (codes, f"{p}_scale")
        codes, scale = quantized[x]
        w_q, w_scale = (weights or {}).get(name) or int8_weights(numpy_helper.to_array(inits[node.input[1]]))
        if unsigned_weights:  # U8U8: the int8 values as uint8 codes + 128 (see KERNELS)
            w_q = (w_q.astype(np.int16) + WEIGHT_ZERO_POINT).astype(np.uint8)
        new_inits += [numpy_helper.from_array(w_q, f"{name}_Wq"), numpy_helper.from_array(w_scale, f"{name}_Wscale")]
        if ort_form:
            nodes.append(helper.make_node("MatMulIntegerToFloat", [codes, f"{name}_Wq", "pt_inv_qmax", f"{name}_Wscale",
                                                                   "pt_zero_point", "pt_weight_zero_point"],
                                          [f"{name}_unscaled"],
                                          name=f"{name}_int8", domain=MS_DOMAIN))
        else:
            nodes += [helper.make_node("DequantizeLinear", [f"{name}_Wq", f"{name}_Wscale"], [f"{name}_W"],
                                       name=f"{name}_Wdq", axis=1),
                      helper.make_node("MatMul", [codes, f"{name}_W"], [f"{name}_unscaled"], name=name)]
        nodes.append(helper.make_node("Mul", [f"{name}_unscaled", scale], list(node.output), name=f"{name}_rowscale"))
        replaced[node.output[0]] = nodes
    ordered = []
    for node in graph.node:
        ordered += replaced.get(node.output[0], [node]) if node.op_type == "MatMul" else [node]
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(new_inits)
    from .weight_only import drop_unused

    drop_unused(graph)
    if ort_form and MS_DOMAIN not in {o.domain for o in model.opset_import}:
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if ort_form and not unsigned_weights:
        set_metadata(model, INT8_DOT_PRODUCT_METADATA, ",".join(INT8_DOT_PRODUCT))
    return len(targets)
