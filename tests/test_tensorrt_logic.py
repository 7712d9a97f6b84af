"""TensorRT code that is plain Python, run here without TensorRT: the optimization profile a real
feed runs in, a plan made for another GPU or TensorRT refused before it loads, and the graph forms
TensorRT cannot build refused before anything is built (or installed)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vlm_export.contract.profiles import stage_profiles
from vlm_export.engines.tensorrt import (BuilderSettings, build_engines, builder_settings, check_metadata, profile_for,
                                         release, triton_server_args, version_problem)
from vlm_export.engines.tensorrt import TensorRTRunner
from vlm_export.errors import BuildError, RunnerError
from vlm_export.manifest import read_manifest, write_manifest
from vlm_export.runtime.load import open_build
from vlm_export.runtime.runners import Runner

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


def test_a_plan_runs_on_its_compute_capability_and_tensorrt_release(tmp_path):
    """TensorRT needs the compute capability and TensorRT release a plan was built for, not the GPU
    it was built on: a sibling SKU or a MIG slice of the same compute capability runs it."""
    plan = tmp_path / "lm_decoder.plan"
    check_metadata({**H100, "precision": "fp32"}, plan, here=H100)  # the machine it was built on
    for gpu in ("NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA H200"):  # all 9.0
        check_metadata(H100, plan, here={**H100, "gpu": gpu})
    check_metadata(H100, plan, here={**H100, "tensorrt": "10.5.0.18"})  # a container's build of the release
    with pytest.raises(RunnerError, match=r"lm_decoder.plan was built for compute capability '9.0' "
                                          r"\(NVIDIA H100 80GB HBM3\), this machine has '8.9'; rebuild the engines here"):
        check_metadata(H100, plan, here={"tensorrt": "10.5.0", "gpu": "NVIDIA L4", "compute_capability": "8.9"})
    for runtime in ("10.7.0", "10.4.1", "11.0.0"):
        with pytest.raises(RunnerError, match=rf"lm_decoder.plan: a plan built with TensorRT 10.5.0 loads only on "
                                              rf"that release, not on {runtime} .*rebuild the engines here"):
            check_metadata(H100, plan, here={**H100, "tensorrt": runtime})
    with pytest.raises(RunnerError, match="cannot compare TensorRT versions None"):  # metadata without a version
        check_metadata({"compute_capability": "9.0"}, plan, here=H100)


def test_a_version_compatible_plan_loads_on_later_releases_of_its_major_version(tmp_path):
    plan = tmp_path / "vision_encoder.plan"
    built = {**H100, "version_compatible": True}
    for runtime in ("10.5.0", "10.5.1", "10.13.2.6"):
        check_metadata(built, plan, here={**H100, "tensorrt": runtime})
    for runtime in ("10.4.0", "11.0.0"):
        with pytest.raises(RunnerError, match=rf"a version-compatible plan built with TensorRT 10.5.0 loads on that "
                                              rf"and later TensorRT 10.x releases, not on {runtime}"):
            check_metadata(built, plan, here={**H100, "tensorrt": runtime})
    with pytest.raises(RunnerError, match="compute capability"):  # version compatibility is not hardware compatibility
        check_metadata(built, plan, here={**H100, "compute_capability": "8.0"})


def test_tensorrt_releases_compare_by_major_minor_patch():
    assert release("10.7.0.23") == release("10.7.0") == release("10.7.0.post1") == (10, 7, 0)
    assert release("10.7") == (10, 7, 0) and release("ten") is None and release(None) is None
    assert version_problem("10.7.0", "10.7.0.23") is None
    assert version_problem("10.7.0", "10.8.0") and version_problem("10.7.0", "10.8.0", version_compatible=True) is None


def test_runner_outputs_survive_the_next_call():
    """Polygraphy's runners may reuse their output buffers on the next call (BaseRunner.infer's docs), and
    a decode loop keeps one step's outputs (the cache) while running the next: TensorRTRunner hands out
    copies. TensorRT cannot run here, so a stand-in with that documented behaviour plays Polygraphy's
    TrtRunner behind the real TensorRTRunner."""
    class ReusingRunner:
        buffer = np.zeros(3, np.float32)

        def infer(self, feeds):
            self.buffer[:] = feeds["x"]
            return {"y": self.buffer}

    runner = object.__new__(TensorRTRunner)
    Runner.__init__(runner, "stage", ["x"], ["y"])
    runner.meta, runner._runner, runner._profile = {"profiles": [{"x": [[3], [3], [3]]}]}, ReusingRunner(), 0
    runner._fed = ["x"]  # the inputs the plan reads (from its engine, in __init__)
    first = runner.infer({"x": np.ones(3, np.float32)})["y"]
    runner.infer({"x": np.full(3, 2, np.float32)})
    assert first.tolist() == [1, 1, 1]


def test_triton_is_told_to_load_version_compatible_plans(tmp_path):
    from vlm_export.serve.server import repository_server_args

    assert triton_server_args({"vision_encoder": H100, "lm_decoder": H100}) == []
    assert triton_server_args({"vision_encoder": H100, "lm_decoder": {**H100, "version_compatible": True}}) == \
        ["--backend-config=tensorrt,version-compatible=true"]
    # `vlm-export serve` reads the plans' record from the repository's copy of the manifest
    (tmp_path / "vlm" / "1").mkdir(parents=True)
    assert repository_server_args(tmp_path) == []  # no manifest: nothing to add
    (tmp_path / "vlm" / "1" / "manifest.json").write_text(json.dumps({"engines": {"lm_decoder": {**H100, "version_compatible": True}}}))
    assert repository_server_args(tmp_path) == ["--backend-config=tensorrt,version-compatible=true"]


@pytest.mark.parametrize("precision,variant,settings", [
    ("fp32", None, BuilderSettings(strongly_typed=False)),
    # fp16 graphs already carry their fp32 islands: strongly typed, no FP16 flag, so TensorRT keeps them
    ("fp16", {"fp32_islands": ["LayerNormalization", "Softmax"], "io": "fp32"}, BuilderSettings(strongly_typed=True)),
    ("int8", {"format": "QDQ"}, BuilderSettings(strongly_typed=True)),
    ("w4", {"form": "dequantize", "bits": 4, "block_sizes": {"128": 7}, "lm_head": "w4"}, BuilderSettings(strongly_typed=True)),
    ("w4", {"form": "dequantize", "bits": 4, "block_sizes": {"128": 6}, "lm_head": "fp32"}, BuilderSettings(strongly_typed=True)),
])
def test_builder_settings_of_the_forms_tensorrt_builds(precision, variant, settings):
    assert builder_settings(precision, variant) == settings


@pytest.mark.parametrize("precision,variant,message", [
    ("w4", {"form": "matmulnbits", "bits": 4, "lm_head": "w8"}, "MatMulNBits form; rebuild with --weight-form dequantize"),
    ("w8", None, "MatMulNBits form"),
    # TensorRT's weight-only quantization is int4 only: block-wise int8 weights have no engine
    ("w8", {"form": "dequantize", "bits": 8, "lm_head": "w8"}, r"int8 weights \(decoder and LM head w8\)"),
    ("w4", {"form": "dequantize", "bits": 4, "lm_head": "w8"}, r"int8 weights \(LM head w8\).*--weight-form dequantize"),
    # int4 blocks TensorRT does not take (it documents 64 and 128), recorded per size or, older, as one size
    ("w4", {"form": "dequantize", "bits": 4, "block_sizes": {"128": 5, "32": 2}, "lm_head": "w4"}, "int4 blocks of 32"),
    ("w4", {"form": "dequantize", "bits": 4, "block_size": 32, "lm_head": "w4"}, "int4 blocks of 32:.*64 or 128"),
])
def test_forms_tensorrt_cannot_build_are_refused(precision, variant, message):
    with pytest.raises(BuildError, match=message):
        builder_settings(precision, variant)


def test_engines_refuse_an_unbuildable_build_before_needing_tensorrt(tiny_build, tmp_path, capsys):
    """A build whose decoder is w4 in the dequantize form with a w8 LM head (the default before the
    export refused it): `vlm-export engines` says what to rebuild with, here on a machine without
    TensorRT, and writes nothing."""
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
    assert "rebuild with --precision decoder=w4 --weight-form dequantize" in capsys.readouterr().err
    assert not (build / "engines").exists() and (build / "manifest.json").read_bytes() == before
