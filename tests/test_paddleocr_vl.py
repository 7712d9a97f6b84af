"""PaddleOCR-VL (the ``paddleocr_vl`` adapter): Qwen2-VL's rows of patches and M-RoPE positions (the ``spliced_mrope``
scheme) with its own SigLIP tower (a learned position grid resampled bilinearly at half-pixel centres per image in
the graph), merging projector and ERNIE-4.5-style LM; its image processor gives patches row-major
(``ImagePatches.raster``). The build itself (parity of every stage, HF generate's tokens alone and batched on the
default samples) is test_export_core's."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import (TWO_IMAGE_TURNS, check_answers_equal_hf_generate,
                      check_raster_prompt_and_patches_are_the_loaded_processors,
                      check_rows_positions_and_largest_image, check_text_model_is_a_causal_lm, photos)

#: (height, width): the largest grid (12 x 12 patches), uneven ones, one below the processor's smallest (scaled up),
#: the smallest grid (one merge block) and a square one
SIZES = [(300, 200), (20, 50), (70, 20), (3, 3), (64, 64), (41, 33)]
OCR = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "OCR:"}]}]


@pytest.mark.parametrize("turns, count", [(OCR, 1), (TWO_IMAGE_TURNS, 2), ("Read this.", 0)])
def test_prompt_ids_and_pixels_are_the_processors(tiny_build, tiny_model_dir, turns, count):
    """Prompt ids = PaddleOCRVLProcessor's own on the chat template's text (one image, two, none); the image path's
    rows of patches hold its patches (given row-major, [channels, patch, patch] each), each at its place, and
    nothing else."""
    from vlm_export.runtime.load import open_build

    check_raster_prompt_and_patches_are_the_loaded_processors(tiny_model_dir("paddleocr_vl"),
                                                              open_build(tiny_build("paddleocr_vl").path), turns,
                                                              photos(SIZES, count, 1))


def test_image_rows_and_positions_equal_hf(tiny_model_dir):
    """The split tower (a mask in place of per-image lengths, the position grid resampled per image) and projector
    on a padded batch of images of every size give Hugging Face's ``get_image_features``; the scheme's positions for
    a left-padded prefill of several prompts are ``get_rope_index``'s, and each row's next position its delta's."""
    check_rows_positions_and_largest_image(tiny_model_dir("paddleocr_vl"), photos(SIZES, len(SIZES)),
                                           "vision_start_token_id", "vision_end_token_id")


def test_answers_for_every_size_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir):
    """Images of every size, alone and two at once: greedy answers = Hugging Face generate's (its pixels given back
    row-major), alone and decoded together in one batch on one KV buffer (attention fused)."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("paddleocr_vl").path)
    assert pipe.kv_in_place
    folder = tiny_model_dir("paddleocr_vl")
    loaded = adapter_for(folder).load(folder)
    requests = [(OCR, photos(SIZES, 1, k)) for k in range(len(SIZES))]
    check_answers_equal_hf_generate(pipe, loaded,
                                    requests + [(TWO_IMAGE_TURNS, photos(SIZES, 2, 3)), ("Tell me a story.", [])])


@pytest.mark.parametrize("use_bias", [False, True])
def test_text_model_is_an_ordinary_causal_lm(tiny_model_dir, tmp_path, use_bias):
    """For text alone M-RoPE's three streams are one: the LM written for peers (llama.cpp, onnxruntime-genai) is a
    plain Llama (ERNIE 4.5's one bias switch as Llama's two) with the same logits and the VLM's tied head."""
    from tiny_models import make_tiny_paddleocr_vl

    folder = make_tiny_paddleocr_vl(tmp_path / "biased", use_bias=True) if use_bias else \
        tiny_model_dir("paddleocr_vl")
    check_text_model_is_a_causal_lm(folder, tmp_path / "lm", "llama")


def test_raster_patches_are_arranged_by_merge_blocks():
    """numpy only: ``ImagePatches(raster=True)`` takes each image's patches row-major ([channels, patch, patch] each,
    PaddleOCR-VL's), puts each at its place in the order of merge blocks (a block = ``merge²`` consecutive slots of
    one block of the image), flattened, and keeps them in the manifest form only when set."""
    from vlm_export.contract import ImagePatches, PromptLayout

    patches = ImagePatches(merge=2, max_patches=64, raster=True)
    grids = [(4, 6), (2, 2)]
    # patch (image k, row r, column c) holds k x 1000 + r x 10 + c in every one of its 3 x 2 x 2 values
    flat = np.concatenate([np.repeat((k * 1000 + np.arange(h)[:, None] * 10 + np.arange(w)).reshape(-1, 1, 1, 1),
                                     12, axis=1).reshape(-1, 3, 2, 2) for k, (h, w) in enumerate(grids)])
    out = patches.arranged({"pixel_values": flat.astype(np.float32),
                            "image_grid_thw": [[1, h, w] for h, w in grids]})
    assert out["pixel_values"].shape == (2, 24, 12)
    for k, (h, w) in enumerate(grids):
        places = out["patch_positions"][k, :h * w]
        np.testing.assert_array_equal(out["pixel_values"][k, :h * w, 0], k * 1000 + places[:, 0] * 10 + places[:, 1])
        blocks = (places // 2).reshape(-1, 4, 2)  # every 4 consecutive slots: one merge block
        assert (blocks == blocks[:, :1]).all()
    layout = PromptLayout(kind="inline", image_token_id=5, tokens_per_image=16, image_token="<i>", image_tiles=patches)
    assert layout.to_dict()["image_tiles"]["raster"] is True and PromptLayout.from_dict(layout.to_dict()) == layout
    plain = PromptLayout(kind="inline", image_token_id=5, tokens_per_image=16, image_token="<i>",
                         image_tiles=ImagePatches(merge=2, max_patches=64))
    assert "raster" not in plain.to_dict()["image_tiles"]
