"""Turn an fp32 stage graph into its precision variant.

* fp16: weights and maths in fp16, inputs/outputs kept fp32, numerically sensitive ops kept in
  fp32 (normalisations, Softmax, reductions, exponentials) - the islands FP16 SigLIP engines
  needed before their answers stopped flipping - and float maths that computes an integer (T5's
  relative-position buckets: ``index_arithmetic``). The kept op types and node counts are recorded
  in the manifest.
* w8 / w4: weight-only, block-wise int8/int4 MatMul weights - the decoder is memory bound, so
  reading fewer weight bytes is the speed-up (see ``weight_only``). The LM head is a separate choice.
  Two forms: ``matmulnbits`` for ONNX Runtime (fp32 activations, rounded to int8 inside the
  kernel) and ``dequantize`` for TensorRT, which is W4A16: the graph is converted to fp16 first
  (the fp16 variant's islands and fp32 inputs/outputs), then its MatMul weights become int4 blocks
  of 128 (64 where K needs it) with fp16 scales, so DequantizeLinear feeds an fp16 MatMul - the
  weight-only GEMM TensorRT has kernels for. TensorRT has no block-wise int8 weights, so w8 and a
  w8 LM head are refused in that form before anything is exported.
* int8: W8A8, calibrated on real image+text inputs. Image stages: explicit quantization (Q/DQ nodes,
  symmetric, zero point 0, per-channel weights) - the form TensorRT consumes and ONNX Runtime's CPU
  provider also runs. Biases stay float (no INT32 DequantizeLinear, which TensorRT's ONNX parser
  rejects). A decoder (a graph ending in an LM head) is smoothed first (``smoothquant``: its
  activation outliers migrated into the weights) and its activations quantized per token at run time:
  its ONNX Runtime form (the fused graph, already in contrib ops) in ONNX Runtime's integer GEMM
  (MatMulIntegerToFloat), its standard form (TensorRT's) as symmetric Q/DQ.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import onnx

from ..atomic import write_text
from ..cpu import INT8_DOT_PRODUCT, INT8_QDQ_METADATA, int8_dot_product, u8s8_saturates
from ..errors import ExportError
from ..export.graph_info import (EXTERNAL_DATA_THRESHOLD, all_weight_bytes, check_graph, save_graph, set_metadata,
                                 topological_order)
from .smoothquant import KERNELS
from .weight_only import (DEFAULT_CORRECTION, FORMS, ROUNDINGS, SCHEMES, TENSORRT_INT4_BLOCK_SIZES, quantize_weights,
                          describe_missed, quantize_lookups, targeted_weights, weight_inputs, weights_missed, whole_block_size)

FP32_ISLANDS = ("LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                "SkipSimplifiedLayerNormalization", "RMSNormalization", "Softmax", "ReduceMean", "ReduceSum",
                "ReduceMax", "Pow", "Sqrt", "Exp", "Log", "Erf", "CumSum",
                # a recurrence over the sequence (a gated delta-net's state: Hugging Face keeps it in fp32), its body
                # left as exported
                "Scan")
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
LM_HEAD_CHOICES = ("fp32", "int8", "w8", "w4")
INT8_KERNELS = ("auto", *KERNELS)  # auto: u8s8 where the CPU makes it exact, else u8u8
#: each weight form's block size: 32 measured best for MatMulNBits on ONNX Runtime; TensorRT takes
#: 64 or 128 only (weight_only.TENSORRT_INT4_BLOCK_SIZES) and 128 reads fewer scales
FORM_BLOCK_SIZE = {"matmulnbits": 32, "dequantize": 128}
#: MatMulNBits' accuracy level per activation precision (4: int8 per block; 0: fp32)
WEIGHT_ACTIVATIONS = {"int8": 4, "fp32": 0}
#: a w8/w4 decoder's lookup tables (PrecisionOptions.embeddings)
EMBEDDING_CHOICES = ("fp32", "w8", "w4")


@dataclass
class PrecisionOptions:
    block_size: int | None = None  # weight-only block size; None: the form's (FORM_BLOCK_SIZE)
    # the LM head's precision; None: the largest single weight read per token (vocab x hidden) is
    # quantized too: w8 in the matmulnbits form (under an int8 decoder: its ONNX Runtime form, the
    # TensorRT form keeping fp32), w4 in the dequantize form (TensorRT has no int8 weight blocks)
    lm_head: str | None = None
    weight_scheme: str | None = None  # symmetric | asymmetric | zero-point; None: asymmetric, symmetric for dequantize
    weight_form: str = "matmulnbits"  # matmulnbits (ONNX Runtime) | dequantize (block-wise DequantizeLinear, TensorRT)
    # what MatMulNBits rounds the activations to: int8 per block (accuracy level 4, its fast kernels) or
    # fp32 (level 0: T5's activations carry outliers int8 cannot hold; a tiny T5's w8 decoder went from
    # logits cosine 0.9887 to 0.9986). The dequantize form's activations are fp16 either way.
    weight_activations: str = "int8"
    # rtn | gptq (precision.gptq): how the codes of w8/w4 weights and of an int8 decoder's weights are
    # picked; None: each precision's default (``rounding``)
    weight_rounding: str | None = None
    calibration: str = "minmax"
    exclude_nodes: tuple[str, ...] = ()  # sensitive layers kept in higher precision (node names)
    # an int8 decoder's ONNX Runtime kernel (smoothquant.KERNELS): auto takes u8s8 where the CPU makes
    # it exact (VNNI/AMX, cpu.int8_dot_product), else u8u8
    int8_kernel: str = "auto"
    # how many of an int8 decoder's most error-prone MatMuls stay fp32 (precision.sensitivity):
    # "auto" (the fewest that reach the int8 gate on the calibration pairs) or a count
    int8_fp32_matmuls: str = "auto"
    # a w8/w4 decoder's token-id lookup tables (token embeddings, Gemma 4's per-layer ones): fp32 (as exported), or
    # w8 / w4 as GatherBlockQuantized (weight_only.quantize_lookups); the matmulnbits form only
    embeddings: str = "fp32"

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATION_METHODS:
            raise ExportError(f"calibration method {self.calibration!r} is not one of {', '.join(CALIBRATION_METHODS)}")
        if self.lm_head is not None and self.lm_head not in LM_HEAD_CHOICES:
            raise ExportError(f"lm-head precision {self.lm_head!r} is not one of {', '.join(LM_HEAD_CHOICES)}")
        if self.weight_form not in FORMS:
            raise ExportError(f"weight form {self.weight_form!r} is not one of {', '.join(FORMS)}")
        if self.block_size is None:
            pass
        elif self.weight_form == "dequantize" and self.block_size not in TENSORRT_INT4_BLOCK_SIZES:
            raise ExportError(f"block size {self.block_size} does not build on TensorRT, whose int4 blocks are "
                              "64 or 128; choose --block-size 128 (the dequantize form's default) or 64")
        elif self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ExportError(f"block size must be a power of two >= 16, got {self.block_size}")
        if self.weight_rounding is not None and self.weight_rounding not in ROUNDINGS:
            raise ExportError(f"weight rounding {self.weight_rounding!r} is not one of {', '.join(ROUNDINGS)}")
        if self.weight_activations not in WEIGHT_ACTIVATIONS:
            raise ExportError(f"weight activations {self.weight_activations!r} is not one of {', '.join(WEIGHT_ACTIVATIONS)}")
        if self.weight_form == "dequantize" and self.weight_activations != "int8":
            raise ExportError("--weight-activations applies to the matmulnbits form (the dequantize form's activations "
                              "are fp16); drop it or use --weight-form matmulnbits")
        if self.int8_kernel not in INT8_KERNELS:
            raise ExportError(f"int8 kernel {self.int8_kernel!r} is not one of {', '.join(INT8_KERNELS)}")
        if self.int8_fp32_matmuls != "auto" and not (str(self.int8_fp32_matmuls).isdigit()):
            raise ExportError(f"--int8-fp32-matmuls takes auto or a count of MatMuls, got {self.int8_fp32_matmuls!r}")
        if self.weight_scheme is not None and self.weight_scheme not in SCHEMES:
            raise ExportError(f"weight scheme {self.weight_scheme!r} is not one of {', '.join(SCHEMES)}")
        if self.embeddings not in EMBEDDING_CHOICES:
            raise ExportError(f"embeddings precision {self.embeddings!r} is not one of {', '.join(EMBEDDING_CHOICES)}")
        if self.embeddings != "fp32" and self.weight_form == "dequantize":
            raise ExportError(f"--embeddings {self.embeddings} makes ONNX Runtime's GatherBlockQuantized, which TensorRT "
                              "does not read: use it with --weight-form matmulnbits, or drop it")
        if self.weight_form == "dequantize" and self.weight_scheme not in (None, "symmetric"):
            raise ExportError("the dequantize (TensorRT) weight form takes symmetric weights only; "
                              f"drop --weight-scheme {self.weight_scheme} or use --weight-form matmulnbits")

    @property
    def kernel(self) -> str:
        """The int8 decoder's ONNX Runtime kernel on this machine (``int8_kernel`` resolved)."""
        if self.int8_kernel != "auto":
            return self.int8_kernel
        return "u8s8" if int8_dot_product() else "u8u8"

    def rounding(self, precision: str) -> str:
        """How ``precision``'s weight codes are picked: as asked, else GPTQ for an int8 decoder (its
        smoothed weights carry the activations' outliers, and round to nearest is what failed its gate:
        ``gptq.per_channel_int8``) and round to nearest for w8/w4 (the demo's weights lie on GGUF grids
        that the asymmetric blocks reproduce; GPTQ costs a measuring pass per group of layers)."""
        return self.weight_rounding or ("gptq" if precision == "int8" else "rtn")

    @property
    def scheme(self) -> str:
        return self.weight_scheme or ("symmetric" if self.weight_form == "dequantize" else "asymmetric")

    @property
    def block(self) -> int:
        """The block size asked for (the form's default unless set)."""
        return self.block_size or FORM_BLOCK_SIZE[self.weight_form]

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Block sizes allowed per MatMul, in order of preference (the first dividing its K is
        used): the dequantize form falls back from 128 to TensorRT's other size, 64, where K is not
        a multiple of 128; an explicit 64, and ONNX Runtime's form (which pads K), use one size."""
        if self.weight_form == "dequantize" and self.block == 128:
            return TENSORRT_INT4_BLOCK_SIZES
        return (self.block,)

    def remedies(self, precision: str, decoder: bool = True) -> list[str]:
        """What to try when a stage built at ``precision`` with these options fails its gate: only
        options the build did not take already and that its form accepts (the dequantize form refuses
        other blocks, fp32 activations and w8). ``decoder``: the stage is the LM decoder (an image
        stage's int8 is calibrated per tensor, a decoder's from its channels' maxima)."""
        if precision == "fp16":
            return ["keep the nodes that lose most in fp32 (--keep-node NAME, repeatable)", "build this stage fp32"]
        if precision == "int8":
            kept = ("keep more of its MatMuls fp32 (--int8-fp32-matmuls N: the N worst"
                    + ("; auto stops at a quarter, or one of two or three)" if self.int8_fp32_matmuls == "auto"
                       else ")") + " or other nodes (--keep-node NAME)")
            if decoder:
                return ["calibrate on your own pairs (--calibration-images DIR --calibration-prompts FILE)", kept,
                        "w8 for the decoder"]
            other = [c for c in ("minmax", "percentile", "entropy") if c != self.calibration]
            return ["calibrate on your own pairs (--calibration-images DIR --calibration-prompts FILE)",
                    f"--calibration {'|'.join(other)}", kept, "fp16 for this stage"]
        if precision not in ("w8", "w4"):
            return []
        tries = []
        if self.rounding(precision) != "gptq":
            tries.append("round by GPTQ (--weight-rounding gptq)")
        if self.weight_form == "matmulnbits" and self.block > 16:
            tries.append("smaller blocks (--block-size 16)")
        if self.lm_head != "fp32":
            tries.append("the LM head fp32 (--lm-head fp32)")
        if self.weight_form == "matmulnbits" and self.weight_activations != "fp32":
            tries.append("fp32 activations (--weight-activations fp32, for outliers such as T5's)")
        if precision == "w4":
            tries.append("ONNX Runtime's form (--weight-form matmulnbits), which takes the rest" if
                         self.weight_form == "dequantize" else "w8")
        return tries

    def head_precision(self, stage_precision: str) -> str:
        """The LM head's precision under a decoder precision, checked against what that decoder
        and the weight form allow (called before export, so impossible choices fail early)."""
        trt = self.weight_form == "dequantize" and stage_precision in ("w8", "w4")
        if trt and stage_precision == "w8":
            raise ExportError("a w8 decoder has no TensorRT (dequantize) form: TensorRT's weight-only quantization "
                              "takes int4 weights only; choose decoder=w4, or --weight-form matmulnbits for ONNX Runtime")
        head = self.lm_head or ("w4" if trt else "w8")
        allowed = (("fp32", "int8", "w8") if stage_precision == "int8" else ("fp32", "w4") if trt
                   else ("fp32", "w8", "w4"))
        if head not in allowed:
            why = " in the dequantize (TensorRT) form, whose weight blocks are int4 only" if trt else ""
            raise ExportError(f"lm-head {head!r} does not go with the {stage_precision} decoder{why}; "
                              f"choose {' or '.join(allowed)}")
        return head


@dataclass
class VariantInfo:
    """What the manifest records about how a variant was made."""

    precision: str
    details: dict = field(default_factory=dict)


@contextlib.contextmanager
def quiet_logging():
    """onnxruntime.quantization logs every node at INFO on the root logger; our progress bar says enough."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _save(model: onnx.ModelProto, path: Path, source_dir: Path | None = None) -> None:
    check_graph(save_graph(model, path, source_dir))


def lm_head_nodes(model: onnx.ModelProto, output: str = "logits") -> list[str]:
    """The MatMul/Gemm that produces the logits (through at most a few reshapes/casts)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    name, seen = output, 0
    while name in producers and seen < 6:
        node = producers[name]
        if node.op_type in ("MatMul", "Gemm", "MatMulNBits"):
            return [node.name]
        name, seen = node.input[0], seen + 1
    return []


def topological_sort(model: onnx.ModelProto) -> None:
    """Reorder nodes so each comes after its inputs' producers and the outer names its subgraphs read (the fp16
    converter appends the input casts at the end of the node list, which the ONNX checker rejects)."""
    graph = model.graph
    ordered = topological_order(list(graph.node), {i.name for i in graph.input} | {i.name for i in graph.initializer})
    del graph.node[:]
    graph.node.extend(ordered)


#: ops a normalisation's statistics pass through between the square and the root
STATISTICS_CHAIN = ("Pow", "Mul", "ReduceMean", "ReduceSum", "Add", "Div", "Sqrt")


def statistics_chains(model: onnx.ModelProto) -> list[str]:
    """Nodes that must stay fp32 *together*: an island op's fp32 result is cast back to fp16 before
    the next op, so x^2 of an RMSNorm (SmolLM2's residual stream reaches ~25,000, its square ~6e8)
    overflows fp16 between Pow and ReduceMean even though both are islands. From each Pow, follow
    the single-consumer chain through the mean and epsilon to the Sqrt, whose result is back in
    fp16 range."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    kept = []
    for node in model.graph.node:
        if node.op_type != "Pow":
            continue
        chain, current = [node], node
        while current.op_type != "Sqrt":
            nxt = consumers.get(current.output[0], [])
            if len(nxt) != 1 or nxt[0].op_type not in STATISTICS_CHAIN:
                break
            current = nxt[0]
            chain.append(current)
        if current.op_type == "Sqrt":
            kept += [n.name for n in chain]
    return kept


_INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
                  onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}
#: how far back from a float -> integer Cast index arithmetic is looked for
_INDEX_DEPTH = 12


def index_arithmetic(model: onnx.ModelProto) -> list[str]:
    """Nodes that compute an INTEGER in floating point: every node between a Cast to an integer type
    and the Casts (from integers) and constants it is computed from, with no activation on the way
    (T5's relative-position buckets: ``log(distance / 8) / log(16) * 8`` truncated to a bucket).
    fp16 rounding there moves values across integer boundaries - a different bucket, another bias
    row - so they stay fp32. A chain that reaches a graph input, a weight-reading op or more than
    ``_INDEX_DEPTH`` nodes is the model's own activation being cast, and is left alone."""
    producers = {o: n for n in model.graph.node for o in n.output}
    constants = {i.name for i in model.graph.initializer}
    kept: set[str] = set()
    for cast in model.graph.node:
        if cast.op_type != "Cast" or next((a.i for a in cast.attribute if a.name == "to"), None) not in _INTEGER_TYPES:
            continue
        found, stack, ok = set(), [cast.input[0]], True
        while stack and ok:
            node = producers.get(stack.pop())
            if node is None or node.name in found:
                continue  # a constant, or a graph input (then the chain stops below)
            if node.op_type == "Cast":  # the integer source (or a cast we keep at fp32 too)
                found.add(node.name)
                continue
            if node.op_type in ("MatMul", "Gemm", "Conv") or len(found) >= _INDEX_DEPTH:
                ok = False
                break
            found.add(node.name)
            for name in node.input:
                if name and name not in constants and name not in producers:
                    ok = False  # reads a graph input directly: an activation
                stack.append(name)
        if ok and found:
            kept |= found
    return sorted(kept)


def module_nodes(model: onnx.ModelProto, modules: Iterable[str]) -> list[str]:
    """The nodes exported from modules with these names (the last part of a module path: Hugging
    Face's ``_keep_in_fp32_modules``, e.g. T5's ``wo``), found by the exporter's name-scope metadata,
    and the Adds their outputs flow into, Add after Add: where PyTorch promotes ``fp16 + fp32`` to
    fp32, so HF's own fp16 model keeps the residual sum after such a module in fp32."""
    import ast

    modules = set(modules)
    if not modules:
        return []
    kept: set[str] = set()
    for node in model.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        try:
            names = ast.literal_eval(scopes) if scopes else []
        except (ValueError, SyntaxError):
            continue
        if any(isinstance(n, str) and n.split(".")[-1] in modules for n in names):
            kept.add(node.name)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    stack = [o for n in model.graph.node if n.name in kept for o in n.output]
    while stack:
        for node in consumers.get(stack.pop(), []):
            if node.op_type == "Add" and node.name not in kept:
                kept.add(node.name)
                stack.extend(node.output)
    return sorted(kept)


def _own_constants(model: onnx.ModelProto, nodes: set[str]) -> None:
    """Give the kept-fp32 nodes private copies of the constants they read (an epsilon shared with
    converted nodes would otherwise be turned to fp16 under them)."""
    inits = {i.name: i for i in model.graph.initializer}
    made: set[str] = set()
    for node in model.graph.node:
        if node.name not in nodes:
            continue
        for k, name in enumerate(node.input):
            if name in inits:
                own = f"{name}__fp32_{node.name}"
                if own not in made:  # a node may read one constant twice (a Slice's starts and ends): one copy
                    copy = onnx.TensorProto()
                    copy.CopyFrom(inits[name])
                    copy.name = own
                    model.graph.initializer.append(copy)
                    made.add(own)
                node.input[k] = own


def _drop_cast_round_trips(model: onnx.ModelProto) -> int:
    """The converter casts every blocked node's output to fp16 and every blocked node's input back
    to fp32, even between two blocked nodes; an fp32 -> fp16 -> fp32 round trip there is exactly
    the overflow the islands are for. Wire such consumers to the fp32 value instead."""
    def cast_to(node) -> int | None:
        return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None

    producers = {o: n for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    dropped = 0
    for node in model.graph.node:
        if cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        up = producers.get(node.input[0])
        if up is None or cast_to(up) != onnx.TensorProto.FLOAT16 or node.output[0] in graph_outputs:
            continue
        source = up.input[0]
        if source not in producers or producers[source].op_type == "Cast":
            continue  # only bypass casts that follow a computing (blocked) node
        for consumer in model.graph.node:
            for k, name in enumerate(consumer.input):
                if name == node.output[0]:
                    consumer.input[k] = source
        dropped += 1
    if dropped:
        from .weight_only import drop_unused

        drop_unused(model.graph)
    return dropped


def fp16_model(model: onnx.ModelProto, keep: Iterable[str] = ()) -> tuple[onnx.ModelProto, dict]:
    """``model`` in fp16 with fp32 inputs/outputs and fp32 islands; ``keep``: more nodes left
    fp32. Returns the converted model and what the manifest records about it."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    present = sorted({n.op_type for n in model.graph.node} & set(FP32_ISLANDS))
    chains = statistics_chains(model)
    index = [n for n in index_arithmetic(model) if n not in chains]
    _own_constants(model, set(chains) | set(index) | set(keep))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP32_ISLANDS),
                                         node_block_list=chains + index + sorted(set(keep) - set(chains) - set(index)),
                                         disable_shape_infer=True)
    _drop_cast_round_trips(converted)
    topological_sort(converted)
    details = {"fp32_islands": present, "fp32_statistics_nodes": len(chains), "io": "fp32"}
    if index:
        details["fp32_index_nodes"] = len(index)
    return converted, details


def to_fp16(src: Path, dst: Path, keep_modules: Iterable[str] = ()) -> VariantInfo:
    model = onnx.load(os.fspath(src))
    keep = module_nodes(model, keep_modules)
    if set(keep_modules) and not keep:  # the model needs them fp32 (T5's wo overflows fp16): never drop that quietly
        raise ExportError(f"the model keeps {', '.join(sorted(set(keep_modules)))} in fp32, but no node of {src.name} "
                          "carries their name scope (pkg.torch.onnx.name_scopes); re-export with torch.onnx's dynamo "
                          "exporter or leave this stage fp32")
    converted, details = fp16_model(model, keep)
    if keep:
        details["fp32_modules"] = {"modules": sorted(set(keep_modules)), "nodes": len(keep)}
    _save(converted, dst)
    return VariantInfo("fp16", details)


def to_weight_only(src: Path, dst: Path, bits: int, options: PrecisionOptions,
                   calibration_feeds: list[dict[str, np.ndarray]] | None = None) -> VariantInfo:
    """``calibration_feeds``: the stage's inputs on the calibration pairs (GPTQ rounding measures the
    layer inputs on them; round to nearest needs none). A graph whose weights live in an external
    data file (a decoder past 1.8 GB) is loaded without them: each weight is read from the file when it
    is quantized and the tensors left as they are are copied file to file, so the fp32 decoder is never
    in memory whole (a 7B decoder is 28 GB of it)."""
    model = onnx.load(os.fspath(src), load_external_data=False)
    head = lm_head_nodes(model)
    head_precision = options.head_precision(f"w{bits}")
    keep = set(options.exclude_nodes) | (set(head) if head_precision == "fp32" else set())
    bits_of = {} if head_precision == "fp32" else {name: int(head_precision[1]) for name in head}
    missed = weights_missed(model, targeted_weights(model, keep), keep)
    with contextlib.ExitStack() as stack:
        blocks = None
        if options.rounding(f"w{bits}") == "gptq":  # measured on the fp32 graph, before any rewrite
            from . import gptq
            from .probe import ActivationProbe

            if not calibration_feeds:
                raise ExportError(f"GPTQ rounding of {src.stem} needs calibration inputs; none were given")
            inputs = weight_inputs(model, keep)
            probe = stack.enter_context(ActivationProbe(model, [tensor for tensor, _ in inputs.values()],
                                                        source_dir=src.parent))
            blocks = gptq.Rounding(probe, inputs, calibration_feeds)
        if options.weight_form == "dequantize":
            # W4A16: TensorRT's weight-only GEMMs take fp16 activations; the kept nodes stay fp32 (the
            # fp16 conversion rewrites every float tensor: it reads them in memory)
            onnx.load_external_data_for_model(model, os.fspath(src.parent))
            model, fp16_details = fp16_model(model, keep)
            activations = {"activations": "fp16", "scales": "fp16", **fp16_details}
        else:  # MatMulNBits rounds the fp32 activations to int8 per block inside its kernel, unless told not to
            level = WEIGHT_ACTIVATIONS[options.weight_activations]
            activations = {"activations": "fp32", "accuracy_level": level}
            if options.scheme == "asymmetric":  # how the float minimum is added back (weight_only._matmulnbits)
                activations["correction"] = DEFAULT_CORRECTION
        done = quantize_weights(model, bits, options.block_sizes, options.scheme, options.weight_form, keep, bits_of,
                                accuracy_level=activations.get("accuracy_level", 4), blocks=blocks,
                                source_dir=src.parent)
        if blocks is not None:
            blocks.release()
    lookups = ("fp32 (as exported; --embeddings w8 or w4 quantizes them)" if options.embeddings == "fp32" else
               quantize_lookups(model, int(options.embeddings[1]), options.block, source_dir=src.parent))
    rounding = {"method": "rtn"}
    if blocks is not None:
        if len(blocks.gptq) != len(done):  # a MatMul renamed by a rewrite would get RTN silently
            missed = sorted(set(done) - set(blocks.gptq))
            raise ExportError(f"GPTQ measured no input for {len(missed)} of {len(done)} MatMuls of {src.stem} "
                              f"({', '.join(missed[:3])}...); use --weight-rounding rtn")
        rounding = {"method": "gptq", "calibration_tokens": blocks.tokens, "measuring_passes": blocks.passes,
                    "damp": gptq.DAMP, "act_order": blocks.act_order,
                    "groups": "static (the round-to-nearest scales and zero points)"}
    _save(model, dst, src.parent)
    used = sorted({size for _, size in done.values()}, reverse=True)
    return VariantInfo(f"w{bits}", {"bits": bits, "block_size": options.block,
                                    "block_sizes": {str(size): sum(s == size for _, s in done.values()) for size in used},
                                    "scheme": options.scheme, "form": options.weight_form, **activations,
                                    "rounding": rounding, "lm_head": head_precision, "quantized_matmuls": len(done),
                                    "kept_fp32": sorted(keep), "weights_missed": missed, "lookup_tables": lookups})


class _Feeds:
    """onnxruntime.quantization's CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: Iterable[Mapping[str, np.ndarray]]):
        self._it = iter(list(feeds))

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - not used by the calibrators we call
        pass


def to_int8(src: Path, dst: Path, calibration_feeds: list[dict[str, np.ndarray]] | None,
            options: PrecisionOptions, cache: Path | None = None, note=None, tensorrt_only: bool = False) -> VariantInfo:
    """``cache``: where the calibration's result is kept (ONNX Runtime's JSON ranges, or a decoder's
    channel ranges); when it exists the calibration run is skipped (``calibration_feeds`` may then be None).
    ``note(text)``: told what a decoder's fp32-fallback search measures, trial by trial.
    ``tensorrt_only``: only TensorRT serves this graph (ONNX Runtime runs the stage's fused form), so a
    decoder's fallback trials run its Q/DQ pairs as TensorRT computes them (``sensitivity.choose``)."""
    cached = cache is not None and cache.exists()
    if not calibration_feeds and not cached:
        raise ExportError(f"int8 for {src.stem} needs calibration inputs; none were given")
    model = onnx.load(os.fspath(src), load_external_data=False)
    head = lm_head_nodes(model)  # none in an image stage: its precision says nothing about the LM head's
    # an fp32 or w8 head is left out of the int8 rewrite (w8 is applied after it: _decoder_int8)
    keep = list(options.exclude_nodes) + (head if head and options.head_precision("int8") != "int8" else [])
    if head:
        return _decoder_int8(src, dst, calibration_feeds, options, cache, keep, note, tensorrt_only)
    del model  # _static_int8 loads its own, which it frees before the fallback's trials
    return _static_int8(src, dst, calibration_feeds, options, cache, keep, note)


def image_fallback_path(cache: Path) -> Path:
    """Where an image stage's fp32 fallback, chosen on the ranges in ``cache``, is kept beside them."""
    return cache.with_name(cache.name + ".fallback.json")


def _read_fallback(path: Path | None):
    """The fallback kept beside an image stage's ranges, or None (missing or unreadable: chosen again)."""
    from .sensitivity import Fallback

    try:
        return Fallback.from_dict(json.loads(path.read_text())) if path is not None and path.exists() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_fallback(path: Path | None, fallback) -> None:
    if path is not None:
        write_text(path, json.dumps(fallback.to_dict()))


def keep_quantizers_apart(model: onnx.ModelProto) -> int:
    """Give the QuantizeLinear nodes that quantize one activation for several readers (attention's q, k
    and v projections reading one LayerNorm) attribute values that differ, so that ONNX Runtime's
    common-subexpression elimination does not merge them back into one. On x86 its int8 kernels take
    uint8 activations: a graph's int8 Q/DQ pairs become uint8 ones (QDQS8ToU8Transformer), but only
    where a QuantizeLinear feeds one DequantizeLinear, so a merged one leaves its readers as
    dequantize + fp32 MatMul (measured: a ViT-B/16 at 224 px, 2 threads, AVX-512 VNNI, 166 ms per
    image, against 100 ms with the pairs apart and 97 ms for a uint8 graph; outputs the same to the
    kernels' rounding). The attribute is ``axis``, which a per-tensor scale ignores (ONNX spec; TensorRT's
    parser checks it lies within the input's rank, then ignores it: onnx-tensorrt QuantDequantLinearHelper),
    set to distinct values within the rank (2 x rank readers at most; where the rank is not known, the
    nodes are left as they are). Returns how many nodes were changed."""
    inits = {i.name for i in model.graph.initializer}
    by_input: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits and not any(a.name == "axis"
                                                                                     for a in node.attribute):
            by_input.setdefault(node.input[0], []).append(node)
    shared = {tensor: nodes for tensor, nodes in by_input.items() if len(nodes) > 1}
    if not shared:
        return 0
    inferred = onnx.shape_inference.infer_shapes(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*inferred.graph.value_info, *inferred.graph.input)
             if v.type.tensor_type.HasField("shape")}
    changed = 0
    for tensor, nodes in shared.items():
        rank = ranks.get(tensor)
        if not rank:
            continue
        # the first keeps the default (axis 1); the others take the rest of [-rank, rank - 1]
        axes = [a for a in (*range(rank), *range(-1, -rank - 1, -1)) if a != 1]
        for node, axis in zip(nodes[1:], axes):
            node.attribute.append(onnx.helper.make_attribute("axis", axis))
            changed += 1
    return changed


def restore_order(model: onnx.ModelProto) -> bool:
    """Put the nodes of ``model`` back in an order where each runs after what it reads, the outer names its
    subgraphs read included: ONNX Runtime's quantizer sorts by node inputs only, so an ``If`` whose branch reads
    a tensor (a fused tower's masked attention, export/image_fuse.py) can land before the node making it, which the
    ONNX checker refuses. Returns whether the order changed."""
    before = [list(n.output) for n in model.graph.node]
    topological_sort(model)
    return [list(n.output) for n in model.graph.node] != before


def finish_candidate(path: Path) -> None:
    """What a static int8 graph ONNX Runtime's quantizer wrote at ``path`` needs, in one load and one save: its
    order (``restore_order``), no Q/DQ pair before a subgraph's outer read (``drop_pairs_into_subgraphs``) and its
    quantizers apart (``keep_quantizers_apart``)."""
    model = onnx.load(os.fspath(path), load_external_data=False)
    changed = [restore_order(model), drop_pairs_into_subgraphs(model), keep_quantizers_apart(model)]
    if any(changed):
        onnx.save(model, os.fspath(path))


#: the ops ONNX Runtime's QDQPropagationTransformer moves a DequantizeLinear forward across (qdq_propagation.cc),
#: and those its earlier passes may remove before it runs (an Expand to the shape it has: GQA's repeat of one)
QDQ_PROPAGATING_OPS = ("MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice",
                       "Expand", "Identity", "Dropout", "Cast")


def drop_pairs_into_subgraphs(model: onnx.ModelProto) -> int:
    """Remove each activation's Q/DQ pair whose dequantized tensor reaches, through ``QDQ_PROPAGATING_OPS`` only, a
    name a subgraph reads from outside (an ``If`` branch of a fused tower's attention reading the v projection):
    ONNX Runtime 1.32's QDQ propagation moves the DequantizeLinear forward past those ops and then writes the new
    tensor into the ``If``'s explicit inputs at the index of its implicit one - out of range: the process aborts
    (a vector assertion) or, in a build without assertions, corrupts memory, at session creation. Each such pair
    was a rounding only (the branch reads fp32); its MatMul keeps int8 inputs. Returns how many were removed."""
    from ..export.graph_info import reads

    graph = model.graph
    outer = {name for node in graph.node if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                  for a in node.attribute)
             for name in reads(node)[len(node.input):]}
    if not outer:
        return 0
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def reaches_outer(name: str) -> bool:
        return any(r.op_type in QDQ_PROPAGATING_OPS and (r.output[0] in outer or reaches_outer(r.output[0]))
                   for r in readers.get(name, []))

    made = {o: n for n in graph.node for o in n.output}
    inits = {i.name for i in graph.initializer}
    results = {o.name for o in graph.output}
    dropped = []
    for dq in graph.node:
        q = made.get(dq.input[0])
        if dq.op_type == "DequantizeLinear" and q is not None and q.op_type == "QuantizeLinear" \
                and q.input[0] not in inits and dq.output[0] not in results and reaches_outer(dq.output[0]):
            for r in readers[dq.output[0]]:
                r.input[:] = [q.input[0] if i == dq.output[0] else i for i in r.input]
            dropped.append(dq)
            if all(r is dq for r in readers[q.output[0]]):
                dropped.append(q)
    if dropped:
        for node in dropped:
            graph.node.remove(node)
        used = {name for node in graph.node for name in reads(node)}
        unused = {name for node in dropped for name in node.input[1:]} - used
        for tensor in [t for t in graph.initializer if t.name in unused]:
            graph.initializer.remove(tensor)
    return sum(n.op_type == "DequantizeLinear" for n in dropped)


def mark_int8_qdq(path: Path) -> None:
    """Mark an int8 Q/DQ graph that ONNX Runtime serves (``cpu.INT8_QDQ_METADATA``): on an x86 CPU
    without VNNI/AMX, OrtRunner runs its pairs as written instead of fusing them into U8S8 kernels
    that can saturate there (measured on an AVX2-only EPYC for the decoder's U8S8 MatMuls: 22% error
    on a row; an image stage's QLinearMatMul/QLinearConv take the same integer GEMM)."""
    model = onnx.load(os.fspath(path), load_external_data=False)
    set_metadata(model, INT8_QDQ_METADATA, "1")
    onnx.save(model, os.fspath(path))


def _static_int8(src: Path, dst: Path, calibration_feeds, options: PrecisionOptions, cache: Path | None,
                 keep: list[str], note=None) -> VariantInfo:
    """An image stage: static Q/DQ from ONNX Runtime's calibrated ranges, the MatMuls and Gemms whose
    int8 costs the stage's outputs most kept fp32 (``sensitivity``, per-tensor activations) until they
    reach the int8 gate on the calibration pairs; ``--int8-fp32-matmuls N`` keeps the N worst instead.
    ``cache``: the ranges (ONNX Runtime's JSON) and, beside them, the fallback chosen on them; both there, nothing
    is measured. The fp32 graph is read without its external data (its weights from ``src``'s folder) and freed
    once ranked: ONNX Runtime's quantizer loads its own for each candidate."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    from . import sensitivity

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[options.calibration]
    cached = cache is not None and cache.exists()
    fallback_file = None if cache is None else image_fallback_path(cache)
    fallback = _read_fallback(fallback_file) if cached else None
    model = onnx.load(os.fspath(src), load_external_data=False)
    layers = sensitivity.static_layers(model, keep)
    quantizable = len(layers)
    # by the fp32 stage's size, its external data counted (an int8 graph is about a quarter of it)
    external_format = all_weight_bytes(model, src.parent) > EXTERNAL_DATA_THRESHOLD
    setting = options.int8_fp32_matmuls
    written = u8s8_saturates()  # the candidates judged as OrtRunner will run the graph on this CPU
    searched = False
    none_kept = setting != "auto" and int(setting) == 0
    if fallback is None and layers and not none_kept and not calibration_feeds:
        raise ExportError(f"int8 for {src.stem} needs calibration inputs to choose which layers stay fp32 (its "
                          f"calibration cache {cache} has the ranges only); delete the cache to calibrate again")
    with tempfile.TemporaryDirectory() as scratch:
        # the ranges are calibrated once (the candidates below reuse them); without a cache of the
        # caller's, in a scratch file
        ranges = cache if cache is not None else Path(scratch) / "ranges.json"
        measured = None  # minmax ranges, which the ranking of attention's MatMuls reuses
        if method == CalibrationMethod.MinMax:
            if not ranges.exists():
                if not calibration_feeds:
                    raise ExportError(f"int8 for {src.stem} needs calibration inputs to measure its activations' "
                                      f"ranges")
                if note:
                    note(f"calibrating the int8 ranges of {src.stem} on {len(calibration_feeds)} inputs")
                measured = _minmax_ranges(src, model, calibration_feeds, ranges)
            elif fallback is None:
                measured = {name: data.range_value for name, data in load_tensors_data(ranges).data.items()}

        def quantize_to(out: Path, kept: list[str]) -> None:
            data = out.with_name(out.name + ".data")
            data.unlink(missing_ok=True)  # each candidate's weights in a file of their own, none of the last's kept
            quantize_static(
                os.fspath(src), os.fspath(out), None if ranges.exists() else _Feeds(calibration_feeds),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=method, nodes_to_exclude=keep + kept, op_types_to_quantize=list(STATIC_INT8_OPS),
                use_external_data_format=external_format,
                # QuantizeBias False: Conv/Gemm biases stay float instead of INT32 DequantizeLinear, which
                # TensorRT's ONNX parser rejects (NVIDIA/TensorRT#3360, onnx/onnx-tensorrt#850). ONNX Runtime
                # CPU fuses either form into QLinearConv/QGemm: on a biased Conv+Gemm graph both ran in the
                # same time (1.42 vs 1.54 ms, 1 thread), so this is the only form.
                # DedicatedQDQPair: each reader of a tensor gets its own Q/DQ pair (kept apart below)
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                               "DedicatedQDQPair": True},
                calibration_cache_path=ranges,
            )
            if data.exists():  # onnx writes it readable by its owner only; a server may run as another user
                data.chmod(out.stat().st_mode & 0o777)
            finish_candidate(out)

        if fallback is None and (not layers or none_kept):
            fallback = sensitivity.Fallback([], setting, None)
            _write_fallback(fallback_file, fallback)
        if fallback is None:
            def quantize(kept: list[str]) -> onnx.ModelProto:
                quantize_to(dst, kept)  # each candidate where the chosen one stays: search makes it last
                return onnx.load(os.fspath(dst))

            ranking = sensitivity.rank(model, layers, calibration_feeds, setting, [o.name for o in model.graph.output],
                                       note=note, activations="per-tensor", ranges=measured, source_dir=src.parent)
            del model, layers  # freed before the quantizer loads its own (a node held keeps its whole graph alive)
            _, fallback = sensitivity.search(ranking, quantize, calibration_feeds, setting, note=note,
                                             emulate_qdq=written, at_most_all=True)
            searched = True
            _write_fallback(fallback_file, fallback)
        else:
            del model, layers
            quantize_to(dst, fallback.kept)
    mark_int8_qdq(dst)  # once, on the graph chosen (the search judged its candidates with emulate_qdq itself)
    check_graph(dst)
    return VariantInfo("int8", {"format": "QDQ", "symmetric": True, "per_channel_weights": True, "bias": "float",
                                "activations": "int8 static per-tensor (symmetric)",
                                "kernel": "Q/DQ (ONNX Runtime's QLinear kernels, TensorRT's int8)",
                                # ONNX Runtime's fused kernels; OrtRunner runs the pairs as written elsewhere
                                "requires_cpu": list(INT8_DOT_PRODUCT),
                                "calibration": options.calibration,
                                "calibration_samples": len(calibration_feeds or []),
                                "calibration_cache": None if cache is None else {"file": str(cache), "reused": cached},
                                "quantized_matmuls": quantizable - len(fallback.kept),
                                "fp32_fallback": fallback.to_dict(),
                                "fallback_judged_on": None if not searched else (
                                    "Q/DQ run as written (this CPU's U8S8 kernels saturate)" if written
                                    else "ONNX Runtime's int8 kernels"),
                                "kept_fp32": keep})


#: the ops an image stage's static int8 quantizes, whose inputs and outputs are calibrated
STATIC_INT8_OPS = ("MatMul", "Gemm", "Conv")


def _minmax_ranges(src: Path, model: onnx.ModelProto, calibration_feeds, path: Path) -> dict:
    """The minmax ranges of the tensors ONNX Runtime's static quantizer reads ranges for (every activation in or out
    of a ``STATIC_INT8_OPS`` node), measured in one pass that holds about one run's memory (``probe.tensor_ranges``),
    written to ``path`` as ONNX Runtime's calibration cache (``quantize_static`` reads it and calibrates nothing):
    its own MinMax calibrator holds every layer's activations to the end of each run."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import TensorData, TensorsData, save_tensors_data

    from .probe import tensor_ranges

    inits = {i.name for i in model.graph.initializer}
    tensors = [t for node in model.graph.node if node.op_type in STATIC_INT8_OPS
               for t in (*node.input, *node.output) if t and t not in inits]
    measured = tensor_ranges(model, tensors, calibration_feeds, source_dir=src.parent)
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.array(low, np.float32), highest=np.array(high, np.float32))
        for name, (low, high) in measured.items()}), path)
    return measured


def _decoder_int8(src: Path, dst: Path, calibration_feeds, options: PrecisionOptions, cache: Path | None,
                  keep: list[str], note=None, tensorrt_only: bool = False) -> VariantInfo:
    """SmoothQuant with per-token dynamic activations on a decoder (``smoothquant``), its weights'
    codes picked by GPTQ unless round to nearest is asked for, its most error-prone MatMuls kept fp32
    (``sensitivity``). A graph already in ONNX Runtime's contrib ops (the
    fused form) runs on ONNX Runtime only: its integer kernels. A graph of standard ops is the one
    TensorRT reads: the symmetric Q/DQ form. ``cache`` keeps the measured channel ranges and the
    fallback chosen on them."""
    from . import sensitivity
    from . import smoothquant as sq

    model = onnx.load(os.fspath(src))
    head = [n for n in lm_head_nodes(model) if n not in keep]
    sq.untie(model, head)  # a tied head quantized (--lm-head int8) gets its own weight
    sq.gemms_as_matmuls(model)  # OPT's MLP
    form = "onnxruntime" if any(n.domain == sq.MS_DOMAIN for n in model.graph.node) else "qdq"
    kernel = options.kernel if form == "onnxruntime" else None
    if note and kernel == "u8u8" and options.int8_kernel == "auto":
        note("this CPU has no VNNI/AMX: the int8 decoder gets ONNX Runtime's exact U8U8 kernels, about fp32's "
             "speed here (w8/w4 decode faster); built on a CPU with them it gets U8S8, ~2x fp32's prefill")
    cached = sq.load_calibration(cache) if cache is not None else None
    maxima, fallback = cached if cached is not None else (None, None)
    if maxima is None or fallback is None:
        if not calibration_feeds:  # the cache file was there when the caller looked, but unreadable
            raise ExportError(f"int8 for {src.stem} needs calibration inputs: its calibration cache {cache} "
                              "cannot be read; delete it to calibrate again")
    if maxima is None:
        maxima = sq.channel_maxima(model, sorted({g.tensor for g in sq.groups(model, keep)}), calibration_feeds)
    smoothing = sq.smooth(model, maxima, sq.SMOOTH_ALPHA, keep)
    matmuls = sq.weighted_matmuls(model, keep)
    missed = weights_missed(model, {m.input[1] for m in matmuls}, set(keep) | set(head))  # the head: its own way
    weights, rounding = None, {"method": "rtn"}
    if options.rounding("int8") == "gptq":  # on the smoothed graph: the inputs the int8 kernels will see
        from . import gptq

        if not calibration_feeds:
            raise ExportError(f"GPTQ rounding of {src.stem}'s int8 weights needs calibration inputs (a calibration "
                              "cache keeps the ranges and the fallback, not the codes); give them, or round to "
                              "nearest: --weight-rounding rtn")
        # the head sees one row (the last position) per calibration input: too few for GPTQ's
        # second moments, so it is rounded to nearest
        rounded = [n for n in matmuls if n.name not in head]
        if note:
            note(f"GPTQ rounding of {len(rounded)} int8 weights (layer inputs measured on "
                 f"{len(calibration_feeds)} calibration inputs)")
        weights, measured = gptq.per_channel_int8(model, rounded, calibration_feeds)
        rounding = {"method": "gptq", "calibration_tokens": measured.tokens, "measuring_passes": measured.passes,
                    "damp": gptq.DAMP, "act_order": measured.act_order, "groups": "per output channel (scales: "
                    "round to nearest's)"}

    def quantize_in_place(candidate: onnx.ModelProto, kept: list[str]) -> None:
        sq.per_token_int8(candidate, keep + kept, form, kernel or "u8u8", weights)

    def quantize(kept: list[str]) -> onnx.ModelProto:
        candidate = onnx.ModelProto()
        candidate.CopyFrom(model)
        quantize_in_place(candidate, kept)
        return candidate

    if fallback is None:
        model, chosen = sensitivity.choose(model, quantize, matmuls, calibration_feeds, options.int8_fp32_matmuls,
                                           note=note, weights=weights, emulate_qdq=tensorrt_only and form == "qdq")
        if cache is not None:
            sq.save_calibration(cache, maxima, chosen.to_dict())
    else:
        chosen = sensitivity.Fallback.from_dict(fallback)
        quantize_in_place(model, chosen.kept)
    ort_form = form == "onnxruntime"
    head_precision = "int8" if head and head[0] not in chosen.kept else "fp32"
    if options.head_precision("int8") == "w8":
        head_precision = _w8_head(model, lm_head_nodes(model), ort_form, options.block)
    _save(model, dst)
    details = {
        "method": "smoothquant", "alpha": sq.SMOOTH_ALPHA, "form": form,
        "activations": "int8 dynamic per-token",
        "activation_codes": (f"uint8, zero point {sq.ACTIVATION_ZERO_POINT} (symmetric)" if ort_form
                             else "int8, zero point 0 (symmetric Q/DQ, scale 1/127 on x / max|x| per row)"),
        "weights": f"int8 per-channel symmetric (|q| <= {sq.WEIGHT_QMAX})"
                   + (f", stored as uint8 codes, zero point {sq.WEIGHT_ZERO_POINT}" if kernel == "u8u8" else ""),
        "rounding": rounding,
        # the head asked int8 may still be kept fp32 by the fallback (it is ranked like any MatMul)
        "lm_head": head_precision,
        "kernel": f"MatMulIntegerToFloat ({kernel.upper()})" if ort_form else "DequantizeLinear -> MatMul",
        "quantized_matmuls": len(matmuls) - len(chosen.kept), "fp32_fallback": chosen.to_dict(),
        "fallback_judged_on": ("Q/DQ run as written (TensorRT's arithmetic)" if tensorrt_only and not ort_form
                               else "ONNX Runtime's int8 kernels"),
        "smoothing": {k: v for k, v in smoothing.items() if k != "alpha"},
        "calibration": "channel max |x|", "calibration_samples": len(calibration_feeds or []),
        "calibration_cache": None if cache is None else {"file": str(cache), "reused": cached is not None},
        "kept_fp32": keep, "weights_missed": missed}
    if kernel == "u8s8":  # exact only where the CPU accumulates int8 products in int32 (the graph says so; OrtRunner checks)
        details["requires_cpu"] = list(INT8_DOT_PRODUCT)
    return VariantInfo("int8", details)


#: the w8 head of an int8 decoder's ONNX Runtime form: the w8 decoder's own default head (MatMulNBits)
W8_HEAD = {"bits": 8, "block_size": FORM_BLOCK_SIZE["matmulnbits"], "scheme": PrecisionOptions().scheme}


def _w8_head(model: onnx.ModelProto, head: list[str], ort_form: bool, block_size: int) -> str:
    """An int8 decoder's head as w8 (``W8_HEAD``, in place) where the form runs MatMulNBits (ONNX
    Runtime's); the standard (TensorRT) form keeps it fp32: TensorRT has no int8 weight blocks. A head
    read once per step (the last position) is the largest weight a decode step reads (vocab x hidden):
    w8 reads a quarter of its bytes, and its blocks of 32 with int8 activations per block moved the
    demo's logits far less than per-token int8 (cosine 0.99988 vs 0.984 at decode). ``block_size``:
    the one asked (--block-size, else W8_HEAD's); where it does not divide the hidden size the nearest
    one that does, else integer zero points (MatMulNBits pads K; the float minimum's correction cannot).
    Returns what the manifest records."""
    if not ort_form or not head:
        return "fp32 (w8 is ONNX Runtime's MatMulNBits; TensorRT has no int8 weight blocks)"
    others = {n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in head}
    inputs = weight_inputs(model, others)
    if not inputs:  # e.g. a Gemm head: MatMulNBits replaces MatMuls only
        return "fp32 (the head is not a MatMul on a constant weight, which w8 replaces)"
    fit = whole_block_size([k for _, k in inputs.values()], block_size)
    size, scheme = (fit, W8_HEAD["scheme"]) if fit else (block_size, "zero-point")
    quantize_weights(model, W8_HEAD["bits"], size, scheme, "matmulnbits", others,
                     accuracy_level=WEIGHT_ACTIVATIONS["int8"])
    return f"w8 (MatMulNBits, {scheme} blocks of {size})"


def make_variant(precision: str, src: Path, dst: Path, options: PrecisionOptions,
                 calibration_feeds: list[dict[str, np.ndarray]] | None = None,
                 calibration_cache: Path | None = None, keep_modules: Iterable[str] = (), note=None,
                 tensorrt_only: bool = False) -> VariantInfo:
    """``keep_modules``: modules the model keeps in fp32 (``module_nodes``), kept fp32 by the fp16 pass.
    ``note(text)``: told about the trials of a long search (an int8 decoder's fp32 fallback).
    ``tensorrt_only``: no ONNX Runtime target runs this graph (see ``to_int8``)."""
    if precision == "fp16":
        return to_fp16(src, dst, keep_modules)
    if precision in ("w8", "w4"):
        info = to_weight_only(src, dst, int(precision[1]), options, calibration_feeds)
    elif precision == "int8":
        info = to_int8(src, dst, calibration_feeds, options, calibration_cache, note, tensorrt_only)
    else:
        raise ExportError(f"no conversion for precision {precision!r}")
    missed = describe_missed(f"{src.stem} ({precision})", info.details.get("weights_missed", {"tensors": 0}))
    if missed and note:
        note(missed)
    return info
