"""Mistral 3 (Mistral Small 3.1's classes) and Pixtral-12B's LLaVA form: Pixtral's tower on images of any size, cut by
the image path into a row of patches per image (``contract.ImagePatches`` with ``patch``), Mistral 3's patch merger
(LLaVA's projector on every patch), a Mistral LM; each image written as PixtralProcessor writes it (rows of "[IMG]",
"[IMG_BREAK]" after each, "[IMG_END]" last); the decoder takes each image's real rows (the ``spliced_patches``
scheme). The build itself (parity of every stage, HF generate's tokens alone and batched on the default samples) is
test_export_core's."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import (TWO_IMAGE_TURNS, check_answers_equal_hf_generate, check_padded_image_rows_equal_hf,
                      check_served_as_in_process, photos)
from vlm_export.errors import AdapterError

#: (height, width): larger than the longest edge both ways (resized down), thin strips, one merge block, square
SIZES = [(300, 200), (20, 50), (70, 20), (3, 3), (64, 64), (41, 33)]


@pytest.mark.parametrize("name, first", [("mistral3", 0), ("mistral3", 2), ("llava_pixtral", 0)])
def test_prompt_ids_and_patches_are_pixtral_processors(tiny_build, tiny_model_dir, name, first):
    """Each image written as PixtralProcessor's ``replace_image_token`` writes it over the image processor's sizes
    (made with the processor's patch size of one merge block): a row of "[IMG]" per row of blocks, each row followed
    by "[IMG_BREAK]", the last by "[IMG_END]" (written out here: PixtralProcessor's module needs torchvision to
    import), where the chat template puts it; the image path's rows of patches hold each image's pixels, every patch
    once, and nothing else."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from vlm_export.runtime.load import open_build

    folder = tiny_model_dir(name)
    pipe = open_build(tiny_build(name).path)
    tokenizer, image_processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    settings = json.loads((folder / "processor_config.json").read_text())
    images = photos(SIZES, 2, first)
    block = settings["patch_size"] * settings["spatial_merge_size"]
    theirs = image_processor(images=images, patch_size={"height": block, "width": block}, return_tensors="np")
    strings = []
    for h, w in np.asarray(theirs["image_sizes"]):
        rows = [settings["image_token"] * (w // block) + settings["image_break_token"]] * (h // block)
        strings.append("".join(rows)[:-len(settings["image_break_token"])] + settings["image_end_token"])
    text = tokenizer.apply_chat_template(TWO_IMAGE_TURNS, add_generation_prompt=True, tokenize=False)
    parts = text.split("[IMG]")
    ids = pipe.prompt_ids(TWO_IMAGE_TURNS, images)
    assert ids == tokenizer(parts[0] + "".join(s + p for s, p in zip(strings, parts[1:])),
                            add_special_tokens=False)["input_ids"]
    pixels = pipe.pixel_values(images)
    real = pixels["patch_mask"].astype(bool)
    patch = settings["patch_size"]
    for k, (h, w) in enumerate(np.asarray(theirs["image_sizes"])):
        rows = pixels["pixel_values"][k][real[k]]
        assert len(rows) == (h // patch) * (w // patch)
        image = np.zeros((3, h, w), np.float32)
        for (r, c), cell in zip(pixels["patch_positions"][k][real[k]], rows):
            image[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch] = cell.reshape(3, patch, patch)
        np.testing.assert_array_equal(image, theirs["pixel_values"][k][:, :h, :w])
    assert not pixels["pixel_values"][~real].any()
    assert ids.count(pipe.layout.image_token_id) == sum(int(h * w) // block ** 2 for h, w in theirs["image_sizes"])


@pytest.mark.parametrize("name, feature_layer", [("mistral3", -1), ("mistral3", 1), ("llava_pixtral", -1),
                                                 ("llava_pixtral", [0, -1])])
def test_image_rows_equal_hf(tiny_model_dir, tmp_path, name, feature_layer):
    """The split tower (a mask in place of Hugging Face's blocks of one sequence) and projector on a padded batch of
    images of every size, the rows of padding dropped by the scheme, give Hugging Face's image features: from its
    last hidden state, or its first layer's of three; LLaVA's projector on two layers side by side."""
    from tiny_models import make_tiny_mistral3

    from vlm_export.adapters import adapter_for

    folder = tiny_model_dir(name) if feature_layer == -1 else make_tiny_mistral3(
        tmp_path / "layers", seed=1, feature_layer=feature_layer, vision_sizes={"num_hidden_layers": 3},
        llava=name == "llava_pixtral")
    check_padded_image_rows_equal_hf(adapter_for(folder).load(folder), photos(SIZES, len(SIZES)),
                                     vision_feature_layer=feature_layer,
                                     **({"vision_feature_select_strategy": "full"} if name == "llava_pixtral" else {}))


@pytest.mark.parametrize("name", ["mistral3", "llava_pixtral"])
def test_answers_for_every_size_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir, name):
    """Images of every size, alone and two at once, and none: greedy answers = Hugging Face generate's on the
    processor's padded images and sizes, alone and decoded together in one batch. Not a prompt whose images are one
    image token in all: Hugging Face's own get_image_features squeezes that lone row away and fails (the build
    answers it; the image rows test covers its row)."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build(name).path)
    assert pipe.kv_in_place  # attention fused, one KV buffer written in place
    folder = tiny_model_dir(name)
    loaded = adapter_for(folder).load(folder)
    requests = [("What is in the picture?", photos(SIZES, 1, k)) for k in range(len(SIZES)) if SIZES[k] != (3, 3)]
    check_answers_equal_hf_generate(pipe, loaded,
                                    requests + [(TWO_IMAGE_TURNS, photos(SIZES, 2, 3)), ("Tell me a story.", [])])


@pytest.mark.parametrize("setting, value, message", [
    ("spatial_merge_size", 4, "merges 4 x 4 patches per image token but the projector merges 2"),
    ("patch_size", 8, "cuts patches of 8 pixels but the vision tower takes 4"),
    ("image_break_token", "[BREAK]", "has no '\\[BREAK\\]' \\(the processor's image_break_token\\)")])
def test_a_processor_that_does_not_fit_the_model_is_refused(tiny_model_dir, tmp_path, setting, value, message):
    from vlm_export.adapters import adapter_for

    folder = tmp_path / "edited"
    shutil.copytree(tiny_model_dir("mistral3"), folder)
    settings = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({**settings, setting: value}))
    with pytest.raises(AdapterError, match=message) as e:
        adapter_for(folder).load(folder)
    assert "\n" not in str(e.value)


def test_several_feature_layers_are_refused(tmp_path):
    """Hugging Face's own Mistral 3 projector fails on several vision layers (its norm and merger are one layer
    wide): refused at load in one line, not exported."""
    from tiny_models import make_tiny_mistral3

    from vlm_export.adapters import adapter_for

    folder = make_tiny_mistral3(tmp_path / "layers", feature_layer=[0, -1])
    with pytest.raises(AdapterError, match=r"vision_feature_layer \[0, -1\] .* set one layer") as e:
        adapter_for(folder).load(folder)
    assert "\n" not in str(e.value)


def test_a_pixtral_llava_is_not_the_llava_adapters_and_drops_no_token(tiny_model_dir, tmp_path):
    """A LLaVA with a Pixtral tower goes to llava_pixtral (the llava adapter takes fixed-size towers); one whose
    feature strategy would drop a first token (of every image's patches as one sequence, in Hugging Face) is refused
    in one line."""
    from vlm_export.adapters import adapter_for, get_adapter

    folder = tiny_model_dir("llava_pixtral")
    assert adapter_for(folder).name == "llava_pixtral"
    edited = tmp_path / "edited"
    shutil.copytree(folder, edited)
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "vision_feature_select_strategy": "default"}))
    with pytest.raises(AdapterError, match="a Pixtral tower gives no class token to drop") as e:
        adapter_for(edited).load(edited)
    assert "\n" not in str(e.value)
    assert not get_adapter("llava").handles(config)


def test_served_answers_equal_in_process(tiny_build, tmp_path):
    """Served by a real tritonserver, over gRPC and HTTP (base64 images): answers for images of different sizes, two
    at once, and a conversation's second turn (a prefill continued after a cached prefix), equal ``generate``'s in
    process."""
    check_served_as_in_process(tiny_build("mistral3").path, tmp_path, [(40, 52), (70, 20), (10, 10)], over_http=True)


def test_patch_layout_round_trips_and_writes_rows():
    """numpy only: ``ImagePatches`` with ``patch`` and row texts survives the manifest, leaves its defaults out of
    Qwen's (which earlier versions read), writes each row of merged tokens with its break and the last with the end,
    and cuts a padded image's real region into patches in merge-block order."""
    import numpy as np

    from vlm_export.contract import ImagePatches, PromptLayout

    pixtral = ImagePatches(merge=2, max_patches=64, patch=2, row_end="|", end="$")
    qwen = ImagePatches(merge=2, max_patches=64)
    for tiles in (pixtral, qwen):
        layout = PromptLayout(kind="inline", image_token_id=5, tokens_per_image=16, image_token="i", image_tiles=tiles)
        assert PromptLayout.from_dict(layout.to_dict()) == layout
    assert set(PromptLayout(kind="inline", image_token_id=5, tokens_per_image=16, image_token="i",
                            image_tiles=qwen).to_dict()["image_tiles"]) == {"merge", "max_patches", "options", "window"}
    assert pixtral.text((4, 6), "i") == "iii|iii$" and qwen.text((4, 6), "i") == "iiiiii"
    image = np.arange(3 * 6 * 8, dtype=np.float32).reshape(1, 3, 6, 8)  # padded: the image is 4 x 4 pixels
    out = pixtral.arranged({"pixel_values": image, "image_sizes": [[4, 4]]})
    assert out["pixel_values"].shape == (1, 4, 12) and out["patch_mask"].tolist() == [[1, 1, 1, 1]]
    for (r, c), cell in zip(out["patch_positions"][0], out["pixel_values"][0]):
        np.testing.assert_array_equal(cell, image[0, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2].reshape(-1))
    with pytest.raises(ValueError, match="a whole number of merge blocks"):
        pixtral.grids({"image_sizes": [[6, 4]]})
