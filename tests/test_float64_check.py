"""Parity's float64 check: an fp32 entry that fails its element-wise gate against PyTorch fp32 is measured
against the same model run in float64 on the same inputs (``compare.parity.measure_exact``), and passes when the
graph is within ``FLOAT64_SPREAD`` x PyTorch fp32's own distance from float64, plus the gate
(``policy.Tolerance.check_exact``). The failing side (an export error far beyond the model's rounding) is
tested through ``vlm-export verify`` in test_policy.py."""
from __future__ import annotations

from pathlib import Path

from vlm_export.adapters import adapter_for
from vlm_export.adapters.reference import reference_pipeline
from vlm_export.build import _graph_outputs_for_float64
from vlm_export.compare.parity import (ArrayStore, ParityResult, _groups, default_samples, measure_exact,
                                       record_outputs, record_stages, replay_stages)
from vlm_export.compare.policy import ParityPolicy, Tolerance
from vlm_export.contract import Limits
from vlm_export.progress import Progress


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_a_graph_nearer_the_exact_answer_than_pytorch_fp32_passes_by_float64(tiny_model_dir, tmp_path):
    """The candidate is the model itself in float64 (every stage, real modules): it differs from PyTorch fp32 by
    fp32's rounding alone, so a gate of zero fails every entry against PyTorch fp32, and the float64 check passes
    them all (the candidate is the float64 answer; PyTorch fp32 is measurably off it)."""
    path = tiny_model_dir("llava-llama")
    adapter = adapter_for(path)
    loaded = adapter.load(path)
    limits = Limits(max_batch=2, max_images=1, max_sequence=256,
                    tokens_per_image=adapter.prompt_layout(loaded).tokens_per_image)
    calls = record_stages(reference_pipeline(loaded, limits), default_samples(1)[:2],
                          ArrayStore(_folder(tmp_path / "reference")))
    float64 = reference_pipeline(adapter.load(path), limits, dtype="float64")
    assert {r.dtype for r in float64.runners.values()} == {"fp64"}

    result, policy = ParityResult(), ParityPolicy(fp32=Tolerance(atol=0.0, rtol=0.0))
    replay_stages(calls, float64, result)
    failing = policy.needs_exact(result.stages)
    assert set(failing) == {"vision_encoder", "projector", "prefill", "decode"}
    assert len(policy.judge(result.stages, {})) >= len(failing)

    outputs: dict = {}
    indices = [i for i, call in enumerate(calls) if call.entry in failing]
    for i, files in record_outputs(calls, indices, float64, ArrayStore(_folder(tmp_path / "graph"))).items():
        outputs.setdefault(calls[i].entry, {})[i] = files
    measure_exact(calls, float64, outputs, result)
    assert set(result.exact) == set(failing)
    for entry, measured in result.exact.items():
        assert set(measured) == set(result.stages[entry])  # every output, per-layer ones grouped as judged
        for output, per_call in measured.items():
            # one measurement per recorded call of that output, each judged on its own
            assert len(per_call) == sum(call.entry == entry and output in _groups(call.outputs) for call in calls)
            assert all(m.candidate.max_abs <= 1e-12 for m in per_call), entry
            assert max(m.reference.max_abs for m in per_call) > 0, entry
    assert policy.judge(result.stages, {}, result.exact) == []


def test_no_float64_check_where_the_model_would_not_fit_twice(tiny_model_dir, monkeypatch):
    """float64 doubles the model's memory: where that is not available the failing entries stay as judged against
    PyTorch fp32, and a note says why (nothing is run, nothing loaded)."""
    import vlm_export.build as build_module
    from vlm_export.memory import PROCESS_BASE_BYTES, fp32_weight_bytes

    path = tiny_model_dir("llava-llama")
    monkeypatch.setattr(build_module, "available_bytes", lambda: fp32_weight_bytes(path) + PROCESS_BASE_BYTES)
    notes = []

    class Notes(Progress):
        def note(self, text: str) -> None:
            notes.append(text)

    assert _graph_outputs_for_float64(None, ["decode"], None, None, [], {"path": str(path)}, Notes()) is None
    assert len(notes) == 1 and notes[0].startswith("decode not measured against PyTorch in float64: the model takes")


def test_verify_with_a_zero_gate_passes_what_float64_shows_to_be_rounding(tiny_build, tmp_path, capsys):
    """A build checked again with a gate of zero: every fp32 output misses it against PyTorch fp32 (different
    rounding), so each is measured against PyTorch in float64, and the verdict follows that measurement, output by
    output: the manifest lists those passed only by it, the report shows both distances, the CLI says so."""
    import json
    import shutil

    from vlm_export.cli import main
    from vlm_export.compare.metrics import ExactMetrics, TensorMetrics
    from vlm_export.manifest import read_manifest

    build = Path(shutil.copytree(tiny_build("llava-llama").path, tmp_path / "build"))
    code = main(["verify", str(build), "--parity-tokens", "2", "--fp32-atol", "0", "--fp32-rtol", "0"])
    out = capsys.readouterr().out
    parity, report = read_manifest(build)["parity"], json.loads((build / "report.json").read_text())
    measured = {f"{entry}/{output}": m for entry, outputs in report["stages"].items() for output, m in outputs.items()
                if "float64" in m}
    assert set(measured) >= {"vision_encoder/image_features", "prefill/logits", "decode/logits"}
    gate = Tolerance(atol=0.0, rtol=0.0)
    for name, m in measured.items():
        calls = [ExactMetrics(*(TensorMetrics(**call[side]) for side in ("reference", "candidate")))
                 for call in m["float64"]["calls"]]
        assert m["float64"]["reference"]["max_abs"] > 0  # PyTorch fp32 is off float64: it ran in float64
        assert m["passed"] == all(gate.check_exact(call) == [] for call in calls), name
    assert parity.get("passed_by_float64", []) == [n for n, m in measured.items() if m["passed"]]
    assert parity["passed_by_float64"]  # ONNX Runtime's rounding is a small multiple of PyTorch's somewhere
    assert code == (0 if parity["passed"] else 1) and parity["passed"] == (not parity["failures"])
    assert "yes, by float64" in (build / "report.md").read_text()
    if parity["passed"]:
        assert "only by the float64 check" in out


def test_only_the_stages_the_check_runs_are_cast(tiny_model_dir):
    """The float64 check of an image stage casts that stage alone: the decoder (most of a model's weights, twice
    them in float64: a 5.6 GB Gemma-4-shaped model's check peaked at 23 GB of this machine's 24 casting all) stays
    fp32."""
    import torch

    path = tiny_model_dir("llava-llama")
    adapter = adapter_for(path)
    loaded = adapter.load(path)
    limits = Limits(max_batch=2, max_images=1, max_sequence=256,
                    tokens_per_image=adapter.prompt_layout(loaded).tokens_per_image)
    pipe = reference_pipeline(loaded, limits, dtype="float64", only={"vision_encoder"})
    dtypes = {name: {p.dtype for p in runner.module.parameters()} for name, runner in pipe.runners.items()}
    assert dtypes["vision_encoder"] == {torch.float64} and pipe.runners["vision_encoder"].dtype == "fp64"
    assert dtypes["lm_decoder"] == {torch.float32} and pipe.runners["lm_decoder"].dtype == "fp32"
