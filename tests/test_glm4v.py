"""GLM-4.1V / 4.5V / 4.6V and GLM-OCR (the ``glm4v`` adapter): Qwen2-VL's rows of patches and M-RoPE positions (the
``spliced_mrope`` scheme) with GLM-4V's own tower (its position grid resampled bicubically per image in the graph),
strided merger and GLM-4 LM. The build itself (parity of every stage, HF generate's tokens alone and batched on the
default samples) is test_export_core's, for GLM-4.1V, GLM-4.5V (a GLM-4-MoE LM) and GLM-OCR."""
from __future__ import annotations

import pytest

from conftest import (TWO_IMAGE_TURNS, check_answers_equal_hf_generate, check_patch_rows_equal_hf,
                      check_prefix_cache_equal_a_full_prefill, check_prompt_ids_and_patches_are_the_processors,
                      check_rows_positions_and_largest_image, check_text_model_is_a_causal_lm, photos,
                      requests_of_every_size)

#: (height, width): the largest grid (12 x 12 patches, the processor's half of longest_edge), uneven ones, one
#: below the processor's smallest (scaled up), the smallest grid (one merge block) and a square one
SIZES = [(300, 200), (20, 50), (70, 20), (3, 3), (64, 64), (41, 33)]


@pytest.mark.parametrize("first", [0, 2])
def test_prompt_ids_and_patches_are_the_processors(tiny_build, tiny_model_dir, first):
    """Each image written as Glm4vProcessor writes it (its own ``replace_image_token`` over the image processor's
    grids, between the chat template's begin/end-of-image; the processor itself needs torchvision to load); the image
    path's rows hold the image processor's patches, in order, and nothing else."""
    from transformers import Glm4vProcessor

    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("glm4v").path)
    _, _, text = check_prompt_ids_and_patches_are_the_processors(
        pipe, tiny_model_dir("glm4v"), TWO_IMAGE_TURNS, photos(SIZES, 2, first), Glm4vProcessor.replace_image_token,
        "<|image|>")
    assert text.count("<|begin_of_image|><|image|><|end_of_image|>") == 2


def test_image_rows_and_positions_equal_hf(tiny_model_dir):
    """The split tower (its position grid resampled per image by grid_sample on the padded rows) and merger on a
    padded batch of images of every size give Hugging Face's ``get_image_features``; the scheme's positions for a
    left-padded prefill of several prompts are GLM-4V's ``get_rope_index``'s, and each row's next position its
    delta's. The largest image is exactly the adapter's most tokens per image (the processor's limit counts a
    patch's two frames)."""
    check_rows_positions_and_largest_image(tiny_model_dir("glm4v"), photos(SIZES, len(SIZES)), "image_start_token_id",
                                           "image_end_token_id")


def test_answers_for_every_size_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir):
    """Images of every size, alone and two at once: greedy answers = Hugging Face generate's (with the processor's
    ``mm_token_type_ids``), alone and decoded together in one batch on one KV buffer: the fused form's attention in
    ONNX Runtime's kernel after the graph's own pairwise M-RoPE."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("glm4v").path)
    assert pipe.kv_in_place
    folder = tiny_model_dir("glm4v")
    loaded = adapter_for(folder).load(folder)
    check_answers_equal_hf_generate(pipe, loaded, requests_of_every_size(SIZES))


def test_prefix_cache_answers_and_logits_equal_a_full_prefill(tiny_build):
    """GLM-4V's M-RoPE (pairwise over half of each head) continues from a cached prefix with the whole prefill's
    answers, logits, K/V and next positions, on its fused form's KV buffer in place."""
    from vlm_export.runtime.load import open_build

    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    check_prefix_cache_equal_a_full_prefill(open_build(tiny_build("glm4v").path), turn,
                                            [photos(SIZES, 1, k) for k in (0, 1, 4)])


@pytest.mark.parametrize("family, lm", [("glm4v", "glm4"), ("glm4v_moe", "glm4_moe"), ("glm_ocr", "glm4")])
def test_text_model_is_an_ordinary_causal_lm(tiny_model_dir, tmp_path, family, lm):
    """For text alone M-RoPE's three streams are one: the LM written for peers (llama.cpp, onnxruntime-genai) is a
    plain GLM-4 (GLM-4.5V's: GLM-4-MoE) causal LM with the same logits."""
    check_text_model_is_a_causal_lm(tiny_model_dir(family), tmp_path / "lm", lm)


@pytest.mark.parametrize("family", ["glm46v", "glmga", "glm_ocr"])
def test_other_classes_image_rows_equal_hf(tiny_model_dir, tmp_path, family):
    """GLM-4.6V's classes hold GLM-4.1V's modules (Glmga's config loads them, with its own image processor), GLM-OCR's
    tower has no position grid and norms q/k per head: the same adapter, its split tower and merger on a padded batch
    = the model's own ``get_image_features`` on its image processor's patches."""
    from tiny_models import make_tiny_glm4v
    from vlm_export.adapters import adapter_for

    folder = tiny_model_dir(family) if family == "glm_ocr" else make_tiny_glm4v(tmp_path / family, family=family)
    loaded = adapter_for(folder).load(folder)
    assert loaded.adapter.name == "glm4v" and type(loaded.model).__name__ == {
        "glm46v": "Glm46VForConditionalGeneration", "glmga": "Glm46VForConditionalGeneration",
        "glm_ocr": "GlmOcrForConditionalGeneration"}[family]
    assert type(loaded.image_processor).__name__ == ("GlmgaImageProcessorPil" if family == "glmga"
                                                     else "Glm4vImageProcessorPil")
    check_patch_rows_equal_hf(loaded, photos(SIZES, 3))


def test_an_image_processor_whose_backends_disagree_is_refused(tmp_path):
    """Glmga's torchvision image processor rounds sizes to ``patch_expand_factor`` as well, its Pillow one (the one a
    build runs) does not: a factor other than 1 is refused at load, in one line naming it."""
    import json

    from tiny_models import make_tiny_glm4v
    from vlm_export.adapters import adapter_for
    from vlm_export.errors import AdapterError

    folder = make_tiny_glm4v(tmp_path / "glmga", family="glmga")
    settings = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps({**settings, "patch_expand_factor": 2}))
    with pytest.raises(AdapterError, match="patch_expand_factor 2") as refused:
        adapter_for(folder).load(folder)
    assert "\n" not in str(refused.value)
