"""TensorRT engines: what can be checked without TensorRT (profiles from limits, precision to
builder flags, clear refusals) runs everywhere; building and running plans needs TensorRT and a
GPU and is skipped elsewhere with the reason."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from vlm_export.contract.profiles import dim_ranges, stage_profiles, trt_profile
from vlm_export.engines.tensorrt import builder_settings, build_engines, installed_tensorrt
from vlm_export.errors import BuildError
from vlm_export.manifest import read_manifest

HAS_TRT = installed_tensorrt() is not None  # importable: the bindings wheel alone is not TensorRT


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


def test_an_unbounded_dim_leaves_onnx_runtimes_tensorrt_provider_without_a_profile_and_says_so(tiny_build, caplog):
    manifest = read_manifest(tiny_build("llava-llama").path)
    manifest["graphs"]["projector"]["inputs"][0]["shape"][1] = "patches"
    caplog.set_level("WARNING")
    assert trt_profile(manifest, "projector") is None
    assert [r.getMessage() for r in caplog.records] == [
        "no TensorRT shape profile for stage projector (projector input image_features has a dynamic dim "
        "'patches' that no limit bounds; known: images); ONNX Runtime's TensorRT provider will build an engine for each new "
        "input shape"]
    assert trt_profile(manifest, "vision_encoder") is not None


def test_builder_settings_per_precision():
    # reduced precision comes from the graph's own types: no FP16 flag (deprecated weak typing), the
    # fp16 graph's fp32 islands kept by a strongly typed network
    assert builder_settings("fp16").strongly_typed and not builder_settings("fp32").strongly_typed
    assert builder_settings("int8").strongly_typed  # Q/DQ graphs: TensorRT follows the graph's precisions
    with pytest.raises(BuildError, match="--weight-form dequantize"):
        builder_settings("w4", {"form": "matmulnbits"})
    # block-wise int8 weights (a w8 LM head) have no TensorRT engine: its weight-only quantization is int4 only
    with pytest.raises(BuildError, match="block-wise int8 weights"):
        builder_settings("w4", {"form": "dequantize", "bits": 4, "lm_head": "w8"})
    # w8 has no dequantize form to point to (a w8 build with --weight-form dequantize is refused)
    with pytest.raises(BuildError, match="nor for w8 in any form .*--precision decoder=w4 --weight-form dequantize"):
        builder_settings("w8", {"form": "matmulnbits"})


def test_dim_ranges_cover_every_declared_stage(tiny_build):
    manifest = read_manifest(tiny_build("llava-llama").path)
    ranges = dim_ranges(manifest)
    assert list(ranges) == [s["name"] for s in manifest["stages"]] == ["vision_encoder", "projector", "lm_decoder"]
    assert len(ranges["lm_decoder"]) == 2  # the scheme's prefill and decode profiles


@pytest.mark.skipif(HAS_TRT, reason="checks the refusal on machines without TensorRT")
def test_engines_refused_without_tensorrt(tiny_build):
    with pytest.raises(BuildError, match="TensorRT is not installed"):
        build_engines(tiny_build("llava-llama").path)


def test_every_engine_build_runs_the_compatibility_check_first(tiny_build, tmp_path, run_cli):
    """A graph that breaks a documented TensorRT rule (here: a MatMulNBits node, ONNX Runtime's own op,
    swapped into an fp32-labelled build) is refused by `vlm-export engines` before TensorRT is needed,
    naming graph, node and rule; `--check-only` lists the report and exits 1, and 0 on the plain build."""
    import onnx
    from onnx import helper

    from vlm_export.manifest import sha256_file, write_manifest

    ok = run_cli("engines", str(tiny_build("llava-llama").path), "--check-only")
    assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr
    build = tmp_path / "build"
    shutil.copytree(tiny_build("llava-llama").path, build)
    manifest = read_manifest(build)
    graph_file = build / manifest["graphs"]["projector"]["file"]
    model = onnx.load(str(graph_file))
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    matmul.op_type, matmul.domain = "MatMulNBits", "com.microsoft"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(graph_file))
    manifest["graphs"]["projector"]["sha256"] = {manifest["graphs"]["projector"]["file"]: sha256_file(graph_file)}
    write_manifest(build, {k: v for k, v in manifest.items() if k not in ("format", "version")})

    with pytest.raises(BuildError, match=rf"fails the TensorRT [\d.]+ compatibility check: projector node {matmul.name}"):
        build_engines(build)
    bad = run_cli("engines", str(build), "--check-only")
    assert bad.returncode == 1 and matmul.name in bad.stdout
    assert not (build / "engines").exists()


def _no_tensorrt_gpu() -> str | None:
    """Why the GPU tests cannot run here, or None. The tensorrt wheel may be installed without its
    libraries (it then fails to import) or on a machine without a GPU: both skip, neither errors."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as e:
        return f"needs TensorRT ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU: TensorRT is installed, no GPU is visible"
    return None


def _tensorrt_build(name: str, tiny_build, tiny_model_dir, tmp_path):
    """A copy of a tiny build (engines and a rewritten manifest go into it, not the shared build)."""
    from vlm_export.build import BuildOptions, build
    from vlm_export.precision.convert import PrecisionOptions
    from vlm_export.precision.spec import parse_precision

    dest = tmp_path / "build"
    if name == "fp32":
        shutil.copytree(tiny_build("llava-llama").path, dest)
    elif name == "int8":
        build(tiny_model_dir("llava-llama"), dest, BuildOptions(precision=parse_precision("decoder=int8"),
                                                                parity_new_tokens=4))
    else:  # the weight-only form TensorRT reads (W4A16: int4 blocks, DequantizeLinear); the fp32 head keeps
        # this random tiny model within the parity gate (as in test_precision)
        build(tiny_model_dir("prefix-llama"), dest, BuildOptions(
            precision=parse_precision("decoder=w4"), parity_new_tokens=4,
            precision_options=PrecisionOptions(weight_form="dequantize", lm_head="fp32")))
    return dest


def _close(got: np.ndarray, ref: np.ndarray, precision: str, what: str) -> None:
    got, ref = np.asarray(got, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    if precision == "fp32":
        assert np.abs(got - ref).max() < 1e-3, what
    else:  # the same quantized graph, other kernels (TensorRT's int8 / int4 GEMMs vs ONNX Runtime's)
        cosine = got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref) + 1e-30)
        assert cosine > 0.999, f"{what}: cosine {cosine}"


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", ["fp32", "int8", "w4"])
def test_engines_build_and_match_onnxruntime(precision, tiny_build, tiny_model_dir, tmp_path):  # pragma: no cover - GPU only
    """Every stage's plan (the decoder's with both profiles) against ONNX Runtime on the same graphs:
    the image path, a prefill from an empty cache (profile 0) and a decode step on its cache (profile 1)."""
    reason = _no_tensorrt_gpu()
    if reason:
        pytest.skip(reason)
    from vlm_export.contract import stages_from_manifest
    from vlm_export.engines.tensorrt import TensorRTRunner
    from vlm_export.runtime.load import open_build, pipeline_from_manifest

    build_dir = _tensorrt_build(precision, tiny_build, tiny_model_dir, tmp_path)
    engines = build_engines(build_dir)
    manifest = read_manifest(build_dir)
    assert set(engines) == set(manifest["graphs"]) and manifest["engines"] == json.loads(json.dumps(engines))
    for stage, engine in engines.items():
        assert engine["compute_capability"] and engine["tensorrt"] and engine["version_compatible"] is False
        assert engine["profiles"] == json.loads(json.dumps(stage_profiles(manifest, stage)))
    ort = open_build(build_dir)
    runners = {spec.name: TensorRTRunner(spec.name, build_dir / engines[spec.name]["file"], spec.input_names,
                                         spec.output_names) for spec in stages_from_manifest(manifest)}
    trt = pipeline_from_manifest(manifest, runners, ort.tokenizer, ort.image_processor, build_dir)
    scheme = ort.scheme

    prompt = "What is in the picture?"
    shape = manifest["graphs"][ort.image_stages[0].name]["inputs"][0]["shape"] if ort.image_stages else None
    pixels = None
    if shape:
        pixels = np.random.default_rng(0).standard_normal((1, *shape[1:]), dtype=np.float32)
    image = ort.encode_images(pixels, prompt=prompt)
    _close(trt.encode_images(pixels, prompt=prompt), image, precision, "image path")
    ids = ort.prompt_ids(prompt, 0 if pixels is None else 1)

    prefill = scheme.prefill_feeds([ids], image)
    ref, got = ort.decode(prefill), trt.decode(prefill)
    assert trt.decoder._profile == 0  # an empty cache: the prefill profile
    kept = {n: v.copy() for n, v in got.items()}
    for name in ort.decoder.output_names:
        _close(got[name], ref[name], precision, f"prefill {name}")
    step = scheme.step_feeds(scheme.prefill_state(ref, [len(ids)]), np.array([5]))
    ref_step, got_step = ort.decode(step), trt.decode(step)
    assert trt.decoder._profile == 1  # one token on a cache: the decode profile
    for name in ort.decoder.output_names:
        _close(got_step[name], ref_step[name], precision, f"decode step {name}")
    # the prefill's outputs are the runner's own copies: the next call did not overwrite them
    assert all(np.array_equal(got[n], kept[n]) for n in kept)
