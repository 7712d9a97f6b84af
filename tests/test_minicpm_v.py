"""MiniCPM-V 4.6 and MiniCPM-OCR (the ``minicpm_v`` adapter): an image as an overview and slices of any size
(``contract.ImageSlices``), a SigLIP tower with a window-attention merger, a 2 x 2 merge MLP, and Qwen3.5's hybrid LM
with plain positions. The build itself (parity of every stage and state, HF generate's tokens alone and batched) is
test_export_core's; MiniCPM-OCR's form (4 patches per token, no window merger) is checked here on its image path."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import TWO_IMAGE_TURNS, check_answers_equal_hf_generate, check_text_model_is_a_causal_lm, photos, \
    requests_of_every_size
from vlm_export.errors import AdapterError

#: (height, width): sliced 2 x 2 (square and large), wide and tall overviews, the smallest, a 2 x 1 grid of slices,
#: odd sizes
SIZES = [(300, 200), (20, 50), (70, 20), (3, 3), (120, 60), (41, 33), (512, 512)]


@pytest.fixture(scope="module")
def ocr_dir(tmp_path_factory):
    """A tiny MiniCPM-OCR (its processor and model in the "4x" form)."""
    from tiny_models import make_tiny_minicpm_v

    return make_tiny_minicpm_v(tmp_path_factory.mktemp("minicpm_ocr"), family="minicpm_ocr")


def _load(folder):
    from vlm_export.adapters import adapter_for

    return adapter_for(folder).load(folder)


def _processor_texts(folder, turns, images, use_image_id: bool = True) -> tuple[str, dict]:
    """The prompt's text as MiniCPMV4_6Processor writes it (its own ``replace_image_token`` over the image processor's
    output, and its ``_prepend_local_ids``; the processor itself needs torchvision to load), and the image processor's
    output."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.minicpmv4_6.processing_minicpmv4_6 import MiniCPMV4_6Processor

    tokenizer, image_processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    theirs = image_processor(images=images, return_tensors="np")
    processor = SimpleNamespace(slice_mode=image_processor.slice_mode, image_token=tokenizer.image_token,
                                **{name: getattr(tokenizer, name) for name in (
                                    "image_start_token", "image_end_token", "slice_start_token", "slice_end_token",
                                    "image_id_start_token", "image_id_end_token")})
    divisor = 4 if image_processor.downsample_mode == "4x" else 16
    strings = [MiniCPMV4_6Processor.replace_image_token(processor, theirs, k, image_token_divisor=divisor)
               for k in range(len(images))]
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    if use_image_id:
        strings = MiniCPMV4_6Processor._prepend_local_ids(processor, [text], strings, tokenizer.image_token)
    parts = text.split(tokenizer.image_token)
    return parts[0] + "".join(s + p for s, p in zip(strings, parts[1:])), theirs


@pytest.mark.parametrize("family", ["minicpm_v", "minicpm_ocr"])
def test_prompt_ids_and_slices_are_the_processors(family, tiny_model_dir, ocr_dir):
    """Each image written as MiniCPMV4_6Processor writes it (its image id, the overview, each row of slices), for two
    images in one turn and for every size; the image path's rows hold the processor's packed patches, every one
    once, and give them back packed as it packs them (the reference's input)."""
    import torch
    from transformers import AutoTokenizer

    from vlm_export.runtime.images import ImageLimits, processed_images
    from vlm_export.runtime.prompt import build_prompt_ids

    folder = tiny_model_dir("minicpm_v") if family == "minicpm_v" else ocr_dir
    loaded = _load(folder)
    layout = loaded.adapter.prompt_layout(loaded)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = []
    for turns, images in [(TWO_IMAGE_TURNS, photos(SIZES, 2, 5)),
                          *(("What is in the picture?", photos(SIZES, 1, k)) for k in range(len(SIZES)))]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": turns}]}] \
            if isinstance(turns, str) else turns
        text, theirs = _processor_texts(folder, messages, images)
        texts.append(text)
        grids = layout.image_tiles.grids(processed_images(loaded.image_processor, images, ImageLimits()))
        assert build_prompt_ids(tokenizer, layout, turns, len(images), grids) == tokenizer(text)["input_ids"]
        rows = layout.image_tiles.arranged(dict(theirs))
        packed = loaded.adapter._reference_pixels(loaded, {k: torch.from_numpy(rows[k]) for k in (
            "pixel_values", "patch_positions", "patch_mask")})
        np.testing.assert_array_equal(packed.numpy(), theirs["pixel_values"])
        assert not rows["pixel_values"][~rows["patch_mask"].astype(bool)].any()
    assert "<image_id>1</image_id><image>" in texts[0]  # the second image of a prompt is numbered 1
    assert "</slice>\n<slice>" in texts[-1]  # rows of slices (the largest image's 2 x 2)


def test_an_image_processor_that_numbers_no_images(tmp_path):
    """``use_image_id`` off (the processor's setting, saved in processor_config.json here): no image ids, as its
    processor writes them."""
    from tiny_models import make_tiny_minicpm_v
    from transformers import AutoTokenizer

    from vlm_export.runtime.images import ImageLimits, image_grids
    from vlm_export.runtime.prompt import build_prompt_ids

    folder = make_tiny_minicpm_v(tmp_path / "m", use_image_id=True)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "MiniCPMV4_6Processor",
                                                              "use_image_id": False}))
    loaded = _load(folder)
    layout = loaded.adapter.prompt_layout(loaded)
    images = photos(SIZES, 2)
    text, _ = _processor_texts(folder, TWO_IMAGE_TURNS, images, use_image_id=False)
    grids = image_grids(loaded.image_processor, images, ImageLimits(), layout.image_tiles)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert build_prompt_ids(tokenizer, layout, TWO_IMAGE_TURNS, 2, grids) == tokenizer(text)["input_ids"]
    assert "<image_id>" not in text


@pytest.mark.parametrize("family", ["minicpm_v", "minicpm_ocr"])
def test_image_rows_equal_hf_for_every_size(family, tiny_model_dir, ocr_dir):
    """The split tower (nearest positions from each patch's place, attention masked to its slice, the window merger on
    consecutive patches) and projector on a padded batch of every size's slices give Hugging Face's
    ``get_image_features``, in the "16x" form and MiniCPM-OCR's "4x" one."""
    loaded = _load(tiny_model_dir("minicpm_v") if family == "minicpm_v" else ocr_dir)
    adapter = loaded.adapter
    layout = adapter.prompt_layout(loaded)
    assert layout.image_tiles.merge == (4 if family == "minicpm_v" else 2)
    ours, flat = _image_rows_equal_hf(loaded, photos(SIZES, len(SIZES)))
    assert len(ours) == sum(layout.image_tokens(grid) for grid in layout.image_tiles.grids(flat))


def _image_rows_equal_hf(loaded, images, stages=None) -> tuple:
    """The split tower and projector (``stages``, else the adapter's) on ``images``' slices, their real rows kept by
    the scheme, = Hugging Face's ``get_image_features``. Returns (the rows, the processor's output)."""
    import torch

    from vlm_export.runtime.images import ImageLimits, processed_images

    layout, scheme = loaded.adapter.prompt_layout(loaded), loaded.adapter.scheme(loaded)
    flat = processed_images(loaded.image_processor, images, ImageLimits())
    rows = layout.image_tiles.arranged(dict(flat))
    vision, projector = stages or loaded.adapter.stages(loaded)[:2]
    with torch.no_grad():
        embeds = projector.module(vision.module(*(torch.from_numpy(rows[t.name]) for t in vision.spec.inputs)))
        theirs = loaded.model.model.get_image_features(torch.from_numpy(flat["pixel_values"]),
                                                       torch.from_numpy(flat["target_sizes"]))
    ours = scheme.image_input_from_values({"image_embeds": embeds.numpy(), "patch_mask": rows["patch_mask"]})
    np.testing.assert_allclose(ours, torch.cat(theirs.pooler_output).numpy(), atol=1e-5, rtol=0)
    return ours, flat


@pytest.mark.parametrize("family", ["minicpm_v", "minicpm_ocr"])
def test_most_patches_bounds_every_image_size(family, tiny_model_dir, ocr_dir):
    """The adapter's most patches per slice (read off the processor's own resizing over every aspect) is at least
    what the processor's slicing makes of any image size up to the longest aspect taken, and no loose bound."""
    from vlm_export.runtime.images import MAX_ASPECT_RATIO

    loaded = _load(tiny_model_dir("minicpm_v") if family == "minicpm_v" else ocr_dir)
    p = loaded.image_processor
    side, patch, mode = p.scale_resolution, p.patch_size, p.downsample_mode
    most = 0
    for h in range(1, 400, 3):
        for w in [*range(1, 400, 3), 200 * h]:
            if max(h, w) > MAX_ASPECT_RATIO * min(h, w):
                continue  # refused before preprocessing
            grid = p.get_sliced_grid((h, w), p.max_slice_nums, side)
            sizes = [p.find_best_resize((h, w), side, patch, mode, allow_upscale=grid is None)]
            if grid is not None:
                rh, rw = p.get_refine_size((h, w), grid, side, patch, mode, allow_upscale=True)
                sizes.append((rh // grid[0], rw // grid[1]))
            most = max(most, *((a // patch) * (b // patch) for a, b in sizes))
    limit = loaded.adapter.prompt_layout(loaded).image_tiles.max_patches
    assert 0.8 * limit <= most <= limit, (most, limit)


def test_answers_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir):
    """Images of every size (up to 2 x 2 slices each), two in one turn, and text alone: greedy answers = Hugging Face
    generate's, alone and decoded together in one batch of left-padded prompts."""
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("minicpm_v").path)
    check_answers_equal_hf_generate(pipe, _load(tiny_model_dir("minicpm_v")), requests_of_every_size(SIZES[:4]))


def test_every_graph_passes_tensorrts_checks(tiny_build):
    """The position lookup (fractions compared with bucket edges), the window merger and the delta-nets: nothing
    TensorRT 10's parser is known to refuse. The tower's output is a token per 2 x 2 patches, a dim of its own, so
    the projector's TensorRT profile spans its real rows (the smallest slice's 4 to the largest's), not the patches'
    (it spanned 16 up: the smallest slice would have been refused)."""
    from vlm_export.contract.profiles import stage_profiles
    from vlm_export.engines.check import check_build

    build = tiny_build("minicpm_v")
    report = check_build(build.path)
    assert report.violations == [], report.violations[:3]
    manifest = build.manifest
    most = manifest["prompt_layout"]["image_tiles"]["max_patches"]
    (profile,) = stage_profiles(manifest, "projector")
    low, _, high = profile["image_features"]
    assert (low[1], high[1]) == (4, most // 4)
    assert [t["shape"][1] for t in manifest["graphs"]["vision_encoder"]["outputs"]] == ["pooled_patches"]


def test_text_model_is_qwen3_5s_causal_lm(tiny_model_dir, tmp_path):
    """The LM written for peers is Qwen3.5's own text causal LM, same logits."""
    check_text_model_is_a_causal_lm(tiny_model_dir("minicpm_v"), tmp_path / "lm", "qwen3_5_text")


@pytest.mark.parametrize("change, needle", [
    ({"merger_times": 2}, "one merge round"),
    ({"insert_layer_id": 7}, "after vision layer 7 of 3"),
    ({"downsample_mode": "4x"}, "downsample_mode 16x but the model takes 4x"),
])
def test_a_model_it_cannot_split_is_refused(change, needle, tiny_model_dir, tmp_path):
    """Merges it does not take, a window merger after no layer, an image processor of the other mode: one line each,
    before any export."""
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir("minicpm_v"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=needle) as caught:
        _load(folder)
    assert "\n" not in str(caught.value)


def test_a_tokenizer_without_the_slice_tokens_is_refused(tiny_model_dir, tmp_path):
    """A tokenizer that names no slice tokens (another model's, saved beside it): one line, before any export."""
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir("minicpm_v"), folder)
    dropped = ("slice_start_token", "slice_end_token")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config = {k: v for k, v in config.items() if k not in dropped}
    config["model_specific_special_tokens"] = {k: v for k, v in config["model_specific_special_tokens"].items()
                                               if k not in dropped}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="names no slice_start_token, slice_end_token"):
        _load(folder)


# ---- MiniCPM-V 4.7: the same image path and LM, positions on a canvas (contract/canvas.py) -----------------------

def test_spread_is_torchs_linspace_rounded():
    """The canvas's evenly spread places = ``torch.linspace(0, size - 1, count).round()`` for every size and count up
    to 120 x 60 (float32, computed from both ends as its CPU kernel does: a float64 linspace rounds some halves the
    other way)."""
    import torch

    from vlm_export.contract.canvas import _spread

    for size in range(1, 121):
        for count in range(1, 61):
            want = torch.linspace(0, size - 1, count).round().long().numpy()
            np.testing.assert_array_equal(_spread(0, size, count), want, err_msg=f"{size} places, {count} tokens")


def test_canvas_positions_equal_hf_get_rope_index(tiny_model_dir):
    """The scheme's positions for prompts of one image of every size (an overview alone, 2 x 1 and 2 x 2 slices with
    their newlines), two images in one turn, a conversation with an answer between its images, and text alone = the
    model's own ``get_rope_index``; and a left-padded prefill of three of them puts each row's positions after its
    padding (the steps after it: the answers' test)."""
    import torch

    from vlm_export.runtime.images import ImageLimits, processed_images
    from vlm_export.runtime.prompt import build_prompt_ids

    loaded = _load(tiny_model_dir("minicpm_v4_7"))
    layout, scheme = loaded.adapter.prompt_layout(loaded), loaded.adapter.scheme(loaded)
    conversation = [TWO_IMAGE_TURNS[0], {"role": "assistant", "content": [{"type": "text", "text": "Two cats."}]},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]}]
    requests = [*(("What is in the picture?", photos(SIZES, 1, k)) for k in range(len(SIZES))),
                (TWO_IMAGE_TURNS, photos(SIZES, 2, 5)), (conversation, photos(SIZES, 3, 4)), ("Hello.", [])]
    rows, inputs = [], []
    for prompt, images in requests:
        flat = processed_images(loaded.image_processor, images, ImageLimits()) if images else None
        grids = layout.image_tiles.grids(flat) if images else []
        ids = build_prompt_ids(loaded.tokenizer, layout, prompt, len(images), grids)
        if images:
            arranged = layout.image_tiles.arranged(dict(flat))
            embeds = np.zeros((*arranged["patch_mask"][:, ::16].shape, 64), np.float32)
            placed = scheme.image_input_from_values({"image_embeds": embeds, **arranged})
        else:
            placed = scheme.empty_image_input()
        t = torch.tensor([ids])
        theirs = loaded.model.model.get_rope_index(
            t, mm_token_type_ids=(t == loaded.config.image_token_id).int(), attention_mask=torch.ones_like(t),
            target_sizes=torch.from_numpy(flat["target_sizes"]) if images else None)[0][:, 0].numpy()
        feeds = scheme.prefill_feeds([ids], placed)
        np.testing.assert_array_equal(feeds["position_ids"][:, 0], theirs, err_msg=str([im.size for im in images]))
        rows.append(ids)
        inputs.append((placed, theirs))
    picked = [0, len(SIZES), len(SIZES) + 1]  # one image, two images, the conversation: left-padded together
    feeds = scheme.prefill_feeds([rows[k] for k in picked], scheme.join_image_inputs([inputs[k][0] for k in picked]))
    width = feeds["position_ids"].shape[-1]
    for b, k in enumerate(picked):
        np.testing.assert_array_equal(feeds["position_ids"][:, b, width - len(rows[k]):], inputs[k][1])


def test_canvas_answers_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir):
    """MiniCPM-V 4.7: images of every size, two in one turn, and text alone: greedy answers = Hugging Face generate's
    (its canvas positions from ``mm_token_type_ids``), alone and decoded together in one batch."""
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("minicpm_v4_7").path)
    assert pipe.scheme.name == "spliced_mrope_canvas"
    check_answers_equal_hf_generate(pipe, _load(tiny_model_dir("minicpm_v4_7")), requests_of_every_size(SIZES[:4]))


def test_a_model_without_its_canvas_markers_is_refused(tiny_model_dir, tmp_path):
    """A MiniCPM-V 4.7 config that stores no marker ids (the canvas is placed by them): one line, before any export."""
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir("minicpm_v4_7"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["newline_id"] = None
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="sets no newline_id") as caught:
        _load(folder)
    assert "\n" not in str(caught.value)


def test_a_position_table_whose_edges_round_up_exports_and_infers(tmp_path):
    """A position table of side 3: Hugging Face's float arange makes it 3 bucket edges (1/3 + 2/3 rounds under 1), and
    the tower holds exactly those (a traced arange's length was worked out exactly, 2, and ONNX shape inference - run
    by the int8 quantizer - refused the graph). The vision stage exports, passes strict shape inference, and its
    positions are Hugging Face's."""
    import onnx
    import torch

    from tiny_models import make_tiny_minicpm_v
    from vlm_export.export.onnx_export import export_stage

    folder = make_tiny_minicpm_v(tmp_path / "m", vision_sizes={"image_size": 12})  # 3 x 3 positions of 4 px patches
    loaded = _load(folder)
    vision, projector = loaded.adapter.stages(loaded)[:2]
    assert vision.module.edges.tolist() == torch.arange(1 / 3, 1.0, 1 / 3).tolist() and len(vision.module.edges) == 3
    path = export_stage(vision, tmp_path / "graphs")
    onnx.shape_inference.infer_shapes_path(str(path), str(tmp_path / "inferred.onnx"), strict_mode=True)
    _image_rows_equal_hf(loaded, photos(SIZES, 3), (vision, projector))
