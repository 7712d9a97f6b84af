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
    """Weights that already lie on a per-block 4-bit grid with a float minimum (GGUF Q4_1, as the
    demo's SmolLM2) survive the asymmetric scheme exactly. Integer zero points do only where the
    minimum is a whole number of steps below 0; elsewhere each block is off by one shared offset
    (within half a step), and symmetric, centred on 0, loses more."""
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.01, 0.1, size=(K // 32, 1, N)).astype(np.float32)
    low = rng.uniform(-1, 0, size=(K // 32, 1, N)).astype(np.float32) * 15 * scale
    codes = rng.integers(0, 16, size=(K // 32, 32, N)).astype(np.float32)
    codes[:, 0], codes[:, 1] = 0, 15  # every block spans its whole grid
    w = (codes * scale + low).reshape(K, N)
    assert np.abs(quantize_blocks(w, 4, 32, "asymmetric").dequantize() - w).max() < 1e-6
    err = (quantize_blocks(w, 4, 32, "zero-point").dequantize() - w).reshape(K // 32, 32, N)
    assert 1e-3 < np.abs(err).max() <= scale.max() / 2 + 1e-6
    assert np.abs(err - err[:, :1]).max() < 1e-6  # the same offset across each block
    on_grid = ((codes - np.rint(-low / scale)) * scale).reshape(K, N)
    assert np.abs(quantize_blocks(on_grid, 4, 32, "zero-point").dequantize() - on_grid).max() < 1e-6
    assert np.abs(quantize_blocks(w, 4, 32, "symmetric").dequantize() - w).max() > 1e-3


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric", "zero-point"])
def test_rounding_error_is_at_most_half_a_step(bits, scheme):
    w = np.random.default_rng(1).standard_normal((K + 16, N)).astype(np.float32)  # K not a block multiple
    w[:32, 0] += 4  # a block of positive weights only
    deq = quantize_blocks(w, bits, 32, scheme).dequantize()
    assert deq.shape == w.shape
    # each block's grid step worked out from its own weights (not from the scales under test):
    # symmetric codes run from -(2^(b-1)-1) to 2^(b-1)-1 steps around 0, asymmetric ones 2^b-1 steps
    # over the block's range, zero-point ones over that range widened to hold 0 (an integer zero
    # point puts 0 on the grid)
    for start in range(0, K + 16, 32):  # the last block holds the 16 rows past K (and its zero padding)
        block = w[start:start + 32]
        if scheme == "symmetric":
            step = np.abs(block).max(axis=0) / (2 ** (bits - 1) - 1)
        elif scheme == "asymmetric":
            step = (block.max(axis=0) - block.min(axis=0)) / (2 ** bits - 1)
        else:
            step = (np.maximum(block.max(axis=0), 0) - np.minimum(block.min(axis=0), 0)) / (2 ** bits - 1)
        assert np.all(np.abs(deq[start:start + 32] - block) <= step / 2 + 1e-6), start


@pytest.mark.parametrize("bits", [4, 8])
def test_zero_point_bytes_equal_onnxruntimes_own_quantizer(bits):
    """Codes, scales and zero points, packed as MatMulNBits reads them, byte for byte what
    onnxruntime's quantize_matmul_4bits/8bits writes: K padded to whole blocks, an odd number of
    blocks (the last zero-point byte of each row half used), an all-zero block."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    from vlm_export.precision.weight_only import _pack

    k, block = 80, 32  # 3 blocks, the last half padding
    w = np.random.default_rng(6).standard_normal((k, N)).astype(np.float32)
    w[:32, 1] = 0
    w[32:64, 2] = np.abs(w[32:64, 2])
    blocks = -(-k // block)
    packed = np.zeros((N, blocks, block * bits // 8), np.uint8)
    scales = np.zeros((N, blocks), np.float32)
    zero_points = np.zeros((N, -(-blocks * bits // 8)), np.uint8)
    padded = np.pad(w, ((0, blocks * block - k), (0, 0)))  # as onnxruntime's MatMulNBitsQuantizer pads
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(
        packed, padded, scales, zero_points, block, N, blocks * block, False)
    bq = quantize_blocks(w, bits, block, "zero-point")
    assert np.array_equal(_pack(bq.q, bits), packed)
    assert np.array_equal(_pack(bq.zero_points, bits, 2 ** (bits - 1)), zero_points)
    # ours stores 1 for an all-zero block's scale (its codes and zero point are 0), onnxruntime 0
    assert np.array_equal(np.where(scales == 0, 1, scales), bq.scales)
    assert (scales == 0).sum() == 1


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


@pytest.mark.parametrize("form,scheme", [("matmulnbits", "asymmetric"), ("matmulnbits", "zero-point"),
                                         ("matmulnbits", "symmetric"), ("dequantize", "symmetric")])
def test_forms_run_on_onnxruntime_like_the_dequantized_maths(tmp_path, form, scheme):
    model, w, emb = _graph(tmp_path / "g.onnx")
    ids = np.array([[3, 7, 11]], np.int64)
    done = quantize_weights(model, 4, 32, scheme, form, keep=set(), bits_of={"head": 8})
    assert done == {"layer": (4, 32), "head": (8, 32)}
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


@pytest.mark.parametrize("form,scheme", [("matmulnbits", "asymmetric"), ("dequantize", "symmetric")])
def test_gemms_are_quantized_like_matmuls_and_a_layout_left_float_is_counted(form, scheme):
    """OPT's MLP exports as Gemm (2-D hidden states): a Gemm x W^T + b and x W + b is quantized, its bias
    added after, and answers like the dequantized maths; a weight table read through GatherND (a
    mixture of experts' batched weights), which no form takes, is counted as missed, not passed over."""
    from vlm_export.precision.weight_only import targeted_weights, weights_missed

    rng = np.random.default_rng(4)
    w1, b1 = rng.standard_normal((N, K)).astype(np.float32) * 0.05, rng.standard_normal(N).astype(np.float32)
    w2, b2 = rng.standard_normal((N, K)).astype(np.float32) * 0.05, rng.standard_normal(K).astype(np.float32)
    # fc1 as OPT exports it (x W^T + b, W [out, in]), fc2 with W [in, out]
    table = rng.standard_normal((4, K, K)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2"),
             helper.make_node("GatherND", ["table", "expert"], ["w_e"], name="experts"),
             helper.make_node("MatMul", ["y", "w_e"], ["z"], name="expert_mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", K]),
                                           helper.make_tensor_value_info("expert", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["s", K]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, ["s", K])],
                              [numpy_helper.from_array(a, n) for a, n in
                               ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (table, "table"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    missed = weights_missed(model, targeted_weights(model, set()))
    assert (missed["tensors"], missed["largest"]) == (1, ["GatherND experts"]) and missed["share"] == pytest.approx(16 / 19, abs=1e-3)
    assert weights_missed(model, targeted_weights(model, set()), kept={"experts"})["tensors"] == 0
    done = quantize_weights(model, 4, 16, scheme, form, keep=set())  # fc2's K is 48
    assert set(done) == {"fc1", "fc2"} and "Gemm" not in [n.op_type for n in model.graph.node]
    x = rng.standard_normal((3, K)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["y"], {"x": x, "expert": np.array([1], np.int64)})[0]
    w1q = quantize_blocks(w1.T.copy(), 4, 16, scheme).dequantize()
    w2q = quantize_blocks(w2, 4, 16, scheme).dequantize()
    expected = np.maximum(x @ w1q + b1, 0) @ w2q + b2
    assert np.abs(got - expected).max() <= 0.03 * np.abs(expected).max()


@pytest.mark.parametrize("scheme", ["asymmetric", "zero-point", "symmetric"])
def test_constant_rows_stay_exact(scheme):
    """A tied LM head whose padding token's row is all zero (BART, OPT: padding_idx) and a constant row:
    their logits stay 0 and c x sum(x) under the int8 activations of accuracy level 4, as fp32 gives
    them (an all-zero block's scale of 1 once gave the zero row logits of 2-8 through the asymmetric
    correction's cancellation)."""
    rng = np.random.default_rng(3)
    head = rng.standard_normal((64, 6)).astype(np.float32) * 0.05  # [K, N]: column n is token n's row
    head[:, 1] = 0.0
    head[:, 4] = 0.03
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="head")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
                              [numpy_helper.from_array(head, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    quantize_weights(model, 8, 32, scheme, "matmulnbits", keep=set())
    x = rng.standard_normal((1, 64)).astype(np.float32) * 3
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert abs(got[0, 1]) < 1e-6
    assert abs(got[0, 4] - 0.03 * x.sum()) < 1e-3 * max(1.0, abs(0.03 * x.sum()))


@pytest.mark.parametrize("bits", [4, 8])
def test_matmulnbits_reads_our_zero_points_like_the_dequantized_maths(bits):
    """One MatMulNBits per weight with its zero points as the fourth input (no correction nodes),
    run with fp32 activations (accuracy level 0) so the only error left is the weights': a nibble
    or a rounding off anywhere moves outputs by whole steps. K = 80: three blocks of 32, the last
    half padding, so each row's zero points end in a half-used byte."""
    model = _chain(None, [80, 40, 24])
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer]
    quantize_weights(model, bits, 32, "zero-point", "matmulnbits", keep=set(), accuracy_level=0)
    assert [(n.op_type, len(n.input)) for n in model.graph.node] == [("MatMulNBits", 4)] * 2
    x = np.random.default_rng(7).standard_normal((1, 5, 80)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"h0": x})[0]
    expected = x
    for w in weights:
        expected = expected @ quantize_blocks(w, bits, 32, "zero-point").dequantize()
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_kept_nodes_stay_fp32_and_empty_graphs_are_refused(tmp_path):
    model, _, _ = _graph(tmp_path / "g.onnx")
    assert quantize_weights(model, 4, 32, "symmetric", "matmulnbits", keep={"head"}) == {"layer": (4, 32)}
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
    # modules the model keeps fp32 (T5's wo) that no node comes from (no name-scope metadata): refused, not dropped
    with pytest.raises(ExportError, match="keeps wo in fp32, but no node"):
        to_fp16(tmp_path / "fp32.onnx", tmp_path / "fp16-wo.onnx", ("wo",))
    assert not (tmp_path / "fp16-wo.onnx").exists()
    x = (rng.standard_normal((1, 5, K)) * 8000).astype(np.float32)  # fits fp16; its square does not
    ref = ort.InferenceSession(str(tmp_path / "fp32.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(tmp_path / "fp16.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.isfinite(got).all()
    assert np.abs(got - ref).max() <= 0.01 * np.abs(ref).max()


def test_fp16_scales_are_positive_and_the_codes_follow_them():
    """fp16 weights get fp16 scales (TensorRT's W4A16 form), every one > 0 (TensorRT refuses a
    zero scale; an all-zero block has one), and the codes are rounded against the stored scale."""
    w = np.random.default_rng(4).standard_normal((K, N)).astype(np.float16)
    w[:64, 0] = 0  # an all-zero block
    bq = quantize_blocks(w, 4, 64, "symmetric", np.float16)
    assert bq.scales.dtype == np.float16 and (bq.scales > 0).all()
    step = np.repeat(bq.scales.T.astype(np.float32), 64, axis=0)  # [K, N], the stored scales
    assert np.all(np.abs(bq.dequantize() - w.astype(np.float32)) <= step / 2 + 1e-6)
    assert not bq.dequantize()[:64, 0].any()


def _chain(path, ks):
    """x [1, s, ks[0]] -> MatMul -> ... -> y: one MatMul per step, K = ks[i]."""
    rng = np.random.default_rng(5)
    weights = [(rng.standard_normal((a, b)) * 0.05).astype(np.float32) for a, b in zip(ks, ks[1:])]
    nodes = [helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"], name=f"mm{i}") for i in range(len(weights))]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "s", ks[0]])],
                              [helper.make_tensor_value_info(f"h{len(weights)}", TensorProto.FLOAT, [1, "s", ks[-1]])],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_block_sizes_follow_k_in_the_tensorrt_form(tmp_path):
    """TensorRT's int4 blocks are 64 or 128: each MatMul gets 128 where K allows and 64 where K is
    a multiple of 64 only (SmolLM2's 576); a K that neither divides is refused, naming the node.
    ONNX Runtime's form pads K instead."""
    model = _chain(tmp_path, [192, 128, 96])
    assert quantize_weights(model, 4, (128, 64), "symmetric", "dequantize", keep=set()) == {"mm0": (4, 64),
                                                                                          "mm1": (4, 128)}
    assert sorted(a.i for n in model.graph.node for a in n.attribute if a.name == "block_size") == [64, 128]
    with pytest.raises(ExportError, match=r"1 weight\(s\) .* block size 128 or 64 \(mm1 K=96\), which block-wise "
                                          r"DequantizeLinear needs .*; keep them in fp32 with --keep-node"):
        quantize_weights(_chain(tmp_path, [128, 96, 64]), 4, (128, 64), "symmetric", "dequantize", keep=set())
    assert quantize_weights(_chain(tmp_path, [128, 96, 64]), 4, (128, 64), "symmetric", "matmulnbits",
                            keep=set()) == {"mm0": (4, 128), "mm1": (4, 128)}


def test_tensorrt_form_is_w4a16_and_runs_on_onnxruntime(tmp_path):
    """The dequantize form is W4A16: the graph converted to fp16 (inputs/outputs fp32), then int4
    weights in blocks of 128 along K with fp16 scales, so each DequantizeLinear gives fp16 straight
    to an fp16 MatMul; it runs on ONNX Runtime CPU as written (no graph optimisation: the graph
    TensorRT reads) and fused (ONNX Runtime turns it into MatMulNBits), like the dequantized maths."""
    from vlm_export.precision.convert import PrecisionOptions, to_weight_only

    _, w, emb = _graph(tmp_path / "g.onnx")
    info = to_weight_only(tmp_path / "g.onnx", tmp_path / "w4.onnx", 4, PrecisionOptions(weight_form="dequantize"))
    d = info.details
    assert (d["form"], d["activations"], d["scales"], d["lm_head"], d["block_size"], d["block_sizes"]) == (
        "dequantize", "fp16", "fp16", "w4", 128, {"128": 2})
    model = onnx.load(str(tmp_path / "w4.onnx"))
    inferred = onnx.shape_inference.infer_shapes(model)
    dtype = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input,
                                                            *inferred.graph.output]}
    dtype.update({i.name: i.data_type for i in model.graph.initializer})
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2
    for node in dq:
        attrs = {a.name: a.i for a in node.attribute}
        assert (attrs["axis"], attrs["block_size"]) == (0, 128)
        assert (dtype[node.input[0]], dtype[node.input[1]], dtype[node.output[0]]) == (
            TensorProto.INT4, TensorProto.FLOAT16, TensorProto.FLOAT16)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert {n.input[1] for n in matmuls} == {n.output[0] for n in dq}
    assert all(dtype[name] == TensorProto.FLOAT16 for n in matmuls for name in [*n.input, *n.output])
    assert (dtype["ids"], dtype["logits"]) == (TensorProto.INT64, TensorProto.FLOAT)

    ids = np.array([[3, 7, 11]], np.int64)
    x = emb.astype(np.float16)[ids[0]].astype(np.float32)  # the table is fp16 now
    wq = quantize_blocks(w.astype(np.float16), 4, 128, "symmetric", np.float16).dequantize()
    hq = quantize_blocks(emb.T.astype(np.float16), 4, 128, "symmetric", np.float16).dequantize()
    expected = (x @ wq) @ hq
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        got = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            None, {"ids": ids})[0][0]
        assert got.dtype == np.float32
        # fp16 rounding of the intermediate; fused, MatMulNBits also rounds activations to int8 per block
        assert np.abs(got - expected).max() <= 0.02 * np.abs(expected).max(), level
        # two int4 layers in blocks of 128 of Gaussian weights (head included) lose a little more
        assert np.corrcoef(got.ravel(), ((x @ w) @ emb.T).ravel())[0, 1] > 0.98


def test_fp32_activations_set_every_matmulnbits_to_accuracy_level_0(tmp_path):
    """--weight-activations fp32: every MatMulNBits computes with fp32 activations (accuracy level 0,
    recorded), which gives the dequantized maths without the int8 rounding of the default; the
    dequantize form refuses it (its activations are fp16)."""
    from vlm_export.precision.convert import PrecisionOptions, to_weight_only

    _, w, emb = _graph(tmp_path / "g.onnx")
    ids = np.array([[3, 7, 11]], np.int64)
    got = {}
    for acts in ("int8", "fp32"):
        info = to_weight_only(tmp_path / "g.onnx", tmp_path / f"{acts}.onnx", 8, PrecisionOptions(weight_activations=acts))
        model = onnx.load(str(tmp_path / f"{acts}.onnx"))
        levels = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                  if a.name == "accuracy_level"}
        assert levels == {info.details["accuracy_level"]} == {4 if acts == "int8" else 0}
        got[acts] = _run(model, ids)[0]
    x = emb[ids[0]]
    expected = (x @ quantize_blocks(w, 8, 32, "asymmetric").dequantize()) @ quantize_blocks(emb.T, 8, 32, "asymmetric").dequantize()
    assert np.abs(got["fp32"] - expected).max() <= 1e-5 * np.abs(expected).max()
    assert np.abs(got["int8"] - expected).max() > np.abs(got["fp32"] - expected).max()
    with pytest.raises(ExportError, match="--weight-activations applies to the matmulnbits form"):
        PrecisionOptions(weight_form="dequantize", weight_activations="fp32")


def _matmuls_of(ks: list[int], n: int = 16) -> onnx.ModelProto:
    """x -> MatMul(W0) -> ... : one MatMul per K, each output as wide as the next K."""
    rng = np.random.default_rng(3)
    widths = ks[1:] + [n]
    nodes, inits, x = [], [], "x"
    for i, (k, out) in enumerate(zip(ks, widths)):
        inits.append(numpy_helper.from_array(rng.standard_normal((k, out)).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, ks[0]])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_the_asymmetric_scheme_names_one_block_size_for_every_k():
    """Its correction adds whole blocks back, so a K the block does not divide is refused before any
    MatMul is rewritten, with one size that divides every K (following the advice then works), or
    integer zero points where no size does; the zero-point scheme pads K as MatMulNBits does."""
    with pytest.raises(ExportError, match=r"2 weight\(s\) .* block size 32 \(mm0 K=80, mm1 K=144\).* use "
                                          r"--block-size 16 \(it divides every K: 64, 80, 144\)"):
        quantize_weights(_matmuls_of([80, 144, 64]), 4, 32, "asymmetric", "matmulnbits", keep=set())
    assert set(quantize_weights(_matmuls_of([80, 144, 64]), 4, 16, "asymmetric", "matmulnbits", keep=set()).values()) \
        == {(4, 16)}
    with pytest.raises(ExportError, match=r"no block size of 16-128 divides every K \(144, 200\): use "
                                          r"--weight-scheme zero-point"):
        quantize_weights(_matmuls_of([144, 200]), 4, 16, "asymmetric", "matmulnbits", keep=set())
    assert len(quantize_weights(_matmuls_of([144, 200]), 4, 32, "zero-point", "matmulnbits", keep=set())) == 2


def test_whole_block_size_prefers_the_size_asked():
    from vlm_export.precision.weight_only import whole_block_size

    assert whole_block_size([576, 1536], 32) == 32
    assert whole_block_size([576, 1536], 128) == 64  # 576 = 9 x 64
    assert whole_block_size([80], 32) == 16
    assert whole_block_size([48], 128) == 16
    assert whole_block_size([200], 32) is None


def test_fp16_gives_a_kept_node_reading_one_constant_twice_one_copy(tmp_path):
    """A node kept fp32 gets its own copy of each constant it reads; one that reads a constant twice (a Slice
    whose starts and ends are one tensor: Gemma 3's mask code exports one) gets one copy, not two initializers
    of one name, which the ONNX checker refuses."""
    from vlm_export.precision.convert import fp16_model

    nodes = [helper.make_node("Add", ["c", "c"], ["cc"], name="double"),
             helper.make_node("Mul", ["x", "cc"], ["y"], name="scale")]
    graph = helper.make_graph(nodes, "twice", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(np.array(1.5, np.float32), "c")])
    model = onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    converted, _ = fp16_model(model, keep={"double"})
    onnx.checker.check_model(converted)
    assert [i.name for i in converted.graph.initializer].count("c__fp32_double") == 1
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    got = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, 3 * x)


def _lookup_graph(width: int, tied: bool = False) -> onnx.ModelProto:
    """input_ids (image placeholders swapped for 0, as our decoders do) -> a token table's rows, plus a rotary-like
    table's rows by position_ids; with ``tied``, a head reading the token table too."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Where", ["is_image", "zero", "input_ids"], ["ids"]),
             helper.make_node("Gather", ["table", "ids"], ["rows"]),
             helper.make_node("Gather", ["rotary", "position_ids"], ["turn"]),
             helper.make_node("Add", ["rows", "turn"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    if tied:
        nodes += [helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
                  helper.make_node("MatMul", ["y", "table_t"], ["logits"])]
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "lookups",
        [helper.make_tensor_value_info(n, t, [1, 5]) for n, t in (("input_ids", TensorProto.INT64),
                                                                  ("position_ids", TensorProto.INT64),
                                                                  ("is_image", TensorProto.BOOL))],
        outputs,
        [numpy_helper.from_array(rng.standard_normal((VOCAB, width)).astype(np.float32), "table"),
         numpy_helper.from_array(rng.standard_normal((16, width)).astype(np.float32), "rotary"),
         numpy_helper.from_array(np.array(0, np.int64), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("bits, width, block", [(8, 64, 32), (4, 64, 32), (4, 48, 32)])
def test_token_lookups_become_gather_block_quantized_rows_of_the_dequantized_table(bits, width, block):
    """A table gathered by the token ids becomes ONNX Runtime's GatherBlockQuantized, whose rows are exactly our
    dequantized codes' (zero-point blocks along the row; 48 wide: blocks of 16, three of them, the 4-bit zero points
    packed with one to spare); a table gathered by positions (a rotary cache) is left as it is."""
    from vlm_export.precision.weight_only import quantize_lookups

    model = _lookup_graph(width)
    table = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "table"))
    done = quantize_lookups(model, bits, block)
    size = block if width % block == 0 else 16
    assert done == {"table": {"bits": bits, "block_size": size, "rows": VOCAB, "width": width}}
    assert [n.op_type for n in model.graph.node] == ["Where", "GatherBlockQuantized", "Gather", "Add"]
    assert "table" not in {i.name for i in model.graph.initializer}
    feeds = {"input_ids": np.array([[1, 7, 95, 3, 0]]), "position_ids": np.arange(5)[None],
             "is_image": np.array([[False, True, False, False, False]])}
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    rotary = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "rotary"))
    dequantized = quantize_blocks(table.T, bits, size, "zero-point").dequantize().T
    ids = np.where(feeds["is_image"], 0, feeds["input_ids"])
    np.testing.assert_allclose(out, dequantized[ids] + rotary[feeds["position_ids"]], atol=1e-6, rtol=0)
    step = (table.max() - table.min()) / (2 ** bits - 1)
    assert 0 < np.abs(dequantized - table).max() <= step


def test_a_lookup_table_read_by_another_node_is_kept_and_said_why():
    """A table the head reads too (a tied head not yet given its own copy) stays float: quantizing it would change
    the head; what was kept is said."""
    from vlm_export.precision.weight_only import quantize_lookups

    model = _lookup_graph(64, tied=True)
    assert quantize_lookups(model, 8, 32) == {"table": {"kept": "read by other nodes too"}}
    assert "GatherBlockQuantized" not in {n.op_type for n in model.graph.node}
