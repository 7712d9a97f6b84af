"""The benchmark harness on the tiny build: it measures every stage on every backend, writes the
JSON, markdown and PNG reports, and its ratios come from its own figures. No timing thresholds:
speed is recorded by benchmarks/, not asserted by tests."""
from __future__ import annotations

import importlib.util
import json

import pytest

from vlm_export.bench import BenchOptions, parse_csv, run_bench
from vlm_export.bench.measure import RequestTiming, alternating, summarize, time_request
from vlm_export.errors import InputError

HAS_TRITON = importlib.util.find_spec("pytriton") is not None and importlib.util.find_spec("tritonclient") is not None
STAGES = {"vision_encoder", "projector", "prefill", "decode_step"}


@pytest.fixture(scope="module")
def bench(tiny_build, tmp_path_factory):
    build = tiny_build("llava-llama").path
    out = tmp_path_factory.mktemp("bench") / "tiny"
    backends = ("torch", "onnxruntime", "triton") if HAS_TRITON else ("torch", "onnxruntime")
    options = BenchOptions(backends=backends, batch=(1, 2), concurrency=(1, 2), new_tokens=4, threads=2,
                           warmup=1, iterations=3, requests=2, bandwidth_mb=64, out=out)
    return run_bench(build, options), out


def test_reports_are_written(bench):
    results, out = bench
    assert set(results["files"]) >= {"json", "markdown", "stages_png"}
    for name in ("stages.png",) + (("concurrency.png",) if HAS_TRITON else ()):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "bench.json").read_text())
    assert saved["format"] == "vlm-export-bench" and saved["stages"] == results["stages"]
    text = (out / "bench.md").read_text()
    for heading in ("## Per stage", "## End to end", "## Decode against the memory-bandwidth ceiling", "## Targets"):
        assert heading in text
    assert results["machine"]["cpu"] and results["versions"]["onnxruntime"]


def test_every_stage_and_backend_measured(bench):
    results, _ = bench
    cases = {(r["stage"], r["batch"], r["backend"]) for r in results["stages"]}
    expected = {(s, b, be) for be in ("torch", "onnxruntime")
                for s, b in [("vision_encoder", 1), ("vision_encoder", 2), ("projector", 1), ("projector", 2),
                             ("prefill", 1), ("decode_step", 1)]}
    assert cases == expected
    for r in results["stages"]:
        lat = r["latency_ms"]
        assert lat["n"] == 3 and 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
        assert r["throughput"]["value"] > 0 and r["cpu_share"] > 0
    assert results["threads"]["torch_intra_op"] == 2 and results["threads"]["ort_intra_op"] == 2
    image_rows = results["inputs"]["image_input_shape"][0]
    assert results["inputs"]["prompt_tokens"] > image_rows > 0


def test_end_to_end_and_ceiling(bench):
    results, _ = bench
    for backend in ("torch", "onnxruntime"):
        e = results["end_to_end"][backend]
        assert e["requests"] == 2 and e["tokens"] == 2 * 4  # EOS ignored: every request makes new_tokens
        assert 0 < e["ttft_ms"]["p50"] < e["request_ms"]["p50"] and e["tpot_ms"]["p50"] > 0
    c = results["ceiling"]
    assert c["bandwidth_gb_s"]["p50"] > 0 and c["bandwidth_gb_s"]["n"] == 20
    # the tiny decoder's untied embedding table is read one row per token, not whole
    assert 0 < c["gather_only_bytes"] < c["initializer_bytes"]
    assert c["bytes_per_token"] == c["read_per_token_bytes"] + c["kv_bytes_at_past"]
    assert c["fits_in_l3"] in (True, False, None)
    assert c["ceiling_tokens_per_s"] == pytest.approx(c["bandwidth_gb_s"]["p50"] * 1e9 / c["bytes_per_token"], rel=1e-3)
    for v in c["backends"].values():
        assert v["decode_step_fraction"] == pytest.approx(v["decode_step_tokens_per_s"] / c["ceiling_tokens_per_s"],
                                                          rel=1e-2)


def test_ratios_come_from_the_same_run(bench):
    results, _ = bench
    p50 = {(r["stage"], r["batch"], r["backend"]): r["latency_ms"]["p50"] for r in results["stages"]}
    assert {(r["stage"], r["batch"]) for r in results["ratios"]["stages"]} == {(s, b) for s, b, _ in p50}
    for r in results["ratios"]["stages"]:
        expected = p50[(r["stage"], r["batch"], "torch")] / p50[(r["stage"], r["batch"], "onnxruntime")]
        assert r["speedup_p50"] == pytest.approx(expected, rel=1e-2)
    e = results["end_to_end"]
    assert results["ratios"]["end_to_end"]["onnxruntime"]["ttft_speedup_p50"] == pytest.approx(
        e["torch"]["ttft_ms"]["p50"] / e["onnxruntime"]["ttft_ms"]["p50"], rel=1e-2)
    targets = {t["target"]: t for t in results["targets"]}
    assert len(targets) == 5 and all(t["met"] in (True, False, None) for t in targets.values())


@pytest.mark.skipif(not HAS_TRITON, reason="serving needs nvidia-pytriton and tritonclient")
def test_served_levels_and_overhead(bench):
    results, _ = bench
    served = results["served"]
    assert served["server"]["tritonserver"] and served["server"]["repository"]["target"] == "python"
    levels = {lv["concurrency"]: lv for lv in served["levels"]}
    assert set(levels) == {1, 2}
    assert levels[2]["requests"] == 4 and levels[2]["tokens"] == 4 * 4
    for lv in levels.values():
        assert lv["throughput_tokens_per_s"] > 0 and lv["throughput_requests_per_s"] > 0
        assert 0 < lv["ttft_ms"]["p50"] <= lv["request_ms"]["p50"]
    ov = served["overhead"]
    assert ov["served"]["tokens"] == ov["in_process_onnxruntime"]["tokens"] == 2 * 4
    assert ov["per_token_ms"] == pytest.approx(ov["served"]["tpot_ms"]["p50"] - ov["in_process_onnxruntime"]["tpot_ms"]["p50"],
                                               abs=1e-3)


def test_options_are_checked():
    with pytest.raises(InputError, match="unknown backend"):
        BenchOptions(backends=("tensorflow",))
    with pytest.raises(InputError, match="concurrency"):
        BenchOptions(concurrency=(0,))
    with pytest.raises(InputError, match="new-tokens"):
        BenchOptions(new_tokens=0)
    assert parse_csv("1, 4,", "--batch", int) == (1, 4)
    with pytest.raises(InputError, match="--batch"):
        parse_csv("1,x", "--batch", int)


def test_timing_primitives():
    s = summarize([0.001, 0.002, 0.003, 0.004])
    assert s["n"] == 4 and s["min"] == 1.0 and s["max"] == 4.0 and s["p50"] == 2.5
    order = []
    samples = alternating({"a": lambda: order.append("a") or 1, "b": lambda: order.append("b") or 2}, 1, 4)
    assert samples == {"a": [1] * 4, "b": [2] * 4}
    assert order == list("aaa" "bbb" "bbb" "aaa")  # blocks in mirrored order, each after a warm-up call

    class Final:
        completion_tokens = 3

    t = time_request(iter(["x", "y", Final()]))
    assert isinstance(t, RequestTiming) and t.tokens == 3 and 0 <= t.ttft_s <= t.total_s
    assert t.tpot_s == pytest.approx((t.total_s - t.ttft_s) / 2)
