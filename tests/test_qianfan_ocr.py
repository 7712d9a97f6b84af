"""Qianfan-OCR (the ``qianfan_ocr`` adapter): InternVL's tiles, tower, pixel shuffle and projector under Qianfan-OCR's
classes, over a Qwen3 LM; the chat template and a raw prompt write an image as "<image>", which QianfanOCRProcessor
replaces with "<img>" + the context token x rows x tiles + "</img>". The build itself (parity of every stage, HF
generate's tokens alone and batched on the default samples) is test_export_core's."""
from __future__ import annotations

import pytest

from conftest import (CONVERSATIONS, CONVERSATION_IDS, check_answers_equal_hf_generate,
                      check_prompt_ids_and_tiles_are_the_processors, photos)

#: (height, width): 3 tiles (1 x 2 and a thumbnail), 5 (1 x 4 or 2 x 2, and a thumbnail), 1 (too small to cut)
SIZES = [(20, 50), (70, 20), (10, 10), (300, 200), (64, 64)]


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=CONVERSATION_IDS)
def test_prompt_ids_and_tiles_are_qianfan_ocr_processors(tiny_build, tiny_model_dir, turns):
    """Prompt ids and tiles = QianfanOCRProcessor's own (its chat template's "<image>" replaced by the run of context
    tokens for the image's tiles), over images of 1, 3 and 5 tiles."""
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("qianfan_ocr").path)
    assert pipe.layout.image_token == "<image>"
    check_prompt_ids_and_tiles_are_the_processors(pipe, tiny_model_dir("qianfan_ocr"), turns, SIZES)


def test_a_raw_prompt_writes_images_where_its_marks_are(tiny_build, tiny_model_dir):
    """Without a chat template, a raw prompt that writes "<image>" where each image goes: the processor's ids for that
    text; a mark missing is refused."""
    from transformers import AutoProcessor

    from vlm_export.errors import InputError
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("qianfan_ocr").path)
    processor = AutoProcessor.from_pretrained(tiny_model_dir("qianfan_ocr"))
    images = photos(SIZES, 2, 0)
    raw = "Compare <image> with <image>: which is brighter?"
    pipe.tokenizer.chat_template = None
    assert pipe.prompt_ids(raw, images) == processor(text=raw, images=images, return_tensors="np")["input_ids"][0].tolist()
    with pytest.raises(InputError, match="write it once where each image goes"):
        pipe.prompt_ids("Compare <image>", images)


def test_answers_for_every_tile_count_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir):
    """Images of 1, 3 and 5 tiles, alone and two at once: greedy answers = Hugging Face generate's, alone and decoded
    together in one batch."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.load import open_build

    folder = tiny_model_dir("qianfan_ocr")
    requests = ([("What is in the picture?", photos(SIZES, 1, k)) for k in (0, 2, 3)]
                + [(CONVERSATIONS[1], photos(SIZES, 2, 3)), ("Read this.", [])])
    check_answers_equal_hf_generate(open_build(tiny_build("qianfan_ocr").path), adapter_for(folder).load(folder),
                                    requests, new_tokens=10)
