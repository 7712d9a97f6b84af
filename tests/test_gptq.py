"""GPTQ rounding (precision.gptq): same block layout and scales as round to nearest, codes that
leave a smaller error in the layer's output on correlated inputs."""
from __future__ import annotations

import numpy as np
import pytest

from vlm_export.errors import ExportError
from vlm_export.precision.convert import PrecisionOptions
from vlm_export.precision.gptq import Rounding, gptq_blocks, input_hessians
from vlm_export.precision.weight_only import quantize_blocks


def _inputs(k: int, tokens: int, seed: int) -> np.ndarray:
    """Activations like a decoder's: correlated channels, a few large ones, a non-zero mean (one
    distribution per ``k``; ``seed`` draws the tokens)."""
    shape = np.random.default_rng(k)
    mix = shape.standard_normal((k, k)) / np.sqrt(k) + np.eye(k)
    loud = shape.choice(k, 3, replace=False)
    x = np.random.default_rng(seed).standard_normal((tokens, k)) @ mix + 0.5
    x[:, loud] *= 8
    return x.astype(np.float32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric", "zero-point"])
def test_gptq_codes_beat_round_to_nearest_on_the_output(bits, scheme):
    """On inputs held out from the ones H was measured on, ``x @ W`` is closer to the original with
    GPTQ's codes than with round to nearest's, for every scheme; the scales, zero points and float
    minima are round to nearest's (static groups), the codes within the scheme's range."""
    k, n = 72, 40  # K not a multiple of the block: the padded rows are quantized too
    w = np.random.default_rng(3).standard_normal((k, n)).astype(np.float32)
    calibration, held_out = _inputs(k, 400, 4), _inputs(k, 200, 5)
    hessian = calibration.T.astype(np.float64) @ calibration / len(calibration)
    rtn = quantize_blocks(w, bits, 32, scheme)
    ours = gptq_blocks(w, hessian, bits, 32, scheme)
    np.testing.assert_array_equal(ours.scales, rtn.scales)
    for a, b in ((ours.zero_points, rtn.zero_points), (ours.offsets, rtn.offsets)):
        assert (a is None and b is None) or np.array_equal(a, b)
    assert ours.q.shape == rtn.q.shape and ours.q.dtype == np.uint8
    assert ours.q.min() >= (1 if scheme == "symmetric" else 0) and ours.q.max() <= 2 ** bits - 1
    assert not np.array_equal(ours.q, rtn.q)

    def error(bq):
        return np.mean((held_out @ (bq.dequantize() - w)) ** 2)

    assert error(ours) < 0.8 * error(rtn), (error(ours), error(rtn))


def test_dead_inputs_and_mismatched_shapes():
    """An input channel that never fires gets its row zeroed, not a division by zero; a Hessian of the
    wrong size is refused with what was expected."""
    k, n = 64, 16
    w = np.random.default_rng(6).standard_normal((k, n)).astype(np.float32)
    x = _inputs(k, 300, 7)
    x[:, 5] = 0
    bq = gptq_blocks(w, x.T.astype(np.float64) @ x / len(x), 4, 32, "zero-point")
    assert np.isfinite(bq.dequantize()).all()
    with pytest.raises(ExportError, match=r"second moments are \(32, 32\), the weight has K=64"):
        gptq_blocks(w, np.eye(32), 4, 32, "zero-point")


def _two_layer_model():
    """x [T, 64] -> MatMul [64, 48] -> Relu -> MatMul [48, 40]: two weights, two different inputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(11)
    w1, w2 = rng.standard_normal((64, 48)).astype(np.float32), rng.standard_normal((48, 40)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="first"), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="second")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 40])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, w1, w2


def test_second_moments_are_measured_a_group_at_a_time_within_the_budget():
    """The Hessians are E[x xᵀ] of each MatMul's own input (the graph input, the Relu's output),
    over every token of every feed. A budget too small for both measures them in two passes, one
    per MatMul, and picks the very same codes as one pass; a MatMul not measured is rounded to
    nearest; no feeds is refused."""
    from vlm_export.precision.probe import ActivationProbe
    from vlm_export.precision.weight_only import weight_inputs

    model, w1, w2 = _two_layer_model()
    feeds = [{"x": _inputs(64, 10, s)} for s in (9, 10)]
    inputs = weight_inputs(model, set())
    assert inputs == {"first": ("x", 64), "second": ("r", 48)}
    before = model.SerializeToString()
    with ActivationProbe(model, ["x", "r"]) as probe:
        assert model.SerializeToString() == before  # its outputs were added for writing the probe's graph only
        hessians, tokens = input_hessians(probe, ["x", "r"], feeds)
        x = np.concatenate([f["x"] for f in feeds]).astype(np.float64)
        r = np.maximum(x @ w1, 0)
        assert tokens == 20
        np.testing.assert_allclose(hessians["x"], x.T @ x / 20, rtol=1e-5)
        np.testing.assert_allclose(hessians["r"], r.T @ r / 20, rtol=1e-4)
        codes = {}
        for budget in (8 * 64 ** 2, 1 << 30):
            blocks = Rounding(probe, inputs, feeds, budget=budget)
            codes[budget] = [blocks(m, w, 4, 32, "zero-point").q for m, w in (("first", w1), ("second", w2))]
            assert blocks.passes == (2 if budget < 1 << 20 else 1) and blocks.gptq == ["first", "second"]
            assert blocks.tokens == 20
            unmeasured = blocks("other", w1, 4, 32, "symmetric")
            np.testing.assert_array_equal(unmeasured.q, quantize_blocks(w1, 4, 32, "symmetric").q)
        for a, b in zip(*codes.values()):
            np.testing.assert_array_equal(a, b)
        with pytest.raises(ExportError, match="GPTQ needs calibration inputs"):
            input_hessians(probe, ["x"], [])
    with pytest.raises(ExportError, match="weight rounding 'awq' is not one of rtn, gptq"):
        PrecisionOptions(weight_rounding="awq")


def test_gptq_without_a_stage_it_rounds_is_refused():
    """It rounds w8/w4 weights and an int8 decoder's; an int8 image stage (static ONNX Runtime
    quantization) is not one. Unset, each precision has its default."""
    from vlm_export.build import BuildOptions
    from vlm_export.errors import BuildError
    from vlm_export.precision.spec import parse_precision

    with pytest.raises(BuildError, match="--weight-rounding picks the codes of w8/w4 weights and of an int8 "
                                         "decoder's, and --precision vision_encoder=int8 makes no such stage"):
        BuildOptions(precision=parse_precision("vision=int8"), precision_options=PrecisionOptions(weight_rounding="gptq"))
    for precision in ("decoder=w4", "decoder=int8"):
        BuildOptions(precision=parse_precision(precision), precision_options=PrecisionOptions(weight_rounding="rtn"))
    assert [PrecisionOptions().rounding(p) for p in ("int8", "w8", "w4")] == ["gptq", "rtn", "rtn"]
    assert PrecisionOptions(weight_rounding="rtn").rounding("int8") == "rtn"


def test_int8_decoder_weights_by_gptq():
    """Per output channel symmetric int8 (the scheme of smoothquant.per_token_int8): the scales are
    round to nearest's, the codes within +-127, and on held-out inputs the second MatMul's output is
    closer to fp32 than with round to nearest's codes."""
    from vlm_export.precision.gptq import per_channel_int8
    from vlm_export.precision.smoothquant import int8_weights

    model, w1, w2 = _two_layer_model()
    feeds = [{"x": _inputs(64, 40, s)} for s in (9, 10)]
    nodes = [n for n in model.graph.node if n.op_type == "MatMul"]
    chosen, rounding = per_channel_int8(model, nodes, feeds)
    assert sorted(chosen) == ["first", "second"] and rounding.gptq == ["first", "second"] and rounding.tokens == 80
    # the counts stay for the manifest; the second moments (up to the budget, GBs on a 7B) and the probe's
    # session do not outlive the rounding (the sensitivity search runs after it)
    assert rounding.hessians == {} and rounding.probe is None and rounding.passes == 1
    held_out = np.maximum(_inputs(64, 200, 12) @ w1, 0)
    codes, scales = chosen["second"]
    rtn_codes, rtn_scales = int8_weights(w2)
    assert codes.dtype == np.int8 and codes.shape == w2.shape and np.abs(codes.astype(int)).max() <= 127
    np.testing.assert_array_equal(scales, rtn_scales)
    assert not np.array_equal(codes, rtn_codes)

    def error(q):
        return np.mean((held_out @ (q.astype(np.float32) * scales - w2)) ** 2)

    assert error(codes) < 0.8 * error(rtn_codes), (error(codes), error(rtn_codes))
