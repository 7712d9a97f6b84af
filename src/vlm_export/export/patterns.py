"""Sub-graph patterns more than one fusion pass reads (the exporter's spelling of a layer's pieces)."""
from __future__ import annotations

import numpy as np
import onnx


def rms_norm(g, reduce: onnx.NodeProto):
    """Match Pow(X,2)|Mul(X,X) -> ReduceMean(last axis) -> Add(eps) -> Sqrt -> Reciprocal|Div(1,.)
    (or Pow(., -0.5) for both: Gemma 4's) -> Mul(X,.) -> Mul(., gamma) from its ReduceMean; returns (x, gamma, eps, nodes, y) or None. A norm
    with no constant gamma after it (nanochat's, which has no weight) matches without one: gamma is
    None then, and X's last axis static (the width a kernel's unit gamma needs)."""
    if not _over_last_axis(g, reduce):
        return None
    x_shape = g.shape(reduce.input[0])
    square = g.parent(reduce, 0, ("Pow", "Mul"))
    if square is None:
        return None
    x = square.input[0]
    if square.op_type == "Pow" and g.scalar(square.input[1]) != 2.0:
        return None
    if square.op_type == "Mul" and square.input[1] != x:
        return None
    if g.sole_consumer(square.output[0], "ReduceMean") is not reduce:
        return None
    add = g.sole_consumer(reduce.output[0], "Add")
    eps = g.scalar(g.other_input(add, reduce.output[0]) or "") if add is not None else None
    if eps is None or not 0 < eps < 1e-2:
        return None
    sqrt = g.sole_consumer(add.output[0], ("Sqrt", "Pow"))
    if sqrt is not None and sqrt.op_type == "Pow":  # (mean + eps) ** -0.5 in one node
        inv, sqrt = (sqrt if sqrt.input[0] == add.output[0] and g.scalar(sqrt.input[1]) == -0.5 else None), None
    else:
        inv = sqrt and g.sole_consumer(sqrt.output[0], ("Reciprocal", "Div"))
        if inv is not None and inv.op_type == "Div" and (inv.input[1] != sqrt.output[0]
                                                         or g.scalar(inv.input[0]) != 1.0):
            inv = None
    if inv is None:
        return None
    scale = g.sole_consumer(inv.output[0], "Mul")
    if scale is None or g.other_input(scale, inv.output[0]) != x:
        return None
    nodes = [square, reduce, add, *([sqrt] if sqrt is not None else []), inv, scale]
    affine = g.sole_consumer(scale.output[0], "Mul")
    gamma_name = affine and g.other_input(affine, scale.output[0])
    gamma = g.const(gamma_name) if gamma_name else None
    if gamma is not None and gamma.ndim == 1 \
            and not (x_shape and isinstance(x_shape[-1], int) and gamma.shape[0] != x_shape[-1]):
        return x, gamma_name, eps, [*nodes, affine], affine.output[0]
    if not x_shape or not isinstance(x_shape[-1], int):
        return None
    # no weight: whatever reads the normalised X (a Mul by something else included) keeps reading it
    return x, None, eps, nodes, scale.output[0]


def layer_norm(g, reduce: onnx.NodeProto):
    """Match a LayerNorm written out without bias (Cohere's): Sub(X, ReduceMean(X, last axis)) -> the
    RMSNorm chain of ``rms_norm`` on that difference, from the variance's ReduceMean; returns (X,
    gamma, eps, nodes, y) or None."""
    match = rms_norm(g, reduce)
    sub = match and g.producer.get(match[0])
    if sub is None or sub.op_type != "Sub":
        return None
    centered, gamma, eps, nodes, y = match
    x, mean = sub.input[0], g.parent(sub, 1, "ReduceMean")
    if mean is None or mean.input[0] != x or not _over_last_axis(g, mean) \
            or g.sole_consumer(mean.output[0], "Sub") is not sub:
        return None
    normalising = next(n for n in nodes[1:] if n.op_type == "Mul" and centered in n.input)
    if centered in g.outputs or {id(c) for c in g.consumers[centered]} != {id(nodes[0]), id(normalising)}:
        return None  # the centred values are read elsewhere (not the square and the normalising Mul)
    return x, gamma, eps, [mean, sub, *nodes], y


def _over_last_axis(g, reduce: onnx.NodeProto) -> bool:
    """Whether ``reduce`` (a ReduceMean) averages its input's last axis alone, keeping it."""
    if g.attr(reduce, "keepdims", 1) != 1:
        return False
    axes = g.attr(reduce, "axes")
    if axes is None and len(reduce.input) > 1:
        axes = g.const(reduce.input[1])
    if axes is None or len(np.atleast_1d(axes)) != 1:
        return False
    axis, shape = int(np.atleast_1d(axes)[0]), g.shape(reduce.input[0])
    return axis == -1 or (shape is not None and axis == len(shape) - 1)


def last_axis_slice(g, node: onnx.NodeProto | None, x: str, step: int = 1):
    """(start, end) of ``node`` = Slice(``x``) on its last axis with ``step``, else None (an end past the
    axis as the exporter writes it: INT64_MAX or the axis length)."""
    if node is None or node.op_type != "Slice" or node.input[0] != x or len(node.input) < 4:
        return None
    starts, ends, axes = (g.const(node.input[i]) for i in (1, 2, 3))
    steps = g.const(node.input[4]) if len(node.input) > 4 and node.input[4] else np.array([1])
    if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)) or int(steps.item()) != step:
        return None
    rank = len(g.shape(x) or [])
    if int(axes.item()) not in (-1, rank - 1):
        return None
    return int(starts.item()), int(ends.item())


def unsqueeze_axis(g, node: onnx.NodeProto) -> int | None:
    """The one axis ``node`` (an Unsqueeze) inserts, from its axes input or (opset < 13) attribute; None
    when it inserts several or they are not constant."""
    axes = g.const(node.input[1]) if len(node.input) > 1 else np.array(g.attr(node, "axes", []))
    return int(axes.item()) if axes is not None and axes.size == 1 else None
