"""Florence-2 (``Florence2ForConditionalGeneration``: DaViT + BART): the florence2 adapter on the
``encoder_decoder`` scheme, on the tiny random model of conftest's TINY_MODELS.

What is proved: the tiny model is run as Florence-2's model card runs it (processor task prompts,
the real checkpoints' decoder start and forced tokens); each PyTorch stage module equals Hugging
Face's own computation (image features, encoder states, the cross K/V HF caches, decoder logits at
the prefill and at a step, a right-padded batch); the ONNX Runtime build's greedy tokens equal HF
``generate`` for task prompts the processor expands; rows decoded together (different prompt
lengths, a row joining later) equal rows alone; the encoder runs once per prefill, never in a
decode step; ``vlm-export build`` builds it. Per-stage ONNX parity of the shared build is
test_export_core's (every TINY_MODELS entry).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from vlm_export.runtime.generate import GenerationConfig, GenerationRequest, generate, generate_batch
from vlm_export.runtime.load import open_build

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")

TOKENS = 32


@pytest.fixture(scope="module")
def photos():
    from PIL import Image
    from skimage import data

    return {"astronaut": Image.fromarray(data.astronaut()).convert("RGB"),
            "chelsea": Image.fromarray(data.chelsea()).convert("RGB"),
            "coffee": Image.fromarray(data.coffee()).convert("RGB")}


def _load(path):
    """(folder, HF model, processor): loaded as the model card does, fp32, eager attention."""
    from transformers import AutoProcessor, Florence2ForConditionalGeneration

    model = Florence2ForConditionalGeneration.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    return path, model, AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def florence(tiny_model_dir):
    return _load(tiny_model_dir("florence2"))


@pytest.fixture(scope="module")
def florence_variant(tmp_path_factory):
    """A layout the shared model does not have: a 4-stage DaViT, non-square 96x128 images (13 image
    tokens), one encoder and three decoder layers, 3 decoder heads, scaled embeddings."""
    from tiny_models import make_tiny_florence2

    path = make_tiny_florence2(tmp_path_factory.mktemp("florence2-variant"), seed=1, image_size=(96, 128),
                               vision_stages=4, encoder_layers=1, decoder_layers=3, decoder_heads=3, hidden=48,
                               scale_embedding=True)
    return _load(path)


def _hf_generate(model, processor, task: str, image, tokens: int = TOKENS) -> list[int]:
    """HF generate as the model card runs it (processor(text=task, images=image) -> generate), greedy
    (one beam; the config's n-gram ban applies, as in the build); the decoder's start and forced BOS
    dropped (ours are its prompt), as many new tokens as ours, and the first EOS and after dropped
    (our loop does not emit it)."""
    inputs = processor(text=task, images=image, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                             max_new_tokens=tokens + 1, do_sample=False, num_beams=1,
                             forced_eos_token_id=None)
    new = out[0, 2:].tolist()
    return new[:new.index(2)] if 2 in new else new


def test_tiny_model_runs_as_the_model_card_shows(florence, photos):
    _, model, processor = florence
    g = model.generation_config
    assert (g.decoder_start_token_id, g.forced_bos_token_id, g.forced_eos_token_id) == (2, 0, 2)
    inputs = processor(text="<CAPTION>", images=photos["astronaut"], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    n = processor.num_image_tokens
    assert ids[:n] == [model.config.image_token_id] * n and ids[n] == 0 and ids[-1] == 2
    assert processor.tokenizer.decode(ids[n + 1:-1]) == "What does the image describe?"
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6)  # the generation config's own beam search
    assert out[0, :2].tolist() == [2, 0]  # decoder start, forced BOS
    answers = {tuple(_hf_generate(model, processor, task, photos[name], 8))
               for task in ("<CAPTION>", "<OD>") for name in ("astronaut", "chelsea")}
    assert len(answers) >= 3  # the tiny model's answer depends on the image and the task


@pytest.mark.parametrize("which", ["florence", "florence_variant"])
def test_stage_modules_equal_hugging_face(request, which, photos):
    """Each split module against HF's own forward: the image path against get_image_features, the
    encoder against the encoder states and the cross K/V HF caches, the decoder at the prefill (its
    start + forced tokens) and at a step against HF's logits; a right-padded batch of two prompts of
    different lengths against each alone. On the shared model and on a layout of other sizes."""
    from vlm_export.adapters import adapter_for

    path, _, processor = request.getfixturevalue(which)
    adapter = adapter_for(path)
    loaded = adapter.load(path)
    stages = {s.name: s.module for s in adapter.stages(loaded)}
    scheme = adapter.scheme(loaded)
    assert scheme.decoder_prompt_ids == [2, 0]
    hf = loaded.model
    inputs = processor(text=["<CAPTION>", "<OD>"], images=[photos["astronaut"], photos["chelsea"]],
                       return_tensors="pt", padding=True)
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    assert mask[0].sum() < mask[1].sum() and mask[0, -1] == 0  # padded on the right, as the encoder takes it
    g = scheme.geometry
    with torch.no_grad():
        embeds = stages["projector"](stages["vision_encoder"](pixels))
        torch.testing.assert_close(embeds, hf.get_image_features(pixels).pooler_output, rtol=0, atol=1e-6)
        states, cross = stages["lm_encoder"](ids, mask, embeds.reshape(-1, g.hidden_size))
        for row in range(2):
            n = int(mask[row].sum())
            decoder_ids = torch.tensor([[2, 0, 500 + row]])
            out = hf(input_ids=ids[row:row + 1, :n], pixel_values=pixels[row:row + 1], decoder_input_ids=decoder_ids,
                     use_cache=True)
            torch.testing.assert_close(states[row, :n], out.encoder_last_hidden_state[0], rtol=0, atol=1e-5)
            hf_cross = out.cache.cross_attention_cache
            for layer in range(g.num_layers):
                torch.testing.assert_close(cross[row, 2 * layer, :, :n], hf_cross.layers[layer].keys[0], rtol=0, atol=1e-5)
                torch.testing.assert_close(cross[row, 2 * layer + 1, :, :n], hf_cross.layers[layer].values[0],
                                           rtol=0, atol=1e-5)
            # the decoder: the prefill of its prompt on an empty cache, then one step on that cache
            enc_mask, kv = mask[row:row + 1], cross[row:row + 1]
            empty = [torch.zeros(1, g.num_kv_heads, 0, g.head_dim)] * (2 * g.num_layers)
            logits, *present = stages["lm_decoder"](decoder_ids[:, :2], torch.ones(1, 2, dtype=torch.int64),
                                                    torch.tensor([[0, 1]]), enc_mask, kv, *empty)
            torch.testing.assert_close(logits[0, 0], out.logits[0, 1], rtol=0, atol=1e-5)
            logits, *_ = stages["lm_decoder"](decoder_ids[:, 2:], torch.ones(1, 3, dtype=torch.int64),
                                              torch.tensor([[2]]), enc_mask, kv, *present)
            torch.testing.assert_close(logits[0, 0], out.logits[0, 2], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def pipe(tiny_build):
    return open_build(tiny_build("florence2").path)


@pytest.mark.parametrize("task", ["<CAPTION>", "<OD>", "<CAPTION_TO_PHRASE_GROUNDING>an astronaut with a flag"])
def test_task_prompt_tokens_equal_hf_generate(pipe, florence, photos, task):
    """32 greedy tokens of the ONNX Runtime build for a task prompt the processor expands, against HF
    generate run as the model card shows."""
    _, model, processor = florence
    result = generate(pipe, task, [photos["astronaut"]], GenerationConfig(max_new_tokens=TOKENS))
    expected = _hf_generate(model, processor, task, photos["astronaut"])
    assert len(expected) > 8
    assert result.token_ids == expected
    assert result.prompt_tokens == len(processor(text=task, images=photos["astronaut"])["input_ids"][0])


def _requests(photos, names=("astronaut", "chelsea", None)):
    """Three prompts of different lengths: a task prompt, a long question, a text-only question."""
    config = GenerationConfig(max_new_tokens=12)
    prompts = ("<CAPTION>", "Describe the objects on the left side of this picture in detail.",
               "What is the capital of France?")
    return [GenerationRequest(p, (photos[n],) if n else (), config) for p, n in zip(prompts, names)]


def test_batched_rows_equal_one_at_a_time(pipe, photos):
    """Prompts of different lengths (the encoder batch right-padded, the cross K/V padded when rows
    join) decoded together on the in-place KV buffer equal each decoded alone; with two slots for three requests the third
    joins a running batch, its decoder cache left-padded."""
    # on the in-place KV buffer: the decoder's self K/V written there, each row's cross K/V and encoder
    # mask kept per slot (the unfused cross-attentions read no past)
    assert pipe.kv_in_place
    requests = _requests(photos)
    alone = [generate(pipe, r.prompt, r.images, r.config).token_ids for r in requests]
    assert len({tuple(a) for a in alone}) == 3
    for max_batch in (3, 2):
        together = [r.token_ids for r in generate_batch(pipe, requests, max_batch=max_batch)]
        assert together == alone, max_batch


def test_encoder_runs_once_per_prefill(pipe, photos):
    """Decode steps read the cross K/V from the state: the encoder runs once per prefill (counted on
    its runner), never while the decoder takes one token per row."""
    from vlm_export.runtime.pipeline import VLMPipeline
    from vlm_export.runtime.runners import Runner

    calls = {"encoder": 0, "prefill": 0, "step": 0}

    class Counting(Runner):
        backend = "counting"

        def __init__(self, inner, count):
            super().__init__(inner.name, inner.input_names, inner.output_names)
            self.inner, self.count = inner, count

        def _run(self, feeds):
            self.count(feeds)
            return self.inner.infer(feeds)

    def on_encoder(feeds):
        calls["encoder"] += 1

    def on_decoder(feeds):
        calls["prefill" if feeds["input_ids"].shape[1] > 1 else "step"] += 1

    runners = dict(pipe.runners)
    runners["lm_encoder"] = Counting(pipe.runners["lm_encoder"], on_encoder)
    runners["lm_decoder"] = Counting(pipe.runners["lm_decoder"], on_decoder)
    counted = VLMPipeline(runners, pipe.stages, pipe.scheme, pipe.tokenizer, pipe.image_processor, pipe.layout,
                          pipe.limits, pipe.eos_token_ids)
    requests = _requests(photos, ("coffee", "astronaut", None))
    results = generate_batch(counted, requests, max_batch=2)
    assert all(len(r.token_ids) > 1 for r in results)
    assert calls["step"] >= 11  # the decode steps ran ...
    assert calls["encoder"] == calls["prefill"] >= 2  # ... and the encoder once per prefill (3 rows, 2 slots)


def test_vlm_export_build_cli(tiny_model_dir, tmp_path, capsys):
    """``vlm-export build`` on a Florence-2 folder: the adapter from config.json, the encoder-decoder
    scheme with the decoder prompt from the generation config, parity passed. Its generation config
    makes EOS the top token and asks for 3 new tokens first: HF's generate counts the forced BOS as one of
    them, so the answers are 2 tokens long, and so are vlm-export's (they were 3, failing parity)."""
    from vlm_export.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("florence2"), model)
    config = json.loads((model / "generation_config.json").read_text())
    eos = config["eos_token_id"]
    config.update(min_new_tokens=3, sequence_bias=[[[eos], 100.0]])
    (model / "generation_config.json").write_text(json.dumps(config))
    out = tmp_path / "build"
    code = main(["build", str(model), "--out", str(out), "--max-sequence", "128", "--parity-tokens", "8"])
    assert code == 0, capsys.readouterr()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generation"]["min_new_tokens"] == 2  # in answer tokens: the forced BOS is not one
    runs = json.loads((out / "report.json").read_text())["end_to_end"]["torch_split"]
    assert runs and all([t for t in run["candidate"] if t != eos] == run["candidate"][:2] for run in runs)
    assert manifest["source"]["adapter"] == "florence2"
    scheme = manifest["scheme"]
    assert (scheme["name"], scheme["decoder_prompt_ids"], scheme["pad_id"]) == ("encoder_decoder", [2, 0], 1)
    assert [s["name"] for s in manifest["stages"]] == ["vision_encoder", "projector", "lm_encoder", "lm_decoder"]
    assert manifest["limits"]["max_images"] == 1 and manifest["limits"]["tokens_per_image"] == 17
    assert json.loads((out / "report.json").read_text())["passed"]


def test_fp16_variant(tiny_model_dir, tmp_path):
    """Every stage in fp16 (BART's LayerNorms, Softmax and GELU's Erf kept in fp32, recorded in the
    manifest) passes the fp16 tolerances per stage, and its greedy tokens equal HF generate's."""
    from vlm_export.build import BuildOptions, build
    from vlm_export.precision.spec import parse_precision

    result = build(tiny_model_dir("florence2"), tmp_path / "fp16", BuildOptions(
        max_sequence=256, parity_new_tokens=16, precision=parse_precision("fp16")))
    assert result.failures == []
    graphs = result.manifest["graphs"]
    for stage in ("lm_encoder", "lm_decoder"):
        assert graphs[stage]["precision"] == "fp16"
        assert {"LayerNormalization", "Softmax", "Erf"} <= set(graphs[stage]["variant"]["fp32_islands"]), stage
    report = json.loads((result.path / "report.json").read_text())
    assert all(run["identical"] for run in report["end_to_end"]["onnxruntime"])


def test_served_answers_and_caption_eval(tiny_build, photos, tmp_path, capsys):
    """The python repository served by tritonserver (the vlm model calls lm_encoder once per prefill):
    task-prompt answers equal the in-process ones. Then ``vlm-export eval`` on a captioning folder with
    no prompt anywhere uses the build's declared ``<CAPTION>``; PyTorch and ONNX Runtime caption alike."""
    from vlm_export.cli import main
    from vlm_export.client.client import VLMClient
    from vlm_export.datasets import CaptionItem, write_caption_folder
    from vlm_export.model_repository.render import render_repository
    from vlm_export.serve.server import TritonServer

    result = tiny_build("florence2")
    assert result.manifest["generation"]["caption_prompt"] == "<CAPTION>"
    pipe = open_build(result.path)
    image = tmp_path / "astronaut.png"
    photos["astronaut"].save(image)
    asks = [("<CAPTION>", [image]), ("<OD>", [image]), ("What is the capital of France?", [])]
    expected = [generate(pipe, q, list(imgs), GenerationConfig(max_new_tokens=12)).text for q, imgs in asks]
    repo = render_repository(result.path, tmp_path / "repo")
    with TritonServer(repo, log_file=tmp_path / "triton.log") as server:
        client = VLMClient(f"grpc://{server.grpc_url}")
        assert [client.generate(q, imgs, max_tokens=12).text for q, imgs in asks] == expected

    build = tmp_path / "build"  # a copy: eval writes its report into the build folder
    shutil.copytree(result.path, build)
    for name in ("chelsea", "astronaut"):
        photos[name].save(tmp_path / f"{name}.png")
    folder = write_caption_folder(tmp_path / "caps", [CaptionItem(tmp_path / "chelsea.png", ("a cat on a sofa",)),
                                                      CaptionItem(tmp_path / "astronaut.png", ("an astronaut",))],
                                  "two photos with hand-written captions")
    assert main(["eval", str(build), "--dataset", str(folder), "--max-new-tokens", "8"]) == 0
    section = json.loads((build / "report.json").read_text())["captions"]
    torch_side, ort_side = section["results"]
    assert torch_side["captions"] == ort_side["captions"] and all(torch_side["captions"])


def test_decoder_never_recomputes_cross_kv(tiny_model_dir, tiny_build):
    """Every decoder layer's cross-attention k/v weights are in the encoder graph and not the decoder's
    (found by value), the query side stays in the decoder."""
    from conftest import holds_weight, stage_weights
    from transformers import Florence2ForConditionalGeneration

    result = tiny_build("florence2")
    model = Florence2ForConditionalGeneration.from_pretrained(tiny_model_dir("florence2"), dtype=torch.float32)

    decoder, encoder = stage_weights(result, "lm_decoder"), stage_weights(result, "lm_encoder")
    layers = [m for n, m in model.named_modules() if n.endswith("encoder_attn")]
    assert len(layers) == model.config.text_config.decoder_layers
    for attn in layers:
        for module in (attn.k_proj, attn.v_proj):
            weight = module.weight.detach().numpy()
            assert holds_weight(encoder, weight) and not holds_weight(decoder, weight)
        assert holds_weight(decoder, attn.q_proj.weight.detach().numpy())
