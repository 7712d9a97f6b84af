"""The Triton repository as written to disk for the native targets (``onnxruntime``, ``tensorrt``):
which files each model folder holds (graphs under Triton's names, external data under the name the
graph refers to, no python model code beside a native graph), the configs read back from disk, an
existing output folder, and options that cannot make a repository.

Nothing here loads the repository into Triton (this machine's Triton has neither native backend):
what a native backend would read is checked directly (ONNX Runtime opens the copied graph with its
external data; the plan files are the build's engines byte for byte)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from vlm_export.errors import RepositoryError
from vlm_export.manifest import read_manifest, sha256_file, write_manifest
from vlm_export.model_repository.render import RepositoryOptions, render_repository

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
                                      "profiles": []}
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
        src = build / read_manifest(build)["graphs"][stage]["file"]
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
    repo = render_repository(build, tmp_path / "repo", RepositoryOptions(target="tensorrt"))
    manifest = read_manifest(build)
    for stage in GRAPH_MODELS:
        assert files(repo / stage) == {"config.pbtxt", "1/model.plan"}  # no graph, no data, no model.py
        assert (repo / stage / "1" / "model.plan").read_bytes() == (build / manifest["engines"][stage]["file"]).read_bytes()
        cfg = read_config(repo / stage / "config.pbtxt")
        assert (cfg.platform, cfg.backend) == ("tensorrt_plan", "")
        assert [g.kind for g in cfg.instance_group] == [kind("KIND_GPU")]
    for python_model in ("preprocess", "vlm"):  # python models run on the CPU whatever the target
        cfg = read_config(repo / python_model / "config.pbtxt")
        assert cfg.backend == "python" and [g.kind for g in cfg.instance_group] == [kind("KIND_CPU")]
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

    render_repository(build, out, RepositoryOptions(target="onnxruntime"), force=True)
    assert not (out / "mine").exists() and (out / "projector" / "1" / "projector.onnx.data").is_file()
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
    ({"max_prefill_tokens": 0}, "max_prefill_tokens must be >= 1"),
    ({"max_prefill_padding": 1.5}, r"max_prefill_padding in \[0, 1\]"),
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
