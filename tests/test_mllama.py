"""Cross-attention fusion (Llama-3.2-Vision, ``MllamaForConditionalGeneration``): the mllama adapter
and the ``cross_attention`` decoding scheme, on tiny random models built here.

What is proved: the export-friendly pieces equal Hugging Face's own (the processor's
cross-attention mask from the prompt ids, ``_prepare_cross_attention_mask``); ``vlm-export build``
passes parity per stage (vision, projector, cross K/V, prefill and decode logits); the built
graphs' greedy tokens equal HF ``generate`` run the documented way (processor + chat template) with
one image, two images and none; decode steps read the cross K/V the image path made once; rows with
different numbers of images decode together as they do alone.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from conftest import fp32_bound
from tiny_models import make_tiny_mllama
from vlm_export.build import BuildOptions, build
from vlm_export.compare.parity import Sample
from vlm_export.runtime.generate import GenerationConfig, GenerationRequest, generate, generate_batch
from vlm_export.runtime.load import open_build

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

TOKENS = 32
QUESTION = "What is in the picture?"
TWO_QUESTION = "What do these two pictures have in common?"
TEXT_QUESTION = "Write a short story about a robot."


@pytest.fixture(scope="module")
def photos():
    from PIL import Image
    from skimage import data

    # different aspect ratios: 1, 2 and 3 tiles of the tiny model's 16x16 tile grid
    return {"astronaut": Image.fromarray(data.astronaut()).convert("RGB"),
            "wide": Image.fromarray(data.coffee()).convert("RGB").resize((48, 16)),
            "tall": Image.fromarray(data.chelsea()).convert("RGB").resize((16, 32))}


@pytest.fixture(scope="module")
def mllama(tiny_model_dir, tiny_build, tmp_path_factory, photos):
    """(model folder, build result): cross-attention layers 1 and 3 of 5. The suite's shared build
    where conftest's TINY_MODELS has it (made once per run), else one of its own."""
    from conftest import TINY_MODELS

    if "mllama" in TINY_MODELS:
        return tiny_model_dir("mllama"), tiny_build("mllama")
    root = tmp_path_factory.mktemp("mllama")
    model = make_tiny_mllama(root / "model", cross_layers=(1, 3))
    samples = [Sample(QUESTION, (photos["wide"],), "one image"),
               Sample(TWO_QUESTION, (photos["astronaut"], photos["tall"]), "two images"),
               Sample(TEXT_QUESTION, (), "text-only")]
    result = build(model, root / "build", BuildOptions(max_sequence=256, max_images=2, samples=samples))
    return model, result


def _hf_generate(model_dir, messages, images, model=None):
    """Greedy tokens of HF generate, run as the model's documentation shows: the processor's chat
    template, then the processor on the images and that text."""
    from transformers import MllamaForConditionalGeneration, MllamaProcessor

    from vlm_export.adapters.mllama import hf_generate_can_cache

    processor = MllamaProcessor.from_pretrained(model_dir)
    model = model or MllamaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[list(images)] if images else None, text=[text], add_special_tokens=False,
                       return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=TOKENS, do_sample=False, eos_token_id=2, pad_token_id=2,
                             use_cache=hf_generate_can_cache(model.config))
    tokens = out[0, inputs["input_ids"].shape[1]:].tolist()
    return tokens[:tokens.index(2)] if 2 in tokens else tokens


def _user(images: int, text: str):
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def test_cross_mask_is_the_processors():
    """The scheme's mask from prompt ids equals MllamaProcessor's on random prompts (images at the
    start, in runs of consecutive image tokens, at the end, none)."""
    from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                              get_cross_attention_token_mask)

    from vlm_export.contract import DecoderGeometry
    from vlm_export.contract.cross import CrossAttentionScheme

    image, tiles = 9, 4
    scheme = CrossAttentionScheme(DecoderGeometry(2, 2, 8, 16, 32, 64), image, 2, tiles, 5)
    rng = np.random.default_rng(0)
    for trial in range(300):
        length = int(rng.integers(1, 14))
        ids = [int(i) for i in rng.choice([1, 2, 3, image], size=length, p=[0.25, 0.25, 0.2, 0.3])]
        if trial % 7 == 0:
            ids = [image] * min(2, length) + ids[2:]
        n = ids.count(image)
        counts = [int(c) for c in rng.integers(1, tiles + 1, size=n)]
        theirs = convert_sparse_cross_attention_mask_to_dense(
            [get_cross_attention_token_mask(ids, image)], [counts], tiles, length)
        ours = scheme.cross_mask([ids], np.asarray([counts or [0]], np.int64))
        assert np.array_equal(ours[:, :, :n], theirs[:, :, :n] if n else ours[:, :, :0]), ids
        assert not ours[:, :, n:].any()


def test_cross_attention_bias_equals_hf():
    """The decoder's export-friendly mask equals HF's _prepare_cross_attention_mask (both outputs)
    when every image of a row is real, fully masked rows included."""
    from transformers.models.mllama.modeling_mllama import _prepare_cross_attention_mask

    from vlm_export.adapters.mllama import cross_attention_bias

    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        mask = (torch.rand(3, 6, 2, 4, generator=gen) > 0.6).to(torch.int64)
        mask[0, :2] = 0  # rows that attend to no image
        theirs, theirs_rows = _prepare_cross_attention_mask(mask, num_vision_tokens=5, dtype=torch.float32)
        ours, rows = cross_attention_bias(mask, torch.ones(3, 2, dtype=torch.int64), 5)
        assert torch.equal(ours.expand_as(theirs), theirs)
        assert torch.equal(rows, theirs_rows)


def test_padding_images_are_never_attended():
    """A row padded to more images than it has spreads a no-image text row over its real keys only."""
    from vlm_export.adapters.mllama import cross_attention_bias

    mask = torch.zeros(1, 2, 2, 3, dtype=torch.int64)
    mask[0, 1, 0, :2] = 1
    bias, rows = cross_attention_bias(mask, torch.tensor([[1, 0]]), 4)
    lowest = torch.finfo(torch.float32).min
    assert torch.all(bias[0, 0, 0, :12] == 0) and torch.all(bias[0, 0, 0, 12:] == lowest)  # no image: its own
    assert torch.all(bias[0, 0, 1, :8] == 0) and torch.all(bias[0, 0, 1, 8:] == lowest)  # two real tiles
    assert rows.flatten().tolist() == [0.0, 1.0]


def test_build_parity_per_stage(mllama):
    _, result = mllama
    assert result.failures == []
    report = json.loads((result.path / "report.json").read_text())
    stages = report["stages"]
    assert {"vision_encoder", "projector", "cross_kv", "prefill", "decode"} <= set(stages)
    for stage in ("prefill", "decode"):
        assert stages[stage]["logits"]["max_abs"] <= 1e-4 and stages[stage]["logits"]["cosine"] > 0.99999
    for stage in ("vision_encoder", "projector", "cross_kv"):
        for metrics in stages[stage].values():
            assert metrics["max_abs"] <= fp32_bound(metrics["ref_max_abs"], relative=1e-4), (stage, metrics)
    for rows in report["end_to_end"].values():
        assert [r["first_divergence"] for r in rows] == [None] * len(rows) and all(len(r["reference"]) for r in rows)


def test_manifest_declares_the_scheme_and_image_inputs(mllama):
    model, result = mllama
    manifest = result.manifest
    scheme = manifest["scheme"]
    assert scheme["name"] == "cross_attention" and scheme["cross_layers"] == 2 and scheme["tiles"] == 3
    assert scheme["geometry"]["num_layers"] == 3  # the self-attention layers: the growing cache
    vision = next(s for s in manifest["stages"] if s["name"] == "vision_encoder")
    assert [(t["name"], t["role"]) for t in vision["inputs"]] == [
        ("pixel_values", "pixels"), ("aspect_ratio_ids", "pixels"), ("aspect_ratio_mask", "pixels")]
    decoder = onnx.load(result.path / manifest["graphs"]["lm_decoder"]["file"], load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in decoder.graph.input}
    assert dims["cross_attention_mask"] == ["batch", "sequence", "images", 3]
    assert dims["cross_key_values"][0] == "batch" and dims["cross_key_values"][3] == "cross_sequence"


def test_decoder_never_recomputes_cross_kv(mllama):
    """The cross layers' k/v projection weights are in the cross_kv graph and not in the
    decoder's (found by value: the exporter renames and may transpose them), so the decoder only
    reads the K/V the image path made once; a decode step feeds the state's K/V back unchanged."""
    from conftest import holds_weight, stage_weights
    from PIL import Image
    from transformers import MllamaForConditionalGeneration

    model_dir, result = mllama
    model = MllamaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)

    decoder, cross_kv = stage_weights(result, "lm_decoder"), stage_weights(result, "cross_kv")
    for layer in model.config.text_config.cross_attention_layers:
        attn = model.model.language_model.layers[layer].cross_attn
        for module in (attn.k_proj, attn.v_proj):  # (k_norm's weight is ones at init, like q_norm's: not telling)
            weight = module.weight.detach().numpy()
            assert holds_weight(cross_kv, weight) and not holds_weight(decoder, weight), (layer, module)
        assert holds_weight(decoder, attn.q_proj.weight.detach().numpy())  # the query side stays in the decoder

    from vlm_export.contract.cross import CROSS_KV

    pipe = open_build(result.path)
    ids = pipe.prompt_ids(QUESTION, 1)
    logits, state = pipe.prefill(ids, pipe.encode_images(pipe.pixel_values([Image.new("RGB", (20, 12), (90, 20, 200))])))
    feeds = pipe.scheme.step_feeds(state, np.asarray([int(np.argmax(logits))]))
    assert feeds[CROSS_KV] is state.caches[CROSS_KV]
    _, after = pipe.step(state, np.asarray([int(np.argmax(logits))]))
    assert after.caches[CROSS_KV] is state.caches[CROSS_KV]


@pytest.mark.parametrize("case", ["one image", "two images", "text-only"])
def test_generate_equals_hf_generate(mllama, photos, case):
    model, result = mllama
    images = {"one image": [photos["wide"]], "two images": [photos["astronaut"], photos["tall"]],
              "text-only": []}[case]
    question = {"one image": QUESTION, "two images": TWO_QUESTION, "text-only": TEXT_QUESTION}[case]
    expected = _hf_generate(model, _user(len(images), question), images)
    pipe = open_build(result.path)
    got = generate(pipe, question, images, GenerationConfig(max_new_tokens=TOKENS)).token_ids
    assert got == expected
    assert len(expected) == TOKENS or expected  # a real answer, not an immediate EOS


@pytest.mark.parametrize("cross_layers", [(0, 2), (3, 4)])
def test_split_at_other_cross_layer_positions(tmp_path, photos, cross_layers):
    """The split modules (PyTorch, not exported: the export is proved above) with cross-attention
    layers first and last in the stack equal HF generate (without its cache where a cross layer is
    layer 0: HF's cached generate fails there, see adapters.mllama.hf_generate_can_cache)."""
    from vlm_export.adapters import adapter_for
    from vlm_export.adapters.reference import reference_pipeline
    from vlm_export.contract import Limits

    model_dir = make_tiny_mllama(tmp_path / "model", cross_layers=cross_layers)
    loaded = adapter_for(model_dir).load(model_dir)
    pipe = reference_pipeline(loaded, Limits(max_batch=2, max_images=2, max_sequence=256, tokens_per_image=1))
    for images, question in (([photos["wide"]], QUESTION), ([], TEXT_QUESTION)):
        expected = _hf_generate(model_dir, _user(len(images), question), images, loaded.model)
        assert generate(pipe, question, images, GenerationConfig(max_new_tokens=TOKENS)).token_ids == expected


def test_image_processor_with_other_tiles_is_refused(tmp_path, run_cli):
    """A processor that pads to another tile count than the vision model's: one line at load."""
    from conftest import assert_one_line_error

    model_dir = make_tiny_mllama(tmp_path / "model")
    config = model_dir / "processor_config.json"
    saved = json.loads(config.read_text())
    saved["image_processor"]["max_image_tiles"] = 2
    config.write_text(json.dumps(saved))
    assert_one_line_error(run_cli("build", str(model_dir), "--out", str(tmp_path / "build")),
                          "pads images to 2 tiles but the vision model takes 3")
    assert not (tmp_path / "build").exists()


def test_image_processor_with_other_tile_size_is_refused(tmp_path, run_cli):
    """Tiles of another size than the vision model's image_size (HF's own forward fails on them at its
    position embedding): one line at load, naming both sizes."""
    from conftest import assert_one_line_error

    model_dir = make_tiny_mllama(tmp_path / "model")
    config = model_dir / "processor_config.json"
    saved = json.loads(config.read_text())
    saved["image_processor"]["size"] = {"height": 24, "width": 24}
    config.write_text(json.dumps(saved))
    assert_one_line_error(run_cli("build", str(model_dir), "--out", str(tmp_path / "build")),
                          "makes 24x24 images but the vision tower takes 16x16")
    assert not (tmp_path / "build").exists()


@pytest.mark.parametrize("cross_layers, num_layers, needles", [
    ((0, 1), 2, ("every one of the 2 text layers", "is a cross-attention layer")),
    ((1, 7), 4, ("cross_attention_layers [1, 7]", "names layer(s) [7], but the text model has 4")),
])
def test_cross_layers_the_decoder_cannot_take_are_refused(tmp_path, run_cli, cross_layers, num_layers, needles):
    """Every text layer a cross-attention one (no self-attention cache to decode with), or a cross layer
    past the last one (HF builds the model and never reaches it): one line at load, not an error from
    deep inside the split or the export."""
    from conftest import assert_one_line_error

    model_dir = make_tiny_mllama(tmp_path / "model", cross_layers=cross_layers, num_layers=num_layers)
    assert_one_line_error(run_cli("build", str(model_dir), "--out", str(tmp_path / "build")), *needles)
    assert not (tmp_path / "build").exists()


def test_images_change_the_logits(mllama, photos):
    """The tiny model's cross-attention is live: another image moves the next-token logits by far more
    than the parity tolerance (so the parity and token tests above could not pass ignoring images)."""
    _, result = mllama
    pipe = open_build(result.path)
    ids = pipe.prompt_ids(QUESTION, 1)
    logits = {name: pipe.prefill(ids, pipe.encode_images(pipe.pixel_values([photos[name]])))[0]
              for name in ("wide", "tall", "astronaut")}
    for a, b in (("wide", "tall"), ("wide", "astronaut"), ("tall", "astronaut")):
        assert np.abs(logits[a] - logits[b]).max() > 100 * fp32_bound(np.abs(logits[a]).max(), relative=1e-4), (a, b)


def test_rows_with_different_image_counts_decode_together(mllama, photos):
    """Two images, none and one in one batch (cross K/V padded to two images, the padding masked),
    on the in-place KV buffer: the same greedy tokens as each alone."""
    _, result = mllama
    pipe = open_build(result.path)
    # the self-attention KV in one in-place buffer, the image K/V and masks per slot (SlotBatch.padded);
    # the cross-attention layers, left unfused, read no past
    notes = result.manifest["graphs"]["lm_decoder"]["fusion"]["notes"]
    assert pipe.kv_in_place and not any("cannot share one buffer" in n for n in notes), notes
    config = GenerationConfig(max_new_tokens=12)
    requests = [GenerationRequest(TWO_QUESTION, (photos["astronaut"], photos["tall"]), config),
                GenerationRequest(TEXT_QUESTION, (), config),
                GenerationRequest(QUESTION, (photos["wide"],), config)]
    together = [r.token_ids for r in generate_batch(pipe, requests)]
    alone = [generate(pipe, r.prompt, list(r.images), config).token_ids for r in requests]
    assert together == alone


@pytest.mark.parametrize("target", ["python", "onnxruntime", "tensorrt"])
def test_repository_configs_fit_the_graphs(mllama, tmp_path, target):
    """The Triton repository with the decoder as a model of its own (bls), configs only, rendered and
    checked against the graphs (and, for tensorrt, the backend's rules): preprocess emits the three
    processor outputs the vision stage reads, the ensemble hands back what the scheme builds its
    image input from (the cross K/V and the tile mask), the decoder takes the cross K/V and masks."""
    from vlm_export.model_repository.render import RepositoryOptions, model_configs, render_repository

    _, result = mllama
    options = RepositoryOptions(target=target, decoder_mode="bls")
    out = render_repository(result.path, tmp_path / "repo", options, configs_only=True, echo=lambda _: None)
    configs = model_configs(result.manifest, options)
    assert {p.name for p in out.iterdir()} == set(configs) == {
        "preprocess", "vision_encoder", "projector", "cross_kv", "image_encoder", "lm_decoder", "vlm"}
    outputs = {t["name"]: t for t in configs["preprocess"]["output"]}
    assert list(outputs) == ["pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"]
    # one id per image: Triton wants dims past the batch, the model sees [images]
    assert outputs["aspect_ratio_ids"]["dims"] == [1] and outputs["aspect_ratio_ids"]["reshape"] == {"shape": []}
    assert [t["name"] for t in configs["image_encoder"]["output"]] == ["cross_key_values", "aspect_ratio_mask"]
    decoder = {t["name"]: t["dims"] for t in configs["lm_decoder"]["input"]}
    scheme = result.manifest["scheme"]
    geometry = scheme["geometry"]
    assert configs["lm_decoder"]["max_batch_size"] == 0
    assert decoder["cross_attention_mask"] == [-1, -1, -1, scheme["tiles"]] and decoder["cross_image_mask"] == [-1, -1]
    assert decoder["cross_key_values"] == [-1, 2 * scheme["cross_layers"], geometry["num_kv_heads"], -1,
                                           geometry["head_dim"]]


def test_engine_with_image_cache_equals_one_at_a_time(mllama, photos):
    """The in-process engine a served model runs: each image encoded alone (its cross K/V cached and
    reused by a later request), requests with two images, none and one decoded together."""
    import threading

    from vlm_export.runtime.engine import GenerationEngine
    from vlm_export.runtime.generate import TokenEvent
    from vlm_export.runtime.image_cache import ImageEmbeddingCache

    _, result = mllama
    pipe = open_build(result.path)
    config = GenerationConfig(max_new_tokens=10)
    requests = [(TWO_QUESTION, [photos["astronaut"], photos["tall"]]), (TEXT_QUESTION, []),
                (QUESTION, [photos["tall"]]), (QUESTION, [photos["wide"]])]
    alone = [generate(pipe, prompt, images, config).token_ids for prompt, images in requests]
    cache = ImageEmbeddingCache(64 << 20)
    engine = GenerationEngine(pipe, max_batch=4, image_cache=cache)
    finals, done = {}, [threading.Event() for _ in requests]

    def collect(k):
        def on_event(event):
            if not isinstance(event, TokenEvent):
                finals[k] = event
                done[k].set()
        return on_event

    try:
        # the second "tall" is submitted once the first has finished: prefilled together, both would miss
        # (which grouping happens depends on timing)
        for k, (prompt, images) in enumerate(requests):
            if k == 2:
                assert done[0].wait(120)
            engine.submit(prompt, images, config, on_event=collect(k))
        assert all(d.wait(120) for d in done)
    finally:
        engine.close()
    assert [finals[k].token_ids for k in range(len(requests))] == alone
    assert cache.hits >= 1  # "tall" came twice
    # three images kept, each bounded by its CrossImages' bytes (its K/V and its tile count)
    per_image = pipe.encode_images(pipe.pixel_values([photos["wide"]])).nbytes
    assert per_image > pipe.scheme.empty_image_input().nbytes and cache.bytes == 3 * per_image


SERVED_TOKENS = 16


def test_served_answers_equal_in_process(mllama, photos, tmp_path, run_cli):
    """The python repository served by a real tritonserver (in-process decoder): streamed greedy
    answers over gRPC equal in-process ``generate`` with one image, two images and none; the served
    image path hands back the in-process cross K/V and tile mask; a repeated image is served from the
    vlm model's cache with the same answer; a broken image fails its own request and the server goes
    on serving."""
    import tritonclient.grpc as grpcclient

    from conftest import wait_for
    from vlm_export.client.client import VLMClient
    from vlm_export.serve.server import TritonServer

    _, result = mllama
    files = {}
    for name, image in photos.items():  # the client sends encoded files
        files[name] = tmp_path / f"{name}.png"
        image.save(files[name])
    pipe = open_build(result.path)
    config = GenerationConfig(max_new_tokens=SERVED_TOKENS, ignore_eos=True)
    asks = [(QUESTION, [files["wide"]]), (TWO_QUESTION, [files["astronaut"], files["tall"]]), (TEXT_QUESTION, [])]
    expected = [generate(pipe, q, images, config) for q, images in asks]
    repo = tmp_path / "repo"
    rendered = run_cli("repository", str(result.path), "--target", "python", "--out", str(repo))
    assert rendered.returncode == 0, rendered.stderr
    with TritonServer(repo, log_file=tmp_path / "triton.log") as server:
        client = VLMClient(f"grpc://{server.grpc_url}")
        for (question, images), want in zip(asks, expected):
            *pieces, final = client.stream(question, images, max_tokens=SERVED_TOKENS, ignore_eos=True)
            assert ("".join(pieces), final.completion_tokens) == (want.text, SERVED_TOKENS), question
            assert final.prompt_tokens == want.prompt_tokens

        raw = grpcclient.InferenceServerClient(server.grpc_url)
        images = grpcclient.InferInput("images", [2, 1], "BYTES")
        images.set_data_from_numpy(np.array([[files["astronaut"].read_bytes()], [files["tall"].read_bytes()]],
                                            dtype=np.object_))
        served = raw.infer("image_encoder", [images])
        local = pipe.run_image_stages(pipe.pixel_values([files["astronaut"], files["tall"]]))
        for name in pipe.scheme.image_input_sources:
            assert np.abs(served.as_numpy(name) - local[name]).max() < 1e-5, name

        hits = server.metric("vlm_image_cache_hits_total") or 0
        assert client.generate(*asks[0], max_tokens=SERVED_TOKENS, ignore_eos=True).text == expected[0].text
        assert wait_for(lambda: server.metric("vlm_image_cache_hits_total") == hits + 1)

        broken = tmp_path / "broken.png"
        broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
        with pytest.raises(Exception, match="image"):
            client.generate(QUESTION, [broken], max_tokens=4)
        assert client.generate(*asks[1], max_tokens=SERVED_TOKENS, ignore_eos=True).text == expected[1].text


def test_tensorrt_profiles_hold_real_feeds(mllama, photos):
    """The scheme's profiles (from the limits) hold a real prefill of rows with two images and none
    (profile 0) and a decode step of them (profile 1); a third image is outside (max_images 2)."""
    from vlm_export.contract.profiles import stage_profiles
    from vlm_export.engines.tensorrt import profile_for
    from vlm_export.errors import RunnerError

    _, result = mllama
    pipe = open_build(result.path)
    scheme = pipe.scheme
    profiles = json.loads(json.dumps(stage_profiles(result.manifest, "lm_decoder")))  # as a plan's metadata has them
    two = pipe.encode_images(pipe.pixel_values([photos["astronaut"], photos["tall"]]))
    rows = [pipe.prompt_ids(TWO_QUESTION, 2), pipe.prompt_ids(TEXT_QUESTION, 0)]
    prefill = scheme.prefill_feeds(rows, scheme.batch_image_inputs([two, scheme.empty_image_input()]))
    assert profile_for(profiles, prefill) == 0
    state = scheme.prefill_state(pipe.decode(prefill), [len(r) for r in rows], prefill)
    assert profile_for(profiles, scheme.step_feeds(state, np.array([5, 6]))) == 1
    three = scheme.join_image_inputs([two, two])
    with pytest.raises(RunnerError, match="outside every optimization profile"):
        profile_for(profiles, scheme.prefill_feeds([pipe.prompt_ids(TWO_QUESTION, 2) + rows[0]], three), "lm_decoder")


def test_bench_measures_every_stage(mllama, tmp_path):
    """``vlm-export bench`` on the build (torch and ONNX Runtime, a few calls each): every stage the
    manifest declares, the cross K/V one included, plus prefill, a decode step and end to end, with
    finite positive times (speed is not asserted), the reports written; a decode step's bytes count
    the fixed image K/V the step reads."""
    from vlm_export.bench import BenchOptions, run_bench

    _, result = mllama
    options = BenchOptions(backends=("torch", "onnxruntime"), batch=(1, 2), new_tokens=3, threads=2, warmup=0,
                           iterations=2, requests=2, bandwidth_mb=16, out=tmp_path / "bench")
    results = run_bench(result.path, options)
    cases = {(r["stage"], r["batch"], r["backend"]) for r in results["stages"]}
    assert cases == {(s, b, be) for be in ("torch", "onnxruntime")
                     for s, b in [("preprocess", 1), ("vision_encoder", 1), ("vision_encoder", 2), ("projector", 1),
                                  ("projector", 2), ("cross_kv", 1), ("cross_kv", 2), ("prefill", 1), ("decode_step", 1)]}
    for r in results["stages"]:
        assert r["latency_ms"]["n"] == 2 and np.isfinite(r["latency_ms"]["p50"]) and r["latency_ms"]["min"] > 0
    for backend in ("torch", "onnxruntime"):
        e2e = results["end_to_end"][backend]
        assert e2e["tokens"] == 2 * 3 and np.isfinite(e2e["tpot_ms"]["p50"]) and e2e["ttft_ms"]["p50"] > 0
    inputs, scheme = results["inputs"], result.manifest["scheme"]
    geometry = scheme["geometry"]
    kv = [1, 2 * scheme["cross_layers"], geometry["num_kv_heads"], scheme["tiles"] * scheme["tokens_per_tile"],
          geometry["head_dim"]]
    assert inputs["image_input_shape"] == kv and set(inputs["pixel_values_shape"]) == {
        "pixel_values", "aspect_ratio_ids", "aspect_ratio_mask"}
    # the decode step's state: the image K/V (float32) + its last mask row and image mask (int64)
    assert results["ceiling"]["fixed_state_bytes"] == 4 * int(np.prod(kv)) + 8 * (scheme["tiles"] + 1)
    assert "cross_kv" in (tmp_path / "bench" / "bench.md").read_text()


MIXED = "vision=fp16,projector=int8,cross_kv=fp16,decoder=w4"


@pytest.fixture(scope="module")
def mixed_build(mllama, tmp_path_factory):
    """One reduced-precision build of the tiny model, every variant kind in it: fp16 image stages
    (fp32 islands), an int8 projector (calibrated through the mllama image path, in a fresh cache
    folder), a w4 decoder (MatMulNBits, from the fused graph)."""
    import os

    from vlm_export.precision.spec import parse_precision

    model, _ = mllama
    root = tmp_path_factory.mktemp("mllama-mixed")
    previous = os.environ.get("VLM_EXPORT_CACHE")
    os.environ["VLM_EXPORT_CACHE"] = str(root / "cache")
    try:
        return build(model, root / "build", BuildOptions(max_sequence=256, precision=parse_precision(MIXED),
                                                         parity_new_tokens=8))
    finally:
        if previous is None:
            del os.environ["VLM_EXPORT_CACHE"]
        else:
            os.environ["VLM_EXPORT_CACHE"] = previous


def test_mixed_precision_build_passes_its_gates(mixed_build):
    """fp16 / int8 / w4 stages pass their cosine gates per stage (vision, projector, cross K/V,
    prefill and decode logits, on one image, two images and text only), every figure finite."""
    manifest = mixed_build.manifest
    assert mixed_build.failures == []
    assert manifest["precision"] == {"vision_encoder": "fp16", "projector": "int8", "cross_kv": "fp16",
                                     "lm_decoder": "w4"}
    graphs = manifest["graphs"]
    assert "Softmax" in graphs["vision_encoder"]["variant"]["fp32_islands"]
    assert graphs["cross_kv"]["variant"]["fp32_statistics_nodes"] > 0  # k_norm's statistics kept fp32
    projector = graphs["projector"]["variant"]
    assert projector["format"] == "QDQ" and projector["calibration_samples"] > 0
    decoder = graphs["lm_decoder"]["variant"]
    # every projection and the LM head of the fused form: q/k/v packed for the attention kernel,
    # gate/up apart (export/fuse.py packs only what a kernel reads whole)
    assert (decoder["bits"], decoder["form"], decoder["quantized_matmuls"]) == (4, "matmulnbits", 26)
    ops = {n.op_type for n in onnx.load(str(mixed_build.path / graphs["lm_decoder"]["file"])).graph.node}
    assert "MatMulNBits" in ops
    report = json.loads((mixed_build.path / "report.json").read_text())
    assert report["passed"]
    for stage in ("vision_encoder", "projector", "cross_kv", "prefill", "decode"):
        for name, m in report["stages"][stage].items():
            assert m["passed"] and np.isfinite(m["max_abs"]) and m["cosine"] >= m["min_cosine"], (stage, name, m)
            assert m["allowed_max_abs"] is None  # reduced precision is judged by cosine
    from vlm_export.compare.parity import default_samples

    runs = report["end_to_end"]["onnxruntime"]
    assert [r["prompt"] for r in runs] == [s.prompt for s in default_samples(2)]  # one, two and no images
    assert all(r["candidate"] for r in runs)


def test_mixed_precision_padded_and_text_only_rows_stay_finite(mixed_build, photos):
    """The w4 decoder on a prefill of rows with two images, none and one (padding images masked, a
    text-only row skipping the cross layers): finite logits, and each row's next token as alone."""
    pipe = open_build(mixed_build.path)
    scheme = pipe.scheme
    images = [[photos["astronaut"], photos["tall"]], [], [photos["wide"]]]
    prompts = [TWO_QUESTION, TEXT_QUESTION, QUESTION]
    inputs = [pipe.encode_images(pipe.pixel_values(i)) if i else scheme.empty_image_input() for i in images]
    rows = [pipe.prompt_ids(p, len(i)) for p, i in zip(prompts, images)]
    logits = scheme.next_logits(pipe.decode(scheme.prefill_feeds(rows, scheme.batch_image_inputs(inputs))))
    assert np.isfinite(logits).all()
    alone = [int(np.argmax(pipe.prefill(r, x)[0])) for r, x in zip(rows, inputs)]
    assert [int(t) for t in np.argmax(logits, axis=-1)] == alone


@pytest.fixture(scope="module")
def fp16_build(mllama, tmp_path_factory):
    """The tiny model with its decoder in fp16 (the image path fp32): the export is the shared build's
    (conftest's export cache), only the conversion and the parity run here."""
    from vlm_export.precision.spec import parse_precision

    model, _ = mllama
    return build(model, tmp_path_factory.mktemp("mllama-fp16") / "build",
                 BuildOptions(max_sequence=256, precision=parse_precision("decoder=fp16"), parity_new_tokens=8))


def test_fp16_decoder_passes_its_gates(fp16_build):
    """An fp16 decoder passes its cosine gates (prefill and decode logits, one/two/no images) with the
    islands the precision pass records: the RMSNorm statistics, Softmax, and the ReduceMax of the
    cross-attention row mask kept fp32."""
    assert fp16_build.failures == []
    decoder = fp16_build.manifest["graphs"]["lm_decoder"]
    assert decoder["precision"] == "fp16"
    islands = decoder["variant"]["fp32_islands"]
    assert {"Softmax", "ReduceMean", "Pow", "Sqrt", "ReduceMax"} <= set(islands)
    assert decoder["variant"]["fp32_statistics_nodes"] > 0
    report = json.loads((fp16_build.path / "report.json").read_text())
    for stage in ("prefill", "decode"):
        for name, m in report["stages"][stage].items():
            assert m["passed"] and m["cosine"] >= m["min_cosine"], (stage, name, m)
    assert all(r["first_divergence"] is None for r in report["end_to_end"]["onnxruntime"])


def test_fp16_cross_attention_mask_stays_finite(fp16_build, photos):
    """The additive cross-attention mask (float32 lowest in the export) is an fp16-representable
    constant in the fp16 graph (clamped to -65504, never -inf), and on a prefill of rows with two
    images, none (every key a padding image) and one, no attention Softmax (fp32 islands) holds a NaN
    or an inf, the logits are finite and each row's next token is the one it gets alone."""
    from onnx import numpy_helper

    import onnxruntime as ort

    graph = onnx.load(str(fp16_build.path / fp16_build.manifest["graphs"]["lm_decoder"]["file"]))
    constants = [numpy_helper.to_array(i) for i in graph.graph.initializer] + [
        numpy_helper.to_array(a.t) for n in graph.graph.node if n.op_type == "Constant" for a in n.attribute
        if a.name == "value"]
    halves = [c for c in constants if c.dtype == np.float16 and c.size]
    assert halves and all(np.isfinite(c).all() for c in halves)
    assert min(float(c.min()) for c in halves) == float(np.finfo(np.float16).min)  # the mask, clamped

    pipe = open_build(fp16_build.path)
    scheme = pipe.scheme
    images = [[photos["astronaut"], photos["tall"]], [], [photos["wide"]]]
    inputs = [pipe.encode_images(pipe.pixel_values(i)) if i else scheme.empty_image_input() for i in images]
    rows = [pipe.prompt_ids(p, len(i)) for p, i in zip([TWO_QUESTION, TEXT_QUESTION, QUESTION], images)]
    feeds = scheme.prefill_feeds(rows, scheme.batch_image_inputs(inputs))
    softmax = [n.output[0] for n in graph.graph.node if n.op_type == "Softmax"]
    graph.graph.output.extend(onnx.helper.make_value_info(name, onnx.TypeProto()) for name in softmax)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    *probabilities, logits = session.run([*softmax, "logits"], feeds)
    scheme_entry = fp16_build.manifest["scheme"]  # one Softmax per self- and per cross-attention layer
    assert len(probabilities) == scheme_entry["geometry"]["num_layers"] + scheme_entry["cross_layers"]
    assert all(np.isfinite(p).all() for p in probabilities)
    assert np.isfinite(logits).all()
    alone = [int(np.argmax(pipe.prefill(r, x)[0])) for r, x in zip(rows, inputs)]
    assert [int(t) for t in np.argmax(logits[:, -1], axis=-1)] == alone
