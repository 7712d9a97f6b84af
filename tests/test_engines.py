"""TensorRT engines: what can be checked without TensorRT (profiles from limits, precision to
builder flags, clear refusals) runs everywhere; building and running plans needs TensorRT and a
GPU and is skipped elsewhere with the reason."""
from __future__ import annotations

import importlib.util

import pytest

from vlm_export.engines.profiles import dim_ranges, stage_profiles
from vlm_export.engines.tensorrt import builder_settings, build_engines
from vlm_export.errors import BuildError
from vlm_export.manifest import read_manifest

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_profiles_follow_the_limits(tiny_build):
    manifest = read_manifest(tiny_build("llava-llama").path)
    limits = manifest["limits"]
    vision = stage_profiles(manifest, "vision_encoder")
    assert len(vision) == 1
    lo, opt, hi = vision[0]["pixel_values"]
    assert lo == (1, 3, 32, 32) and hi == (limits["max_images_per_batch"], 3, 32, 32)
    assert lo[0] <= opt[0] <= hi[0]
    prefill, decode = stage_profiles(manifest, "lm_decoder")
    assert prefill["input_ids"][2] == (limits["max_batch"], limits["max_sequence"])
    assert prefill["past_key_values.0.key"][2][2] == 0  # prefill starts from an empty cache
    assert prefill["image_embeds"][2][0] == limits["max_image_tokens"] * limits["max_batch"]
    assert decode["input_ids"][0] == (1, 1) and decode["input_ids"][2] == (limits["max_batch"], 1)
    assert decode["attention_mask"][2][1] == limits["max_sequence"]
    assert decode["past_key_values.1.value"][2][2] == limits["max_sequence"] - 1
    for profile in (prefill, decode):
        for lo, opt, hi in profile.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))


def test_unbounded_dynamic_dim_is_refused(tiny_build):
    manifest = read_manifest(tiny_build("llava-llama").path)
    manifest["graphs"]["projector"]["inputs"][0]["shape"][1] = "patches"
    with pytest.raises(BuildError, match="'patches'"):
        stage_profiles(manifest, "projector")


def test_builder_settings_per_precision():
    assert builder_settings("fp16").fp16 and not builder_settings("fp16").strongly_typed
    assert builder_settings("int8").strongly_typed  # Q/DQ graphs: TensorRT follows the graph's precisions
    with pytest.raises(BuildError, match="--weight-form dequantize"):
        builder_settings("w4", {"form": "matmulnbits"})
    # int4 weights in the dequantize form build strongly typed; block-wise int8 ones (the default w8
    # LM head) have no TensorRT engine: TensorRT's weight-only quantization is int4 only
    assert builder_settings("w4", {"form": "dequantize", "bits": 4, "lm_head": "w4"}).strongly_typed
    with pytest.raises(BuildError, match="block-wise int8 weights"):
        builder_settings("w4", {"form": "dequantize", "bits": 4, "lm_head": "w8"})


def test_dim_ranges_cover_every_declared_stage(tiny_build):
    manifest = read_manifest(tiny_build("llava-llama").path)
    ranges = dim_ranges(manifest)
    assert list(ranges) == [s["name"] for s in manifest["stages"]] == ["vision_encoder", "projector", "lm_decoder"]
    assert len(ranges["lm_decoder"]) == 2  # the scheme's prefill and decode profiles


@pytest.mark.skipif(HAS_TRT, reason="checks the refusal on machines without TensorRT")
def test_engines_refused_without_tensorrt(tiny_build):
    with pytest.raises(BuildError, match="TensorRT is not installed"):
        build_engines(tiny_build("llava-llama").path)


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and a CUDA GPU (not installable on the CI machines)")
def test_engines_build_and_match_onnxruntime(tiny_build, tmp_path):  # pragma: no cover - runs on GPU machines only
    import shutil

    import numpy as np

    from vlm_export.engines.tensorrt import TensorRTRunner
    from vlm_export.runtime.load import open_build

    build_dir = tmp_path / "build"  # engines and a rewritten manifest go into a copy, not the shared build
    shutil.copytree(tiny_build("llava-llama").path, build_dir)
    engines = build_engines(build_dir)
    pipe = open_build(build_dir)
    manifest = read_manifest(build_dir)
    vision = TensorRTRunner("vision_encoder", build_dir / engines["vision_encoder"]["file"], ["pixel_values"],
                            ["image_features"])
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    ref = pipe.runners["vision_encoder"].infer({"pixel_values": pixels})["image_features"]
    got = vision.infer({"pixel_values": pixels})["image_features"]
    assert np.abs(ref - got).max() < 1e-3
    assert manifest["engines"]["lm_decoder"]["profiles"]
