"""HunYuanVL / HunyuanOCR (the ``hunyuan_vl`` adapter): Qwen2-VL's rows of patches (given row-major,
``ImagePatches.raster``) under HunYuanVL's SigLIP tower (a learned position grid resampled bilinearly per image), a
merger that frames each image (a newline row per row of blocks, begin and end rows: ``ImagePatches.framed``), and a
HunYuan dense LM whose rotary reads HunYuanVL's XD-RoPE positions (the ``spliced_xdrope`` scheme). The build itself
(parity of every stage, HF generate's tokens alone and batched on the default samples) is test_export_core's."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import (TWO_IMAGE_TURNS, check_answers_equal_hf_generate, check_patch_rows_equal_hf,
                      check_prefix_cache_equal_a_full_prefill,
                      check_raster_prompt_and_patches_are_the_loaded_processors, check_served_as_in_process,
                      check_text_model_is_a_causal_lm, photos)
from vlm_export.errors import AdapterError

#: (height, width): the largest grid, uneven ones, one below the processor's smallest (scaled up), the smallest grid
#: (one merge block), a square one, a tall one (a newline row per row of blocks) and a wide one
SIZES = [(300, 200), (20, 50), (70, 20), (3, 3), (64, 64), (41, 33), (400, 30), (16, 200)]
#: HunyuanOCR's own usage: an empty system turn, then the image and the instruction
OCR = [{"role": "system", "content": ""},
       {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Extract the text."}]}]
CONVERSATION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A photo."},
                {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]}]


def _load(folder):
    from vlm_export.adapters import adapter_for

    return adapter_for(folder).load(folder)


@pytest.mark.parametrize("turns, count", [(OCR, 1), (TWO_IMAGE_TURNS, 2), (CONVERSATION, 2), ("Read this.", 0)])
def test_prompt_ids_and_pixels_are_the_processors(tiny_build, tiny_model_dir, turns, count):
    """Prompt ids = HunYuanVLProcessor's own on the chat template's text (its BOS and system separator, each image's
    start, ``rows x (cols + 1) + 2`` image tokens and end, the user tag after each user turn; one image, two, a
    conversation, none); the image path's rows of patches hold its patches (given row-major), each at its place."""
    from vlm_export.runtime.load import open_build

    check_raster_prompt_and_patches_are_the_loaded_processors(tiny_model_dir("hunyuan_vl"),
                                                              open_build(tiny_build("hunyuan_vl").path), turns,
                                                              photos(SIZES, count, 6))


def test_image_rows_and_positions_equal_hf(tiny_model_dir):
    """The split tower and projector on a padded batch of images of every size, framed by the scheme, give Hugging
    Face's ``get_image_features`` (begin, the rows of blocks each with its newline, end); the scheme's positions for a
    left-padded prefill of three prompts are ``get_rope_index``'s for each prompt alone (Hugging Face numbers images
    on across a batch's rows; a prompt's own numbering is what it answers alone), and each row's next position is
    its delta's."""
    import torch

    from vlm_export.contract.spliced import PRESENT_STATES, named_states

    loaded = _load(tiny_model_dir("hunyuan_vl"))
    flat, arranged, rows, _ = check_patch_rows_equal_hf(loaded, photos(SIZES, len(SIZES)))
    layout, scheme, cfg = loaded.adapter.prompt_layout(loaded), loaded.adapter.scheme(loaded), loaded.config
    token, start, end = cfg.image_token_id, cfg.im_start_id, cfg.im_end_id
    counts = [layout.image_tiles.tokens(grid) for grid in layout.image_tiles.grids(flat)]
    prompts = [[7, start, *[token] * counts[0], end, 8, 9, start, *[token] * counts[6], end, 10],
               [11, 12],
               [start, *[token] * counts[2], end, 13, start, *[token] * counts[7], end, 14]]
    grids = [[0, 6], [], [2, 7]]
    feeds = scheme.prefill_feeds(prompts, scheme.join_image_inputs([
        scheme.image_input_from_values({"image_embeds": rows[k:k + 1],
                                        **{n: arranged[n][k:k + 1] for n in ("patch_positions", "patch_mask")}})
        for k in (0, 6, 2, 7)]))
    ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    assert feeds["position_ids"].shape == (4, 3, ids.shape[1])
    following = []
    for b, images in enumerate(grids):
        thw = torch.from_numpy(flat["image_grid_thw"][images]) if images else None
        theirs, delta = loaded.model.model.get_rope_index(ids[b:b + 1], (ids[b:b + 1] == token).int(),
                                                          image_grid_thw=thw, attention_mask=mask[b:b + 1])
        real = mask[b].bool().numpy()
        np.testing.assert_array_equal(feeds["position_ids"][:, b, real], theirs.numpy()[:, 0, real])
        following.append(int(delta) + len(prompts[b]))
    outputs = {n: np.zeros((3, 1, len(ids[0]), 1), np.float32) for n in scheme.present_names}
    outputs.update({n: np.zeros((3, *s.shape), np.float32) for n, s in named_states(scheme.geometry, PRESENT_STATES)})
    state = scheme.prefill_state(outputs, [len(p) for p in prompts], feeds)
    np.testing.assert_array_equal(state.positions, following)


def test_answers_for_every_size_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir):
    """Images of every size (tall and wide grids included), alone and two at once, and a conversation: greedy answers
    = Hugging Face generate's (its pixels given back row-major), alone and decoded together in one batch on one KV
    buffer (attention fused)."""
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("hunyuan_vl").path)
    assert pipe.kv_in_place
    loaded = _load(tiny_model_dir("hunyuan_vl"))
    requests = [(OCR, photos(SIZES, 1, k)) for k in range(len(SIZES))]
    check_answers_equal_hf_generate(pipe, loaded, requests + [(TWO_IMAGE_TURNS, photos(SIZES, 2, 5)),
                                                              (CONVERSATION, photos(SIZES, 2, 6)),
                                                              ("Tell me a story.", [])])


@pytest.mark.parametrize("form", ["onnxruntime", "standard"])  # the in-place KV buffer, and the copying path
def test_prefix_cache_answers_and_logits_equal_a_full_prefill(tiny_build, form):
    """XD-RoPE's positions follow from a prefix alone, so a prompt continues from a cached prefix
    (``check_prefix_cache_equal_a_full_prefill``: answers, a conversation's next turn, logits and K/V)."""
    from vlm_export.runtime.load import open_build

    check_prefix_cache_equal_a_full_prefill(open_build(tiny_build("hunyuan_vl").path, form=form), OCR,
                                            [photos(SIZES, 1, k) for k in (0, 6, 7)])


def test_scheme_fusion_and_tensorrt_checks(tiny_build):
    """The build declares the ``spliced_xdrope`` scheme with the LM's four streams and the projector's three framing
    rows in its output dim; both attentions run in ONNX Runtime's kernel (after the graph's own rotary and q/k norms);
    nothing in any graph is known to TensorRT 10's parser as refused."""
    from vlm_export.engines.check import check_build

    build = tiny_build("hunyuan_vl")
    scheme = build.manifest["scheme"]
    assert (scheme["name"], scheme["streams"], scheme["merge"]) == ("spliced_xdrope", 4, 2)
    inputs = {t["name"]: t["shape"] for t in build.manifest["graphs"]["lm_decoder"]["inputs"]}
    assert inputs["position_ids"] == [4, "batch", "sequence"]
    assert build.manifest["graphs"]["lm_decoder"]["fusion"]["fusions"]["attention"] == 2
    assert check_build(build.path).violations == []


def test_served_answers_equal_in_process(tiny_build, tmp_path):
    """Served by a real tritonserver over gRPC (tall, wide and small images, three requests at once, a conversation's
    second turn): every answer ``generate``'s in process - the framing rows and positions made in the served model as
    in process."""
    check_served_as_in_process(tiny_build("hunyuan_vl").path, tmp_path, [(40, 52), (400, 30), (16, 200)])


def test_text_model_is_an_ordinary_causal_lm(tiny_model_dir, tmp_path):
    """For text alone the position streams are one: the LM written for the peers is HunYuan's dense causal LM (its
    NTK-alpha rotary, q/k normed after it) with the same logits and the VLM's tied head."""
    check_text_model_is_a_causal_lm(tiny_model_dir("hunyuan_vl"), tmp_path / "lm", "hunyuan_v1_dense")


def test_most_tokens_per_image_is_the_tallest_grid(tiny_model_dir):
    """A framed image is a token more per row of blocks: the build's most tokens per image is the tallest grid of at
    most the processor's blocks, which a tall strip reaches, and the layout keeps ``framed`` in its manifest form."""
    from vlm_export.contract import ImagePatches, PromptLayout
    from vlm_export.runtime.images import ImageLimits, processed_images

    loaded = _load(tiny_model_dir("hunyuan_vl"))
    layout = loaded.adapter.prompt_layout(loaded)
    patches = layout.image_tiles
    assert patches.framed and patches.max_patches == 144  # 48 x 48 pixels of 4 x 4 patches
    assert layout.tokens_per_image == 36 * (1 + 1) + 2  # 36 blocks in one column
    flat = processed_images(loaded.image_processor, [photos([(288, 8)], 1)[0]], ImageLimits())
    assert layout.image_tiles.grids(flat) == [(72, 2)] and layout.image_tokens((72, 2)) == layout.tokens_per_image
    assert PromptLayout.from_dict(layout.to_dict()) == layout and layout.to_dict()["image_tiles"]["framed"] is True
    assert "framed" not in PromptLayout(kind="inline", image_token_id=5, tokens_per_image=4, image_token="<i>",
                                        image_tiles=ImagePatches(merge=2, max_patches=16)).to_dict()["image_tiles"]


def test_a_checkpoint_in_hunyuanocr_1_0s_layout_loads_alike(tiny_model_dir, tmp_path):
    """HunyuanOCR 1.0's files: a flat config.json (the LM's settings at the top under their legacy names -
    ``attention_head_dim``, ``pad_id``, ``org_vocab_size``, ``rope_scaling`` of type "xdrope" with ``xdrope_section``)
    and a preprocessor_config.json of ``min_pixels`` / ``max_pixels``: the same layout, scheme and logits as the nested
    form's."""
    import shutil

    import torch

    nested = tiny_model_dir("hunyuan_vl")
    folder = tmp_path / "flat"
    shutil.copytree(nested, folder)
    cfg = json.loads((folder / "config.json").read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    legacy = {"attention_head_dim": text.pop("head_dim"), "pad_id": text.pop("pad_token_id"),
              "org_vocab_size": text.pop("vocab_size"), "rope_theta": rope.pop("rope_theta"),
              "rope_scaling": {**rope, "type": "xdrope", "xdrope_section": rope.pop("mrope_section")}}
    legacy["rope_scaling"].pop("rope_type")
    (folder / "config.json").write_text(json.dumps({**cfg, **{k: v for k, v in text.items() if k != "model_type"},
                                                    **legacy}))
    processor = json.loads((folder / "processor_config.json").read_text())
    images = processor.pop("image_processor")
    size = images.pop("size")
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {**images, "min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"],
         "image_processor_type": "HunYuanVLImageProcessor", "processor_class": "HunYuanVLProcessor"}))
    (folder / "processor_config.json").write_text(json.dumps(processor))
    ours, theirs = _load(folder), _load(nested)
    adapter = ours.adapter
    assert adapter.prompt_layout(ours) == adapter.prompt_layout(theirs)
    assert adapter.scheme(ours).params() == adapter.scheme(theirs).params()
    ids = torch.tensor([[5, 17, 300, 41, 9, 1000]])
    with torch.no_grad():
        torch.testing.assert_close(ours.model(input_ids=ids).logits, theirs.model(input_ids=ids).logits)


@pytest.mark.parametrize("change, says", [
    (lambda c: c["vision_config"].update(interpolate_mode="bicubic"), "only bilinear"),
    (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[4, 4]), "at least three sections"),
])
def test_unsupported_configurations_are_refused(tiny_model_dir, tmp_path, change, says):
    """A position grid resized otherwise than bilinearly, or fewer than three position streams, is refused at load
    with what to do."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("hunyuan_vl"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    change(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=says):
        _load(folder)


def test_xdrope_positions_by_hand():
    """numpy only: text counts on through an image in every stream; an image's grid rows take (column, row, image
    number) in the last three streams, its begin and end rows stay text; the newline sits past the last column."""
    from vlm_export.contract.xdrope import BEGIN, END, xdrope_positions

    image = [BEGIN, (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), END]  # 2 x 2 blocks, each row's newline
    ids = [1, 2, *[9] * 8, 3, *[9] * 8]
    out = xdrope_positions(ids, 9, np.asarray(image + image), 4)
    np.testing.assert_array_equal(out[0], np.arange(19))
    np.testing.assert_array_equal(out[1:, 2], [2, 2, 2])  # begin: text
    np.testing.assert_array_equal(out[1:, 3:9].T, [[0, 0, 0], [1, 0, 0], [2, 0, 0], [0, 1, 0], [1, 1, 0], [2, 1, 0]])
    np.testing.assert_array_equal(out[1:, 9], [9, 9, 9])  # end: text
    np.testing.assert_array_equal(out[1:, 12:18].T[:, 2], [1] * 6)  # the second image
