"""GOT-OCR 2.0 (the ``got_ocr2`` adapter): a SAM-style ViTDet tower, a projector of strided convolutions (256 rows per
page), a Qwen2 LM; GotOcr2Processor writes the whole conversation itself (the checkpoint has no chat template), which
the adapter gives the tokenizer as a template: a prompt of GOT's query, or its task tokens, gives the processor's ids.
The build itself (parity of every stage, HF generate's tokens alone and batched on the default samples) is
test_export_core's."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import check_answers_equal_hf_generate, photos
from vlm_export.errors import AdapterError

SIZES = [(300, 200), (20, 50), (128, 128), (10, 90)]


@pytest.mark.parametrize("prompt, settings", [("<OCR>", {}), ("<OCR_FORMAT>", {"format": True}),
                                              ("[red]  OCR: ", {"color": "red"})])
def test_prompt_ids_and_pixels_are_got_ocr2_processors(tiny_build, tiny_model_dir, prompt, settings):
    """GotOcr2Processor given a page and no text (plain OCR, formatted OCR, OCR of one colour): its ids = ours for the
    task token or the query it writes; its pixels = ours."""
    from transformers import AutoProcessor

    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("got_ocr2").path)
    processor = AutoProcessor.from_pretrained(tiny_model_dir("got_ocr2"))
    for k in range(len(SIZES)):
        images = photos(SIZES, 1, k)
        theirs = processor(images=images[0], return_tensors="np", **settings)
        assert pipe.prompt_ids(prompt, images) == theirs["input_ids"][0].tolist()
        np.testing.assert_array_equal(pipe.pixel_values(images), theirs["pixel_values"])


def test_answers_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir):
    """Pages of every size, two at once and none: greedy answers = Hugging Face generate's, alone and decoded together
    in one batch."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.load import open_build

    folder = tiny_model_dir("got_ocr2")
    requests = [("<OCR>", photos(SIZES, 1, k)) for k in range(len(SIZES))] + [
        ("Compare the two pages.", photos(SIZES, 2, 1)), ("Tell me a story.", [])]
    check_answers_equal_hf_generate(open_build(tiny_build("got_ocr2").path), adapter_for(folder).load(folder),
                                    requests, new_tokens=8)


def test_a_tower_that_does_not_give_the_processors_count_is_refused(tmp_path):
    """GotOcr2Processor writes 256 image tokens per page: a tower whose projector gives another count (Hugging Face's
    generate fails on it too) is refused at load, in one line."""
    from tiny_models import make_tiny_got_ocr2

    from vlm_export.adapters import adapter_for

    folder = make_tiny_got_ocr2(tmp_path / "got", image_size=64, patch_size=4)
    with pytest.raises(AdapterError, match="gives 16 rows per image but GotOcr2Processor writes 256") as caught:
        adapter_for(folder).load(folder)
    assert "\n" not in str(caught.value)
