"""Precision variants per stage: they build, run on ONNX Runtime CPU, pass their gates, and the
manifest records how each was made."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from vlm_export.build import BuildOptions, build
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
    with pytest.raises(BuildError, match="'w3' in 'decoder=w3' is not one of fp32"):
        parse_precision("decoder=w3")
    with pytest.raises(BuildError, match="not valid for vision_encoder.*valid: vision_encoder: fp32/fp16/int8"):
        parse_precision("vision=w4").resolve(stages)
    with pytest.raises(BuildError, match="not available for vision_encoder, projector"):
        parse_precision("w4").resolve(stages)
    # a stage named explicitly takes precedence over the uniform default
    assert parse_precision("w4").resolve(stages[2:]) == {"lm_decoder": "w4"}
    with pytest.raises(BuildError, match="unknown stage.*text.*this model's stages: vision_encoder, projector"):
        parse_precision("text=fp16").resolve(stages)


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
    # only the shipped variants are in the build
    assert sorted(p.name for p in (mixed_build.path / "graphs").iterdir()) == [
        "lm_decoder.w4.onnx", "projector.int8.onnx", "vision_encoder.fp16.onnx"]
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


def test_calibration_folder(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        folder_pairs(tmp_path)
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i * 60, np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / "prompts.txt").write_text("What is it?\nDescribe it.\n")
    pairs = folder_pairs(tmp_path, tmp_path / "prompts.txt")
    assert [p.prompt for p in pairs] == ["What is it?", "Describe it.", "What is it?"]


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
    """--weight-form dequantize --lm-head w4: int4 weights + block-wise DequantizeLinear (opset 21),
    the graph TensorRT reads (its weight-only quantization is int4 only, so the head is w4 too);
    here it is checked, run and gated on ONNX Runtime like any variant."""
    from vlm_export.engines.tensorrt import builder_settings

    options = BuildOptions(precision=parse_precision("decoder=w4"), parity_new_tokens=4,
                           precision_options=PrecisionOptions(weight_form="dequantize", lm_head="w4"))
    result = build(tiny_model_dir("prefix-llama"), tmp_path / "trt-form", options)
    graph = result.manifest["graphs"]["lm_decoder"]
    assert (graph["variant"]["form"], graph["variant"]["scheme"], graph["variant"]["lm_head"]) == (
        "dequantize", "symmetric", "w4")
    model = onnx.load(str(result.path / graph["file"]))
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq and all(any(a.name == "block_size" and a.i == 32 for a in n.attribute) for n in dq)
    assert {o.domain: o.version for o in model.opset_import}[""] >= 21
    assert not any(n.op_type == "MatMulNBits" for n in model.graph.node)
    assert result.manifest["parity"]["passed"]
    assert builder_settings(graph["precision"], graph["variant"]).strongly_typed
