"""Precision variants per stage: they build, run on ONNX Runtime CPU, pass their gates, and the
manifest records how each was made."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
import pytest

from vlm_export.build import PARITY_SCRATCH, BuildOptions, build
from vlm_export.cpu import int8_dot_product
from vlm_export.errors import BuildError, DatasetError, ExportError
from vlm_export.precision.calibration import folder_pairs
from vlm_export.precision.convert import PrecisionOptions
from vlm_export.precision.spec import PrecisionPlan, parse_precision
from vlm_export.runtime.generate import GenerationConfig, generate
from vlm_export.runtime.load import open_build


def test_parse_precision_and_resolve_against_declared_stages():
    from vlm_export.contract import DECODER_PRECISIONS, IMAGE, IMAGE_PRECISIONS, StageSpec

    stages = [StageSpec("vision_encoder", IMAGE, (), (), IMAGE_PRECISIONS),
              StageSpec("projector", IMAGE, (), (), IMAGE_PRECISIONS),
              StageSpec("lm_decoder", "decoder", (), (), DECODER_PRECISIONS)]
    assert parse_precision(None) == PrecisionPlan()
    assert parse_precision("fp16").resolve(stages) == dict.fromkeys(("vision_encoder", "projector", "lm_decoder"), "fp16")
    assert parse_precision("vision=int8,projector=fp16,decoder=w4").resolve(stages) == {
        "vision_encoder": "int8", "projector": "fp16", "lm_decoder": "w4"}
    assert parse_precision("decoder=w8").resolve(stages) == {"vision_encoder": "fp32", "projector": "fp32",
                                                              "lm_decoder": "w8"}
    with pytest.raises(BuildError, match="names the lm_decoder stage twice .int8 and w4.; give each stage one"):
        parse_precision("decoder=int8,lm_decoder=w4")
    assert parse_precision("decoder=w4,decoder=w4") == parse_precision("decoder=w4")  # said twice, alike: fine
    with pytest.raises(BuildError, match="'w3' in 'decoder=w3' is not one of fp32"):
        parse_precision("decoder=w3")
    for typo in ("decoder=w4,", ",fp16", "fp16,,decoder=w4"):
        with pytest.raises(BuildError, match="has an empty entry .a comma too many."):
            parse_precision(typo)
    with pytest.raises(BuildError, match="not valid for vision_encoder.*valid: vision_encoder: fp32/fp16/int8"):
        parse_precision("vision=w4").resolve(stages)
    with pytest.raises(BuildError, match="not available for vision_encoder, projector"):
        parse_precision("w4").resolve(stages)
    # a stage named explicitly takes precedence over the uniform default
    assert parse_precision("w4").resolve(stages[2:]) == {"lm_decoder": "w4"}
    with pytest.raises(BuildError, match="unknown stage.*text.*this model's stages: vision_encoder, projector"):
        parse_precision("text=fp16").resolve(stages)
    # a bare precision among per-stage ones is every other stage's
    assert parse_precision("fp16,decoder=w4").resolve(stages) == {"vision_encoder": "fp16", "projector": "fp16",
                                                                   "lm_decoder": "w4"}
    with pytest.raises(BuildError, match="two precisions for every stage .fp16 and int8."):
        parse_precision("fp16,int8")


@pytest.mark.parametrize("plan,options,flag", [
    ("fp32", dict(lm_head="w8"), "--lm-head sets a quantized decoder's LM head"),
    ("decoder=fp16", dict(lm_head="int8"), "--lm-head"),
    ("vision=int8", dict(block_size=64), "--block-size"),
    ("decoder=int8", dict(weight_scheme="zero-point"), "--weight-scheme"),
    ("vision=fp16", dict(weight_form="dequantize"), "--weight-form"),
    ("decoder=int8", dict(weight_activations="fp32"), "--weight-activations"),
    ("decoder=w4", dict(int8_kernel="u8u8"), "--int8-kernel"),
    ("decoder=w4", dict(int8_fp32_matmuls="3"), "--int8-fp32-matmuls"),
    ("decoder=w8", dict(calibration="percentile"), "--calibration sets how int8 image stages are calibrated"),
    ("decoder=int8", dict(calibration="entropy"), "--calibration"),  # the decoder's int8 takes channel maxima
    ("fp16", dict(exclude_nodes=("mm",)), "--keep-node"),
    ("decoder=int8", dict(embeddings="w8"), "--embeddings sets a w8/w4 decoder's lookup tables"),
])
def test_an_option_no_stage_reads_is_refused(plan, options, flag):
    """Ignored silently it would build something else than asked: one line naming the flag and a fix."""
    with pytest.raises(BuildError, match=f"^{flag}.* --precision .* makes no such stage; add e.g. .* or drop"):
        BuildOptions(precision=parse_precision(plan), precision_options=PrecisionOptions(**options))


def test_options_a_stage_reads_are_taken():
    for plan, options in [("decoder=w4", dict(lm_head="w4", block_size=64, weight_scheme="zero-point")),
                          ("decoder=int8", dict(block_size=16, int8_kernel="u8u8", int8_fp32_matmuls="0")),
                          ("vision=int8", dict(calibration="entropy", exclude_nodes=("mm",))),
                          ("int8", dict(calibration="percentile")),
                          ("fp16,decoder=w4", dict(weight_form="dequantize")),
                          ("decoder=w8", dict(embeddings="w4"))]:
        BuildOptions(precision=parse_precision(plan), precision_options=PrecisionOptions(**options))


def test_u8s8_is_refused_before_the_export_on_a_cpu_without_vnni(monkeypatch):
    """The build checks parity on this CPU, where U8S8 is not exact: refused at once, not after the export."""
    import vlm_export.build as build_module

    monkeypatch.setattr(build_module, "int8_dot_product", lambda: None)
    with pytest.raises(BuildError, match="--int8-kernel u8s8 is exact only on a CPU with VNNI or AMX.*u8u8"):
        BuildOptions(precision=parse_precision("decoder=int8"), precision_options=PrecisionOptions(int8_kernel="u8s8"))
    monkeypatch.setattr(build_module, "int8_dot_product", lambda: "avx512_vnni")
    BuildOptions(precision=parse_precision("decoder=int8"), precision_options=PrecisionOptions(int8_kernel="u8s8"))


def test_blocks_that_do_not_divide_the_layers_are_refused_before_the_export(tiny_model_dir, tmp_path, monkeypatch):
    """The tiny LM's Linear layers read 64 and 128 inputs: blocks of 128 cannot hold the 64 ones in the
    asymmetric scheme, which is said before minutes of export (not after, and not twice: once per form)."""
    import vlm_export.build as build_module

    def exported(*_):
        raise AssertionError("the export ran")

    monkeypatch.setattr(build_module, "export_stage", exported)
    options = BuildOptions(precision=parse_precision("decoder=w4"), precision_options=PrecisionOptions(block_size=128))
    with pytest.raises(ExportError, match=r"weight\(s\) have an input size K that is not a multiple of the block size "
                                          r"128 \(.*q_proj K=64.*use --block-size 64 \(it divides every K: 64, 128\)"):
        build(tiny_model_dir("llava-llama"), tmp_path / "out", options)
    assert not (tmp_path / "out").exists()
    # the zero-point scheme pads K (MatMulNBits does): no refusal, the export is reached
    options = BuildOptions(precision=parse_precision("decoder=w4"),
                           precision_options=PrecisionOptions(block_size=128, weight_scheme="zero-point"))
    with pytest.raises(AssertionError, match="the export ran"):
        build(tiny_model_dir("llava-llama"), tmp_path / "out", options)


def test_calibration_flags_without_a_stage_they_calibrate(tmp_path, run_cli):
    from PIL import Image

    from conftest import assert_one_line_error

    (tmp_path / "cal").mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "cal" / "a.png")
    (tmp_path / "prompts.txt").write_text("What is it?\n")
    model = str(tmp_path / "no-model")  # refused before the model is read
    assert_one_line_error(run_cli("build", model, "--out", str(tmp_path / "b"), "--precision", "decoder=int8",
                                  "--calibration-prompts", str(tmp_path / "prompts.txt")),
                          "--calibration-prompts pairs its prompts with the images of --calibration-images")
    assert_one_line_error(run_cli("build", model, "--out", str(tmp_path / "b"), "--precision", "decoder=w4",
                                  "--calibration-images", str(tmp_path / "cal")),
                          "--calibration-images calibrates int8 stages and GPTQ rounding", "lm_decoder=w4")
    assert_one_line_error(run_cli("build", model, "--out", str(tmp_path / "b"), "--precision", "decoder=w4",
                                  "--weight-form", "dequantize", "--embeddings", "w4"),
                          "GatherBlockQuantized, which TensorRT does not read")
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def calibration_cache(tmp_path_factory):
    """A fresh cache folder for this module (the calibration cache lives under $VLM_EXPORT_CACHE)."""
    import os

    folder = tmp_path_factory.mktemp("cache")
    previous = os.environ.get("VLM_EXPORT_CACHE")
    os.environ["VLM_EXPORT_CACHE"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["VLM_EXPORT_CACHE"]
    else:
        os.environ["VLM_EXPORT_CACHE"] = previous


MIXED = "vision=fp16,projector=int8,decoder=w4"


@pytest.fixture(scope="module")
def mixed_build(tiny_model_dir, tmp_path_factory, calibration_cache):
    out = tmp_path_factory.mktemp("precision") / "mixed"
    return build(tiny_model_dir("llava-llama"), out, BuildOptions(precision=parse_precision(MIXED), parity_new_tokens=8))


def test_mixed_precision_build(mixed_build):
    manifest = mixed_build.manifest
    assert manifest["precision"] == {"vision_encoder": "fp16", "projector": "int8", "lm_decoder": "w4"}
    graphs = manifest["graphs"]
    assert graphs["vision_encoder"]["file"] == "graphs/vision_encoder.fp16.onnx"
    assert "LayerNormalization" in graphs["vision_encoder"]["variant"]["fp32_islands"]
    assert graphs["projector"]["variant"]["format"] == "QDQ" and graphs["projector"]["variant"]["calibration_samples"] > 0
    decoder = graphs["lm_decoder"]["variant"]
    assert (decoder["bits"], decoder["scheme"], decoder["form"], decoder["lm_head"]) == (4, "asymmetric", "matmulnbits", "w8")
    assert graphs["projector"]["variant"]["calibration_cache"]["reused"] is False
    # only the shipped variants are in the build: the w4 decoder made from the fused graph (MatMulNBits is
    # ONNX Runtime's; no target runs an unfused one)
    assert sorted(p.name for p in (mixed_build.path / "graphs").iterdir()) == [
        "lm_decoder.fused.w4.onnx", "projector.int8.onnx", "vision_encoder.fp16.onnx"]
    ops = {n.op_type for n in onnx.load(str(mixed_build.path / graphs["lm_decoder"]["file"])).graph.node}
    assert "MatMulNBits" in ops
    ops = {n.op_type for n in onnx.load(str(mixed_build.path / graphs["projector"]["file"])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    report = json.loads((mixed_build.path / "report.json").read_text())
    assert report["passed"]
    # reduced precision is judged by cosine; tokens are reported with their first divergence, not required equal
    assert report["stages"]["prefill"]["logits"]["allowed_max_abs"] is None
    assert report["stages"]["prefill"]["logits"]["cosine"] >= 0.99
    for run in report["end_to_end"]["onnxruntime"]:  # the first divergence, recounted from the tokens
        ref, cand = run["reference"], run["candidate"]
        diverged = [i for i, (a, b) in enumerate(zip(ref, cand)) if a != b] or (
            [min(len(ref), len(cand))] if len(ref) != len(cand) else [])
        assert run["first_divergence"] == (diverged[0] if diverged else None), run
        assert run["identical"] is (not diverged)


def test_variants_generate(mixed_build):
    pipe = open_build(mixed_build.path)
    result = generate(pipe, "What is this?", [], GenerationConfig(max_new_tokens=5))
    assert result.completion_tokens == 5


def test_failing_gate_is_reported_not_shipped(tiny_model_dir, tmp_path):
    from vlm_export.errors import ParityError

    options = BuildOptions(precision=parse_precision("decoder=w4"), parity_new_tokens=4,
                           tolerance_overrides={"prefill": {"min_cosine": 0.9999999}})
    with pytest.raises(ParityError, match="prefill/logits: cosine"):
        build(tiny_model_dir("prefix-llama"), tmp_path / "w4", options)
    assert not (tmp_path / "w4").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w4.failed"]
    assert not (tmp_path / "w4.failed" / PARITY_SCRATCH).exists()  # parity's recorded arrays are not kept


def test_an_int8_vision_tower_with_outlier_channels_keeps_the_matmul_they_reach_fp32(tmp_path, calibration_cache):
    """A real CLIP tower whose MLP input carries one channel 300x the others (its LayerNorm scaled up,
    fc1's column for it scaled down: the same function, the outliers a trained ViT has): one scale per
    tensor leaves the other channels a few codes. With every MatMul int8 the tower fails its gate;
    by default the build ranks fc1 worst, keeps it fp32, and passes."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from tiny_models import make_tiny_llava
    from vlm_export.errors import ParityError

    path = make_tiny_llava(tmp_path / "outliers")
    model = LlavaForConditionalGeneration.from_pretrained(path)
    layers = [m for m in model.modules() if hasattr(m, "layer_norm2") and hasattr(m, "mlp")]  # CLIP encoder layers
    with torch.no_grad():
        for layer in layers:
            layer.layer_norm2.weight[0] *= 300
            layer.layer_norm2.bias[0] *= 300
            layer.mlp.fc1.weight[:, 0] /= 300
    model.save_pretrained(path)
    options = dict(precision=parse_precision("vision=int8"), parity_new_tokens=4)
    with pytest.raises(ParityError, match="vision_encoder/image_features: cosine"):
        build(path, tmp_path / "all-int8", BuildOptions(**options,
                                                       precision_options=PrecisionOptions(int8_fp32_matmuls="0")))
    result = build(path, tmp_path / "auto", BuildOptions(**options))
    fallback = result.manifest["graphs"]["vision_encoder"]["variant"]["fp32_fallback"]
    assert len(fallback["kept"]) == 1 and [t["fp32_matmuls"] for t in fallback["trials"]] == [0, 1]
    graph = onnx.load(str(result.path / result.manifest["graphs"]["vision_encoder"]["file"])).graph
    kept = next(n for n in graph.node if n.name == fallback["kept"][0])
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    assert kept.op_type == "MatMul" and kept.input[0] not in dequantized  # fp32 in
    assert len([n for n in graph.node if n.op_type == "QuantizeLinear"]) > 0  # the rest int8
    report = json.loads((result.path / "report.json").read_text())
    assert report["stages"]["vision_encoder"]["image_features"]["cosine"] >= 0.99
    # ONNX Runtime's fused kernels are exact on VNNI/AMX only: Triton's onnxruntime backend cannot run the
    # pairs as written elsewhere (vlm-export's runners do), so rendering that target says so
    from vlm_export.model_repository.render import RepositoryOptions, render_repository

    assert result.manifest["graphs"]["vision_encoder"]["variant"]["requires_cpu"]
    notes = []
    render_repository(result.path, tmp_path / "repo", RepositoryOptions(target="onnxruntime"), echo=notes.append)
    assert any(n.startswith("vision_encoder: its int8 kernels") and "python target" in n for n in notes), notes


def test_calibration_folder(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        folder_pairs(tmp_path)
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i * 60, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("What is it?\nDescribe it.\n")
    pairs = folder_pairs(tmp_path, tmp_path / "prompts.txt")
    assert [p.prompt for p in pairs] == ["What is it?", "Describe it.", "What is it?"]

    # refused by name before any export: no folder, a missing prompts file, an image that is not one
    with pytest.raises(DatasetError, match="calibration folder .*nowhere does not exist"):
        folder_pairs(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="prompts file .*missing.txt cannot be read"):
        folder_pairs(tmp_path, tmp_path / "missing.txt")
    (tmp_path / "3.jpg").write_text("not a picture")
    with pytest.raises(DatasetError, match=r"calibration image .*3.jpg cannot be decoded.*remove it from"):
        folder_pairs(tmp_path)


def test_rebuild_reuses_calibration(mixed_build, tiny_model_dir, tiny_build, tmp_path, calibration_cache):
    """The int8 ranges of an unchanged model + graph + pairs + method come from the cache (one
    rebuild, whose other stages differ: the key is the stage's own); a broken cache file is
    dropped, not trusted; another method, other pairs or another graph make another key."""
    from vlm_export.build import _drop_if_unreadable
    from vlm_export.precision.calibration import CalibrationPair, cache_path, default_pairs

    first = mixed_build.manifest["graphs"]["projector"]["variant"]["calibration_cache"]
    assert first["reused"] is False and Path(first["file"]).is_file()
    again = build(tiny_model_dir("llava-llama"), tmp_path / "again",
                  BuildOptions(precision=parse_precision("projector=int8"), parity_new_tokens=4))
    assert again.manifest["graphs"]["projector"]["variant"]["calibration_cache"] == {"file": first["file"], "reused": True}
    assert again.manifest["parity"]["passed"]

    # the key, without more builds: the fp32 graphs of the plain tiny build stand in for the exported ones
    fp32 = tiny_build("llava-llama")
    graph = fp32.path / fp32.manifest["graphs"]["projector"]["file"]
    source = fp32.manifest["source"]["sha256"]
    pairs = default_pairs()
    key = cache_path("projector", graph, source, pairs, "minmax")
    assert key == cache_path("projector", graph, source, pairs, "minmax")
    others = {cache_path("projector", graph, source, pairs, "percentile"),
              cache_path("projector", graph, source, pairs[:-1], "minmax"),
              cache_path("projector", graph, source, [*pairs[:-1], CalibrationPair(pairs[-1].image, "Other?")], "minmax"),
              cache_path("projector", graph, {**source, "model.safetensors": "0" * 64}, pairs, "minmax"),
              cache_path("projector", fp32.path / fp32.manifest["graphs"]["vision_encoder"]["file"], source, pairs,
                         "minmax")}
    assert key not in others and len(others) == 5
    broken = Path(first["file"])
    broken.write_text('{"truncated')
    _drop_if_unreadable(broken)
    assert not broken.exists()


def test_lm_head_choice_checked_before_export():
    with pytest.raises(ExportError, match="does not go with the int8 decoder"):
        BuildOptions(precision=parse_precision("decoder=int8"), precision_options=PrecisionOptions(lm_head="w4"))
    with pytest.raises(ExportError, match="symmetric weights only"):
        PrecisionOptions(weight_form="dequantize", weight_scheme="asymmetric")
    assert PrecisionOptions(weight_form="dequantize").scheme == "symmetric"
    assert PrecisionOptions().scheme == "asymmetric"


def test_weight_forms_follow_their_target():
    """Each weight form's defaults are what its target builds (ONNX Runtime: blocks of 32, measured
    best there, w8 head; TensorRT: int4 blocks of 128, or 64 where K needs it, and a w4 head), and
    what TensorRT cannot build is refused when the options are made, before any export."""
    ort_form, trt_form = PrecisionOptions(), PrecisionOptions(weight_form="dequantize")
    assert (ort_form.block_size, ort_form.block, ort_form.block_sizes, ort_form.head_precision("w4")) == (
        None, 32, (32,), "w8")
    assert (trt_form.block_size, trt_form.block, trt_form.block_sizes, trt_form.head_precision("w4")) == (
        None, 128, (128, 64), "w4")
    assert PrecisionOptions(weight_form="dequantize", block_size=64).block_sizes == (64,)
    assert PrecisionOptions(block_size=64).block_sizes == (64,)
    # the weight form has no say over an int8 decoder (w8 applies to its ONNX Runtime form only)
    assert trt_form.head_precision("int8") == "w8"
    for size in (32, 256):
        with pytest.raises(ExportError, match=f"block size {size} does not build on TensorRT, whose int4 blocks are "
                                              "64 or 128; choose --block-size 128"):
            PrecisionOptions(weight_form="dequantize", block_size=size)
    with pytest.raises(ExportError, match="power of two >= 16"):
        PrecisionOptions(block_size=24)
    trt = PrecisionOptions(weight_form="dequantize")
    with pytest.raises(ExportError, match="a w8 decoder has no TensorRT .* choose decoder=w4, or --weight-form matmulnbits"):
        BuildOptions(precision=parse_precision("decoder=w8"), precision_options=trt)
    with pytest.raises(ExportError, match="lm-head 'w8' does not go with the w4 decoder in the dequantize .* choose fp32 or w4"):
        BuildOptions(precision=parse_precision("decoder=w4"),
                     precision_options=PrecisionOptions(weight_form="dequantize", lm_head="w8"))
    BuildOptions(precision=parse_precision("decoder=w8"))  # ONNX Runtime's form keeps w8 and its w8 head
    BuildOptions(precision=parse_precision("decoder=w4"), precision_options=PrecisionOptions(lm_head="w8"))


def test_int8_keeps_biases_float(tmp_path):
    """Biased Conv and Gemm under int8 Q/DQ: the biases stay float inputs of Conv/Gemm, with no INT32
    DequantizeLinear (TensorRT's parser rejects one), and ONNX Runtime runs it close to fp32."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from vlm_export.precision.convert import to_int8

    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((16, 3, 8, 8)) * 0.1, "b": rng.standard_normal(16) * 0.1,
             "shape": np.array([-1, 16 * 4 * 4]), "gw": rng.standard_normal((16 * 4 * 4, 24)) * 0.05,
             "gb": rng.standard_normal(24) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], strides=[8, 8], name="patch"),
             helper.make_node("Reshape", ["c", "shape"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "gw", "gb"], ["y"], name="proj")]
    graph = helper.make_graph(nodes, "biased", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 24])],
                              [numpy_helper.from_array(v.astype(np.int64 if k == "shape" else np.float32), k)
                               for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "fp32.onnx")
    feeds = [{"x": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)} for _ in range(4)]
    # the options of a build whose decoder goes w4 to TensorRT: the LM-head choice must not touch an image stage
    options = PrecisionOptions(weight_form="dequantize", lm_head="w4")
    info = to_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", feeds, options)
    assert info.details["bias"] == "float"
    model = onnx.load(str(tmp_path / "int8.onnx"))
    types = {i.name: i.data_type for i in model.graph.initializer}
    dq_inputs = [types.get(n.input[0]) for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert TensorProto.INT8 in dq_inputs and TensorProto.INT32 not in dq_inputs
    by_name = {n.name: n for n in model.graph.node}
    assert (by_name["patch"].input[2], by_name["proj"].input[2]) == ("b", "gb")
    assert types["b"] == types["gb"] == TensorProto.FLOAT
    x = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
    ref, got = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                for f in ("fp32.onnx", "int8.onnx"))
    assert np.dot(ref.ravel(), got.ravel()) / (np.linalg.norm(ref) * np.linalg.norm(got)) >= 0.99


def test_accuracy_gate_failure_is_reported_not_shipped(tiny_model_dir, tmp_path):
    """A build whose task accuracy falls more than allowed fails like a parity failure: nothing
    usable at --out, the report (with the gate's verdict) in <out>.failed/. A tiny random model
    answers nothing right, so a negative allowed drop forces the failure."""
    from PIL import Image

    from vlm_export.compare.accuracy import AccuracyCheck
    from vlm_export.errors import ParityError

    folder = tmp_path / "vqa"
    folder.mkdir()
    lines = []
    for i, colour in enumerate(("red", "green", "blue")):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "question": "What color is it?", "answer": colour}))
    (folder / "questions.jsonl").write_text("\n".join(lines))
    options = BuildOptions(parity_new_tokens=4, accuracy=AccuracyCheck(str(folder), questions=3, max_drop_points=-1))
    with pytest.raises(ParityError, match="task accuracy: onnxruntime 0.0% vs torch 0.0%.*at most -1 allowed"):
        build(tiny_model_dir("llava-llama"), tmp_path / "gated", options)
    assert not (tmp_path / "gated").exists()
    report = json.loads((tmp_path / "gated.failed" / "report.json").read_text())
    assert report["task_accuracy"]["questions"] == 3 and report["task_accuracy"]["gate"]["passed"] is False
    assert "Accuracy gate" in (tmp_path / "gated.failed" / "report.md").read_text()


def test_tensorrt_weight_form_builds_and_runs_on_onnxruntime(tiny_model_dir, tmp_path):
    """--weight-form dequantize gives what TensorRT builds: W4A16 (the decoder in fp16 with fp32
    islands and fp32 inputs/outputs, int4 weights with fp16 scales, block-wise DequantizeLinear at
    opset 21 feeding fp16 MatMuls), blocks of 128 along K or 64 where K is 64 (the tiny decoder has
    both); here it is checked, run and gated on ONNX Runtime like any variant. The LM head is kept
    fp32 (--lm-head fp32): with the default int4 head this random tiny model's prefill logits reach
    cosine 0.989, under the 0.99 gate (the int4 blocks cost it, not fp16: the fp16 decoder alone
    gives 1.0); the default head's graph is run in test_weight_only."""
    from vlm_export.engines.tensorrt import builder_settings

    options = BuildOptions(precision=parse_precision("decoder=w4"), parity_new_tokens=4,
                           precision_options=PrecisionOptions(weight_form="dequantize", lm_head="fp32"))
    result = build(tiny_model_dir("prefix-llama"), tmp_path / "trt-form", options)
    graph = result.manifest["graphs"]["lm_decoder"]
    variant = graph["variant"]
    assert (variant["form"], variant["scheme"], variant["lm_head"], variant["activations"], variant["scales"],
            variant["io"], variant["block_size"]) == ("dequantize", "symmetric", "fp32", "fp16", "fp16", "fp32", 128)
    assert set(variant["block_sizes"]) == {"128", "64"} and sum(variant["block_sizes"].values()) == variant[
        "quantized_matmuls"]
    assert "Softmax" in variant["fp32_islands"]
    model = onnx.load(str(result.path / graph["file"]))
    inferred = onnx.shape_inference.infer_shapes(model)
    dtype = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input,
                                                            *inferred.graph.output]}
    dtype.update({i.name: i.data_type for i in model.graph.initializer})
    shape = {i.name: list(i.dims) for i in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == variant["quantized_matmuls"]
    for node in dq:
        attrs = {a.name: a.i for a in node.attribute}
        k = shape[node.input[0]][0]
        assert attrs["axis"] == 0 and attrs["block_size"] == (128 if k % 128 == 0 else 64), node.name
        assert shape[node.input[1]] == [k // attrs["block_size"], shape[node.input[0]][1]]
        assert (dtype[node.input[0]], dtype[node.input[1]], dtype[node.output[0]]) == (
            onnx.TensorProto.INT4, onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT16), node.name
    consumers = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in {d.output[0] for d in dq}]
    assert len(consumers) == len(dq)
    assert all(dtype.get(name) == onnx.TensorProto.FLOAT16 for n in consumers for name in [*n.input, *n.output])
    assert {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]} <= {
        onnx.TensorProto.FLOAT, onnx.TensorProto.INT64}
    head = next(n for n in model.graph.node if n.name in variant["kept_fp32"])  # the kept head stays fp32
    assert head.op_type == "MatMul" and all(dtype[name] == onnx.TensorProto.FLOAT for name in [*head.input, *head.output])
    assert {o.domain: o.version for o in model.opset_import}[""] >= 21
    assert not any(n.op_type == "MatMulNBits" for n in model.graph.node)
    assert result.manifest["parity"]["passed"]
    assert builder_settings(graph["precision"], variant).strongly_typed


def _prefill_feeds(build, prompts):
    """Real prefill feeds of a build: one small photo-like image and each prompt, through its own
    image stages and decoding scheme (what the int8 calibration also feeds the decoder)."""
    from PIL import Image

    pipe = open_build(build.path)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))
    image_input = pipe.encode_images(pipe.pixel_values([image]), prompt=prompts[0])
    return [pipe.scheme.prefill_feeds([pipe.prompt_ids(p, 1)], image_input) for p in prompts]


def _run(path_or_model, feeds, optimize: bool = True):
    """Every output of the graph per feed; ``optimize=False``: the graph's own arithmetic, without
    ONNX Runtime's fusions (which turn Q/DQ -> MatMul into its own integer kernels)."""
    import onnxruntime as ort

    model = path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto) else str(path_or_model)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [dict(zip([o.name for o in session.get_outputs()], session.run(None, {n: f[n] for n in names})))
            for f in feeds]


@pytest.mark.parametrize("form", ["standard", "fused"])
def test_smoothing_is_exact_in_fp32(tiny_build, form):
    """SmoothQuant's scales folded into the norms (and, for the MLP's down projection, the up
    projection's columns) and into the MatMul weights leave the fp32 decoder's function unchanged:
    logits and KV within 1e-4 of the original, on prompts other than those calibrated on - while
    the weights did change and the largest activation range shrank."""
    from vlm_export.precision import smoothquant as sq
    from vlm_export.precision.convert import lm_head_nodes

    build = tiny_build("llava-llama")
    graph = build.manifest["graphs"]["lm_decoder"]
    path = build.path / (graph["forms"]["fused"]["file"] if form == "fused" else graph["file"])
    original = onnx.load(str(path))
    layers = sum(i.name.startswith("past_key_values") for i in original.graph.input) // 2
    calibration = _prefill_feeds(build, ["Describe this image.", "What colour is it?"])
    held_out = _prefill_feeds(build, ["How many shapes are there?", "Is it big or small?"])
    keep = lm_head_nodes(original)
    smoothed = onnx.ModelProto()
    smoothed.CopyFrom(original)
    tensors = sorted({g.tensor for g in sq.groups(smoothed, keep)})
    info = sq.smooth(smoothed, sq.channel_maxima(smoothed, tensors, calibration), 0.5, keep)
    # q/k/v and gate/up read a norm (folded into its weight), down reads silu(gate) * up (folded into up's
    # columns); only the attention output projection has nothing linear to fold into
    assert info["smoothed_inputs"] == {"norm_or_scale": 2 * layers, "linear_columns": layers}
    assert len(info["unsmoothed_matmuls"]) == layers
    assert info["activation_max_after"] < info["activation_max_before"]
    weights = {i.name: numpy_helper.to_array(i) for i in original.graph.initializer}
    changed = {i.name for i in smoothed.graph.initializer
               if i.name in weights and not np.allclose(numpy_helper.to_array(i), weights[i.name], rtol=1e-3)}
    assert {n.input[1] for g in sq.groups(original, keep) if g.fold for n in g.matmuls} <= changed
    for want, got in zip(_run(original, held_out), _run(smoothed, held_out)):
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, atol=1e-4, rtol=1e-4, err_msg=name)


KERNELS = ["u8u8", pytest.param("u8s8", marks=pytest.mark.skipif(
    not int8_dot_product(), reason="U8S8 saturates on a CPU without VNNI/AMX (the build refuses it there)"))]


@pytest.mark.parametrize("kernel", KERNELS)
def test_per_token_activations_keep_small_rows(tmp_path, kernel):
    """Each token row gets its own scale: a row 10,000x larger than the others (LLM decoders' first
    token) leaves the other rows' products within int8 rounding of fp32, in both written forms (ONNX
    Runtime's MatMulIntegerToFloat with either kernel, and standard Q/DQ for TensorRT); one scale for
    the whole tensor would round those rows to nothing. The large row is within rounding too: its codes
    span the whole int8 range, where U8S8 saturates on an AVX2-only CPU (22% error on that row)."""
    from onnx import TensorProto, helper

    from vlm_export.cpu import INT8_DOT_PRODUCT_METADATA
    from vlm_export.precision.smoothquant import per_token_int8

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "s", 32])],
                              [numpy_helper.from_array(w, "w")])
    x = rng.standard_normal((1, 6, 64)).astype(np.float32)
    x[0, 0] *= 10_000
    want = x @ w
    ops = {}
    for form in ("onnxruntime", "qdq"):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        assert per_token_int8(model, (), form, kernel) == 1
        onnx.checker.check_model(model)
        metadata = {p.key: p.value for p in model.metadata_props}
        assert (INT8_DOT_PRODUCT_METADATA in metadata) == (form == "onnxruntime" and kernel == "u8s8")
        if form == "onnxruntime":  # the weights' codes: int8 for U8S8, uint8 + 128 for U8U8
            codes = next(i for i in model.graph.initializer if i.name == "proj_Wq")
            assert codes.data_type == (TensorProto.INT8 if kernel == "u8s8" else TensorProto.UINT8)
        ops[form] = {n.op_type for n in model.graph.node}
        # the Q/DQ form is TensorRT's: its own arithmetic is checked (ONNX Runtime's CPU fusion of it
        # lands on the U8S8 kernel, saturating like the one the onnxruntime form avoids)
        got = _run(model, [{"x": x}], optimize=form == "onnxruntime")[0]["y"]
        for row in range(6):
            error = np.abs(got[0, row] - want[0, row]).max() / np.abs(want[0, row]).max()
            assert error < 0.03, (form, row, error)
    assert "MatMulIntegerToFloat" in ops["onnxruntime"] and "MatMul" not in ops["onnxruntime"]
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= ops["qdq"] and "MatMulIntegerToFloat" not in ops["qdq"]


def test_int8_decoder_keeps_its_logits(tiny_model_dir, tmp_path, calibration_cache):
    """decoder=int8 builds SmoothQuant + per-token dynamic int8 in both decoder forms (ONNX Runtime's
    integer GEMM in the fused form, symmetric Q/DQ in the standard one), each within the int8 gate of
    PyTorch's logits (the report's prefill and decode cosines), with the manifest saying how."""
    result = build(tiny_model_dir("llava-llama"), tmp_path / "int8",
                   BuildOptions(precision=parse_precision("decoder=int8"), parity_new_tokens=4))
    graph = result.manifest["graphs"]["lm_decoder"]
    fused, standard = graph["forms"]["fused"], graph
    ort_kernel = "U8S8" if int8_dot_product() else "U8U8"  # --int8-kernel auto: what is exact on this CPU
    for entry, form, kernel in ((fused, "onnxruntime", f"MatMulIntegerToFloat ({ort_kernel})"),
                                (standard, "qdq", "DequantizeLinear -> MatMul")):
        variant = entry["variant"]
        assert (variant["method"], variant["alpha"], variant["form"], variant["activations"], variant["kernel"]) == (
            "smoothquant", 0.5, form, "int8 dynamic per-token", kernel)
        assert variant["quantized_matmuls"] > 0 and variant["smoothing"]["smoothed_inputs"]["norm_or_scale"] > 0
        assert variant["calibration_samples"] > 0 and variant["calibration_cache"]["reused"] is False
        # GPTQ picked the codes (the default), every quantized MatMul's input measured
        assert variant["rounding"]["method"] == "gptq" and variant["rounding"]["calibration_tokens"] > 0
        fallback = variant["fp32_fallback"]  # auto: trials until the calibration logits reach the gate
        assert fallback["setting"] == "auto" and fallback["trials"]
        assert len(fallback["kept"]) == fallback["trials"][-1]["fp32_matmuls"] or \
            fallback["trials"][-1]["min_cosine"] < fallback["target_cosine"]
        assert ("requires_cpu" in variant) == (kernel == "MatMulIntegerToFloat (U8S8)")
        assert entry["precision"] == "int8"
    # the standard graph only TensorRT serves: its fallback and its parity run its Q/DQ as written
    assert standard["variant"]["fallback_judged_on"].startswith("Q/DQ run as written")
    assert fused["variant"]["fallback_judged_on"] == "ONNX Runtime's int8 kernels"
    emulated = {form: {stage: r.emulates_qdq for stage, r in open_build(result.path, form=form).runners.items()}
                for form in ("onnxruntime", "standard")}
    assert emulated == {"onnxruntime": {"vision_encoder": False, "projector": False, "lm_decoder": False},
                        "standard": {"vision_encoder": False, "projector": False, "lm_decoder": True}}
    ops = {n.op_type for n in onnx.load(str(result.path / fused["file"])).graph.node}
    assert "MatMulIntegerToFloat" in ops and "GroupQueryAttention" in ops
    standard_ops = onnx.load(str(result.path / standard["file"])).graph.node
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in standard_ops}
    assert not [n for n in standard_ops if n.domain not in ("", "ai.onnx")]  # TensorRT reads standard ops only
    report = json.loads((result.path / "report.json").read_text())
    assert report["passed"]
    for entry in ("prefill", "decode", "prefill (standard form)", "decode (standard form)"):
        assert report["stages"][entry]["logits"]["cosine"] >= 0.99, entry
    # Triton's onnxruntime backend (ONNX Runtime 1.19.2) gets the standard form, judged as written: the note says so
    from vlm_export.model_repository.render import RepositoryOptions, render_repository

    notes = []
    render_repository(result.path, tmp_path / "repo", RepositoryOptions(target="onnxruntime"), echo=notes.append)
    assert any(n.startswith("lm_decoder: Triton's onnxruntime backend gets its standard Q/DQ form (it cannot load "
                            "the fused one)") and "python target" in n for n in notes), notes


def test_a_parity_failure_names_what_to_try_for_each_reduced_precision_stage_at_fault():
    from vlm_export.build import _remedies

    precisions = {"vision_encoder": "fp16", "projector": "fp32", "lm_decoder": "w4"}
    decoder_only = _remedies(["prefill (standard form)/logits: cosine 0.97 < 0.99", "decode/logits: cosine 0.9"],
                             precisions, "lm_decoder")
    assert decoder_only.startswith(". To try for lm_decoder (w4): round by GPTQ (--weight-rounding gptq), smaller "
                                   "blocks (--block-size 16)") and decoder_only.endswith(" or w8")
    assert "vision_encoder" not in decoder_only
    # only what the build did not take, and what its form accepts (TensorRT's: no other blocks, no w8)
    taken = _remedies(["decode/logits: cosine 0.9"], precisions, "lm_decoder",
                      PrecisionOptions(weight_rounding="gptq", weight_activations="fp32", lm_head="fp32"))
    assert taken == ". To try for lm_decoder (w4): smaller blocks (--block-size 16) or w8"
    tensorrt = _remedies(["decode/logits: cosine 0.9"], precisions, "lm_decoder",
                         PrecisionOptions(weight_form="dequantize"))
    assert "--block-size" not in tensorrt and "--weight-activations" not in tensorrt and " w8" not in tensorrt
    assert tensorrt.endswith("or ONNX Runtime's form (--weight-form matmulnbits), which takes the rest")
    assert _remedies(["projector/embeds: max abs diff 1 > 0.001"], precisions, "lm_decoder") == ""  # fp32: a bug
    both = _remedies(["task accuracy: onnxruntime 40.0% vs torch 50.0% on the same 10 easy-vqa questions, ..."],
                     precisions, "lm_decoder")
    assert "vision_encoder (fp16): keep the nodes" in both and "lm_decoder (w4)" in both
    # int8: the image stages' advice once for both, the decoder's its own (its ranges are no calibration method's)
    int8 = _remedies(["task accuracy: onnxruntime 86.7% vs torch 90.0% ..."],
                     dict.fromkeys(("vision_encoder", "projector", "lm_decoder"), "int8"), "lm_decoder")
    image, decoder = int8.split(". To try for ")[1:]
    assert image.startswith("vision_encoder, projector (int8): ") and "--calibration percentile|entropy" in image
    assert "--int8-fp32-matmuls N: the N worst; auto stops at a quarter" in image and image.endswith("fp16 for this stage")
    assert decoder.startswith("lm_decoder (int8): ") and "--calibration " not in decoder.replace("--calibration-", "")
    assert "--int8-fp32-matmuls N" in decoder and decoder.endswith("or w8 for the decoder")


def test_opts_gemm_layers_are_quantized_and_nothing_is_left_float_unsaid(tiny_model_dir, tmp_path):
    """BLIP-2's OPT decoder: its MLP exports as Gemm (fc1 / fc2 read 2-D hidden states), which the w4
    quantizer once passed over in silence (two thirds of each layer's weights left fp32 in a "w4"
    build). Now no Gemm multiplies by float weights, and the manifest counts what stayed float: none."""
    result = build(tiny_model_dir("blip2-opt"), tmp_path / "w4",
                   BuildOptions(precision=parse_precision("decoder=w4"), parity_new_tokens=4))
    entry = result.manifest["graphs"]["lm_decoder"]
    model = onnx.load(str(tmp_path / "w4" / entry["file"]), load_external_data=False)
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2}
    assert not [n.name for n in model.graph.node if n.op_type == "Gemm" and n.input[1] in floats]
    assert entry["variant"]["weights_missed"]["tensors"] == 0
    layers = json.loads((tiny_model_dir("blip2-opt") / "config.json").read_text())["text_config"]["num_hidden_layers"]
    # per layer q/k/v (packed or not), out, fc1, fc2; and the head (before: fc1 and fc2 missing)
    assert entry["variant"]["quantized_matmuls"] >= 4 * layers + 1


@pytest.mark.parametrize("name", ["blip2-opt", "blip2-t5", "florence2", "mllama", "prefix-llama"])
def test_int8_decoder_of_every_family_is_built_or_refused_by_its_gate(tiny_model_dir, tmp_path, name):
    """decoder=int8 with its defaults (GPTQ codes, fp32 fallback, w8 head in the ONNX Runtime form) on
    each other adapter family's tiny random decoder (OPT, T5's encoder-decoder, BART, cross-attention
    Llama, prefix Llama): either a build whose int8 forms say how they were made, or the parity gate's
    refusal with its numbers (the tiny T5's random activations do not survive int8; seen: decode logits
    cosine 0.03-0.39), never another error."""
    from vlm_export.errors import ParityError

    try:
        result = build(tiny_model_dir(name), tmp_path / "int8",
                       BuildOptions(precision=parse_precision("decoder=int8"), parity_new_tokens=4))
    except ParityError as e:
        assert str(e).startswith("parity failed for") and "cosine" in str(e)
        assert (tmp_path / "int8.failed" / "report.json").exists()
        assert ". To try for lm_decoder (int8): calibrate on your own pairs" in str(e)
        return
    decoder = next(e for e in result.manifest["graphs"].values() if e["precision"] == "int8")
    fused = (decoder.get("forms") or {}).get("fused")
    for entry in [decoder] + ([fused] if fused else []):
        assert entry["variant"]["rounding"]["method"] == "gptq"
        if name == "blip2-opt":  # its MLP's Gemms are smoothed and quantized too
            assert entry["variant"]["weights_missed"]["tensors"] == 0
    assert decoder["variant"]["lm_head"].startswith("fp32")  # the standard (TensorRT) form: no w8 blocks
    if fused:
        assert fused["variant"]["lm_head"].startswith("w8 (MatMulNBits")


@pytest.mark.parametrize("form", ["matmulnbits", "dequantize"])
def test_gptq_rounding_brings_the_decoder_closer(tiny_build, tmp_path, form):
    """decoder w4 with GPTQ's codes (calibrated on real prefill feeds of the build) gives logits
    closer to the fp32 decoder's than round to nearest on prompts it was not calibrated on, in the
    same format (the same quantized nodes, scales and zero points), in ONNX Runtime's form (zero
    points) and TensorRT's (symmetric fp16 W4A16); the variant records how its codes were picked.
    Without calibration inputs GPTQ is refused, not silently rounded to nearest."""
    from vlm_export.precision.convert import to_weight_only

    build = tiny_build("llava-llama")
    graph = build.manifest["graphs"]["lm_decoder"]
    src = build.path / (graph["forms"]["fused"]["file"] if form == "matmulnbits" else graph["file"])
    calibration = _prefill_feeds(build, ["Describe this image.", "What colour is it?", "What is in the picture?",
                                         "Is there a circle?", "Where is the shape?", "Name the object."])
    held_out = _prefill_feeds(build, ["How many shapes are there?", "Is it big or small?"])
    want = _run(src, held_out)
    scheme = "zero-point" if form == "matmulnbits" else "symmetric"
    quantized = {"matmulnbits": ("MatMulNBits", 1, (2, 3)), "dequantize": ("DequantizeLinear", 0, (1,))}[form]
    errors, graphs = {}, {}
    for method in ("rtn", "gptq"):
        options = PrecisionOptions(weight_scheme=scheme, weight_form=form, weight_rounding=method)
        info = to_weight_only(src, tmp_path / f"{method}.onnx", 4, options, calibration)
        assert info.details["rounding"]["method"] == method
        got = _run(tmp_path / f"{method}.onnx", held_out)
        errors[method] = np.mean([np.mean((g["logits"] - w["logits"]) ** 2) for g, w in zip(got, want)])
        graphs[method] = onnx.load(str(tmp_path / f"{method}.onnx"))
    assert info.details["rounding"]["calibration_tokens"] == sum(f["input_ids"].size for f in calibration)
    assert errors["gptq"] < 0.8 * errors["rtn"], errors
    inits = {m: {i.name: numpy_helper.to_array(i) for i in g.graph.initializer} for m, g in graphs.items()}
    op, codes, same = quantized
    nodes = [n for n in graphs["gptq"].graph.node if n.op_type == op]
    assert nodes and [n.name for n in nodes] == [n.name for n in graphs["rtn"].graph.node if n.op_type == op]
    for node in nodes:
        for i in same:
            np.testing.assert_array_equal(inits["gptq"][node.input[i]], inits["rtn"][node.input[i]])
    assert any(not np.array_equal(inits["gptq"][n.input[codes]], inits["rtn"][n.input[codes]]) for n in nodes)
    with pytest.raises(ExportError, match="GPTQ rounding of .* needs calibration inputs"):
        to_weight_only(src, tmp_path / "none.onnx", 4, PrecisionOptions(weight_rounding="gptq"), None)


def test_a_kept_node_the_quantized_graphs_lack_is_named(tmp_path):
    from onnx import TensorProto, helper

    from vlm_export.build import _check_kept_nodes

    def save(name: str, nodes: list[str]) -> dict:
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["x"], name=n) for n in nodes], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])], [])
        onnx.save(helper.make_model(graph), str(tmp_path / name))
        return {"file": name}

    graphs = {"vision_encoder": save("v.onnx", ["conv"]), "lm_decoder": save("d.onnx", ["mm_q"])}
    fused = {"lm_decoder": save("f.onnx", ["mm_qkv"])}
    precisions = {"vision_encoder": "fp32", "lm_decoder": "w4"}
    _check_kept_nodes(tmp_path, graphs, fused, precisions, ("mm_q", "mm_qkv"))  # either form's names
    with pytest.raises(BuildError, match="^--keep-node mm_k, conv: no node of that name in the lm_decoder graph"):
        _check_kept_nodes(tmp_path, graphs, fused, precisions, ("mm_q", "mm_k", "conv"))  # conv: an fp32 stage's
