"""An image stage's ONNX Runtime form (export/image_fuse.py): attention -> MultiHeadAttention, behind an If on a key
padding mask, equal to the exported graph on unpadded and padded batches."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from conftest import photos
from vlm_export.export.image_fuse import fuse_image_attention, fuse_image_stage
from vlm_export.runtime.load import open_build

HEADS, HEAD_SIZE = 3, 8


def _attention_graph(mask: str) -> onnx.ModelProto:
    """q, k, v [batch, tokens, heads x head size] -> one attention as torch.onnx writes a tower's: heads reshaped and
    transposed, MatMul(q, k transposed) x scale + mask -> Softmax -> x v -> back to [batch, tokens, width].
    ``mask``: "padding" (Where(keep [batch, tokens] bool, 0, float min) unsqueezed to [batch, 1, 1, tokens]),
    "input" (an additive [batch, 1, 1, tokens] float graph input) or "none"."""
    width = HEADS * HEAD_SIZE
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", "tokens", width]) for n in "qkv"]
    inits = [helper.make_tensor("heads", TensorProto.INT64, [4], [0, 0, HEADS, HEAD_SIZE]),
             helper.make_tensor("flat", TensorProto.INT64, [3], [0, 0, width]),
             helper.make_tensor("scale", TensorProto.FLOAT, [], [HEAD_SIZE ** -0.5]),
             helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
             helper.make_tensor("lowest", TensorProto.FLOAT, [], [float(np.finfo(np.float32).min)]),
             helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])]
    nodes = []
    for n in "qkv":
        nodes.append(helper.make_node("Reshape", [n, "heads"], [f"{n}4"]))
    nodes += [helper.make_node("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),  # the exporter's folded transposes
              helper.make_node("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),
              helper.make_node("MatMul", ["qh", "kt"], ["scores"]),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"])]
    value_info = [helper.make_tensor_value_info("qh", TensorProto.FLOAT, ["batch", HEADS, "tokens", HEAD_SIZE]),
                  helper.make_tensor_value_info("k4", TensorProto.FLOAT, ["batch", "tokens", HEADS, HEAD_SIZE]),
                  helper.make_tensor_value_info("vh", TensorProto.FLOAT, ["batch", HEADS, "tokens", HEAD_SIZE]),
                  helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 1, "tokens"])]
    softmax_in = "scaled"
    if mask == "padding":
        inputs.append(helper.make_tensor_value_info("keep", TensorProto.BOOL, ["batch", "tokens"]))
        nodes += [helper.make_node("Unsqueeze", ["keep", "axes"], ["keep4"]),
                  helper.make_node("Where", ["keep4", "zero", "lowest"], ["mask"])]
    elif mask == "input":
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 1, 1, "tokens"]))
    if mask != "none":
        nodes.append(helper.make_node("Add", ["scaled", "mask"], ["masked"]))
        softmax_in = "masked"
    nodes += [helper.make_node("Softmax", [softmax_in], ["weights"], axis=-1),
              helper.make_node("MatMul", ["weights", "vh"], ["context"]),
              helper.make_node("Transpose", ["context"], ["context_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["context_t", "flat"], ["out"])]
    graph = helper.make_graph(nodes, "attention", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "tokens", width])], inits, value_info=value_info)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def _feeds(batch: int, tokens: int, real: list[int]) -> dict:
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((batch, tokens, HEADS * HEAD_SIZE), dtype=np.float32) for n in "qkv"}
    keep = np.arange(tokens)[None, :] < np.array(real)[:, None]
    feeds["keep"] = keep
    feeds["mask"] = np.where(keep, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None, None, :]
    return feeds


def _fused(exported: onnx.ModelProto):
    fused = onnx.ModelProto()
    fused.CopyFrom(exported)
    return fused, fuse_image_attention(fused)


@pytest.mark.parametrize("mask", ["padding", "input"])
def test_a_masked_attention_goes_behind_an_if_equal_on_both_branches(mask):
    """Nothing masked: the tiled kernel; anything masked (padded rows, or any additive bias): the exported nodes."""
    exported = _attention_graph(mask)
    fused, report = _fused(exported)
    assert (report.attentions, report.masked, report.notes) == (1, 1, [])
    onnx.checker.check_model(fused)
    ops = [n.op_type for n in fused.graph.node]
    assert "Softmax" not in ops and ops.count("If") == 1
    branch = {a.name: [n.op_type for n in a.g.node] for n in fused.graph.node if n.op_type == "If" for a in n.attribute}
    assert "MultiHeadAttention" in branch["then_branch"] and "Softmax" not in branch["then_branch"]
    assert "Softmax" in branch["else_branch"] and "MultiHeadAttention" not in branch["else_branch"]
    for real in ([16, 16], [16, 9], [5, 16]):
        feeds = _feeds(2, 16, real)
        if mask == "input" and real != [16, 16]:  # not only 0 / the float minimum: a bias the kernel could not take
            feeds["mask"] = feeds["mask"] * 0 - np.linspace(0, 3, 16, dtype=np.float32)
        want, got = _run(exported, feeds), _run(fused, feeds)
        assert want.shape == got.shape and np.abs(want - got).max() < 1e-5, real


def test_no_mask_needs_no_if():
    exported = _attention_graph("none")
    fused, report = _fused(exported)
    assert (report.attentions, report.masked) == (1, 0)
    assert [n.op_type for n in fused.graph.node].count("If") == 0
    feeds = _feeds(2, 12, [12, 12])
    assert np.abs(_run(exported, feeds) - _run(fused, feeds)).max() < 1e-5


def test_heads_the_graph_does_not_state_are_left_as_exported(tmp_path):
    """Without the heads' shapes (heads, head size) the kernel's num_heads is not known: the attention stays, the
    reason is recorded, and no file is written."""
    model = _attention_graph("padding")
    del model.graph.value_info[:]
    src = tmp_path / "g.onnx"
    onnx.save(model, src)
    report = fuse_image_stage(src, tmp_path / "fused.onnx")
    assert not report.fused and "without one stated number of heads and head size" in report.reason
    assert not (tmp_path / "fused.onnx").exists()


def test_a_windowed_tower_fused_answers_as_exported(tiny_build):
    """Qwen2.5-VL's tower (windowed blocks: each window's padded slots masked; full blocks: each image's padding) in
    its fused form, the form the onnxruntime target runs: the same rows as the standard graph for one image, two of
    one size (no padding: the tiled kernel) and two sizes (padding)."""
    path = tiny_build("qwen2_5_vl").path
    manifest = json.loads((path / "manifest.json").read_text())
    tower = manifest["graphs"]["vision_encoder"]
    assert manifest["targets"]["onnxruntime"]["vision_encoder"] == "fused"
    layers = json.loads((path / "manifest.json").read_text())["graphs"]["vision_encoder"]["fusion"]
    assert layers["fusions"]["attention"] == layers["fusions"]["masked_attention"] > 0 and not layers["notes"]
    fused_pipe, standard_pipe = open_build(path), open_build(path, form="standard")
    assert fused_pipe.runners["vision_encoder"].path.name == "vision_encoder.fused.onnx" == \
        tower["forms"]["fused"]["file"].split("/")[-1]
    for images in (photos([(40, 52)], 1), photos([(36, 36)], 2), photos([(40, 52), (60, 30)], 2)):
        feeds = fused_pipe.preprocess(images)
        want = standard_pipe.run_image_stages(feeds)["image_features"]
        got = fused_pipe.run_image_stages(feeds)["image_features"]
        assert np.abs(want - got).max() <= 1e-5 * max(1.0, float(np.abs(want).max())), len(images)


@pytest.mark.parametrize("name", ["llava-llama", "gemma3", "glm4v", "minicpm_v"])
def test_towers_of_other_families_fuse_every_attention(tiny_build, name):
    """Every tower attention is rewritten (no notes), whatever its family's mask and layout: CLIP without a mask,
    SigLIP, GLM-4V's rotary tower, MiniCPM-V's window merger; their builds' parity passed (fused and standard)."""
    path = tiny_build(name).path
    manifest = json.loads((path / "manifest.json").read_text())
    fusion = manifest["graphs"]["vision_encoder"]["fusion"]
    assert fusion["made"] and fusion["fusions"]["attention"] > 0 and fusion["notes"] == [], fusion
    stages = json.loads((path / "report.json").read_text())["stages"]
    assert "vision_encoder (standard form)" in stages and manifest["parity"]["passed"]


def test_an_int8_tower_gets_a_fused_int8_form(tiny_model_dir, tmp_path, monkeypatch):
    """``vision=int8`` on Qwen2.5-VL's tower (every attention masked: behind an If): the fused form is quantized too
    (its own calibration and fallback), its MatMuls int8 around fp32 MultiHeadAttention - the tiled kernel's memory
    with int8 projections - the If's branches left fp32 and after what they read (ONNX Runtime's quantizer orders
    the top graph by node inputs only: ``convert.restore_order``); the onnxruntime target runs it, TensorRT the
    standard Q/DQ graph, and both pass parity."""
    from vlm_export.build import BuildOptions, build
    from vlm_export.precision.spec import parse_precision

    monkeypatch.setenv("VLM_EXPORT_CACHE", str(tmp_path / "cache"))
    options = BuildOptions(precision=parse_precision("vision=int8"), parity_new_tokens=4)
    result = build(tiny_model_dir("qwen2_5_vl"), tmp_path / "int8", options)
    manifest = result.manifest
    tower = manifest["graphs"]["vision_encoder"]
    assert tower["fusion"]["made"] and tower["forms"]["fused"]["precision"] == "int8" == tower["precision"]
    assert manifest["targets"]["onnxruntime"]["vision_encoder"] == "fused"
    assert manifest["targets"]["tensorrt"]["vision_encoder"] == "standard"
    model = onnx.load(str(result.path / tower["forms"]["fused"]["file"]))
    nodes = model.graph.node
    made = {o: n for n in nodes for o in n.output}
    ifs = [n for n in nodes if n.op_type == "If"]
    assert len(ifs) == tower["fusion"]["fusions"]["masked_attention"] > 0
    for node in ifs:
        branches = {a.name: [n.op_type for n in a.g.node] for a in node.attribute}
        assert "MultiHeadAttention" in branches["then_branch"]
        assert not any(op in ("QuantizeLinear", "DequantizeLinear") for ops in branches.values() for op in ops)
    kept = set(tower["forms"]["fused"]["variant"]["fp32_fallback"]["kept"])
    matmuls = [n for n in nodes if n.op_type == "MatMul" and n.name not in kept]
    assert matmuls and all(made[n.input[0]].op_type == "DequantizeLinear" for n in matmuls)
    onnx.checker.check_model(model)
    stages = json.loads((result.path / "report.json").read_text())["stages"]
    assert "vision_encoder (standard form)" in stages and manifest["parity"]["passed"]
    pipe = open_build(result.path)
    assert pipe.runners["vision_encoder"].path.name == tower["forms"]["fused"]["file"].split("/")[-1]
    feeds = pipe.preprocess(photos([(40, 52), (60, 30)], 2))
    got = pipe.run_image_stages(feeds)["image_features"]
    want = open_build(result.path, form="standard").run_image_stages(feeds)["image_features"]
    cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine > 0.99
    # a rebuild reads both forms' ranges and fallbacks from the calibration cache, each its own
    variants = [tower["variant"], tower["forms"]["fused"]["variant"]]
    assert [v["calibration_cache"]["reused"] for v in variants] == [False, False]
    assert variants[0]["calibration_cache"]["file"] != variants[1]["calibration_cache"]["file"]
    again = build(tiny_model_dir("qwen2_5_vl"), tmp_path / "again", options).manifest["graphs"]["vision_encoder"]
    assert [v["calibration_cache"]["reused"] for v in (again["variant"], again["forms"]["fused"]["variant"])] == [True, True]
    assert again["forms"]["fused"]["variant"]["fp32_fallback"] == variants[1]["fp32_fallback"]


def test_an_int8_pixtral_tower_s_fused_form_opens(tiny_model_dir, tmp_path, monkeypatch):
    """``vision=int8`` on Pixtral's tower (Mistral 3): its v projection reaches the attention's If through Reshape
    and Transpose only, which aborted the build when ONNX Runtime opened the fused int8 candidate (the test below).
    Now the build passes parity with the fused int8 form on the onnxruntime target, and it runs."""
    from vlm_export.build import BuildOptions, build
    from vlm_export.precision.spec import parse_precision

    monkeypatch.setenv("VLM_EXPORT_CACHE", str(tmp_path / "cache"))
    result = build(tiny_model_dir("mistral3"), tmp_path / "int8",
                   BuildOptions(precision=parse_precision("vision=int8"), parity_new_tokens=4))
    tower = result.manifest["graphs"]["vision_encoder"]
    assert tower["forms"]["fused"]["precision"] == "int8" and result.manifest["parity"]["passed"]
    assert result.manifest["targets"]["onnxruntime"]["vision_encoder"] == "fused"
    model = onnx.load(str(result.path / tower["forms"]["fused"]["file"]))
    assert any(n.op_type == "If" for n in model.graph.node) and any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    pipe = open_build(result.path)
    features = pipe.run_image_stages(pipe.preprocess(photos([(40, 52)], 1)))["image_features"]
    assert np.isfinite(features).all() and features.size


def _pair(source: str, name: str) -> list[onnx.NodeProto]:
    """A per-tensor int8 Q/DQ pair on ``source`` (scale 0.05), as ONNX Runtime's static quantizer writes one."""
    return [helper.make_node("QuantizeLinear", [source, "q_scale", "q_zero"], [f"{name}_q"], name=f"{name}_Q"),
            helper.make_node("DequantizeLinear", [f"{name}_q", "q_scale", "q_zero"], [f"{name}_dq"], name=f"{name}_DQ")]


def test_a_qdq_pair_that_reaches_an_if_branch_through_shape_ops_is_removed(tmp_path):
    """ONNX Runtime 1.32's QDQ propagation moves a DequantizeLinear forward past Reshape / Transpose (and past an
    Expand its earlier passes removed: GQA's repeat of one) and then writes into an If's explicit inputs at the index
    of the implicit one its branch reads: the process aborts at session creation (a fused int8 tower of Pixtral's,
    LFM3's; seen in the random-configuration sweep). ``drop_pairs_into_subgraphs`` removes such a pair - a rounding
    only, the branch computes in fp32 - and leaves one that a MatMul reads."""
    from vlm_export.precision.convert import drop_pairs_into_subgraphs

    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), n) for n in ("w", "w2")]
    inits += [helper.make_tensor("q_scale", TensorProto.FLOAT, [], [0.05]),
              helper.make_tensor("q_zero", TensorProto.INT8, [], [0]),
              helper.make_tensor("shape", TensorProto.INT64, [4], [0, 0, 2, 4]),
              helper.make_tensor("ones", TensorProto.INT64, [4], [1, 1, 1, 1])]
    branch = [helper.make_graph([helper.make_node("Identity", ["spread"], [f"{side}_out"])], side, [],
                                [helper.make_tensor_value_info(f"{side}_out", TensorProto.FLOAT, [1, 2, 3, 4])])
              for side in ("then", "else")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["v"], name="v_proj"), *_pair("v", "v"),
             helper.make_node("Reshape", ["v_dq", "shape"], ["heads"]),
             helper.make_node("Transpose", ["heads"], ["moved"], perm=[0, 2, 1, 3]),
             helper.make_node("Expand", ["moved", "ones"], ["spread"]),  # a no-op: ONNX Runtime removes it
             helper.make_node("If", ["yes"], ["attended"], then_branch=branch[0], else_branch=branch[1]),
             *_pair("v", "w2_in"), helper.make_node("MatMul", ["w2_in_dq", "w2"], ["projected"], name="o_proj")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8]),
                                           helper.make_tensor_value_info("yes", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("attended", TensorProto.FLOAT, [1, 2, 3, 4]),
                               helper.make_tensor_value_info("projected", TensorProto.FLOAT, [1, 3, 8])], inits)
    path = tmp_path / "int8.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    model = onnx.load(str(path))
    assert drop_pairs_into_subgraphs(model) == 1
    onnx.save(model, str(path))
    onnx.checker.check_model(model)
    names = [n.name for n in model.graph.node]
    assert "v_DQ" not in names and "v_Q" not in names and "w2_in_DQ" in names  # the MatMul's pair stays
    x = rng.standard_normal((1, 3, 8)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    attended, projected = session.run(None, {"x": x, "yes": np.array(True)})
    v = x @ onnx.numpy_helper.to_array(inits[0])
    np.testing.assert_allclose(attended, v.reshape(1, 3, 2, 4).transpose(0, 2, 1, 3), rtol=1e-6)  # fp32: not rounded
    rounded = np.clip(np.rint(v / np.float32(0.05)), -128, 127) * np.float32(0.05)
    np.testing.assert_allclose(projected, rounded @ onnx.numpy_helper.to_array(inits[1]), rtol=1e-4, atol=1e-4)
    assert drop_pairs_into_subgraphs(onnx.load(str(path))) == 0  # nothing left to remove


def test_a_request_s_images_go_one_per_call_through_a_fused_masked_tower(tiny_build):
    """Where the tower's fused form has masked attentions (patch rows: images of different sizes pad each other),
    a request's images go through it one per call, as the served image cache sends them: each image's rows are its
    rows alone (the tiled kernel, never the padded batch's exported attention), bit for bit, so a prefix cache keyed
    on them hits whatever came with the image. The standard form takes them in one call."""
    from vlm_export.runtime.generate import image_input_for

    path = tiny_build("qwen2_vl").path
    pipe = open_build(path)
    assert pipe.encodes_images_alone and not open_build(path, form="standard").encodes_images_alone
    assert not open_build(tiny_build("llava-llama").path).encodes_images_alone  # no mask: nothing to pad around
    images = photos([(40, 52), (60, 30)], 2)
    joined = image_input_for(pipe, images, "Compare them.")
    alone = [pipe.encode_images(pipe.pixel_values([image])) for image in images]
    np.testing.assert_array_equal(joined.rows, np.concatenate([a.rows for a in alone]))
    together = pipe.encode_images(pipe.pixel_values(images))  # one call: the padded batch's exported attention
    np.testing.assert_allclose(together.rows, joined.rows, atol=1e-5 * max(1.0, float(np.abs(joined.rows).max())))
