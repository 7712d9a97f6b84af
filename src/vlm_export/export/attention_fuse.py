"""The decoder's attention -> ``com.microsoft.GroupQueryAttention`` (one kernel per layer), by pattern.

torch.onnx (dynamo) writes a decoder layer's attention as small standard nodes: q/k/v reshaped to
(batch, heads, sequence, head_size) and transposed, rotary on q and k, the KV grown by ``Concat`` of
the past and the new step, ``repeat_kv`` (Unsqueeze/Expand/Reshape: a copy of the whole cache per
layer per step when kv heads < heads), ``MatMul`` -> scale -> ``Add`` (the additive mask) ->
``Softmax`` -> ``MatMul`` -> Transpose/Reshape back to (batch, sequence, hidden). This rewrite
replaces all of it, from the q/k/v projections' 3-D outputs to the o_proj input, by ONNX Runtime's
GroupQueryAttention, which rotates q and k, reads the un-repeated KV, concatenates past and new
itself and writes ``present`` (BNSH, as before). Everything is read from the graph: heads and kv heads from the
tensors' shapes, the head size, the scale from the scalar the scores are multiplied by, the
repeat from the Expand. No model type is consulted.

The decoder's external interface is unchanged (same inputs and outputs); GroupQueryAttention's
extra inputs are computed inside the graph:

* the lengths come from the attention mask (batch, total), not from the past's shape:
  ``total_sequence_length`` = the mask's width, and per row ``seqlens_k`` = T - 1 where T = the
  last column the mask marks real, + 1. GroupQueryAttention assumes right padding (a row's valid
  tokens are its first ``seqlens_k + 1``, the new ones written at T - new); the runtime's batch
  (contract.scheme.DecodeBatch) left-pads prompts and lets rows join a running batch, so a row's KV
  can have masked holes anywhere, but its newest position is always the last column: T = the
  width for every row, which declares every row full and makes the kernel's causal window exactly
  the physical one the exported graph used (past length = total - new for every row). Read from
  the mask, the same graph also runs on ONE preallocated buffer bound as past and present
  (contract.scheme.SlotBatch): rows left-aligned at their own lengths T, the mask as wide as the
  longest; a row whose mask is all zero is an idle slot (``query_seqlens`` 0: its cache is left
  as it is). The exporter's own reads of the past length (``Shape(past)[2]``, which feeds its
  causal mask) become mask width - new tokens, the same value on the growing cache and the right
  one on the buffer, whose dimension 2 is its capacity; the graph says it can run so in its
  metadata (``contract.scheme.KV_IN_PLACE``). Checked on ONNX Runtime 1.32 (tests/test_shared_kv.py):
  past and present bound to one OrtValue are one buffer (the kernel compares the pointers), the
  present is as long as the buffer (max(total, past length)), row b's new K/V go to columns
  [T - new, T) and its attention reads columns [0, T) only, so a slot's stale columns past T are
  never read; and
* ``attention_bias`` = the exported graph's own additive mask (batch, 1, sequence, total): the
  padding holes (and whatever else the exporter folded into it: causal, sliding window) get the
  same finite minimum added as before. So left padding and holes give the exported graph's answers.
  A position bias added to the scores before the mask (T5's relative one: scores + bias + mask, no
  scale) is summed into it; one computed from the past's length (Hugging Face's, by column: wrong on
  one buffer of rows at different lengths) leaves the attention unfused instead (the T5 adapter
  computes it per row from position_ids and the mask).
  A layer with a sliding window (which the graph cannot show: the build passes each layer's window)
  instead reads a mask made from the attention mask alone and applies the window in the kernel
  (``local_window_size``), counted back from each row's own length: the exported mask counts it
  back from the widest row's last column, which is right on the growing cache only
  (``_windows_by_attention``). Checked against Hugging Face's generate on a windowed Gemma 3
  (tests/test_scheduler.py).
  (Padded query rows - every key masked - come out uniform over their causal window instead of
  over the whole row; nothing reads them: their keys are masked for every real query and the
  runtime zeroes their cache slots.)
* ``query_seqlens`` = min(new tokens, T) per row (the new tokens' count; 0 for an idle slot): with
  it the kernel takes several new tokens after a past for a batch of rows too (without it, ONNX
  Runtime 1.32 refuses "batch_size must be 1 when sequence_length > 1 and past context is given"), and it makes the
  kernel's rotary read every token's own position (next point); past = total - new, as above.
* rotary moves into the kernel (``do_rotary`` with the rotary pass's cos/sin caches, and its
  ``interleaved`` as ``rotary_interleaved``: the pairs' rotation of Cohere and GLM) and is fed
  the runtime's own ``position_ids`` (each row counting from its first real token). Checked on
  ONNX Runtime 1.32: with ``query_seqlens`` given, the kernel rotates every token by its own
  ``position_ids`` entry, left-padded prefills included (tests/test_fuse.py); without it, a first
  prompt reads only ``position_ids[b, 0]`` and counts up from there (its schema says so), which
  rotates a left-padded row's keys by their column instead of their position. Positions past
  the caches are refused (``position_ids value ... out of range``; a total length past them:
  ``cos_cache dimension 0 shall not be less than total_sequence_length``). Measured on the demo
  decoder (w4, 2 threads, quiet machine): 10.2 ms/token against 11.5 with a separate
  ``RotaryEmbedding`` on q and k.
* attention sinks (gpt-oss's: one logit per head as an extra softmax column, dropped after the softmax;
  Granite SWA's: the attention output scaled by sigmoid(logsumexp(scores) - sink), the same thing written
  after it) become the kernel's ``head_sink``, which adds each head's ``exp(sink)`` to its softmax's
  denominator (``_sinks``, ``_scaled_by_sinks``; ONNX Runtime 1.32, checked against the exported graph by
  the build's parity).
* after the packed-projection pass, ``fold_packed_qkv`` hands the kernel the packed q/k/v
  MatMul's output itself (no ``Split``).
* a KV-shared layer (Gemma 4's last ``num_kv_shared_layers``: no K/V of its own, it reads those an
  earlier layer's attention wrote in the same call) gets no kernel - GroupQueryAttention takes no cache
  without new keys - but reads that kernel's present as it is (``_reader``, ``_rewrite_reader``): its
  first (mask width) columns, the present being as long as the buffer's capacity on one shared buffer;
  its heads grouped over their KV head by reshapes instead of repeat_kv's copy of the cache per layer and
  step; and a mask made row by row from the attention mask as the kernel masks (``_row_bias``: each row's
  own length, its producer's window). So the cache stays one shared buffer. A prefill (more than one new
  token) takes per-head products instead, behind an ``If``: faster there on ONNX Runtime 1.32. Measured on
  a 15-layer random Gemma 4 (9 shared; docs/adapters.md).

Heads not reshaped straight from their projection stay as the graph computes them, and the kernel reads
them reshaped back to (batch, sequence, heads x head size), q/k/v then unpacked: a per-head q/k norm
(Qwen3's RMSNorm before the head transpose; after it Gemma 3's, or StableLM's one LayerNorm per head, any
sub-graph of the transposed heads alone, ``_of_heads_alone``) or a rotary applied before the transpose
(GPT-J's, which the rotary pass leaves: the kernel then rotates nothing).

The kernel has limits its schema does not state, which ONNX Runtime 1.32 enforces only when it runs:
heads a multiple of 8 wide, and of 16 with rotary inside; a rotary width a multiple of 16. A layer whose
heads are beyond the first is left unfused with that reason; one beyond the rotary's keeps the graph's
RotaryEmbedding before a kernel that rotates nothing (heads 24 or 40 wide). Each configuration the pass
would write (heads, kv heads, head size, rotary width and layout, softcap) is first run once on the
installed runtime on tiny inputs (``_runtime_refusal``), so a limit of another version does the same (the
rotary moved out, else the layer unfused, with the runtime's own message) instead of failing the build's
parity.

Requires the rotary pass first when the decoder rotates the transposed heads (q/k from
``RotaryEmbedding`` on them); a rotary the pass leaves is kept where it is a sub-graph of the heads alone
(``_of_heads_alone``: reading only the positions, as Qwen2-VL's M-RoPE of three position streams does), the
kernel then reading the rotated q/k and rotating nothing; any other leaves the layer unfused. A layer that does
not match stays unfused and the report says why.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..contract.scheme import KV_IN_PLACE
from .graph_info import set_metadata
from .patterns import last_axis_slice, unsqueeze_axis

MS_DOMAIN = "com.microsoft"


class _NoMatch(Exception):
    """Why one attention was not fused (a short reason for the report's notes)."""


class _KernelRotaryLimit(_NoMatch):
    """The kernel cannot rotate these heads itself (a head size or rotary width it refuses); it may still
    read them rotated by the graph's own RotaryEmbedding."""


def _scaled(g, name: str) -> tuple[str, float]:
    """Strip Mul/Div-by-scalar-constant nodes above ``name``: (source, product of the factors)."""
    factor = 1.0
    while True:
        node = g.producer.get(name)
        if node is None or node.op_type not in ("Mul", "Div"):
            return name, factor
        if node.op_type == "Div":
            s = g.scalar(node.input[1])
            if s is None or s == 0:
                return name, factor
            factor, name = factor / s, node.input[0]
            continue
        for i in (0, 1):
            s = g.scalar(node.input[1 - i])
            if s is not None and g.const(node.input[i]) is None:
                factor, name = factor * s, node.input[i]
                break
        else:
            return name, factor


def _scores(g, name: str):
    """``name`` = [cap * tanh](scale * Q K^T): (the MatMul, scale, softcap or 0), else None. Gemma 2's
    cap * tanh(scale * Q K^T / cap) becomes the kernel's softcap, applied before the mask as there."""
    scores, scale = _scaled(g, name)
    softcap, tanh = 0.0, g.producer.get(scores)
    if tanh is not None and tanh.op_type == "Tanh":
        scores, inner = _scaled(g, tanh.input[0])
        softcap, scale = scale, inner * scale
    mm = g.producer.get(scores)
    return (mm, scale, softcap) if mm is not None and mm.op_type == "MatMul" else None


def _sinks(g, name: str) -> tuple[str, np.ndarray | None]:
    """``name`` = [c - ReduceMax(c)] for c = Concat(scores, sinks) on the last axis, sinks one constant
    logit per head broadcast to (batch, heads, sequence, 1) (gpt-oss's attention sinks: an extra softmax
    column per head, dropped after it - the kernel's ``head_sink``; subtracting the row's maximum changes
    no softmax): (scores, the logits per head), else (name, None)."""
    node = g.producer.get(name)
    if node is not None and node.op_type == "Sub":
        peak = g.producer.get(node.input[1])
        axes = peak is not None and (g.const(peak.input[1]) if len(peak.input) > 1 and peak.input[1]
                                     else np.array(g.attr(peak, "axes", [])))
        if peak is not None and peak.op_type == "ReduceMax" and peak.input[0] == node.input[0] \
                and g.attr(peak, "keepdims", 1) == 1 and axes is not None and list(axes.reshape(-1)) in ([-1], [3]):
            node = g.producer.get(node.input[0])
    if node is None or node.op_type != "Concat" or len(node.input) != 2 or g.attr(node, "axis") not in (-1, 3):
        return name, None
    shape = g.shape(node.input[1])
    if not shape or len(shape) != 4 or shape[3] != 1:
        return name, None
    values = _constant_through_views(g, node.input[1])
    return (name, None) if values is None else (node.input[0], values.reshape(-1))


def _scaled_by_sinks(g, name: str, logits: str) -> tuple[str, np.ndarray] | None:
    """``name`` (the probabilities times V) multiplied by Unsqueeze(Sigmoid(ReduceLogSumExp(``logits``) -
    sinks), -1), sinks one constant logit per head (Granite SWA's: sigmoid(lse - sink) = sum / (sum +
    exp(sink)), the kernel's ``head_sink`` applied after the softmax): (the product, the logits per head),
    else None."""
    mul = g.sole_consumer(name, "Mul")
    unsqueeze = mul and g.producer.get(g.other_input(mul, name) or "")
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or unsqueeze_axis(g, unsqueeze) not in (-1, 3):
        return None
    sigmoid = _through_casts(g, unsqueeze.input[0])
    sub = sigmoid and sigmoid.op_type == "Sigmoid" and _through_casts(g, sigmoid.input[0])
    lse = sub and sub.op_type == "Sub" and _through_casts(g, sub.input[0])
    if not lse or lse.op_type != "ReduceLogSumExp" or lse.input[0] != logits or g.attr(lse, "keepdims", 1) != 0:
        return None
    axes = g.const(lse.input[1]) if len(lse.input) > 1 and lse.input[1] else np.array(g.attr(lse, "axes", []))
    values = _constant_through_views(g, sub.input[1])
    if axes is None or list(axes.reshape(-1)) not in ([-1], [3]) or values is None:
        return None
    return mul.output[0], values.reshape(-1)


def _through_casts(g, name: str) -> onnx.NodeProto | None:
    """The node producing ``name``, past any Cast (a dtype the model forces, a no-op in fp32)."""
    node = g.producer.get(name)
    while node is not None and node.op_type == "Cast":
        node = g.producer.get(node.input[0])
    return node


def _constant_through_views(g, name: str) -> np.ndarray | None:
    """The constant ``name`` is, through Expand / Reshape / Unsqueeze / Cast of it; else None."""
    while (values := g.const(name)) is None:
        source = g.producer.get(name)
        if source is None or source.op_type not in ("Expand", "Reshape", "Unsqueeze", "Cast"):
            return None
        name = source.input[0]
    return values


def _upstream(g, names: list[str]):
    """``names`` and every tensor they are computed from, each once (one walk up the producers)."""
    seen, stack = set(), list(names)
    while stack:
        x = stack.pop()
        if x in seen:
            continue
        seen.add(x)
        yield x
        node = g.producer.get(x)
        stack += [i for i in node.input if i] if node is not None else []


def _computed_from(g, names: list[str], sources: set[str]) -> bool:
    """Whether any of ``names`` is one of ``sources`` or computed from one of them."""
    return any(x in sources for x in _upstream(g, names))


def _reads_a_cache(g, name: str, graph_inputs: set[str]) -> bool:
    """Whether ``name`` is computed from a rank-4 graph input (a past KV: its values or its shape)."""
    return any(x in graph_inputs and g.producer.get(x) is None and len(g.shape(x) or []) == 4
               for x in _upstream(g, [name]))


def _dims(g, name: str, rank: int) -> list:
    shape = g.shape(name)
    if shape is None or len(shape) != rank:
        raise _NoMatch(f"{name} has no rank-{rank} shape in the graph")
    return shape


def _of_heads_alone(g, name: str, limit: int = 128) -> tuple[str, bool] | None:
    """``name`` = f(Transpose(0,2,1,3)(h)) for a sub-graph f that reads nothing else but constants and the
    token's positions (or the mask) and keeps the transposed heads' (batch, heads, sequence) axes: a
    per-head norm after the transpose (StableLM's per-head LayerNorm as Split / LayerNormalization /
    Concat), GPT-NeoX's q, k or v sliced from each head's packed channels, a rotary followed by such a
    norm (Hunyuan's) or by a scale per position (Ministral 3's): the transpose's output, else None. The
    kernel then reads what f computed. Never a sub-graph reading a past KV (its shape is the buffer's
    capacity on one shared buffer). At most ``limit`` nodes (Qwen3-VL's interleaved M-RoPE after its per-head
    norm: 84). Returns (the transpose's output, whether f
    holds a RotaryEmbedding), else None."""
    shape, seen, frontier, found, rotated = g.shape(name), set(), [name], set(), False
    while frontier:
        x = frontier.pop()
        node = g.producer.get(x)
        if node is None:
            if len(g.shape(x) or []) == 4:
                return None  # a past KV
            continue  # the positions or the mask: the same per row on every form of the KV
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type == "Transpose" and list(g.attr(node, "perm", [])) == [0, 2, 1, 3]:
            found.add(node.output[0])
            continue
        if len(seen) > limit:
            return None
        if _batch_of(g, node):
            continue  # a past's batch: its rows are the step's in every form of the KV (one per slot in place)
        rotated = rotated or node.op_type == "RotaryEmbedding"
        frontier += [i for i in node.input if i and i not in g.inits and node.op_type != "Constant"]
    heads = g.shape(next(iter(found))) if len(found) == 1 else None
    if name in found or not shape or not heads or len(shape) != 4 or len(heads) != 4 or shape[:3] != heads[:3] \
            or not isinstance(shape[3], int):
        return None
    return found.pop(), rotated


def _batch_of(g, node: onnx.NodeProto) -> bool:
    """``node`` = Shape(past, start=0, end=1) of a 4-d graph input (a past K/V): its batch alone, which the exporter
    reads off any input that has it (GLM-4V's M-RoPE reshapes its rotated pairs by the batch of a layer's past
    value)."""
    return node.op_type == "Shape" and node.input[0] not in g.producer and g.attr(node, "start", 0) == 0 \
        and g.attr(node, "end", None) == 1 and len(g.shape(node.input[0]) or []) == 4


def _rotary_above(g, node: onnx.NodeProto | None):
    """``node`` = RotaryEmbedding(x) (every channel rotated), or Concat(RotaryEmbedding(Slice(x, [0, r))),
    Slice(x, [r, end))) on the last axis (the first r channels rotated, the rest passed through: Phi-2's,
    StableLM's partial rotary): (the rotary node, x), else None."""
    if node is not None and node.op_type == "Concat" and len(node.input) == 2 and g.attr(node, "axis") in (-1, 3):
        rotary, rest = (g.producer.get(i) for i in node.input)
        head = rotary and g.producer.get(rotary.input[0])
        x = head.input[0] if head is not None else ""
        first, second = last_axis_slice(g, head, x), last_axis_slice(g, rest, x)
        shape = g.shape(x) if x else None
        width = shape[3] if shape and len(shape) == 4 else None
        if rotary is not None and rotary.op_type == "RotaryEmbedding" and rotary.domain == MS_DOMAIN \
                and isinstance(width, int) and first is not None and first[0] == 0 \
                and second is not None and second[0] == first[1] and second[1] >= width:
            return rotary, x
        return None
    if node is not None and node.op_type == "RotaryEmbedding" and node.domain == MS_DOMAIN:
        return node, node.input[0]
    return None


def _heads(g, name: str, rotary_ok: bool, kernel_rotary: bool = True):
    """``name`` = [rotary]([f](Transpose(0,2,1,3)(h))), h (B, S, heads, head_size), the rotary over
    every channel or the first ones (``_rotary_above``), f any sub-graph of the transposed heads alone
    (``_of_heads_alone``: a per-head norm, a slice of each head's channels) or none. h is mostly
    Reshape(x3) of the projection x3; anything else (a per-head norm, a rotary applied before the
    transpose) stays as exported.
    Returns (x3, rotary node or None, heads, head_size, nodes to add): x3 the projection, or else h
    (or the normed heads) reshaped to (B, S, heads x head_size) by the added nodes (the kernel reads
    what the graph wrote). Without ``kernel_rotary`` a rotary found stays in the graph too: x3 is its
    output flattened, and no rotary node is returned."""
    node, rotary, rotated = g.producer.get(name), None, name
    found = _rotary_above(g, node) if rotary_ok else None
    if found is not None:
        rotary, name = found
        if len(rotary.input) != 4 or g.attr(rotary, "interleaved", 0) not in (0, 1) \
                or g.attr(rotary, "rotary_embedding_dim", 0) or g.attr(rotary, "is_packed_batching", 0) \
                or g.attr(rotary, "scale", 1.0) != 1.0:
            raise _NoMatch(f"{rotary.name}: a rotary embedding other than the rotary pass writes")
    # a per-head norm after the transpose (Gemma 3's RMSNorm, StableLM's LayerNorm), maybe after a rotary; or a
    # rotary the rotary pass left that reads the positions alone (M-RoPE's)
    alone = _of_heads_alone(g, name)
    if found is None and rotary_ok and node is not None and node.op_type in ("Add", "Concat") and alone is None:
        raise _NoMatch(f"{name}: q/k come from an unfused rotary embedding (the rotary pass runs first)")
    below, rotated_first = alone or (None, False)
    if rotated_first and rotary_ok and kernel_rotary:
        raise _KernelRotaryLimit(f"{name}: q/k normed or scaled after their rotary (Hunyuan's norm, Ministral 3's "
                                 "scale per position), which the kernel's own rotary would come after")
    normed_bnsh = name if below else None
    node = g.producer.get(below or name)
    if node is None or node.op_type != "Transpose" or list(g.attr(node, "perm", [])) != [0, 2, 1, 3]:
        one = None if below else _one_head(g, rotated if rotary is not None and not kernel_rotary else name)
        if one is not None:  # the kernel reads it as (B, S, head size); its rotary, where asked, inside
            x3, added = one
            return x3, rotary if kernel_rotary else None, 1, g.shape(name)[3], added
        source = f"a {node.op_type}" if node is not None else "a graph input"
        raise _NoMatch(f"{name}: heads from {source}, neither Transpose(0, 2, 1, 3) of a projection nor a "
                       "function of such heads alone (per head, reading at most the positions)")
    # a sub-graph of the heads may narrow them (GPT-NeoX's slice): its own shape where it has one (the
    # rotary's output may carry none), else the transpose's
    normed_shape = g.shape(normed_bnsh) if normed_bnsh else None
    _, heads, _, head_size = _dims(g, normed_bnsh if normed_shape and len(normed_shape) == 4 else node.output[0], 4)
    if not isinstance(heads, int) or not isinstance(head_size, int):
        raise _NoMatch(f"{name}: heads/head size not static")
    if rotary is not None and not kernel_rotary:
        normed_bnsh, rotary = rotated, None  # the kernel reads what the graph's rotary wrote
    reshape = g.producer.get(node.input[0])
    projection = (g.shape(reshape.input[0]) or []) if reshape is not None and reshape.op_type == "Reshape" else []
    if not normed_bnsh and len(projection) == 3 and projection[2] == heads * head_size:
        return reshape.input[0], rotary, heads, head_size, []  # the projection itself (packable)
    # The heads come from something else in (batch, sequence, heads, head size) - a per-head norm (Qwen3's),
    # a rotary applied before the transpose (GPT-J's) - or are normed after it (Gemma 3's, transposed back
    # here): what the graph computed stays, and the kernel reads it flattened to (B, S, hidden).
    src = node.input[0] if not normed_bnsh else f"{normed_bnsh}_bsnh"
    added: list[onnx.NodeProto] = []
    if normed_bnsh:
        added.append(helper.make_node("Transpose", [normed_bnsh], [src], name=src, perm=[0, 2, 1, 3]))
    batch, _, sequence, _ = _dims(g, node.output[0], 4)
    x3 = f"{src}_flat"
    g.types[x3] = helper.make_tensor_value_info(x3, g.elem_type(node.output[0]),
                                                [batch, sequence, heads * head_size]).type.tensor_type
    added += [helper.make_node("Constant", [], [f"{x3}_shape"], name=f"{x3}_shape", value=helper.make_tensor(
                  f"{x3}_shape", onnx.TensorProto.INT64, [3], [0, 0, heads * head_size])),
              helper.make_node("Reshape", [src, f"{x3}_shape"], [x3], name=x3)]
    return x3, rotary, heads, head_size, added


def _one_head(g, name: str) -> tuple[str, list[onnx.NodeProto]] | None:
    """``name`` holds one head, (B, 1, S, head size) - GPT-BigCode's multi-query k and v, sliced from the
    projection with no transpose -: its (B, S, head size) view, which is the same memory as the transposed
    heads' (B, S, 1 x head size), and the node making it; else None."""
    shape = g.shape(name)
    if not shape or len(shape) != 4 or shape[1] != 1 or not isinstance(shape[3], int):
        return None
    x3 = f"{name}_one_head"
    g.types[x3] = helper.make_tensor_value_info(x3, g.elem_type(name), [shape[0], shape[2], shape[3]]).type.tensor_type
    return x3, [helper.make_node("Constant", [], [f"{x3}_axes"], name=f"{x3}_axes",
                                 value=helper.make_tensor(f"{x3}_axes", onnx.TensorProto.INT64, [1], [1])),
                helper.make_node("Squeeze", [name, f"{x3}_axes"], [x3], name=x3)]


def _unrepeat(g, name: str) -> tuple[str, int]:
    """``name`` = repeat_kv(kv): Reshape(Expand(Unsqueeze(kv, axis 2))) - each kv head repeated
    n_rep times in place, head h reading kv head h // n_rep (GroupQueryAttention's layout) - or kv
    itself. Returns (kv, n_rep)."""
    node = g.producer.get(name)
    if node is not None and node.op_type == "Reshape":
        expand = g.producer.get(node.input[0])
        unsq = expand and g.producer.get(expand.input[0])
        if expand is None or expand.op_type != "Expand" or unsq is None or unsq.op_type != "Unsqueeze":
            raise _NoMatch(f"{name}: a Reshape that is not repeat_kv (Unsqueeze/Expand/Reshape)")
        if unsqueeze_axis(g, unsq) != 2:
            raise _NoMatch(f"{name}: repeat_kv not on axis 2 (heads would not be grouped)")
        kv = unsq.input[0]
        heads, kv_heads = _dims(g, name, 4)[1], _dims(g, kv, 4)[1]
        if not isinstance(heads, int) or not isinstance(kv_heads, int) or heads % kv_heads:
            raise _NoMatch(f"{name}: {heads} heads are not a multiple of {kv_heads} kv heads")
        return kv, heads // kv_heads
    return name, 1


def _cache(g, present: str, graph_inputs: set[str]):
    """``present`` = Concat(past, new, axis=sequence) with ``past`` a graph input: (past, new)."""
    cat = g.producer.get(present)
    if cat is None or cat.op_type != "Concat" or len(cat.input) != 2 or g.attr(cat, "axis") not in (-2, 2):
        raise _NoMatch(f"{present}: the KV is not Concat(past, new) on the sequence axis")
    past, new = cat.input
    if past not in graph_inputs:
        raise _NoMatch(f"{present}: the past KV {past} is not a graph input")
    _dims(g, past, 4)
    return cat, past, new


def _match(g, softmax: onnx.NodeProto, graph_inputs: set[str], kernel_rotary: bool = True) -> dict:
    if g.attr(softmax, "axis", -1) not in (-1, 3):
        raise _NoMatch(f"{softmax.name}: softmax not over the keys")
    logits, sinks = _sinks(g, softmax.input[0])
    add = g.producer.get(logits)
    if add is None or add.op_type != "Add":
        raise _NoMatch(f"{softmax.name}: no additive mask before the softmax")
    position_bias = ""
    for i in (0, 1):
        found = _scores(g, add.input[i])
        inner = g.producer.get(add.input[i])
        if found is None and inner is not None and inner.op_type == "Add":
            # T5's (Q K^T + relative position bias) + mask: the kernel adds both as its attention_bias
            for j in (0, 1):
                found = _scores(g, inner.input[j])
                if found is not None:
                    position_bias = inner.input[1 - j]
                    break
            if position_bias and _reads_a_cache(g, position_bias, graph_inputs):
                # a bias counting the query's position by column (Hugging Face's T5 compute_bias: the past's
                # length + i) would be the widest row's on one shared buffer, and on the growing cache the
                # kernel measured slower than the standard ops (benchmarks/results/t5-fused-epyc/)
                raise _NoMatch(f"{softmax.name}: a position bias computed from the KV cache's length (by column)")
        if found is not None:
            mm, scale, softcap = found
            bias = add.input[1 - i]
            break
    else:
        raise _NoMatch(f"{softmax.name}: the softmax input is not mask + scale * Q K^T")
    bias_shape = _dims(g, bias, 4)
    q4, q_scale = _scaled(g, mm.input[0])
    kt, k_scale = _scaled(g, mm.input[1])
    scale = scale * q_scale * k_scale
    transpose = g.producer.get(kt)
    if transpose is None or transpose.op_type != "Transpose" or list(g.attr(transpose, "perm", [])) != [0, 1, 3, 2]:
        raise _NoMatch(f"{mm.name}: K^T is not Transpose(0, 1, 3, 2)")
    present_k, k_rep = _unrepeat(g, transpose.input[0])
    q3, q_rot, heads, head_size, q_added = _heads(g, q4, rotary_ok=True, kernel_rotary=kernel_rotary)
    unscaled, q_factor = _scaled(g, q3)
    if q_factor != 1.0 and len(g.shape(unscaled) or []) == 3:
        # OPT scales q after its projection: the factor goes into the kernel's scale, and the kernel reads the
        # projection itself, packable with k and v (k's factor would change what the cache holds: not moved)
        q3, scale = unscaled, scale * q_factor
    k_cat, past_k, k4 = _cache(g, present_k, graph_inputs)
    k3, k_rot, kv_heads, k_head_size, k_added = _heads(g, k4, rotary_ok=True, kernel_rotary=kernel_rotary)
    # softmax -> [the sinks' column dropped] -> MatMul(probs, repeat_kv(present_v)) -> Transpose(0,2,1,3) -> Reshape
    probs = softmax.output[0]
    if sinks is not None:
        drop = g.sole_consumer(probs, "Slice")
        if last_axis_slice(g, drop, probs) != (0, -1):
            raise _NoMatch(f"{softmax.name}: the sinks' column is not dropped after the softmax")
        probs = drop.output[0]
    pv = g.sole_consumer(probs, "MatMul")
    if pv is None or pv.input[0] != probs:
        raise _NoMatch(f"{softmax.name}: the probabilities are not only multiplied by V")
    present_v, v_rep = _unrepeat(g, pv.input[1])
    v_cat, past_v, v4 = _cache(g, present_v, graph_inputs)
    v3, _, v_heads, v_head_size, v_added = _heads(g, v4, rotary_ok=False)
    attended = pv.output[0]
    scaled = _scaled_by_sinks(g, attended, softmax.input[0])
    if scaled is not None:
        if sinks is not None:
            raise _NoMatch(f"{softmax.name}: attention sinks both as a softmax column and as a scale after it")
        attended, sinks = scaled
    back = g.sole_consumer(attended, "Transpose")
    # a gate per head between the transpose and the reshape (LFM3's sigmoid gate): kept, applied to the kernel's output
    gate_mul = back and g.sole_consumer(back.output[0], "Mul")
    gate = gate_mul and g.other_input(gate_mul, back.output[0])
    out = back and g.sole_consumer((gate_mul or back).output[0], "Reshape")
    if back is None or list(g.attr(back, "perm", [])) != [0, 2, 1, 3] or out is None:
        raise _NoMatch(f"{pv.name}: the attention output is not Transpose(0, 2, 1, 3) + Reshape")
    if _dims(g, out.output[0], 3)[2] != heads * head_size:
        raise _NoMatch(f"{out.name}: the output width is not heads x head size")
    if gate_mul is not None and list(g.shape(gate) or [])[2:] != [heads, 1]:
        raise _NoMatch(f"{gate_mul.name}: the attention output is multiplied by {gate}, not one gate per head")
    if (kv_heads, k_head_size) != (v_heads, v_head_size) or k_head_size != head_size \
            or heads != kv_heads * k_rep or k_rep != v_rep:
        raise _NoMatch(f"{softmax.name}: q {heads}x{head_size}, k {kv_heads}x{k_head_size} repeated {k_rep}, "
                       f"v {v_heads}x{v_head_size} repeated {v_rep} do not make grouped-query attention")
    # the kernel rotates q and k alike or neither; the graph's own rotaries, kept, can do anything
    if (q_rot is None) != (k_rot is None):
        raise _KernelRotaryLimit(f"{softmax.name}: q rotated by the kernel, k not, or the other way round")
    if q_rot is not None and (list(q_rot.input[1:]) != list(k_rot.input[1:])
                              or g.attr(q_rot, "interleaved", 0) != g.attr(k_rot, "interleaved", 0)):
        raise _KernelRotaryLimit(f"{softmax.name}: q and k are not rotated alike")
    if head_size % 8:
        # ONNX Runtime 1.32's kernel refuses it at run time ("head_size must be a multiple of 8")
        raise _NoMatch(f"{softmax.name}: head size {head_size} is not a multiple of 8")
    if q_rot is not None and head_size % 16:
        # ONNX Runtime 1.32's kernel refuses do_rotary at such sizes ("head_size shall be a multiple of 16")
        raise _KernelRotaryLimit(f"{softmax.name}: head size {head_size} with rotary is not a multiple of 16")
    rotated, interleaved = 0, 0  # channels rotated inside the kernel (0: no rotary), and in pairs or halves
    if q_rot is not None:
        interleaved = g.attr(q_rot, "interleaved", 0)
        pos, cos = q_rot.input[1], g.const(q_rot.input[2])
        # the rotary pass writes constant caches (fuse._rotary_caches); a graph fused elsewhere may compute them
        cos_shape = list(cos.shape) if cos is not None else g.shape(q_rot.input[2])
        rotated = _dims(g, q_rot.input[0], 4)[3]
        if len(g.shape(pos) or []) != 2 or cos_shape is None or len(cos_shape) != 2 or cos_shape[1] * 2 != rotated:
            raise _NoMatch(f"{q_rot.name}: not (batch, sequence) positions and cos/sin caches as wide as the rotated channels")
        if rotated % 16:
            # ONNX Runtime 1.32: "cos_cache dimension 1 must be <= head_size / 2 and a multiple of 8"
            raise _KernelRotaryLimit(f"{softmax.name}: rotary over {rotated} of {head_size} channels, not a multiple of 16")
    if bias_shape[2] is None or bias_shape[2] != _dims(g, q3, 3)[1]:
        raise _NoMatch(f"{bias}: the mask's query dimension is not known to be the new tokens'")
    if bias_shape[1] not in (1, heads):
        raise _NoMatch(f"{bias}: the mask's head dimension {bias_shape[1]} is neither 1 nor {heads}")
    if position_bias:
        b, h, s, t = _dims(g, position_bias, 4)
        if b not in (1, bias_shape[0]) or h not in (1, heads) or (s, t) != tuple(bias_shape[2:]):
            raise _NoMatch(f"{position_bias}: a position bias not shaped (1 | batch, 1 | heads, sequence, total)")
    if not np.isfinite(scale) or scale <= 0 or not np.isfinite(softcap) or softcap < 0:
        raise _NoMatch(f"{softmax.name}: scale {scale}, softcap {softcap}")
    if sinks is not None and sinks.size not in (1, heads):
        raise _NoMatch(f"{softmax.name}: {sinks.size} attention sinks for {heads} heads")
    # the kernel produces this attention's output and its layer's cache: an input computed from them (Doge's
    # mask, made from the layer's values after the cache concatenation) would make the graph feed itself
    own = {k_cat.output[0], v_cat.output[0], out.output[0]}
    if _computed_from(g, [x for x in (q3, k3, v3, bias, position_bias, gate) if x], own):
        raise _NoMatch(f"{softmax.name}: its mask or q/k/v are computed from its own layer's cache or output "
                       "(a mask made from the values, as Doge's), which the kernel would then have to feed itself")
    return dict(q3=q3, k3=k3, v3=v3, added=q_added + k_added + v_added, q_rot=q_rot, k_rot=k_rot,
                past_k=past_k, past_v=past_v, present_k=present_k, present_v=present_v, k_cat=k_cat, v_cat=v_cat, out=out, bias=bias,
                gate=gate,
                mask=_mask_input(g, bias), position_bias=position_bias,
                heads=heads, kv_heads=kv_heads, head_size=head_size, scale=scale, softcap=softcap,
                rotated=rotated, interleaved=interleaved,
                sinks=None if sinks is None else np.broadcast_to(sinks, (heads,)).astype(np.float32))


def _is_2d_of(g, name: str, dim: str) -> bool:
    """Whether ``name`` is (anything, ``dim``)."""
    shape = g.shape(name) or []
    return len(shape) == 2 and shape[1] == dim


def _mask_input(g, bias: str) -> str:
    """The graph input the additive mask ``bias`` (batch | 1, heads | 1, sequence, total) is made
    from: the 2-D input as wide as the keys (the same named dimension)."""
    total = _dims(g, bias, 4)[3]
    found = [i.name for i in g.graph.input if isinstance(total, str) and _is_2d_of(g, i.name, total)]
    if len(found) != 1:
        raise _NoMatch(f"{bias}: no single 2-D graph input (the attention mask) as wide as the keys ({total})")
    return found[0]


def _lengths(g, mask: str, bias: str, prefix: str) -> tuple[list[onnx.NodeProto], str, str, str]:
    """Nodes computing GroupQueryAttention's (seqlens_k, total_sequence_length, query_seqlens) from
    the attention mask (batch, total) and the additive mask (..., sequence, total): per row T = the
    last real column + 1 (0 for a row with none: an idle slot), seqlens_k = max(T - 1, 0),
    query_seqlens = min(T, sequence), total = the mask's width (see the module docstring).
    (The new tokens' count is read off the additive mask, not q: q's producer may later be folded away.)"""
    p, n = _namers(prefix)
    nodes = [
        *_row_totals(mask, prefix, keepdims=0),
        n("Sub", [p("rows_total"), p("one")], "last"),
        n("Max", [p("last"), p("zero")], "last_0"),
        n("Cast", [p("last_0")], "seqlens_k", to=onnx.TensorProto.INT32),
        n("Shape", [bias], "new", start=2, end=3),
        n("Min", [p("rows_total"), p("new")], "query64"),
        n("Cast", [p("query64")], "query_seqlens", to=onnx.TensorProto.INT32),
        n("Cast", [p("width_0d")], "total_sequence_length", to=onnx.TensorProto.INT32),
    ]
    return nodes, p("seqlens_k"), p("total_sequence_length"), p("query_seqlens")


def _namers(prefix: str):
    """(name, node maker) for nodes named ``{prefix}_{name}``: each node's one output is named as the node."""
    p = lambda name: f"{prefix}_{name}"  # noqa: E731
    n = lambda op, inputs, out, **kw: helper.make_node(op, inputs, [p(out)], name=p(out), **kw)  # noqa: E731
    return p, n


def _constant(name: str, value, dtype) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name,
                            value=numpy_helper.from_array(np.array(value, dtype), name))


def _int64(name: str, values: list[int], scalar: bool = False) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=helper.make_tensor(
        name, onnx.TensorProto.INT64, [] if scalar else [len(values)], values))


def _row_totals(mask: str, prefix: str, keepdims: int) -> list[onnx.NodeProto]:
    """Nodes computing, from the attention mask (batch, width), ``{prefix}_rows_total`` = per row T = its last
    real column + 1 (0 for a row with none: an idle slot; (batch,) or with ``keepdims`` (batch, 1)),
    ``{prefix}_columns`` = 0, 1, ..., width - 1, the width as ``{prefix}_width_0d`` and the constants
    ``{prefix}_zero`` / ``{prefix}_one`` (scalars) and ``{prefix}_one_axis`` ([1])."""
    p, n = _namers(prefix)
    return [
        _int64(p("zero"), [0], scalar=True), _int64(p("one"), [1], scalar=True), _int64(p("one_axis"), [1]),
        n("Shape", [mask], "width", start=1, end=2),
        n("Squeeze", [p("width")], "width_0d"),
        n("Range", [p("zero"), p("width_0d"), p("one")], "columns"),  # 0, 1, ..., width - 1
        n("Add", [p("columns"), p("one")], "columns_1"),
        n("Cast", [mask], "mask64", to=onnx.TensorProto.INT64),
        n("Mul", [p("mask64"), p("columns_1")], "marked"),
        n("ReduceMax", [p("marked"), p("one_axis")], "rows_total", keepdims=keepdims),
    ]


def _past_lengths_from_mask(g, pasts: set[str], mask: str, bias: str) -> str:
    """Rewrite the exporter's reads of the past length (``Shape(past, start=2, end=3)``) into
    mask width - new tokens. Returns why the KV cannot be one in-place buffer ("" when it can):
    something other than the attention kernels and those shape reads looks at a past input."""
    sequence = _dims(g, bias, 4)[2]
    new = [i.name for i in g.graph.input if isinstance(sequence, str) and _is_2d_of(g, i.name, sequence)]
    if not new:
        return f"no 2-D graph input of the new tokens' length ({sequence}) to read the past length from"
    for past in sorted(pasts):
        for node in g.consumers.get(past, []):
            if id(node) in g.removed or (node.op_type == "GroupQueryAttention" and node.domain == MS_DOMAIN):
                continue
            if node.op_type != "Shape":
                return f"{node.name} ({node.op_type}) reads the past KV {past}"
            start, end = g.attr(node, "start", 0), g.attr(node, "end")
            if end is not None and 0 <= start < end <= 2:
                continue  # batch or heads: the same on the buffer
            if (start, end) != (2, 3):
                return f"{node.name} reads dimensions {start}:{end} of the past KV {past}"
            out = node.output[0]
            g.replace([node], [
                helper.make_node("Shape", [mask], [f"{out}_width"], name=f"{out}_width", start=1, end=2),
                helper.make_node("Shape", [new[0]], [f"{out}_new"], name=f"{out}_new", start=1, end=2),
                helper.make_node("Sub", [f"{out}_width", f"{out}_new"], [out], name=f"{out}_from_mask")])
    return ""


def _unfused_growing_caches(g, fused_pasts: set[str]) -> list[str]:
    """Graph inputs still grown by a ``Concat`` on the sequence axis into a graph output (a past KV
    an unfused attention concatenates: it could not share a buffer with its present)."""
    inputs, outputs = {i.name for i in g.graph.input}, {o.name for o in g.graph.output}
    found = []
    for node in g.graph.node:
        if id(node) in g.removed or node.op_type != "Concat" or g.attr(node, "axis") not in (-2, 2):
            continue
        past = node.input[0] if node.input else ""
        if past in inputs and past not in fused_pasts and node.output[0] in outputs:
            found.append(past)
    return found


def _padding_bias(g, mask: str, like: str, prefix: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes making an additive mask shaped as ``like`` (batch | 1, heads | 1, sequence, total) from the
    attention mask (batch, total) alone: 0 on real keys, the dtype's lowest on padding and holes - no
    causal part (the kernel applies it) and no window (``local_window_size`` does, per row)."""
    p, n = _namers(prefix)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(g.elem_type(like))
    const = lambda name, value, dt: _constant(p(name), value, dt)  # noqa: E731
    nodes = [const("zero", 0, dtype), const("lowest", np.finfo(dtype).min, dtype), const("axes", [1, 2], np.int64),
             n("Cast", [mask], "real", to=onnx.TensorProto.BOOL),
             n("Where", [p("real"), p("zero"), p("lowest")], "keys"),
             n("Unsqueeze", [p("keys"), p("axes")], "keys4"),
             n("Shape", [like], "shape"),
             n("Expand", [p("keys4"), p("shape")], "bias")]
    return nodes, p("bias")


def _row_bias(mask: str, queries: str, window: int | None, dtype, prefix: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes making an additive mask (batch, 1, sequence, width) from the attention mask (batch, width) row by row,
    as GroupQueryAttention masks with each row's own length: row b's newest token at column T - 1 (T its last
    real column + 1), query i (of the ``queries``' sequence, axis 2) at column T - sequence + i sees key j iff
    the mask marks j real, j <= that column and, with a ``window``, column - j < window (Hugging Face's
    sliding window). On the growing cache every row's T is the width: the exported mask's columns."""
    p, n = _namers(prefix)
    lowest = np.finfo(dtype).min
    nodes = [
        *_row_totals(mask, prefix, keepdims=1),
        _int64(p("axis_2"), [2]),
        n("Shape", [queries], "new", start=2, end=3),
        n("Squeeze", [p("new")], "new_0d"),
        n("Range", [p("zero"), p("new_0d"), p("one")], "query_index"),
        n("Sub", [p("rows_total"), p("new")], "first"),
        n("Add", [p("first"), p("query_index")], "query_column"),  # (batch, sequence)
        n("Unsqueeze", [p("query_column"), p("axis_2")], "query_column_3d"),
        n("Sub", [p("query_column_3d"), p("columns")], "behind"),  # (batch, sequence, width): query - key column
        n("GreaterOrEqual", [p("behind"), p("zero")], "causal"),
        n("Unsqueeze", [mask, p("one_axis")], "mask_3d"),
        n("Cast", [p("mask_3d")], "real", to=onnx.TensorProto.BOOL),
        n("And", [p("causal"), p("real")], "seen"),
    ]
    if window is not None:
        nodes += [_int64(p("window"), [window], scalar=True),
                  n("Less", [p("behind"), p("window")], "in_window"),
                  n("And", [p("seen"), p("in_window")], "seen_in_window")]
    nodes += [
        _constant(p("open"), 0, dtype), _constant(p("lowest"), lowest, dtype),
        n("Where", [nodes[-1].output[0], p("open"), p("lowest")], "bias_3d"),
        n("Unsqueeze", [p("bias_3d"), p("one_axis")], "bias"),
    ]
    return nodes, p("bias")


def _reader(g, softmax: onnx.NodeProto, presents: set[str]) -> dict | None:
    """The attention of a KV-shared layer (Gemma 4's last layers): it computes no K/V of its own but reads the
    ``presents`` an earlier attention's kernel writes, repeated for its heads (repeat_kv), scores = [scale] Q K^T,
    + mask, softmax, times V. Returns its parts, else None (not such a reader)."""
    logits, sinks = _sinks(g, softmax.input[0])
    add = g.producer.get(logits)
    if add is None or add.op_type != "Add" or g.attr(softmax, "axis", -1) not in (-1, 3):
        return None
    for i in (0, 1):
        found = _scores(g, add.input[i])
        if found is not None:
            break
    else:
        return None
    mm, bias = found[0], add.input[1 - i]
    kt, k_scale = _scaled(g, mm.input[1])
    transpose = g.producer.get(kt)
    if transpose is None or transpose.op_type != "Transpose" or list(g.attr(transpose, "perm", [])) != [0, 1, 3, 2]:
        return None
    probs = softmax.output[0]
    if sinks is not None:  # their column dropped after the softmax
        drop = g.sole_consumer(probs, "Slice")
        probs = drop.output[0] if last_axis_slice(g, drop, probs) == (0, -1) else ""
    pv = g.sole_consumer(probs, "MatMul") if probs else None
    if pv is None or pv.input[0] != probs:
        return None
    try:
        (k, k_rep), (v, v_rep) = _unrepeat(g, transpose.input[0]), _unrepeat(g, pv.input[1])
        q_shape, k_shape = _dims(g, mm.input[0], 4), _dims(g, k, 4)
        mask = _mask_input(g, bias)
    except _NoMatch:
        return None
    if k not in presents or v not in presents or k_rep != v_rep or not isinstance(k_shape[1], int) \
            or not isinstance(k_shape[3], int) or q_shape[1] != k_shape[1] * k_rep:
        return None
    return dict(scores=mm, add=add, scores_at=i, pv=pv, k=k, v=v, k_scale=k_scale, kv_heads=k_shape[1],
                head_size=k_shape[3], heads=k_shape[1] * k_rep, bias=bias, mask=mask)


def _one_token(query: str, prefix: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes telling whether ``query`` (batch, heads, sequence, head size) holds one new token (a decode step)."""
    p, n = _namers(prefix)
    return [_int64(p("one"), [1]), n("Shape", [query], "new", start=2, end=3),
            n("Equal", [p("new"), p("one")], "is_one"), n("Squeeze", [p("is_one")], "step")], p("step")


def _rewrite_reader(g, r: dict, bias: str, visible: dict[str, str], step: str) -> list[onnx.NodeProto]:
    """A KV-shared layer's attention reading its producer's present with no copy: the present's first (mask
    width) columns (``visible``: present -> that slice, made once per present; on one shared buffer the present
    is the buffer, as long as its capacity), the heads grouped over their kv head by reshapes instead of
    repeat_kv's copy of the cache per layer, and ``bias`` as its mask. Both products go behind an ``If`` on
    ``step`` (one new token): grouped for a decode step; for a prefill K and V repeated per head once and one
    product per head, which ONNX Runtime 1.32 runs faster than one grouped product over thousands of rows
    (2,000 x 2,000 x 256 per head, 8 heads: 83-92 against 107-122 ms times V, 117 against 126 ms the scores).
    Returns the nodes to add."""
    scores, pv, rep = r["scores"], r["pv"], r["heads"] // r["kv_heads"]
    prefix = scores.name
    p, n = _namers(prefix)
    new: list[onnx.NodeProto] = []
    for present in (r["k"], r["v"]):
        if present not in visible:
            q, m = _namers(f"{present}_visible")
            visible[present] = q("slice")
            new += [_int64(q("start"), [0]), _int64(q("axis"), [2]),
                    m("Shape", [r["mask"]], "width", start=1, end=2),
                    m("Slice", [present, q("start"), q("width"), q("axis")], "slice")]
    keys, values, query = visible[r["k"]], visible[r["v"]], scores.input[0]
    if r["k_scale"] != 1.0:  # q (k scale) K^T = q (k scale K)^T: the cache stays as written
        new += [_constant(p("k_scale"), r["k_scale"], onnx.helper.tensor_dtype_to_np_dtype(g.elem_type(query))),
                n("Mul", [query, p("k_scale")], "q_scaled")]
        query = p("q_scaled")
    if rep == 1:
        new.append(n("Transpose", [keys], "keys_t", perm=[0, 1, 3, 2]))
        new += [helper.make_node("MatMul", [query, p("keys_t")], [scores.output[0]], name=p("scores")),
                helper.make_node("MatMul", [pv.input[0], values], [pv.output[0]], name=p("attended"))]
    else:  # (batch, heads, s, x) <-> (batch, kv heads, group x s, x): head h = kv head h // group, as repeat_kv
        new += [_int64(p("grouped"), [0, r["kv_heads"], -1, 0]), _int64(p("by_head"), [0, r["heads"], -1, 0]),
                _int64(p("repeat"), [1, 1, rep, 1, 1]), _int64(p("axis_2"), [2]),
                _int64(p("per_head"), [0, r["heads"], -1, r["head_size"]])]

        def per_head(kv: str, name: str) -> list[onnx.NodeProto]:  # repeat_kv's copy, once per prefill
            return [n("Unsqueeze", [kv, p("axis_2")], f"{name}_5d"), n("Expand", [p(f"{name}_5d"), p("repeat")],
                                                                         f"{name}_repeated"),
                    n("Reshape", [p(f"{name}_repeated"), p("per_head")], f"{name}_per_head")]

        def step_or_prefill(what: str, step_nodes, prefill_nodes, out: str) -> onnx.NodeProto:
            branch = lambda name, nodes: helper.make_graph(  # noqa: E731
                nodes, p(f"{what}_{name}"), [], [helper.make_empty_tensor_value_info(nodes[-1].output[0])])
            return helper.make_node("If", [step], [out], name=p(what), then_branch=branch("step", step_nodes),
                                    else_branch=branch("prefill", prefill_nodes))

        new += [
            step_or_prefill("scores", [n("Transpose", [keys], "keys_t", perm=[0, 1, 3, 2]),
                                       n("Reshape", [query, p("grouped")], "q_grouped"),
                                       n("MatMul", [p("q_grouped"), p("keys_t")], "scores_grouped"),
                                       n("Reshape", [p("scores_grouped"), p("by_head")], "scores_step")],
                            [*per_head(keys, "keys"), n("Transpose", [p("keys_per_head")], "keys_per_head_t",
                                                        perm=[0, 1, 3, 2]),
                             n("MatMul", [query, p("keys_per_head_t")], "scores_prefill")], scores.output[0]),
            step_or_prefill("attended", [n("Reshape", [pv.input[0], p("grouped")], "probs_grouped"),
                                         n("MatMul", [p("probs_grouped"), values], "attended_grouped"),
                                         n("Reshape", [p("attended_grouped"), p("by_head")], "attended_step")],
                            [*per_head(values, "values"),
                             n("MatMul", [pv.input[0], p("values_per_head")], "attended_prefill")], pv.output[0])]
    if bias != r["bias"]:
        add = r["add"]
        inputs = [add.input[r["scores_at"]], bias] if r["scores_at"] == 0 else [bias, add.input[1]]
        new.append(helper.make_node("Add", inputs, list(add.output), name=add.name))
    return new


def _windows_by_attention(layer_windows, attentions: int, max_positions: int) -> tuple[list, str]:
    """Each matched attention's window (None: none inside the kernel), in graph order, and why a
    window stays folded into the exported mask instead ("" when none does). The exporter folds a
    window into the additive mask by physical column, counted back from the mask's last column:
    right on the growing cache, where every row's newest token is that column, wrong on the shared
    buffer, where a row shorter than the widest ends earlier. Moved into the kernel
    (``local_window_size``, counted back from each row's own length) it is right on both. The layers
    are matched to the graph's attentions in order (each layer's attention reads the previous
    layer's output, so the graph's order is the layers'); a window as long as every sequence the
    build allows never masks anything."""
    if layer_windows is None:
        return [None] * attentions, ("a sliding window whose layers are not known, which the exported "
                                     "mask places by the widest row's columns: right on the growing cache only")
    windows = [w if w is not None and w < max_positions else None for w in layer_windows]
    if not any(windows):
        return [None] * attentions, ""
    shortest = min(w for w in windows if w is not None)
    if len(windows) != attentions:
        return [None] * attentions, (
            f"a sliding window of {shortest} tokens on some of {len(windows)} layers, but {attentions} attentions "
            "matched: which are windowed cannot be told, and the exported mask places the window by the widest "
            "row's columns: right on the growing cache only")
    return windows, ""


def _over_a_projection(g, softmax: onnx.NodeProto, limit: int = 16) -> bool:
    """A softmax over a layer's output (x W: a mixture of experts' router, Mixtral's; or scores masked
    and rescaled from it, PhiMoE's sparse mixer), not attention: no note counts it among the attentions
    left unfused. Walking up from the softmax, every MatMul / Gemm reached first on each path has a
    constant weight; attention's scores are a product of two activations (Q K^T)."""
    frontier, seen, projections = [softmax.input[0]], set(), 0
    while frontier and len(seen) < limit:
        node = g.producer.get(frontier.pop(0))
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in ("MatMul", "Gemm"):
            weight = g.producer.get(node.input[1])
            if not (node.input[1] in g.inits or (weight is not None and weight.op_type == "Transpose"
                                                  and weight.input[0] in g.inits)):
                return False  # scores of two activations
            projections += 1
            continue
        frontier += [i for i in node.input if i and i not in g.inits]
    return projections > 0 and not frontier


#: (heads, kv heads, head size, rotary width, interleaved, softcap) -> what ONNX Runtime answered ("": it ran)
_RUNTIME_VERDICTS: dict[tuple, str] = {}


def _runtime_refusal(m: dict) -> str:
    """Why the installed ONNX Runtime refuses to run GroupQueryAttention as this match would write it
    ("" when it runs): the kernel has limits its schema does not state (head sizes, rotary widths;
    the known ones are checked in ``_match`` with a clearer reason), which would otherwise surface
    only when the build's parity runs the fused graph. One small run per configuration - a past of
    2 tokens, 2 new ones, a bias - on the configuration's own attributes and cache width."""
    key = (m["heads"], m["kv_heads"], m["head_size"], int(m["rotated"]), m["interleaved"], float(m["softcap"]),
           m["sinks"] is not None)
    if key not in _RUNTIME_VERDICTS:
        _RUNTIME_VERDICTS[key] = _run_one_attention(*key)
    return _RUNTIME_VERDICTS[key]


def _run_one_attention(heads: int, kv_heads: int, size: int, width: int, interleaved: int, softcap: float,
                       sinks: bool) -> str:
    import onnxruntime as ort

    past, new, rows = 2, 2, 8  # cache rows: positions 0..7
    f32, i32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT32, onnx.TensorProto.INT64
    rng = np.random.default_rng(0)
    feeds = {
        "q": rng.standard_normal((1, new, heads * size), np.float32),
        "k": rng.standard_normal((1, new, kv_heads * size), np.float32),
        "v": rng.standard_normal((1, new, kv_heads * size), np.float32),
        "past_k": rng.standard_normal((1, kv_heads, past, size), np.float32),
        "past_v": rng.standard_normal((1, kv_heads, past, size), np.float32),
        "seqlens_k": np.array([past + new - 1], np.int32), "total": np.array(past + new, np.int32),
        "bias": np.zeros((1, 1, new, past + new), np.float32), "query_seqlens": np.array([new], np.int32)}
    if sinks:
        feeds["head_sink"] = rng.standard_normal(heads, np.float32)
    rotary = ["", "", ""]
    if width:
        angles = np.arange(rows)[:, None] * (1e-2 * np.arange(1, width // 2 + 1))[None, :]
        feeds |= {"cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32),
                  "pos": np.array([[past, past + 1]], np.int64)}
        rotary = ["cos", "sin", "pos"]
    types = {"seqlens_k": i32, "total": i32, "query_seqlens": i32, "pos": i64}
    node = helper.make_node(
        "GroupQueryAttention",
        ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total", *rotary, "bias", "head_sink" if sinks else "",
         "", "", "", "", "query_seqlens"],
        ["out", "present_k", "present_v"], domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads,
        scale=float(size) ** -0.5, **({"softcap": softcap} if softcap else {}),
        **({"do_rotary": 1, "rotary_interleaved": interleaved} if width else {}))
    graph = helper.make_graph(
        [node], "one_attention",
        [helper.make_tensor_value_info(name, types.get(name, f32), list(value.shape)) for name, value in feeds.items()],
        [helper.make_empty_tensor_value_info(name) for name in node.output])
    model = helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17),
                                                                 helper.make_opsetid(MS_DOMAIN, 1)])
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        out = session.run(["out"], feeds)[0]
    except Exception as e:  # noqa: BLE001 - whatever the runtime says is the reason
        message = str(e).split("Status Message: ", 1)[-1].strip().splitlines()[0]
        return f"ONNX Runtime {ort.__version__} refuses this attention ({message})"
    return "" if np.isfinite(out).all() else f"ONNX Runtime {ort.__version__} answers non-finite values for it"


def _runnable_match(g, softmax: onnx.NodeProto, graph_inputs: set[str]) -> tuple[dict, str]:
    """The attention as the installed ONNX Runtime runs it, and "" - or, where the kernel cannot rotate
    these heads itself (``_KernelRotaryLimit``, or the runtime refusing the rotary configuration), the
    attention with the graph's RotaryEmbedding kept before a kernel that rotates nothing, and why (heads
    24 or 40 wide: a multiple of 8, which the kernel takes, but not of 16, which its rotary needs)."""
    try:
        m = _match(g, softmax, graph_inputs)
        refusal = _runtime_refusal(m)
        if not refusal:
            return m, ""
        if not m["rotated"]:
            raise _NoMatch(f"{softmax.name}: {refusal}")
        why = refusal
    except _KernelRotaryLimit as e:
        why = str(e).split(": ", 1)[-1]
    m = _match(g, softmax, graph_inputs, kernel_rotary=False)
    refusal = _runtime_refusal(m)
    if refusal:
        raise _NoMatch(f"{softmax.name}: {refusal}")
    return m, why


def fuse_attention(g, report, layer_windows=(), max_positions: int = 4096) -> None:
    """Rewrite every matching attention of ``g`` (fuse._Graph) into GroupQueryAttention; counts in
    ``report.fusions["attention"]``, a note per reason for the ones left alone. ``layer_windows``:
    each layer's sliding window or None (``fuse.fuse_decoder``'s); a windowed layer's kernel applies
    the window itself and reads a mask without it (``_windows_by_attention`` says why)."""
    graph_inputs = {i.name for i in g.graph.input}
    skipped: dict[str, int] = {}
    matches = []
    rotary_outside: dict[str, int] = {}
    claimed: dict[str, int] = {}  # the presents (KV concatenations) of the attentions matched so far -> which
    readers: list[dict] = []  # attentions over another layer's KV (Gemma 4's KV-shared layers)
    for softmax in [n for n in g.graph.node if n.op_type == "Softmax" and not _over_a_projection(g, n)]:
        # the layer that writes the K/V comes first (graph order); one that only reads it is no kernel's (the kernel
        # takes no cache without new keys of its own) but reads the kernel's present as it is (_rewrite_reader)
        reader = _reader(g, softmax, set(claimed)) if claimed else None
        if reader is not None:
            readers.append(reader)
            continue
        try:
            m, outside = _runnable_match(g, softmax, graph_inputs)
            claimed |= {m["k_cat"].output[0]: len(matches), m["v_cat"].output[0]: len(matches)}
            matches.append((softmax, m))
            if outside:
                rotary_outside[outside] = rotary_outside.get(outside, 0) + 1
        except _NoMatch as e:
            reason = str(e).split(": ", 1)[-1]
            skipped[reason] = skipped.get(reason, 0) + 1
    windows, window_problem = _windows_by_attention(layer_windows, len(matches), max_positions)
    lengths: dict[tuple, list[str]] = {}
    padding_biases: dict[tuple, str] = {}
    pasts: set[str] = set()
    masks: dict[str, str] = {}  # attention mask input -> an additive mask made from it
    summed_biases: dict[tuple, str] = {}  # (mask, position bias) -> their sum, the kernel's attention_bias
    for (softmax, m), window in zip(matches, windows):
        mask = m["mask"]
        new: list[onnx.NodeProto] = list(m["added"])
        # layers whose additive masks have the same named new-token dim - every layer of an exported
        # decoder, sliding-window ones included - share one seqlens_k/total; unnamed dims get their own
        sequence = g.shape(m["bias"])[2]
        key = (mask, sequence if isinstance(sequence, str) else m["bias"])
        if key not in lengths:
            nodes, *lengths[key] = _lengths(g, mask, m["bias"], f"gqa_lengths_{len(lengths)}")
            new += nodes
        seqlens, total, query_lengths = lengths[key]
        bias = m["bias"]
        if window is not None:
            if key not in padding_biases:
                nodes, padding_biases[key] = _padding_bias(g, mask, m["bias"], f"gqa_padding_{len(padding_biases)}")
                new += nodes
            bias = padding_biases[key]
        if m["position_bias"]:
            key = (bias, m["position_bias"])
            if key not in summed_biases:  # T5 computes its relative bias once and every layer reads it
                summed_biases[key] = f"gqa_bias_{len(summed_biases)}"
                new.append(helper.make_node("Add", list(key), [summed_biases[key]], name=summed_biases[key]))
            bias = summed_biases[key]
        pasts |= {m["past_k"], m["past_v"]}
        masks[mask] = m["bias"]
        # the rotary pass's RotaryEmbedding(x, position_ids, cos, sin) moves into the kernel
        # (do_rotary with the same caches, fed the runtime's position_ids: see the module docstring)
        rotary = list(m["q_rot"].input[1:]) if m["q_rot"] is not None else ["", "", ""]
        pos, cos, sin = rotary
        head_sink = ""
        if m["sinks"] is not None:  # a logit per head added to the softmax's denominator: the graph's column or scale
            head_sink = f"{softmax.name}_head_sink"
            g.new_inits.append(numpy_helper.from_array(m["sinks"], head_sink))
        attended = m["out"].output[0] if m["gate"] is None else f"{softmax.name}_gqa_out"
        new.append(helper.make_node(
            "GroupQueryAttention",
            [m["q3"], m["k3"], m["v3"], m["past_k"], m["past_v"], seqlens, total, cos, sin, pos, bias,
             head_sink, "", "", "", "", query_lengths],
            [attended, m["present_k"], m["present_v"]],
            name=f"{softmax.name}_gqa", domain=MS_DOMAIN,
            num_heads=m["heads"], kv_num_heads=m["kv_heads"], scale=float(m["scale"]),
            # Hugging Face's window as it is (onnxruntime-genai's builder writes it so too); on ONNX
            # Runtime 1.32 the kernel then masks the keys the exported graph masks (tests/test_fuse.py)
            **({"local_window_size": window} if window is not None else {}),
            **({"softcap": float(m["softcap"])} if m["softcap"] else {}),
            **({"do_rotary": 1, "rotary_interleaved": m["interleaved"]}
               if m["q_rot"] is not None else {})))
        if m["gate"] is not None:  # [batch, sequence, heads x size] -> per head, gated, and back
            new += _gated_per_head(g, attended, m["gate"], m["out"].output[0], m["heads"], m["head_size"])
        # the nodes whose outputs GroupQueryAttention now produces; the rest of the old attention
        # (repeat_kv, scores, softmax, transposes, the 4-D rotary, a window's mask) feeds nothing and is dropped
        g.replace([m["out"], m["k_cat"], m["v_cat"]], new)
        report.fusions["attention"] += 1
    visible: dict[str, str] = {}  # a present -> its columns within the mask's width
    row_biases: dict[tuple, str] = {}  # (mask, window) -> a mask made row by row
    step = ""  # whether a call holds one new token (the readers' If)
    for r in readers:
        # the producer's window (Gemma 4 shares K/V within one attention type); where windows are not known the
        # exported mask stays (right on the growing cache, which is then kept: window_problem)
        bias, new = r["bias"], []
        if not window_problem:
            window = windows[claimed[r["k"]]]
            key = (r["mask"], window)
            if key not in row_biases:
                nodes, row_biases[key] = _row_bias(r["mask"], r["scores"].input[0], window,
                                                   onnx.helper.tensor_dtype_to_np_dtype(g.elem_type(r["bias"])),
                                                   f"shared_kv_mask_{len(row_biases)}")
                new += nodes
            bias = row_biases[key]
        if not step:
            nodes, step = _one_token(r["scores"].input[0], "shared_kv_step")
            new += nodes
        new += _rewrite_reader(g, r, bias, visible, step)
        g.replace([r["scores"], r["pv"], *([r["add"]] if bias != r["bias"] else [])], new)
    if readers:
        report.notes.append(f"{len(readers)} attention(s) of KV-shared layers read an earlier layer's K/V as its "
                            "kernel wrote them (no copy of the cache, heads grouped by reshapes)")
    for reason, count in skipped.items():
        report.notes.append(f"{count} attention softmax(es) left unfused: {reason}")
    for reason, count in rotary_outside.items():
        report.notes.append(f"{count} attention(s) fused with their RotaryEmbedding kept before the kernel: {reason}")
    windowed = sum(w is not None for w in windows)
    if windowed:
        report.notes.append(f"{windowed} of {len(windows)} attentions apply their sliding window of "
                            f"{min(w for w in windows if w is not None)} tokens in the kernel (local_window_size)")
    if not pasts:
        report.kv_copied_because = f"no attention over the KV cache fused: {next(iter(skipped), 'none matched')}"
        return
    # every attention reads its lengths from the mask; past and present can be one buffer if nothing
    # else reads the past's length (the exporter's causal mask does: rewired) and every attention over
    # a growing cache is fused (an unfused cross-attention reads no past: Mllama's, Florence-2's)
    g.commit()  # what the rewrites left reading the presents
    unfused = _unfused_growing_caches(g, pasts)
    read = _presents_read_elsewhere(g, claimed, visible)
    if window_problem:
        why = window_problem
    elif read:
        # an attention reading a present with the mask's width: on one buffer the present is the buffer's capacity
        why = read
    elif unfused:
        why = f"{len(unfused)} attention(s) over a growing KV cache left unfused ({unfused[0]})"
    elif len(masks) != 1:
        why = f"the attentions read {len(masks)} attention mask inputs, not one"
    else:
        why = _past_lengths_from_mask(g, pasts, *next(iter(masks.items())))
    if why:
        report.notes.append(f"past and present KV cannot share one buffer: {why}")
        report.kv_copied_because = why
    else:
        set_metadata(g.model, KV_IN_PLACE, "1")
        report.kv_in_place = True


def _presents_read_elsewhere(g, presents, visible: dict[str, str]) -> str:
    """Why the kernels' presents cannot be one shared buffer ("" when they can), on the committed graph: a node
    other than a reader's slice of its first (mask width) columns reads one - as wide as the mask, which on one
    buffer it is not (an attention of a KV-shared layer that ``_reader`` did not recognize)."""
    slices = set(visible.values())
    for present in presents:
        for node in g.consumers.get(present, []):
            if node.output[0] not in slices:
                return f"{node.name} ({node.op_type}) reads the K/V {present} a kernel writes, as exported"
    return ""


def _gated_per_head(g, attended: str, gate: str, out: str, heads: int, head_size: int) -> list[onnx.NodeProto]:
    """``out`` = ``attended`` [batch, sequence, heads x head size] times ``gate`` [batch, sequence, heads, 1], per
    head: what the graph computed between the attention's transpose and its output reshape."""
    shapes = {f"{out}_per_head": [0, 0, heads, head_size], f"{out}_flat": [0, 0, heads * head_size]}
    for name, shape in shapes.items():
        g.new_inits.append(numpy_helper.from_array(np.array(shape, np.int64), name))
    per_head, flat = shapes
    return [helper.make_node("Reshape", [attended, per_head], [f"{out}_heads"], name=f"{out}_heads"),
            helper.make_node("Mul", [f"{out}_heads", gate], [f"{out}_gated"], name=f"{out}_gated"),
            helper.make_node("Reshape", [f"{out}_gated", flat], [out], name=f"{out}_reshaped")]


def fold_packed_qkv(g) -> int:
    """GroupQueryAttention(Split(packed) -> q, k, v) -> GroupQueryAttention(packed): the kernel reads
    packed QKV (batch, sequence, (heads + 2 kv heads) x head size) itself. Run after the packed
    projection pass; returns how many attentions read packed QKV."""
    folded = 0
    for node in [n for n in g.graph.node if n.op_type == "GroupQueryAttention" and n.domain == MS_DOMAIN]:
        split = g.producer.get(node.input[0])
        if split is None or split.op_type != "Split" or list(split.output) != list(node.input[:3]) \
                or g.attr(split, "axis", 0) not in (-1, 2) or len(split.input) < 2:
            continue
        sizes = g.const(split.input[1])
        heads, kv_heads = g.attr(node, "num_heads"), g.attr(node, "kv_num_heads")
        if sizes is None or sizes.size != 3 or sizes[0] % heads or \
                list(sizes) != [sizes[0], sizes[0] // heads * kv_heads, sizes[0] // heads * kv_heads]:
            continue
        if any(g.sole_consumer(o, "GroupQueryAttention") is not node for o in split.output):
            continue
        inputs = list(node.input)
        inputs[:3] = [split.input[0], "", ""]
        fused = helper.make_node("GroupQueryAttention", inputs, list(node.output), name=node.name, domain=MS_DOMAIN)
        fused.attribute.extend(node.attribute)
        g.replace([node, split], [fused])
        folded += 1
    return folded
