"""Cosmos3 Edge (the ``cosmos3_edge`` adapter): Qwen2-VL's rows of patches and M-RoPE positions (the ``spliced_mrope``
scheme, interleaved) with its own SigLIP2 tower (a learned position grid resized per image, bilinear and antialiased,
in the graph as a matmul), merging projector and a Llama-style LM with a ReLU² MLP. The build itself (parity of every
stage, HF generate's tokens alone and batched on the default samples) is test_export_core's."""
from __future__ import annotations

import pytest

from conftest import (TWO_IMAGE_TURNS, check_answers_equal_hf_generate,
                      check_prompt_ids_and_patches_are_the_processors, check_rows_positions_and_largest_image,
                      check_text_model_is_a_causal_lm, photos, requests_of_every_size)

#: (height, width): the largest grid (12 x 12 patches) and grids larger and smaller than the 6 x 6 position grid on
#: either side (it is stretched and antialiased-shrunk), one below the processor's smallest (scaled up), the smallest
#: grid (one merge block), a square one and a long one
SIZES = [(300, 200), (20, 50), (70, 20), (3, 3), (64, 64), (41, 33), (8, 100)]


@pytest.mark.parametrize("side", [6, 16])
def test_antialiased_grid_is_torchs_resize(side):
    """The position grid as a matmul equals ``F.interpolate(bilinear, antialias=True)`` (what Hugging Face resizes
    it with) for every grid of 1-20 x 1-20 patches read at each patch's place, shrunk or stretched, with padding
    patches in the rows - PyTorch's own result for one column included."""
    import torch
    from torch import nn

    from vlm_export.adapters.cosmos3_edge import antialiased_grid

    torch.manual_seed(side)
    table = nn.Embedding(side * side, 5)
    square = table.weight.detach().reshape(side, side, 5).permute(2, 0, 1).unsqueeze(0)
    for rows in range(1, 21):
        for columns in range(1, 21):
            places = torch.cartesian_prod(torch.arange(rows), torch.arange(columns))
            padded = torch.cat([places, torch.zeros(3, 2, dtype=torch.long)]).unsqueeze(0)
            mask = torch.cat([torch.ones(len(places)), torch.zeros(3)]).long().unsqueeze(0)
            with torch.no_grad():
                ours = antialiased_grid(table, side, padded, mask)[0, :len(places)]
                theirs = nn.functional.interpolate(square, size=(rows, columns), mode="bilinear",
                                                   align_corners=False, antialias=True)[0]
            torch.testing.assert_close(ours, theirs[:, places[:, 0], places[:, 1]].T, atol=1e-5, rtol=0,
                                       msg=f"{rows} x {columns} patches")


@pytest.mark.parametrize("first", [0, 2])
def test_prompt_ids_and_patches_are_the_processors(tiny_build, tiny_model_dir, first):
    """Each image written as Cosmos3EdgeProcessor writes it (its own ``replace_image_token`` over the image
    processor's grids, between the chat template's vision start and end; the processor itself needs torchvision to
    load); the image path's rows hold the image processor's patches (row, column, channel within each), in order,
    and nothing else."""
    from transformers import Cosmos3EdgeProcessor

    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("cosmos3_edge").path)
    _, _, text = check_prompt_ids_and_patches_are_the_processors(
        pipe, tiny_model_dir("cosmos3_edge"), TWO_IMAGE_TURNS, photos(SIZES, 2, first),
        Cosmos3EdgeProcessor.replace_image_token, "<|image_pad|>")
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2


def test_image_rows_and_positions_equal_hf(tiny_model_dir):
    """The split tower (a mask in place of per-image lengths, the position grid resized per image) and projector on
    a padded batch of images of every size give Hugging Face's ``get_image_features``; the scheme's positions for a
    left-padded prefill of several prompts are ``get_rope_index``'s, and each row's next position its delta's. The
    largest image is exactly the adapter's most tokens per image."""
    check_rows_positions_and_largest_image(tiny_model_dir("cosmos3_edge"), photos(SIZES, len(SIZES)),
                                           "vision_start_token_id", "vision_end_token_id")


def test_answers_for_every_size_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir):
    """Images of every size, alone and two at once: greedy answers = Hugging Face generate's (with the processor's
    ``mm_token_type_ids``), alone and decoded together in one batch on one KV buffer (attention fused)."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("cosmos3_edge").path)
    assert pipe.kv_in_place
    folder = tiny_model_dir("cosmos3_edge")
    loaded = adapter_for(folder).load(folder)
    check_answers_equal_hf_generate(pipe, loaded, requests_of_every_size(SIZES))


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_text_model_is_an_ordinary_causal_lm(tiny_model_dir, tmp_path, mlp_bias):
    """For text alone M-RoPE's three streams are one: the LM written for peers (llama.cpp, onnxruntime-genai) is an
    Arcee causal LM (Llama with the same gateless ReLU² MLP, its projections renamed) with the same logits."""
    from tiny_models import make_tiny_cosmos3_edge

    folder = make_tiny_cosmos3_edge(tmp_path / "biased", mlp_bias=True) if mlp_bias else tiny_model_dir("cosmos3_edge")
    check_text_model_is_a_causal_lm(folder, tmp_path / "lm", "arcee")
