"""Block-wise weight-only quantization: the codes, both graph forms, run on ONNX Runtime CPU
against numpy maths on the dequantized weights."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlm_export.errors import ExportError
from vlm_export.precision.weight_only import quantize_blocks, quantize_weights

K, N, VOCAB = 128, 48, 96


def test_asymmetric_blocks_reproduce_a_q4_1_grid_exactly():
    """Weights that already lie on a per-block 4-bit grid with a float minimum (GGUF Q4_1) survive."""
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.01, 0.1, size=(K // 32, 1, N)).astype(np.float32)
    low = rng.uniform(-1, 0, size=(K // 32, 1, N)).astype(np.float32)
    codes = rng.integers(0, 16, size=(K // 32, 32, N)).astype(np.float32)
    codes[:, 0], codes[:, 1] = 0, 15  # every block spans its whole grid
    w = (codes * scale + low).reshape(K, N)
    assert np.abs(quantize_blocks(w, 4, 32, "asymmetric").dequantize() - w).max() < 1e-6
    sym = quantize_blocks(w, 4, 32, "symmetric")
    assert np.abs(sym.dequantize() - w).max() > 1e-3  # symmetric cannot: its grid is centred on 0


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_rounding_error_is_at_most_half_a_step(bits, scheme):
    w = np.random.default_rng(1).standard_normal((K + 16, N)).astype(np.float32)  # K not a block multiple
    deq = quantize_blocks(w, bits, 32, scheme).dequantize()
    assert deq.shape == w.shape
    # each block's grid step worked out from its own weights (not from the scales under test):
    # symmetric codes run from -(2^(b-1)-1) to 2^(b-1)-1 steps around 0, asymmetric ones 2^b-1 steps
    # from the block's minimum to its maximum
    for start in range(0, K + 16, 32):  # the last block holds the 16 rows past K
        block = w[start:start + 32]
        if scheme == "symmetric":
            step = np.abs(block).max(axis=0) / (2 ** (bits - 1) - 1)
        else:
            step = (block.max(axis=0) - block.min(axis=0)) / (2 ** bits - 1)
        assert np.all(np.abs(deq[start:start + 32] - block) <= step / 2 + 1e-6), start


def _graph(path):
    """x -> MatMul(W) -> MatMul(Transpose(E)): a layer and a tied LM head (E also feeds a Gather)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((K, K)).astype(np.float32) * 0.05
    emb = rng.standard_normal((VOCAB, K)).astype(np.float32) * 0.05
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["x"], name="embed"),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="layer"),
        helper.make_node("Transpose", ["emb"], ["emb_t"], perm=[1, 0], name="tie"),
        helper.make_node("MatMul", ["h", "emb_t"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", VOCAB])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(emb, "emb")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, path)
    return model, w, emb


def _run(model, ids):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


@pytest.mark.parametrize("form,scheme", [("matmulnbits", "asymmetric"), ("matmulnbits", "symmetric"),
                                         ("dequantize", "symmetric")])
def test_forms_run_on_onnxruntime_like_the_dequantized_maths(tmp_path, form, scheme):
    model, w, emb = _graph(tmp_path / "g.onnx")
    ids = np.array([[3, 7, 11]], np.int64)
    done = quantize_weights(model, 4, 32, scheme, form, keep=set(), bits_of={"head": 8})
    assert done == {"layer": 4, "head": 8}
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits" if form == "matmulnbits" else "DequantizeLinear") == 2
    assert "emb" in {i.name for i in model.graph.initializer}  # the lookup keeps the fp32 table
    x = emb[ids[0]]
    wq = quantize_blocks(w, 4, 32, scheme).dequantize()
    hq = quantize_blocks(emb.T, 8, 32, scheme).dequantize()
    expected = (x @ wq) @ hq
    got = _run(model, ids)[0]
    # MatMulNBits at accuracy level 4 also rounds activations to int8 per block
    assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max()
    exact = (x @ w) @ emb.T
    assert np.corrcoef(got.ravel(), exact.ravel())[0, 1] > 0.99


def test_kept_nodes_stay_fp32_and_empty_graphs_are_refused(tmp_path):
    model, _, _ = _graph(tmp_path / "g.onnx")
    assert quantize_weights(model, 4, 32, "symmetric", "matmulnbits", keep={"head"}) == {"layer": 4}
    assert "head" in [n.name for n in model.graph.node if n.op_type == "MatMul"]
    with pytest.raises(ExportError, match="no MatMul with constant weights"):
        quantize_weights(model, 4, 32, "symmetric", "matmulnbits", keep={"head"})


def test_fp16_keeps_rms_statistics_in_fp32(tmp_path):
    """An RMSNorm over a large residual stream (SmolLM2 reaches 25,000): x^2 overflows fp16,
    so the chain from the square to the root must stay fp32 as a whole, with no fp16 round trip
    between its ops (the converter alone casts back to fp16 between two fp32 islands)."""
    from vlm_export.precision.convert import statistics_chains, to_fp16

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], name="mean"),
        helper.make_node("Add", ["mean", "eps"], ["var"], name="add_eps"),
        helper.make_node("Sqrt", ["var"], ["rms"], name="sqrt"),
        helper.make_node("Div", ["x", "rms"], ["normed"], name="div"),
        helper.make_node("Add", ["normed", "eps"], ["shifted"], name="other_add"),  # shares eps, converted
        helper.make_node("MatMul", ["shifted", "w"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", N])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two"), numpy_helper.from_array(np.array([-1]), "axes"),
         numpy_helper.from_array(np.array(1e-5, np.float32), "eps"), numpy_helper.from_array(w, "w")])
    # torch.onnx records every intermediate's type (value_info), which the converter relies on
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    assert statistics_chains(model) == ["pow", "mean", "add_eps", "sqrt"]
    onnx.save(model, tmp_path / "fp32.onnx")
    info = to_fp16(tmp_path / "fp32.onnx", tmp_path / "fp16.onnx")
    assert info.details["fp32_statistics_nodes"] == 4
    x = (rng.standard_normal((1, 5, K)) * 8000).astype(np.float32)  # fits fp16; its square does not
    ref = ort.InferenceSession(str(tmp_path / "fp32.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "fp16.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 0.01 * np.abs(ref).max()
