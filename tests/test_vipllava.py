"""ViP-LLaVA (the ``vipllava`` adapter): LLaVA's image path and prompt with several tower layers side by side (each
without its CLS row) under a LayerNorm + MLP projector. The build itself (parity of every stage, HF generate's tokens
alone and batched on the default samples) is test_export_core's."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import CONVERSATIONS, CONVERSATION_IDS, check_answers_equal_hf_generate, photos

SIZES = [(20, 50), (70, 20), (10, 10), (300, 200)]


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=CONVERSATION_IDS)
def test_prompt_ids_and_pixels_are_llava_processors(tiny_build, tiny_model_dir, turns):
    """Prompt ids and pixels = the checkpoint's LlavaProcessor's, one image token per patch of the tower."""
    from transformers import AutoProcessor

    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("vipllava").path)
    processor = AutoProcessor.from_pretrained(tiny_model_dir("vipllava"))
    images = photos(SIZES, sum(p["type"] == "image" for m in turns for p in m["content"]))
    theirs = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="np", **({"images": images} if images else {}))
    assert pipe.prompt_ids(turns, images) == theirs["input_ids"][0].tolist()
    if images:
        np.testing.assert_allclose(pipe.pixel_values(images), theirs["pixel_values"], atol=1e-6, rtol=0)


def test_image_rows_equal_hf(tiny_model_dir):
    """The vision stage (the three selected layers, CLS rows dropped, side by side) and the projector give Hugging
    Face's ``get_image_features``, a row per patch."""
    import torch

    from vlm_export.adapters import adapter_for

    folder = tiny_model_dir("vipllava")
    loaded = adapter_for(folder).load(folder)
    assert loaded.adapter.name == "vipllava"
    vision, projector = loaded.adapter.stages(loaded)[:2]
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = vision.module(pixels)
        ours = projector.module(features)
        theirs = loaded.model.model.get_image_features(pixels).pooler_output
    width = loaded.config.vision_config.hidden_size
    assert features.shape == (2, (48 // loaded.config.vision_config.patch_size) ** 2, 3 * width)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_answers_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir):
    """Images alone and two at once, and text alone: greedy answers = Hugging Face generate's, alone and decoded
    together in one batch."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.load import open_build

    folder = tiny_model_dir("vipllava")
    requests = ([("What is in the picture?", photos(SIZES, 1, k)) for k in (0, 3)]
                + [(CONVERSATIONS[1], photos(SIZES, 2, 1)), ("Tell me a story.", [])])
    check_answers_equal_hf_generate(open_build(tiny_build("vipllava").path), adapter_for(folder).load(folder),
                                    requests, new_tokens=10)
