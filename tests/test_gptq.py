"""GPTQ rounding (precision.gptq): same block layout and scales as round to nearest, codes that
leave a smaller error in the layer's output on correlated inputs."""
from __future__ import annotations

import numpy as np
import pytest

from vlm_export.errors import ExportError
from vlm_export.precision.convert import PrecisionOptions
from vlm_export.precision.gptq import gptq_blocks, input_hessians, rounding
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


def test_rounding_falls_back_to_nearest_where_nothing_was_measured():
    w = np.random.default_rng(8).standard_normal((64, 8)).astype(np.float32)
    blocks = rounding({"measured": np.eye(64)})
    unmeasured = blocks("other", w, 4, 32, "symmetric")
    np.testing.assert_array_equal(unmeasured.q, quantize_blocks(w, 4, 32, "symmetric").q)
    blocks("measured", w, 4, 32, "symmetric")
    assert blocks.gptq == ["measured"]


def test_hessians_of_a_graph_input_and_options():
    """input_hessians measures E[x xᵀ] of a tensor the graph computes, over every token of every feed;
    no feeds and unknown roundings are refused."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["h"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, [None, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    feeds = [{"x": _inputs(4, 10, s)} for s in (9, 10)]
    hessians, tokens = input_hessians(model, ["h"], feeds)
    h = np.concatenate([np.maximum(f["x"], 0) for f in feeds])
    assert tokens == 20
    np.testing.assert_allclose(hessians["h"], h.T.astype(np.float64) @ h / 20, rtol=1e-6)
    with pytest.raises(ExportError, match="GPTQ needs calibration inputs"):
        input_hessians(model, ["h"], [])
    with pytest.raises(ExportError, match="weight rounding 'awq' is not one of rtn, gptq"):
        PrecisionOptions(weight_rounding="awq")


def test_gptq_without_a_weight_only_stage_is_refused():
    from vlm_export.build import BuildOptions
    from vlm_export.errors import BuildError
    from vlm_export.precision.spec import parse_precision

    with pytest.raises(BuildError, match="--weight-rounding gptq picks the codes of w8/w4 weights, and no stage is"):
        BuildOptions(precision=parse_precision("decoder=int8"), precision_options=PrecisionOptions(weight_rounding="gptq"))
    BuildOptions(precision=parse_precision("decoder=w4"), precision_options=PrecisionOptions(weight_rounding="gptq"))
