"""Weight-only block-wise quantization of a graph's MatMul weights (w8 / w4).

The decoder is memory bound at batch 1: every token reads every weight once, so reading 4 or 8
bits instead of 32 is the speed-up. Activations are not quantized by the graph, but ONNX Runtime's
``MatMulNBits`` kernel at accuracy level 4 (the default here) rounds them to int8 per block inside
the kernel; the ``dequantize`` form keeps them float.
Weights are cut into blocks of ``block_size`` along the input (K) dimension, each with its own
scale, as ONNX Runtime's ``MatMulNBits`` and GGUF's Q4/Q8 formats do.

Three schemes:

* ``symmetric``: ``w = scale * q``, q in [-2^(b-1)+1, 2^(b-1)-1], zero point 0. The form
  TensorRT consumes (block-wise ``DequantizeLinear`` on the weights), and ONNX Runtime too.
* ``asymmetric``: ``w = scale * q + minimum`` per block (q in [0, 2^b-1]; GGUF's Q4_1). Spends
  the whole 2^b grid on each block's real range, and represents weights that already lie on a
  Q4_1 grid (the demo's SmolLM2) exactly. ONNX Runtime only, through a correction of the float
  minimum (see ``_matmulnbits``): two small extra nodes per projection, one block sum per input.
* ``zero-point``: ``w = scale * (q - zero_point)`` with an integer zero point in [0, 2^b-1],
  rounded as ONNX Runtime's own quantizer does (``quantize_matmul_4bits``/``8bits``: the block's
  range widened to hold 0, ``scale = (max - min) / (2^b-1)``, ``zero_point = round(-min / scale)``).
  ``MatMulNBits`` reads it directly (its ``zero_points`` input): no extra nodes. At most half a
  step per weight like ``asymmetric``, but a block's error is then one shared offset when its
  weights lie on a grid with a float minimum: on the demo (Q4_1 weights) the errors add up over a
  block's inputs instead of cancelling, and the build fails its gate (easy-vqa 28/60 against
  PyTorch's 54/60; prefill logits cosine 0.946), so it is a choice, not the default.

Two output forms: ``matmulnbits`` (ONNX Runtime's fused kernel, which reads the packed weights
directly) and ``dequantize`` (``DequantizeLinear(int4/int8 weights, scales, block_size)`` ->
``MatMul``, opset 21, the pattern TensorRT fuses into a weight-only GEMM). The scales take the
dtype of the weights they replace, so on an fp16 graph (the W4A16 form ``convert`` makes for
TensorRT) DequantizeLinear yields fp16 straight into an fp16 MatMul.

Block sizes are chosen per MatMul from an ordered list of allowed sizes: the first that divides
K. TensorRT takes int4 blocks of 64 or 128 only, so its form passes (128, 64): 128 where K allows,
64 where K is a multiple of 64 only (SmolLM2's hidden size 576 is); ONNX Runtime's form passes one
size and pads K to a multiple of it.

Tied LM heads arrive as ``MatMul(x, Transpose(embedding))``; the head then gets its own
quantized copy while the embedding lookup keeps the unquantized table (fp32; fp16 in the W4A16
form) (a lookup reads one row, the head reads all of them every token).

Lookup tables (``quantize_lookups``, asked for): a table the token ids index (the token embeddings, Gemma 4's
per-layer input embeddings: vocabulary x layers x 256, the largest tensor of its small models) as ONNX Runtime's
``GatherBlockQuantized``: codes of the decoder's bits in blocks along each row with integer zero points (the
kernel's form; the zero-point scheme's rounding), read and dequantized a row at a time. A lookup reads one row per
token, so this is for size, not speed; the matmulnbits form only (TensorRT does not read the contrib op).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExportError
from ..export.graph_info import live_nodes, read_tensor, reads

SCHEMES = ("symmetric", "asymmetric", "zero-point")
FORMS = ("matmulnbits", "dequantize")
#: how an asymmetric block's float minimum is added back in the matmulnbits form (see ``_matmulnbits``)
CORRECTIONS = ("augmented", "shift")
DEFAULT_CORRECTION = "shift"
#: how the codes are picked: round to nearest, or GPTQ's error feedback (``precision.gptq``)
ROUNDINGS = ("rtn", "gptq")
MS_DOMAIN = "com.microsoft"
DQ_OPSET = 21  # block-wise DequantizeLinear and int4 arrived in opset 21
#: the int4 block sizes TensorRT takes ("INT4 quantization requires per-block scales. The supported
#: block sizes are {64, 128}": TensorRT developer guide, Working with Quantized Types > Quantization
#: Schemes); its IDequantizeLayer blocks INT4 only before 10.13 and never INT8 (NvInfer.h, 10.3-11.1)
TENSORRT_INT4_BLOCK_SIZES = (128, 64)


@dataclass(frozen=True)
class BlockQuantized:
    """Weight ``W [K, N]`` as blocks along K: ``q [N, blocks, block_size]`` (unsigned codes,
    symmetric codes offset by 2^(b-1)), ``scales [N, blocks]`` (fp32, or fp16 for fp16 weights),
    ``zero_points [N, blocks]`` (uint8: the zero-point scheme; 2^(b-1) implied for symmetric codes),
    float ``offsets [N, blocks]`` (asymmetric: -minimum / scale)."""

    q: np.ndarray
    scales: np.ndarray
    bits: int
    block_size: int
    k: int
    zero_points: np.ndarray | None = None
    offsets: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:
        """Back to ``[K, N]`` fp32 (for checking error)."""
        zero = (self.offsets if self.offsets is not None else self.zero_points
                if self.zero_points is not None else np.full(self.scales.shape, 2 ** (self.bits - 1)))
        zero = zero[..., None].astype(np.float32)
        w = (self.q.astype(np.float32) - zero) * self.scales[..., None].astype(np.float32)
        return w.reshape(w.shape[0], -1)[:, : self.k].T


def quantize_blocks(weight: np.ndarray, bits: int, block_size: int, scheme: str,
                    scale_dtype=np.float32) -> BlockQuantized:
    """``scale_dtype``: what the scales are stored as (symmetric only); the codes are rounded
    against the stored scales, so an fp16 scale's rounding costs nothing more."""
    if scheme not in SCHEMES:
        raise ExportError(f"weight scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    k, n = weight.shape
    blocks = -(-k // block_size)
    w = np.zeros((blocks * block_size, n), np.float32)
    w[:k] = weight
    w = w.T.reshape(n, blocks, block_size)
    top = 2 ** bits - 1
    if scheme == "symmetric":
        half = 2 ** (bits - 1)
        # strictly positive (TensorRT refuses a zero scale; an all-zero block has codes 0 under any
        # scale) and at least the dtype's smallest normal (a tiny fp16 scale would flush to 0)
        scales = np.maximum(np.abs(w).max(axis=-1) / (half - 1), np.finfo(scale_dtype).tiny).astype(scale_dtype)
        q = np.clip(np.rint(w / scales[..., None].astype(np.float32)), 1 - half, half - 1) + half
        return BlockQuantized(q.astype(np.uint8), scales, bits, block_size, k)
    if scheme == "asymmetric":
        low, high = w.min(axis=-1), w.max(axis=-1)
        scales = (high - low) / top
        # a constant block (a padding token's all-zero row in a tied LM head) has no range: a scale on
        # the block's own order, never 1. The kernels add back half x scale x sum(x) (see _matmulnbits),
        # and with scale 1 that cancellation left errors of several logits on the zero row (BART, OPT)
        flat = np.maximum(np.abs(low) / top, np.finfo(np.float32).tiny)
        safe = np.where(scales == 0, flat, scales)
        q = np.clip(np.rint((w - low[..., None]) / safe[..., None]), 0, top)
        return BlockQuantized(q.astype(np.uint8), safe.astype(np.float32), bits, block_size, k,
                              offsets=(-low / safe).astype(np.float32))
    # zero-point: onnxruntime's quantize_matmul_4bits/8bits, code for code (an integer zero point puts 0 on the grid)
    low, high = np.minimum(w.min(axis=-1), 0), np.maximum(w.max(axis=-1), 0)
    scales = ((high - low) / top).astype(np.float32)
    scales = np.where(scales == 0, np.float32(1), scales)  # an all-zero block: codes 0, zero point 0
    zero_points = np.clip(np.rint(-low / scales), 0, top)
    q = np.clip(np.rint(w / scales[..., None]) + zero_points[..., None], 0, top)
    return BlockQuantized(q.astype(np.uint8), scales, bits, block_size, k, zero_points=zero_points.astype(np.uint8))


def _pack(q: np.ndarray, bits: int, fill: int = 0) -> np.ndarray:
    """Codes [..., n] -> MatMulNBits' bytes along the last axis (two 4-bit codes per byte, low
    first): the weights [N, blocks, block_size] and the zero points [N, blocks] -> [N, ceil(blocks / 2)]
    alike. An odd count's last high nibble is ``fill`` (unread; onnxruntime's quantizer writes 8)."""
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.full((*q.shape[:-1], 1), fill, q.dtype)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


@dataclass(frozen=True)
class _Target:
    index: int  # position in graph.node
    node: onnx.NodeProto
    source: onnx.TensorProto  # the 2-D initializer B, or the one a Transpose of it reads (a tied LM head)
    transposed: bool
    #: the graph's folder, where a tensor kept in an external data file is read from
    source_dir: Path | None = None
    bias: str | None = None  # a Gemm's C, added after the quantized product

    @property
    def shape(self) -> tuple[int, int]:
        """[K, N]."""
        k, n = self.source.dims
        return (n, k) if self.transposed else (k, n)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.source.data_type))

    def weight(self) -> np.ndarray:
        """[K, N] in the graph's dtype (fp32, or fp16 in an fp16 graph), read when it is quantized:
        holding every target's copy at once cost the decoder's weights again in memory (a w4 build
        of a 567M-parameter LLaVA peaked at 8.2 GB). A tensor in an external data file is read from
        the file, so a graph loaded without its data never holds its fp32 weights whole."""
        w = read_tensor(self.source, self.source_dir)
        return w.T if self.transposed else w


def _targets(model: onnx.ModelProto, skip: set[str], source_dir: Path | None = None) -> list[_Target]:
    """MatMuls whose B is a 2-D initializer, or the Transpose of one (a tied LM head); and Gemms
    ``A x B (+ C)`` whose B is a 2-D initializer, transposed or not (OPT's MLP: its fc1 / fc2 read
    2-D hidden states, so they export as Gemm)."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    found = []
    for index, node in enumerate(model.graph.node):
        if node.name in skip:
            continue
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            b, bias = node.input[1], (node.input[2] if len(node.input) > 2 and node.input[2] else None)
            if (b in inits and len(inits[b].dims) == 2 and not attrs.get("transA", 0)
                    and attrs.get("alpha", 1.0) == 1.0 and (bias is None or attrs.get("beta", 1.0) == 1.0)):
                found.append(_Target(index, node, inits[b], bool(attrs.get("transB", 0)), source_dir, bias))
            continue
        if node.op_type != "MatMul":
            continue
        b = node.input[1]
        if b in inits and len(inits[b].dims) == 2:
            found.append(_Target(index, node, inits[b], False, source_dir))
        elif b in producers and producers[b].op_type == "Transpose" and producers[b].input[0] in inits:
            source = inits[producers[b].input[0]]
            perm = next((list(a.ints) for a in producers[b].attribute if a.name == "perm"), [1, 0])
            if len(source.dims) == 2 and perm == [1, 0]:
                found.append(_Target(index, node, source, True, source_dir))
    return found


#: ops a token-id lookup's indices may pass through from the ``input_ids`` input (our decoders embed the ids with
#: image placeholders replaced: Where / Equal / Cast / Clip / arithmetic)
_ID_OPS = ("Where", "Cast", "Clip", "Add", "Sub", "Mul", "Min", "Max", "Reshape", "Unsqueeze", "Squeeze", "Identity")


def _reads_ids(producers: dict[str, onnx.NodeProto], name: str, ids: str, limit: int = 16) -> bool:
    """Whether tensor ``name`` is the graph input ``ids`` or made from it by ``_ID_OPS`` alone (at most ``limit``
    nodes up; ``producers``: each tensor's node): a table gathered by it is indexed by token ids (not by positions: a
    rotary table)."""
    frontier, seen = [name], 0
    while frontier and seen < limit:
        tensor = frontier.pop()
        if tensor == ids:
            return True
        node = producers.get(tensor)
        if node is None or node.op_type not in _ID_OPS:
            continue
        seen += 1
        # Where's condition is a mask, not an index: its branches carry the ids
        frontier += list(node.input[1:] if node.op_type == "Where" else node.input[:1])
    return False


def quantize_lookups(model: onnx.ModelProto, bits: int, block_size: int, ids: str = "input_ids",
                     source_dir: Path | None = None) -> dict[str, dict]:
    """Rewrite in place each ``Gather`` (axis 0) of a 2-D fp32 initializer by indices made from the graph input
    ``ids`` as ``GatherBlockQuantized`` of ``bits``-bit codes in blocks along the row (see the module docstring):
    ``block_size`` where it divides the row's width, else the nearest MatMulNBits block size that does. A table read
    by anything else too stays as it is (a tied LM head reads its own quantized copy by then). Returns, per table,
    what was done or why not (``{"bits", "block_size", "rows", "width"}`` or ``{"kept": reason}``)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in reads(node):
            readers.setdefault(name, []).append(node)
    producers = {o: n for n in graph.node for o in n.output}  # the Gathers' ids are read before any rewrite
    outputs = {o.name for o in graph.output}
    done, new_inits = {}, []
    for node in list(graph.node):
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or len(table.dims) != 2 or table.data_type != onnx.TensorProto.FLOAT or axis != 0 \
                or not _reads_ids(producers, node.input[1], ids):
            continue
        rows, width = (int(d) for d in table.dims)
        if len(readers[table.name]) > 1 or table.name in outputs:
            done[table.name] = {"kept": "read by other nodes too"}
            continue
        size = whole_block_size([width], block_size)
        if size is None or (bits == 4 and width % 2):
            done[table.name] = {"kept": f"its width {width} is no whole number of blocks of 16 or more"}
            continue
        bq = quantize_blocks(read_tensor(table, source_dir).T, bits, size, "zero-point")  # K: the row's width
        codes = _pack(bq.q.reshape(rows, width), bits)
        prefix = f"{table.name}_q{bits}"
        new_inits += [numpy_helper.from_array(codes, f"{prefix}_codes"),
                      numpy_helper.from_array(bq.scales.astype(np.float32), f"{prefix}_scales"),
                      numpy_helper.from_array(_pack(bq.zero_points, bits), f"{prefix}_zero_points")]
        lookup = helper.make_node("GatherBlockQuantized", [f"{prefix}_codes", node.input[1], f"{prefix}_scales",
                                                           f"{prefix}_zero_points"], list(node.output),
                                  name=f"{_key(node)}_q{bits}", domain=MS_DOMAIN, gather_axis=0, quantize_axis=1,
                                  block_size=size, bits=bits)
        at = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(at, lookup)
        done[table.name] = {"bits": bits, "block_size": size, "rows": rows, "width": width}
    if new_inits:
        graph.initializer.extend(new_inits)
        drop_unused(graph)
        if MS_DOMAIN not in {o.domain for o in model.opset_import}:
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return done


def _key(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def targeted_weights(model: onnx.ModelProto, skip: set[str]) -> set[str]:
    """The initializers ``quantize_weights`` would quantize (for ``weights_missed``)."""
    return {t.source.name for t in _targets(model, skip)}


def weight_inputs(model: onnx.ModelProto, skip: set[str]) -> dict[str, tuple[str, int]]:
    """``{MatMul: (its input tensor, K)}`` for each MatMul ``quantize_weights`` would quantize, in
    the order it quantizes them (the keys are what a ``blocks`` function is called with)."""
    return {_key(t.node): (t.node.input[0], t.shape[0]) for t in _targets(model, skip)}


def _matmulnbits(t: _Target, bq: BlockQuantized, accuracy_level: int, block_sums: dict, correction: str):
    """MatMulNBits on the codes; integer zero points are its fourth input. MatMulNBits' fast int8
    kernels take only integer zero points (its float zero points run ~20x slower: 16 ms against
    0.8-1 ms for a 576 x 3072 weight, one token, this 2-core VM loaded), so an asymmetric block's
    float minimum needs a correction (per block ``sum(w x) = scale * sum(q x) + minimum * sum(x)``,
    the algebra of GGUF's Q4_1 kernels), in one of two forms (``CORRECTIONS``):

    * ``shift`` (default): symmetric codes + ``blocksum(x) @ offsets`` (fp32 [blocks, N]) + Add
      after each projection: exact up to fp32, two extra nodes per projection.
    * ``augmented``: the nearest integer zero point ``z`` goes to MatMulNBits and only the residual
      ``r = scale * (z - offset)`` (|r| <= scale / 2 where the block's range holds 0) is corrected,
      by the same node: the input's block sums are appended to it as extra K columns
      (``Concat(x, x @ indicator)``, shared by every projection of that input) and ``r`` as extra
      weight rows, quantized in blocks of their own. No node per projection; passes the demo's gate
      (54/60, no answer changed), but was not consistently faster than ``shift`` on the demo (the Concat and the
      MatMulNBits' longer K with zero points cost what the shift nodes did; benchmarks/README.md)."""
    k, n = t.shape
    name = _key(t.node)
    half, top = 2 ** (bq.bits - 1), 2 ** bq.bits - 1
    x, out = t.node.input[0], t.node.output[0]
    q, scales, zero_points = bq.q, bq.scales, bq.zero_points
    before, after, extra = [], [], []  # nodes ahead of the MatMulNBits (a new block sum), after it; their tensors
    if bq.offsets is not None:
        if correction not in CORRECTIONS:
            raise ExportError(f"asymmetric correction {correction!r} is not one of {', '.join(CORRECTIONS)}")
        blocks = k // bq.block_size  # whole blocks: quantize_weights refused any other K (check_whole_blocks)
        # augmented: the sums fill whole blocks of their own (zero columns after the last)
        width = -(-blocks // bq.block_size) * bq.block_size if correction == "augmented" else blocks
        key = (x, bq.block_size, correction)
        if key not in block_sums:  # one block sum per input, shared by q/k/v, gate/up
            sums = f"{x}_blocksum{bq.block_size}"
            # one 0/1 table per shape for the whole graph: every layer reads the same few (cached)
            indicator = f"blocksum_indicator_{k}x{width}_by{bq.block_size}"
            if indicator not in block_sums:
                table = np.zeros((k, width), np.float32)
                table[np.arange(k), np.arange(k) // bq.block_size] = 1
                extra.append(numpy_helper.from_array(table, indicator))
                block_sums[indicator] = indicator
            before.append(helper.make_node("MatMul", [x, indicator], [sums], name=f"{sums}_node"))
            if correction == "augmented":
                before.append(helper.make_node("Concat", [x, sums], [f"{x}_with_blocksums{bq.block_size}"],
                                               name=f"{sums}_concat", axis=-1))
            block_sums[key] = before[-1].output[0]
        if correction == "augmented":
            zero = np.clip(np.rint(bq.offsets), 0, top)
            residual = np.zeros((width, n), np.float32)
            residual[:blocks] = ((zero - bq.offsets) * bq.scales).T  # [blocks, N]
            rq = quantize_blocks(residual, bq.bits, bq.block_size, "zero-point")
            q = np.concatenate([bq.q, rq.q], axis=1)
            scales = np.concatenate([bq.scales, rq.scales], axis=1)
            zero_points = np.concatenate([zero.astype(np.uint8), rq.zero_points], axis=1)
            k, x = k + width, block_sums[key]
        else:
            # w = scale * (q - half) + (minimum + half * scale): symmetric codes, offset per block
            minimum = -bq.offsets * bq.scales + half * bq.scales  # [N, blocks]
            extra.append(numpy_helper.from_array(np.ascontiguousarray(minimum.T), f"{name}_block_offsets"))
            out = f"{name}_unshifted"
            after += [helper.make_node("MatMul", [block_sums[key], extra[-1].name], [f"{name}_shift"],
                                       name=f"{name}_shift_node"),
                      helper.make_node("Add", [out, f"{name}_shift"], list(t.node.output), name=f"{name}_add_shift")]
    tensors = [numpy_helper.from_array(_pack(q, bq.bits), f"{name}_Bq{bq.bits}"),
               numpy_helper.from_array(scales.reshape(-1), f"{name}_scales")]
    if zero_points is not None:  # absent: MatMulNBits' default 2^(b-1), the symmetric codes' offset
        tensors.append(numpy_helper.from_array(_pack(zero_points, bq.bits, half), f"{name}_zero_points"))
    quant = helper.make_node("MatMulNBits", [x, *(i.name for i in tensors)], [out],
                             name=f"{name}_Q{bq.bits}", domain=MS_DOMAIN, K=k, N=n, bits=bq.bits,
                             block_size=bq.block_size, accuracy_level=accuracy_level)
    return before + [quant] + after, tensors + extra


def _dequantize(t: _Target, bq: BlockQuantized):
    if bq.zero_points is not None or bq.offsets is not None:
        raise ExportError("the DequantizeLinear form takes symmetric weights only (TensorRT's block "
                          "quantization has no zero point); use the symmetric scheme")
    name = _key(t.node)
    k, n = t.shape
    if k % bq.block_size:
        raise ExportError(f"{name}: K={k} is not a multiple of block size {bq.block_size}")
    half = 2 ** (bq.bits - 1)
    codes = (bq.q.astype(np.int16) - half).astype(np.int8)  # [N, blocks, bs]
    codes = codes.reshape(n, -1)[:, :k].T  # [K, N]
    scales = np.ascontiguousarray(bq.scales.T)  # [blocks, N]
    if bq.bits == 4:  # ONNX int4: two values per byte, first in the low nibble
        flat = (codes.flatten() & 0x0F).astype(np.uint8)
        flat = np.concatenate([flat, np.zeros(len(flat) % 2, np.uint8)])
        raw = (flat[0::2] | (flat[1::2] << 4)).tobytes()
        weight = helper.make_tensor(f"{name}_Wq4", onnx.TensorProto.INT4, codes.shape, raw, raw=True)
    else:
        weight = numpy_helper.from_array(np.ascontiguousarray(codes), f"{name}_Wq8")
    scale = numpy_helper.from_array(scales, f"{name}_scales")  # its dtype is the DequantizeLinear's output dtype
    deq = helper.make_node("DequantizeLinear", [weight.name, scale.name], [f"{name}_W"], name=f"{name}_dq",
                           axis=0, block_size=bq.block_size)
    matmul = helper.make_node("MatMul", [t.node.input[0], deq.output[0]], list(t.node.output), name=name)
    return [deq, matmul], [weight, scale]


def _block_size(t: _Target, sizes: tuple[int, ...]) -> int:
    """The first of ``sizes`` that divides K, else the first (MatMulNBits pads K; a form or scheme that
    cannot was refused before, ``check_whole_blocks``)."""
    k = t.shape[0]
    return next((size for size in sizes if k % size == 0), sizes[0])


#: the block sizes MatMulNBits takes (powers of two >= 16), the ones suggested
MATMULNBITS_BLOCK_SIZES = (16, 32, 64, 128)


def whole_block_size(ks: Sequence[int], preferred: int) -> int | None:
    """The block size of ``MATMULNBITS_BLOCK_SIZES`` nearest ``preferred`` (the largest not above it,
    else the smallest above) that divides every K, or None."""
    fits = [size for size in MATMULNBITS_BLOCK_SIZES if all(k % size == 0 for k in ks)]
    return max((s for s in fits if s <= preferred), default=min(fits, default=None))


def needs_whole_blocks(form: str, scheme: str) -> bool:
    """Whether every K must be a multiple of a block size: MatMulNBits pads K, but the asymmetric
    scheme's block-sum correction adds whole blocks back, and DequantizeLinear cannot pad."""
    return form == "dequantize" or scheme == "asymmetric"


def check_whole_blocks(named_ks: Sequence[tuple[str, int]], sizes: tuple[int, ...], form: str) -> None:
    """Refuse weights (name, input size K) whose K no block size of ``sizes`` divides, in one message
    for them all, naming a fix: for MatMulNBits one size that divides every K or the scheme that needs
    none; for the dequantize form keeping them fp32 or ONNX Runtime's form. The build calls it on the
    PyTorch stage's Linear layers before exporting anything, the quantizer on the graph's MatMuls."""
    bad = [(name, k) for name, k in named_ks if all(k % size for size in sizes)]
    if not bad:
        return
    ks = sorted({k for _, k in named_ks})
    listed = ", ".join(map(str, ks))
    if form == "dequantize":
        need, fix = "which block-wise DequantizeLinear needs (it cannot pad K)", \
            "keep them in fp32 with --keep-node or use --weight-form matmulnbits"
    else:
        fit = whole_block_size(ks, sizes[0])
        need = "which the asymmetric scheme needs"
        fix = (f"use --block-size {fit} (it divides every K: {listed}) or --weight-scheme zero-point" if fit else
               f"no block size of {MATMULNBITS_BLOCK_SIZES[0]}-{MATMULNBITS_BLOCK_SIZES[-1]} divides every K "
               f"({listed}): use --weight-scheme zero-point")
    shown = ", ".join(f"{name} K={k}" for name, k in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise ExportError(f"{len(bad)} weight(s) have an input size K that is not a multiple of the block size "
                      f"{' or '.join(map(str, sizes))} ({shown}), {need}; {fix}")


def quantize_weights(model: onnx.ModelProto, bits: int, block_size: int | tuple[int, ...], scheme: str, form: str,
                     keep: set[str], bits_of: dict[str, int] | None = None,
                     accuracy_level: int = 4, correction: str = DEFAULT_CORRECTION,
                     blocks: Callable[..., BlockQuantized] | None = None,
                     source_dir: Path | None = None) -> dict[str, tuple[int, int]]:
    """Rewrite ``model`` in place. ``block_size``: one size, or the allowed sizes in order of
    preference (see the module docstring). ``keep``: MatMul names left unquantized. ``bits_of``:
    nodes (the LM head, sensitive layers) quantized at their own bit width. ``correction``: how the
    asymmetric scheme's float minimum is added back (``CORRECTIONS``, see ``_matmulnbits``). ``blocks``:
    picks the codes, called as ``blocks(matmul, weight, bits, block_size, scheme, scale_dtype)`` with
    the MatMul's key from ``weight_inputs`` (default: round to nearest, ``quantize_blocks``).
    ``source_dir``: the folder of a graph loaded without its external data (its weights are read from
    there one at a time; the tensors left unquantized stay in that file for ``save_graph`` to copy).
    Returns the (bits, block size) used per node."""
    if form not in FORMS:
        raise ExportError(f"weight-only form {form!r} is not one of {', '.join(FORMS)}")
    sizes = (block_size,) if isinstance(block_size, int) else tuple(block_size)
    graph = model.graph
    replaced, new_inits, done, block_sums = {}, [], {}, {}
    targets = _targets(model, keep, source_dir)
    if needs_whole_blocks(form, scheme):
        check_whole_blocks([(_key(t.node), t.shape[0]) for t in targets], sizes, form)
    for t in targets:
        node_bits, size = (bits_of or {}).get(t.node.name, bits), _block_size(t, sizes)
        # fp16 weights (an fp16 graph) get fp16 scales, so the dequantized weight stays fp16
        scale_dtype = np.float16 if t.dtype == np.float16 else np.float32
        weight = t.weight()
        bq = (blocks(_key(t.node), weight, node_bits, size, scheme, scale_dtype) if blocks
              else quantize_blocks(weight, node_bits, size, scheme, scale_dtype))
        del weight  # the next target's copy replaces it, not joins it
        nodes, tensors = (_matmulnbits(t, bq, accuracy_level, block_sums, correction) if form == "matmulnbits"
                          else _dequantize(t, bq))
        replaced[t.index] = _with_bias(nodes, t)
        new_inits += tensors
        done[_key(t.node)] = (node_bits, size)
    if not done:
        raise ExportError("no MatMul with constant weights to quantize in this graph")
    ordered = []
    for index, node in enumerate(graph.node):
        ordered += replaced.get(index, [node])
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(new_inits)
    drop_unused(graph)
    domains = {o.domain: o for o in model.opset_import}
    if form == "matmulnbits" and MS_DOMAIN not in domains:
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if form == "dequantize" and domains[""].version < DQ_OPSET:
        # what torch.onnx emits at 18 means the same at 21 (the demo decoder in this form gives
        # MatMulNBits' logits on ONNX Runtime); the checker runs on the saved graph
        domains[""].version = DQ_OPSET
    return done


def _with_bias(nodes: list[onnx.NodeProto], t: _Target) -> list[onnx.NodeProto]:
    """A Gemm's C added to the quantized product (the node that wrote its output now writes the sum's
    addend)."""
    if t.bias is None:
        return nodes
    out = t.node.output[0]
    product = f"{_key(t.node)}_without_bias"
    last = next(n for n in nodes if out in n.output)
    last.output[list(last.output).index(out)] = product
    return nodes + [helper.make_node("Add", [product, t.bias], [out], name=f"{_key(t.node)}_bias")]


def weights_missed(model: onnx.ModelProto, targeted: Iterable[str], kept: Iterable[str] = ()) -> dict:
    """The float weights of ``model`` (before quantizing it) that a quantizer leaves as they are though
    no one asked: 2-D or larger initializers read by a MatMul, Gemm or GatherND (a mixture of experts'
    weight table), or by a Transpose into one, that are not ``targeted`` (the initializers it
    quantizes) nor read by the ``kept`` nodes. A layout the quantizer does not know is then said in
    the manifest and at build time, not found in a weight-only build as large as the fp32 one. Sizes
    from the dims alone (no external data read)."""
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    kept, targeted = set(kept), set(targeted)
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)

    def nbytes(t: onnx.TensorProto) -> int:
        return int(np.prod(t.dims)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

    weights: dict[str, bool] = {}  # weight -> read by a kept node
    reader: dict[str, str] = {}  # weight -> the node that reads it (what the build's note names)
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "GatherND"):
            continue
        for name in node.input:
            if name in producers and producers[name].op_type == "Transpose":
                name = producers[name].input[0]
            t = inits.get(name)
            if t is not None and len(t.dims) >= 2 and t.data_type in floats:
                weights[name] = weights.get(name, False) or node.name in kept
                reader.setdefault(name, f"{node.op_type} {_key(node)}")
    missed = {name: nbytes(inits[name]) for name, is_kept in weights.items() if not is_kept and name not in targeted}
    total = sum(nbytes(inits[name]) for name in weights)
    return {"tensors": len(missed), "bytes": sum(missed.values()),
            "share": round(sum(missed.values()) / total, 4) if total else 0.0,
            "largest": [reader[name] for name in sorted(missed, key=missed.get, reverse=True)[:3]]}


def describe_missed(stage: str, missed: dict) -> str | None:
    """One line for a build's output where a quantizer left a share of the weights float, else None."""
    if not missed["tensors"]:
        return None
    return (f"{stage}: {missed['tensors']} weight tensor(s), {100 * missed['share']:.0f}% of the weight bytes "
            f"({missed['bytes'] / 1e6:.1f} MB), are in a layout the quantizer does not take and stay float "
            f"(largest: {', '.join(missed['largest'])})")


def drop_unused(graph: onnx.GraphProto) -> None:
    """Remove nodes and initializers nothing reads any more (fp32 weights that were replaced); what an ``If``'s
    branches read from outside them counts as read (``graph_info.reads``)."""
    outputs = {o.name for o in graph.output}
    alive = live_nodes(list(graph.node), outputs)
    if len(alive) != len(graph.node):
        del graph.node[:]
        graph.node.extend(alive)
    used = {i for n in graph.node for i in reads(n)} | outputs
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
