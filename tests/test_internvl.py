"""InternVL (InternVLForConditionalGeneration): each image cut by its GotOcr2 image processor into up to
``max_patches`` tiles by its aspect ratio, plus a thumbnail, and written as one run "<img>" + the context token x
rows x tiles + "</img>" (``PromptLayout.image_tiles`` counted by ``num_patches``). The build itself (parity of every
stage, HF generate's tokens alone and batched on the default samples) is test_export_core's."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import TWO_IMAGE_TURNS, check_answers_equal_hf_generate, photos, requests_of_every_size
from vlm_export.errors import AdapterError

#: (height, width): 3 tiles (1 x 2 and a thumbnail), 5 (1 x 4 or 2 x 2, and a thumbnail), 1 (too small to cut)
SIZES = [(20, 50), (70, 20), (10, 10), (300, 200), (64, 64)]


@pytest.mark.parametrize("first", [0, 1, 2, 3])
def test_prompt_ids_and_tiles_are_internvl_processors(tiny_build, tiny_model_dir, first):
    """Each image written as InternVLProcessor writes it (its own ``replace_image_token``, over the image processor's
    ``num_patches``; the processor itself needs torchvision to load), where the chat template puts it; the tiles are
    the image processor's."""
    from transformers import AutoImageProcessor, AutoTokenizer, InternVLProcessor

    from vlm_export.runtime.load import open_build

    folder = tiny_model_dir("internvl")
    pipe = open_build(tiny_build("internvl").path)
    tokenizer, image_processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    seq = json.loads((folder / "processor_config.json").read_text())["image_seq_length"]
    images = photos(SIZES, 2, first)
    theirs = image_processor(images=images, crop_to_patches=True, return_tensors="np")
    processor = SimpleNamespace(start_image_token="<img>", end_image_token="</img>", image_token="<IMG_CONTEXT>",
                                image_seq_length=seq)
    strings = [InternVLProcessor.replace_image_token(processor, theirs, k) for k in range(2)]
    text = tokenizer.apply_chat_template(TWO_IMAGE_TURNS, add_generation_prompt=True, tokenize=False)
    parts = text.split("<IMG_CONTEXT>")
    want = parts[0] + "".join(s + p for s, p in zip(strings, parts[1:]))
    ids = pipe.prompt_ids(TWO_IMAGE_TURNS, images)
    assert ids == tokenizer(want)["input_ids"]
    np.testing.assert_array_equal(pipe.pixel_values(images), theirs["pixel_values"])
    assert ids.count(pipe.layout.image_token_id) == sum(theirs["num_patches"]) * seq


def test_answers_for_every_tile_count_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir):
    """Images of 1, 3 and 5 tiles, alone and two at once: greedy answers = Hugging Face generate's, alone and
    decoded together in one batch; the limits count the tiles (4 and a thumbnail at most)."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.load import open_build

    build = tiny_build("internvl").path
    folder = tiny_model_dir("internvl")
    assert json.loads((build / "manifest.json").read_text())["limits"]["tiles_per_image"] == 5
    requests = requests_of_every_size(SIZES)[:-1]  # no text-only request
    check_answers_equal_hf_generate(open_build(build), adapter_for(folder).load(folder), requests, new_tokens=12)


def test_a_processor_of_another_length_is_refused(tiny_model_dir, tmp_path):
    from vlm_export.adapters import adapter_for

    folder = tmp_path / "edited"
    shutil.copytree(tiny_model_dir("internvl"), folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "InternVLProcessor",
                                                              "image_seq_length": 9}))
    with pytest.raises(AdapterError, match="set image_seq_length 4") as e:
        adapter_for(folder).load(folder)
    assert "\n" not in str(e.value)
