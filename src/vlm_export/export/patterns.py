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


#: sqrt(2 / pi) and the cube's factor of GELU's tanh approximation
_GELU_SCALE, _GELU_CUBE = float(np.sqrt(2 / np.pi)), 0.044715


def tanh_gelu(g, tanh: onnx.NodeProto) -> tuple[str, onnx.NodeProto] | None:
    """Match x * 0.5 * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3))) - PyTorch's gelu(approximate="tanh"), Gemma's
    and SigLIP's activation, as the exporter writes it: the three factors multiplied in any order or grouping, x^3
    as Pow(x, 3) or products of x - from its Tanh; returns (x, the node computing the result) or None. Nodes in
    between that something else also reads stay (only the result's producer is replaced)."""
    inner = _times(g, tanh.input[0], _GELU_SCALE)
    add = g.producer.get(inner) if inner else None
    if add is None or add.op_type != "Add":
        return None
    for i in (0, 1):
        x, cube = add.input[i], _times(g, add.input[1 - i], _GELU_CUBE)
        if cube and _is_cube(g, cube, x):
            break
    else:
        return None
    one = g.sole_consumer(tanh.output[0], "Add")
    if one is None or g.scalar(g.other_input(one, tanh.output[0]) or "") != 1.0:
        return None
    first = g.sole_consumer(one.output[0], "Mul")
    other = first and g.other_input(first, one.output[0])
    if other is None:
        return None
    if other == x or _near(g.scalar(other), 0.5):  # (1 + tanh) * x * 0.5 or (1 + tanh) * 0.5 * x
        second = g.sole_consumer(first.output[0], "Mul")
        last = second and g.other_input(second, first.output[0])
        if last is None or not (_near(g.scalar(last), 0.5) if other == x else last == x):
            return None
        return x, second
    half = g.producer.get(other)  # (x * 0.5) * (1 + tanh)
    if half is not None and half.op_type == "Mul" and x in half.input \
            and _near(g.scalar(g.other_input(half, x) or ""), 0.5):
        return x, first
    return None


def _near(value: float | None, want: float) -> bool:
    return value is not None and abs(value - want) <= 1e-5 * abs(want)


def _times(g, name: str, factor: float) -> str | None:
    """``name`` = Mul(y, factor) (the constant on either side): y, else None."""
    node = g.producer.get(name)
    if node is None or node.op_type != "Mul":
        return None
    for i in (0, 1):
        if _near(g.scalar(node.input[1 - i]), factor) and g.const(node.input[i]) is None:
            return node.input[i]
    return None


def _is_cube(g, name: str, x: str) -> bool:
    """Whether ``name`` = Pow(x, 3), Mul(x, Mul(x, x)) or Mul(Mul(x, x), x)."""
    node = g.producer.get(name)
    if node is None:
        return False
    if node.op_type == "Pow":
        return node.input[0] == x and g.scalar(node.input[1]) == 3.0
    if node.op_type != "Mul" or x not in node.input:
        return False
    square = g.producer.get(g.other_input(node, x) or "")
    return square is not None and square.op_type == "Mul" and list(square.input) == [x, x]
