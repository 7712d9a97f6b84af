"""Aya Vision (AyaVisionForConditionalGeneration): each image cut by its GotOcr2 image processor into up to
``max_patches`` tiles by its aspect ratio, plus a thumbnail, and written as AyaVisionProcessor writes it -
"<|START_OF_IMG|>", "TILE_k" + the patch token x rows per tile, "TILE_GLOBAL" + the thumbnail's, "<|END_OF_IMG|>"
(``PromptLayout.image_tiles`` counted by ``num_patches``, the rows' token its own); a SwiGLU projector after a pixel
shuffle; a Cohere 2 LM. The build itself (parity of every stage, HF generate's tokens alone and batched on the default
samples) is test_export_core's."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import (CONVERSATIONS, CONVERSATION_IDS, check_answers_equal_hf_generate,
                      check_prompt_ids_and_tiles_are_the_processors, photos)
from vlm_export.errors import AdapterError

#: (height, width): 3 tiles (1 x 2 and a thumbnail), 5 (1 x 4 or 2 x 2, and a thumbnail), 1 (too small to cut)
SIZES = [(20, 50), (70, 20), (10, 10), (300, 200), (64, 64)]


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=CONVERSATION_IDS)
def test_prompt_ids_and_tiles_are_aya_vision_processors(tiny_build, tiny_model_dir, turns):
    """Each image written as AyaVisionProcessor writes it for its tiles, where its chat template puts it; ids and
    tiles equal to the processor's, over images of 1, 3 and 5 tiles."""
    from vlm_export.runtime.load import open_build

    check_prompt_ids_and_tiles_are_the_processors(open_build(tiny_build("aya_vision").path),
                                                  tiny_model_dir("aya_vision"), turns, SIZES)


def test_answers_for_every_tile_count_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir):
    """Images of 1, 3 and 5 tiles, alone and two at once: greedy answers = Hugging Face generate's, alone and decoded
    together in one batch; the limits count the tiles (4 and a thumbnail at most)."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.load import open_build

    build = tiny_build("aya_vision").path
    folder = tiny_model_dir("aya_vision")
    assert json.loads((build / "manifest.json").read_text())["limits"]["tiles_per_image"] == 5
    requests = ([("What is in the picture?", photos(SIZES, 1, k)) for k in (0, 2, 3)]
                + [(CONVERSATIONS[1], photos(SIZES, 2, 3))])
    check_answers_equal_hf_generate(open_build(build), adapter_for(folder).load(folder), requests, new_tokens=10)


def test_a_processor_of_another_length_or_several_feature_layers_is_refused(tiny_model_dir, tmp_path):
    """A processor that writes another count of tokens per tile than the projector gives, or a config whose projector
    would read several feature layers: refused at load in one line saying what to fix."""
    from vlm_export.adapters import adapter_for

    for name, file, edit, said in (
        ("length", "processor_config.json", lambda c: c.update(img_size=64), "writes 16 image tokens per tile"),
        ("layers", "config.json", lambda c: c.update(vision_feature_layer=[-2, -1]), "names several layers"),
    ):
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir("aya_vision"), folder)
        settings = json.loads((folder / file).read_text())
        edit(settings)
        (folder / file).write_text(json.dumps(settings))
        with pytest.raises(AdapterError, match=said) as e:
            adapter_for(folder).load(folder)
        assert "\n" not in str(e.value)


def test_a_tower_of_variable_resolution_is_refused_by_its_inputs():
    """SigLIP 2's NaFlex tower takes a patch mask and each image's grid beside the pixels: named, and so refused at
    load where the tower is first measured (``tower_tokens``, Aya Vision's and LLaVA's) in one line; SigLIP's takes
    the pixels alone."""
    from transformers import Siglip2VisionConfig, Siglip2VisionModel, SiglipVisionConfig, SiglipVisionModel

    from vlm_export.adapters.llava import LlavaVisionEncoder, tower_needs_more_than_pixels, tower_tokens

    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    assert tower_needs_more_than_pixels(Siglip2VisionModel(Siglip2VisionConfig(**small))) == ["pixel_attention_mask",
                                                                                             "spatial_shapes"]
    assert tower_needs_more_than_pixels(SiglipVisionModel(SiglipVisionConfig(**small))) == []
    naflex = LlavaVisionEncoder(Siglip2VisionModel(Siglip2VisionConfig(**small)), -1, "full")
    with pytest.raises(AdapterError, match="needs pixel_attention_mask, spatial_shapes beside the pixels") as e:
        tower_tokens(naflex, 32)
    assert "\n" not in str(e.value)
