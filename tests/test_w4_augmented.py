"""The asymmetric scheme's float minimum added back by the MatMulNBits itself (``correction="augmented"``):
the input's block sums appended as extra K columns, an integer zero point per block and the residual
minimum as extra weight rows; against the two-node ``shift`` correction and integer zero points alone."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlm_export.errors import ExportError
from vlm_export.precision.weight_only import quantize_weights

BLOCK = 32


def _q4_1(rng, k, n):
    """Weights on a GGUF Q4_1 grid (scale * code + a float minimum per block of 32 along K), as the
    demo's SmolLM2 is: the minimum is rarely a whole number of steps."""
    scale = rng.uniform(0.002, 0.02, (k // BLOCK, n)).astype(np.float32)
    minimum = -scale * rng.uniform(3, 12, scale.shape).astype(np.float32)
    codes = rng.integers(0, 16, (k, n)).astype(np.float32)
    codes[0::BLOCK], codes[1::BLOCK] = 0, 15  # each block spans the whole grid, as Q4_1's blocks do
    return codes * np.repeat(scale, BLOCK, 0) + np.repeat(minimum, BLOCK, 0)


def _projections(k, ns, seed=0):
    """x -> one MatMul per width in ``ns``, all reading x (q/k/v-like), then a second layer on the first."""
    rng = np.random.default_rng(seed)
    weights = [_q4_1(rng, k, n) for n in ns] + [_q4_1(rng, ns[0], k)]
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"], name=f"proj{i}") for i in range(len(ns))]
    nodes.append(helper.make_node("MatMul", ["y0", f"w{len(ns)}"], ["z"], name="second"))
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, 3, n]) for i, n in enumerate(ns)]
    outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 3, k]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])], outputs,
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), weights


def _run(model, x):
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


def _error(got, expected):
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("bits", [4, 8])
def test_augmented_form_keeps_the_float_minimum_where_integer_zero_points_lose_it(bits):
    """Inputs with a mean (as a normed hidden state has per channel): an integer zero point's
    rounding shifts a whole block and the shifts add up over the block's inputs; the augmented form
    corrects the residual. fp32 activations (accuracy level 0), so only the weights' error shows."""
    k, ns = 96, [64, 40]
    x = (np.random.default_rng(5).standard_normal((1, 3, k)) + 1.0).astype(np.float32)
    errors = {}
    for label, scheme, correction in (("augmented", "asymmetric", "augmented"), ("shift", "asymmetric", "shift"),
                                      ("zero-point", "zero-point", "augmented")):
        model, weights = _projections(k, ns)
        quantize_weights(model, bits, BLOCK, scheme, "matmulnbits", keep=set(), accuracy_level=0, correction=correction)
        got = _run(model, x)
        errors[label] = max(_error(got[i], x @ weights[i]) for i in range(len(ns)))
    # the shift form is exact up to fp32 on a Q4_1 grid; the augmented one up to its residual rows' rounding
    assert errors["shift"] < 1e-5, errors
    assert errors["augmented"] < errors["zero-point"] / 5, errors
    assert errors["augmented"] < (0.01 if bits == 4 else 1e-3), errors


def test_augmented_form_adds_no_node_per_projection():
    """One block sum + Concat per input, shared by every projection reading it; no Add, no shift MatMul."""
    k, ns = 64, [64, 32, 32]
    model, weights = _projections(k, ns)
    done = quantize_weights(model, 4, BLOCK, "asymmetric", "matmulnbits", keep=set(), correction="augmented")
    assert set(done) == {"proj0", "proj1", "proj2", "second"}
    ops = [n.op_type for n in model.graph.node]
    # x (3 projections) and y0 (one): two inputs, each one indicator MatMul and one Concat
    assert sorted(ops) == sorted(["MatMul", "Concat"] * 2 + ["MatMulNBits"] * 4), ops
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    readers = {n.input[0] for n in nbits}
    assert len(readers) == 2 and all(r.endswith(f"with_blocksums{BLOCK}") for r in readers)
    # K grows by whole blocks: 64 -> 2 block sums, padded to one block of 32
    assert {next(a.i for a in n.attribute if a.name == "K") for n in nbits} == {k + BLOCK}
    assert all(len(n.input) == 4 for n in nbits)  # integer zero points, MatMulNBits' fast path
    # both inputs have K = 64: one 0/1 block-sum table for the graph, not one per input
    assert sum("indicator" in i.name for i in model.graph.initializer) == 1
    x = (np.random.default_rng(3).standard_normal((1, 3, k)) + 0.5).astype(np.float32)
    got = _run(model, x)  # accuracy level 4: int8 activations per block, the block sums included
    for i in range(len(ns)):
        assert _error(got[i], x @ weights[i]) < 0.03
    assert _error(got[-1], (x @ weights[0]) @ weights[-1]) < 0.05


def test_shift_form_is_the_default_and_an_unknown_correction_is_refused():
    model, _ = _projections(64, [64])
    quantize_weights(model, 4, BLOCK, "asymmetric", "matmulnbits", keep=set())
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Add") == 2 and ops.count("MatMulNBits") == 2  # one shift + Add per projection
    assert "Concat" not in ops
    # one 0/1 block-sum table per shape (both inputs have K = 64), not one per input
    assert sum("indicator" in i.name for i in model.graph.initializer) == 1
    model, _ = _projections(64, [32])
    with pytest.raises(ExportError, match="correction 'bogus'"):
        quantize_weights(model, 4, BLOCK, "asymmetric", "matmulnbits", keep=set(), correction="bogus")
