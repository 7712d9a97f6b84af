"""LightOnOCR (the ``lighton_ocr`` adapter): Mistral 3's image path (a row of patches per image, Pixtral's tower, the
patch merger) under LightOnOCR's module names, on the tower's last hidden state, a Qwen3 LM, and
``LightOnOcrProcessor``'s prompt (one image token per merge block, no row-break or end token). The build itself
(parity of every stage, HF generate's tokens alone and batched on the default samples) is test_export_core's."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import (TWO_IMAGE_TURNS, check_answers_equal_hf_generate, check_padded_image_rows_equal_hf,
                      check_prompt_ids_are_the_loaded_processors, check_text_model_is_a_causal_lm, photos,
                      requests_of_every_size)
from vlm_export.errors import AdapterError

#: (height, width): larger than the longest edge both ways (resized down), thin strips, square, uneven
SIZES = [(300, 200), (20, 50), (70, 20), (64, 64), (41, 33)]


@pytest.mark.parametrize("turns, count", [(TWO_IMAGE_TURNS, 2), ("Read this.", 0)])
def test_prompt_ids_and_pixels_are_the_processors(tiny_build, tiny_model_dir, turns, count):
    """Prompt ids = LightOnOcrProcessor's own (it loads without torchvision) on the chat template's text, for two
    images and none; the image path's rows of patches hold each image's pixels as its image processor gives them,
    every patch once, and nothing else."""
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("lighton_ocr").path)
    images = photos(SIZES, count, 1)
    processor, theirs = check_prompt_ids_are_the_loaded_processors(tiny_model_dir("lighton_ocr"), pipe, turns, images)
    if not images:
        return
    pixels = pipe.pixel_values(images)
    real = pixels["patch_mask"].astype(bool)
    patch = processor.patch_size
    for k, (h, w) in enumerate(np.asarray(theirs["image_sizes"])):
        image = np.zeros((3, h, w), np.float32)
        for (r, c), cell in zip(pixels["patch_positions"][k][real[k]], pixels["pixel_values"][k][real[k]]):
            image[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = cell.reshape(3, patch, patch)
        assert real[k].sum() == (h // patch) * (w // patch)
        np.testing.assert_array_equal(image, theirs["pixel_values"][k][:, :h, :w])
    assert not pixels["pixel_values"][~real].any()


def test_image_rows_equal_hf(tiny_model_dir):
    """The split tower and projector on a padded batch of images of every size, the rows of padding dropped by the
    scheme, give Hugging Face's ``get_image_features`` (the tower's last hidden state through its projector)."""
    from vlm_export.adapters import adapter_for

    folder = tiny_model_dir("lighton_ocr")
    check_padded_image_rows_equal_hf(adapter_for(folder).load(folder), photos(SIZES, len(SIZES)))


def test_answers_for_every_size_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir):
    """Images of every size, alone and two at once, and none: greedy answers = Hugging Face generate's on the
    processor's padded images and sizes, alone and decoded together in one batch on one KV buffer in place."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("lighton_ocr").path)
    assert pipe.kv_in_place
    folder = tiny_model_dir("lighton_ocr")
    loaded = adapter_for(folder).load(folder)
    check_answers_equal_hf_generate(pipe, loaded, requests_of_every_size(SIZES))


def test_text_model_is_an_ordinary_causal_lm(tiny_model_dir, tmp_path):
    """The LM written for peers (llama.cpp, onnxruntime-genai) is a plain Qwen3 causal LM with the VLM's logits."""
    check_text_model_is_a_causal_lm(tiny_model_dir("lighton_ocr"), tmp_path / "lm", "qwen3")


def test_an_image_processor_of_another_block_is_refused(tiny_model_dir, tmp_path):
    """LightOnOcrProcessor passes its image processor no patch size: one that resizes to other than a merge block of
    patches would make images whose tokens and rows disagree, so it is refused at load, in one line."""
    import shutil

    from vlm_export.adapters import adapter_for

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("lighton_ocr"), folder)
    settings = json.loads((folder / "processor_config.json").read_text())
    settings["image_processor"]["patch_size"] = {"height": 4, "width": 4}
    (folder / "processor_config.json").write_text(json.dumps(settings))
    with pytest.raises(AdapterError, match="blocks of 4 pixels but one image token is 8") as refused:
        adapter_for(folder).load(folder)
    assert "\n" not in str(refused.value)
