"""LFM3-VL (the ``lfm3_vl`` adapter): Qwen2-VL's patches under a tower of grid convolutions and attention, a norm +
merge projector, and an LFM3 LM of gated short convolutions (per-row fixed-size states, ``DecoderGeometry.states``)
beside sliding-window and full attention. The build itself (parity of every stage and state, HF generate's tokens
alone and batched on the default samples, prompts past the 24-token window) is test_export_core's."""
from __future__ import annotations

import pytest

from conftest import (TWO_IMAGE_TURNS, check_answers_equal_hf_generate, check_patch_rows_equal_hf,
                      check_prompt_ids_and_patches_are_the_processors, check_text_model_is_a_causal_lm, photos,
                      requests_of_every_size)
from vlm_export.errors import AdapterError

#: (height, width): the largest grid (12 x 12 patches), wide, tall, the smallest (one merge block), odd sizes
SIZES = [(300, 200), (20, 50), (70, 20), (3, 3), (64, 64), (41, 33)]


@pytest.mark.parametrize("bias", [False, True])
def test_short_conv_equals_hfs_prefill_and_steps(bias):
    """The exported short convolution from zero state = Hugging Face's ``Lfm3ShortConv`` on a whole prompt, and
    continued token by token from the window it returns = Hugging Face's cached steps; a left-padded row gives its
    unpadded self's outputs and window (with an ``in_proj`` bias too, which Hugging Face's padding zeroing would let
    into the window)."""
    import torch
    from transformers import DynamicCache, Lfm3Config
    from transformers.models.lfm3.modeling_lfm3 import Lfm3ShortConv

    from vlm_export.adapters.lfm3_vl import short_conv

    config = Lfm3Config(hidden_size=32, num_hidden_layers=2, layer_types=["conv", "full_attention"], conv_L_cache=4,
                        conv_bias=bias, num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=100,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    module = Lfm3ShortConv(config, 0).eval()
    x = torch.randn(1, 9, 32)
    with torch.no_grad():
        theirs_whole = module(x)
        cache = DynamicCache(config=config)
        theirs_steps = [module(x[:, :6], cache=cache)] + [module(x[:, t:t + 1], cache=cache) for t in range(6, 9)]
        zeros = torch.zeros(1, 32, 3)
        ours, window = short_conv(module, x[:, :6], torch.ones(1, 6), zeros)
        steps = [ours]
        for t in range(6, 9):
            out, window = short_conv(module, x[:, t:t + 1], torch.ones(1, 1), window)
            steps.append(out)
        whole, _ = short_conv(module, x, torch.ones(1, 9), zeros)
        padded, padded_window = short_conv(module, torch.cat([torch.randn(1, 3, 32), x[:, :6]], dim=1),
                                           torch.tensor([[0.0] * 3 + [1.0] * 6]), zeros)
        _, alone_window = short_conv(module, x[:, :6], torch.ones(1, 6), zeros)
    torch.testing.assert_close(whole, theirs_whole, atol=1e-6, rtol=0)
    torch.testing.assert_close(torch.cat(steps, 1), torch.cat(theirs_steps, 1), atol=1e-6, rtol=0)
    torch.testing.assert_close(padded[:, 3:], whole[:, :6], atol=1e-6, rtol=0)
    torch.testing.assert_close(padded_window, alone_window, atol=1e-6, rtol=0)


def test_states_windows_and_consequences_are_declared(tiny_build):
    """Each convolution layer's window is one state the geometry declares (from the config: ``conv_L_cache`` - 1
    inputs of ``hidden_size`` channels); the attention layers alone carry K/V, the sliding one's window recorded in
    their own numbering; both attentions fused; no in-place KV buffer, no prefix cache."""
    from vlm_export.runtime.load import open_build

    build = tiny_build("lfm3_vl")
    geometry = build.manifest["scheme"]["geometry"]
    assert build.manifest["scheme"]["name"] == "spliced_patches"
    assert geometry["num_layers"] == 2  # layers 1 (sliding) and 3 (full) attend; 0 and 2 convolve
    assert (geometry["sliding_window"], geometry["windowed_layers"]) == (24, [0])
    assert [(s["name"], s["shape"]) for s in geometry["states"]] == [("0.conv", [64, 2]), ("2.conv", [64, 2])]
    inputs = {t["name"]: t["shape"] for t in build.manifest["graphs"]["lm_decoder"]["inputs"]}
    assert inputs["past_states.2.conv"] == ["batch", 64, 2]
    assert [n for n in inputs if n.startswith("past_key_values")] == [
        "past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    # both attentions fused, the per-head output gate kept after the kernel, the sliding one's window in the kernel
    fusion = build.manifest["graphs"]["lm_decoder"]["fusion"]
    assert fusion["fusions"]["attention"] == 2, fusion
    assert "sliding window of 24 tokens in the kernel" in " ".join(fusion["notes"])
    pipe = open_build(build.path)
    assert not pipe.kv_in_place
    assert pipe.scheme.prefix_keys([5, 6, 7], pipe.scheme.empty_image_input()) is None


def test_every_graph_passes_tensorrts_checks(tiny_build):
    """The tower's tap arithmetic, the convolution states and the gated attention: nothing TensorRT 10's parser is
    known to refuse (the tower's floor divisions once exported boolean Equal, which it does not take)."""
    from vlm_export.engines.check import check_build

    report = check_build(tiny_build("lfm3_vl").path)
    assert report.violations == [], report.violations[:3]


def test_prompt_ids_and_patches_are_the_processors(tiny_build, tiny_model_dir):
    """Each image written as Lfm3VlProcessor writes it (its own ``replace_image_token`` over the image processor's
    grids); the image path's rows hold the image processor's patches, in order, and nothing else."""
    from transformers import Lfm3VlProcessor

    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("lfm3_vl").path)
    _, _, text = check_prompt_ids_and_patches_are_the_processors(
        pipe, tiny_model_dir("lfm3_vl"), TWO_IMAGE_TURNS, photos(SIZES, 2), Lfm3VlProcessor.replace_image_token,
        "<|image_pad|>")
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2


def test_image_rows_equal_hf_for_every_size(tiny_model_dir):
    """The split tower (convolution taps read by place, attention masked to each image) and projector on a padded
    batch of images of every size give Hugging Face's ``get_image_features``; the largest image is exactly the
    adapter's most tokens per image."""
    from vlm_export.adapters import adapter_for

    folder = tiny_model_dir("lfm3_vl")
    loaded = adapter_for(folder).load(folder)
    layout = loaded.adapter.prompt_layout(loaded)
    flat, _, _, _ = check_patch_rows_equal_hf(loaded, photos(SIZES, len(SIZES)))
    assert max(layout.image_tiles.tokens(grid) for grid in layout.image_tiles.grids(flat)) == layout.tokens_per_image


def test_answers_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir):
    """Images of every size (prompts past the sliding window), alone and two at once, and text alone: greedy answers
    = Hugging Face generate's, alone and decoded together in one batch of left-padded prompts."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("lfm3_vl").path)
    folder = tiny_model_dir("lfm3_vl")
    loaded = adapter_for(folder).load(folder)
    check_answers_equal_hf_generate(pipe, loaded, requests_of_every_size(SIZES))


def test_text_model_is_lfm3s_causal_lm(tiny_model_dir, tmp_path):
    """The LM written for peers is LFM3's own causal LM (the same convolution and attention layers), same logits."""
    check_text_model_is_a_causal_lm(tiny_model_dir("lfm3_vl"), tmp_path / "lm", "lfm3")


@pytest.mark.parametrize("change, needle", [
    ({"layer_types": ["conv", "linear_attention"]}, "linear_attention"),
    ({"layer_types": ["conv", "conv"]}, "no attention layer"),
    ({"conv_L_cache": 1}, "conv_L_cache is 1")])
def test_a_layer_layout_the_decoder_cannot_carry_is_refused(change, needle):
    """Layers of another kind, no attention layer, a convolution that keeps nothing: one line each, before any
    export."""
    from transformers import Lfm3Config

    from vlm_export.adapters.hybrid import FULL, SLIDING, hybrid_geometry
    from vlm_export.adapters.lfm3_vl import SHORT_CONV

    config = Lfm3Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, intermediate_size=128, vocab_size=300, layer_types=["conv", "full_attention"])
    for name, value in change.items():
        setattr(config, name, value)
    with pytest.raises(AdapterError, match=needle) as caught:
        hybrid_geometry(config, 512, SHORT_CONV, (FULL, SLIDING))
    assert "\n" not in str(caught.value)
