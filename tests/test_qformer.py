"""Q-Former fusion (BLIP-2, InstructBLIP): what the generic export tests do not already cover -
the prompt-reading image path, the processor check, precision per stage for the new stage, the
TensorRT profiles and the Triton repository for it, the served model, and a merged LoRA."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import assert_one_line_error  # noqa: E402
from test_engine import Collector
from vlm_export.build import BuildOptions, build
from vlm_export.contract import stages_from_manifest
from vlm_export.contract.profiles import stage_profiles
from vlm_export.errors import AdapterError, InputError
from vlm_export.manifest import read_manifest
from vlm_export.model_repository.render import (RepositoryOptions, check_against_graphs, model_configs,
                                                render_repository)
from vlm_export.precision.spec import parse_precision
from vlm_export.runtime.engine import GenerationEngine
from vlm_export.runtime.generate import GenerationConfig, generate
from vlm_export.runtime.image_cache import ImageEmbeddingCache
from vlm_export.runtime.load import open_build

IBLIP = "instructblip-llama"
QUESTIONS = ["What is in the picture?", "Describe the colors of this image."]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("chelsea", "coffee"):
        paths.append(folder / f"{name}.png")
        Image.fromarray(getattr(data, name)()).resize((64, 48)).save(paths[-1])
    return paths


def test_adapters_are_listed(run_cli):
    proc = run_cli("adapters")
    assert proc.returncode == 0
    assert "blip2" in proc.stdout and "instructblip" in proc.stdout


def test_stages_and_image_text_declared(tiny_build):
    manifest = read_manifest(tiny_build(IBLIP).path)
    assert [s["name"] for s in manifest["stages"]] == ["vision_encoder", "qformer", "lm_decoder"]
    qformer = next(s for s in stages_from_manifest(manifest) if s.name == "qformer")
    roles = {t.name: t.role for t in qformer.inputs}
    assert roles == {"image_features": "upstream", "qformer_input_ids": "prompt", "qformer_attention_mask": "prompt"}
    assert not qformer.follows_default
    assert manifest["image_text"]["ids"] == "qformer_input_ids"
    assert (tiny_build(IBLIP).path / manifest["image_text"]["tokenizer"] / "tokenizer_config.json").exists()
    # one image per prompt: BLIP-2's processor puts one set of query tokens in front of the text
    assert manifest["limits"]["max_images"] == 1
    assert manifest["prompt_layout"]["kind"] == "prefix" and manifest["prompt_layout"]["add_special_tokens"]
    # BLIP-2 reads no prompt in its image path
    assert read_manifest(tiny_build("blip2-opt").path)["image_text"] is None


def test_blanket_precision_keeps_the_qformer_fp32(tiny_build):
    specs = stages_from_manifest(read_manifest(tiny_build(IBLIP).path))
    assert parse_precision("fp16").resolve(specs) == {"vision_encoder": "fp16", "qformer": "fp32", "lm_decoder": "fp16"}
    assert parse_precision("vision=fp16,qformer=int8,decoder=w4").resolve(specs) == \
        {"vision_encoder": "fp16", "qformer": "int8", "lm_decoder": "w4"}


def test_image_path_depends_on_the_prompt(tiny_build, photos):
    pipe = open_build(tiny_build(IBLIP).path)
    pixels = pipe.pixel_values(photos[:1])
    a = pipe.encode_images(pixels, prompt=QUESTIONS[0])
    b = pipe.encode_images(pixels, prompt=QUESTIONS[1])
    assert a.shape == b.shape and np.abs(a - b).max() > 1e-4
    with pytest.raises(ValueError, match="read the prompt"):
        pipe.encode_images(pixels)
    # the Q-Former's text positions bound the prompt: a clear error, before any image work
    with pytest.raises(InputError, match="image path's text reader"):
        generate(pipe, "tell me " * 40, photos[:1], GenerationConfig(max_new_tokens=2))


def test_an_image_alone_is_captioned_as_hugging_face_captions_it(tiny_build, tiny_model_dir, photos):
    """BLIP-2's documented captioning: the processor with an image and no text, then generate. An empty
    prompt with an image gives the processor's prompt ids and HF generate's tokens; without an image it
    is refused in one line."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    pipe = open_build(tiny_build("blip2-opt").path)
    result = generate(pipe, "", photos[:1], GenerationConfig(max_new_tokens=8))
    assert result.token_ids
    model_dir = tiny_model_dir("blip2-opt")
    inputs = AutoProcessor.from_pretrained(model_dir)(images=Image.open(photos[0]).convert("RGB"), text="",
                                                      return_tensors="pt")
    assert result.prompt_tokens == inputs["input_ids"].shape[1]
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=pipe.eos_token_ids,
                             pad_token_id=pipe.eos_token_ids[0])
    assert result.token_ids == out[0, inputs["input_ids"].shape[1]:].tolist()[:len(result.token_ids)]
    with pytest.raises(InputError, match="the prompt is empty"):
        generate(pipe, " ", [], GenerationConfig(max_new_tokens=2))


def test_stop_ids_are_the_language_models_as_in_hugging_face_generate(tiny_model_dir, tmp_path):
    """BLIP-2's generate ends in language_model.generate: a top-level generation config with another EOS
    (a checkpoint's generation_config.json may carry one) is not what it stops at, so not ours either."""
    from vlm_export.adapters import get_adapter
    from vlm_export.adapters.reference import eos_token_ids

    model = tmp_path / "blip2"
    shutil.copytree(tiny_model_dir("blip2-opt"), model)
    gen = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 7}))
    loaded = get_adapter("blip2").load(model)
    assert loaded.model.generation_config.eos_token_id == 7  # the top-level config was read
    lm_eos = loaded.model.language_model.generation_config.eos_token_id
    assert lm_eos != 7
    assert eos_token_ids(loaded) == list(dict.fromkeys([lm_eos, loaded.tokenizer.eos_token_id]))
    # likewise settings only the top-level config sets: said to be read by nobody, unlike an eos id (not one)
    from vlm_export.adapters.reference import unread_generation_settings

    loaded.model.generation_config.bad_words_ids = [[5, 6]]
    loaded.model.generation_config.repetition_penalty = 1.3
    loaded.model.generation_config.num_beams = 2
    assert unread_generation_settings(loaded) == ["repetition_penalty=1.3", "bad_words_ids=[[5, 6]]", "num_beams=2"]
    assert unread_generation_settings(get_adapter("blip2").load(tiny_model_dir("blip2-opt"))) == []


def test_image_cache_is_keyed_by_prompt_too(tiny_build, photos):
    pipe = open_build(tiny_build(IBLIP).path)
    config = GenerationConfig(max_new_tokens=6)
    expected = [generate(pipe, q, photos[:1], config).text for q in QUESTIONS]
    cache = ImageEmbeddingCache(1 << 20)
    engine = GenerationEngine(pipe, image_cache=cache)
    try:
        def ask(question):
            collect = Collector()
            engine.submit(question, photos[:1], config, collect)
            return collect.final

        got = [ask(q).text for q in QUESTIONS]
        assert (cache.misses, cache.hits) == (2, 0)  # the same image asked two things is encoded twice
        assert ask(QUESTIONS[0]).text == expected[0]
        assert (cache.misses, cache.hits) == (2, 1)
    finally:
        engine.close(drain_s=1)
    assert got == expected


def test_profiles_bound_the_prompt_tokens(tiny_build):
    manifest = read_manifest(tiny_build(IBLIP).path)
    [profile] = stage_profiles(manifest, "qformer")
    lo, _, hi = profile["qformer_input_ids"]
    assert lo == (1, 1) and hi == (manifest["limits"]["max_images_per_batch"], manifest["image_text"]["max_length"])


@pytest.mark.parametrize("target", ["python", "onnxruntime", "tensorrt"])
def test_repository_configs_fit_the_graphs(tiny_build, target):
    path = tiny_build(IBLIP).path
    manifest = read_manifest(path)
    configs = model_configs(manifest, RepositoryOptions(target=target))
    check_against_graphs(configs, path, manifest)
    ensemble = configs["image_encoder"]
    assert [t["name"] for t in ensemble["input"]] == ["images", "qformer_input_ids", "qformer_attention_mask"]
    assert [s["model_name"] for s in ensemble["ensemble_scheduling"]["step"]] == ["preprocess", "vision_encoder", "qformer"]


def test_instructblip_without_its_qformer_tokenizer_is_refused(tiny_model_dir, tmp_path, run_cli):
    """A folder that lost qformer_tokenizer/: transformers falls back to the LM's tokenizer, whose ids
    the Q-Former has no embedding for (HF's forward fails with an index error). One line at load."""
    src = tmp_path / "model"
    shutil.copytree(tiny_model_dir("instructblip-llama"), src)
    shutil.rmtree(src / "qformer_tokenizer")
    assert_one_line_error(run_cli("build", str(src), "--out", str(tmp_path / "out")),
                          "the Q-Former tokenizer in", "the folder has no qformer_tokenizer/")
    assert not (tmp_path / "out").exists()


def test_processor_that_does_not_expand_image_tokens_is_refused(tiny_model_dir, tmp_path, run_cli):
    """A processor that expands another number of image tokens, a config whose image token is not the
    processor's, and a processor that fails on its own checkpoint (Hugging Face cannot run it either)
    are each refused in one line, nothing written."""
    src = tmp_path / "model"
    shutil.copytree(tiny_model_dir("blip2-opt"), src)
    proc_cfg = json.loads((src / "processor_config.json").read_text())
    proc_cfg["num_query_tokens"] = 3
    (src / "processor_config.json").write_text(json.dumps(proc_cfg))
    assert_one_line_error(run_cli("build", str(src), "--out", str(tmp_path / "out")),
                          "expands 3 image tokens", "num_query_tokens=4")
    proc_cfg["num_query_tokens"] = 4
    (src / "processor_config.json").write_text(json.dumps(proc_cfg))
    cfg = json.loads((src / "config.json").read_text())
    cfg["image_token_index"] = 5  # not the tokenizer's <image>: images would land on text
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="lays out the prompt differently"):
        build(src, tmp_path / "out2")
    cfg["image_token_index"] = json.loads((tiny_model_dir("blip2-opt") / "config.json").read_text())["image_token_index"]
    (src / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_cfg["extra_special_tokens"] = {"image_token": "<image>"}  # a plain string, which HF's Blip2Processor cannot read
    (src / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    assert_one_line_error(run_cli("build", str(src), "--out", str(tmp_path / "out3")),
                          "Blip2Processor", "fails on a probe image and prompt", "'str' object has no attribute")
    assert not any((tmp_path / name).exists() for name in ("out", "out2", "out3"))


def test_converted_stages_pass_their_gates(tiny_model_dir, tmp_path):
    """fp16 vision, int8 Q-Former calibrated on image+text pairs (its prompt inputs included),
    weight-only decoder: every stage converted and judged by its own tolerance."""
    out = tmp_path / "iblip-mixed"
    result = build(tiny_model_dir(IBLIP), out, BuildOptions(
        max_sequence=128, parity_new_tokens=8,
        precision=parse_precision("vision=fp16,qformer=int8,decoder=w8")))
    assert result.failures == []
    graphs = result.manifest["graphs"]
    assert {s: g["precision"] for s, g in graphs.items()} == \
        {"vision_encoder": "fp16", "qformer": "int8", "lm_decoder": "w8"}
    pipe = open_build(out)
    assert generate(pipe, QUESTIONS[0], [], GenerationConfig(max_new_tokens=3)).completion_tokens == 3


def test_served_answers_equal_in_process(tiny_build, photos, tmp_path):
    from vlm_export.client.client import VLMClient
    from vlm_export.serve.server import TritonServer

    path = tiny_build(IBLIP).path
    pipe = open_build(path)
    config = GenerationConfig(max_new_tokens=8)
    asks = [(q, [p]) for p in photos for q in QUESTIONS] + [("Hello there", [])]
    expected = [generate(pipe, q, imgs, config).text for q, imgs in asks]
    repo = render_repository(path, tmp_path / "repo")
    with TritonServer(repo, log_file=tmp_path / "triton.log") as server:
        client = VLMClient(f"grpc://{server.grpc_url}")
        got = [client.generate(q, imgs, max_tokens=8).text for q, imgs in asks]
        # the Q-Former's prompt limit is a request error; the server keeps serving
        with pytest.raises(Exception, match="text reader"):
            client.generate("tell me " * 40, photos[:1], max_tokens=2)
        assert client.generate(*asks[0], max_tokens=8).text == expected[0]
        # the served image path itself: the ensemble given the image and the prompt's tokens
        # returns the in-process image input, and another prompt changes it
        import tritonclient.grpc as grpcclient

        raw = grpcclient.InferenceServerClient(server.grpc_url)
        for question in QUESTIONS:
            feeds = {"images": np.array([[photos[0].read_bytes()]], dtype=np.object_),
                     **pipe.image_text_feeds(question, 1)}
            inputs = []
            for name, value in feeds.items():
                inputs.append(grpcclient.InferInput(name, list(value.shape), "BYTES" if name == "images" else "INT64"))
                inputs[-1].set_data_from_numpy(value)
            served = raw.infer("image_encoder", inputs).as_numpy("image_embeds")
            local = pipe.encode_images(pipe.pixel_values(photos[:1]), prompt=question)
            assert np.abs(served - local).max() < 1e-5
    assert got == expected


def test_lora_merged_at_build(tiny_model_dir, tiny_build, tmp_path, run_cli):
    """A LoRA on the LM and the Q-Former (PEFT on the full model), merged before the export; the
    build records the merge's proof and its ONNX graphs compute the merged model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import InstructBlipForConditionalGeneration

    src = tiny_model_dir(IBLIP)
    torch.manual_seed(0)
    model = InstructBlipForConditionalGeneration.from_pretrained(src)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                  target_modules=["q_proj", "v_proj", "query", "value"]))
    peft_model.save_pretrained(tmp_path / "lora")
    out = tmp_path / "merged"
    proc = run_cli("build", str(src), "--out", str(out), "--lora", str(tmp_path / "lora"), "--max-sequence", "128",
                   "--parity-tokens", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lora = read_manifest(out)["source"]["lora"]
    assert lora["changed"] and max(lora["max_abs"].values()) < 1e-4
    assert any(k.startswith("lora/") for k in read_manifest(out)["source"]["sha256"])
    assert "Merged LORA adapter" in (out / "report.md").read_text()
    # the merged graphs differ from the base build's
    base, merged = open_build(tiny_build(IBLIP).path), open_build(out)
    feeds = base.scheme.prefill_feeds([base.prompt_ids(QUESTIONS[0], 0)], base.scheme.empty_image_input())
    assert np.abs(base.decode(feeds)["logits"] - merged.decode(feeds)["logits"]).max() > 1e-3
    # a LoRA made on another model is a clear error, and nothing is written
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "Salesforce/instructblip-vicuna-7b"
    (tmp_path / "lora" / "adapter_config.json").write_text(json.dumps(cfg))
    assert_one_line_error(run_cli("build", str(src), "--out", str(tmp_path / "other"), "--lora", str(tmp_path / "lora")),
                          "instructblip-vicuna-7b", "--lora-any-base")
    assert not (tmp_path / "other").exists()
