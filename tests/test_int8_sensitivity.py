"""An int8 decoder's fp32 fallback (precision.sensitivity) and its kernel choice (cpu, --int8-kernel):
the MatMul whose int8 output is worst is ranked first and kept fp32 when the logits need it, a
graph whose kernels are exact only with VNNI/AMX refuses to open on a CPU without them, and a Q/DQ
graph TensorRT serves is run as written (as is an image stage's on a CPU where U8S8 saturates)."""
from __future__ import annotations

import platform

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlm_export.cpu import QDQ_AS_WRITTEN, u8s8_saturates
from vlm_export.errors import ExportError, RunnerError
from vlm_export.precision import sensitivity
from vlm_export.precision.convert import PrecisionOptions
from vlm_export.precision.smoothquant import per_token_int8, weighted_matmuls

WIDTH, LAYERS, BAD = 64, 8, 3


def _chain(rng, output: str = "logits") -> onnx.ModelProto:
    """LAYERS MatMuls with a Tanh between each (bounded inputs: int8 loses ~1% there), except that the
    input of MatMul BAD carries one channel 1,000x the others that its weight ignores (zero row): one
    scale per token leaves the channels that matter a handful of codes, so its output is the worst."""
    nodes, inits, x = [], [], "x"
    for i in range(LAYERS):
        w = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / np.sqrt(WIDTH)
        if i == BAD:
            w[0] = 0.0
            scale = np.ones(WIDTH, np.float32)
            scale[0] = 1000.0
            inits.append(numpy_helper.from_array(scale, "outlier"))
            nodes.append(helper.make_node("Mul", [x, "outlier"], [f"big{i}"], name=f"big{i}"))
            x = f"big{i}"
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = output if i == LAYERS - 1 else f"y{i}"
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [out], name=f"mm{i}"))
        if i < LAYERS - 1:
            nodes.append(helper.make_node("Tanh", [out], [f"t{i}"], name=f"tanh{i}"))
            x = f"t{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", WIDTH])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, [1, "s", WIDTH])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture
def chain_and_feeds():
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, 12, WIDTH)).astype(np.float32)} for _ in range(4)]
    return _chain(rng), feeds


def _quantizer(model):
    """``choose``'s quantize: a copy of ``model`` in per-token int8, the named MatMuls kept fp32."""
    def quantize(kept):
        candidate = onnx.ModelProto()
        candidate.CopyFrom(model)
        per_token_int8(candidate, kept, "onnxruntime", "u8u8")
        return candidate
    return quantize


def test_the_worst_matmul_ranks_first_and_auto_keeps_it(chain_and_feeds):
    model, feeds = chain_and_feeds
    errors = sensitivity.matmul_errors(model, weighted_matmuls(model), feeds)
    ranked = sorted(errors, key=lambda n: -errors[n])
    assert ranked[0] == f"mm{BAD}" and errors[ranked[0]] > 5 * errors[ranked[1]]
    assert max(e for n, e in errors.items() if n != f"mm{BAD}") < 0.03  # bounded inputs: int8 rounding only
    # a memory budget too small for every token: an even sample (16 rows, 4 per feed) ranks the same worst
    sampled = sensitivity.matmul_errors(model, weighted_matmuls(model), feeds, budget=1)
    assert max(sampled, key=sampled.get) == f"mm{BAD}" and sampled != errors

    none_kept, fallback = sensitivity.choose(model, _quantizer(model), weighted_matmuls(model), feeds, "0")
    assert fallback.kept == [] and fallback.trials == []
    notes = []
    chosen, fallback = sensitivity.choose(model, _quantizer(model), weighted_matmuls(model), feeds, "auto", note=notes.append)
    assert notes[0].startswith("ranking 8 MatMuls") and notes[-1].startswith("1 of 8 MatMuls fp32: lowest logits cosine")
    assert len(notes) == 1 + len(fallback.trials)  # the user sees each trial of the search
    # all int8 misses the target, one fp32 (the worst) reaches it: auto stops there
    assert [t["fp32_matmuls"] for t in fallback.trials] == [0, 1]
    assert fallback.trials[0]["min_cosine"] < sensitivity.TARGET_COSINE <= fallback.trials[1]["min_cosine"]
    assert fallback.kept == [f"mm{BAD}"] and fallback.errors[f"mm{BAD}"] == round(errors[f"mm{BAD}"], 5)
    ops = {n.name: n.op_type for n in chosen.graph.node}
    assert ops[f"mm{BAD}"] == "MatMul" and "mm0" not in ops  # kept fp32 / rewritten to int8
    assert sensitivity.Fallback.from_dict(fallback.to_dict()) == fallback  # what the calibration cache keeps


def test_fallback_counts_and_bad_settings(chain_and_feeds):
    assert sensitivity.counts(120) == [0, 8, 16, 24, 30]  # steps of 1/16, at most a quarter
    assert sensitivity.counts(8) == [0, 1, 2]
    assert sensitivity.counts(2) == sensitivity.counts(3) == [0, 1] and sensitivity.counts(1) == [0]  # one of 2-3
    model, feeds = chain_and_feeds
    with pytest.raises(ExportError, match="cannot keep 9 MatMuls fp32: the decoder has 8"):
        sensitivity.choose(model, _quantizer(model), weighted_matmuls(model), feeds, "9")
    with pytest.raises(ExportError, match="--int8-fp32-matmuls takes auto or a count"):
        PrecisionOptions(int8_fp32_matmuls="some")
    with pytest.raises(ExportError, match="int8 kernel 'u8x8' is not one of"):
        PrecisionOptions(int8_kernel="u8x8")


def test_kernel_follows_the_cpu(monkeypatch):
    import vlm_export.precision.convert as convert

    monkeypatch.setattr(convert, "int8_dot_product", lambda: "avx512_vnni")
    assert PrecisionOptions().kernel == "u8s8" and PrecisionOptions(int8_kernel="u8u8").kernel == "u8u8"
    monkeypatch.setattr(convert, "int8_dot_product", lambda: None)
    assert PrecisionOptions().kernel == "u8u8" and PrecisionOptions(int8_kernel="u8s8").kernel == "u8s8"


def test_a_u8s8_graph_refuses_a_cpu_without_vnni(chain_and_feeds, tmp_path, monkeypatch):
    """Run on a CPU without VNNI/AMX, U8S8 would give wrong answers silently: the runner refuses,
    naming the fix; the exact U8U8 graph opens anywhere."""
    import vlm_export.runtime.runners as runners
    from vlm_export.runtime.runners import OrtRunner

    model, feeds = chain_and_feeds
    paths = {}
    for kernel in ("u8s8", "u8u8"):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        per_token_int8(m, (), "onnxruntime", kernel)
        paths[kernel] = tmp_path / f"{kernel}.onnx"
        onnx.save(m, str(paths[kernel]))
    monkeypatch.setattr(runners, "int8_dot_product", lambda: None)
    with pytest.raises(RunnerError, match="exact only on a CPU with amx_int8 or avx512_vnni or avx_vnni.*--int8-kernel u8u8"):
        OrtRunner("lm_decoder", paths["u8s8"])
    assert OrtRunner("lm_decoder", paths["u8u8"]).infer(feeds[0])["logits"].shape == (1, 12, WIDTH)
    monkeypatch.setattr(runners, "int8_dot_product", lambda: "avx512_vnni")
    assert OrtRunner("lm_decoder", paths["u8s8"]).infer(feeds[0])["logits"].shape == (1, 12, WIDTH)


def test_u8s8_saturates_on_x86_without_vnni_or_amx_only(monkeypatch):
    import vlm_export.cpu as cpu

    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert cpu.u8s8_saturates()
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert not cpu.u8s8_saturates()
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset())
    assert not cpu.u8s8_saturates()


def test_an_int8_image_graph_runs_as_written_where_u8s8_saturates(chain_and_feeds, tmp_path, monkeypatch, caplog):
    """An image stage's int8 Q/DQ graph is one ONNX Runtime serves, fused on x86 into U8S8 kernels that
    saturate without VNNI/AMX: the graph is marked, and on such a CPU the runner runs its pairs as
    written (the same numbers as asking for it), saying so; the build's fallback search judges its
    candidates that way there too."""
    import vlm_export.precision.convert as convert
    import vlm_export.runtime.runners as runners
    from vlm_export.cpu import INT8_QDQ_METADATA
    from vlm_export.runtime.runners import OrtRunner

    _, feeds = chain_and_feeds
    src = tmp_path / "vision.onnx"
    onnx.save(_chain(np.random.default_rng(0), output="image_features"), str(src))
    asked = []
    search = sensitivity.search
    monkeypatch.setattr(sensitivity, "search", lambda *a, **k: asked.append(k["emulate_qdq"]) or search(*a, **k))
    monkeypatch.setattr(convert, "u8s8_saturates", lambda: True)
    info = convert.to_int8(src, tmp_path / "int8.onnx", feeds, PrecisionOptions())
    assert asked == [True] and info.details["fallback_judged_on"].startswith("Q/DQ run as written")
    assert {p.key: p.value for p in onnx.load(str(tmp_path / "int8.onnx")).metadata_props}[INT8_QDQ_METADATA] == "1"

    monkeypatch.setattr(runners, "u8s8_saturates", lambda: False)
    assert not OrtRunner("vision_encoder", tmp_path / "int8.onnx").emulates_qdq
    monkeypatch.setattr(runners, "u8s8_saturates", lambda: True)
    with caplog.at_level("WARNING"):
        served = OrtRunner("vision_encoder", tmp_path / "int8.onnx")
    assert served.emulates_qdq and "no VNNI/AMX" in caplog.text and "run as written" in caplog.text
    as_written = OrtRunner("vision_encoder", tmp_path / "int8.onnx", emulate_qdq=True)
    np.testing.assert_array_equal(served.infer(feeds[0])["image_features"], as_written.infer(feeds[0])["image_features"])
    assert not OrtRunner("vision_encoder", src).emulates_qdq  # an unmarked (fp32) graph is left as it is


def test_notes_print_above_a_running_step():
    import io

    from rich.console import Console

    from vlm_export.progress import Progress, RichProgress

    out = io.StringIO()
    progress = RichProgress(Console(file=out, width=120))
    with progress.step("lm_decoder: fp32 -> int8") as advance:
        progress.note("0 of 120 MatMuls fp32: lowest logits cosine 0.9797 (target 0.99)")
        advance()
    assert "0 of 120 MatMuls fp32: lowest logits cosine 0.9797" in out.getvalue()
    Progress().note("silent in tests")  # the base class says nothing


def test_an_int8_decoder_built_without_vnni_says_what_it_gets(chain_and_feeds, tmp_path, monkeypatch):
    """On a CPU without VNNI/AMX, auto takes the exact U8U8 kernels and the build says what that costs."""
    import vlm_export.precision.convert as convert

    model, feeds = chain_and_feeds
    quick = next(n for n in model.graph.node if n.op_type == "Tanh")  # an ONNX Runtime contrib op: the fused form
    quick.op_type, quick.domain = "QuickGelu", "com.microsoft"
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(tmp_path / "decoder.onnx"))
    monkeypatch.setattr(convert, "int8_dot_product", lambda: None)
    notes = []
    info = convert.to_int8(tmp_path / "decoder.onnx", tmp_path / "int8.onnx", feeds, PrecisionOptions(), note=notes.append)
    assert info.details["kernel"] == "MatMulIntegerToFloat (U8U8)" and "requires_cpu" not in info.details
    assert notes[0].startswith("this CPU has no VNNI/AMX: the int8 decoder gets ONNX Runtime's exact U8U8 kernels")
    assert any(n.startswith("ranking 7 MatMuls") for n in notes)  # the last MatMul makes the logits: the head stays fp32
    assert any(n.startswith("GPTQ rounding of 7 int8 weights") for n in notes) and info.details["rounding"]["method"] == "gptq"
    rtn = convert.to_int8(tmp_path / "decoder.onnx", tmp_path / "rtn.onnx", feeds, PrecisionOptions(weight_rounding="rtn"))
    assert rtn.details["rounding"] == {"method": "rtn"}


def _tied(tmp_path, fused: bool = False):
    """ids -> Gather(table) -> MatMul -> Tanh (QuickGelu, a contrib op: the fused form) -> MatMul on the
    table's Transpose (a tied LM head) -> logits; saved as tmp_path/tied.onnx, with 4 feeds."""
    rng = np.random.default_rng(1)
    table = rng.standard_normal((50, WIDTH)).astype(np.float32)
    w = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / np.sqrt(WIDTH)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="lookup"),
         helper.make_node("MatMul", ["emb", "w"], ["h"], name="mm"),
         helper.make_node("QuickGelu", ["h"], ["t"], name="act", domain="com.microsoft") if fused
         else helper.make_node("Tanh", ["h"], ["t"], name="act"),
         helper.make_node("Transpose", ["table"], ["table_t"], name="tied", perm=[1, 0]),
         helper.make_node("MatMul", ["t", "table_t"], ["logits"], name="head")], "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", 50])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    opsets = [helper.make_opsetid("", 18)] + [helper.make_opsetid("com.microsoft", 1)] * fused
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(tmp_path / "tied.onnx"))
    return [{"ids": rng.integers(0, 50, (1, 9))} for _ in range(4)]


def test_a_tied_head_asked_int8_is_quantized_and_the_lookup_keeps_its_table(tmp_path):
    """A tied LM head (MatMul on the Transpose of the embedding table, which a Gather also reads) with
    --lm-head int8 gets its own int8 weight; the token lookup still reads the fp32 table, and the
    logits stay within int8 rounding. An fp32 head is left as it is."""
    import vlm_export.precision.convert as convert

    feeds = _tied(tmp_path)
    want = [sensitivity._outputs(onnx.load(str(tmp_path / "tied.onnx")), ["logits"], feeds, 1)]
    for head, quantized in (("fp32", {"mm"}), ("int8", {"mm", "head"})):
        info = convert.to_int8(tmp_path / "tied.onnx", tmp_path / f"{head}.onnx", feeds,
                               PrecisionOptions(lm_head=head, int8_fp32_matmuls="0", int8_kernel="u8u8"))
        model = onnx.load(str(tmp_path / f"{head}.onnx"))
        # a graph of standard ops: the Q/DQ form (per-channel DequantizeLinear on the weights)
        assert {n.name.removesuffix("_Wdq") for n in model.graph.node if n.name.endswith("_Wdq")} == quantized
        assert info.details["lm_head"] == head
        if head == "fp32":  # left as it was: the fp32 MatMul on the table's Transpose
            assert next(n for n in model.graph.node if n.name == "head").input[1] == "table_t"
        lookup = next(n for n in model.graph.node if n.op_type == "Gather")
        assert lookup.input[0] == "table"
        got = sensitivity._outputs(model, ["logits"], feeds, 1)
        # the Q/DQ form's s8 x s8 products run on ONNX Runtime's u8s8 kernel, whose AVX2 form (no VNNI)
        # saturates pair sums at int16 on this table's large codes: 0.9936 on an AMD EPYC, > 0.995 with VNNI
        assert sensitivity._cosines(want[0], got) > 0.99


def test_a_w8_head_in_the_onnxruntime_form_and_fp32_in_the_standard_one(tmp_path):
    """--lm-head w8 under an int8 decoder: MatMulNBits (8 bits) on the head in the ONNX Runtime form,
    the head left fp32 in the standard (TensorRT) form, each saying so; logits within the int8 gate."""
    import vlm_export.precision.convert as convert

    for fused in (True, False):
        feeds = _tied(tmp_path, fused)
        want = sensitivity._outputs(onnx.load(str(tmp_path / "tied.onnx")), ["logits"], feeds, 1)
        info = convert.to_int8(tmp_path / "tied.onnx", tmp_path / "w8.onnx", feeds,
                               PrecisionOptions(lm_head="w8", int8_fp32_matmuls="0", int8_kernel="u8u8"))
        model = onnx.load(str(tmp_path / "w8.onnx"))
        nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
        assert [next(a.i for a in n.attribute if a.name == "bits") for n in nbits] == ([8] if fused else [])
        assert info.details["lm_head"].startswith("w8 (MatMulNBits" if fused else "fp32 (w8 is ONNX Runtime's")
        assert next(n for n in model.graph.node if n.op_type == "Gather").input[0] == "table"
        assert sensitivity._cosines(want, sensitivity._outputs(model, ["logits"], feeds, 1)) > 0.99


def test_an_image_stage_keeps_its_worst_matmul_fp32_and_a_rebuild_reuses_the_choice(chain_and_feeds, tmp_path):
    """An image stage's static int8 (one calibrated scale per tensor): the MatMul whose input carries
    the outlier channel is ranked worst and kept fp32, which brings the output to the int8 gate that
    all-int8 misses; the choice is kept beside the ranges, so a rebuild needs no calibration inputs."""
    import onnxruntime as ort

    import vlm_export.precision.convert as convert

    _, feeds = chain_and_feeds
    model = _chain(np.random.default_rng(0), output="image_features")  # no LM head: an image stage
    src = tmp_path / "vision.onnx"
    onnx.save(model, str(src))

    def worst_cosine(path) -> float:
        # as OrtRunner runs an int8 image stage here: its Q/DQ pairs as written where this CPU's U8S8 kernels
        # saturate (x86 without VNNI/AMX; the fallback is judged that way there), fused elsewhere
        options = ort.SessionOptions()
        if u8s8_saturates():
            options.add_session_config_entry(*QDQ_AS_WRITTEN)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        reference = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
        return sensitivity._cosines([reference.run(None, f)[0] for f in feeds], [session.run(None, f)[0] for f in feeds])

    notes, cache = [], tmp_path / "ranges.json"
    chosen = convert.to_int8(src, tmp_path / "a.onnx", feeds, PrecisionOptions(), cache, note=notes.append)
    fallback = chosen.details["fp32_fallback"]
    assert fallback["kept"] == [f"mm{BAD}"] and [t["fp32_matmuls"] for t in fallback["trials"]] == [0, 1]
    assert fallback["trials"][0]["min_cosine"] < sensitivity.TARGET_COSINE <= fallback["trials"][1]["min_cosine"]
    assert notes[-1].startswith("1 of 8 MatMuls fp32: lowest image_features cosine")
    assert chosen.details["quantized_matmuls"] == LAYERS - 1
    graph = onnx.load(str(tmp_path / "a.onnx")).graph
    dequantized = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    read_dequantized = {n.name for n in graph.node if n.op_type in ("MatMul", "Gemm")
                        and any(i in dequantized for i in n.input)}
    assert f"mm{BAD}" not in read_dequantized and "mm0" in read_dequantized
    assert worst_cosine(tmp_path / "a.onnx") >= sensitivity.TARGET_COSINE

    none = convert.to_int8(src, tmp_path / "b.onnx", feeds, PrecisionOptions(int8_fp32_matmuls="0"), None)
    assert none.details["fp32_fallback"]["kept"] == []
    assert worst_cosine(tmp_path / "b.onnx") < sensitivity.TARGET_COSINE
    every = convert.to_int8(src, tmp_path / "c.onnx", feeds, PrecisionOptions(int8_fp32_matmuls="20"), None)
    assert len(every.details["fp32_fallback"]["kept"]) == LAYERS  # a count past the stage's own: all of them

    again = convert.to_int8(src, tmp_path / "d.onnx", None, PrecisionOptions(), cache)  # no inputs: from the cache
    assert again.details["calibration_cache"]["reused"] and again.details["fp32_fallback"] == fallback
    assert onnx.load(str(tmp_path / "d.onnx")).graph == graph
    convert.image_fallback_path(cache).unlink()  # ranges without the choice: it must be measured again
    with pytest.raises(ExportError, match="needs calibration inputs to choose which layers stay fp32"):
        convert.to_int8(src, tmp_path / "e.onnx", None, PrecisionOptions(), cache)


def test_an_attention_matmul_of_two_activations_is_ranked_and_kept(tmp_path):
    """Static int8 rounds both inputs of an activation x activation MatMul (attention's scores): one
    whose left input carries an outlier channel the right one zeroes is ranked worst and kept fp32."""
    import vlm_export.precision.convert as convert

    rng = np.random.default_rng(1)
    outlier, mask = np.ones(WIDTH, np.float32), np.ones(WIDTH, np.float32)
    outlier[0], mask[0] = 1000.0, 0.0
    w = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / np.sqrt(WIDTH)
    nodes = [helper.make_node("Mul", ["x", "outlier"], ["big"], name="big"),
             helper.make_node("Mul", ["x", "mask"], ["masked"], name="masked"),
             helper.make_node("Transpose", ["masked"], ["keys"], name="keys", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["big", "keys"], ["scores"], name="scores"),
             helper.make_node("Tanh", ["scores"], ["bounded"], name="bounded"),
             helper.make_node("MatMul", ["bounded", "w"], ["image_features"], name="proj")]
    inits = [numpy_helper.from_array(outlier, "outlier"), numpy_helper.from_array(mask, "mask"),
             numpy_helper.from_array(w[:12], "w")]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12, WIDTH])],
                              [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, [1, 12, WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = [{"x": rng.standard_normal((1, 12, WIDTH)).astype(np.float32) / 4} for _ in range(4)]
    layers = sensitivity.static_layers(model)
    assert [n.name for n in layers] == ["scores", "proj"]
    errors = sensitivity.matmul_errors(model, layers, feeds, activations="per-tensor")
    assert errors["scores"] > 10 * errors["proj"]
    with pytest.raises(ValueError, match="per-tensor activations only"):
        sensitivity.matmul_errors(model, layers, feeds)
    onnx.save(model, str(tmp_path / "vision.onnx"))
    info = convert.to_int8(tmp_path / "vision.onnx", tmp_path / "int8.onnx", feeds,
                           PrecisionOptions(int8_fp32_matmuls="1"))
    assert info.details["fp32_fallback"]["kept"] == ["scores"] and info.details["quantized_matmuls"] == 1


def test_attention_pairs_are_measured_inside_the_graph_as_numpy_would(tmp_path):
    """The pairs' error is computed by nodes added to the graph (only scalars fetched: a tower's scores are heads x
    patches² per layer): the same number as rounding both fetched operands in numpy, with each operand's largest
    magnitude over every feed as its range."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Transpose", ["x"], ["keys"], name="keys", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["x", "keys"], ["scores"], name="scores"),
             helper.make_node("Softmax", ["scores"], ["weights"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["weights", "x"], ["image_features"], name="weighted")]
    graph = helper.make_graph(nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", 8])],
                              [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, [1, "n", 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = [{"x": rng.standard_normal((1, n, 8)).astype(np.float32) * scale} for n, scale in ((5, 1.0), (9, 3.0))]
    pairs = sensitivity.static_layers(model)
    assert [n.name for n in pairs] == ["scores", "weighted"]
    got = sensitivity.matmul_errors(model, pairs, feeds, activations="per-tensor")
    # numpy, from the operands themselves
    x = [f["x"] for f in feeds]
    keys = [v.transpose(0, 2, 1) for v in x]
    weights = []
    for v in x:
        s = v @ v.transpose(0, 2, 1)
        e = np.exp(s - s.max(-1, keepdims=True))
        weights.append(e / e.sum(-1, keepdims=True))

    def error(lefts, rights):
        la, lb = max(np.abs(a).max() for a in lefts), max(np.abs(b).max() for b in rights)
        return np.mean([np.linalg.norm(a @ b - sensitivity._int8(a, la) @ sensitivity._int8(b, lb)) / np.linalg.norm(a @ b)
                        for a, b in zip(lefts, rights)])

    assert got["scores"] == pytest.approx(error(x, keys), rel=1e-4)
    assert got["weighted"] == pytest.approx(error(weights, x), rel=1e-4)
    # the stage waits for each pair's statistics before reading its output on (else every layer's operands would be
    # held to the end of the run): its readers read the output plus nothing that depends on them
    nodes, outputs, rewire = sensitivity._error_nodes(pairs, {"x": 1.0, "keys": 1.0, "weights": 1.0})
    made = {o: n for n in nodes for o in n.output}
    assert set(rewire) == {"scores", "image_features"} and made[rewire["scores"]].input[0] == "scores"
    assert made[made[made[rewire["scores"]].input[1]].input[0]].input == ["int8_rank_pair0_error", "int8_rank_pair0_norm"]


def test_a_gemm_with_its_weight_transposed_is_ranked_like_a_matmul(tmp_path):
    """A Linear on 2-D input exports as Gemm(x, W, transB=1): its weight is read as [K, N] (W transposed)
    for the ranking, and the one whose input carries an outlier channel its weight ignores is kept."""
    import vlm_export.precision.convert as convert

    rng = np.random.default_rng(3)
    outlier = np.ones(WIDTH, np.float32)
    outlier[0] = 1000.0
    w_gemm = rng.standard_normal((2 * WIDTH, WIDTH)).astype(np.float32) / np.sqrt(WIDTH)  # [N, K]: transB
    w_gemm[:, 0] = 0.0
    w_out = rng.standard_normal((2 * WIDTH, WIDTH)).astype(np.float32) / np.sqrt(WIDTH)
    nodes = [helper.make_node("Mul", ["x", "outlier"], ["big"], name="big"),
             helper.make_node("Gemm", ["big", "w_gemm", "bias"], ["hidden"], name="fc", transB=1),
             helper.make_node("Tanh", ["hidden"], ["bounded"], name="act"),
             helper.make_node("MatMul", ["bounded", "w_out"], ["image_features"], name="out")]
    inits = [numpy_helper.from_array(outlier, "outlier"), numpy_helper.from_array(w_gemm, "w_gemm"),
             numpy_helper.from_array(np.zeros(2 * WIDTH, np.float32), "bias"), numpy_helper.from_array(w_out, "w_out")]
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [12, WIDTH])],
                              [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, [12, WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = [{"x": np.tanh(rng.standard_normal((12, WIDTH))).astype(np.float32)} for _ in range(4)]
    inits_by_name = {i.name: i for i in model.graph.initializer}
    assert sensitivity.weight_kn(model.graph.node[1], inits_by_name).shape == (WIDTH, 2 * WIDTH)
    layers = sensitivity.static_layers(model)
    assert [n.name for n in layers] == ["fc", "out"]
    errors = sensitivity.matmul_errors(model, layers, feeds, activations="per-tensor")
    assert errors["fc"] > 10 * errors["out"] and errors["out"] < 0.05
    onnx.save(model, str(tmp_path / "vision.onnx"))
    # two layers (a LLaVA projector's count): auto may keep one, the worst
    info = convert.to_int8(tmp_path / "vision.onnx", tmp_path / "int8.onnx", feeds, PrecisionOptions())
    assert info.details["fp32_fallback"]["kept"] == ["fc"]
    assert [t["fp32_matmuls"] for t in info.details["fp32_fallback"]["trials"]] == [0, 1]


def test_the_quantizers_of_one_tensor_stay_apart_so_onnx_runtime_fuses_every_reader(tmp_path, monkeypatch):
    """One activation read by three MatMuls (attention's q, k, v): each reader's int8 Q/DQ pair is kept
    apart (distinct ``axis``, which a per-tensor scale ignores), so ONNX Runtime's optimizer turns all
    three into integer kernels; merged into one QuantizeLinear, its x86 uint8 conversion skips them and
    they run as dequantize + fp32 MatMul."""
    import onnxruntime as ort

    import vlm_export.precision.convert as convert

    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Tanh", ["x"], ["normed"], name="norm")]
    inits = []
    for name in ("q", "k", "v"):
        inits.append(numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), f"w_{name}"))
        nodes.append(helper.make_node("MatMul", ["normed", f"w_{name}"], [name], name=name))
    nodes += [helper.make_node("Add", ["q", "k"], ["qk"], name="qk"),
              helper.make_node("Add", ["qk", "v"], ["image_features"], name="out")]
    graph = helper.make_graph(nodes, "qkv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12, WIDTH])],
                              [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, [1, 12, WIDTH])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "vision.onnx"))
    feeds = [{"x": rng.standard_normal((1, 12, WIDTH)).astype(np.float32)} for _ in range(4)]

    def fp32_matmuls_left(path) -> int:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return sum(n.op_type == "MatMul" for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)

    options = PrecisionOptions(int8_fp32_matmuls="0")
    convert.to_int8(tmp_path / "vision.onnx", tmp_path / "apart.onnx", feeds, options)
    readers = [n for n in onnx.load(str(tmp_path / "apart.onnx")).graph.node
               if n.op_type == "QuantizeLinear" and n.input[0] == "normed"]
    assert len(readers) == 3 and len({tuple(a.i for a in n.attribute) for n in readers}) == 3
    assert fp32_matmuls_left(tmp_path / "apart.onnx") == 0
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return  # the merged form's cost below is x86 ONNX Runtime's (ARM takes int8 activations as they are)
    monkeypatch.setattr(convert, "keep_quantizers_apart", lambda model: 0)
    convert.to_int8(tmp_path / "vision.onnx", tmp_path / "merged.onnx", feeds, options)
    assert fp32_matmuls_left(tmp_path / "merged.onnx") == 3


def test_a_cached_rebuild_picks_the_same_codes_and_gptq_needs_the_inputs(chain_and_feeds, tmp_path):
    """The calibration cache keeps the channel ranges and the fallback; GPTQ's codes are measured again
    from the calibration inputs, so a rebuild with the cache writes the same graph; without the
    inputs GPTQ says what it needs (round to nearest works from the cache alone)."""
    import vlm_export.precision.convert as convert

    model, feeds = chain_and_feeds
    onnx.save(model, str(tmp_path / "decoder.onnx"))
    cache, options = tmp_path / "calibration.json", PrecisionOptions(int8_kernel="u8u8")
    first = convert.to_int8(tmp_path / "decoder.onnx", tmp_path / "a.onnx", feeds, options, cache)
    again = convert.to_int8(tmp_path / "decoder.onnx", tmp_path / "b.onnx", feeds, options, cache)
    assert (first.details["calibration_cache"]["reused"], again.details["calibration_cache"]["reused"]) == (False, True)
    assert again.details["fp32_fallback"] == first.details["fp32_fallback"]
    assert onnx.load(str(tmp_path / "a.onnx")).graph == onnx.load(str(tmp_path / "b.onnx")).graph
    with pytest.raises(ExportError, match="GPTQ rounding of decoder's int8 weights needs calibration inputs"):
        convert.to_int8(tmp_path / "decoder.onnx", tmp_path / "c.onnx", None, options, cache)
    rtn = convert.to_int8(tmp_path / "decoder.onnx", tmp_path / "c.onnx", None,
                          PrecisionOptions(int8_kernel="u8u8", weight_rounding="rtn"), cache)
    assert rtn.details["rounding"] == {"method": "rtn"} and rtn.details["calibration_cache"]["reused"]


def test_a_gemm_head_is_quantized_like_a_matmul_head(tmp_path):
    """--lm-head w8 on a head written as Gemm (with its bias): the int8 pass rewrites Gemms as MatMuls
    (OPT's layers), so the head becomes w8 like a MatMul head, its bias added after, its logits kept
    (it was left fp32 with a reason before the twenty-ninth session)."""
    import onnxruntime as ort

    import vlm_export.precision.convert as convert

    rng = np.random.default_rng(2)
    w, head = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) / 8, rng.standard_normal((WIDTH, 40)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("QuickGelu", ["h"], ["t"], name="act", domain="com.microsoft"),
         helper.make_node("Gemm", ["t", "head", "bias"], ["logits"], name="head")], "gemm_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", WIDTH])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["s", 40])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(head, "head"),
         numpy_helper.from_array(rng.standard_normal(40).astype(np.float32), "bias")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]),
              str(tmp_path / "gemm.onnx"))
    feeds = [{"x": rng.standard_normal((9, WIDTH)).astype(np.float32)} for _ in range(4)]
    info = convert.to_int8(tmp_path / "gemm.onnx", tmp_path / "int8.onnx", feeds,
                           PrecisionOptions(lm_head="w8", int8_fp32_matmuls="0", int8_kernel="u8u8"))
    assert info.details["lm_head"].startswith("w8 (MatMulNBits")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8.onnx")).graph.node}
    assert "Gemm" not in ops and "MatMulNBits" in ops
    fp32, int8 = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"])
                  for f in ("gemm.onnx", "int8.onnx"))
    a, b = (s.run(None, feeds[0])[0].ravel() for s in (fp32, int8))
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.99


def test_a_qdq_graph_emulated_computes_what_its_nodes_say(chain_and_feeds, tmp_path):
    """The standard (TensorRT) form run with ``emulate_qdq`` equals ONNX's reference evaluator on the
    same Q/DQ graph (numpy, every node as the spec writes it: TensorRT's arithmetic, int32-exact
    sums), and so does the fallback search's candidate run; ONNX Runtime's fused CPU kernels are not
    held to it (on an AVX2-only CPU their U8S8 pair sums saturate)."""
    from onnx.reference import ReferenceEvaluator

    from vlm_export.precision.probe import ActivationProbe
    from vlm_export.runtime.runners import OrtRunner

    model, feeds = chain_and_feeds
    per_token_int8(model, (), "qdq", "u8u8")
    model.opset_import[0].version = 21  # the reference evaluator has Q/DQ from opset 19 on; nothing else changes
    path = tmp_path / "qdq.onnx"
    onnx.save(model, str(path))
    exact = ReferenceEvaluator(model).run(None, feeds[0])[0]
    runner = OrtRunner("lm_decoder", path, emulate_qdq=True)
    assert runner.emulates_qdq and not OrtRunner("lm_decoder", path).emulates_qdq
    np.testing.assert_allclose(runner.infer(feeds[0])["logits"], exact, rtol=1e-4, atol=1e-4)
    with ActivationProbe(model, ["logits"], emulate_qdq=True) as probe:
        np.testing.assert_allclose(next(probe.run(feeds[:1], ["logits"]))["logits"], exact, rtol=1e-4, atol=1e-4)


def test_a_w8_head_takes_a_block_that_divides_the_hidden_size(tmp_path):
    """An LM whose hidden size is not a multiple of 32 (80): the int8 decoder's w8 head takes blocks of
    16 (where the default 32 would have cost the whole ONNX Runtime form), and integer zero points
    where no block divides it; the --block-size asked is preferred."""
    import vlm_export.precision.convert as convert

    def head(hidden: int, block: int) -> tuple[str, list[int]]:
        w = np.random.default_rng(0).standard_normal((hidden, 24)).astype(np.float32)
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"], name="lm_head")], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, hidden])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 24])],
                                  [numpy_helper.from_array(w, "w")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        said = convert._w8_head(model, ["lm_head"], True, block)
        return said, [next(a.i for a in n.attribute if a.name == "block_size")
                      for n in model.graph.node if n.op_type == "MatMulNBits"]

    assert head(96, 32) == ("w8 (MatMulNBits, asymmetric blocks of 32)", [32])
    assert head(80, 32) == ("w8 (MatMulNBits, asymmetric blocks of 16)", [16])
    assert head(128, 64) == ("w8 (MatMulNBits, asymmetric blocks of 64)", [64])
    assert head(72, 32) == ("w8 (MatMulNBits, zero-point blocks of 32)", [32])


def test_the_saturation_emulator_sums_pairs_in_int16_and_is_exact_below_it(tmp_path):
    """benchmarks/u8s8_saturation.py, whose numbers the README quotes: each pair of neighbouring u8 x s8
    products is clipped to int16 before the int32 sum (``vpmaddubsw``); with no pair past int16 the
    emulated graph equals the graph run as written."""
    import importlib.util
    from pathlib import Path

    import onnxruntime as ort

    import vlm_export.precision.convert as convert
    from vlm_export.cpu import QDQ_AS_WRITTEN

    path = Path(__file__).parent.parent / "benchmarks" / "u8s8_saturation.py"
    spec = importlib.util.spec_from_file_location("u8s8_saturation", path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    a = np.array([[255, 255, 1, 2]], np.int64)
    w = np.array([[127], [127], [3], [4]], np.int64)
    assert tool._saturated_sum(a, w).tolist() == [[32767 + 11]]  # 64770 clipped; 1*3 + 2*4 exact
    assert (a @ w).tolist() == [[64770 + 11]]

    rng = np.random.default_rng(4)
    w_small = (rng.standard_normal((WIDTH, WIDTH)) * 0.01).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["image_features"], name="mm")], "one",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12, WIDTH])],
                              [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, [1, 12, WIDTH])],
                              [numpy_helper.from_array(w_small, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "fp32.onnx"))
    feeds = [{"x": (rng.standard_normal((1, 12, WIDTH)) * 0.05).astype(np.float32)} for _ in range(4)]
    convert.to_int8(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", feeds, PrecisionOptions(int8_fp32_matmuls="0"))
    _, _, scale, zero, codes = next(tool._weight_matmuls(onnx.load(str(tmp_path / "int8.onnx"))))
    options = ort.SessionOptions()
    options.add_session_config_entry(*QDQ_AS_WRITTEN)
    written = ort.InferenceSession(str(tmp_path / "int8.onnx"), options, providers=["CPUExecutionProvider"])
    emulated = tool.SaturatingRunner(tmp_path / "int8.onnx")
    compared = 0
    for f in feeds:
        a = tool._codes(f["x"], scale, zero)
        pairs = a[:, 0::2, None] * codes[None, 0::2] + a[:, 1::2, None] * codes[None, 1::2]
        exact = (np.abs(pairs) <= 32767).all(1).reshape(1, 12, WIDTH)  # outputs with no pair past int16
        got, want = emulated.infer(f)["image_features"], written.run(None, f)[0]
        np.testing.assert_allclose(got[exact], want[exact], rtol=1e-5, atol=1e-6)
        compared += int(exact.sum())
        if (~exact).any():  # where a pair is past int16 the emulation saturates, as the kernel would
            assert np.abs(got - want)[~exact].max() > 0
    assert compared > 12 * WIDTH  # most outputs had no pair past int16


def test_minmax_ranges_are_onnx_runtimes_own_measured_in_one_run_s_memory(tiny_build, tmp_path):
    """An image stage's int8 ranges are measured inside the graph (ONNX Runtime's MinMax calibrator holds every
    layer's activations to the end of each run) and handed to quantize_static as its calibration cache: the same
    tensors and ranges as its own calibrator's (to rounding: the rewired graph is optimized differently) and the same
    Q/DQ graph."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import load_tensors_data

    import vlm_export.precision.convert as convert

    src = tiny_build("llava-llama").path / "graphs" / "vision_encoder.onnx"
    model = onnx.load(str(src), load_external_data=False)
    (pixels,) = model.graph.input
    shape = [d.dim_value or 1 for d in pixels.type.tensor_type.shape.dim]
    rng = np.random.default_rng(5)
    feeds = [{pixels.name: rng.standard_normal(shape).astype(np.float32) * scale} for scale in (1.0, 3.0)]

    def quantize(out, ranges, reader=None):
        quantize_static(str(src), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(convert.STATIC_INT8_OPS),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True}, calibration_cache_path=ranges)

    quantize(tmp_path / "theirs.onnx", tmp_path / "theirs.json", convert._Feeds(feeds))
    measured = convert._minmax_ranges(src, model, feeds, tmp_path / "ours.json")
    quantize(tmp_path / "ours.onnx", tmp_path / "ours.json")
    theirs, ours = load_tensors_data(tmp_path / "theirs.json").data, load_tensors_data(tmp_path / "ours.json").data
    assert set(theirs) <= set(ours) == set(measured) and len(theirs) > 10
    for name, data in theirs.items():
        assert np.allclose([np.ravel(v)[0] for v in ours[name].range_value],
                           [np.ravel(v)[0] for v in data.range_value], rtol=1e-5, atol=1e-6), name
    graphs = [onnx.load(str(tmp_path / f"{who}.onnx")).graph for who in ("theirs", "ours")]
    assert [(n.op_type, list(n.input)) for n in graphs[0].node] == [(n.op_type, list(n.input)) for n in graphs[1].node]
    assert sum(n.op_type == "QuantizeLinear" for n in graphs[1].node) > 10
    scales = [{i.name: numpy_helper.to_array(i) for i in g.initializer if i.name.endswith("_scale")} for g in graphs]
    assert scales[0].keys() == scales[1].keys()
    for name, theirs_scale in scales[0].items():
        np.testing.assert_allclose(scales[1][name], theirs_scale, rtol=1e-5, err_msg=name)
    # each statistic is waited for before the graph reads its tensor on (else ONNX Runtime runs them all at the end)
    from vlm_export.precision.probe import range_nodes

    nodes, outputs, rewire = range_nodes(["x"])
    made = {o: n for n in nodes for o in n.output}
    assert made[made[made[rewire["x"]].input[1]].input[0]].input == list(outputs[0])


def test_rows_are_sampled_inside_the_graph_every_kth_padded_ones_left_out():
    """The ranking's sample of a MatMul input is taken by nodes in the graph (fetching every input whole held them
    all to the end of the run): every k-th row of each feed's, k = ceil(rows / per_feed), all-zero rows dropped."""
    from vlm_export.precision.probe import row_sample_nodes, sampled_rows

    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"), helper.make_node("Neg", ["h"], ["y"], name="neg")]
    graph = helper.make_graph(nodes, "rows", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, "n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, "n", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    rng = np.random.default_rng(0)
    feeds = [{"x": np.abs(rng.standard_normal((2, n, 3))).astype(np.float32) + 0.5} for n in (5, 11)]
    feeds[1]["x"][1, 7:] = 0.0  # padding
    got = sampled_rows(model, {"h": 3}, feeds, per_feed=4)["h"]
    want = []
    for feed in feeds:
        rows = np.maximum(feed["x"], 0).reshape(-1, 3)
        picked = rows[::-(-len(rows) // 4)]
        want.append(picked[np.abs(picked).max(axis=1) > 0])
    np.testing.assert_array_equal(got, np.concatenate(want))
    nodes, outputs, rewire = row_sample_nodes({"h": 3}, 4)
    made = {o: n for n in nodes for o in n.output}
    assert made[made[made[rewire["h"]].input[1]].input[0]].input == [outputs[0]]


def _tower_kept_outside(tiny_build, tmp_path, seed: int, scales: tuple[float, ...]):
    """The tiny LLaVA's vision stage, a copy of it with every tensor of 1 KB or more in an external data file (as a
    stage past 1.8 GB is written), and one random pixel feed per scale."""
    src = tiny_build("llava-llama").path / "graphs" / "vision_encoder.onnx"
    external = tmp_path / "external" / "vision_encoder.onnx"
    external.parent.mkdir()
    onnx.save_model(onnx.load(str(src)), str(external), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=external.name + ".data", size_threshold=1024)
    (pixels,) = onnx.load(str(src), load_external_data=False).graph.input
    shape = [d.dim_value or 1 for d in pixels.type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return src, external, [{pixels.name: rng.standard_normal(shape).astype(np.float32) * scale} for scale in scales]


def test_an_image_stage_in_an_external_data_file_is_ranked_without_loading_its_weights(tiny_build, tmp_path,
                                                                                        monkeypatch):
    """An image stage past 1.8 GB keeps its weights in a data file: its int8 ranges, ranking and fallback trials read
    them from there (each ranked weight alone, the sessions' copies file to file) - nothing of ours loads them whole,
    only ONNX Runtime's quantizer does, for the candidates it writes - and the choice and the graph are the ones the
    same stage in one file gives."""
    import inspect
    import os

    import vlm_export.precision.convert as convert

    src, external, feeds = _tower_kept_outside(tiny_build, tmp_path, seed=7, scales=(1.0, 2.0))
    options = PrecisionOptions(int8_fp32_matmuls="auto")
    one_file = convert.to_int8(src, tmp_path / "a.onnx", feeds, options, tmp_path / "a.json")

    loads_whole = onnx.load_external_data_for_model

    def only_onnx_runtime(model, base_dir):
        callers = [frame.filename for frame in inspect.stack()]
        if os.path.samefile(base_dir, external.parent) and not any(
                os.path.join("onnxruntime", "quantization") in f for f in callers):
            raise AssertionError("the stage's external data was loaded whole outside ONNX Runtime's quantizer")
        return loads_whole(model, base_dir)

    monkeypatch.setattr(onnx, "load_external_data_for_model", only_onnx_runtime)
    streamed = convert.to_int8(external, tmp_path / "b.onnx", feeds, options, tmp_path / "b.json")
    monkeypatch.undo()
    assert streamed.details["fp32_fallback"] == one_file.details["fp32_fallback"]
    assert streamed.details["fp32_fallback"]["trials"]  # the search ran (not a cached choice)
    graphs = [onnx.load(str(tmp_path / f"{name}.onnx")).graph for name in ("a", "b")]
    assert [(n.op_type, list(n.input)) for n in graphs[0].node] == [(n.op_type, list(n.input)) for n in graphs[1].node]
    assert sum(n.op_type == "QuantizeLinear" for n in graphs[1].node) > 10


def test_an_image_stage_past_the_threshold_gets_its_int8_graph_in_an_external_data_file(tiny_build, tmp_path,
                                                                                           monkeypatch):
    """The int8 graph of a stage whose fp32 weights are past 1.8 GB (counted with its external data: the graph as the
    conversion loads it holds none of them) is written with its weights in ``<name>.data`` too - an int8 tower of
    past ~8 GB in fp32 no longer fits one file - and the candidates, the choice and the graph are the one-file ones."""
    import vlm_export.precision.convert as convert
    from vlm_export.export import graph_info

    src, external, feeds = _tower_kept_outside(tiny_build, tmp_path, seed=3, scales=(1.0,))
    monkeypatch.setattr(sensitivity, "TARGET_COSINE", 1.5)  # out of reach: every count is tried, each candidate written
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    one_file = convert.to_int8(src, tmp_path / "a" / "int8.onnx", feeds, PrecisionOptions(), tmp_path / "a.json")
    size = graph_info.all_weight_bytes(onnx.load(str(external), load_external_data=False), external.parent)
    for module in (convert, graph_info):
        monkeypatch.setattr(module, "EXTERNAL_DATA_THRESHOLD", size - 1)
    split = convert.to_int8(external, tmp_path / "b" / "int8.onnx", feeds, PrecisionOptions(), tmp_path / "b.json")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["int8.onnx", "int8.onnx.data"]
    assert split.details["fp32_fallback"] == one_file.details["fp32_fallback"]
    assert len(split.details["fp32_fallback"]["trials"]) > 2
    # the chosen candidate's weights alone, readable as the graph is (onnx makes the file its owner's only)
    data = tmp_path / "b" / "int8.onnx.data"
    assert data.stat().st_size < (tmp_path / "a" / "int8.onnx").stat().st_size
    assert data.stat().st_mode & 0o777 == (tmp_path / "b" / "int8.onnx").stat().st_mode & 0o777
    graphs = [onnx.load(str(tmp_path / name / "int8.onnx")).graph for name in ("a", "b")]
    assert [(n.op_type, list(n.input)) for n in graphs[0].node] == [(n.op_type, list(n.input)) for n in graphs[1].node]
    import onnxruntime as ort

    got, want = (ort.InferenceSession(str(tmp_path / name / "int8.onnx"), providers=["CPUExecutionProvider"])
                 .run(None, feeds[0])[0] for name in ("b", "a"))
    np.testing.assert_array_equal(got, want)
