"""The parity policy's own failures: the judge on made-up metrics (numbers worked out by hand),
NaN from a real graph, greedy tokens that differ, and `verify` / `eval` exiting 1 on builds whose
answers drifted while every file still matches its manifest hash. The default cosine gates are
shown rejecting a variant whose weights were really damaged, and passing one really rounded to fp16."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import numpy as np
import onnx
from onnx import numpy_helper

from vlm_export.compare.accuracy import AccuracyResult
from vlm_export.compare.metrics import ExactMetrics, TensorMetrics, TokenMetrics
from vlm_export.compare.parity import ParityResult, Sample
from vlm_export.compare.policy import FLOAT64_SPREAD, AccuracyGate, ParityPolicy, Tolerance
from vlm_export.manifest import read_manifest, sha256_file, write_manifest

FP32_BUILD = {"vision_encoder": "fp32", "projector": "fp32", "lm_decoder": "fp32"}


def metrics(max_abs: float, cosine: float = 1.0, ref_max_abs: float = 1.0) -> TensorMetrics:
    return TensorMetrics(max_abs, max_abs / 2, cosine, ref_max_abs)


# --------------------------------------------------------------------------- the judge, made-up metrics


def test_fp32_gate_allows_atol_plus_rtol_times_the_reference_scale():
    policy = ParityPolicy.for_precisions(FP32_BUILD, "lm_decoder")
    # allowed = 1e-4 + 1e-4 x 1.0 = 2e-4
    assert policy.judge({"vision_encoder": {"image_features": metrics(1.9e-4)}}, {}) == []
    # allowed = 1e-4 + 1e-4 x 0.1 = 1.1e-4
    assert policy.judge({"prefill": {"logits": metrics(1.5e-4, ref_max_abs=0.1)}}, {}) == \
        ["prefill/logits: max abs error 0.00015 > 0.00011"]
    # logits of magnitude 1000 may be off by 0.1001
    assert policy.judge({"decode": {"logits": metrics(0.1, ref_max_abs=1000.0)}}, {}) == []
    assert policy.judge({"decode": {"logits": metrics(0.11, ref_max_abs=1000.0)}}, {}) == \
        ["decode/logits: max abs error 0.11 > 0.1"]


def test_a_users_fp32_gate_holds_the_fp32_entries_only():
    """--fp32-atol / --fp32-rtol: every fp32 entry (and one the policy does not name) takes the user's gate, the
    reduced precisions keep their cosine gates, and an adapter's override starts from the user's gate."""
    gate = Tolerance(atol=1e-3, rtol=0.0)
    policy = ParityPolicy.for_precisions({"vision_encoder": "fp32", "projector": "fp16", "lm_decoder": "fp32"},
                                         "lm_decoder", gate)
    assert policy.tolerance("vision_encoder") == policy.tolerance("decode") == policy.tolerance("other") == gate
    assert policy.tolerance("projector").min_cosine == 0.999
    assert policy.judge({"prefill": {"logits": metrics(9e-4)}}, {}) == []
    assert policy.judge({"prefill": {"logits": metrics(1.1e-3)}}, {}) == ["prefill/logits: max abs error 0.0011 > 0.001"]
    assert policy.with_overrides({"decode": {"min_cosine": 0.5}}).tolerance("decode") == replace(gate, min_cosine=0.5)


def test_verify_judges_by_the_builds_fp32_gate_unless_given_another(tiny_build, tmp_path, capsys):
    """The gate given to build or verify is recorded in the manifest and the report, and a later verify keeps it.
    The projector's weights carry 1e-5 relative noise: within the default gate, but a hundred times PyTorch fp32's
    own distance from float64 there, which the float64 check (run on every element-wise fp32 failure) reports."""
    from vlm_export.cli import main

    build = drifted_copy(tiny_build("llava-llama").path, tmp_path / "build", "projector", noise=1e-5)
    exact = ["--fp32-atol", "0", "--fp32-rtol", "0"]  # no float error at all: the projector must miss it
    assert main(["verify", str(build), "--parity-tokens", "2", *exact]) == 1
    out = capsys.readouterr().out
    assert "projector/image_embeds: max abs error" in out and "(against PyTorch in float64: max abs error" in out
    assert read_manifest(build)["parity"]["fp32_tolerance"] == {"atol": 0.0, "rtol": 0.0}
    report = json.loads((build / "report.json").read_text())
    measured = report["stages"]["projector"]["image_embeds"]["float64"]
    # PyTorch fp32 really is off float64 (it ran in another arithmetic), by far less than the noise
    assert 0 < FLOAT64_SPREAD * measured["reference"]["max_abs"] < measured["candidate"]["max_abs"]
    assert report["stages"]["projector"]["image_embeds"]["passed"] is False
    markdown = (build / "report.md").read_text()
    assert "The fp32 gate was set by the user" in markdown and "measured against PyTorch in float64" in markdown
    assert main(["verify", str(build), "--parity-tokens", "2"]) == 1  # the recorded gate again
    assert json.loads((build / "report.json").read_text())["fp32_gate"] == {"atol": 0.0, "rtol": 0.0}
    assert main(["verify", str(build), "--parity-tokens", "2", "--fp32-atol", "1e-4"]) == 0
    assert read_manifest(build)["parity"]["fp32_tolerance"] == {"atol": 1e-4, "rtol": 1e-4}


def test_an_fp32_failure_is_judged_again_against_pytorch_in_float64():
    """An element-wise fp32 failure measured against PyTorch in float64 passes when the graph is within
    FLOAT64_SPREAD x PyTorch fp32's own distance from float64 plus the gate, and otherwise says both
    distances; reduced precisions' (cosine-only) failures are not arbitrated."""
    policy = ParityPolicy.for_precisions({"vision_encoder": "fp32", "projector": "int8", "lm_decoder": "fp32"},
                                         "lm_decoder")
    stages = {"vision_encoder": {"image_features": metrics(1.6, ref_max_abs=1400.0)},  # gate 0.1401
              "decode": {"logits": metrics(4.7e-4, ref_max_abs=0.67)},  # gate 1.67e-4
              "projector": {"image_embeds": metrics(1.0, cosine=0.9)}}
    assert policy.needs_exact(stages) == ["vision_encoder", "decode"]
    exact = {"vision_encoder": {"image_features": [ExactMetrics(metrics(1.45, ref_max_abs=1400.0),  # PyTorch fp32
                                                                metrics(0.17, ref_max_abs=1400.0))]},  # the graph
             "decode": {"logits": [ExactMetrics(metrics(4.6e-6, ref_max_abs=0.67), metrics(4.7e-4, ref_max_abs=0.67))]}}
    failures = policy.judge(stages, {}, exact)
    assert [f.split(":")[0] for f in failures] == ["decode/logits", "projector/image_embeds"]
    allowed = FLOAT64_SPREAD * 4.6e-6 + 1e-4 + 1e-4 * 0.67
    assert failures[0] == ("decode/logits: max abs error 0.00047 > 0.000167 (against PyTorch in float64: max abs "
                           f"error 0.00047 from float64, PyTorch fp32's 4.6e-06: more than 10x that + the gate = "
                           f"{allowed:.3g})")
    # PyTorch fp32 itself 4.6e-5 from float64 there (an ill-conditioned step): the graph's 4.7e-4 is its arithmetic
    ill_conditioned = ExactMetrics(metrics(4.6e-5, ref_max_abs=0.67), metrics(4.7e-4, ref_max_abs=0.67))
    exact["decode"]["logits"] = [ill_conditioned]
    assert policy.judge(stages, {}, exact) == ["projector/image_embeds: cosine 0.900000 < 0.99"]
    # each call on its own: one sample's large fp32 error does not excuse another sample's graph error
    well_conditioned = ExactMetrics(metrics(3e-7, ref_max_abs=0.67), metrics(4e-4, ref_max_abs=0.67))
    exact["decode"]["logits"] = [ill_conditioned, well_conditioned]
    assert [f.split(":")[0] for f in policy.judge(stages, {}, exact)] == ["decode/logits", "projector/image_embeds"]
    assert "PyTorch fp32's 3e-07" in policy.judge(stages, {}, exact)[0]
    assert policy.passed_by_float64(stages, exact) == ["vision_encoder/image_features"]
    # direction too: a cosine deficit may be FLOAT64_SPREAD squared times PyTorch's, plus the gate's
    tol = Tolerance()
    assert tol.check_exact(ExactMetrics(metrics(0, cosine=1 - 1e-7), metrics(0, cosine=1 - 1.9e-5))) == []
    assert tol.check_exact(ExactMetrics(metrics(0, cosine=1 - 1e-7), metrics(0, cosine=1 - 2.1e-5))) == [
        "cosine 0.999979 with float64, PyTorch fp32's 1.000000: below 0.999980"]
    nan = ExactMetrics(metrics(1e-6), metrics(float("nan")))
    assert len(tol.check_exact(nan)) == 1 and "nan" in tol.check_exact(nan)[0]


def test_every_failing_stage_and_output_is_named():
    policy = ParityPolicy.for_precisions(FP32_BUILD, "lm_decoder")
    stages = {
        "vision_encoder": {"image_features": metrics(1e-6, cosine=0.9999)},  # close, but not in direction
        "projector": {"image_embeds": metrics(1e-6)},  # passes
        "decode": {"logits": metrics(1.0, cosine=0.5), "present.*.key": metrics(1e-6, cosine=0.99998)},
    }
    assert policy.judge(stages, {}) == [
        "vision_encoder/image_features: cosine 0.999900 < 0.99999",
        "decode/logits: max abs error 1 > 0.0002",
        "decode/logits: cosine 0.500000 < 0.99999",
        "decode/present.*.key: cosine 0.999980 < 0.99999",
    ]


def test_reduced_precisions_are_judged_by_their_own_cosine_gates():
    policy = ParityPolicy.for_precisions({"vision_encoder": "int8", "projector": "fp16", "lm_decoder": "w4"},
                                         "lm_decoder")
    assert not policy.require_identical_tokens
    passing = {"vision_encoder": {"image_features": metrics(3.0, cosine=0.995)},  # int8: cosine >= 0.99, any max abs
               "projector": {"image_embeds": metrics(0.5, cosine=0.9995)},  # fp16: cosine >= 0.999
               "prefill": {"logits": metrics(7.0, cosine=0.991)}, "decode": {"logits": metrics(7.0, cosine=0.991)}}
    assert policy.judge(passing, {}) == []
    failing = {"vision_encoder": {"image_features": metrics(0.1, cosine=0.98)},
               "projector": {"image_embeds": metrics(0.1, cosine=0.998)},
               "prefill": {"logits": metrics(0.1, cosine=0.9899)}}
    assert policy.judge(failing, {}) == ["vision_encoder/image_features: cosine 0.980000 < 0.99",
                                         "projector/image_embeds: cosine 0.998000 < 0.999",
                                         "prefill/logits: cosine 0.989900 < 0.99"]
    # an override loosens only what it names
    loose = ParityPolicy.for_precisions(FP32_BUILD, "lm_decoder").with_overrides({"prefill": {"atol": 1e-2}})
    assert loose.judge({"prefill": {"logits": metrics(5e-3)}, "decode": {"logits": metrics(5e-3)}}, {}) == \
        ["decode/logits: max abs error 0.005 > 0.0002"]


def test_greedy_tokens_that_differ_fail_fp32_builds_only():
    tokens = {"onnxruntime": [TokenMetrics("same", [5, 6, 7], [5, 6, 7]),
                              TokenMetrics("changed", [5, 6, 7], [5, 9, 7]),
                              TokenMetrics("stopped early", [5, 6, 7], [5, 6]),
                              TokenMetrics("ran on", [5, 6], [5, 6, 8])],
              "torch_split": [TokenMetrics("same", [1, 2], [1, 2])]}
    assert ParityPolicy.for_precisions(FP32_BUILD, "lm_decoder").judge({}, tokens) == [
        "end-to-end onnxruntime: greedy tokens differ from token 1 for prompt 'changed'",
        "end-to-end onnxruntime: greedy tokens differ from token 2 for prompt 'stopped early'",
        "end-to-end onnxruntime: greedy tokens differ from token 2 for prompt 'ran on'",
    ]
    # a reduced-precision build may move tokens: its gates are cosine and task accuracy
    w4 = ParityPolicy.for_precisions({**FP32_BUILD, "lm_decoder": "w4"}, "lm_decoder")
    assert w4.judge({}, tokens) == []


def test_where_greedy_tokens_part_the_margin_is_measured_and_said():
    """Where the answers part, the candidate's own token's lead over the reference's (in its log-probabilities)
    at every departure measured: in the failure line and the report. A run followed along the reference's tokens
    is a near tie only where every departure is; a batched row's first divergence is read from its top tokens
    (unknown where either side stopped there or the reference's token is not among the likeliest)."""
    from vlm_export.compare.parity import _margin
    from vlm_export.runtime.generate import GenerationResult, TokenLogprob, TokenText

    def step(token, logprob, *top):
        return TokenLogprob(TokenText(token, "", None), logprob, tuple((TokenText(t, "", None), p) for t, p in top))

    got = GenerationResult("", [5, 9, 7], "length", 3, logprobs=[
        step(5, -0.1, (5, -0.1)), step(9, -0.69, (9, -0.69), (6, -0.70)), step(7, -0.2, (7, -0.2))])
    assert abs(_margin([5, 6, 7], got) - 0.01) < 1e-12
    assert _margin([5, 4, 7], got) is None  # 4 not among the candidate's top
    assert _margin([5, 9, 7], got) is None  # identical
    assert _margin([5, 9, 7, 8], got) is None  # the candidate stopped where the reference went on
    policy = ParityPolicy.for_precisions(FP32_BUILD, "lm_decoder")
    tokens = {"onnxruntime batched": [TokenMetrics("changed", [5, 6, 7], [5, 9, 7], ((1, _margin([5, 6, 7], got)),))]}
    assert policy.judge({}, tokens) == ["end-to-end onnxruntime batched: greedy tokens differ from token 1 for prompt "
                                        "'changed' (its own token led the reference's: margin 0.01 at token 1, in "
                                        "log-probability: not a near tie)"]
    # beside measured decode logits (largest magnitude 20: the gate allows 1e-4 + 1e-4 x 20 = 2.1e-3), a margin
    # beyond twice that is a drift, one within it a near tie an fp32 build passes (the manifest lists it)
    stages = {"decode": {"logits": metrics(1e-5, ref_max_abs=20.0)}}
    assert policy.near_tie_bound(stages) == 2 * (1e-4 + 1e-4 * 20.0)
    assert policy.judge(stages, tokens) == [
        "end-to-end onnxruntime batched: greedy tokens differ from token 1 for prompt 'changed' (its own token led "
        "the reference's: margin 0.01 at token 1, in log-probability; twice the logits error the decode gate allows "
        "is 0.0042: not a near tie)"]
    tie = {"onnxruntime": [TokenMetrics("tie", [5, 6, 7, 8], [5, 9, 8], ((1, 4e-3), (3, 1e-3)), followed=True),
                           TokenMetrics("then a drift", [5, 6, 7, 8], [5, 9, 8], ((1, 4e-3), (3, 0.5)), followed=True),
                           TokenMetrics("gone", [5, 6], [5, 9], (), followed=True)],
           "torch_split": [TokenMetrics("unknown", [5, 6], [5, 9])]}  # nothing measured: never a near tie
    assert policy.judge(stages, tie) == [
        "end-to-end onnxruntime: greedy tokens differ from token 1 for prompt 'then a drift' (its own token led the "
        "reference's along the reference's tokens: margins 0.004, 0.5 at tokens 1, 3, in log-probability; twice the "
        "logits error the decode gate allows is 0.0042: not a near tie)",
        "end-to-end onnxruntime: greedy tokens differ from token 1 for prompt 'gone' (along the reference's tokens it "
        "chose the same ones: not reproduced)",
        "end-to-end torch_split: greedy tokens differ from token 1 for prompt 'unknown'"]
    assert policy.near_ties(stages, tie) == ["onnxruntime: 'tie' from token 1 (margins 0.004, 0.001 at tokens 1, 3 "
                                             "<= 0.0042)"]
    many = TokenMetrics("many", [1] * 9, [2] * 9, tuple((i, 0.1) for i in range(7)), followed=True)
    assert "margins 0.1, 0.1, 0.1, 0.1, 0.1 at tokens 0, 1, 2, 3, 4 and 2 more" in policy.judge(stages, {"x": [many]})[0]
    # a user's zero gate leaves no room for ties; a reduced-precision build's tokens are not gated at all
    zero = ParityPolicy.for_precisions(FP32_BUILD, "lm_decoder", Tolerance(atol=0.0, rtol=0.0))
    assert zero.near_tie_bound(stages) == 0 and zero.near_ties(stages, tie) == []
    assert len([f for f in zero.judge(stages, tie) if f.startswith("end-to-end")]) == 4
    reduced = ParityPolicy.for_precisions({**FP32_BUILD, "lm_decoder": "w4"}, "lm_decoder")
    assert reduced.near_tie_bound(stages) is None and reduced.judge(stages, tie) == [] and reduced.near_ties(stages, tie) == []


def test_a_divergence_is_followed_along_the_references_tokens_to_the_end(tiny_build):
    """On a real build, against references that took another token than the build would: parity runs the build
    again along the reference's tokens and measures every place it would choose otherwise, so a near tie (here
    the runner-up token at 3, passed by a gate loose enough) does not hide a later drift (the least likely token
    at 8, forced after it). A batched row is held to the build's own answer alone, and followed the same way in a
    forced batch."""
    from vlm_export.compare.parity import TokenCase, compare_batched, compare_tokens
    from vlm_export.runtime.generate import GenerationConfig, generate_result
    from vlm_export.runtime.load import open_build

    from PIL import Image

    pipe = open_build(tiny_build("llava-llama").path)
    prompt, photo = "What is in the picture?", Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3),
                                                                                                   dtype=np.uint8))
    ids, pixels = pipe.prompt_ids(prompt, 1), pipe.pixel_values([photo])
    image = pipe.encode_images(pixels, prompt=prompt)
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True, logprobs=True, top_logprobs=2)
    own = generate_result(pipe, ids, image, config)
    (best, best_p), (second, second_p) = own.logprobs[3].top
    tie = generate_result(pipe, ids, image, replace(config, forced_tokens=(*own.token_ids[:3], second.token_id)))
    logits, _ = pipe.prefill(ids + tie.token_ids[:8], image)
    drift = [*tie.token_ids[:8], int(np.argmin(logits)), *tie.token_ids[9:]]  # the least likely token at 8
    result = ParityResult()
    compare_tokens([TokenCase(prompt, ids, pixels, tie.token_ids), TokenCase(prompt, ids, pixels, drift)],
                   {"onnxruntime": pipe}, 12, result, batched=("onnxruntime",), follow=("onnxruntime",))
    near, drifted = result.tokens["onnxruntime"]
    assert near.first_divergence == 3 and near.followed and len(near.departures) == 1
    assert near.departures[0][0] == 3 and abs(near.departures[0][1] - (best_p - second_p)) < 1e-4
    assert drifted.first_divergence == 3 and [at for at, _ in drifted.departures[:2]] == [3, 8]
    assert abs(drifted.departures[1][1] - (logits.max() - logits.min())) < 1e-3 * (logits.max() - logits.min())
    # a gate loose enough for the runner-up (twice its atol: the bound) passes the near tie, not the drift after it
    stages = {"decode": {"logits": metrics(0.0)}}
    policy = ParityPolicy.for_precisions(FP32_BUILD, "lm_decoder", Tolerance(atol=near.margin, rtol=0.0))
    assert drifted.departures[1][1] > policy.near_tie_bound(stages) >= near.margin
    failures = policy.judge(stages, result.tokens)
    assert len(failures) == 1 and failures[0].startswith(
        f"end-to-end onnxruntime: greedy tokens differ from token 3 for prompt {prompt!r} (its own token led the "
        f"reference's along the reference's tokens: margins {near.margin:.3g}, "), failures
    assert policy.near_ties(stages, result.tokens) == [f"onnxruntime: {prompt!r} from token 3 (margin "
                                                       f"{near.margin:.3g} at token 3 <= {2 * near.margin:.3g})"]
    # batched, each row answers as the build does alone (not as the reference)
    batched = result.tokens["onnxruntime batched"]
    assert [r.reference for r in batched] == [near.candidate, drifted.candidate] and all(r.identical for r in batched)
    # a batch held to answers it does not give (as a batch that changed an answer would be): each parted row's
    # first divergence is measured, and followed, every departure along its expected tokens, in one forced batch
    rows = [(TokenCase(prompt, ids, pixels, tokens), image) for tokens in (tie.token_ids, near.candidate, drift)]
    free = compare_batched(pipe, rows, GenerationConfig(max_new_tokens=12))
    assert [(r.departures, r.followed) for r in free] == [(((3, free[0].margin),), False), ((), False),
                                                           (((3, free[2].margin),), False)]
    assert abs(free[0].margin - near.margin) < 1e-4 and abs(free[2].margin - near.margin) < 1e-4
    followed = compare_batched(pipe, rows, GenerationConfig(max_new_tokens=12), follow=True)
    assert [r.followed for r in followed] == [True, False, True] and followed[1].identical
    for row, alone in ((followed[0], near), (followed[2], drifted)):
        assert [at for at, _ in row.departures] == [at for at, _ in alone.departures]
        assert np.allclose([m for _, m in row.departures], [m for _, m in alone.departures], rtol=1e-3, atol=1e-4)
    batch_failures = policy.judge(stages, {"onnxruntime batched": followed})
    assert len(batch_failures) == 1 and batch_failures[0].startswith(
        "end-to-end onnxruntime batched: greedy tokens differ from token 3 ") and "not a near tie" in batch_failures[0]


def test_accuracy_gate_on_made_up_results():
    def result(backend: str, correct: int) -> AccuracyResult:
        return AccuracyResult(backend, "shapes", 20, correct, 1.0)

    torch_ref = result("torch", 18)  # 90%
    assert AccuracyGate(1.0).judge(torch_ref, [result("onnxruntime", 18), result("better", 19)]) == []
    assert AccuracyGate(1.0).judge(torch_ref, [result("onnxruntime", 17)]) == [
        "task accuracy: onnxruntime 85.0% vs torch 90.0% on the same 20 shapes questions, a drop of 5.0 points "
        "(at most 1 allowed)"]
    assert AccuracyGate(5.0).judge(torch_ref, [result("onnxruntime", 17)]) == []  # exactly at the limit


def test_nan_in_any_sample_fails_the_stage():
    """NaN measured from arrays as parity measures them: the judge fails the output whichever sample
    held the NaN (merging samples must not drop it), at every precision's gate."""
    rng = np.random.default_rng(0)
    refs = [rng.standard_normal((4, 32)).astype(np.float32) for _ in range(3)]
    for position in range(3):
        outs = [r + 1e-7 for r in refs]
        outs[position][2, 5] = np.nan
        result = ParityResult()
        for r, out in zip(refs, outs):
            result.add("projector", "image_embeds", r, out)
        assert np.isnan(result.stages["projector"]["image_embeds"].max_abs), position
        for precisions in (FP32_BUILD, {**FP32_BUILD, "projector": "fp16"}):
            failures = ParityPolicy.for_precisions(precisions, "lm_decoder").judge(result.stages, {})
            assert any(f.startswith("projector/image_embeds: max abs error nan") for f in failures), failures


def test_nan_from_a_real_graph_fails_parity(tiny_build, tmp_path):
    """One weight of the projector set to NaN (a broken conversion): ONNX Runtime really computes NaN
    rows, and the judge fails the stage."""
    import onnxruntime as ort

    source = tiny_build("llava-llama").path / "graphs" / "projector.onnx"
    model = onnx.load(str(source))
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = numpy_helper.to_array(weight).copy()
    array.flat[7] = np.nan
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    broken = tmp_path / "projector.onnx"
    onnx.save(model, str(broken))

    run = {p: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (source, broken)}
    graph_input = run[source].get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in graph_input.shape]
    features = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    outs = {p: s.run(None, {graph_input.name: features})[0] for p, s in run.items()}
    assert np.isnan(outs[broken]).any() and not np.isnan(outs[source]).any()
    result = ParityResult()
    result.add("projector", "image_embeds", outs[source], outs[broken])
    failures = ParityPolicy.for_precisions(FP32_BUILD, "lm_decoder").judge(result.stages, {})
    assert failures and all(f.startswith("projector/image_embeds: ") for f in failures)
    assert "max abs error nan" in failures[0]


# --------------------------------------------------------------------------- builds whose answers drifted


def drifted_copy(build, dest, stage: str, noise: float | None, precision: str | None = None, seed: int = 0):
    """A copy of ``build`` whose ``stage`` weights (every float matrix, in every form of the stage's
    graph) are changed for real: relative Gaussian noise of ``noise``, or, with ``noise=None``, rounded
    to fp16 and back. The manifest records the new sha256 (and ``precision`` when given), so every hash
    check passes: only parity can tell."""
    shutil.copytree(build, dest)
    manifest = read_manifest(dest)
    for entry in [manifest["graphs"][stage], *(manifest["graphs"][stage].get("forms") or {}).values()]:
        path = dest / entry["file"]
        model = onnx.load(str(path))
        rng = np.random.default_rng(seed)
        changed = 0
        for init in model.graph.initializer:
            if init.data_type != onnx.TensorProto.FLOAT or len(init.dims) < 2:
                continue
            w = numpy_helper.to_array(init)
            w = w.astype(np.float16).astype(np.float32) if noise is None else \
                (w * (1 + noise * rng.standard_normal(w.shape))).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(w, init.name))
            changed += 1
        assert changed
        onnx.save(model, str(path))
        entry["sha256"] = {entry["file"]: sha256_file(path)}
        if precision:
            entry["precision"] = precision
    write_manifest(dest, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    return dest


def test_verify_exits_1_when_the_answers_drifted(tiny_build, tmp_path, capsys):
    """Every file matches the manifest's sha256 (no hash failure), but the decoder no longer answers
    like the source model: `vlm-export verify` names the drifted outputs and the differing tokens,
    exits 1, and records the failed verdict."""
    from vlm_export.cli import main

    build = drifted_copy(tiny_build("llava-llama").path, tmp_path / "drifted", "lm_decoder", noise=0.3)
    assert main(["verify", str(build), "--parity-tokens", "4"]) == 1
    out = capsys.readouterr().out
    assert "parity FAILED" in out and "changed since the build" not in out
    assert "prefill/logits: max abs error" in out and "decode/logits: max abs error" in out
    assert "end-to-end onnxruntime: greedy tokens differ from token" in out
    assert "end-to-end torch_split" not in out  # the split PyTorch modules still answer like the model
    report = json.loads((build / "report.json").read_text())
    assert report["passed"] is False
    assert not all(r["identical"] for r in report["end_to_end"]["onnxruntime"])
    assert all(r["identical"] for r in report["end_to_end"]["torch_split"])
    parted = [r for r in report["end_to_end"]["onnxruntime"] if not r["identical"]]
    # greedy: where the drifted decoder chose another token, its own led the reference's; followed along the
    # reference's tokens, every such place is measured (the first where its answer parted among them)
    assert all(r["followed"] and r["departures"] and r["departures"][0]["token"] == r["first_divergence"]
               and all(d["margin"] >= 0 for d in r["departures"]) for r in parted)
    assert "not a near tie" in out and not any(r["near_tie"] for r in parted)  # 30% noise: drifts, not ties
    assert read_manifest(build)["parity"]["passed"] is False
    assert "FAILED" in (build / "report.md").read_text()


def test_default_cosine_gates_reject_a_damaged_variant_and_pass_a_rounded_one(tiny_build, tmp_path):
    """The gates as the build sets them for the recorded precision, nothing forced: a projector whose
    weights were rounded to fp16 passes the fp16 gate (cosine >= 0.999); one whose weights a broken
    quantizer scrambled (30% relative noise) fails the int8 gate (cosine >= 0.99)."""
    from vlm_export.build import BuildOptions, verify

    options = BuildOptions(samples=[Sample("Describe the picture.", (_photo(),))], parity_new_tokens=2)
    rounded = drifted_copy(tiny_build("llava-llama").path, tmp_path / "fp16", "projector", noise=None,
                           precision="fp16")
    assert verify(rounded, options).failures == []
    measured = json.loads((rounded / "report.json").read_text())["stages"]["projector"]["image_embeds"]
    assert measured["max_abs"] > 0  # the rounding did change the projector's answers

    damaged = drifted_copy(tiny_build("llava-llama").path, tmp_path / "int8", "projector", noise=0.3,
                           precision="int8")
    failures = verify(damaged, options).failures
    assert [f.split(":")[0] for f in failures] == ["projector/image_embeds"], failures
    assert "cosine" in failures[0] and failures[0].endswith("< 0.99")


def _photo():
    from skimage import data

    from PIL import Image

    return Image.fromarray(data.chelsea()).convert("RGB")


def test_eval_exits_1_when_the_build_answers_worse(tiny_build, tmp_path, capsys):
    """Questions whose expected answers are the PyTorch reference's own: the reference scores 100%, a
    build whose decoder drifted scores less, and `vlm-export eval` fails the gate with exit code 1
    (the untouched build passes the same questions)."""
    from PIL import Image
    from skimage import data

    from vlm_export.adapters.reference import open_reference
    from vlm_export.cli import main
    from vlm_export.compare.accuracy import evaluate_vqa
    from vlm_export.datasets import load_items

    good = tmp_path / "good"
    shutil.copytree(tiny_build("llava-llama").path, good)
    drifted = drifted_copy(tiny_build("llava-llama").path, tmp_path / "drifted", "lm_decoder", noise=0.3)
    folder = tmp_path / "vqa"
    folder.mkdir()
    rows = []
    for name in ("chelsea", "coffee", "astronaut"):
        Image.fromarray(getattr(data, name)()).resize((48, 48)).save(folder / f"{name}.png")
        rows.append({"image": f"{name}.png", "question": "What is in the picture?", "answer": "?"})
    (folder / "questions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    _, items = load_items(str(folder))
    answers = evaluate_vqa(open_reference(good), items, "vqa").answers
    assert all(a.strip() for a in answers), answers
    (folder / "questions.jsonl").write_text("\n".join(json.dumps({**r, "answer": a}) for r, a in zip(rows, answers)))

    assert main(["eval", str(good), "--dataset", str(folder)]) == 0
    assert "accuracy gate" in capsys.readouterr().out
    assert main(["eval", str(drifted), "--dataset", str(folder)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"torch +accuracy 100.0%", out) and "FAILED task accuracy: onnxruntime" in out
    recorded = json.loads((drifted / "report.json").read_text())["task_accuracy"]
    assert recorded["gate"]["passed"] is False and recorded["disagreements"]
