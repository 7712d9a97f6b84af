"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL: each image cut by its Qwen2VLImageProcessor into as many patches as its size
needs (``contract.ImagePatches``: the image path reads a row of patches per image, padded, with their places and a
mask), one image token per merge block, and the LM's multimodal rotary positions (the ``spliced_mrope`` scheme;
Qwen3-VL's rows carry its deepstack features too: ``spliced_mrope_deepstack``). The build itself (parity of every
stage, HF generate's tokens alone and batched on the default samples) is test_export_core's."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from conftest import (TWO_IMAGE_TURNS, check_answers_equal_hf_generate, check_mrope_positions_equal_hf,
                      check_patch_rows_equal_hf, check_prefix_cache_equal_a_full_prefill,
                      check_prompt_ids_and_patches_are_the_processors, check_served_as_in_process,
                      check_text_model_is_a_causal_lm, photos, requests_of_every_size)
from vlm_export.errors import AdapterError

FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
#: (height, width): the largest grid (12 x 12 patches, 3 x 3 windows of Qwen2.5-VL), uneven ones that cut windows
#: short, the smallest (one merge block of 2 x 2 patches: 8 x 8 pixels)
SIZES = [(300, 200), (20, 50), (70, 20), (3, 3), (64, 64), (41, 33)]


@pytest.mark.parametrize("family, first", [("qwen2_vl", 0), ("qwen2_vl", 2), ("qwen2_vl", 3), ("qwen3_vl", 0)])
def test_prompt_ids_and_patches_are_the_processors(tiny_build, tiny_model_dir, family, first):
    """Each image written as Qwen2VLProcessor (Qwen3VLProcessor) writes it (its own ``replace_image_token`` over the
    image processor's grids; the processor itself needs torchvision to load), where the chat template puts it (Qwen3-VL's
    writes no default system turn); the image path's rows of patches hold the image processor's patches, in order, and
    nothing else."""
    from transformers import Qwen2VLProcessor, Qwen3VLProcessor

    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build(family).path)
    replace = (Qwen3VLProcessor if family == "qwen3_vl" else Qwen2VLProcessor).replace_image_token
    ids, theirs, _ = check_prompt_ids_and_patches_are_the_processors(pipe, tiny_model_dir(family), TWO_IMAGE_TURNS,
                                                                     photos(SIZES, 2, first), replace, "<|image_pad|>")
    assert ids.count(pipe.layout.image_token_id) == int(theirs["image_grid_thw"].prod(axis=1).sum()) // 4


@pytest.mark.parametrize("family", FAMILIES)
def test_image_rows_and_positions_equal_hf(tiny_model_dir, family):
    """The split vision tower (a mask in place of per-image lengths; Qwen2.5-VL's windows gathered into slots;
    Qwen3-VL's position grid resampled to each image's grid) and merger on a padded batch of images of every size give
    Hugging Face's image features (Qwen3-VL's: each row's embedding, then its deepstack features, every level the
    merger of its own vision block); the scheme's positions for a
    left-padded prefill of several prompts are ``get_rope_index``'s, and each row's next position its delta's."""
    from vlm_export.adapters import adapter_for

    folder = tiny_model_dir(family)
    loaded = adapter_for(folder).load(folder)
    flat, arranged, rows, levels = check_patch_rows_equal_hf(loaded, photos(SIZES, len(SIZES)))
    assert levels == (2 if family == "qwen3_vl" else 0)
    check_mrope_positions_equal_hf(loaded, flat, arranged, rows, loaded.config.vision_start_token_id,
                                   loaded.config.vision_end_token_id)


@pytest.mark.parametrize("family", FAMILIES)  # Qwen3-VL-MoE's answers: test_export_core's build parity
def test_answers_for_every_size_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir, family):
    """Images of every size, alone and two at once: greedy answers = Hugging Face generate's (with the processor's
    ``mm_token_type_ids``: without them it drops M-RoPE), alone and decoded together in one batch on one KV buffer
    (rows whose next positions run behind their lengths, each by its own images)."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build(family).path)
    # the fused form: attention in ONNX Runtime's kernel after the graph's own M-RoPE, one KV buffer in place
    assert pipe.kv_in_place
    folder = tiny_model_dir(family)
    loaded = adapter_for(folder).load(folder)
    check_answers_equal_hf_generate(pipe, loaded, requests_of_every_size(SIZES))


@pytest.mark.parametrize("family, lm", [("qwen2_vl", "qwen2"), ("qwen3_vl", "qwen3"), ("qwen3_vl_moe", "qwen3_moe")])
def test_text_model_is_an_ordinary_causal_lm(tiny_model_dir, tmp_path, family, lm):
    """For text alone M-RoPE's three streams are one (interleaved or not) and no deepstack feature is added: the LM
    written for peers (llama.cpp, onnxruntime-genai) is a plain Qwen2 (Qwen3-VL's: Qwen3; Qwen3-VL-MoE's: Qwen3-MoE)
    causal LM with the same logits."""
    check_text_model_is_a_causal_lm(tiny_model_dir(family), tmp_path / "lm", lm)


def test_an_image_processor_of_another_patch_size_is_refused(tiny_model_dir, tmp_path):
    import json

    from vlm_export.adapters import adapter_for

    folder = tmp_path / "edited"
    shutil.copytree(tiny_model_dir("qwen2_vl"), folder)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**settings, "patch_size": 8}))
    with pytest.raises(AdapterError, match="patch_size 8 but the vision tower takes 4") as e:
        adapter_for(folder).load(folder)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("family, form", [("qwen2_5_vl", "onnxruntime"), ("qwen3_vl", "onnxruntime"),
                                          ("qwen2_vl", "standard")])
def test_prefix_cache_answers_and_logits_equal_a_full_prefill(tiny_build, family, form):
    """M-RoPE's positions after a prefix follow from what it holds, which its keys say (each image row with its
    place): a prompt continues from a cached prefix with the whole prefill's answers, logits, K/V and next positions
    (Qwen3-VL's deepstack rows too; the in-place KV buffer and the copying path)."""
    from vlm_export.runtime.load import open_build

    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    check_prefix_cache_equal_a_full_prefill(open_build(tiny_build(family).path, form=form), turn,
                                            [photos(SIZES, 1, k) for k in (0, 1, 4)])


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])  # Qwen2-VL's served path is Qwen2.5-VL's, windowless
def test_served_answers_equal_in_process(tiny_build, tmp_path, family):
    """Served by a real tritonserver, over gRPC and HTTP (base64 images): answers for images of different sizes
    (Triton batches only images of one size in the image path), two at once, and a conversation's second turn,
    equal ``generate``'s in process."""
    check_served_as_in_process(tiny_build(family).path, tmp_path, [(40, 52), (70, 20), (10, 10)],
                               over_http=family == "qwen2_5_vl")


def test_a_processor_whose_largest_image_overflows_the_lm_is_refused_before_export(tiny_model_dir, tmp_path):
    """A processor allowed Qwen2-VL's own largest image (12.8 M pixels: 4114 tokens for the astronaut sample here)
    in an LM of 512 positions: refused before any export, in one line saying both fixes."""
    import json

    from vlm_export.build import BuildOptions, build
    from vlm_export.errors import BuildError

    folder = tmp_path / "edited"
    shutil.copytree(tiny_model_dir("qwen2_vl"), folder)
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    settings["size"] = {**settings["size"], "longest_edge": 12845056}
    (folder / "preprocessor_config.json").write_text(json.dumps(settings))
    with pytest.raises(BuildError, match=r"build with --max-images 0, or save the image processor with a smaller "
                                         r"largest image \(its max_pixels") as e:
        build(folder, tmp_path / "build", BuildOptions())
    assert "\n" not in str(e.value) and not (tmp_path / "build").exists()


def test_windows_hold_each_patch_once_with_its_window_mates():
    """numpy only: ``ImagePatches`` with windows (Qwen2.5-VL's) puts every real patch in exactly one slot of its own
    window (rows and columns cut at multiples of the window, the last ones short), ``patch_slots`` is the inverse,
    and no image needs more slots than ``max_window_slots``."""
    from vlm_export.contract import ImagePatches

    patches = ImagePatches(merge=2, max_patches=144, window=4)
    grids = [(6, 4), (12, 12), (2, 2), (4, 10), (12, 2)]
    flat = np.arange(sum(h * w for h, w in grids), dtype=np.float32)[:, None]
    out = patches.arranged({"pixel_values": flat, "image_grid_thw": [[1, h, w] for h, w in grids]})
    windows, slots, places = out["window_patches"], out["patch_slots"], out["patch_positions"]
    assert windows.shape[1] <= patches.max_window_slots
    for k, (h, w) in enumerate(grids):
        real = windows[k][windows[k] >= 0]
        assert sorted(real) == list(range(h * w))
        np.testing.assert_array_equal(windows[k][slots[k, :h * w]], np.arange(h * w))
        for window in windows[k].reshape(-1, 16):
            cells = {tuple(places[k, p] // 4) for p in window if p >= 0}
            assert len(cells) <= 1
