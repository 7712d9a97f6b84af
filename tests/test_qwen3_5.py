"""Qwen3.5 (the ``qwen3_5`` adapter): Qwen3-VL's image path without deepstack over a hybrid LM of gated delta-nets
(linear attention: fixed-size states per row, ``DecoderGeometry.states``) and gated full attention. The build itself
(parity of every stage and of every state, HF generate's tokens alone and batched on the default samples) is
test_export_core's."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import (TWO_IMAGE_TURNS, check_answers_equal_hf_generate,
                      check_prompt_ids_and_patches_are_the_processors, check_rows_positions_and_largest_image,
                      check_served_as_in_process, check_text_model_is_a_causal_lm, photos, requests_of_every_size)
from vlm_export.errors import AdapterError

#: (height, width): the largest grid (12 x 12 patches), grids larger and smaller than the 6 x 6 position grid, the
#: smallest (one merge block)
SIZES = [(300, 200), (20, 50), (70, 20), (3, 3), (64, 64), (41, 33)]


@pytest.mark.parametrize("length", [1, 5, 70])  # 70: past Hugging Face's chunk of 64
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("start", ["zeros", "random"])
def test_gated_delta_rule_is_hfs(length, groups, start):
    """The scan the decoder exports computes Hugging Face's gated delta rule: its token-by-token form (a decode
    step's) and its chunked form (a prefill's), from zeros or from a state, with value heads shared by key heads."""
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import (torch_chunk_gated_delta_rule,
                                                              torch_recurrent_gated_delta_rule)

    from vlm_export.adapters.qwen3_5 import gated_delta_rule

    gen = torch.Generator().manual_seed(length * 10 + groups)
    batch, key_heads, key_size, value_size = 2, 2, 8, 6
    heads = key_heads * groups
    query, key = (torch.randn(batch, length, key_heads, key_size, generator=gen) for _ in range(2))
    value = torch.randn(batch, length, heads, value_size, generator=gen)
    decay = -torch.rand(batch, length, heads, generator=gen) * 2
    beta = torch.rand(batch, length, heads, generator=gen)
    state = (torch.zeros if start == "zeros" else torch.randn)(batch, heads, key_size, value_size)
    ours = gated_delta_rule(query, key, value, decay, beta, state)
    for form, rule in (("token by token", torch_recurrent_gated_delta_rule), ("chunked", torch_chunk_gated_delta_rule)):
        theirs = rule(query, key, value, g=decay, beta=beta, initial_state=state, output_final_state=True,
                      use_qk_l2norm_in_kernel=True)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=form)


def test_states_are_declared_and_carried(tiny_build):
    """Each linear-attention layer's convolution window and recurrent state are the decoder's inputs and outputs as
    the geometry declares them (from the config: the layers the config calls linear); the attention layers alone
    carry K/V; a batch runs on per-row states (no KV buffer in place) and keeps no prefix cache (a state after a
    whole prompt is not the state after a prefix of it)."""
    from vlm_export.contract.profiles import stage_profiles
    from vlm_export.runtime.load import open_build

    build = tiny_build("qwen3_5")
    manifest = build.manifest
    geometry = manifest["scheme"]["geometry"]
    assert geometry["num_layers"] == 1  # layers 0 and 2 are gated delta-nets, layer 1 attention
    assert [(s["name"], s["shape"]) for s in geometry["states"]] == [
        ("0.conv", [80, 3]), ("0.recurrent", [4, 8, 12]), ("2.conv", [80, 3]), ("2.recurrent", [4, 8, 12])]
    graph = manifest["graphs"]["lm_decoder"]
    inputs = {t["name"]: t["shape"] for t in graph["inputs"]}
    outputs = {t["name"]: t["shape"] for t in graph["outputs"]}
    assert inputs["past_states.2.recurrent"] == ["batch", 4, 8, 12]
    assert outputs["present_states.0.conv"] == ["batch", 80, 3]
    assert [n for n in inputs if n.startswith("past_key_values")] == ["past_key_values.0.key",
                                                                      "past_key_values.0.value"]
    # TensorRT's profiles bound each state by the batch alone, in the prefill's and the decode step's profile
    for profile in stage_profiles(manifest, "lm_decoder"):
        assert profile["past_states.0.conv"][0] == (1, 80, 3) and profile["past_states.0.conv"][2][1:] == (80, 3)
    assert "fixed-size states per row" in graph["fusion"]["kv_copied_because"]  # said, not left to the runtime
    pipe = open_build(build.path)
    assert not pipe.kv_in_place
    assert pipe.scheme.prefix_keys([5, 6, 7], pipe.scheme.empty_image_input()) is None


def test_prompt_ids_and_patches_are_the_processors(tiny_build, tiny_model_dir):
    """Each image written as Qwen3VLProcessor (Qwen3.5's processor) writes it, its own ``replace_image_token`` over
    the image processor's grids; the image path's rows hold the image processor's patches, in order, and nothing
    else."""
    from transformers import Qwen3VLProcessor

    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("qwen3_5").path)
    _, _, text = check_prompt_ids_and_patches_are_the_processors(
        pipe, tiny_model_dir("qwen3_5"), TWO_IMAGE_TURNS, photos(SIZES, 2), Qwen3VLProcessor.replace_image_token,
        "<|image_pad|>")
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 2


def test_image_rows_and_positions_equal_hf(tiny_model_dir):
    """The split tower and merger on a padded batch of images of every size give Hugging Face's
    ``get_image_features``; the scheme's positions are ``get_rope_index``'s; the largest image is exactly the
    adapter's most tokens per image."""
    check_rows_positions_and_largest_image(tiny_model_dir("qwen3_5"), photos(SIZES, len(SIZES)),
                                           "vision_start_token_id", "vision_end_token_id")


def test_answers_for_every_size_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir):
    """Images of every size, alone and two at once, and text alone: greedy answers = Hugging Face generate's (its
    prefill chunked, its steps token by token), alone and decoded together in one batch of left-padded prompts (the
    padding zeroed before the convolution, so a row's states are its own)."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("qwen3_5").path)
    folder = tiny_model_dir("qwen3_5")
    loaded = adapter_for(folder).load(folder)
    check_answers_equal_hf_generate(pipe, loaded, requests_of_every_size(SIZES))


def test_text_model_is_an_ordinary_causal_lm(tiny_model_dir, tmp_path):
    """For text alone M-RoPE's three streams are one: the LM written for peers is Qwen3.5's own causal LM (its text
    config, the same hybrid layers) with the same logits."""
    check_text_model_is_a_causal_lm(tiny_model_dir("qwen3_5"), tmp_path / "lm", "qwen3_5_text")


def test_moe_split_decoder_equals_hf_and_its_lm_alone(tmp_path):
    """Qwen3.5-MoE (every MLP 4 experts and a gated shared expert; built, served and varied in the sweeps, not here:
    a build is a minute of CI): the split decoder in PyTorch gives Hugging Face's logits for a left-padded prefill of
    two prompts and a decode step after it, row by row, each state its own; the LM alone is Qwen3.5-MoE's causal LM
    with the same logits."""
    import torch

    from tiny_models import make_tiny_qwen2_vl
    from vlm_export.adapters import adapter_for

    folder = make_tiny_qwen2_vl(tmp_path / "moe", family="qwen3_5_moe")
    check_text_model_is_a_causal_lm(folder, tmp_path / "lm", "qwen3_5_moe_text")
    loaded = adapter_for(folder).load(folder)
    scheme = loaded.adapter.scheme(loaded)
    decoder = loaded.adapter.decoder(loaded, scheme).eval()
    spec = scheme.decoder_spec(("fp32",))
    prompts = [[7, 300, 41, 9, 1000], [5, 17, 300]]

    def run(feeds):
        with torch.no_grad():
            out = decoder(*(torch.from_numpy(np.asarray(feeds[t.name])) for t in spec.inputs))
        return {t.name: o.numpy() for t, o in zip(spec.outputs, out)}

    feeds = scheme.prefill_feeds(prompts, scheme.empty_image_input())
    outputs = run(feeds)
    state = scheme.prefill_state(outputs, [len(p) for p in prompts], feeds)
    stepped = run(scheme.step_feeds(state, np.array([11, 12])))
    for row, prompt in enumerate(prompts):
        with torch.no_grad():
            theirs = loaded.model(input_ids=torch.tensor([prompt + [11 + row]])).logits[0]
        np.testing.assert_allclose(outputs["logits"][row, -1], theirs[-2].numpy(), atol=1e-5, rtol=0)
        np.testing.assert_allclose(stepped["logits"][row, -1], theirs[-1].numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("change, needle", [
    ({"layer_types": ["linear_attention", "sliding_attention"]}, "sliding_attention"),
    ({"layer_types": ["linear_attention", "linear_attention"]}, "no attention layer"),
    ({"linear_conv_kernel_dim": 1}, "linear_conv_kernel_dim is 1")])
def test_a_layer_layout_the_decoder_cannot_carry_is_refused(change, needle):
    """Layers of another kind, no attention layer at all, a convolution that keeps nothing: one line each, before
    any export."""
    from transformers import Qwen3_5TextConfig

    from vlm_export.adapters.qwen3_5 import hybrid_geometry

    config = Qwen3_5TextConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, intermediate_size=128, vocab_size=300,
                               layer_types=["linear_attention", "full_attention"])
    for name, value in change.items():
        setattr(config, name, value)
    with pytest.raises(AdapterError, match=needle) as caught:
        hybrid_geometry(config, 512)
    assert "\n" not in str(caught.value)


def test_served_answers_equal_in_process(tiny_build, tmp_path):
    """Served by a real tritonserver over gRPC and HTTP: answers for images of different sizes, two at once, and a
    conversation's second turn (its states rebuilt by a new prefill), equal ``generate``'s in process."""
    check_served_as_in_process(tiny_build("qwen3_5").path, tmp_path, [(40, 52), (70, 20), (10, 10)], over_http=True)


def test_state_bytes_follow_the_geometry(tiny_build):
    """What a row's states take, whatever its length (the bench reports it beside the K/V's)."""
    from vlm_export.contract import DecoderGeometry

    geometry = DecoderGeometry.from_dict(tiny_build("qwen3_5").manifest["scheme"]["geometry"])
    assert geometry.state_bytes(3) == 3 * 4 * 2 * (80 * 3 + 4 * 8 * 12)
    assert DecoderGeometry.from_dict(geometry.to_dict()) == geometry
    assert np.dtype(geometry.states[0].dtype) == np.float32
