"""The Triton repository as written to disk for the native targets (``onnxruntime``, ``tensorrt``):
which files each model folder holds (graphs under Triton's names, external data under the name the
graph refers to, no python model code beside a native graph), the configs read back from disk, an
existing output folder, and options that cannot make a repository.

Nothing here loads the repository into Triton (this machine's Triton has neither native backend):
what a native backend would read is checked directly (ONNX Runtime opens the copied graph with its
external data; the plan files are the build's engines byte for byte)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from vlm_export.contract.profiles import stage_profiles
from vlm_export.errors import RepositoryError
from vlm_export.manifest import form_entry, read_manifest, sha256_file, write_manifest
from vlm_export.model_repository.render import RepositoryOptions, render_repository

from conftest import assert_one_line_error  # noqa: E402

GRAPH_MODELS = ("vision_encoder", "projector", "lm_decoder")


@pytest.fixture(scope="module")
def build(tiny_build, tmp_path_factory):
    """A copy of the tiny llava build whose projector keeps its weights in external data (as a graph
    over 2 GB must), and with engines as a GPU machine leaves them after `vlm-export engines` (plan
    bytes that only need to exist here), recorded in its manifest."""
    dest = tmp_path_factory.mktemp("render") / "build"
    shutil.copytree(tiny_build("llava-llama").path, dest)
    manifest = read_manifest(dest)
    entry = manifest["graphs"]["projector"]
    graph = dest / entry["file"]
    model = onnx.load(str(graph))
    onnx.save(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
              location="projector.onnx.data", size_threshold=0)
    data = graph.with_name("projector.onnx.data")
    assert data.stat().st_size > graph.stat().st_size  # the weights really moved out
    entry["sha256"] = {entry["file"]: sha256_file(graph), f"{entry['file']}.data": sha256_file(data)}
    (dest / "engines").mkdir()
    manifest["engines"] = {}
    for stage in manifest["graphs"]:
        plan = dest / "engines" / f"{stage}.plan"
        plan.write_bytes(f"plan of {stage}".encode())
        manifest["engines"][stage] = {"file": f"engines/{stage}.plan", "sha256": sha256_file(plan), "precision": "fp32",
                                      "tensorrt": "10.5.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
                                      "version_compatible": False,
                                      "profiles": json.loads(json.dumps(stage_profiles(manifest, stage)))}
    write_manifest(dest, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    return dest


def kind(name: str) -> int:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.ModelInstanceGroup.Kind.Value(name)


def read_config(path: Path):
    """config.pbtxt as Triton reads it: text protobuf in its ModelConfig schema."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_onnxruntime_target_on_disk(build, tmp_path):
    import onnxruntime as ort

    repo = render_repository(build, tmp_path / "repo", RepositoryOptions(target="onnxruntime", instances=2))
    assert sorted(p.name for p in repo.iterdir()) == ["image_encoder", "lm_decoder", "preprocess", "projector",
                                                      "vision_encoder", "vlm"]
    assert files(repo / "vision_encoder") == {"config.pbtxt", "1/model.onnx"}
    assert files(repo / "projector") == {"config.pbtxt", "1/model.onnx", "1/projector.onnx.data"}
    assert files(repo / "lm_decoder") == {"config.pbtxt", "1/model.onnx"}
    assert files(repo / "image_encoder") == {"config.pbtxt"} and (repo / "image_encoder" / "1").is_dir()
    assert {"1/model.py", "config.pbtxt"} <= files(repo / "preprocess")
    assert {"1/model.py", "1/manifest.json", "config.pbtxt"} <= files(repo / "vlm")
    assert not any(f.endswith(".onnx") for f in files(repo / "vlm"))  # its decoder is the lm_decoder model (bls)
    for stage in GRAPH_MODELS:
        src = build / form_entry(read_manifest(build), stage, "standard")["file"]  # Triton's ONNX Runtime 1.19.2 runs it
        assert (repo / stage / "1" / "model.onnx").read_bytes() == src.read_bytes()
        cfg = read_config(repo / stage / "config.pbtxt")
        assert (cfg.name, cfg.platform, cfg.backend) == (stage, "onnxruntime_onnx", "")
        assert [(g.kind, g.count) for g in cfg.instance_group] == [(kind("KIND_CPU"), 2)]
    # ONNX Runtime opens the copied graph from its folder: the external data resolves under its own name
    features = np.random.default_rng(0).standard_normal((2, 16, 32)).astype(np.float32)
    outs = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image_features": features})[0]
            for path in (repo / "projector" / "1" / "model.onnx", build / "graphs" / "projector.onnx")]
    np.testing.assert_array_equal(outs[0], outs[1])
    vlm = read_config(repo / "vlm" / "config.pbtxt")
    assert (vlm.backend, vlm.model_transaction_policy.decoupled) == ("python", True)
    assert vlm.parameters["decoder_mode"].string_value == "bls"
    assert read_config(repo / "image_encoder" / "config.pbtxt").platform == "ensemble"
    assert read_config(repo / "preprocess" / "config.pbtxt").instance_group[0].kind == kind("KIND_CPU")


def test_tensorrt_target_on_disk(build, tmp_path):
    notes = []
    repo = render_repository(build, tmp_path / "repo", RepositoryOptions(target="tensorrt", instances=2), echo=notes.append)
    manifest = read_manifest(build)
    for stage in GRAPH_MODELS:
        assert files(repo / stage) == {"config.pbtxt", "1/model.plan"}  # no graph, no data, no model.py
        assert (repo / stage / "1" / "model.plan").read_bytes() == (build / manifest["engines"][stage]["file"]).read_bytes()
        cfg = read_config(repo / stage / "config.pbtxt")
        assert (cfg.platform, cfg.backend) == ("tensorrt_plan", "")
        # every instance holds every profile of its plan (without, Triton runs profile 0 only)
        profiles = [str(i) for i in range(len(stage_profiles(manifest, stage)))]
        assert [(g.kind, g.count, list(g.profile)) for g in cfg.instance_group] == [(kind("KIND_GPU"), 2, profiles)]
    # the decoder's two: prefill (0) and decode (1); the image stages' one
    assert list(read_config(repo / "lm_decoder" / "config.pbtxt").instance_group[0].profile) == ["0", "1"]
    assert list(read_config(repo / "vision_encoder" / "config.pbtxt").instance_group[0].profile) == ["0"]
    assert notes == ["TensorRT version not checked: the plans were built with TensorRT 10.5.0 on compute capability "
                     "9.0 and load only on a Triton with that TensorRT (pass --tensorrt-version, the serving "
                     "Triton's, to check)"]
    for python_model in ("preprocess", "vlm"):  # python models run on the CPU whatever the target
        cfg = read_config(repo / python_model / "config.pbtxt")
        assert cfg.backend == "python" and [g.kind for g in cfg.instance_group] == [kind("KIND_CPU")]
    # no prefix cache: a prompt cannot continue on a past in the engines' prefill profile; asked for, a note
    assert read_config(repo / "vlm" / "config.pbtxt").parameters["prefix_cache_mb"].string_value == "0"
    notes.clear()
    render_repository(build, tmp_path / "asked", RepositoryOptions(target="tensorrt", prefix_cache_mb=64), echo=notes.append)
    assert any(n.startswith("prefix cache off: the TensorRT decoder's prefill profile has an empty past") for n in notes)
    onnxruntime = render_repository(build, tmp_path / "ort", RepositoryOptions(target="onnxruntime"))
    assert read_config(onnxruntime / "vlm" / "config.pbtxt").parameters["prefix_cache_mb"].string_value == "256"
    assert not [f for f in files(repo) if f.endswith((".onnx", ".onnx.data"))]


def test_existing_output_folder_is_replaced_only_with_force(build, tmp_path, capsys):
    from vlm_export.cli import main

    out = tmp_path / "repo"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "keep.txt").write_text("not a repository")
    with pytest.raises(RepositoryError, match="already exists; pass --force"):
        render_repository(build, out, RepositoryOptions(target="onnxruntime"))
    assert main(["repository", str(build), "--out", str(out), "--target", "onnxruntime"]) == 1
    assert "error: " in capsys.readouterr().err and files(out) == {"mine/keep.txt"}

    # --force replaces only a repository written before, never the user's own files
    with pytest.raises(RepositoryError, match="not a model repository vlm-export wrote"):
        render_repository(build, out, RepositoryOptions(target="onnxruntime"), force=True)
    assert files(out) == {"mine/keep.txt"}

    (out / "mine" / "keep.txt").unlink()
    (out / "mine").rmdir()
    render_repository(build, out, RepositoryOptions(target="onnxruntime"))
    (out / "vision_encoder" / "1" / "stale.txt").write_text("from the earlier rendering")
    render_repository(build, out, RepositoryOptions(target="onnxruntime"), force=True)
    assert not (out / "vision_encoder" / "1" / "stale.txt").exists()
    assert (out / "projector" / "1" / "projector.onnx.data").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no hidden .repo.tmp- / .repo.old- left


@pytest.mark.parametrize("kwargs,message", [
    ({"target": "tensorflow"}, "unknown target 'tensorflow'"),
    ({"decoder_mode": "sidecar"}, "unknown decoder mode 'sidecar'"),
    ({"target": "onnxruntime", "decoder_mode": "in_process"}, "in_process needs the python target"),
    ({"target": "tensorrt", "decoder_mode": "in_process"}, "in_process needs the python target"),
    ({"instances": 0}, "instances, max_queue"),
    ({"vlm_instances": 0}, "instances, max_queue"),
    ({"max_queue": 0}, "instances, max_queue"),
    ({"max_image_pixels": 0}, "instances, max_queue"),
    ({"max_queue_delay_us": -1}, "queue delay"),
    ({"image_cache_mb": -1}, "image cache"),
    ({"prefix_cache_mb": -1}, "prefix cache"),
    ({"max_prefill_tokens": 0}, "max_prefill_tokens must be >= 1"),
    ({"max_prefill_padding": 1.5}, r"max_prefill_padding in \[0, 1\]"),
    ({"tensorrt_version": "10.5.0"}, "tensorrt_version is for the tensorrt target, not 'python'"),
    ({"target": "tensorrt", "tensorrt_version": "latest"}, r"'latest' is not a TensorRT version \(MAJOR.MINOR"),
    ({"device": "gpu"}, r"unknown device 'gpu': use cpu, cuda or cuda:N"),
])
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(RepositoryError, match=message):
        RepositoryOptions(**kwargs)


def test_bad_options_write_nothing(build, tmp_path, capsys):
    from vlm_export.cli import main

    assert main(["repository", str(build), "--out", str(tmp_path / "repo"), "--target", "onnxruntime",
                 "--decoder-mode", "in_process"]) == 1
    assert "in_process needs the python target" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def with_engines(build: Path, dest: Path, **fields) -> Path:
    """A copy of the module's build whose recorded engines have ``fields`` changed."""
    shutil.copytree(build, dest)
    manifest = read_manifest(dest)
    for entry in manifest["engines"].values():
        entry.update(fields)
    write_manifest(dest, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    return dest


def test_plans_for_another_tensorrt_are_refused(build, tmp_path, run_cli):
    """The target Triton's TensorRT (its container's) against the release the plans were built with:
    another release is refused, in one line, before anything is written; the container's own build
    of the same release (10.5.0.18) is the same release."""
    notes = []
    render_repository(build, tmp_path / "ok", RepositoryOptions(target="tensorrt", tensorrt_version="10.5.0.18"),
                      echo=notes.append)
    assert notes == [] and (tmp_path / "ok" / "lm_decoder" / "1" / "model.plan").is_file()
    with pytest.raises(RepositoryError, match=r"engines/\w+.plan will not load on the target Triton's TensorRT 10.7.0: "
                                              r"a plan built with TensorRT 10.5.0 loads only on that release"):
        render_repository(build, tmp_path / "repo", RepositoryOptions(target="tensorrt", tensorrt_version="10.7.0"))
    result = run_cli("repository", str(build), "--out", str(tmp_path / "repo"), "--target", "tensorrt",
                     "--tensorrt-version", "10.4.0")
    assert_one_line_error(result, "will not load on the target Triton's TensorRT 10.4.0")
    assert not (tmp_path / "repo").exists()

    # version-compatible plans load on later 10.x releases; the server must be told (a server option)
    compatible = with_engines(build, tmp_path / "vc", version_compatible=True)
    notes = []
    render_repository(compatible, tmp_path / "vc-repo", RepositoryOptions(target="tensorrt", tensorrt_version="10.7.0"),
                      echo=notes.append)
    assert notes == ["the plans are version-compatible: tritonserver needs --backend-config=tensorrt,"
                     "version-compatible=true (vlm-export serve passes it)"]
    with pytest.raises(RepositoryError, match="version-compatible plan built with TensorRT 10.5.0 .* not on 10.4.0"):
        render_repository(compatible, tmp_path / "old", RepositoryOptions(target="tensorrt", tensorrt_version="10.4.0"))


def test_plans_built_with_other_profiles_are_refused(build, tmp_path):
    """The configs list the profiles stage_profiles derives from the manifest; a plan whose recorded
    profiles differ (built with other limits, or by another version of the derivation) is refused."""
    other = tmp_path / "other"
    shutil.copytree(build, other)
    manifest = read_manifest(other)
    manifest["engines"]["lm_decoder"]["profiles"] = manifest["engines"]["lm_decoder"]["profiles"][:1]
    write_manifest(other, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    with pytest.raises(RepositoryError, match="engines/lm_decoder.plan was built with other optimization profiles"):
        render_repository(other, tmp_path / "repo", RepositoryOptions(target="tensorrt"))
    assert not (tmp_path / "repo").exists()


def test_tensorrt_configs_render_before_any_engine(tiny_build, build, tmp_path, run_cli):
    """--configs-only on a build without engines: the tensorrt configs, schema- and graph-checked as
    always and equal to those rendered once the engines exist, and no model file at all."""
    plain = tiny_build("llava-llama").path
    assert "engines" not in read_manifest(plain)
    notes = []
    out = render_repository(plain, tmp_path / "configs", RepositoryOptions(target="tensorrt"), configs_only=True,
                            echo=notes.append)
    assert files(out) == {f"{name}/config.pbtxt" for name in (*GRAPH_MODELS, "preprocess", "image_encoder", "vlm")}
    assert notes == [f"configs only: {out} holds the config.pbtxt files; the TensorRT plans are missing "
                     "(not loadable in Triton)"]
    full = render_repository(build, tmp_path / "full", RepositoryOptions(target="tensorrt"), echo=lambda _: None)
    for stage in GRAPH_MODELS:  # the same configs, profiles included, as with the engines
        assert (out / stage / "config.pbtxt").read_text() == (full / stage / "config.pbtxt").read_text()
    assert list(read_config(out / "lm_decoder" / "config.pbtxt").instance_group[0].profile) == ["0", "1"]

    result = run_cli("repository", str(plain), "--out", str(tmp_path / "cli"), "--target", "tensorrt", "--configs-only")
    assert result.returncode == 0, result.stderr
    assert "the TensorRT plans are missing" in result.stdout
    assert not [f for f in files(tmp_path / "cli") if not f.endswith("config.pbtxt")]
    # without --configs-only a build without engines is still refused
    with pytest.raises(RepositoryError, match="no TensorRT engines.*--configs-only"):
        render_repository(plain, tmp_path / "none", RepositoryOptions(target="tensorrt"))


def test_tensorrt_configs_that_break_the_backends_rules_are_not_written(build, tmp_path, monkeypatch):
    """render runs the compatibility checker's Triton rules on the tensorrt configs: a decoder config
    without its profiles (what render wrote before) is refused, and nothing is written."""
    from vlm_export.model_repository import render

    made = render.model_configs

    def without_profiles(manifest, options):
        configs = made(manifest, options)
        del configs["lm_decoder"]["instance_group"][0]["profile"]
        return configs

    monkeypatch.setattr(render, "model_configs", without_profiles)
    with pytest.raises(RepositoryError, match=r"tensorrt configs break the backend's rules: lm_decoder "
                                              r"config.instance_group\[0\]: triton-profiles"):
        render_repository(build, tmp_path / "repo", RepositoryOptions(target="tensorrt"), configs_only=True)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("args,device", [
    ({"model_instance_kind": "GPU", "model_instance_device_id": "1"}, "cuda:1"),
    ({"model_instance_kind": "GPU", "model_instance_device_id": "0"}, "cuda:0"),
    ({"model_instance_kind": "CPU", "model_instance_device_id": "0"}, "cpu"),
    ({}, "cpu"),
])
def test_python_models_run_on_their_instances_device(args, device):
    """The python backend tells each instance its kind and GPU (python_backend README, initialize)."""
    from vlm_export.model_repository.python_models.common import instance_device

    assert instance_device(args) == device
