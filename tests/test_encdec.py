"""Encoder-decoder fusion: the ``encoder_decoder`` scheme (contract/encdec.py) and the blip2_t5
adapter (BLIP-2 with a T5 language model), on the tiny random BLIP-2-T5 of tiny_models.

What is proved: ``vlm-export build`` passes parity per stage (vision, Q-Former, the encoder's hidden
states and cross K/V, prefill and decode logits) and its graphs' greedy tokens (TINY_PARITY_TOKENS) equal HF
``generate`` run as BLIP-2-T5's documentation runs it (processor(images, text) -> model.generate);
the encoder runs once per prefill and never in a decode step, and the decoder graph holds no
cross-attention K/V projection; rows with prompts of different lengths, prefilled together or
joining a running batch, decode as they do alone; the prompt and the new tokens are bounded each
on its own; the same model_type picks the BLIP-2 adapter by its config.
"""
from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch

from conftest import TINY_PARITY_TOKENS, fp32_bound
from vlm_export.contract import DecodeBatch
from vlm_export.contract.encdec import CROSS_KV, ENCODER_MASK
from vlm_export.runtime.generate import GenerationConfig, GenerationRequest, Scheduler, generate, generate_batch
from vlm_export.runtime.load import open_build
from vlm_export.runtime.runners import Runner

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

QUESTION = "Question: what is in the picture? Answer:"
LONG_QUESTION = "Question: describe the picture in one long sentence, with every color you see. Answer:"
TEXT_QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def blip2_t5(tiny_model_dir, tiny_build):
    return tiny_model_dir("blip2-t5"), tiny_build("blip2-t5")


@pytest.fixture(scope="module")
def photos():
    from PIL import Image
    from skimage import data

    return {"rocket": Image.fromarray(data.rocket()).convert("RGB"),  # not among the parity samples
            "cat": Image.fromarray(data.chelsea()).convert("RGB")}


class Counting(Runner):
    """A stage's real runner, its calls counted (with each call's batch and sequence)."""

    def __init__(self, inner: Runner):
        super().__init__(inner.name, inner.input_names, inner.output_names)
        self.inner, self.backend, self.calls = inner, inner.backend, []

    def _run(self, feeds):
        self.calls.append(tuple(feeds["input_ids"].shape))
        return self.inner.infer(feeds)


def counted(pipe):
    """``pipe`` with its encoder and decoder runners counting their calls (the pipeline object kept)."""
    scheme = pipe.scheme
    encoder, decoder = Counting(pipe.runners[scheme.encoder_stage]), Counting(pipe.runners[scheme.decoder_stage])
    pipe.runners.update({scheme.encoder_stage: encoder, scheme.decoder_stage: decoder})
    return encoder, decoder


def test_blip2_configs_pick_their_adapter(blip2_t5, tmp_path, run_cli):
    """One model_type, two adapters: each config goes to the one that takes its kind of LM; forcing the
    other is a one-line error."""
    from conftest import assert_one_line_error
    from vlm_export.adapters import adapter_for

    model, _ = blip2_t5
    assert adapter_for(model).name == "blip2_t5"
    config = json.loads((model / "config.json").read_text())
    for flag, name in ((True, "blip2"), (False, "blip2_t5")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**config, "use_decoder_only_language_model": flag}))
        assert adapter_for(folder).name == name
    # a config without the flag: decided as Blip2Config decides it, by the text model's type
    del config["use_decoder_only_language_model"]
    (tmp_path / "blip2_t5" / "config.json").write_text(json.dumps(config))
    assert adapter_for(tmp_path / "blip2_t5").name == "blip2_t5"
    assert_one_line_error(run_cli("build", str(model), "--adapter", "blip2", "--out", str(tmp_path / "out")),
                          "encoder-decoder language model (t5)", "decoder-only")
    # InstructBLIP: the same rule between its two adapters
    iblip = tmp_path / "iblip-t5"
    iblip.mkdir()
    for flag, name in ((False, "instructblip_t5"), (True, "instructblip")):
        (iblip / "config.json").write_text(json.dumps({"model_type": "instructblip", "use_decoder_only_language_model": flag,
                                                       "text_config": {"model_type": "t5" if not flag else "llama"}}))
        assert adapter_for(iblip).name == name


def test_build_parity_per_stage(blip2_t5):
    _, result = blip2_t5
    assert result.failures == []
    report = json.loads((result.path / "report.json").read_text())
    stages = report["stages"]
    assert {"vision_encoder", "qformer", "lm_encoder", "prefill", "decode"} <= set(stages)
    assert set(stages["lm_encoder"]) == {"encoder_hidden_states", "cross_key_values"}
    for stage in ("prefill", "decode"):
        assert stages[stage]["logits"]["max_abs"] <= 1e-4 and stages[stage]["logits"]["cosine"] > 0.99999
    for stage in ("vision_encoder", "qformer", "lm_encoder"):
        for name, metrics in stages[stage].items():
            assert metrics["max_abs"] <= fp32_bound(metrics["ref_max_abs"]), (stage, name, metrics)
    # TINY_PARITY_TOKENS greedy tokens = HF generate (processor + Blip2ForConditionalGeneration.generate; text-only
    # prompts: the T5's own generate), the split in PyTorch and the graphs on ONNX Runtime
    for rows in report["end_to_end"].values():
        assert [r["first_divergence"] for r in rows] == [None] * len(rows)
        assert all(r["identical"] and r["reference"] for r in rows)
        assert max(len(r["reference"]) for r in rows) == TINY_PARITY_TOKENS


def test_manifest_declares_the_scheme(blip2_t5):
    model, result = blip2_t5
    from transformers import GenerationConfig as HFGenerationConfig

    manifest = result.manifest
    scheme = manifest["scheme"]
    assert scheme["name"] == "encoder_decoder"
    assert scheme["decoder_prompt_ids"] == [HFGenerationConfig.from_pretrained(model).decoder_start_token_id]
    assert [(s["name"], s["kind"]) for s in manifest["stages"]] == [
        ("vision_encoder", "image"), ("qformer", "image"), ("lm_encoder", "encoder"), ("lm_decoder", "decoder")]
    text = json.loads((model / "config.json").read_text())["text_config"]
    g = scheme["geometry"]
    assert (g["num_layers"], g["num_kv_heads"], g["head_dim"]) == (text["num_decoder_layers"], text["num_heads"],
                                                                    text["d_kv"])
    for stage in manifest["stages"]:  # every declaration is what the graph takes and returns
        graph = manifest["graphs"][stage["name"]]
        for kind in ("inputs", "outputs"):
            assert [(t["name"], t["dims"]) for t in stage[kind]] == [(t["name"], t["shape"]) for t in graph[kind]]
    decoder = {i["name"]: i["shape"] for i in manifest["graphs"]["lm_decoder"]["inputs"]}
    assert decoder["cross_key_values"] == ["batch", 2 * g["num_layers"], g["num_kv_heads"], "encoder_sequence",
                                           g["head_dim"]]
    assert decoder["encoder_attention_mask"] == ["batch", "encoder_sequence"]


def test_t5_self_attention_fused_on_one_kv_buffer(blip2_t5, tmp_path):
    """T5's self-attention (unscaled scores + its relative position bias + the mask) becomes
    GroupQueryAttention at scale 1 with bias + mask as its attention_bias, the cross-attentions (no past)
    stay standard ops. The bias is computed per row from position_ids and the attention mask, not from the
    cache's length, so the KV is one buffer written in place. Same outputs as the exported graph on
    left-padded rows, a hole in a row and several new tokens after a past; a graph whose bias counts
    positions by column (Hugging Face's compute_bias) is left unfused, with that reason."""
    import onnx
    import onnxruntime as ort

    from vlm_export.export.fuse import fuse_decoder

    _, result = blip2_t5
    fusion = result.manifest["graphs"]["lm_decoder"]["fusion"]
    layers = result.manifest["scheme"]["geometry"]["num_layers"]
    assert fusion["fusions"]["attention"] == layers and fusion["kv_in_place"], fusion
    assert open_build(result.path).kv_in_place
    src = result.path / "graphs" / "lm_decoder.onnx"
    report = fuse_decoder(src, tmp_path / "fused.onnx", max_positions=256)
    fused = onnx.load(tmp_path / "fused.onnx", load_external_data=False)
    gqa = [n for n in fused.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == layers and all(next(a.f for a in n.attribute if a.name == "scale") == 1.0 for n in gqa)
    assert sum(n.op_type == "Softmax" for n in fused.graph.node) == layers  # the cross-attentions
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (src, tmp_path / "fused.onnx"))
    shapes = {i.name: i.shape for i in a.get_inputs()}
    rng = np.random.default_rng(0)
    for rows, past, new in ((1, 0, 1), (2, 0, 3), (3, 20, 1), (2, 9, 4)):
        mask = np.ones((rows, past + new), np.int64)
        mask[1:, :2] = 0  # left padding
        mask[2:, 5:8] = 0  # a hole (a row joined a running batch)
        feeds = {"input_ids": rng.integers(3, 500, (rows, new)), "attention_mask": mask,
                 "position_ids": np.maximum(np.cumsum(mask, 1) - 1, 0)[:, past:],
                 "encoder_attention_mask": np.ones((rows, 7), np.int64)}
        for name, shape in shapes.items():
            if name not in feeds:
                dims = [rows if d == "batch" else 7 if d == "encoder_sequence" else past if isinstance(d, str) else d
                        for d in shape]
                feeds[name] = rng.standard_normal(dims).astype(np.float32)
        want, got = a.run(None, feeds), b.run(None, feeds)
        np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=0, err_msg=f"{rows} {past} {new}")
        for w, g in zip(want[1:], got[1:]):  # the presents, at the real columns
            real = mask.astype(bool)
            np.testing.assert_allclose(g.transpose(0, 2, 1, 3)[real], w.transpose(0, 2, 1, 3)[real], atol=1e-4, rtol=0)
    # Hugging Face's own bias (from the cache's length): standard ops, the reason recorded
    from vlm_export.adapters import adapter_for
    from vlm_export.adapters import blip2_t5 as t5_adapter
    from vlm_export.export.onnx_export import export_stage

    model_dir, _ = blip2_t5

    loaded = adapter_for(model_dir).load(model_dir)
    stage = loaded.adapter.decoder_stage(loaded)
    first = stage.module.t5.decoder.block[0].layer[0].SelfAttention
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(t5_adapter, "_bias_given", lambda attention, bias: contextlib.nullcontext())
        by_column = export_stage(stage, tmp_path / "by_column")
    assert first.compute_bias.__func__ is type(first).compute_bias
    report = fuse_decoder(by_column, tmp_path / "by_column.fused.onnx", max_positions=256)
    assert report.fusions["attention"] == 0 and not report.kv_in_place
    assert "a position bias computed from the KV cache's length (by column)" in report.kv_copied_because


def test_decoder_never_recomputes_cross_kv(blip2_t5):
    """The decoder layers' cross-attention k/v weights are in the encoder graph and not the decoder's
    (found by value), the query side stays in the decoder."""
    from conftest import holds_weight, stage_weights
    from transformers import Blip2ForConditionalGeneration

    model_dir, result = blip2_t5
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)

    decoder, encoder = stage_weights(result, "lm_decoder"), stage_weights(result, "lm_encoder")
    for block in model.language_model.decoder.block:
        attn = block.layer[1].EncDecAttention
        for module in (attn.k, attn.v):
            weight = module.weight.detach().numpy()
            assert holds_weight(encoder, weight) and not holds_weight(decoder, weight)
        assert holds_weight(decoder, attn.q.weight.detach().numpy())


def test_encoder_runs_once_per_prefill(blip2_t5, photos):
    """Counted on the real runners: one encoder call per prefill, for its rows together; decode steps
    call the decoder alone, one token per row."""
    _, result = blip2_t5
    pipe = open_build(result.path)
    encoder, decoder = counted(pipe)
    out = generate(pipe, QUESTION, [photos["rocket"]], GenerationConfig(max_new_tokens=8, ignore_eos=True))
    assert len(out.token_ids) == 8
    assert encoder.calls == [(1, out.prompt_tokens)]
    assert decoder.calls == [(1, 1)] * 8  # the decoder's prompt (its start token), then 7 steps

    encoder.calls.clear()
    scheduler = Scheduler(pipe, max_batch=2, max_prefill_padding=1.0)
    config = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    for prompt, images in ((QUESTION, [photos["cat"]]), (TEXT_QUESTION, []), (LONG_QUESTION, [photos["rocket"]])):
        scheduler.submit(pipe.prompt_ids(prompt, len(images)),
                         pipe.encode_images(pipe.pixel_values(images)) if images else pipe.scheme.empty_image_input(),
                         config)
    list(scheduler.run_raising())
    assert len(encoder.calls) == scheduler.prefill_calls == 2  # two rows together, the third when one left
    assert [rows for rows, _ in encoder.calls] == [2, 1]


def test_rows_of_different_lengths_decode_as_alone(blip2_t5, photos, monkeypatch):
    """Prompts of different lengths (the encoder input right-padded, the cross K/V and encoder mask
    padded when rows join), with an image and without, prefilled together and joining a running
    batch, on the fused decoder's shared KV buffer and on the standard form's growing cache: the same
    greedy tokens as each alone."""
    _, result = blip2_t5
    pipe = open_build(result.path)
    config = GenerationConfig(max_new_tokens=12)
    short = GenerationConfig(max_new_tokens=5)
    requests = [GenerationRequest(LONG_QUESTION, (photos["rocket"],), config),
                GenerationRequest(TEXT_QUESTION, (), short),
                GenerationRequest(QUESTION, (photos["cat"],), config),
                GenerationRequest("Question: colors? Answer:", (photos["rocket"],), config)]
    alone = [generate(pipe, r.prompt, list(r.images), r.config).token_ids for r in requests]
    assert len({tuple(a) for a in alone}) == len(alone)
    together = generate_batch(pipe, requests, max_batch=4, max_prefill_padding=1.0)
    assert [r.token_ids for r in together] == alone
    # the fused decoder: rows in one KV buffer (each row's cross K/V kept per slot), joining as others leave
    assert pipe.kv_in_place
    assert [r.token_ids for r in generate_batch(pipe, requests, max_batch=2)] == alone
    # the standard form's growing cache: a joining row's state padded to the running batch's (watched)
    pipe = open_build(result.path, form="standard")
    assert not pipe.kv_in_place
    joins = []  # (running rows' encoder length, joining rows', running rows, the joined state): the real join, watched
    real_join = DecodeBatch.join

    def watched(self, other):
        joined = real_join(self, other)
        if self.rows:
            joins.append((self.caches[CROSS_KV].shape[3], other.caches[CROSS_KV].shape[3], self.rows, joined))
        return joined

    monkeypatch.setattr(DecodeBatch, "join", watched)
    joining = generate_batch(pipe, requests, max_batch=2)  # rows join as others leave
    assert [r.token_ids for r in joining] == alone
    # at least one join of rows whose prompts differ in length: the cross K/V and encoder mask
    # padded on the right of the encoder axis, the padding zero and masked
    uneven = [j for j in joins if j[0] != j[1]]
    assert uneven, f"no join of different encoder lengths among {[j[:2] for j in joins]}"
    for a, b, running, joined in uneven:
        assert joined.caches[CROSS_KV].shape[3] == joined.caches[ENCODER_MASK].shape[1] == max(a, b)
        shorter = range(running) if a < b else range(running, joined.rows)
        for row in shorter:
            assert not joined.caches[ENCODER_MASK][row, min(a, b):].any()
            assert not joined.caches[CROSS_KV][row, :, :, min(a, b):].any()


def test_length_limits_follow_the_scheme(blip2_t5):
    """The prompt goes through the encoder, the decoder holds its start token + the new tokens: each
    is bounded by max_sequence on its own (a decoder-only build adds them)."""
    from vlm_export.errors import InputError

    _, result = blip2_t5
    pipe = open_build(result.path)
    limit = pipe.limits.max_sequence
    pipe.check_length(limit, limit - 1)  # both at their limit: fits
    with pytest.raises(InputError, match="encoder"):
        pipe.check_length(limit + 1, 1)
    with pytest.raises(InputError, match="lower max_tokens"):
        pipe.check_length(3, limit)


def test_cli_generate_equals_in_process(blip2_t5, photos, tmp_path, run_cli):
    _, result = blip2_t5
    image = tmp_path / "rocket.png"
    photos["rocket"].save(image)
    proc = run_cli("generate", str(result.path), "--image", str(image), "--prompt", QUESTION, "--max-tokens", "10",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = generate(open_build(result.path), QUESTION, [photos["rocket"]], GenerationConfig(max_new_tokens=10))
    assert served["token_ids"] == expected.token_ids and served["text"] == expected.text


def test_task_prompts_expand_as_the_processor():
    """A layout's task_prompts (Florence-2's task tokens) rewrite a prompt as Florence2Processor's own
    _construct_prompts does (run here on the same tables), and a manifest without them reads as before."""
    from types import SimpleNamespace

    from transformers import Florence2Processor

    from vlm_export.contract import PromptLayout
    from vlm_export.errors import InputError
    from vlm_export.runtime.prompt import expand_task

    plain = {"<CAPTION>": "What does the image describe?", "<OD>": "Locate the objects with category name in the image."}
    with_input = {"<CAPTION_TO_PHRASE_GROUNDING>": "Locate the phrases in the caption: {input}"}
    processor = SimpleNamespace(task_prompts_without_inputs=plain, task_prompts_with_input=with_input)
    layout = PromptLayout("prefix", 5, 4, use_chat_template=False, task_prompts={**plain, **with_input})
    for prompt in ("<CAPTION>", "<OD>", "<CAPTION_TO_PHRASE_GROUNDING> a cat on a mat ", "What is this?"):
        assert expand_task(layout, prompt) == Florence2Processor._construct_prompts(processor, prompt)[0]
    with pytest.raises(InputError, match="only content"):
        expand_task(layout, "<CAPTION> in French")
    assert PromptLayout.from_dict(layout.to_dict()) == layout
    assert "task_prompts" not in PromptLayout("prefix", 5, 4).to_dict()


def test_fp16_keeps_t5_index_maths_and_wo_in_fp32(blip2_t5, photos, tmp_path, monkeypatch):
    """The encoder's fp16 variant: T5's relative-position buckets (float maths truncated to an integer)
    and HF's fp32 module (``wo``, with the residual sums after it) stay fp32 and are recorded; without
    the index island the buckets move and the encoder's output drifts past the fp16 gate."""
    import onnxruntime as ort

    from vlm_export.precision import convert

    _, result = blip2_t5
    pipe = open_build(result.path)
    scheme = pipe.scheme
    ids = pipe.prompt_ids(LONG_QUESTION, 1)
    feeds = scheme.encoder_feeds([ids], pipe.encode_images(pipe.pixel_values([photos["cat"]])))
    src = result.path / result.manifest["graphs"]["lm_encoder"]["file"]

    def states(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(["encoder_hidden_states"], feeds)[0].ravel().astype(np.float64)

    def cosine(a, b):
        return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

    reference = states(src)
    info = convert.to_fp16(src, tmp_path / "kept.onnx", ("wo",))
    layers = json.loads((result.path / "manifest.json").read_text())["scheme"]["geometry"]["num_layers"]
    assert info.details["fp32_index_nodes"] > 0
    assert info.details["fp32_modules"]["modules"] == ["wo"] and info.details["fp32_modules"]["nodes"] > layers
    kept = cosine(reference, states(tmp_path / "kept.onnx"))
    monkeypatch.setattr(convert, "index_arithmetic", lambda model: [])
    convert.to_fp16(src, tmp_path / "plain.onnx")
    plain = cosine(reference, states(tmp_path / "plain.onnx"))
    assert kept > 0.999 > plain, (kept, plain)


def test_instructblip_t5_served_answers_equal_in_process(tiny_build, tiny_model_dir, photos, tmp_path, run_cli):
    """InstructBLIP with a Flan-T5: the instruction-aware image path (the Q-Former reads the question,
    so one image asked two things is encoded twice) feeding the T5's encoder and decoder. Served by
    tritonserver (image path and lm_encoder as models of their own, the decoder in process) it answers
    as in process; forcing the decoder-only adapter on it is one line."""
    from conftest import assert_one_line_error
    from vlm_export.adapters import adapter_for
    from vlm_export.client.client import VLMClient
    from vlm_export.model_repository.render import render_repository
    from vlm_export.serve.server import TritonServer

    model = tiny_model_dir("instructblip-t5")
    assert adapter_for(model).name == "instructblip_t5"
    assert_one_line_error(run_cli("build", str(model), "--adapter", "instructblip", "--out", str(tmp_path / "out")),
                          "encoder-decoder language model (t5)", "decoder-only")
    result = tiny_build("instructblip-t5")
    assert [s["name"] for s in result.manifest["stages"]] == ["vision_encoder", "qformer", "lm_encoder", "lm_decoder"]
    assert result.manifest["scheme"]["name"] == "encoder_decoder"
    pipe = open_build(result.path)
    config = GenerationConfig(max_new_tokens=8)
    image = tmp_path / "cat.png"
    photos["cat"].save(image)
    asks = [(QUESTION, [image]), (LONG_QUESTION, [image]), (TEXT_QUESTION, [])]
    expected = [generate(pipe, q, list(imgs), config).text for q, imgs in asks]
    repo = render_repository(result.path, tmp_path / "repo")
    assert (repo / "lm_encoder" / "config.pbtxt").is_file()  # the vlm model calls it once per prefill (BLS)
    with TritonServer(repo, log_file=tmp_path / "triton.log") as server:
        client = VLMClient(f"grpc://{server.grpc_url}")
        got = [client.generate(q, imgs, max_tokens=8).text for q, imgs in asks]
    assert got == expected


def test_tensorrt_profiles_hold_real_feeds(blip2_t5, photos):
    """The encoder's profile and the decoder's two (from the limits: the scheme's encoder_dim_ranges and
    dim_ranges) hold a real prefill of prompts of different lengths and a decode step of them; a prompt
    longer than max_sequence is outside the encoder's."""
    from vlm_export.contract.profiles import stage_profiles
    from vlm_export.engines.tensorrt import profile_for
    from vlm_export.errors import RunnerError

    _, result = blip2_t5
    pipe = open_build(result.path)
    scheme = pipe.scheme
    encoder = json.loads(json.dumps(stage_profiles(result.manifest, "lm_encoder")))
    decoder = json.loads(json.dumps(stage_profiles(result.manifest, "lm_decoder")))
    rows = [pipe.prompt_ids(LONG_QUESTION, 1), pipe.prompt_ids(TEXT_QUESTION, 0)]
    image_input = scheme.batch_image_inputs([pipe.encode_images(pipe.pixel_values([photos["cat"]])),
                                             scheme.empty_image_input()])
    assert profile_for(encoder, scheme.encoder_feeds(rows, image_input)) == 0
    prefill = pipe.prefill_inputs(rows, image_input)
    assert profile_for(decoder, prefill) == 0
    state = scheme.prefill_state(pipe.decode(prefill), [len(r) for r in rows], prefill)
    assert profile_for(decoder, scheme.step_feeds(state, np.array([5, 6]))) == 1
    too_long = [rows[1] * (pipe.limits.max_sequence // len(rows[1]) + 1)]
    with pytest.raises(RunnerError, match="outside every optimization profile"):
        profile_for(encoder, scheme.encoder_feeds(too_long, scheme.empty_image_input()), "lm_encoder")


def test_other_depths_follow_the_config(tmp_path, photos):
    """One encoder layer, three decoder layers (the geometry and cross K/V follow num_decoder_layers):
    the split modules' prefill and decode-step logits equal Blip2ForConditionalGeneration's own forward
    on the same decoder tokens; the build's end-to-end reference (HF generate, which in transformers 5.24
    sizes its cache by the encoder's num_layers and fails on a deeper decoder with it) runs without the
    cache and starts with the same token."""
    from tiny_models import make_tiny_blip2_t5
    from vlm_export.adapters import adapter_for
    from vlm_export.adapters.reference import reference_pipeline
    from vlm_export.contract import Limits

    model_dir = make_tiny_blip2_t5(tmp_path / "model", seed=1, encoder_layers=1, decoder_layers=3)
    loaded = adapter_for(model_dir).load(model_dir)
    pipe = reference_pipeline(loaded, Limits(max_batch=2, max_images=1, max_sequence=64, tokens_per_image=4))
    ids = pipe.prompt_ids(QUESTION, 1)
    pixels = pipe.pixel_values([photos["cat"]])
    logits, state = pipe.prefill(ids, pipe.encode_images(pixels))
    assert state.caches[CROSS_KV].shape[1] == 2 * 3
    token = int(np.argmax(logits))
    step_logits, _ = pipe.step(state, np.asarray([token]))
    with torch.no_grad():
        out = loaded.model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                           pixel_values=torch.from_numpy(pixels),
                           decoder_input_ids=torch.tensor([[*pipe.scheme.decoder_prompt_ids, token]]), use_cache=False)
    for got, want in ((logits, out.logits[0, -2].numpy()), (step_logits[0], out.logits[0, -1].numpy())):
        np.testing.assert_allclose(got, want, atol=fp32_bound(np.abs(want).max()), rtol=1e-5)
    reference = loaded.adapter.reference_generate(loaded, torch.tensor([ids]), torch.from_numpy(pixels), 4, [-1],
                                                  prompt=QUESTION)
    assert len(reference) == 4 and reference[0] == token


def test_bench_times_the_encoder_stage(blip2_t5, tmp_path):
    """``vlm-export bench``'s stage cases include the encoder (once per prefill, on the prompt); the
    decode step runs on the decoder's own length (its start prompt + half the new tokens) with cross
    K/V of the prompt's length, and the prefill counts the decoder's tokens, not the prompt's."""
    from vlm_export.bench import BenchOptions, run_bench

    _, result = blip2_t5
    scheme = open_build(result.path).scheme
    options = BenchOptions(backends=("onnxruntime",), batch=(1,), new_tokens=4, threads=1, warmup=0, iterations=1,
                           requests=1, bandwidth_mb=16, out=tmp_path / "bench")
    results = run_bench(result.path, options)
    stages = {r["stage"]: r for r in results["stages"]}
    assert set(stages) == {"preprocess", "vision_encoder", "qformer", "lm_encoder", "prefill", "decode_step"}
    # the first token waits for the LM encoder too
    assert list(results["ttft_breakdown"]["onnxruntime"]["parts_ms"]) == [
        "preprocess", "vision_encoder", "qformer", "lm_encoder", "prefill"]
    assert stages["lm_encoder"]["latency_ms"]["min"] > 0
    inputs, decoder_past = results["inputs"], len(scheme.decoder_prompt_ids) + 4 // 2
    shapes = inputs["decode_state_shapes"]
    assert inputs["decode_past_len"] == results["ceiling"]["past_len"] == decoder_past
    assert shapes["past_key_values.0.key"][2] == decoder_past
    assert shapes[CROSS_KV][3] == shapes[ENCODER_MASK][1] == inputs["prompt_tokens"] > decoder_past
    assert results["ceiling"]["kv_bytes_at_past"] == scheme.geometry.kv_bytes(decoder_past)
    prefill, encoder = stages["prefill"], stages["lm_encoder"]
    assert prefill["throughput"]["value"] == round(len(scheme.decoder_prompt_ids) * 1e3 / prefill["latency_ms"]["p50"], 3)
    assert encoder["throughput"]["value"] == round(inputs["prompt_tokens"] * 1e3 / encoder["latency_ms"]["p50"], 3)


@pytest.mark.parametrize("target", ["python", "onnxruntime", "tensorrt"])
@pytest.mark.parametrize("model", ["blip2-t5", "florence2"])
def test_repository_configs_fit_the_graphs(tiny_build, tmp_path, model, target):
    """The Triton repository with the decoder as a model of its own (bls), configs only, rendered and
    checked against the graphs (for tensorrt also against the backend's rules): the encoder is a model
    of its own, taking the prompt and the image rows, giving every decoder layer's cross K/V; the
    decoder takes them with the encoder mask."""
    from vlm_export.model_repository.render import RepositoryOptions, model_configs, render_repository

    result = tiny_build(model)
    options = RepositoryOptions(target=target, decoder_mode="bls")
    out = render_repository(result.path, tmp_path / "repo", options, configs_only=True, echo=lambda _: None)
    configs = model_configs(result.manifest, options)
    assert {p.name for p in out.iterdir()} == set(configs)
    assert {"preprocess", "image_encoder", "lm_encoder", "lm_decoder", "vlm"} <= set(configs)
    geometry = result.manifest["scheme"]["geometry"]
    encoder_out = {t["name"]: t["dims"] for t in configs["lm_encoder"]["output"]}
    decoder_in = {t["name"]: t["dims"] for t in configs["lm_decoder"]["input"]}
    assert encoder_out[CROSS_KV] == decoder_in[CROSS_KV] == [-1, 2 * geometry["num_layers"], geometry["num_kv_heads"],
                                                            -1, geometry["head_dim"]]


def test_decoder_prompt_follows_the_config_hf_generate_uses(blip2_t5, photos):
    """BLIP-2's generate hands over to its T5's own generate, so the T5's generation config (not the
    outer model's) says how the decoder starts: a forced BOS set only on the outer config is not
    forced; one on the T5's is, and HF's own output starts with both."""
    from vlm_export.adapters import adapter_for

    model_dir, _ = blip2_t5
    adapter = adapter_for(model_dir)
    loaded = adapter.load(model_dir)
    start = loaded.model.language_model.generation_config.decoder_start_token_id
    loaded.model.generation_config.forced_bos_token_id = 5
    assert adapter.scheme(loaded).decoder_prompt_ids == [start]
    loaded.model.language_model.generation_config.forced_bos_token_id = 5
    assert adapter.scheme(loaded).decoder_prompt_ids == [start, 5]
    inputs = loaded.processor(images=photos["cat"], text=QUESTION, return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out[0, :2].tolist() == [start, 5]
