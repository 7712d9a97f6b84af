"""The ONNX Runtime form of the decoder (export/fuse.py): fewer nodes, the fused contrib ops, and
the same logits and KV as the exported graph on ONNX Runtime."""
from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlm_export.errors import ExportError
from vlm_export.export.fuse import fuse_decoder


def _decoder_graph(build):
    stage = next(s["name"] for s in build.manifest["stages"] if s["kind"] == "decoder")
    return build.path / build.manifest["graphs"][stage]["file"]


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(session, rng, batch: int, past: int, new: int, pad_first: int = 0):
    """Real-shaped decoder feeds: token ids (no image), positions continuing the past, the first
    row left-padded by ``pad_first`` positions (its mask 0 there, as the runtime pads)."""
    feeds = {}
    for i in session.get_inputs():
        dims = [d if isinstance(d, int) else None for d in i.shape]
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(100, 1000, (batch, new))
        elif i.name == "attention_mask":
            mask = np.ones((batch, past + new), np.int64)
            mask[0, :pad_first] = 0
            feeds[i.name] = mask
        elif i.name == "position_ids":
            feeds[i.name] = np.tile(np.arange(past, past + new), (batch, 1))
        elif i.name.startswith("past_key_values"):
            feeds[i.name] = (rng.standard_normal((batch, dims[1], past, dims[3])) * 0.5).astype(np.float32)
        elif dims[0] is None and "float" in i.type:  # image features: none in a text-only step
            feeds[i.name] = np.zeros((0, *dims[1:]), np.float32)
        else:
            raise AssertionError(f"unexpected decoder input {i.name} {i.shape}")
    return feeds


@pytest.mark.parametrize("name", ["llava-llama", "llava-mistral"])
def test_fused_decoder_matches_the_exported_one(tiny_build, tmp_path, name):
    src = _decoder_graph(tiny_build(name))
    dst = tmp_path / "lm_decoder.fused.onnx"
    report = fuse_decoder(src, dst, max_positions=256)

    base = onnx.load(src, load_external_data=False)
    layers = sum(i.name.startswith("past_key_values") for i in base.graph.input) // 2
    # per layer: two norms after residual Adds, rotary on q and k, q/k/v and gate/up packed
    assert report.fusions == {"skip_rms_norm": 2 * layers, "rotary": 2 * layers, "packed_matmul": 2 * layers}
    assert report.fused and not report.reason
    fused = onnx.load(dst)
    ops = collections.Counter(n.op_type for n in fused.graph.node)
    assert report.nodes_after == len(fused.graph.node) < report.nodes_before
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers and ops["RotaryEmbedding"] == 2 * layers
    assert ops["Neg"] == 0 and ops["Sin"] == 0  # rotate-half and the angle sub-graph are gone
    onnx.checker.check_model(fused)  # every new op is com.microsoft's, which the checker accepts
    # same I/O contract: the runtime feeds it exactly as the exported graph
    assert [i.name for i in fused.graph.input] == [i.name for i in base.graph.input]
    assert [o.name for o in fused.graph.output] == [o.name for o in base.graph.output]

    a, b = _session(src), _session(dst)
    rng = np.random.default_rng(0)
    for batch, past, new, pad in ((2, 0, 9, 3), (2, 12, 1, 5), (1, 30, 4, 0)):
        feeds = _feeds(a, rng, batch, past, new, pad)
        want, got = a.run(None, feeds), b.run(None, feeds)
        for out, x, y in zip(a.get_outputs(), want, got):
            assert x.shape == y.shape, out.name
            np.testing.assert_allclose(y, x, atol=1e-4, rtol=0, err_msg=f"{out.name} past={past} new={new}")

    # greedy decoding: identical tokens, step after step on the KV each graph returns
    def greedy(session, steps=12):
        feeds = _feeds(session, np.random.default_rng(1), 1, 0, 6)
        tokens = []
        for _ in range(steps):
            out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            tokens.append(int(out["logits"][0, -1].argmax()))
            total = feeds["attention_mask"].shape[1]
            feeds.update(input_ids=np.array([[tokens[-1]]]), position_ids=np.array([[total]]),
                         attention_mask=np.ones((1, total + 1), np.int64))
            feeds.update({k.replace("present", "past_key_values"): v
                          for k, v in out.items() if k.startswith("present")})
        return tokens

    assert greedy(b) == greedy(a)


def test_weight_only_quantizes_the_fused_decoder(tiny_build, tmp_path):
    """w4 after fusing: the packed projections become single MatMulNBits, and the graph runs with
    the unfused w4's answers (up to MatMulNBits' int8 activation rounding, which flips on fp32 noise)."""
    from vlm_export.precision.convert import PrecisionOptions, to_weight_only

    src = _decoder_graph(tiny_build("llava-llama"))
    fused = tmp_path / "fused.onnx"
    report = fuse_decoder(src, fused, max_positions=256)
    plain = to_weight_only(src, tmp_path / "w4.onnx", 4, PrecisionOptions())
    packed = to_weight_only(fused, tmp_path / "fused_w4.onnx", 4, PrecisionOptions())
    # each packing merged 2 or 3 MatMuls into one: q/k/v (3) and gate/up (2) per layer
    layers = report.fusions["packed_matmul"] // 2
    assert packed.details["quantized_matmuls"] == plain.details["quantized_matmuls"] - 3 * layers
    a, b = _session(tmp_path / "w4.onnx"), _session(tmp_path / "fused_w4.onnx")
    feeds = _feeds(a, np.random.default_rng(0), 1, 0, 8)
    x, y = a.run(None, feeds)[0][0, -1], b.run(None, feeds)[0][0, -1]
    assert np.corrcoef(x, y)[0, 1] > 0.999


def test_rotary_cache_bounds_positions(tiny_build, tmp_path):
    """The rotary caches hold max_positions rows: a position past them is refused by ONNX Runtime,
    never read out of bounds."""
    dst = tmp_path / "small.onnx"
    fuse_decoder(_decoder_graph(tiny_build("llava-llama")), dst, max_positions=16)
    session = _session(dst)
    feeds = _feeds(session, np.random.default_rng(0), 1, 15, 1)
    session.run(None, feeds)  # position 15: the last row
    feeds = _feeds(session, np.random.default_rng(0), 1, 16, 1)
    with pytest.raises(Exception, match="out of range"):
        session.run(None, feeds)


def test_graph_without_patterns_is_left_unfused(tmp_path):
    """A graph none of the patterns match (one MatMul, a LayerNorm-free MLP) is written unchanged,
    with the reason."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])], [w1, w2])
    src = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), src)

    report = fuse_decoder(src, tmp_path / "out.onnx")
    assert not report.fused and report.reason
    assert report.nodes_before == report.nodes_after == 3
    out = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Relu", "MatMul"]
    assert "com.microsoft" not in {o.domain for o in out.opset_import}
    x = rng.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_array_equal(_session(tmp_path / "out.onnx").run(None, {"x": x})[0],
                                  _session(src).run(None, {"x": x})[0])


def test_bad_input_is_one_error(tmp_path):
    with pytest.raises(ExportError, match="no decoder graph"):
        fuse_decoder(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(ExportError, match="cannot read"):
        fuse_decoder(tmp_path / "junk.onnx", tmp_path / "out.onnx")
