"""The ONNX Runtime form of an image stage: each attention's scores, softmax and weighted sum ->
``com.microsoft.MultiHeadAttention``, by pattern.

A vision tower's attention is exported as ``MatMul(q, Transpose(k))`` -> scale -> ``Add`` (an additive
mask) -> ``Softmax`` -> ``MatMul(., v)``. ONNX Runtime's CPU kernels then hold every head's scores at
once: heads x patches² floats per layer, twice (scores and softmax) - 17 GB for one layer of
HunyuanOCR's tower on its largest image (16,384 patches, 16 heads). ``MultiHeadAttention`` without a
mask runs ONNX Runtime's tiled (flash) attention on the CPU: memory that grows with the patches, not
their square, and faster (ONNX Runtime 1.32, 2 threads, 16 heads of 72, 4,096 patches: 1.05 s and
0.39 GB against 2.2 s and 2.2 GB). With a mask the kernel takes an untiled path.

Patch-row towers (Qwen2-VL's and its kin: ``adapters.qwen2_vl.masked_attention``) read a mask that is
zero unless a batch of images of different sizes is padded (or a window has empty slots), so each
masked attention goes behind an ``If``: nothing masked (one image, or images of one size) -> the tiled
kernel; else -> the exported nodes themselves, the same arithmetic as the standard graph (any mask).
No mask, or a constant zero one (a fixed-size ViT's), needs no ``If``. An attention whose shapes the
graph does not state (heads, head size) is left as exported and the report says why. A tanh-approximated
GELU (SigLIP's) becomes ``FastGelu`` too (``fuse.fuse_tanh_gelu``, the decoder pass's). Everything is
read from the graph; no model type is consulted.

The result is for ONNX Runtime's CPU provider only (TensorRT reads no com.microsoft ops; the tiled
kernel is fp32), so the build makes it for fp32 image stages and ships the standard graph beside it.
Contract: onnxruntime docs/ContribOperators.md (MultiHeadAttention).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .fuse import MS_DOMAIN, Weights, _Graph, fuse_tanh_gelu, load_structure
from .graph_info import save_graph, topological_order


@dataclass
class ImageFuseReport:
    """What ``fuse_image_attention`` did."""

    attentions: int = 0  # rewritten to MultiHeadAttention
    masked: int = 0  # of them behind an If on their mask
    gelus: int = 0  # tanh-approximated GELUs rewritten to FastGelu (fuse.fuse_tanh_gelu)
    nodes_before: int = 0
    nodes_after: int = 0
    reason: str = ""  # why nothing was fused (empty when something was)
    notes: list[str] = field(default_factory=list)  # attentions seen but left alone, and why

    @property
    def fused(self) -> bool:
        return self.attentions > 0 or self.gelus > 0

    def to_dict(self) -> dict:
        return {"fusions": {"attention": self.attentions, "masked_attention": self.masked, "gelu": self.gelus},
                "nodes_before": self.nodes_before, "nodes_after": self.nodes_after, "reason": self.reason,
                "notes": list(self.notes)}


@dataclass
class _Attention:
    """One matched attention: its nodes, q/k/v ([batch, heads, tokens, head size] or BSNH), the scale, the mask."""

    nodes: list[onnx.NodeProto]
    q: tuple[str, bool]  # (tensor, whether it is [batch, tokens, heads, head size] already)
    k: tuple[str, bool]
    v: tuple[str, bool]
    heads: int
    head_size: int
    scale: float
    mask: str | None  # the additive mask, or None
    output: str  # what the kernel's result replaces
    transposed: bool  # output is the weighted sum already transposed to [batch, tokens, heads, head size]


def _scores(g: _Graph, x: str) -> tuple[onnx.NodeProto, float, list[onnx.NodeProto]] | None:
    """(the q x k MatMul, the scale, the scaling nodes) of a softmax input ``x`` that is scaled scores."""
    node = g.producer.get(x)
    if node is None:
        return None
    if node.op_type == "MatMul":
        a, b = (g.parent(node, i, "Mul") for i in (0, 1))
        if a and b:  # each side scaled by the square root (torch.onnx's scaled_dot_product_attention)
            sa, sb = (g.scalar(m.input[1]) for m in (a, b))
            if sa is None or sb is None:
                return None
            return node, sa * sb, [a, b]
        return node, 1.0, []
    if node.op_type in ("Mul", "Div"):
        for i in (0, 1) if node.op_type == "Mul" else (0,):
            mm = g.parent(node, i, "MatMul")
            s = g.scalar(node.input[1 - i])
            if mm is not None and s is not None and s != 0:
                return mm, (s if node.op_type == "Mul" else 1.0 / s), [node]
    return None


def _heads(g: _Graph, name: str, bsnh: bool) -> tuple[int, int] | None:
    """(heads, head size) of a 4-D q, k or v as its stated shape gives them (BSNH or BNSH)."""
    shape = g.shape(name)
    if shape is None or len(shape) != 4:
        return None
    sizes = (shape[2], shape[3]) if bsnh else (shape[1], shape[3])
    return sizes if all(isinstance(d, int) for d in sizes) else None


def _match(g: _Graph, softmax: onnx.NodeProto) -> _Attention | str:
    """The attention around ``softmax``, or why it is left alone."""
    if g.attr(softmax, "axis", -1) not in (-1, 3):
        return "a softmax not over the keys"
    weighted = g.sole_consumer(softmax.output[0], "MatMul")
    if weighted is None or weighted.input[0] != softmax.output[0]:
        return "a softmax not followed by a MatMul with the values alone"
    x, mask, nodes = softmax.input[0], None, [softmax, weighted]
    add = g.parent(softmax, 0, "Add")
    if add is not None and g.sole_consumer(add.output[0], "Softmax"):
        for i in (0, 1):
            if _scores(g, add.input[i]) is not None:
                x, mask = add.input[i], add.input[1 - i]
                nodes.append(add)
                break
        else:
            return "scores not a scaled MatMul of q and transposed k"
    found = _scores(g, x)
    if found is None:
        return "scores not a scaled MatMul of q and transposed k"
    scores, scale, scaling = found
    nodes += [scores, *scaling]
    if any(not g.sole_consumer(n.output[0], ("Mul", "Div", "Add", "Softmax", "MatMul")) for n in (scores, *scaling)):
        return "the scores are read elsewhere too"
    q_side = scaling[0].input[0] if len(scaling) == 2 else scores.input[0]
    kt_side = scaling[1].input[0] if len(scaling) == 2 else scores.input[1]
    kt = g.producer.get(kt_side)
    # k transposed from [batch, heads, tokens, head size], or (the exporter folds both transposes) straight from
    # the [batch, tokens, heads, head size] it was reshaped to
    perm = list(g.attr(kt, "perm", [])) if kt is not None and kt.op_type == "Transpose" else None
    if perm not in ([0, 1, 3, 2], [0, 2, 3, 1]):
        return "keys not transposed from [batch, heads, tokens, head size]"
    q, k, v = (q_side, False), (kt.input[0], perm == [0, 2, 3, 1]), (weighted.input[1], False)
    sizes = [_heads(g, *t) for t in (q, k, v)]
    if None in sizes or len(set(sizes)) != 1:
        return "q, k and v without one stated number of heads and head size"
    heads, head_size = sizes[0]
    if mask is not None:
        constant = g.const(mask)
        if constant is not None:
            if constant.any():
                return "a constant mask that masks something"
            mask = None  # a zero mask: nothing masked
    after = g.sole_consumer(weighted.output[0], "Transpose")
    transposed = after is not None and list(g.attr(after, "perm", [])) == [0, 2, 1, 3]
    if transposed:
        nodes.append(after)
    return _Attention(nodes, q, k, v, heads, head_size, scale, mask, (after if transposed else weighted).output[0],
                      transposed)


class _Constants:
    """Shared int64 shapes and, per mask, the If's condition (one per mask, however many layers read it)."""

    def __init__(self, g: _Graph):
        self.g, self.masks = g, {}

    def initializer(self, name: str, value, dtype) -> str:
        if name not in self.g.inits and all(t.name != name for t in self.g.new_inits):
            self.g.new_inits.append(numpy_helper.from_array(np.array(value, dtype), name))
        return name

    def shape(self, *dims: int) -> str:
        return self.initializer("image_attention_shape_" + "_".join(str(d).replace("-", "m") for d in dims), dims,
                                np.int64)

    def nothing_masked(self, mask: str) -> str:
        """A bool scalar: every entry of the additive ``mask`` is 0."""
        if mask not in self.masks:
            base = f"{mask}_nothing_masked"
            zero = self.initializer("image_attention_zero", 0.0, np.float32)
            self.g.added += [helper.make_node("Abs", [mask], [f"{base}_abs"], name=f"{base}_abs"),
                             helper.make_node("ReduceMax", [f"{base}_abs"], [f"{base}_largest"],
                                              name=f"{base}_largest", keepdims=0),
                             helper.make_node("Equal", [f"{base}_largest", zero], [base], name=base)]
            self.masks[mask] = base
        return self.masks[mask]


def _tiled(g: _Graph, a: _Attention, name: str, out: str, constants: _Constants) -> list[onnx.NodeProto]:
    """The kernel without a mask on q, k and v flattened to [batch, tokens, heads x head size], its result shaped as
    ``a.output`` is (written to ``out``)."""
    nodes = []

    def flat(tensor: tuple[str, bool], side: str) -> str:
        """q, k or v as [batch, tokens, heads x head size]: a BSNH tensor reshaped, or the one its heads were
        transposed from (no copy), else transposed back."""
        x, bsnh = tensor
        t = g.producer.get(x)
        if bsnh:
            source = x
        elif t is not None and t.op_type == "Transpose" and list(g.attr(t, "perm", [])) == [0, 2, 1, 3]:
            source = t.input[0]
        else:
            source = f"{name}_{side}_bsnh"
            nodes.append(helper.make_node("Transpose", [x], [source], name=source, perm=[0, 2, 1, 3]))
        flattened = f"{name}_{side}"
        nodes.append(helper.make_node("Reshape", [source, constants.shape(0, 0, -1)], [flattened], name=flattened))
        return flattened

    q, k, v = flat(a.q, "q"), flat(a.k, "k"), flat(a.v, "v")
    result, heads = f"{name}_mha", constants.shape(0, 0, a.heads, a.head_size)
    nodes.append(helper.make_node("MultiHeadAttention", [q, k, v], [result], name=result, domain=MS_DOMAIN,
                                  num_heads=a.heads, scale=float(a.scale)))
    if a.transposed:  # [batch, tokens, heads, head size], as the Transpose after the weighted sum made it
        nodes.append(helper.make_node("Reshape", [result, heads], [out], name=f"{name}_heads"))
    else:
        nodes += [helper.make_node("Reshape", [result, heads], [f"{name}_bsnh"], name=f"{name}_heads"),
                  helper.make_node("Transpose", [f"{name}_bsnh"], [out], name=f"{name}_bnsh", perm=[0, 2, 1, 3])]
    return nodes


def _rewrite(g: _Graph, a: _Attention, number: int, constants: _Constants) -> None:
    """Queue ``a``'s replacement: the tiled kernel, behind an If on the mask where there is one (the exported nodes
    in its other branch)."""
    name = f"image_attention_{number}"
    if a.mask is None:
        g.replace(a.nodes, _tiled(g, a, name, a.output, constants))
        return
    tiled, masked = f"{name}_tiled", f"{name}_masked"
    exported = []
    for node in a.nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.output[:] = [masked if o == a.output else o for o in copy.output]
        exported.append(copy)
    inner = {o for n in exported for o in n.output}
    exported = topological_order(exported, {i for n in exported for i in n.input if i not in inner}, f"{name}'s branch")
    branches = {branch: helper.make_graph(nodes, f"{name}_{branch}", [],
                                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)])
                for branch, nodes, out in (("unmasked", _tiled(g, a, name, tiled, constants), tiled),
                                           ("masked", exported, masked))}
    g.replace(a.nodes, [helper.make_node("If", [constants.nothing_masked(a.mask)], [a.output], name=f"{name}_if",
                                         then_branch=branches["unmasked"], else_branch=branches["masked"])])


def fuse_image_attention(model: onnx.ModelProto, weights: Weights | None = None) -> ImageFuseReport:
    """Rewrite ``model``'s attentions in place (see the module docstring); returns what was fused."""
    report = ImageFuseReport(nodes_before=len(model.graph.node))
    g = _Graph(model, weights)
    constants = _Constants(g)
    for softmax in [n for n in model.graph.node if n.op_type == "Softmax"]:
        found = _match(g, softmax)
        if isinstance(found, str):
            report.notes.append(f"{softmax.name}: left as exported ({found})")
            continue
        _rewrite(g, found, report.attentions, constants)
        report.attentions += 1
        report.masked += found.mask is not None
    report.gelus = fuse_tanh_gelu(g)
    if report.fused:
        g.commit()
        if MS_DOMAIN not in {o.domain for o in model.opset_import}:
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    if not report.attentions:
        why = ("no attention matched (scaled q x transposed k -> softmax -> x v, with no mask or a key padding mask)"
               + (f": {report.notes[0]}" if report.notes else ""))
        if report.fused:
            report.notes.append(why)
        else:
            report.reason = why
    report.nodes_after = len(model.graph.node)
    return report


def fuse_image_stage(src: Path, dst: Path, loaded: tuple[onnx.ModelProto, bool] | None = None) -> ImageFuseReport:
    """Write the fused form of the image-stage graph ``src`` to ``dst`` (``src`` unchanged; its weights
    copied file to file, never loaded whole). A graph nothing matches is not written; the report's
    ``reason`` says why. ``loaded``: ``src`` as ``fuse.load_structure`` read it (a caller that looked at it
    first; the pass rewrites it)."""
    src, dst = Path(src), Path(dst)
    model, external = loaded or load_structure(src, "image-stage")
    report = fuse_image_attention(model, Weights(src.parent) if external else None)
    if report.fused:
        save_graph(model, dst, src.parent)
    return report
