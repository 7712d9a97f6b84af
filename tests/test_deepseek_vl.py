"""DeepSeek-VL and Janus (DeepseekVLForConditionalGeneration, JanusForConditionalGeneration): one image of the
tower's size, its last hidden state through the MLP aligner, spliced at the image tokens; each image written as the
model's processor writes it (Janus's wrapped in its begin/end-of-image tokens). The builds themselves (parity of every
stage, HF generate's tokens alone and batched on the default samples) are test_export_core's."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import CONVERSATIONS, CONVERSATION_IDS, random_photo
from vlm_export.errors import AdapterError

FAMILIES = ["deepseek_vl", "janus"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("turns", CONVERSATIONS, ids=CONVERSATION_IDS)
def test_prompt_ids_and_pixels_are_the_processors(tiny_build, tiny_model_dir, family, turns):
    """Each image written where the chat template puts it, as the processor's ``replace_image_token`` writes it; ids
    and pixels (resized by the longest side and padded square) equal to the processor's."""
    from transformers import AutoProcessor

    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build(family).path)
    processor = AutoProcessor.from_pretrained(tiny_model_dir(family))
    n = sum(p["type"] == "image" for m in turns for p in m["content"])
    images = [random_photo(k, [(40, 52), (70, 20)][k % 2]) for k in range(n)]
    theirs = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="np", **({"images": images} if images else {}))
    ids = pipe.prompt_ids(turns, n)
    assert ids == theirs["input_ids"][0].tolist()
    assert ids.count(pipe.layout.image_token_id) == n * pipe.layout.tokens_per_image
    if images:
        np.testing.assert_array_equal(pipe.pixel_values(images), theirs["pixel_values"])


def test_a_processor_of_another_length_is_refused(tiny_model_dir, tmp_path):
    """A processor that writes another count of image tokens than the aligner gives: refused at load in one line
    saying what to set."""
    from vlm_export.adapters import adapter_for

    folder = tmp_path / "length"
    shutil.copytree(tiny_model_dir("deepseek_vl"), folder)
    settings = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({**settings, "num_image_tokens": 9}))
    with pytest.raises(AdapterError, match="set num_image_tokens 16") as e:
        adapter_for(folder).load(folder)
    assert "\n" not in str(e.value)


def test_janus_default_system_prompt_goes_before_every_text_as_its_processor_puts_it(tiny_model_dir, tmp_path):
    """Saved with use_default_system_prompt, JanusProcessor puts its system prompt before every text it is given
    (after the tokenizer's BOS): the layout says so (``text_before``) and the ids equal the processor's for one image,
    two and a conversation."""
    from transformers import AutoProcessor

    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.prompt import build_prompt_ids

    folder = tmp_path / "system"
    shutil.copytree(tiny_model_dir("janus"), folder)
    settings = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({**settings, "use_default_system_prompt": True}))
    loaded = adapter_for(folder).load(folder)
    layout = loaded.adapter.prompt_layout(loaded)
    assert layout.text_before.startswith("You are a helpful language and vision assistant.")
    processor = AutoProcessor.from_pretrained(folder)
    images = [random_photo(0), random_photo(1)]
    for turns in CONVERSATIONS[:3]:
        n = sum(p["type"] == "image" for m in turns for p in m["content"])
        theirs = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="np", images=images[:n])
        assert build_prompt_ids(loaded.tokenizer, layout, turns, n) == theirs["input_ids"][0].tolist()
