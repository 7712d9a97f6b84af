"""Precision variants per stage: they build, run on ONNX Runtime CPU, pass their gates, and the
manifest records how each was made."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from vlm_export.build import BuildOptions, build
from vlm_export.errors import BuildError, DatasetError
from vlm_export.precision.calibration import folder_pairs
from vlm_export.precision.spec import PrecisionPlan, parse_precision
from vlm_export.runtime.generate import GenerationConfig, generate
from vlm_export.runtime.load import open_build


def test_parse_precision():
    assert parse_precision(None) == PrecisionPlan()
    assert parse_precision("fp16") == PrecisionPlan("fp16", "fp16", "fp16")
    assert parse_precision("vision=int8,projector=fp16,decoder=w4") == PrecisionPlan("int8", "fp16", "w4")
    assert parse_precision("decoder=w8").to_dict() == {"vision_encoder": "fp32", "projector": "fp32", "lm_decoder": "w8"}
    with pytest.raises(BuildError, match="not valid for lm_decoder.*valid: vision_encoder: fp32/fp16/int8"):
        parse_precision("decoder=w3")
    with pytest.raises(BuildError, match="not available for vision_encoder, projector"):
        parse_precision("w4")
    with pytest.raises(BuildError, match="unknown stage"):
        parse_precision("text=fp16")


@pytest.fixture(scope="module")
def mixed_build(tiny_model_dir, tmp_path_factory):
    plan = parse_precision("vision=fp16,projector=int8,decoder=w4")
    out = tmp_path_factory.mktemp("precision") / "mixed"
    return build(tiny_model_dir("llava-llama"), out, BuildOptions(precision=plan, parity_new_tokens=8))


def test_mixed_precision_build(mixed_build):
    manifest = mixed_build.manifest
    assert manifest["precision"] == {"vision_encoder": "fp16", "projector": "int8", "lm_decoder": "w4"}
    graphs = manifest["graphs"]
    assert graphs["vision_encoder"]["file"] == "graphs/vision_encoder.fp16.onnx"
    assert "LayerNormalization" in graphs["vision_encoder"]["variant"]["fp32_islands"]
    assert graphs["projector"]["variant"]["format"] == "QDQ" and graphs["projector"]["variant"]["calibration_samples"] > 0
    assert graphs["lm_decoder"]["variant"]["bits"] == 4 and graphs["lm_decoder"]["variant"]["kept_fp32"]
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
    assert all("first_divergence" in r for r in report["end_to_end"]["onnxruntime"])


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
