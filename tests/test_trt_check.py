"""The TensorRT compatibility check, run without TensorRT: it passes the graphs and configs the
tensorrt target takes, and names the node and the rule on graphs built to break each documented
constraint (and stays quiet on their compliant twins, so an over-eager rule fails too)."""
from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlm_export.engines.check import (DEFAULT_TENSORRT, SPECS, CompatibilityReport, Violation, check_build,
                                      check_configs, check_graph)
from vlm_export.contract.profiles import stage_profiles
from vlm_export.errors import BuildError
from vlm_export.manifest import read_manifest
from vlm_export.model_repository.render import RepositoryOptions, model_configs

F32, I8, I4 = TensorProto.FLOAT, TensorProto.INT8, TensorProto.INT4


def graph(nodes, inputs, outputs, initializers=(), opset=21, extra_opsets=()):
    """A model from helper pieces: ``inputs``/``outputs`` as (name, type, shape)."""
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(*i) for i in inputs],
                          [helper.make_tensor_value_info(*o) for o in outputs], list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])


def found(model, version=DEFAULT_TENSORRT, profiles=None) -> set[tuple[str, str]]:
    return {(v.node, v.rule) for v in check_graph(model, "g", version, profiles)}


def weight_only(w_type, k=128, n=8, block=64, axis=0, scale_shape=None, name="dq"):
    """x [2, K] @ DequantizeLinear(W [K, N] of ``w_type``, block-wise scales along ``axis``)."""
    w = helper.make_tensor("w", w_type, [k, n], np.zeros(k * n, np.int64).tolist())
    shape = scale_shape or ([k // block, n] if axis == 0 else [k, n // block])
    s = numpy_helper.from_array(np.full(shape, 0.01, np.float32), "s")
    nodes = [helper.make_node("DequantizeLinear", ["w", "s"], ["wf"], name=name, axis=axis, block_size=block),
             helper.make_node("MatMul", ["x", "wf"], ["y"], name="mm")]
    return graph(nodes, [("x", F32, [2, k])], [("y", F32, [2, n])], [w, s])


def qdq_matmul(zero=0, zero_type=I8, scale=0.05, x_type=I8):
    """Activation Q/DQ (per tensor) and an int8 per-channel weight DQ into a MatMul: what
    onnxruntime's QDQ quantizer writes for W8A8."""
    inits = [numpy_helper.from_array(np.array(scale, np.float32), "xs"),
             helper.make_tensor("xz", zero_type, [], [zero]),
             helper.make_tensor("w", x_type, [4, 3], np.ones(12, np.int64).tolist()),
             numpy_helper.from_array(np.full([3], 0.1, np.float32), "ws"),
             helper.make_tensor("wz", x_type, [3], [0, 0, 0])]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="dq_w", axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    return graph(nodes, [("x", F32, [2, 4])], [("y", F32, [2, 3])], inits, opset=19)


# --- the graphs and configs the tensorrt target takes pass --------------------------------------

def test_the_fp32_tiny_build_passes_with_its_profiles_and_configs(tiny_build):
    build = tiny_build("llava-llama").path
    report = check_build(build)
    assert report.tensorrt == DEFAULT_TENSORRT and report.graphs == ["vision_encoder", "projector", "lm_decoder"]
    assert report.violations == [], report.lines()
    assert report.ok
    assert report.lines() == [f"3 of 3 graphs passed the TensorRT {DEFAULT_TENSORRT} checks; passing does not "
                              "guarantee that TensorRT builds them: only a build on a GPU with TensorRT can show that"]
    assert check_build(build, "10.1.0").ok  # a full version picks its minor's tables; opset 18 is in 9-20


@pytest.fixture(scope="module")
def trt_precision_build(tiny_model_dir, tmp_path_factory):
    """One build holding each reduced precision the tensorrt target takes: int8 Q/DQ (vision), fp16
    with fp32 islands (projector), and the W4 form TensorRT reads (decoder: int4 weights in the
    form's block size, block-wise DequantizeLinear, the form's LM head). The parity gate is loosened: a
    random tiny decoder at 4 bits drifts past 0.99 cosine, and accuracy is not what this checks."""
    from vlm_export.build import BuildOptions, build
    from vlm_export.precision.convert import PrecisionOptions
    from vlm_export.precision.spec import parse_precision

    loose = {"min_cosine": 0.9}
    options = BuildOptions(precision=parse_precision("vision=int8,projector=fp16,decoder=w4"), parity_new_tokens=4,
                           # the head named: an int8 image stage's calibration must not judge it as an int8 decoder's
                           precision_options=PrecisionOptions(weight_form="dequantize", lm_head="w4"),
                           tolerance_overrides={"prefill": loose, "decode": loose})
    return build(tiny_model_dir("llava-llama"), tmp_path_factory.mktemp("trt-check") / "mixed", options)


def test_int8_fp16_and_w4_graphs_pass(trt_precision_build):
    build = trt_precision_build.path
    report = check_build(build)
    assert report.violations == [], report.lines()
    graphs = {stage: onnx.load(str(build / e["file"]), load_external_data=False)
              for stage, e in trt_precision_build.manifest["graphs"].items()}
    ops = {stage: {n.op_type for n in m.graph.node} for stage, m in graphs.items()}
    # the check had Q/DQ, fp16 casts and int4 blocks to look at, not a plain fp32 graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops["vision_encoder"]
    assert "Cast" in ops["projector"]
    int4 = [t for t in graphs["lm_decoder"].graph.initializer if t.data_type == I4]
    assert int4 and "DequantizeLinear" in ops["lm_decoder"]
    # the same W4 graph against TensorRT 10.1, whose parser documents opsets up to 20: block-wise
    # DequantizeLinear is opset 21
    old = check_build(build, "10.1")
    assert {(v.graph, v.node, v.rule) for v in old.violations} == {("lm_decoder", "opset_import", "opset")}
    assert not old.ok and "(lm_decoder did not)" in old.lines()[-1]


# --- each rule, on a graph built to break it ------------------------------------------------------

def test_op_support_contrib_and_unsupported_ops():
    nbits = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], name="lm_head_nbits", domain="com.microsoft",
                             K=64, N=8, bits=4, block_size=32)
    unique = helper.make_node("Unique", ["y"], ["u"], name="uniq")
    model = graph([nbits, unique], [("x", F32, [1, 64])], [("u", F32, [None])],
                  [helper.make_tensor("w", TensorProto.UINT8, [8, 2, 16], [0] * 256),
                   numpy_helper.from_array(np.ones([16], np.float32), "s")],
                  extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    violations = check_graph(model, "lm_decoder", DEFAULT_TENSORRT)
    assert {(v.node, v.rule) for v in violations} == {("lm_head_nbits", "op-support"), ("uniq", "op-support")}
    assert all(v.graph == "lm_decoder" for v in violations)
    detail = next(v.detail for v in violations if v.node == "lm_head_nbits")
    assert "com.microsoft::MatMulNBits is not an ONNX op" in detail
    # an op a later release added: Attention is in 10.15's list, not 10.1's
    attention = graph([helper.make_node("Attention", ["q", "k", "v"], ["o"], name="attn")],
                      [(n, F32, [1, 2, 4, 8]) for n in "qkv"], [("o", F32, [1, 2, 4, 8])], opset=23)
    assert found(attention, "10.15") == set()
    assert ("attn", "op-support") in found(attention, "10.1")


def test_op_dtype_reports_types_tensorrt_cannot_take_and_not_int64():
    int8_matmul = graph([helper.make_node("MatMul", ["a", "b"], ["y"], name="int8_mm")],
                        [("a", I8, [2, 4]), ("b", I8, [4, 3])], [("y", I8, [2, 3])])
    assert found(int8_matmul) == {("int8_mm", "op-dtype")}
    int16_add = graph([helper.make_node("Add", ["a", "b"], ["y"], name="add16")],
                      [("a", TensorProto.INT16, [2]), ("b", TensorProto.INT16, [2])], [("y", TensorProto.INT16, [2])])
    assert found(int16_add) == {("add16", "op-dtype")}
    bf16_grid = graph([helper.make_node("GridSample", ["x", "g"], ["y"], name="grid")],
                      [("x", TensorProto.BFLOAT16, [1, 1, 4, 4]), ("g", TensorProto.BFLOAT16, [1, 4, 4, 2])],
                      [("y", TensorProto.BFLOAT16, [1, 1, 4, 4])])
    assert found(bf16_grid) == {("grid", "op-dtype")}  # GridSample lists FP32, FP16
    # int64 prefix sums (the decoders' position and image-row indices): TensorRT 10 computes ints natively
    cumsum = graph([helper.make_node("CumSum", ["m", "axis"], ["c"], name="cumsum")],
                   [("m", TensorProto.INT64, [1, 8])], [("c", TensorProto.INT64, [1, 8])],
                   [numpy_helper.from_array(np.array(1, np.int64), "axis")])
    assert found(cumsum) == set()


def test_int32_dequantize_of_a_quantized_bias():
    bias = graph([helper.make_node("DequantizeLinear", ["b", "bs"], ["bf"], name="conv_bias_dq"),
                  helper.make_node("Add", ["x", "bf"], ["y"], name="add")],
                 [("x", F32, [2, 3])], [("y", F32, [2, 3])],
                 [helper.make_tensor("b", TensorProto.INT32, [3], [1, 2, 3]),
                  numpy_helper.from_array(np.full([3], 0.01, np.float32), "bs")], opset=19)
    violations = check_graph(bias, "vision_encoder", DEFAULT_TENSORRT)
    assert [(v.node, v.rule) for v in violations] == [("conv_bias_dq", "qdq-int32-dequantize")]
    assert "NVIDIA/TensorRT#3360" in violations[0].detail


def test_qdq_symmetric_int8_passes_and_an_asymmetric_zero_point_is_named():
    assert found(qdq_matmul()) == set()
    assert found(qdq_matmul(zero=3)) == {("q", "qdq-symmetric"), ("dq_x", "qdq-symmetric")}
    # uint8 (onnxruntime's default activation type): TensorRT would read it as int8
    assert found(qdq_matmul(zero_type=TensorProto.UINT8)) == {("q", "qdq-type"), ("dq_x", "qdq-type")}


def test_qdq_scales_must_be_positive_constants():
    assert found(qdq_matmul(scale=-0.05)) == {("q", "qdq-scale-positive"), ("dq_x", "qdq-scale-positive")}
    dynamic = graph([helper.make_node("QuantizeLinear", ["x", "s"], ["xq"], name="q_dyn"),
                     helper.make_node("DequantizeLinear", ["xq", "s"], ["y"], name="dq_dyn")],
                    [("x", F32, [2, 4]), ("s", F32, [])], [("y", F32, [2, 4])], opset=19)
    assert found(dynamic) == {("q_dyn", "qdq-scale-constant"), ("dq_dyn", "qdq-scale-constant")}


def test_block_quantization_only_int4_with_block_64_or_128_on_the_last_two_dims():
    assert found(weight_only(I4, block=64)) == set()
    assert found(weight_only(I4, k=256, block=128)) == set()
    blocks32 = check_graph(weight_only(I4, block=32, name="q_proj_dq"), "lm_decoder", DEFAULT_TENSORRT)
    assert [(v.node, v.rule) for v in blocks32] == [("q_proj_dq", "qdq-block")]
    assert "block size 32" in blocks32[0].detail and "64 or 128" in blocks32[0].detail
    int8_blocks = check_graph(weight_only(I8, block=64, name="lm_head_dq"), "lm_decoder", DEFAULT_TENSORRT)
    assert [(v.node, v.rule) for v in int8_blocks] == [("lm_head_dq", "qdq-block")]
    assert "block quantization of INT8" in int8_blocks[0].detail
    # INT4 needs blocks: per-channel int4 is refused
    per_channel = graph([helper.make_node("DequantizeLinear", ["w", "s"], ["y"], name="dq4", axis=1)], [],
                        [("y", F32, [128, 8])], [helper.make_tensor("w", I4, [128, 8], [0] * 1024),
                                                 numpy_helper.from_array(np.full([8], 0.1, np.float32), "s")])
    assert found(per_channel) == {("dq4", "qdq-block")}


def test_block_axis_and_int4_shape_rules():
    w = helper.make_tensor("w", I4, [128, 4, 8], [0] * 4096)
    s = numpy_helper.from_array(np.full([2, 4, 8], 0.1, np.float32), "s")
    first_axis = graph([helper.make_node("DequantizeLinear", ["w", "s"], ["y"], name="dq3", axis=0, block_size=64)],
                       [], [("y", F32, [128, 4, 8])], [w, s])
    assert found(first_axis) == {("dq3", "qdq-block")}
    odd = graph([helper.make_node("DequantizeLinear", ["w", "s"], ["y"], name="dq_odd", axis=0, block_size=64)],
                [], [("y", F32, [128, 7])], [helper.make_tensor("w", I4, [128, 7], [0] * 896),
                                             numpy_helper.from_array(np.full([2, 7], 0.1, np.float32), "s")])
    assert found(odd) == {("dq_odd", "qdq-int4-shape")}
    # scales that block both dims of a weight
    assert found(weight_only(I4, block=64, scale_shape=[2, 4], name="dq2d")) == {("dq2d", "qdq-block")}
    # int4 is weight-only: quantizing an activation to int4 is refused
    act = graph([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q4", axis=1, block_size=64),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["y"], name="dq4", axis=1, block_size=64)],
                [("x", F32, [2, 128])], [("y", F32, [2, 128])],
                [numpy_helper.from_array(np.full([2, 2], 0.1, np.float32), "s"),
                 helper.make_tensor("z", I4, [2, 2], [0] * 4)])
    assert found(act) == {("q4", "qdq-weight-only"), ("dq4", "qdq-weight-only")}


def test_opset_out_of_range():
    relu = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    assert found(graph(relu, [("x", F32, [2])], [("y", F32, [2])], opset=24)) == set()
    assert found(graph(relu, [("x", F32, [2])], [("y", F32, [2])], opset=25)) == {("opset_import", "opset")}
    assert found(graph(relu, [("x", F32, [2])], [("y", F32, [2])], opset=21), "10.1") == {("opset_import", "opset")}
    assert found(graph(relu, [("x", F32, [2])], [("y", F32, [2])], opset=8)) == {("opset_import", "opset")}


def test_profiles_cover_every_dynamic_dim_in_order_and_fixed_dims():
    model = graph([helper.make_node("Add", ["a", "b"], ["y"], name="add")],
                  [("a", F32, ["batch", "seq", 16]), ("b", F32, ["batch", 1, 16])], [("y", F32, ["batch", "seq", 16])])
    good = {"a": ((1, 1, 16), (2, 8, 16), (4, 32, 16)), "b": ((1, 1, 16), (2, 1, 16), (4, 1, 16))}
    assert found(model, profiles=[good]) == set()
    assert found(model, profiles=[{"a": good["a"]}]) == {("b", "profile-coverage")}  # b's batch has no range
    assert found(model, profiles=[good, {**good, "a": ((1, 40, 16), (2, 8, 16), (4, 32, 16))}]) == {
        ("a", "profile-range")}  # profile 1: seq min 40 > opt 8, max 32
    assert found(model, profiles=[{**good, "b": ((1, 2, 16), (2, 2, 16), (4, 2, 16))}]) == {("b", "profile-fixed-dim")}
    assert found(model, profiles=[{**good, "b": ((1, 1, 16), (2, 1, 16), (8, 1, 16))}]) == {
        ("b", "profile-dim-consistent")}  # batch up to 4 for a, 8 for b
    assert found(model, profiles=[{**good, "c": ((1,), (1,), (1,))}]) == {("c", "profile-coverage")}
    negative = {**good, "a": ((-1, 1, 16), (2, 8, 16), (4, 32, 16))}
    assert ("a", "profile-range") in found(model, profiles=[negative])


def test_real_decoder_profiles_with_min_above_max_are_named(tiny_build):
    build = tiny_build("llava-llama").path
    manifest = read_manifest(build)
    model = onnx.load(str(build / manifest["graphs"]["lm_decoder"]["file"]), load_external_data=False)
    profiles = stage_profiles(manifest, "lm_decoder")
    assert check_graph(model, "lm_decoder", DEFAULT_TENSORRT, profiles) == []
    broken = copy.deepcopy(profiles)
    lo, opt, hi = broken[1]["attention_mask"]
    broken[1]["attention_mask"] = ((lo[0], 300), opt, hi)  # decode: total_sequence min 300 > max 256
    violations = check_graph(model, "lm_decoder", DEFAULT_TENSORRT, broken)
    assert {(v.node, v.rule) for v in violations} == {("attention_mask", "profile-range")}
    assert "profile 1 total_sequence: min 300, opt 256, max 256" in violations[0].detail
    del broken[0]["past_key_values.0.key"]  # prefill: a dynamic input with no range at all
    assert ("past_key_values.0.key", "profile-coverage") in {(v.node, v.rule) for v in check_graph(
        model, "lm_decoder", DEFAULT_TENSORRT, broken)}


# --- the Triton configs of the tensorrt target ---------------------------------------------------

def test_tensorrt_configs_need_every_profile_in_every_instance_group(tiny_build):
    manifest = read_manifest(tiny_build("llava-llama").path)
    configs = model_configs(manifest, RepositoryOptions(target="tensorrt"))
    assert check_configs(configs, manifest) == []
    # today's config before the fix: no profile in the decoder's instance group -> profile 0 (prefill) only
    stripped = copy.deepcopy(configs)
    for cfg in stripped.values():
        for group in cfg.get("instance_group", []):
            group.pop("profile", None)
    violations = check_configs(stripped, manifest)
    assert [(v.graph, v.node, v.rule) for v in violations] == [
        ("lm_decoder", "config.instance_group[0]", "triton-profiles")]
    assert "2 optimization profiles" in violations[0].detail and "missing 0, 1" in violations[0].detail
    # one group per profile does not do either: the scheduler sends any request to any instance
    split = copy.deepcopy(configs)
    split["lm_decoder"]["instance_group"] = [{"kind": "KIND_GPU", "count": 1, "profile": ["0"]},
                                             {"kind": "KIND_GPU", "count": 1, "profile": ["1"]}]
    assert [(v.node, v.rule) for v in check_configs(split, manifest)] == [
        ("config.instance_group[0]", "triton-profiles"), ("config.instance_group[1]", "triton-profiles")]
    split["lm_decoder"]["instance_group"] = [{"kind": "KIND_GPU", "count": 1, "profile": ["0", "1", "2"]}]
    assert [(v.node, v.rule) for v in check_configs(split, manifest)] == [
        ("config.instance_group[0]", "triton-profiles")]  # there is no profile 2


def test_tensorrt_configs_platform_kind_and_max_batch_size(tiny_build):
    manifest = read_manifest(tiny_build("llava-llama").path)
    configs = model_configs(manifest, RepositoryOptions(target="tensorrt"))
    assert configs["vision_encoder"]["max_batch_size"] == 8 and configs["lm_decoder"]["max_batch_size"] == 0
    onnxruntime = model_configs(manifest, RepositoryOptions(target="onnxruntime"))
    rules = {(v.graph, v.rule) for v in check_configs(onnxruntime, manifest)}
    assert rules == {(s, r) for s in ("vision_encoder", "projector", "lm_decoder")
                     for r in ("triton-platform", "triton-kind")} | {("lm_decoder", "triton-profiles")}
    bad = copy.deepcopy(configs)
    # the decoder's inputs start with batch, image_tokens: Triton must not batch it
    bad["lm_decoder"]["max_batch_size"] = 4
    bad["lm_decoder"]["input"] = [{**t, "dims": t["dims"][1:]} for t in bad["lm_decoder"]["input"]]
    bad["lm_decoder"]["output"] = [{**t, "dims": t["dims"][1:]} for t in bad["lm_decoder"]["output"]]
    bad["vision_encoder"]["max_batch_size"] = 16  # more images than its profile's max (8)
    violations = {v.graph: v for v in check_configs(bad, manifest)}
    assert {(v.graph, v.node, v.rule) for v in violations.values()} == {
        ("lm_decoder", "config.max_batch_size", "triton-max-batch"),
        ("vision_encoder", "config.max_batch_size", "triton-max-batch")}
    assert "not one dynamic batch dim: use max_batch_size 0" in violations["lm_decoder"].detail
    assert "profile 0 gives images 1..8 (needs 1..16 at least)" in violations["vision_encoder"].detail
    bad = copy.deepcopy(configs)
    bad["projector"]["max_batch_size"] = 0  # dims still without the batch dim
    assert {(v.node, v.rule) for v in check_configs(bad, manifest)} == {
        ("config.input.image_features", "triton-dims"), ("config.output.image_embeds", "triton-dims")}


# --- versions and the report ----------------------------------------------------------------------

def test_unknown_version_is_one_line_listing_the_known_ones():
    with pytest.raises(BuildError) as err:
        check_graph(qdq_matmul(), "g", "8.6")
    assert str(err.value) == (f"no compatibility tables for TensorRT 8.6; known: {', '.join(SPECS)} "
                              f"(default {DEFAULT_TENSORRT})")
    assert "\n" not in str(err.value)
    assert found(qdq_matmul(), "10.15.1.29") == set()
    with pytest.raises(BuildError, match="no compatibility tables for TensorRT 11.0"):
        check_graph(qdq_matmul(), "g", "11.0")  # another major: its parser may have dropped what 10.x took


def test_a_release_without_tables_is_checked_with_the_newest_below_it():
    """TensorRT 10.5 (Triton 24.10's) has no tables of its own: its parser holds what 10.1's documented, and
    the report says which tables judged it (was refused outright, and the installed 10.5 silently judged
    by 10.15's, which allow more)."""
    from vlm_export.engines.check import spec_for, table_used

    assert spec_for("10.5.0.18") is SPECS["10.1"] and spec_for("10.15") is SPECS["10.15"]
    assert spec_for("10.20") is SPECS["10.15"]
    assert table_used("10.5.0.18") == "10.5 (the 10.1 tables, the newest at or below it)"
    assert table_used("10.15.1.29") == "10.15" and table_used(None) == DEFAULT_TENSORRT
    assert found(qdq_matmul(), "10.5.0") == set()


def test_report_lines():
    report = CompatibilityReport("10.15", ["vision_encoder", "lm_decoder"], [
        Violation("lm_decoder", "q_proj_dq", "qdq-block",
                  "block size 32: TensorRT 10.15 takes INT4 blocks of 64 or 128")])
    assert not report.ok
    assert report.lines() == [
        "lm_decoder: q_proj_dq: qdq-block: block size 32: TensorRT 10.15 takes INT4 blocks of 64 or 128",
        "1 of 2 graphs passed the TensorRT 10.15 checks (lm_decoder did not); passing does not guarantee that "
        "TensorRT builds them: only a build on a GPU with TensorRT can show that"]


def test_an_input_no_node_reads_is_refused_in_the_tensorrt_configs(tmp_path):
    """BLOOM's ALiBi decoder reads no position_ids, which its stage declares: TensorRT leaves the input out of
    the plan, and Triton would refuse a config (and requests) naming it. The tensorrt target says so in one
    line before anything is written; TensorRTRunner in process feeds only the plan's inputs."""
    from tiny_models import make_tiny_llava
    from vlm_export.build import BuildOptions, build
    from vlm_export.engines.check import unused_inputs
    from vlm_export.errors import RepositoryError
    from vlm_export.model_repository.render import RepositoryOptions, model_configs, render_repository

    result = build(make_tiny_llava(tmp_path / "bloom", family="bloom"), tmp_path / "build",
                   BuildOptions(max_sequence=128, parity_new_tokens=2))
    assert result.failures == []
    decoder = onnx.load(result.path / result.manifest["graphs"]["lm_decoder"]["file"], load_external_data=False)
    assert unused_inputs(decoder) == ["position_ids"]
    assert unused_inputs(onnx.load(result.path / result.manifest["graphs"]["projector"]["file"])) == []
    options = RepositoryOptions(target="tensorrt", decoder_mode="bls")
    with pytest.raises(RepositoryError, match="lm_decoder config.input.position_ids: triton-unused-input"):
        render_repository(result.path, tmp_path / "repo", options, configs_only=True, echo=lambda _: None)
    assert not (tmp_path / "repo").exists()
    report = check_build(result.path, configs=model_configs(result.manifest, options))
    assert [(v.graph, v.rule) for v in report.violations] == [("lm_decoder", "triton-unused-input")]
