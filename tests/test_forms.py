"""A form of the graphs per target: the build writes the decoder's ONNX Runtime form (export/fuse.py)
beside the standard graph TensorRT reads, records which target runs which, hash-checks both, proves
both against PyTorch, and opens / renders / quantizes the right one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from conftest import assert_one_line_error, recorded_notes
from vlm_export.build import BuildOptions, _fuse_decoder_stage, build, verify
from vlm_export.contract import Limits
from vlm_export.contract.profiles import one_profile, stage_profiles, trt_settings
from vlm_export.errors import ManifestError, RepositoryError
from vlm_export.export.fuse import FuseReport
from vlm_export.manifest import (check_hashes, derive_targets, form_entry, read_manifest, stage_forms, targets,
                                 verify_hashes)
from vlm_export.precision.convert import PrecisionOptions
from vlm_export.precision.spec import parse_precision
from vlm_export.progress import Progress
from vlm_export.runtime.generate import GenerationConfig, generate
from vlm_export.runtime.load import open_build

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

MS_OPS = {"SkipSimplifiedLayerNormalization", "RotaryEmbedding", "GroupQueryAttention", "MatMulNBits"}


def _ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


def test_manifest_records_forms_and_targets(tiny_build):
    result = tiny_build("llava-llama")
    path, manifest = result.path, result.manifest
    decoder = manifest["graphs"]["lm_decoder"]
    # the primary entry stays the standard graph (TensorRT, engines, old readers); the fused form beside it
    assert decoder["file"] == "graphs/lm_decoder.onnx" and decoder.get("form", "standard") == "standard"
    fused = decoder["forms"]["fused"]
    assert fused["file"] == "graphs/lm_decoder.fused.onnx" and fused["form"] == "fused"
    assert fused["precision"] == "fp32" and fused["bytes"] == (path / fused["file"]).stat().st_size
    assert list(fused["sha256"]) == [fused["file"]]
    # the same interface: the runtime's generation loop and the Triton configs depend on it
    assert [(t["name"], t["dtype"]) for t in fused["inputs"]] == [(t["name"], t["dtype"]) for t in decoder["inputs"]]
    assert [(t["name"], t["dtype"]) for t in fused["outputs"]] == [(t["name"], t["dtype"]) for t in decoder["outputs"]]
    fusion = decoder["fusion"]
    assert fusion["made"] and fusion["reason"] == "" and fusion["nodes_after"] < fusion["nodes_before"]
    assert fusion["fusions"]["skip_rms_norm"] > 0 and fusion["seconds"] >= 0
    assert manifest["targets"] == {
        "onnxruntime": {"vision_encoder": "fused", "projector": "standard", "lm_decoder": "fused"},
        "tensorrt": {"vision_encoder": "standard", "projector": "standard", "lm_decoder": "standard"}}
    # the image stage's attention in ONNX Runtime's MultiHeadAttention (export/image_fuse.py); no attention in the
    # projector, no record
    tower = manifest["graphs"]["vision_encoder"]
    assert tower["forms"]["fused"]["file"] == "graphs/vision_encoder.fused.onnx" and tower["fusion"]["made"]
    assert "MultiHeadAttention" in _ops(path / tower["forms"]["fused"]["file"])
    assert not MS_OPS & set(_ops(path / tower["file"])) and "fusion" not in manifest["graphs"]["projector"]
    standard_ops, fused_ops = _ops(path / decoder["file"]), _ops(path / fused["file"])
    assert not MS_OPS & set(standard_ops)  # TensorRT reads standard ONNX ops only
    assert "SkipSimplifiedLayerNormalization" in fused_ops and len(fused_ops) == fusion["nodes_after"]
    assert verify_hashes(path, manifest) == []
    assert (form_entry(manifest, "lm_decoder", "onnxruntime"), form_entry(manifest, "lm_decoder", "tensorrt")) == (
        fused, {k: v for k, v in decoder.items() if k != "forms"})


def test_a_manifest_without_forms_reads_as_all_standard(tiny_build, tmp_path):
    """Builds made before forms: every target runs the standard graph, and it opens as before."""
    dest = tmp_path / "old"
    shutil.copytree(tiny_build("llava-llama").path, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    del manifest["targets"]
    for entry in manifest["graphs"].values():
        entry.pop("forms", None), entry.pop("fusion", None)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    (dest / "graphs" / "lm_decoder.fused.onnx").unlink()
    old = read_manifest(dest)
    assert set(targets(old)["onnxruntime"].values()) == set(targets(old)["tensorrt"].values()) == {"standard"}
    assert form_entry(old, "lm_decoder", "onnxruntime")["file"] == "graphs/lm_decoder.onnx"
    assert form_entry(old, "lm_decoder", "fused")["file"] == "graphs/lm_decoder.onnx"  # one form: serves both
    out = generate(open_build(dest), "What is this?", [], GenerationConfig(max_new_tokens=3))
    assert out.completion_tokens == 3


def test_the_fused_file_is_hash_checked(tiny_build, tmp_path, run_cli):
    dest = tmp_path / "build"
    shutil.copytree(tiny_build("llava-llama").path, dest)
    fused = dest / "graphs" / "lm_decoder.fused.onnx"
    data = bytearray(fused.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(b ^ 0x5A for b in data[len(data) // 2: len(data) // 2 + 64])
    fused.write_bytes(bytes(data))
    assert verify_hashes(dest, read_manifest(dest)) == ["graphs/lm_decoder.fused.onnx"]
    with pytest.raises(ManifestError, match=r"graphs/lm_decoder.fused.onnx changed since the build"):
        check_hashes(dest, read_manifest(dest))
    for form in ("onnxruntime", "standard"):  # every form is checked, whichever is opened
        with pytest.raises(ManifestError, match=r"lm_decoder.fused.onnx changed since the build"):
            open_build(dest, form=form)
    assert_one_line_error(run_cli("generate", str(dest), "--prompt", "hi", "--max-tokens", "2"),
                          "lm_decoder.fused.onnx changed since the build", "--no-hash-check")
    fused.unlink()
    with pytest.raises(ManifestError, match=r"the fused form of the lm_decoder graph .*lm_decoder.fused.onnx.* missing"):
        read_manifest(dest)


def test_both_forms_pass_parity(tiny_build):
    path = tiny_build("llava-llama").path
    report = json.loads((path / "report.json").read_text())
    assert report["passed"]
    stages = report["stages"]
    for entry in ("prefill", "decode"):  # the fused form (the onnxruntime target's) and the standard one
        for name in (entry, f"{entry} (standard form)"):
            logits = stages[name]["logits"]
            assert logits["max_abs"] <= 1e-4 and logits["cosine"] > 0.99999 and logits["passed"], (name, logits)
            # the same tolerance for both forms
            assert logits["min_cosine"] == stages[entry]["logits"]["min_cosine"]
    # end to end: what users run, one request at a time and batched
    assert set(report["end_to_end"]) == {"torch_split", "onnxruntime", "onnxruntime batched"}
    assert report["targets"]["onnxruntime"]["lm_decoder"] == "fused"
    assert report["graphs"]["lm_decoder"]["forms"]["fused"]["file"] == "graphs/lm_decoder.fused.onnx"
    # the fused node count is the fused form's, counted in its file; the standard form claims none
    import onnx

    forms = report["graphs"]["lm_decoder"]["forms"]
    fused_nodes = len(onnx.load(str(path / forms["fused"]["file"]), load_external_data=False).graph.node)
    assert forms["fused"]["nodes"] == fused_nodes and "nodes" not in forms["standard"]
    text = (path / "report.md").read_text()
    assert "| lm_decoder | fused | fp32 |" in text and "| onnxruntime |" in text
    assert "| prefill (standard form) | logits |" in text
    # the image stage's two forms alike
    tower = (stages["vision_encoder"], stages["vision_encoder (standard form)"])
    assert all(entry[name]["passed"] for entry in tower for name in entry) and tower[0].keys() == tower[1].keys()


def _recording_open(monkeypatch) -> dict:
    """open_build's runners as they really are, recording which file each stage opened."""
    import vlm_export.runtime.load as load

    opened = {}

    class Recording(load.OrtRunner):
        def __init__(self, name, path, *args, **kwargs):
            opened[name] = Path(path)
            super().__init__(name, path, *args, **kwargs)

    monkeypatch.setattr(load, "OrtRunner", Recording)
    return opened


def test_open_build_default_and_standard_forms(tiny_build, monkeypatch):
    """The same greedy tokens from the two forms of the decoder, which are different graphs."""
    opened = _recording_open(monkeypatch)
    path = tiny_build("llava-llama").path
    tokens, nodes = {}, {}
    for form in ("onnxruntime", "standard"):
        pipe = open_build(path, form=form)
        nodes[form] = len(_ops(opened["lm_decoder"]))
        assert opened["vision_encoder"].name == {"onnxruntime": "vision_encoder.fused.onnx",
                                                 "standard": "vision_encoder.onnx"}[form]
        assert opened["projector"].name == "projector.onnx"  # one form: the same graph for both
        tokens[form] = generate(pipe, "Write a short story about a robot.", [],
                                GenerationConfig(max_new_tokens=12)).token_ids
    assert tokens["onnxruntime"] == tokens["standard"] and len(tokens["standard"]) == 12
    assert nodes["onnxruntime"] < nodes["standard"]
    with pytest.raises(ManifestError, match="unknown graph form 'int4'"):
        open_build(path, form="int4")


def _no_pattern_graph(path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "plain", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


@pytest.mark.parametrize("precision,options,reason", [
    ("fp32", BuildOptions(), "no RMSNorm or LayerNorm after a residual Add"),  # the pass's own reason
    ("fp32", BuildOptions(fuse=False), "--no-fuse"),
    ("fp16", BuildOptions(), "fp16 is made for TensorRT"),
    ("w4", BuildOptions(precision=parse_precision("decoder=w4"), precision_options=PrecisionOptions(
        weight_form="dequantize")), "dequantize weight form"),
])
def test_no_fused_form_says_why(tmp_path, precision, options, reason):
    (tmp_path / "graphs").mkdir()
    _no_pattern_graph(tmp_path / "graphs" / "lm_decoder.onnx")
    graphs = {"lm_decoder": {"file": "graphs/lm_decoder.onnx", "export_seconds": 0.0, "sha256": {}}}
    _fuse_decoder_stage(tmp_path, graphs, "lm_decoder", precision, Limits(1, 1, 64, 1), options, Progress())
    assert graphs["lm_decoder"]["fusion"]["made"] is False
    assert reason in graphs["lm_decoder"]["fusion"]["reason"]
    assert "forms" not in graphs["lm_decoder"]
    assert sorted(p.name for p in (tmp_path / "graphs").iterdir()) == ["lm_decoder.onnx"]  # no copy left
    assert derive_targets(graphs)["onnxruntime"] == {"lm_decoder": "standard"}


def test_a_decoder_nothing_fuses_builds_and_loads(tiny_model_dir, tmp_path, monkeypatch):
    """The pass finds nothing (as on a decoder none of its patterns match): the build ships the
    standard graph to every target, records why, and generates."""
    import vlm_export.build as build_module

    def nothing_matched(src, dst, max_positions, layer_windows, causal):
        shutil.copy2(src, dst)  # what fuse_decoder does when nothing matched: an unchanged copy
        count = len(_ops(src))
        return FuseReport(nodes_before=count, nodes_after=count, reason="no pattern matched (test)")

    monkeypatch.setattr(build_module, "fuse_decoder", nothing_matched)
    result = build(tiny_model_dir("prefix-llama"), tmp_path / "plain", BuildOptions(parity_new_tokens=4))
    manifest = result.manifest
    decoder = manifest["graphs"]["lm_decoder"]
    assert decoder["fusion"]["made"] is False and decoder["fusion"]["reason"] == "no pattern matched (test)"
    assert "forms" not in decoder and not (result.path / "graphs" / "lm_decoder.fused.onnx").exists()
    assert manifest["targets"]["onnxruntime"]["lm_decoder"] == "standard"
    report = json.loads((result.path / "report.json").read_text())
    assert report["passed"] and not any(name.startswith(("prefill (", "decode (")) for name in report["stages"])
    assert "lm_decoder: no fused form - no pattern matched (test)" in (result.path / "report.md").read_text()
    out = generate(open_build(result.path), "What is this?", [], GenerationConfig(max_new_tokens=3))
    assert out.completion_tokens == 3


def test_repositories_reference_each_targets_form(tiny_build, tmp_path):
    from vlm_export.model_repository.render import RepositoryOptions, model_configs, render_repository, target_graphs

    path = tiny_build("llava-llama").path
    manifest = read_manifest(path)
    fused = manifest["graphs"]["lm_decoder"]["forms"]["fused"]
    # python target: the in-process decoder is the fused form, checked by its own hash
    repo = render_repository(path, tmp_path / "python")
    assert (repo / "vlm" / "1" / "lm_decoder.fused.onnx").exists()
    assert not (repo / "vlm" / "1" / "lm_decoder.onnx").exists()  # the standard graph is not shipped there
    params = model_configs(manifest, RepositoryOptions())["vlm"]["parameters"]
    assert params["decoder_graph"]["string_value"] == "lm_decoder.fused.onnx"
    assert json.loads(params["sha256"]["string_value"]) == {"lm_decoder.fused.onnx": fused["sha256"][fused["file"]]}
    # onnxruntime target (its decoder a model of its own, in Triton's ONNX Runtime 1.19.2, which cannot load
    # the fused form: test_the_onnxruntime_target_serves_what_tritons_onnxruntime_loads): the standard graph
    ort = render_repository(path, tmp_path / "ort", RepositoryOptions(target="onnxruntime"))
    assert (ort / "lm_decoder" / "1" / "model.onnx").read_bytes() == (path / "graphs/lm_decoder.onnx").read_bytes()
    assert (ort / "vision_encoder" / "1" / "model.onnx").read_bytes() == (path / "graphs/vision_encoder.onnx").read_bytes()
    # tensorrt target: its plans are built from the standard graph, its configs checked against it
    assert target_graphs(manifest, "tensorrt")["lm_decoder"]["file"] == "graphs/lm_decoder.onnx"
    assert target_graphs(manifest, "onnxruntime")["lm_decoder"]["file"] == "graphs/lm_decoder.onnx"
    assert target_graphs(manifest, "python")["lm_decoder"]["file"] == fused["file"]
    trt = render_repository(path, tmp_path / "trt", RepositoryOptions(target="tensorrt"), configs_only=True,
                            echo=lambda _: None)
    assert (trt / "lm_decoder" / "config.pbtxt").exists() and not (trt / "lm_decoder" / "1").exists()


def test_verify_rechecks_both_forms(tiny_build, tmp_path):
    dest = tmp_path / "build"
    shutil.copytree(tiny_build("llava-llama").path, dest)
    result = verify(dest, BuildOptions(parity_new_tokens=4))
    assert result.failures == []
    stages = json.loads((dest / "report.json").read_text())["stages"]
    assert {"prefill", "decode", "prefill (standard form)", "decode (standard form)"} <= set(stages)


@pytest.fixture(scope="module")
def w4_build(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("forms") / "w4"
    return build(tiny_model_dir("llava-llama"), out, BuildOptions(precision=parse_precision("decoder=w4"),
                                                                  parity_new_tokens=4))


def test_w4_is_quantized_from_the_fused_graph(w4_build):
    """MatMulNBits is ONNX Runtime's: the w4 decoder is made from the fused graph (q/k/v packed into one
    larger quantized MatMul the attention kernel reads) and is the only decoder shipped (no target would run an
    unfused MatMulNBits graph; TensorRT reads neither)."""
    path, manifest = w4_build.path, w4_build.manifest
    decoder = manifest["graphs"]["lm_decoder"]
    assert decoder["form"] == "fused" and decoder["precision"] == "w4" and "forms" not in decoder
    assert decoder["file"] == "graphs/lm_decoder.fused.w4.onnx"
    assert "MatMulNBits" in decoder["fusion"]["tensorrt"]
    assert manifest["targets"]["onnxruntime"]["lm_decoder"] == "fused"
    assert manifest["targets"]["tensorrt"]["lm_decoder"] is None
    assert sorted(p.name for p in (path / "graphs").iterdir()) == [
        "lm_decoder.fused.w4.onnx", "projector.onnx", "vision_encoder.fused.onnx", "vision_encoder.onnx"]
    model = onnx.load(str(path / decoder["file"]))
    ops = [n.op_type for n in model.graph.node]
    assert "SkipSimplifiedLayerNormalization" in ops and "MatMul" not in [
        n.op_type for n in model.graph.node if n.input[1:2] and n.input[1].endswith("_packed_weight")]
    # the packed q/k/v projection became one MatMulNBits whose N is q + k + v
    geometry = manifest["scheme"]["geometry"]  # a Llama: q is hidden wide, k and v kv_heads x head_dim
    qkv = geometry["hidden_size"] + 2 * geometry["num_kv_heads"] * geometry["head_dim"]
    widths = {helper.get_attribute_value(a) for n in model.graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "N"}
    assert qkv in widths, widths
    assert any("packed" in n.name for n in model.graph.node if n.op_type == "MatMulNBits")
    assert decoder["variant"]["quantized_matmuls"] == sum(op == "MatMulNBits" for op in ops)
    report = json.loads((path / "report.json").read_text())
    assert report["passed"] and report["stages"]["prefill"]["logits"]["cosine"] >= 0.99  # the w4 gate, vs PyTorch
    # one decoder form: one set of its entries (the image stage's standard form beside the fused one has its own)
    assert not any(name.startswith(("prefill (", "decode (")) for name in report["stages"])
    assert "vision_encoder (standard form)" in report["stages"]
    with pytest.raises(ManifestError, match="no standard form"):
        open_build(path, form="standard")
    out = generate(open_build(path), "What is this?", [], GenerationConfig(max_new_tokens=3))
    assert out.completion_tokens == 3


def test_the_tensorrt_target_refuses_a_build_it_cannot_serve(w4_build, tmp_path):
    """Configs for plans that can never be built (a MatMulNBits decoder) are refused, --configs-only too."""
    from vlm_export.model_repository.render import RepositoryOptions, render_repository

    with pytest.raises(RepositoryError, match="cannot be served by the tensorrt target: the lm_decoder graph has no "
                                              "form for the tensorrt target .*MatMulNBits.*--check-only"):
        render_repository(w4_build.path, tmp_path / "trt", RepositoryOptions(target="tensorrt"), configs_only=True)
    assert not (tmp_path / "trt").exists()


def test_forms_of_every_stage_are_listed(w4_build):
    forms = {stage: list(stage_forms(entry)) for stage, entry in w4_build.manifest["graphs"].items()}
    assert forms == {"vision_encoder": ["standard", "fused"], "projector": ["standard"], "lm_decoder": ["fused"]}
    assert verify_hashes(w4_build.path, w4_build.manifest) == []


def test_on_a_gpu_onnxruntime_opens_the_standard_form(tiny_build, w4_build, monkeypatch, caplog):
    """ONNX Runtime's CUDA GroupQueryAttention takes fp16/bf16 only: on cuda the fp32 build's decoder
    is opened in its standard form; a w4 build (fused form only) keeps it and says what that costs.
    This onnxruntime has no CUDA provider, so the sessions then run on the CPU (said too)."""
    opened = _recording_open(monkeypatch)
    open_build(tiny_build("llava-llama").path, device="cuda")
    assert opened["lm_decoder"].name == "lm_decoder.onnx"
    open_build(tiny_build("llava-llama").path)
    assert opened["lm_decoder"].name == "lm_decoder.fused.onnx"  # the CPU keeps the fused form
    caplog.clear()
    open_build(w4_build.path, device="cuda")
    assert opened["lm_decoder"].name == "lm_decoder.fused.w4.onnx"
    assert any("GroupQueryAttention has no CUDA kernel" in r.message and "--no-fuse" in r.message
               for r in caplog.records), caplog.text


def test_repositories_on_a_gpu(tiny_build, w4_build, tmp_path):
    """--device cuda:N: KIND_GPU instances on GPU N for every model that runs graphs, the standard
    decoder graph (as open_build on a GPU), image decoding and a BLS-only vlm model on the CPU."""
    from tritonclient.grpc import model_config_pb2

    from vlm_export.model_repository.render import RepositoryOptions, render_repository

    def groups(repo: Path, model: str) -> list[tuple[str, list[int]]]:
        from google.protobuf import text_format

        cfg = text_format.Parse((repo / model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        return [(model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind), list(g.gpus)) for g in cfg.instance_group]

    path = tiny_build("llava-llama").path
    notes = []
    python = render_repository(path, tmp_path / "python", RepositoryOptions(device="cuda:1"), echo=notes.append)
    assert notes == []
    assert (python / "vlm" / "1" / "lm_decoder.onnx").exists() and not (python / "vlm" / "1" / "lm_decoder.fused.onnx").exists()
    for model in ("vision_encoder", "projector", "vlm"):
        assert groups(python, model) == [("KIND_GPU", [1])], model
    assert groups(python, "preprocess") == [("KIND_CPU", [])]
    ort = render_repository(path, tmp_path / "ort", RepositoryOptions(target="onnxruntime", device="cuda"))
    assert (ort / "lm_decoder" / "1" / "model.onnx").read_bytes() == (path / "graphs/lm_decoder.onnx").read_bytes()
    assert groups(ort, "lm_decoder") == [("KIND_GPU", [])] and groups(ort, "vlm") == [("KIND_CPU", [])]
    cpu = render_repository(path, tmp_path / "cpu", RepositoryOptions())
    assert groups(cpu, "vlm") == [("KIND_CPU", [])]
    # on a GPU the python stage models hand ONNX Runtime's TensorRT provider the graph's fp16 and ONE profile
    # over the stage's whole range (else it builds an engine again at each new shape); on the CPU neither
    manifest = json.loads((path / "manifest.json").read_text())
    for stage in ("vision_encoder", "projector"):
        params = _parameters(python / stage)
        assert params["fp16"] == params["int8"] == "0" and json.loads(params["trt_profiles"]) == json.loads(
            json.dumps(one_profile(stage_profiles(manifest, stage)))), stage
        assert not {"trt_profiles", "fp16", "int8"} & set(_parameters(cpu / stage))
    render_repository(w4_build.path, tmp_path / "w4", RepositoryOptions(device="cuda"), echo=notes.append)
    assert len(notes) == 1 and notes[0].startswith("lm_decoder ships only ONNX Runtime's fused form"), notes


def _in_tritons_onnxruntime(code: str, *args: str) -> str:
    """``python -c code args`` with the ONNX Runtime of the pinned Triton's onnxruntime backend (installed apart
    by `scripts/setup.sh --tests`) before this one, vlm-export from this checkout; its standard output."""
    import subprocess
    import sys

    from vlm_export.model_repository.render import TRITON_ONNXRUNTIME

    lib = Path(sys.prefix) / "triton-onnxruntime"
    if not (lib / "onnxruntime").is_dir():
        pytest.skip(f"onnxruntime {TRITON_ONNXRUNTIME} is not in {lib} (scripts/setup.sh --tests installs it)")
    src = Path(__file__).parent.parent / "src"
    done = subprocess.run([sys.executable, "-c", f"import onnxruntime\nassert onnxruntime.__version__ == "
                           f"{TRITON_ONNXRUNTIME!r}, onnxruntime.__version__\n{code}", *args], capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": f"{lib}:{src}", "PATH": "/usr/bin:/bin",
                                                       "HOME": str(lib)})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _load_in_tritons_onnxruntime(graphs: list[Path]) -> list[str]:
    """Each graph opened in the ONNX Runtime of the pinned Triton's onnxruntime backend: "" where it loads,
    else the first line of its error."""
    code = ("import sys, json, onnxruntime as ort\n"
            "errors = []\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n"
            "        ort.InferenceSession(path, providers=['CPUExecutionProvider']); errors.append('')\n"
            "    except Exception as e:\n"
            "        errors.append(str(e).splitlines()[0])\n"
            "print(json.dumps(errors))\n")
    return json.loads(_in_tritons_onnxruntime(code, *map(str, graphs)).splitlines()[-1])


def test_an_older_onnxruntime_that_refuses_the_fused_form_says_which_was_used(tiny_build):
    """The same build opened with the ONNX Runtime of Triton 2.51's backend (1.19.2, older than the 1.32 it
    was made with): its fused decoder does not load there, and the error says which version the build was
    checked with and what to do (the python models in an image with an older onnxruntime-gpu meet this)."""
    from vlm_export.model_repository.render import TRITON_ONNXRUNTIME

    path = tiny_build("llava-llama").path
    code = ("import sys\nfrom vlm_export.errors import RunnerError\nfrom vlm_export.runtime.load import open_build\n"
            "try:\n    open_build(sys.argv[1])\nexcept RunnerError as e:\n    print(e)\n")
    said = _in_tritons_onnxruntime(code, str(path)).strip().splitlines()[-1]
    assert said.startswith("ONNX Runtime cannot load ") and "lm_decoder.fused.onnx" in said, said
    built = read_manifest(path)["versions"]["onnxruntime"]
    assert said.endswith(f"the build was made and checked with onnxruntime {built}, this is {TRITON_ONNXRUNTIME}: "
                         f"install onnxruntime {built} or newer (onnxruntime-gpu on a GPU), or rebuild with this one"), said


def _matmul_nbits_graph(path: Path, bits: int) -> Path:
    """y = x @ W with W as one MatMulNBits of ``bits`` (K 32, N 8, one block of 32 per column)."""
    k, n, block = 32, 8, 32
    blob = helper.make_tensor("w", TensorProto.UINT8, [n, 1, block * bits // 8], bytes(n * block * bits // 8), raw=True)
    scales = helper.make_tensor("s", TensorProto.FLOAT, [n], [0.1] * n)
    node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [blob, scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def test_the_onnxruntime_target_serves_what_tritons_onnxruntime_loads(tiny_build, w4_build, tmp_path):
    """Triton 2.51's onnxruntime backend runs ONNX Runtime 1.19.2, not the 1.32 vlm-export builds and checks
    with: the onnxruntime target's graphs are loaded in that very version. The fused decoder is not among
    them (its GroupQueryAttention has inputs 1.19.2 lacks; checked here too); a build that ships only the fused
    form, or MatMulNBits of 8 bits (1.19.2 runs 4), is refused in one line with what to do, nothing written."""
    from vlm_export.model_repository.render import (RepositoryOptions, TRITON_ONNXRUNTIME, check_triton_onnxruntime,
                                                    render_repository)

    path = tiny_build("llava-llama").path
    ort = render_repository(path, tmp_path / "ort", RepositoryOptions(target="onnxruntime"), echo=lambda _: None)
    served = sorted(ort.glob("*/1/model.onnx"))
    assert [p.parent.parent.name for p in served] == ["lm_decoder", "projector", "vision_encoder"]
    fused = path / read_manifest(path)["graphs"]["lm_decoder"]["forms"]["fused"]["file"]
    *loaded, fused_error = _load_in_tritons_onnxruntime([*served, fused])
    assert loaded == ["", "", ""], loaded
    assert "GroupQueryAttention" in fused_error, fused_error
    with pytest.raises(RepositoryError) as e:
        render_repository(w4_build.path, tmp_path / "w4", RepositoryOptions(target="onnxruntime"))
    assert str(e.value).startswith("lm_decoder ships only ONNX Runtime's fused form, which Triton's onnxruntime "
                                   f"backend (ONNX Runtime {TRITON_ONNXRUNTIME}) cannot load; serve it with the python "
                                   "target (vlm-export's own onnxruntime runs it), or build with --no-fuse --lm-head w4") \
        and "\n" not in str(e.value)
    assert not (tmp_path / "w4").exists()
    # MatMulNBits: 4 bits load there, 8 do not, and the check says so before Triton would
    four, eight = _matmul_nbits_graph(tmp_path / "four.onnx", 4), _matmul_nbits_graph(tmp_path / "eight.onnx", 8)
    assert _load_in_tritons_onnxruntime([four])[0] == ""
    assert "Only 4b quantization is supported" in _load_in_tritons_onnxruntime([eight])[0]
    manifest = {"graphs": {"lm_decoder": {"file": "eight.onnx", "precision": "w8"}}}
    with pytest.raises(RepositoryError, match=r"^lm_decoder has MatMulNBits weights of 8 bits, which Triton's "
                                              r"onnxruntime backend \(ONNX Runtime 1.19.2\) does not run"):
        check_triton_onnxruntime(tmp_path, manifest)
    check_triton_onnxruntime(tmp_path, {"graphs": {"lm_decoder": {"file": "four.onnx", "precision": "w4"}}})

def _parameters(model_dir: Path) -> dict[str, str]:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    return {k: v.string_value for k, v in cfg.parameters.items()}


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_on_a_gpu_the_tensorrt_provider_gets_one_profile_per_stage(tiny_build, monkeypatch):
    """open_build on cuda gives ONNX Runtime's TensorRT provider each stage's range as one profile: the
    decoder's covers a prefill (many tokens, empty past) and a decode step (one token, a past up to
    max_sequence - 1), so neither makes TensorRT build again. This onnxruntime lists the GPU providers
    only by the test's say-so; the sessions then run on the CPU."""
    import vlm_export.runtime.devices as devices

    monkeypatch.setattr(devices, "available_providers", lambda: [devices.TRT_EP, devices.CUDA_EP, devices.CPU_EP])
    build = tiny_build("llava-llama")
    pipe = open_build(build.path, device="cuda")
    limits = build.manifest["limits"]
    for stage, runner in pipe.runners.items():
        name, trt = runner.requested_providers[0]
        assert name == devices.TRT_EP
        want = one_profile(stage_profiles(build.manifest, stage))
        assert trt["trt_profile_opt_shapes"] == ",".join(f"{n}:{'x'.join(map(str, s[1]))}" for n, s in want.items())
    decoder = pipe.runners["lm_decoder"].requested_providers[0][1]
    low, high = (dict(item.split(":") for item in decoder[f"trt_profile_{k}_shapes"].split(",")) for k in ("min", "max"))
    assert low["input_ids"] == "1x1" and high["input_ids"] == f"{limits['max_batch']}x{limits['max_sequence']}"
    past_low, past_high = low["past_key_values.0.key"].split("x"), high["past_key_values.0.key"].split("x")
    assert past_low[2] == "0" and int(past_high[2]) == limits["max_sequence"] - 1
    assert "trt_int8_enable" not in decoder and decoder["trt_fp16_enable"] is False  # an fp32 build
    # the precision's flags, read from the manifest: an int8 decoder gets TensorRT's INT8 flag, fp16 its FP16 one,
    # and so does the w4 DequantizeLinear form, which computes in fp16 (W4A16)
    for precision, form, flags in (("int8", None, (False, True)), ("fp16", None, (True, False)),
                                   ("w4", "matmulnbits", (False, False)), ("w4", "dequantize", (True, False))):
        graphs = {**build.manifest["graphs"], "lm_decoder": {**build.manifest["graphs"]["lm_decoder"], "precision": precision,
                                                             "variant": {"form": form} if form else {}}}
        settings = trt_settings({**build.manifest, "graphs": graphs}, "lm_decoder")
        assert (settings["fp16"], settings["int8"]) == flags and settings["trt_profiles"] == one_profile(
            stage_profiles(build.manifest, "lm_decoder"))


def test_one_profile_covers_every_profile():
    prefill = {"ids": ((1, 1), (1, 64), (2, 128)), "past": ((1, 0), (1, 0), (2, 0))}
    decode = {"ids": ((1, 1), (1, 1), (2, 1)), "past": ((1, 1), (1, 100), (2, 127))}
    assert one_profile([prefill, decode]) == {"ids": ((1, 1), (1, 1), (2, 128)), "past": ((1, 0), (1, 100), (2, 127))}
    assert one_profile([prefill]) == prefill


def _fusion_then(monkeypatch, edit) -> None:
    """The build's fusion pass as it is, then ``edit(model)`` applied to the fused graph it wrote (a wrong
    rewrite, as a bug of the pass would leave it)."""
    import vlm_export.build as build_module

    real = build_module.fuse_decoder

    def fused_then_edited(src, dst, max_positions, layer_windows, causal):
        report = real(src, dst, max_positions=max_positions, layer_windows=layer_windows, causal=causal)
        model = onnx.load(str(dst))
        edit(model)
        onnx.save(model, str(dst))
        return report

    monkeypatch.setattr(build_module, "fuse_decoder", fused_then_edited)


@pytest.mark.parametrize("precision, cause", [("fp32", "a bug of the fusion pass on this model"),
                                              ("decoder=int8", "each form is converted to int8 on its own")])
def test_a_fused_form_that_fails_parity_falls_back_to_the_standard_graph(tiny_model_dir, tmp_path, monkeypatch,
                                                                         precision, cause):
    """A fusion that changes the model's outputs (here: the real pass, then one RMSNorm weight of its
    graph scaled, as a wrong rewrite would) costs the speed-up, not the build: the fused files go, the
    onnxruntime target runs the standard graph, judged again as the candidate, and the fused form's
    failures stay in the manifest. The reason names the likely cause: the pass, or at a reduced precision
    also that precision's own conversion of each form."""
    import numpy as np
    from onnx import numpy_helper

    def scale_a_norm(model):
        norm = next(n for n in model.graph.node if n.op_type == "SkipSimplifiedLayerNormalization")
        weight = next(t for t in model.graph.initializer if t.name == norm.input[2])
        weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * np.float32(3.0), weight.name))

    _fusion_then(monkeypatch, scale_a_norm)
    result = build(tiny_model_dir("llava-llama"), tmp_path / "fallback",
                   BuildOptions(parity_new_tokens=4, precision=parse_precision(precision)))
    manifest = result.manifest
    decoder = manifest["graphs"]["lm_decoder"]
    fusion = decoder["fusion"]
    assert fusion["made"] is False and "failed parity where the standard graph passed" in fusion["reason"]
    assert cause in fusion["reason"]
    assert fusion["parity_failures"] and all(f.startswith(("prefill/", "decode/", "end-to-end onnxruntime"))
                                             for f in fusion["parity_failures"])
    assert fusion["nodes_after"] < fusion["nodes_before"]  # what the pass did is still on record
    assert "forms" not in decoder and not (result.path / "graphs" / "lm_decoder.fused.onnx").exists()
    assert manifest["targets"]["onnxruntime"]["lm_decoder"] == "standard"
    assert read_manifest(result.path) == manifest and verify_hashes(result.path, manifest) == []
    report = json.loads((result.path / "report.json").read_text())
    assert report["passed"] and not any(name.startswith(("prefill (", "decode (")) for name in report["stages"])
    assert {"prefill", "decode"} <= set(report["stages"])  # the standard graph, judged as the candidate
    out = generate(open_build(result.path), "What is this?", [], GenerationConfig(max_new_tokens=3))
    assert out.completion_tokens == 3



def test_a_failure_the_standard_graph_shares_is_not_blamed_on_the_fusion_pass(tmp_path, monkeypatch):
    """Hugging Face's longrope (Phi-3) picks its long or short factors by the largest position of the whole
    batch, so in the batched end-to-end check a row's tokens change once a longer batch-mate passes the
    original context (64 here), where HF's generate ran each prompt alone (found on a prefix model with one
    prefix token). As vlm-export loads it (per row: adapters.loading.longrope_per_row) the model builds.
    With Hugging Face's own rotary the build says why first; the fused form fails, and the standard graph,
    judged in its place, fails the same way: the record says the failure is not the fusion pass's."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    import vlm_export.adapters.loading as loading
    from tiny_models import make_tiny_prefix
    from vlm_export.errors import ParityError

    model = make_tiny_prefix(tmp_path / "model", family="phi3-longrope", num_prefix_tokens=1)
    notes = recorded_notes()
    result = build(model, tmp_path / "per-row", BuildOptions(max_sequence=256), progress=notes)
    assert result.failures == [] and not [n for n in notes.lines if "longrope" in n]
    assert result.manifest["scheme"]["geometry"]["batch_switched_positions"] is None
    monkeypatch.setattr(loading, "longrope_per_row", lambda model: 0)  # Hugging Face's rotary, as it is
    with pytest.raises(ParityError, match="end-to-end onnxruntime batched: greedy tokens differ"):
        build(model, tmp_path / "build", BuildOptions(max_sequence=256), progress=notes)
    # said before anything is exported: the config's longrope switch (64) is below the build's 256 positions
    assert [n for n in notes.lines if "longrope" in n][0] == (
        "the language model's longrope rotary switches to its long factors once the batch's longest row passes 64 "
        "positions, as Hugging Face's forward does: a shorter row batched with it then answers differently than "
        "alone; --max-sequence 64 or --max-batch 1 keeps rows independent")
    manifest = json.loads((tmp_path / "build.failed" / "manifest.failed.json").read_text())
    reason = manifest["graphs"]["lm_decoder"]["fusion"]["reason"]
    assert reason.startswith("its fused form failed parity (") and "and so did the standard graph judged in its " \
        "place" in reason and reason.endswith("the model's export or its settings, not the fusion pass"), reason
    assert "a bug of the fusion pass" not in reason


@pytest.mark.parametrize("config,switch", [
    ({"rope_parameters": {"rope_type": "longrope", "original_max_position_embeddings": 4096}}, 4096),
    ({"rope_scaling": {"type": "longrope"}, "original_max_position_embeddings": 2048}, 2048),  # 4.x spelling
    ({"rope_parameters": {"full_attention": {"rope_type": "longrope", "original_max_position_embeddings": 8},
                          "sliding_attention": {"rope_type": "default"}}}, 8),  # one per attention type
    ({"rope_parameters": {"rope_type": "yarn", "original_max_position_embeddings": 4096}}, None),
    ({}, None),
])
def test_the_longrope_switch_is_read_from_the_config(config, switch):
    from types import SimpleNamespace

    from vlm_export.adapters.decoder import longrope_switch

    assert longrope_switch(SimpleNamespace(**config)) == switch

def test_a_fused_form_onnx_runtime_refuses_falls_back_to_the_standard_graph(tiny_model_dir, tmp_path, monkeypatch):
    """A fused form ONNX Runtime cannot load (here: the real pass, then one attention kernel's
    ``kv_num_heads`` dropped, as a rewrite that misses a kernel's unstated limit would leave it) costs
    the speed-up, not the build: the standard graph runs and is judged as the candidate, and the
    runtime's refusal is the recorded reason, naming the file and not the build's temporary folder."""
    def drop_kv_heads(model):
        kernel = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
        kept = [a for a in kernel.attribute if a.name != "kv_num_heads"]
        del kernel.attribute[:]
        kernel.attribute.extend(kept)

    _fusion_then(monkeypatch, drop_kv_heads)
    result = build(tiny_model_dir("llava-llama"), tmp_path / "refused", BuildOptions(parity_new_tokens=4))
    fusion = result.manifest["graphs"]["lm_decoder"]["fusion"]
    assert fusion["made"] is False and "parity_failures" not in fusion
    assert fusion["reason"].startswith("ONNX Runtime could not load or run its fused form")
    assert "kv_num_heads" in fusion["reason"] and "graphs/lm_decoder.fused.onnx" in fusion["reason"]
    assert ".tmp" not in fusion["reason"]
    assert result.manifest["targets"]["onnxruntime"]["lm_decoder"] == "standard"
    assert not (result.path / "graphs" / "lm_decoder.fused.onnx").exists()
    assert verify_hashes(result.path, result.manifest) == []
    assert json.loads((result.path / "report.json").read_text())["passed"]


@pytest.mark.parametrize("edit, says", [("scale", "failed parity where the standard graph passed"),
                                        ("heads", "ONNX Runtime could not load or run its fused form")])
def test_an_image_stage_whose_fused_form_fails_falls_back_alone(tiny_model_dir, tmp_path, monkeypatch, edit, says):
    """The image stage's fused form (export/image_fuse.py) is judged like the decoder's: a wrong rewrite (here
    the real pass, then its first attention kernel's scale doubled, or its head count dropped, which ONNX Runtime
    refuses) costs that stage's fused form only - the decoder keeps its own - and the build passes."""
    import vlm_export.build as build_module

    real = build_module.fuse_image_stage

    def fused_then_edited(src, dst, loaded=None):
        report = real(src, dst, loaded)
        model = onnx.load(str(dst))
        kernel = next(n for n in model.graph.node if n.op_type == "MultiHeadAttention")
        kept = [a for a in kernel.attribute if a.name != {"scale": "scale", "heads": "num_heads"}[edit]]
        scale = next(a.f for a in kernel.attribute if a.name == "scale")
        del kernel.attribute[:]
        kernel.attribute.extend(kept + ([helper.make_attribute("scale", 2 * scale)] if edit == "scale" else []))
        onnx.save(model, str(dst))
        return report

    monkeypatch.setattr(build_module, "fuse_image_stage", fused_then_edited)
    result = build(tiny_model_dir("llava-llama"), tmp_path / "fallback", BuildOptions(parity_new_tokens=4))
    manifest = result.manifest
    fusion = manifest["graphs"]["vision_encoder"]["fusion"]
    assert fusion["made"] is False and says in fusion["reason"], fusion["reason"]
    assert all(f.startswith(("vision_encoder/", "end-to-end onnxruntime")) for f in fusion.get("parity_failures", []))
    assert "forms" not in manifest["graphs"]["vision_encoder"]
    assert not (result.path / "graphs" / "vision_encoder.fused.onnx").exists()
    assert manifest["targets"]["onnxruntime"] == {"vision_encoder": "standard", "projector": "standard",
                                                  "lm_decoder": "fused"}
    report = json.loads((result.path / "report.json").read_text())
    assert report["passed"] and "vision_encoder (standard form)" not in report["stages"]
    assert "prefill (standard form)" in report["stages"] and verify_hashes(result.path, manifest) == []
