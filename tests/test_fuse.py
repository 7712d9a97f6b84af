"""The ONNX Runtime form of the decoder (export/fuse.py, export/attention_fuse.py): fewer nodes, the
fused contrib ops, and the same logits and KV as the exported graph on ONNX Runtime - left-padded
batches included."""
from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from vlm_export.contract.geometry import DecoderGeometry
from vlm_export.errors import ExportError
from vlm_export.export.fuse import fuse_decoder, fuse_model


def _decoder_graph(build):
    stage = next(s["name"] for s in build.manifest["stages"] if s["kind"] == "decoder")
    return build.path / build.manifest["graphs"][stage]["file"]


def _session(path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _feeds(session, rng, batch: int, past: int, new: int, pad_first: int = 0):
    """Real-shaped decoder feeds: token ids (no image), positions continuing the past, the first
    row left-padded by ``pad_first`` positions (its mask 0 there, as the runtime pads)."""
    feeds = {}
    for i in session.get_inputs():
        dims = [d if isinstance(d, int) else None for d in i.shape]
        if i.name == "input_ids":
            feeds[i.name] = rng.integers(100, 1000, (batch, new))
        elif i.name == "attention_mask":
            mask = np.ones((batch, past + new), np.int64)
            mask[0, :pad_first] = 0
            feeds[i.name] = mask
        elif i.name == "position_ids":
            feeds[i.name] = np.tile(np.arange(past, past + new), (batch, 1))
        elif i.name.startswith("past_key_values"):
            feeds[i.name] = (rng.standard_normal((batch, dims[1], past, dims[3])) * 0.5).astype(np.float32)
        elif dims[0] is None and "float" in i.type:  # image features: none in a text-only step
            feeds[i.name] = np.zeros((0, *dims[1:]), np.float32)
        else:
            raise AssertionError(f"unexpected decoder input {i.name} {i.shape}")
    return feeds


def _assert_same_outputs(session, want, got, mask, what):
    """Logits equal; the KV equal where the mask is 1 (a masked slot is garbage by the layout's
    contract - DecodeBatch.zero_masked - and the fused attention writes other garbage there)."""
    for out, x, y in zip(session.get_outputs(), want, got):
        assert x.shape == y.shape, out.name
        if out.name.startswith("present"):
            keep = mask.astype(bool)[:, None, :, None]
            x, y = np.where(keep, x, 0), np.where(keep, y, 0)
        np.testing.assert_allclose(y, x, atol=1e-4, rtol=0, err_msg=f"{out.name} {what}")


def _step(feeds, out, tokens):
    """The next decode feeds after ``out``: one token per row, the mask and positions grown by one,
    the KV the graph returned."""
    rows = len(tokens)
    feeds = dict(feeds, input_ids=np.asarray(tokens).reshape(rows, 1),
                 position_ids=feeds["position_ids"][:, -1:] + 1,
                 attention_mask=np.concatenate([feeds["attention_mask"], np.ones((rows, 1), np.int64)], axis=1))
    feeds.update({k.replace("present", "past_key_values"): v for k, v in out.items() if k.startswith("present")})
    return feeds


def _tiny_llava_built(tmp_path, family: str):
    """A tiny LLaVA of ``tiny_models.TEXT_FAMILIES[family]`` built as a user builds it (parity of both decoder
    forms against PyTorch included; a fused form that fails it falls back, ``made`` False): its decoder's
    fusion record and the build."""
    from tiny_models import make_tiny_llava
    from vlm_export.build import BuildOptions, build

    result = build(make_tiny_llava(tmp_path / family, family=family), tmp_path / "build",
                   BuildOptions(max_sequence=256, parity_new_tokens=4))
    assert result.failures == []
    return result.manifest["graphs"]["lm_decoder"]["fusion"], result


def _fused_graph(result, load_external_data: bool = False) -> onnx.ModelProto:
    """The fused decoder graph of ``result`` (a build)."""
    return onnx.load(result.path / result.manifest["graphs"]["lm_decoder"]["forms"]["fused"]["file"],
                     load_external_data=load_external_data)


#: text families whose q/k pass through a per-head RMSNorm (Qwen3 before the transpose, Gemma 3 after)
QK_NORM = {"llava-siglip-qwen3", "llava-gemma3"}
#: text families with an RMSNorm after attention and after the MLP too (Gemma 2 and 3)
POST_NORMS = {"llava-gemma2", "llava-gemma3"}
#: text families whose MLP is gelu(approximate="tanh") (Gemma's): FastGelu, one per layer
GELU_TANH = {"llava-gemma2", "llava-gemma3"}
#: text families whose first layer has a 16-position sliding window (tiny_models.TEXT_FAMILIES)
WINDOWED_FIRST_LAYER = {"llava-gemma3", "llava-gemma2"}


def _assert_fused_like_exported(src, dst):
    """The fused graph answers as the exported one: a left-padded prefill, a decode step over a masked
    hole, chunks of several tokens after a past, then greedy decoding step after step on each graph's KV."""
    a, b = _session(src), _session(dst)
    rng = np.random.default_rng(0)
    for batch, past, new, pad in ((2, 0, 9, 3), (2, 12, 1, 5), (1, 30, 4, 0), (2, 30, 4, 7)):
        feeds = _feeds(a, rng, batch, past, new, pad)
        _assert_same_outputs(a, a.run(None, feeds), b.run(None, feeds), feeds["attention_mask"],
                             f"batch={batch} past={past} new={new} pad={pad}")

    def greedy(session, steps=12):
        feeds = _feeds(session, np.random.default_rng(1), 1, 0, 6)
        tokens = []
        for _ in range(steps):
            out = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
            tokens.append(int(out["logits"][0, -1].argmax()))
            total = feeds["attention_mask"].shape[1]
            feeds.update(input_ids=np.array([[tokens[-1]]]), position_ids=np.array([[total]]),
                         attention_mask=np.ones((1, total + 1), np.int64))
            feeds.update({k.replace("present", "past_key_values"): v
                          for k, v in out.items() if k.startswith("present")})
        return tokens

    assert greedy(b) == greedy(a)


@pytest.mark.parametrize("name", ["llava-llama", "llava-mistral", "llava-gemma2", "llava-qwen2-full-multilayer",
                                  "llava-granite", *sorted(QK_NORM)])
def test_fused_decoder_matches_the_exported_one(tiny_build, tiny_model_dir, tmp_path, name):
    build = tiny_build(name)
    src = _decoder_graph(build)
    dst = tmp_path / "lm_decoder.fused.onnx"
    # Gemma 2's and 3's first layer has a 16-position window: its kernel applies it, on a mask without it
    windows = DecoderGeometry.from_dict(build.manifest["scheme"]["geometry"]).layer_windows()
    report = fuse_decoder(src, dst, max_positions=256, layer_windows=windows)

    base = onnx.load(src, load_external_data=False)
    layers = sum(i.name.startswith("past_key_values") for i in base.graph.input) // 2
    # per layer: two norms after residual Adds, rotary on q and k, one attention reading its q/k/v packed
    # (gate/up and a per-head-normed q/k/v stay apart: a Split after a packed MatMul costs more than it saves);
    # the first layer's norm with no Add before it, Gemma's norms after attention and MLP, and the per-head q/k
    # norms (flattened to rows for the kernel and back), one kernel each
    alone = 1 + (2 * layers if name in POST_NORMS else 0) + (2 * layers if name in QK_NORM else 0)
    assert report.fusions == {"layer_norm": 0, "rms_norm": alone, "skip_rms_norm": 2 * layers, "skip_layer_norm": 0,
                              "gelu": layers if name in GELU_TANH else 0, "rotary": 2 * layers,
                              "packed_matmul": 0 if name in QK_NORM else layers, "attention": layers}
    assert report.fused and not report.reason
    fused = onnx.load(dst)
    ops = collections.Counter(n.op_type for n in fused.graph.node)
    assert report.nodes_after == len(fused.graph.node) < report.nodes_before
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * layers + alone
    assert ops["ReduceMean"] == ops["Sqrt"] == 0  # no RMSNorm left written out
    assert ops["Neg"] == 0 and ops["Sin"] == 0  # rotate-half and the angle sub-graph are gone
    # the attention is one kernel per layer, rotary inside: no softmax, no repeat_kv copies, no KV
    # Concat, no separate rotary left; it reads the packed q/k/v (no Split left) - or, after a per-head
    # q/k norm, the normed q and k reshaped back and v from its own MatMul
    assert ops["GroupQueryAttention"] == layers and ops["Softmax"] == 0 and ops["RotaryEmbedding"] == 0
    assert ops["Split"] == 0
    producers = {o: n for n in fused.graph.node for o in n.output}
    config = json.loads((tiny_model_dir(name) / "config.json").read_text())["text_config"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    gqa = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"]
    for node in gqa:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        # read from the graph's shapes and scale constant, never from the model type
        assert attrs["num_heads"] == heads and attrs["kv_num_heads"] == kv_heads
        head_size = config.get("head_dim") or config["hidden_size"] // heads
        # the scores' scale as the model sets it: Granite's attention_multiplier, Gemma's query_pre_attn_scalar
        want = config.get("attention_multiplier") or config.get("query_pre_attn_scalar", head_size) ** -0.5
        assert attrs["scale"] == pytest.approx(want)
        assert attrs["do_rotary"] == 1 and node.input[9] == "position_ids"  # the runtime's positions
        assert attrs.get("local_window_size", -1) == (16 if name in WINDOWED_FIRST_LAYER and node is gqa[0] else -1)
        # Gemma 2's cap x tanh(scores / cap) is the kernel's softcap (test_softcap_bites: it matters here)
        assert attrs.get("softcap", 0.0) == pytest.approx(config.get("attn_logit_softcapping") or 0.0)
        if name in QK_NORM:  # the norm's output, (batch, sequence, heads x head size) again
            assert producers[node.input[0]].op_type == producers[node.input[1]].op_type == "Reshape"
            assert producers[node.input[2]].op_type == "MatMul"
        else:  # packed QKV; Qwen2's q/k/v biases packed alike, one Add after the packed MatMul
            packed = producers[node.input[0]]
            if config["model_type"] == "qwen2":
                assert packed.op_type == "Add" and packed.input[1] in {i.name for i in fused.graph.initializer}
                packed = producers[packed.input[0]]
            assert packed.op_type == "MatMul" and list(node.input[1:3]) == ["", ""]
    onnx.checker.check_model(fused)  # every new op is com.microsoft's, which the checker accepts
    # same I/O contract: the runtime feeds it exactly as the exported graph
    assert [i.name for i in fused.graph.input] == [i.name for i in base.graph.input]
    assert [o.name for o in fused.graph.output] == [o.name for o in base.graph.output]

    _assert_fused_like_exported(src, dst)


def test_softcap_bites(tiny_build, tmp_path):
    """The tiny Gemma 2's cap is small enough to change its answers: the fused graph without its softcap
    attribute differs from the exported graph by far more than the 1e-4 the test above allows, so it
    would see a cap lost or misread."""
    src = _decoder_graph(tiny_build("llava-gemma2"))
    fuse_decoder(src, tmp_path / "fused.onnx", max_positions=256, layer_windows=(16, None))
    model = onnx.load(tmp_path / "fused.onnx")
    for node in model.graph.node:
        kept = [a for a in node.attribute if a.name != "softcap"]
        del node.attribute[:]
        node.attribute.extend(kept)
    onnx.save(model, tmp_path / "uncapped.onnx")
    a, b = _session(src), _session(tmp_path / "uncapped.onnx")
    feeds = _feeds(a, np.random.default_rng(0), 2, 12, 4, 3)
    assert np.abs(a.run(None, feeds)[0] - b.run(None, feeds)[0]).max() > 2e-3


def test_a_routers_softmax_is_not_counted_as_attention_left_unfused(tiny_build, tmp_path):
    """Mixtral's expert routers end in a softmax over a projection (x W): every attention is fused and no
    note says two attentions were left unfused for want of a mask (it did, naming the routers')."""
    src = _decoder_graph(tiny_build("llava-mixtral"))
    report = fuse_decoder(src, tmp_path / "fused.onnx", max_positions=256)
    layers = sum(i.name.startswith("past_key_values") for i in onnx.load(src, load_external_data=False).graph.input) // 2
    assert report.fusions["attention"] == layers
    assert not any("softmax" in note for note in report.notes), report.notes


@pytest.mark.parametrize("sparse_mixer", [False, True])
def test_a_softmax_over_scores_of_two_activations_is_attention(tmp_path, sparse_mixer):
    """Which softmaxes a note counts as attentions left unfused: one over Q K^T (two activations) is; one
    over a router's projection is not, also when the logits are masked from their own maximum first
    (PhiMoE's sparse mixer: Where(max - logits > t, -inf, logits))."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "router")
    nodes = [helper.make_node("MatMul", ["x", "router"], ["logits"], name="router_logits")]
    if sparse_mixer:
        nodes += [helper.make_node("ReduceMax", ["logits"], ["top"], name="top", keepdims=1, axes=[-1]),
                  helper.make_node("Sub", ["top", "logits"], ["gap"], name="gap"),
                  helper.make_node("Greater", ["gap", "threshold"], ["far"], name="far"),
                  helper.make_node("Where", ["far", "lowest", "logits"], ["scores"], name="masked")]
    nodes += [helper.make_node("Softmax", ["scores" if sparse_mixer else "logits"], ["routing"], name="routing"),
              helper.make_node("MatMul", ["x", "xt"], ["qk"], name="qk"),
              helper.make_node("Softmax", ["qk"], ["probs"], name="attention")]
    consts = [w, numpy_helper.from_array(np.array(0.5, np.float32), "threshold"),
              numpy_helper.from_array(np.array(-np.inf, np.float32), "lowest")]
    graph = helper.make_graph(nodes, "routers", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s", 8]),
                                                 helper.make_tensor_value_info("xt", TensorProto.FLOAT, [8, "s"])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("routing", "probs")],
                              consts)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")
    report = fuse_decoder(tmp_path / "g.onnx", tmp_path / "out.onnx")
    assert [n for n in report.notes if "softmax" in n] == ["1 attention softmax(es) left unfused: no additive mask "
                                                           "before the softmax"], report.notes


def _every_attention_fused(build, tmp_path, rotary: bool = True):
    """The build's decoder fused: every layer's attention (and, with ``rotary``, its rotary) in one
    GroupQueryAttention, the KV one shared buffer. Returns (exported graph, fused graph, fused model)."""
    from vlm_export.contract.scheme import KV_IN_PLACE

    src, dst = _decoder_graph(build), tmp_path / "fused.onnx"
    report = fuse_decoder(src, dst, max_positions=256)
    layers = sum(i.name.startswith("past_key_values") for i in onnx.load(src, load_external_data=False).graph.input) // 2
    assert report.fusions["rotary"] == 2 * layers * rotary and report.fusions["attention"] == layers, report.notes
    fused = onnx.load(dst)
    ops = collections.Counter(n.op_type for n in fused.graph.node)
    assert ops["GroupQueryAttention"] == layers and ops["RotaryEmbedding"] == ops["Softmax"] == 0
    assert KV_IN_PLACE in {p.key for p in fused.metadata_props}
    assert report.kv_in_place and not report.kv_copied_because
    return src, dst, fused


def test_partial_rotary_fuses_into_the_attention_kernel(tiny_build, tmp_path):
    """Phi-2's rotary turns the first 16 of each head's 32 channels and passes the rest through (a
    Concat of the rotated Slice and the other Slice): the rotary pass fuses the rotated part and the
    attention kernel takes it with cos/sin caches as wide as half the rotated channels, so the layer is
    one kernel and the KV one shared buffer. Its MLP reads the same normed activation as q/k/v (attention
    and MLP in parallel): q/k/v are packed all the same, with their biases, and fc1 stays its own MatMul."""
    src, dst, fused = _every_attention_fused(tiny_build("llava-phi"), tmp_path)
    inits = {t.name: t for t in fused.graph.initializer}
    producers = {o: n for n in fused.graph.node for o in n.output}
    for node in (n for n in fused.graph.node if n.op_type == "GroupQueryAttention"):
        assert list(inits[node.input[7]].dims) == [256, 8]  # 16 of the head's 32 channels rotated
        biased = producers[node.input[0]]
        assert biased.op_type == "Add" and list(node.input[1:3]) == ["", ""]
        packed = producers[biased.input[0]]
        assert packed.op_type == "MatMul" and list(inits[packed.input[1]].dims) == [64, 3 * 64]
        beside = [n for n in fused.graph.node if n.op_type == "MatMul" and n.input[0] == packed.input[0]]
        assert len(beside) == 2  # the packed q/k/v and fc1
    _assert_fused_like_exported(src, dst)


@pytest.mark.parametrize("name, rotated", [("llava-cohere", 16), ("llava-glm", 16)])
def test_pairwise_rotary_fuses_into_the_attention_kernel(tiny_build, tmp_path, name, rotated):
    """Cohere's and GLM's rotary turns neighbouring channel pairs (GPT-J's layout), each spelt its own
    way by the exporter (Cohere repeats the frequencies before the cosine; GLM slices half of a
    rotate-half table and repeats it after, on the first 16 of 32 channels): the rotary pass reads both
    by running their angle sub-graph, and the kernel takes them interleaved, one per layer, the KV one
    shared buffer, the answers the exported graph's."""
    src, dst, fused = _every_attention_fused(tiny_build(name), tmp_path)
    inits = {t.name: t for t in fused.graph.initializer}
    for node in (n for n in fused.graph.node if n.op_type == "GroupQueryAttention"):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["do_rotary"] == 1 and attrs["rotary_interleaved"] == 1
        assert list(inits[node.input[7]].dims) == [256, rotated // 2]
    _assert_fused_like_exported(src, dst)

    # interleaving matters here: the same kernel told the halves are rotated answers otherwise
    for node in (n for n in fused.graph.node if n.op_type == "GroupQueryAttention"):
        next(a for a in node.attribute if a.name == "rotary_interleaved").i = 0
    onnx.save(fused, tmp_path / "halves.onnx")
    a, b = _session(src), _session(tmp_path / "halves.onnx")
    feeds = _feeds(a, np.random.default_rng(0), 2, 12, 4, 3)
    assert np.abs(a.run(None, feeds)[0] - b.run(None, feeds)[0]).max() > 1e-3


def test_a_rotary_before_the_head_transpose_stays_and_the_kernel_reads_its_output(tiny_build, tmp_path):
    """GPT-J rotates the pairs on (batch, sequence, heads, head size), before its head transpose, which
    RotaryEmbedding would read as (batch, heads, sequence, head size): the rotary pass leaves it as
    exported and says why; the attention kernel reads the rotated heads flattened, with no rotary of its
    own, the KV one shared buffer; its LayerNorms after a residual Add are SkipLayerNormalization."""
    src, dst, fused = _every_attention_fused(tiny_build("llava-gptj"), tmp_path, rotary=False)
    report = fuse_decoder(src, tmp_path / "again.onnx", max_positions=256)
    assert any("pairwise rotary" in n and "not broadcast over (batch, heads, sequence" in n for n in report.notes), \
        report.notes
    layers = report.fusions["attention"]
    # one norm per layer (attention and MLP in parallel) and the final one; the first layer's has no residual
    assert report.fusions["skip_layer_norm"] == layers
    ops = collections.Counter(n.op_type for n in fused.graph.node)
    assert ops["SkipLayerNormalization"] == layers and ops["LayerNormalization"] == 1
    producers = {o: n for n in fused.graph.node for o in n.output}
    for node in (n for n in fused.graph.node if n.op_type == "GroupQueryAttention"):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("do_rotary", 0) == 0
        for i in (0, 1):  # q and k: the exported rotary's Concat (rotated slice + the rest), flattened
            flat = producers[node.input[i]]
            assert flat.op_type == "Reshape" and producers[flat.input[0]].op_type == "Concat"
    _assert_fused_like_exported(src, dst)


def test_a_layernorm_written_out_becomes_one_op(tiny_build, tmp_path):
    """Cohere's LayerNorm is its own module (mean, centre, variance, scale: nine small ops, no bias): it
    becomes the standard LayerNormalization op, joined to the residual Add before it as
    SkipLayerNormalization (the first layer's has none and stays one LayerNormalization); the answers
    are the exported graph's."""
    src, dst = _decoder_graph(tiny_build("llava-cohere")), tmp_path / "fused.onnx"
    report = fuse_decoder(src, dst, max_positions=256)
    layers = report.fusions["attention"]
    # one norm per layer (attention and MLP in parallel) and the final one
    assert layers and report.fusions["layer_norm"] == layers + 1 and report.fusions["skip_layer_norm"] == layers
    ops = collections.Counter(n.op_type for n in onnx.load(dst, load_external_data=False).graph.node)
    assert ops["ReduceMean"] == 0 and ops["Sqrt"] == 0
    assert ops["LayerNormalization"] == 1 and ops["SkipLayerNormalization"] == layers
    _assert_fused_like_exported(src, dst)


def test_a_rotary_the_kernel_refuses_stays_before_it(tiny_build, tmp_path):
    """Heads 24 wide: ONNX Runtime's kernel takes them (a multiple of 8) but refuses to rotate them (16):
    the rotary pass's RotaryEmbedding stays before a kernel that rotates nothing, which reads its output
    transposed back and flattened; the layer is one kernel plus its rotary, the KV one shared buffer, the
    answers the exported graph's; the note says why."""
    src, dst = _decoder_graph(tiny_build("llava-llama-head24")), tmp_path / "fused.onnx"
    report = fuse_decoder(src, dst, max_positions=256)
    layers = sum(i.name.startswith("past_key_values") for i in onnx.load(src, load_external_data=False).graph.input) // 2
    assert report.fusions["attention"] == layers and report.fusions["rotary"] == 2 * layers and report.kv_in_place
    assert any("RotaryEmbedding kept before the kernel: head size 24" in n for n in report.notes), report.notes
    fused = onnx.load(dst)
    ops = collections.Counter(n.op_type for n in fused.graph.node)
    assert ops["GroupQueryAttention"] == layers and ops["RotaryEmbedding"] == 2 * layers and ops["Softmax"] == 0
    producers = {o: n for n in fused.graph.node for o in n.output}
    for node in (n for n in fused.graph.node if n.op_type == "GroupQueryAttention"):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs.get("do_rotary", 0) == 0 and list(node.input[7:10]) == ["", "", ""]
        for i in (0, 1):
            back = producers[producers[node.input[i]].input[0]]
            assert back.op_type == "Transpose" and producers[back.input[0]].op_type == "RotaryEmbedding"
    _assert_fused_like_exported(src, dst)


def test_heads_sliced_from_a_per_head_packed_projection_fuse(tiny_build, tmp_path):
    """GPT-NeoX views its one q/k/v projection as (batch, sequence, heads, 3 x head size), transposes it and
    chunks q, k and v off each head's channels (a Split): each, a sub-graph of the transposed heads alone,
    stays and the kernel reads it transposed back and flattened (rotating q and k itself, over the first
    16 of 32 channels) - one kernel per layer, the KV one shared buffer, the answers the exported graph's."""
    src, dst, fused = _every_attention_fused(tiny_build("llava-gptneox"), tmp_path)
    producers = {o: n for n in fused.graph.node for o in n.output}
    for node in (n for n in fused.graph.node if n.op_type == "GroupQueryAttention"):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["do_rotary"] == 1 and attrs["num_heads"] == attrs["kv_num_heads"] == 2
        for i in (0, 1, 2):
            back = producers[producers[node.input[i]].input[0]]
            assert back.op_type == "Transpose" and producers[back.input[0]].op_type in ("Slice", "Split")
    _assert_fused_like_exported(src, dst)


def test_a_query_scaled_after_its_projection_packs(tiny_build, tmp_path):
    """OPT scales q right after its projection (q_proj(x) x head_size^-0.5, biases on q/k/v): the factor
    moves into the kernel's scale, which then reads the projection itself, so q/k/v pack into one MatMul
    and one bias Add; k and v keep theirs (k's cache holds what the exported graph's holds)."""
    build = tiny_build("blip2-opt")
    src, dst, fused = _every_attention_fused(build, tmp_path, rotary=False)
    producers = {o: n for n in fused.graph.node for o in n.output}
    inits = {t.name for t in fused.graph.initializer}
    config = json.loads((build.path / "manifest.json").read_text())["scheme"]["geometry"]
    for node in (n for n in fused.graph.node if n.op_type == "GroupQueryAttention"):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["scale"] == pytest.approx(config["head_dim"] ** -0.5)
        biased = producers[node.input[0]]
        assert biased.op_type == "Add" and biased.input[1] in inits and list(node.input[1:3]) == ["", ""]
        assert producers[biased.input[0]].op_type == "MatMul"
    _assert_fused_like_exported(src, dst)


def test_a_per_head_layernorm_stays_and_the_kernel_reads_its_output(tiny_build, tiny_model_dir, tmp_path):
    """StableLM's per-head q/k LayerNorm (one LayerNorm per head after the transpose: Split /
    LayerNormalization / Concat) is a function of the heads alone: it stays as exported, its output is
    transposed back and flattened for the kernel, which rotates it (partial rotary) - one kernel per
    layer, the KV one shared buffer, the answers the exported graph's."""
    src, dst, fused = _every_attention_fused(tiny_build("llava-stablelm-qknorm"), tmp_path)
    layers = sum(n.op_type == "GroupQueryAttention" for n in fused.graph.node)
    heads = json.loads((tiny_model_dir("llava-stablelm-qknorm") / "config.json").read_text())[
        "text_config"]["num_attention_heads"]
    ops = collections.Counter(n.op_type for n in fused.graph.node)
    assert ops["LayerNormalization"] == 1 + 2 * heads * layers  # the first layer's input norm + the per-head ones
    assert ops["SkipLayerNormalization"] == 2 * layers
    producers = {o: n for n in fused.graph.node for o in n.output}
    for node in (n for n in fused.graph.node if n.op_type == "GroupQueryAttention"):
        for i in (0, 1):
            flat = producers[node.input[i]]
            back = producers[flat.input[0]]
            assert flat.op_type == "Reshape" and back.op_type == "Transpose" and producers[back.input[0]].op_type == "Concat"
        assert producers[node.input[2]].op_type == "MatMul"  # v: the projection itself
    _assert_fused_like_exported(src, dst)


def test_heads_the_attention_kernel_refuses_stay_unfused(tmp_path):
    """Heads of 12 channels without rotary (an OPT of hidden 48 over 4 heads): ONNX Runtime's
    GroupQueryAttention refuses them when it runs, so the attention pass leaves them as exported,
    says why, and the build passes parity; its LayerNorms still fuse, and the build says in a line
    that this decoder copies its KV cache each step."""
    from conftest import recorded_notes
    from tiny_models import make_tiny_blip2

    from vlm_export.build import BuildOptions, build

    progress = recorded_notes()
    result = build(make_tiny_blip2(tmp_path / "model", family="opt-head12"), tmp_path / "build",
                   BuildOptions(max_sequence=128), progress)
    assert result.failures == []
    fusion = result.manifest["graphs"]["lm_decoder"]["fusion"]
    assert fusion["made"] and fusion["fusions"]["attention"] == 0 and fusion["fusions"]["skip_layer_norm"] > 0
    assert any("multiple of 8" in n for n in fusion["notes"]), fusion
    assert not fusion["kv_in_place"] and "multiple of 8" in fusion["kv_copied_because"]
    assert any(line.startswith("lm_decoder: its fused form decodes on a KV cache copied every step")
               and "multiple of 8" in line for line in progress.lines), progress.lines


def test_the_runtimes_own_verdict_decides_what_is_fused(tiny_build, tmp_path, monkeypatch):
    """Each attention configuration is run once on the installed ONNX Runtime before it is written: the
    kernel's unstated limits come back as its own message (these three are ONNX Runtime 1.32's); a rotary
    it refuses stays before the kernel, and a configuration it refuses even without rotary stays unfused,
    with that message, instead of failing the build's parity."""
    from vlm_export.export import attention_fuse

    # (heads, kv heads, head size, rotary width, interleaved, softcap, sinks)
    def run(*config, sinks=False):
        return attention_fuse._run_one_attention(*config, sinks)

    assert run(4, 2, 16, 16, 0, 0.0) == "" and run(2, 1, 256, 256, 0, 0.0) == "" and run(4, 2, 32, 16, 1, 30.0) == ""
    assert run(4, 2, 16, 16, 0, 0.0, sinks=True) == ""
    assert "head_size must be a multiple of 8" in run(4, 2, 12, 0, 0, 0.0)
    assert "head_size shall be a multiple of 16" in run(4, 2, 24, 24, 0, 0.0)
    assert "cos_cache dimension 1 must be <= head_size / 2 and a multiple of 8" in run(4, 2, 16, 8, 0, 0.0)
    # verdicts this runtime would give a future kernel limit, on the tiny llama's layers (4 heads of 16 over
    # 2, rotary over all 16): its rotary refused, the graph's RotaryEmbedding stays before the kernel
    src, dst = _decoder_graph(tiny_build("llava-llama")), tmp_path / "fused.onnx"
    monkeypatch.setattr(attention_fuse, "_RUNTIME_VERDICTS", {(4, 2, 16, 16, 0, 0.0, False): "rotary refused for the test"})
    report = fuse_decoder(src, dst, max_positions=256)
    assert report.fusions["attention"] == 2 and report.fusions["rotary"] == 4
    assert any("kept before the kernel: rotary refused for the test" in n for n in report.notes), report.notes
    assert collections.Counter(n.op_type for n in onnx.load(dst).graph.node)["RotaryEmbedding"] == 4
    _assert_fused_like_exported(src, dst)
    # ... and without rotary too: the layers stay as exported, the message in the notes
    monkeypatch.setattr(attention_fuse, "_RUNTIME_VERDICTS", {(4, 2, 16, 16, 0, 0.0, False): "refused for the test",
                                                              (4, 2, 16, 0, 0, 0.0, False): "refused for the test"})
    report = fuse_decoder(src, dst, max_positions=256)
    assert report.fusions["attention"] == 0 and report.fusions["rotary"] > 0
    assert any("left unfused: refused for the test" in n for n in report.notes), report.notes
    _assert_fused_like_exported(src, dst)


def test_a_window_on_unknown_layers_keeps_the_growing_cache(tiny_build, tmp_path):
    """A manifest with a window but not its layers (written before windowed_layers): the exported
    masks keep the window, which is right on the growing cache only, so no shared buffer; a layer
    count the graph's attentions do not match is not guessed either."""
    from vlm_export.contract.scheme import KV_IN_PLACE

    src = _decoder_graph(tiny_build("llava-gemma3"))
    for windows, why in ((None, "a sliding window whose layers are not known"),
                         ((16, None, None), "a sliding window of 16 tokens on some of 3 layers, but 2 attentions")):
        report = fuse_decoder(src, tmp_path / "out.onnx", max_positions=256, layer_windows=windows)
        assert report.fusions["attention"] == 2 and any(why in note for note in report.notes)
        fused = onnx.load(tmp_path / "out.onnx", load_external_data=False)
        assert KV_IN_PLACE not in {p.key for p in fused.metadata_props}
        assert all(a.name != "local_window_size" for n in fused.graph.node for a in n.attribute)
    # a window no sequence of the build reaches masks nothing: the buffer is shared, no window in the kernel
    report = fuse_decoder(src, tmp_path / "out.onnx", max_positions=16, layer_windows=(16, None))
    assert not any("window" in note for note in report.notes)
    assert KV_IN_PLACE in {p.key for p in onnx.load(tmp_path / "out.onnx", load_external_data=False).metadata_props}


def _tempered(src, dst):
    """``src``'s decoder with a learned temperature per head multiplied into its attention scores (an
    attention the kernel's single scale cannot hold: it stays unfused), written to ``dst``."""
    model = onnx.load(src)
    nodes = list(model.graph.node)
    producers = {o: n for n in nodes for o in n.output}
    for softmax in [n for n in nodes if n.op_type == "Softmax"]:
        x = softmax.input[0]
        add = producers[x]
        scores = next(i for i in add.input if i in producers and producers[i].op_type in ("Mul", "Div", "MatMul"))
        heads = next(v for v in model.graph.value_info if v.name == scores).type.tensor_type.shape.dim[1].dim_value
        temps = np.linspace(0.5, 1.5, heads, dtype=np.float32).reshape(1, heads, 1, 1)
        temp = helper.make_node("Constant", [], [f"{x}_temp"], value=numpy_helper.from_array(temps))
        mul = helper.make_node("Mul", [scores, temp.output[0]], [f"{x}_tempered"])
        nodes[nodes.index(add):nodes.index(add)] = [temp, mul]
        add.input[0] = mul.output[0]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, dst)
    return model


def test_an_unfused_attention_over_the_cache_keeps_the_growing_cache(tiny_build, tmp_path):
    """An attention the pass does not fuse concatenates its past as exported: no shared buffer.
    (Unfused cross-attentions, which read no past, do not stop it: test_mllama.py.)"""
    from vlm_export.contract.scheme import KV_IN_PLACE
    from vlm_export.export.attention_fuse import _unfused_growing_caches
    from vlm_export.export.fuse import _Graph

    src = tmp_path / "tempered.onnx"
    _tempered(_decoder_graph(tiny_build("llava-llama")), src)
    report = fuse_decoder(src, tmp_path / "out.onnx", max_positions=256)
    assert report.fusions["attention"] == 0 and not report.kv_in_place
    assert "no attention over the KV cache fused" in report.kv_copied_because
    assert KV_IN_PLACE not in {p.key for p in onnx.load(tmp_path / "out.onnx", load_external_data=False).metadata_props}
    # what refuses the buffer when other attentions did fuse: every growing past an unfused one concatenates
    g = _Graph(onnx.load(src, load_external_data=False))
    grown = sorted(_unfused_growing_caches(g, set()))
    assert grown == sorted(i.name for i in g.graph.input if i.name.startswith("past_key_values")), grown
    assert _unfused_growing_caches(g, set(grown)) == []


def test_longrope_picks_its_caches_per_row(tiny_build, tmp_path):
    """Phi-3's longrope rotates a row with its long factors once the row's largest position is past the
    original context (64 in the tiny model), else with its short ones (per row as vlm-export loads it,
    adapters.loading.longrope_per_row; Hugging Face picks them for the whole batch): the exported graph
    picks the frequencies with a Where per row; the fused one keeps both tables' rows in one cos/sin
    cache pair and reads the long rows (positions + the build's 256) on the same condition, nothing
    copied per call, and the attention kernel reads the same. Same answers below, at and past the
    switch; a short row batched with a long one answers as alone; a graph that always read the short
    rows would differ past it."""
    src, dst, fused = _every_attention_fused(tiny_build("llava-phi3-longrope"), tmp_path)
    assert not [n for n in fused.graph.node if n.op_type == "Where" and n.output[0].startswith("rotary_")]
    inits = {t.name: t for t in fused.graph.initializer}
    gqa = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"]
    assert {tuple(n.input[7:10]) for n in gqa} == {("rotary_cos_cache_0", "rotary_sin_cache_0", "rotary_positions_0")}
    assert list(inits["rotary_cos_cache_0"].dims) == [2 * 256, 8]  # short rows, then long rows
    a, b = _session(src), _session(dst)
    rng = np.random.default_rng(0)
    for batch, past, new, pad in ((2, 0, 9, 3), (2, 30, 4, 7), (1, 63, 1, 0), (2, 60, 8, 5), (1, 70, 1, 0), (2, 100, 3, 9)):
        feeds = _feeds(a, rng, batch, past, new, pad)
        _assert_same_outputs(a, a.run(None, feeds), b.run(None, feeds), feeds["attention_mask"],
                             f"batch={batch} past={past} new={new} pad={pad}")
    # a short row (30 real tokens after 40 pads, positions from its first real token) beside a row past the
    # switch: each graph gives it the logits it gives it alone
    feeds = _feeds(a, rng, 2, 70, 1, 40)
    feeds["position_ids"] = np.array([[30], [70]], np.int64)
    alone = {k: v[:1] if v.shape[0] == 2 else v for k, v in feeds.items()}  # image rows: none either way
    for session in (a, b):
        np.testing.assert_allclose(session.run(None, feeds)[0][0], session.run(None, alone)[0][0], atol=1e-5)
    inits["rotary_positions_0_offset"].CopyFrom(numpy_helper.from_array(np.array(0, np.int64), "rotary_positions_0_offset"))
    onnx.save(fused, tmp_path / "short.onnx")  # always the short rows
    short = _session(tmp_path / "short.onnx")
    feeds = _feeds(a, rng, 1, 70, 1, 0)
    assert np.abs(a.run(None, feeds)[0] - short.run(None, feeds)[0]).max() > 1e-3
    feeds = _feeds(a, rng, 1, 30, 1, 0)
    np.testing.assert_allclose(short.run(None, feeds)[0], a.run(None, feeds)[0], atol=1e-4)


def test_fused_attention_keeps_left_padded_batches(tiny_build, tmp_path):
    """The runtime's batch: prompts of different lengths left-padded into one prefill (positions
    counting from each row's first real token), then decode steps, each graph on its own KV. The
    fused graph's logits equal the exported one's at every step, and so do the greedy tokens."""
    from vlm_export.contract.scheme import left_padded

    src = _decoder_graph(tiny_build("llava-llama"))
    dst = tmp_path / "fused.onnx"
    assert fuse_decoder(src, dst, max_positions=256).fusions["attention"] > 0
    a, b = _session(src), _session(dst)
    names = [o.name for o in a.get_outputs()]
    rng = np.random.default_rng(3)
    ids, mask, positions = left_padded([rng.integers(100, 1000, n).tolist() for n in (11, 4, 7)], pad_id=2)
    feeds = _feeds(a, rng, 3, 0, ids.shape[1])
    feeds.update(input_ids=ids, attention_mask=mask, position_ids=positions)
    fa, fb, tokens_a, tokens_b = feeds, feeds, [], []
    for step in range(4):  # the prefill and 3 decode steps
        want, got = dict(zip(names, a.run(None, fa))), dict(zip(names, b.run(None, fb)))
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4, rtol=0, err_msg=f"step {step}")
        # and the fused graph on the exported graph's KV: no drift hidden by each carrying its own
        _assert_same_outputs(a, a.run(None, fa), b.run(None, fa), fa["attention_mask"], f"step {step}")
        tokens_a.append(want["logits"][:, -1].argmax(-1).tolist())
        tokens_b.append(got["logits"][:, -1].argmax(-1).tolist())
        fa, fb = _step(fa, want, tokens_a[-1]), _step(fb, got, tokens_b[-1])
    assert tokens_b == tokens_a


def test_attention_that_does_not_match_stays_unfused(tiny_build, tmp_path):
    """A decoder whose attention is not the exported pattern (here: a learned temperature per head
    on the scores) keeps its attention nodes, with a note; the other fusions still apply and the
    answers are the graph's own."""
    src = tmp_path / "tempered.onnx"
    model = _tempered(_decoder_graph(tiny_build("llava-llama")), src)

    report = fuse_decoder(src, tmp_path / "out.onnx", max_positions=256)
    layers = sum(i.name.startswith("past_key_values") for i in model.graph.input) // 2
    assert report.fusions["attention"] == 0 and report.fusions["rotary"] == 2 * layers
    assert any("attention" in n and "left unfused" in n for n in report.notes), report.notes
    ops = collections.Counter(n.op_type for n in onnx.load(tmp_path / "out.onnx").graph.node)
    assert ops["GroupQueryAttention"] == 0 and ops["Softmax"] == layers
    a, b = _session(src), _session(tmp_path / "out.onnx")
    feeds = _feeds(a, np.random.default_rng(0), 2, 0, 6, 2)
    _assert_same_outputs(a, a.run(None, feeds), b.run(None, feeds), feeds["attention_mask"], "tempered")


def test_weight_only_quantizes_the_fused_decoder(tiny_build, tmp_path):
    """w4 after fusing: the packed projections become single MatMulNBits, and the graph runs with
    the unfused w4's answers (up to MatMulNBits' int8 activation rounding, which flips on fp32 noise)."""
    from vlm_export.precision.convert import PrecisionOptions, to_weight_only

    src = _decoder_graph(tiny_build("llava-llama"))
    fused = tmp_path / "fused.onnx"
    report = fuse_decoder(src, fused, max_positions=256)
    plain = to_weight_only(src, tmp_path / "w4.onnx", 4, PrecisionOptions())
    packed = to_weight_only(fused, tmp_path / "fused_w4.onnx", 4, PrecisionOptions())
    # each packing merged a layer's q/k/v MatMuls into one
    layers = report.fusions["packed_matmul"]
    assert layers and packed.details["quantized_matmuls"] == plain.details["quantized_matmuls"] - 2 * layers
    a, b = _session(tmp_path / "w4.onnx"), _session(tmp_path / "fused_w4.onnx")
    feeds = _feeds(a, np.random.default_rng(0), 1, 0, 8)
    x, y = a.run(None, feeds)[0][0, -1], b.run(None, feeds)[0][0, -1]
    assert np.corrcoef(x, y)[0, 1] > 0.999


def test_rotary_cache_bounds_positions(tiny_build, tmp_path):
    """The rotary caches hold max_positions rows: a position (or a total length) past them is
    refused by ONNX Runtime, never read out of bounds."""
    dst = tmp_path / "small.onnx"
    fuse_decoder(_decoder_graph(tiny_build("llava-llama")), dst, max_positions=16)
    session = _session(dst)
    feeds = _feeds(session, np.random.default_rng(0), 1, 15, 1)
    session.run(None, feeds)  # position 15: the last row
    feeds = _feeds(session, np.random.default_rng(0), 1, 16, 1)
    with pytest.raises(Exception, match="out of range|shall not be less than total_sequence_length"):
        session.run(None, feeds)
    feeds = _feeds(session, np.random.default_rng(0), 1, 3, 1)
    feeds["position_ids"] = np.array([[16]])
    with pytest.raises(Exception, match="out of range"):
        session.run(None, feeds)


def _pairwise_rotary(long_table: bool) -> onnx.ModelProto:
    """x (batch, 2 heads, sequence, 8) rotated pairwise as Cohere's exporter writes it: cos/sin of the
    frequencies repeated for each pair, (-x[1::2], x[0::2]) stacked and flattened. ``long_table``: the
    frequencies picked per call, as longrope's, by the call's largest position (past 16: the long ones)."""
    c = lambda name, value, dtype=np.int64: numpy_helper.from_array(np.array(value, dtype), name)  # noqa: E731
    n = helper.make_node
    inits = [c("short", [1.0, 0.5, 0.25, 0.125], np.float32), c("long", [0.5, 0.2, 0.1, 0.05], np.float32),
             c("last", [-1]), c("one", [1]), c("zero", [0]), c("two", [2]), c("end", [2**62]), c("pair", [1, 1, 1, 2]),
             c("flat", [0, 0, 8]), c("heads", [0, 2, 0, 8]), c("sixteen", 16)]
    nodes = [n("Unsqueeze", ["position_ids", "last"], ["pos3"]), n("Cast", ["pos3"], ["posf"], to=TensorProto.FLOAT)]
    if long_table:
        nodes += [n("ReduceMax", ["position_ids"], ["longest"], keepdims=0), n("Greater", ["longest", "sixteen"], ["is_long"]),
                  n("Where", ["is_long", "long", "short"], ["inv_freq"])]
    nodes += [n("Mul", ["posf", "inv_freq" if long_table else "short"], ["freqs"]),  # (batch, sequence, 4)
              n("Unsqueeze", ["freqs", "last"], ["freqs4"]), n("Expand", ["freqs4", "pair"], ["freqs_pairs"]),
              n("Reshape", ["freqs_pairs", "flat"], ["emb"])]  # each frequency twice: (batch, sequence, 8)
    for trig in ("Cos", "Sin"):
        nodes += [n(trig, ["emb"], [f"{trig}_emb"]), n("Unsqueeze", [f"{trig}_emb", "one"], [f"{trig}4"])]
    nodes += [n("Slice", ["x", "zero", "end", "last", "two"], ["even"]), n("Slice", ["x", "one", "end", "last", "two"], ["odd"]),
              n("Neg", ["odd"], ["neg_odd"]), n("Unsqueeze", ["neg_odd", "last"], ["a"]), n("Unsqueeze", ["even", "last"], ["b"]),
              n("Concat", ["a", "b"], ["stacked"], axis=-1), n("Reshape", ["stacked", "heads"], ["rotated"]),
              n("Mul", ["x", "Cos4"], ["x_cos"]), n("Mul", ["rotated", "Sin4"], ["rot_sin"]), n("Add", ["x_cos", "rot_sin"], ["y"])]
    heads = ["batch", 2, "sequence", 8]
    graph = helper.make_graph(
        nodes, "pairwise_rotary",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, heads),
         helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, heads)], inits,
        value_info=[helper.make_tensor_value_info("rotated", TensorProto.FLOAT, heads)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_pairwise_rotary_caches_are_the_graphs_own_angles():
    """The pairwise rotary of a bare graph becomes one interleaved RotaryEmbedding with the same outputs;
    the same graph picking its frequencies by the call's largest position (longrope's way) is left as it
    is, with the reason, since one position-indexed cache cannot hold both tables."""
    x = np.random.default_rng(0).standard_normal((2, 2, 5, 8)).astype(np.float32)
    for long_table, positions in ((False, [[0, 1, 2, 3, 4], [40, 41, 42, 43, 44]]), (True, [[0, 1, 2, 3, 4]] * 2)):
        model = _pairwise_rotary(long_table)
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x, "position_ids": np.array(positions)})[0]
        report = fuse_model(model, max_positions=64)
        ops = collections.Counter(node.op_type for node in model.graph.node)
        if long_table:
            assert report.fusions["rotary"] == 0 and ops["RotaryEmbedding"] == 0
            assert any("depend on the other positions" in note for note in report.notes), report.notes
        else:
            assert report.fusions["rotary"] == 1 and dict(ops) == {"RotaryEmbedding": 1}
            assert helper.get_attribute_value(model.graph.node[0].attribute[-1]) == 1  # interleaved
        got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x, "position_ids": np.array(positions)})[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_graph_without_patterns_is_left_unfused(tmp_path):
    """A graph none of the patterns match (one MatMul, a LayerNorm-free MLP) is written unchanged,
    with the reason."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="act"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])], [w1, w2])
    src = tmp_path / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), src)

    report = fuse_decoder(src, tmp_path / "out.onnx")
    assert not report.fused and report.reason
    assert report.nodes_before == report.nodes_after == 3
    out = onnx.load(tmp_path / "out.onnx")
    assert [n.op_type for n in out.graph.node] == ["MatMul", "Relu", "MatMul"]
    assert "com.microsoft" not in {o.domain for o in out.opset_import}
    x = rng.standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_array_equal(_session(tmp_path / "out.onnx").run(None, {"x": x})[0],
                                  _session(src).run(None, {"x": x})[0])


def test_bad_input_is_one_error(tmp_path):
    with pytest.raises(ExportError, match="no decoder graph"):
        fuse_decoder(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(ExportError, match="cannot read"):
        fuse_decoder(tmp_path / "junk.onnx", tmp_path / "out.onnx")


def test_an_attention_whose_mask_reads_its_own_cache_stays_unfused_and_the_rest_fuses(tmp_path):
    """Doge computes each layer's attention mask from that layer's values after the cache concatenation:
    the kernel, which produces that cache, cannot also take the mask made from it (the rewrite had made
    the graph feed itself, and the failed pass lost every other fusion with it). That attention is left
    unfused with the reason; the norms and rotary still fuse, and the build passes parity."""
    fusion, _ = _tiny_llava_built(tmp_path, "doge")
    assert fusion["made"] and fusion["fusions"]["attention"] == 0, fusion
    assert fusion["fusions"]["rotary"] > 0 and fusion["fusions"]["skip_rms_norm"] > 0, fusion
    assert fusion["notes"] == ["2 attention softmax(es) left unfused: its mask or q/k/v are computed from its own "
                               "layer's cache or output (a mask made from the values, as Doge's), which the kernel "
                               "would then have to feed itself"]


@pytest.mark.parametrize("family", ["hunyuan", "ministral3"])
def test_q_k_normed_or_scaled_after_the_rotary_fuse_with_the_graphs_rotary(tmp_path, family):
    """Hunyuan norms q and k per head after their rotary, Ministral 3 scales q per position after it: the
    kernel's own rotary would come after those, so the graph's RotaryEmbedding stays and the kernel reads
    the heads as the graph computed them (they were left unfused, "heads not from Transpose(0, 2, 1, 3)" /
    "q and k are not rotated alike"). Parity (positions past Ministral 3's 16, where its scale departs
    from 1) proves the answers."""
    fusion, _ = _tiny_llava_built(tmp_path, family)
    assert fusion["made"] and fusion["fusions"]["attention"] == 2, fusion
    assert fusion["notes"] == ["2 attention(s) fused with their RotaryEmbedding kept before the kernel: q/k normed "
                               "or scaled after their rotary (Hunyuan's norm, Ministral 3's scale per position), "
                               "which the kernel's own rotary would come after"]


def test_attention_sinks_and_a_rotary_on_the_halves_fuse(tmp_path):
    """gpt-oss: each head's sink logit is a softmax column dropped after it (the kernel's head_sink, which
    adds it to the softmax's denominator), and its rotary rotates the two halves written out (chunk, cos,
    sin half as wide) rather than through rotate_half. Both were left unfused. Parity proves the answers:
    without head_sink the fused form fails it (checked by hand) and the build falls back to the standard
    graph, which this test would see as ``made`` False."""
    fusion, result = _tiny_llava_built(tmp_path, "gptoss")
    assert fusion["made"] and fusion["fusions"]["attention"] == 2 and fusion["fusions"]["rotary"] == 4, fusion
    assert fusion["kv_in_place"] and not any("left unfused" in note for note in fusion["notes"]), fusion
    fused = _fused_graph(result)
    attentions = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(attentions) == 2 and all(n.input[11] for n in attentions)  # each with its head_sink


def test_attention_sinks_applied_after_the_attention_fuse(tmp_path):
    """Granite SWA scales each head's attention output by sigmoid(logsumexp(scores) - sink): the same extra
    softmax-denominator logit as gpt-oss's column, written after the attention (it was left unfused: "the
    attention output is not Transpose(0, 2, 1, 3) + Reshape"). It becomes head_sink; without it the fused
    form fails parity (checked by hand: prefill logits 0.066 off). Its middle layer has no rotary (a rotary
    base of 0), the other two their own bases and a 16-position window, which the kernels apply."""
    fusion, result = _tiny_llava_built(tmp_path, "granite-swa")
    assert fusion["made"] and fusion["fusions"]["attention"] == 3 and fusion["fusions"]["rotary"] == 4, fusion
    assert fusion["kv_in_place"] and fusion["notes"] == [
        "2 of 3 attentions apply their sliding window of 16 tokens in the kernel (local_window_size)"], fusion
    fused = _fused_graph(result)
    attentions = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"]
    assert [bool(n.input[11]) for n in attentions] == [True] * 3  # each with its head_sink
    assert [any(a.name == "do_rotary" for a in n.attribute) for n in attentions] == [True, False, True]
    assert not any(n.op_type == "ReduceLogSumExp" for n in fused.graph.node)  # the scale went with the attention


def test_one_kv_head_never_transposed_fuses(tmp_path):
    """GPT-BigCode's multi-query attention slices k and v from its fused projection as one head each,
    (batch, 1, sequence, head size), with no Transpose (it was left unfused: "heads from a Split"). One head
    is the same memory as its transposed (batch, sequence, head size): the kernel reads that view, and the
    KV cache becomes one shared buffer. Parity proves the answers."""
    fusion, result = _tiny_llava_built(tmp_path, "gpt-bigcode")
    assert fusion["made"] and fusion["fusions"]["attention"] == 2 and fusion["kv_in_place"], fusion
    assert fusion["notes"] == [], fusion
    fused = _fused_graph(result)
    assert {helper.get_attribute_value(a) for n in fused.graph.node if n.op_type == "GroupQueryAttention"
            for a in n.attribute if a.name == "kv_num_heads"} == {1}


def test_norms_without_a_weight_and_a_sign_flipped_rotary_fuse(tmp_path):
    """nanochat: its RMSNorms have no weight (the kernels get a unit gamma) and its rotate_half is
    Concat(x2, -x1), the usual rotation with the sine's sign flipped (the caches get the flipped sine;
    with the usual sine the fused form fails parity, checked by hand, and the build would fall back to
    the standard graph: ``made`` False here). Both were left as written. Its q/k norms come after the
    rotary, so the graph's RotaryEmbedding stays before the kernel (as Hunyuan's)."""
    fusion, result = _tiny_llava_built(tmp_path, "nanochat")
    # the embeddings' norm, the first layer's (reading it, no residual Add), 2 x 2 per-head q/k norms alone;
    # the other three layer norms and the final one after a residual Add
    assert fusion["made"] and fusion["fusions"] == {"layer_norm": 0, "rms_norm": 6, "skip_rms_norm": 4,
                                                    "skip_layer_norm": 0, "gelu": 0, "rotary": 4, "packed_matmul": 0,
                                                    "attention": 2}, fusion
    fused = _fused_graph(result, load_external_data=True)
    ops = collections.Counter(n.op_type for n in fused.graph.node)
    assert ops["ReduceMean"] == ops["Neg"] == ops["Sin"] == 0, ops
    unit = {t.name: numpy_helper.to_array(t) for t in fused.graph.initializer if t.name.startswith("unit_gamma_")}
    assert set(unit) == {"unit_gamma_64", "unit_gamma_16"} and all((g == 1).all() for g in unit.values())


def _gelu_graph(spelling: str) -> onnx.ModelProto:
    """x * 0.5 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) spelt as exporters write it (``spelling``: which factor
    meets (1 + tanh) first, and x^3 as Pow or products), then Mul by a second input; or a soft cap's
    cap * tanh(x / cap), which is no GELU."""
    c = lambda name, v: numpy_helper.from_array(np.array(v, np.float32), name)  # noqa: E731
    inits = [c("three", 3.0), c("cube_k", 0.044715), c("scale", float(np.sqrt(2 / np.pi))), c("one", 1.0),
             c("half", 0.5), c("cap", 30.0)]
    n = helper.make_node
    cube = ([n("Mul", ["x", "x"], ["x2"]), n("Mul", ["x", "x2"], ["x3"])] if "products" in spelling
            else [n("Pow", ["x", "three"], ["x3"])])
    inner = [*cube, n("Mul", ["cube_k", "x3"], ["kx3"]), n("Add", ["x", "kx3"], ["sum"]),
             n("Mul", ["sum", "scale"], ["scaled"]), n("Tanh", ["scaled"], ["t"]), n("Add", ["t", "one"], ["t1"])]
    outer = {"half first": [n("Mul", ["half", "t1"], ["h"]), n("Mul", ["x", "h"], ["gelu"])],
             "x first": [n("Mul", ["t1", "x"], ["h"]), n("Mul", ["h", "half"], ["gelu"])],
             "x times half": [n("Mul", ["x", "half"], ["xh"]), n("Mul", ["xh", "t1"], ["gelu"])]}
    nodes = ([n("Div", ["x", "cap"], ["xc"]), n("Tanh", ["xc"], ["tc"]), n("Mul", ["tc", "cap"], ["gelu"])]
             if spelling == "soft cap" else inner + outer[spelling.replace(", products", "")])
    nodes.append(n("Mul", ["gelu", "up"], ["y"]))
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 3, 16])
                                              for name in ("x", "up")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 16])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return onnx.shape_inference.infer_shapes(model)


@pytest.mark.parametrize("spelling", ["half first", "x first", "x times half", "half first, products", "soft cap"])
def test_a_tanh_gelu_becomes_fast_gelu_with_the_same_values(spelling):
    """Each spelling of PyTorch's gelu(approximate="tanh") becomes one com.microsoft.FastGelu reading x, which ONNX
    Runtime runs to the exported graph's values; a soft cap's tanh is left alone."""
    from vlm_export.export.fuse import MS_DOMAIN, _Graph, fuse_tanh_gelu

    model = _gelu_graph(spelling)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 16), np.float32) * 3,
             "up": np.random.default_rng(1).standard_normal((2, 3, 16), np.float32)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    g = _Graph(model)
    fused = fuse_tanh_gelu(g)
    g.commit()
    ops = [n.op_type for n in model.graph.node]
    if spelling == "soft cap":
        assert fused == 0 and "FastGelu" not in ops
        return
    assert fused == 1 and ops == ["FastGelu", "Mul"], ops
    model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
