"""TensorRT code that is plain Python, run here without TensorRT: the optimization profile a real
feed runs in, a plan made for another GPU or TensorRT refused before it loads, and the graph forms
TensorRT cannot build refused before anything is built (or installed)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vlm_export.engines.profiles import stage_profiles
from vlm_export.engines.tensorrt import BuilderSettings, build_engines, builder_settings, check_metadata, profile_for
from vlm_export.errors import BuildError, RunnerError
from vlm_export.manifest import read_manifest, write_manifest
from vlm_export.runtime.load import open_build

H100 = {"tensorrt": "10.5.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}


def plan_profiles(manifest: dict, stage: str) -> list[dict]:
    """The profiles as a plan's metadata JSON carries them (lists, not tuples)."""
    return json.loads(json.dumps(stage_profiles(manifest, stage)))


def test_a_feed_runs_in_the_profile_that_holds_its_shapes(tiny_build):
    """Real decoder feeds of the tiny build (limits: batch 4, sequence 256, 2 images of 16 tokens):
    prefill from an empty cache -> profile 0, a decode step on a cache -> profile 1, anything past
    the limits -> refused with the shapes named."""
    build = tiny_build("llava-llama").path
    manifest = read_manifest(build)
    assert {k: manifest["limits"][k] for k in ("max_batch", "max_sequence", "max_image_tokens")} == \
        {"max_batch": 4, "max_sequence": 256, "max_image_tokens": 32}
    profiles = plan_profiles(manifest, "lm_decoder")
    pipe = open_build(build)
    scheme = pipe.scheme
    ids = pipe.prompt_ids("What is in the picture?", 1)
    image = np.zeros((16, scheme.geometry.hidden_size), np.float32)  # one image's rows
    prefill = scheme.prefill_feeds([ids], image)
    assert profile_for(profiles, prefill) == 0
    assert profile_for(profiles, scheme.prefill_feeds([ids] * 2, np.concatenate([image] * 2))) == 0
    state = scheme.prefill_state(pipe.decode(prefill), [len(ids)])
    step = scheme.step_feeds(state, np.array([5]))
    assert profile_for(profiles, step) == 1
    # the last step the limits allow: 255 cached tokens
    last = {**step, **{n: np.zeros(v.shape[:2] + (255,) + v.shape[3:], np.float32)
                       for n, v in step.items() if n.startswith("past_key_values")},
            "attention_mask": np.ones((1, 256), np.int64)}
    assert profile_for(profiles, last) == 1

    too_long = {**last, **{n: np.zeros(v.shape[:2] + (256,) + v.shape[3:], np.float32)
                           for n, v in last.items() if n.startswith("past_key_values")},
                "attention_mask": np.ones((1, 257), np.int64)}
    with pytest.raises(RunnerError, match=r"lm_decoder: input shapes .*outside every optimization profile"):
        profile_for(profiles, too_long, "lm_decoder")
    with pytest.raises(RunnerError, match="outside every optimization profile"):  # batch 5 > max_batch 4
        profile_for(profiles, scheme.prefill_feeds([ids] * 5, np.concatenate([image] * 5)), "lm_decoder")
    with pytest.raises(RunnerError, match="outside every optimization profile"):  # 3 images' rows for 1 row
        profile_for(profiles, {**prefill, scheme.image_input.name: np.concatenate([image] * 160)})

    vision = plan_profiles(manifest, "vision_encoder")
    pixels = np.zeros((manifest["limits"]["max_images_per_batch"], 3, 32, 32), np.float32)
    assert profile_for(vision, {"pixel_values": pixels}) == 0
    with pytest.raises(RunnerError):
        profile_for(vision, {"pixel_values": np.concatenate([pixels, pixels[:1]])})
    with pytest.raises(RunnerError):  # the wrong image size
        profile_for(vision, {"pixel_values": np.zeros((1, 3, 64, 64), np.float32)})


def test_a_plan_for_another_machine_is_refused_before_loading(tmp_path):
    plan = tmp_path / "lm_decoder.plan"
    check_metadata({**H100, "precision": "fp32"}, plan, here=H100)  # the machine it was built on
    for key, value in (("gpu", "NVIDIA L4"), ("compute_capability", "8.9"), ("tensorrt", "10.7.0")):
        with pytest.raises(RunnerError, match=rf"lm_decoder.plan was built for {key} '{H100[key]}', "
                                              rf"this machine has '{value}'; rebuild the engines here"):
            check_metadata(H100, plan, here={**H100, key: value})
    with pytest.raises(RunnerError, match="built for tensorrt None"):  # metadata without a version
        check_metadata({"gpu": H100["gpu"]}, plan, here=H100)


@pytest.mark.parametrize("precision,variant,settings", [
    ("fp32", None, BuilderSettings(fp16=False, strongly_typed=False)),
    ("fp16", None, BuilderSettings(fp16=True, strongly_typed=False)),
    ("int8", {"format": "QDQ"}, BuilderSettings(fp16=False, strongly_typed=True)),
    ("w4", {"form": "dequantize", "bits": 4, "lm_head": "w4"}, BuilderSettings(fp16=False, strongly_typed=True)),
    ("w4", {"form": "dequantize", "bits": 4, "lm_head": "fp32"}, BuilderSettings(fp16=False, strongly_typed=True)),
])
def test_builder_settings_of_the_forms_tensorrt_builds(precision, variant, settings):
    assert builder_settings(precision, variant) == settings


@pytest.mark.parametrize("precision,variant,message", [
    ("w4", {"form": "matmulnbits", "bits": 4, "lm_head": "w8"}, "MatMulNBits form; rebuild with --weight-form dequantize"),
    ("w8", None, "MatMulNBits form"),
    # TensorRT's weight-only quantization is int4 only: block-wise int8 weights have no engine
    ("w8", {"form": "dequantize", "bits": 8, "lm_head": "w8"}, r"int8 weights \(decoder and LM head w8\)"),
    ("w4", {"form": "dequantize", "bits": 4, "lm_head": "w8"}, r"int8 weights \(LM head w8\).*--lm-head w4"),
])
def test_forms_tensorrt_cannot_build_are_refused(precision, variant, message):
    with pytest.raises(BuildError, match=message):
        builder_settings(precision, variant)


def test_engines_refuse_an_unbuildable_build_before_needing_tensorrt(tiny_build, tmp_path, capsys):
    """A build whose decoder is w4 in the dequantize form with the default w8 LM head: `vlm-export
    engines` says what to rebuild with, here on a machine without TensorRT, and writes nothing."""
    from vlm_export.cli import main

    build = tmp_path / "build"
    shutil.copytree(tiny_build("llava-llama").path, build)
    manifest = read_manifest(build)
    manifest["graphs"]["lm_decoder"].update(precision="w4", variant={"form": "dequantize", "bits": 4, "lm_head": "w8"})
    write_manifest(build, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    before = (build / "manifest.json").read_bytes()
    with pytest.raises(BuildError, match="block-wise int8 weights"):
        build_engines(build)
    assert main(["engines", str(build)]) == 1
    assert "--lm-head w4" in capsys.readouterr().err
    assert not (build / "engines").exists() and (build / "manifest.json").read_bytes() == before
