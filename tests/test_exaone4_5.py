"""EXAONE 4.5 (the ``exaone4_5`` adapter) and LLaVA-OneVision-1.5 (``llava_onevision1_5``): Qwen2-VL's rows of
patches under their own towers - Qwen2.5-VL's windowed one with grouped-query attention; RiceViT with a class token
per image - and LMs that read one stream of positions (the ``spliced_patches`` scheme): EXAONE 4 (a sliding layer
with the rotary, a full one without) and Qwen3. The build itself (parity of every stage, HF generate's tokens alone
and batched on the default samples) is test_export_core's."""
from __future__ import annotations

import pytest

from conftest import (TWO_IMAGE_TURNS, check_answers_equal_hf_generate, check_patch_rows_equal_hf,
                      check_prefix_cache_equal_a_full_prefill, check_prompt_ids_and_patches_are_the_processors,
                      check_served_as_in_process, check_text_model_is_a_causal_lm, photos, requests_of_every_size)

#: (height, width): the largest grid (12 x 12 patches), wide, tall, the smallest (one merge block), odd sizes
SIZES = [(300, 200), (20, 50), (70, 20), (3, 3), (64, 64), (41, 33)]
FAMILIES = ["exaone4_5", "llava_onevision1_5"]


@pytest.mark.parametrize("name", FAMILIES)
def test_prompt_ids_and_patches_are_the_processors(tiny_build, tiny_model_dir, name):
    """Each image written as their processor (Qwen2-VL's) writes it, one image token per merge block; the image path's
    rows hold the image processor's patches (two frames of each for EXAONE 4.5, one for RiceViT), in order, and
    nothing else."""
    from transformers import Exaone4_5_Processor

    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build(name).path)
    _, theirs, text = check_prompt_ids_and_patches_are_the_processors(
        pipe, tiny_model_dir(name), TWO_IMAGE_TURNS, photos(SIZES, 2), Exaone4_5_Processor.replace_image_token,
        "<|image_pad|>")
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2
    assert theirs["pixel_values"].shape[1] == 3 * 4 * 4 * {"exaone4_5": 2, "llava_onevision1_5": 1}[name]


@pytest.mark.parametrize("name", FAMILIES)
def test_image_rows_equal_hf_for_every_size(tiny_model_dir, name):
    """The split towers (windows gathered into slots and K/V heads repeated per group; the class token before each
    image's row) and projectors on a padded batch of images of every size give Hugging Face's
    ``get_image_features``; the largest image is exactly the adapter's most tokens per image."""
    from vlm_export.adapters import adapter_for

    folder = tiny_model_dir(name)
    loaded = adapter_for(folder).load(folder)
    assert loaded.adapter.name == name
    layout = loaded.adapter.prompt_layout(loaded)
    flat, _, _, _ = check_patch_rows_equal_hf(loaded, photos(SIZES, len(SIZES)))
    assert max(layout.image_tiles.tokens(grid) for grid in layout.image_tiles.grids(flat)) == layout.tokens_per_image


@pytest.mark.parametrize("name", FAMILIES)
def test_answers_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir, name):
    """Images of every size (prompts past EXAONE's sliding window), alone and two at once, and text alone: greedy
    answers = Hugging Face generate's, alone and decoded together in one batch on one KV buffer."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build(name).path)
    assert pipe.kv_in_place
    folder = tiny_model_dir(name)
    check_answers_equal_hf_generate(pipe, adapter_for(folder).load(folder), requests_of_every_size(SIZES))


@pytest.mark.parametrize("name", FAMILIES)
def test_scheme_fusion_and_tensorrt_checks(tiny_build, name):
    """One stream of positions (``spliced_patches``, a merge of 2); every attention of the LM in ONNX Runtime's kernel
    (EXAONE's sliding window inside it) and every one of the tower in its own; nothing in any graph is known to
    TensorRT 10's parser as refused."""
    from vlm_export.engines.check import check_build

    build = tiny_build(name)
    scheme = build.manifest["scheme"]
    assert (scheme["name"], scheme["merge"]) == ("spliced_patches", 2)
    graphs = build.manifest["graphs"]
    decoder = graphs["lm_decoder"]["fusion"]
    assert decoder["fusions"]["attention"] == 2, decoder
    windowed = [note for note in decoder["notes"] if "sliding window of 24 tokens in the kernel" in note]
    assert len(windowed) == (name == "exaone4_5"), decoder["notes"]
    tower = graphs["vision_encoder"]["fusion"]
    assert tower["fusions"]["attention"] == {"exaone4_5": 3, "llava_onevision1_5": 2}[name], tower
    assert check_build(build.path).violations == []


def test_prefix_cache_answers_and_logits_equal_a_full_prefill(tiny_build):
    """Positions of one stream follow from a prefix alone, so a prompt continues from a cached prefix (answers, a
    conversation's next turn, logits and K/V at cuts before, inside and after an image's rows)."""
    from vlm_export.runtime.load import open_build

    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    check_prefix_cache_equal_a_full_prefill(open_build(tiny_build("exaone4_5").path), turn,
                                            [photos(SIZES, 1, k) for k in (0, 4, 5)])


def test_served_answers_equal_in_process(tiny_build, tmp_path):
    """Served by a real tritonserver (three requests at once, a conversation's second turn): every answer
    ``generate``'s in process."""
    check_served_as_in_process(tiny_build("llava_onevision1_5").path, tmp_path, [(40, 52), (300, 30), (16, 200)])


@pytest.mark.parametrize("name, model_type", [("exaone4_5", "exaone4"), ("llava_onevision1_5", "qwen3")])
def test_text_model_is_an_ordinary_causal_lm(tiny_model_dir, tmp_path, name, model_type):
    """The LM written for peers (llama.cpp, onnxruntime-genai) is EXAONE 4's / Qwen3's own causal LM: same logits."""
    check_text_model_is_a_causal_lm(tiny_model_dir(name), tmp_path / "lm", model_type)
