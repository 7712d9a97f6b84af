"""Gemma 3 (Gemma3ForConditionalGeneration): the prompt as its own processor makes it, an image's soft tokens
attending to each other both ways in the prefill (as Hugging Face's token_type_ids make them), the fusion pass
and the prefix cache told so. The build itself (parity of every stage, HF generate's tokens alone and batched) is
test_export_core's, as for every tiny model."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import CONVERSATIONS, CONVERSATION_IDS, fp32_gate, random_photo
from vlm_export.errors import AdapterError



def _hf(model_dir):
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    return AutoProcessor.from_pretrained(model_dir), Gemma3ForConditionalGeneration.from_pretrained(model_dir).eval()




@pytest.mark.parametrize("turns", CONVERSATIONS, ids=CONVERSATION_IDS)
def test_prompt_ids_and_pixels_are_the_processors(tiny_build, tiny_model_dir, turns):
    """Each image written as Gemma3Processor writes it ("\\n\\n<start_of_image>", the soft token x N,
    "<end_of_image>\\n\\n"), where its chat template puts it; ids and pixels equal to the processor's."""
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("gemma3").path)
    processor, _ = _hf(tiny_model_dir("gemma3"))
    n = sum(p["type"] == "image" for m in turns for p in m["content"])
    images = [random_photo(i) for i in range(n)]
    theirs = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="np", **({"images": images} if images else {}))
    ids = pipe.prompt_ids(turns, n)
    assert ids == theirs["input_ids"][0].tolist()
    soft = processor.tokenizer.image_token_id
    assert np.array_equal(np.asarray(ids) == soft, theirs["token_type_ids"][0] == 1)  # what HF's mask reads
    assert ids.count(soft) == n * pipe.layout.tokens_per_image
    if images:
        np.testing.assert_array_equal(pipe.pixel_values(images), theirs["pixel_values"])


def test_an_images_tokens_attend_to_each_other_both_ways(tiny_build, tiny_model_dir):
    """The build's prefill logits are Hugging Face's with the processor's token_type_ids (the image blocks'
    mask), not its causal ones: on this model the two differ by far more than the fp32 gate."""
    from vlm_export.runtime.load import open_build

    build = tiny_build("gemma3").path
    processor, model = _hf(tiny_model_dir("gemma3"))
    turns = CONVERSATIONS[1]
    images = [random_photo(3), random_photo(4, (30, 70))]
    inputs = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", images=images)
    with torch.no_grad():
        blocks = model(**inputs).logits[0, -1].numpy()
        causal = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits[0, -1].numpy()
    assert np.abs(blocks - causal).max() > 1e-3
    for form in ("onnxruntime", "standard"):  # the fused graph and the standard one (TensorRT's, run by ONNX Runtime)
        pipe = open_build(build, form=form)
        ids = pipe.prompt_ids(turns, len(images))
        logits, _ = pipe.prefill(ids, pipe.encode_images(pipe.pixel_values(images)))
        np.testing.assert_allclose(logits, blocks, atol=fp32_gate(blocks), rtol=0, err_msg=form)


def test_the_manifest_says_the_attention_is_not_causal(tiny_build):
    """The fusion pass leaves the attention as exported (its kernel masks causally) and says so; the norms
    and rotary still fuse. The geometry and layout carry what serving needs. The standard graph, mask code
    included, keeps to what TensorRT documents (it pads no booleans: the blocks are made in int64)."""
    from vlm_export.engines.check import check_build
    from vlm_export.export.fuse import NOT_CAUSAL

    build = tiny_build("gemma3").path
    report = check_build(build)
    assert report.violations == [], report.lines()
    manifest = json.loads((build / "manifest.json").read_text())
    fusion = manifest["graphs"]["lm_decoder"]["fusion"]
    assert fusion["made"] and fusion["fusions"]["attention"] == 0 and fusion["fusions"]["rotary"] > 0, fusion
    assert f"attention left unfused: {NOT_CAUSAL}" in fusion["notes"]
    assert NOT_CAUSAL in fusion["kv_copied_because"]
    assert manifest["scheme"]["geometry"]["prefill_blocks"] == "images"
    layout = manifest["prompt_layout"]
    assert layout["image_token"] == "<start_of_image>"
    assert layout["image_sequence"] == "\n\n<start_of_image>" + "<image_soft_token>" * 4 + "<end_of_image>\n\n"


def test_a_cached_prefix_holds_all_of_an_image_or_none_of_it():
    """Where an image's tokens attend to each other both ways, each one's K/V depends on the whole image: every
    prefix-cache key of an image digests all of its rows, so another last row changes them all (and nothing
    else); where they do not (LLaVA's), only that row's key changes."""
    from vlm_export.contract import DecoderGeometry
    from vlm_export.contract.spliced import SplicedScheme

    ids = [5, 6, 9, 9, 9, 7, 9, 9, 8]  # two images: three rows, then two
    table = np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    other = table.copy()
    other[2] += 1  # the first image's last row
    geometry = DecoderGeometry(2, 2, 8, 16, 100, 64)
    for blocks, changed in (("images", [2, 3, 4]), ("", [4])):
        scheme = SplicedScheme(DecoderGeometry(**{**geometry.to_dict(), "prefill_blocks": blocks}), 9)
        a, b = scheme.prefix_keys(ids, table), scheme.prefix_keys(ids, other)
        assert np.flatnonzero(a != b).tolist() == changed
        assert (a[[2, 3, 4, 6, 7]] < 0).all() and a[[0, 1, 5, 8]].tolist() == [5, 6, 7, 8]


#: the gemma3-pan-and-scan model's crop settings (conftest's TINY_MODELS), as Hugging Face's processor takes them
PAN_AND_SCAN = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=32, pan_and_scan_max_num_crops=3)
#: photos (height, width) of 3 crops, 2 crops (tall), none (too small to crop) and none (square)
CROPPED = [(32, 96), (80, 36), (40, 52), (33, 33)]


@pytest.mark.parametrize("turns", CONVERSATIONS[:2], ids=CONVERSATION_IDS[:2])
def test_pan_and_scan_writes_and_crops_as_the_processor(tiny_build, tiny_model_dir, turns):
    """With do_pan_and_scan saved, each photo long enough is given whole and as its crops, each one more image and
    one more run of soft tokens in the text Gemma3Processor writes ("Here is the original image ... and here are
    some crops ..."): ids and pixels equal to the processor's called with pan and scan, for photos of 3, 2 and no
    crops, one at a time and two in a prompt."""
    from vlm_export.contract import ImageCrops
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("gemma3-pan-and-scan").path)
    assert isinstance(pipe.layout.image_tiles, ImageCrops) and pipe.limits.tiles_per_image == 4
    processor, _ = _hf(tiny_model_dir("gemma3-pan-and-scan"))
    n = sum(p["type"] == "image" for m in turns for p in m["content"])
    sizes = [CROPPED[k:k + n] for k in range(len(CROPPED) - n + 1)]
    for images in ([random_photo(k, size) for k, size in enumerate(group)] for group in sizes):
        theirs = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="np", images=images, **PAN_AND_SCAN)
        pixels, grids = pipe.pixel_values_and_grids(images)
        ids = pipe.prompt_ids(turns, images, grids)
        assert ids == theirs["input_ids"][0].tolist()
        assert ids == pipe.prompt_ids(turns, images)  # the grids read by preprocessing again
        np.testing.assert_array_equal(pixels, theirs["pixel_values"])
        crops = [{(32, 96): 3, (80, 36): 2}.get(image.size[::-1], 0) for image in images]
        assert [g[1] for g in grids] == crops and len(pixels) == n + sum(crops)
        assert ids.count(processor.tokenizer.image_token_id) == len(pixels) * pipe.layout.tokens_per_image


def test_a_processor_of_another_length_or_no_crops_is_refused(tiny_model_dir, tmp_path):
    """Both would feed the image path other shapes than it takes; each is refused at load in one line saying
    what to set."""
    from vlm_export.adapters import adapter_for

    for name, edit, said in (
        ("no-crops", lambda p: p["image_processor"].update(pan_and_scan_max_num_crops=0), "or do_pan_and_scan false"),
        ("seq-length", lambda p: p.update(image_seq_length=9), "set image_seq_length 4"),
    ):
        folder = tmp_path / name
        shutil.copytree(tiny_model_dir("gemma3-pan-and-scan"), folder)
        config = json.loads((folder / "processor_config.json").read_text())
        edit(config)
        (folder / "processor_config.json").write_text(json.dumps(config))
        with pytest.raises(AdapterError, match=said) as e:
            adapter_for(folder).load(folder)
        assert "\n" not in str(e.value)


def test_a_prefill_after_a_cached_prefix_is_the_whole_prefill(tiny_build):
    """The prefix cache continues a prompt after its first tokens (the template's start, or a whole earlier
    image and text): the image blocks after the cut attend to each other both ways as in one prefill, so the
    logits and K/V are the whole prefill's; and served as requests arrive, with the cache on, every answer is
    the one without it."""
    from vlm_export.runtime.generate import GenerationConfig, GenerationRequest, generate, generate_batch
    from vlm_export.runtime.load import open_build
    from vlm_export.runtime.prefix_cache import PrefixCache

    pipe = open_build(tiny_build("gemma3").path)
    turns = CONVERSATIONS[1]
    images = [random_photo(5), random_photo(6, (64, 20))]
    ids = pipe.prompt_ids(turns, 2)
    image = pipe.encode_images(pipe.pixel_values(images))
    full_logits, full = pipe.prefill(ids, image)
    soft = np.flatnonzero(np.asarray(ids) == pipe.scheme.image_token_id)
    second = soft[np.flatnonzero(np.diff(soft) != 1)[0] + 1]  # the second image's first soft token
    caches = full.row_caches(0)
    for length in (3, int(soft[0]), int(soft[0]) - 2, int(second) - 1, len(ids) - 1):  # never inside an image
        logits, state = pipe.prefill_continuing(pipe.scheme.prefix_state(caches, length), ids, image)
        np.testing.assert_allclose(logits[0], full_logits, rtol=1e-5, atol=1e-5, err_msg=str(length))
        for name in pipe.scheme.past_names:
            np.testing.assert_allclose(state.caches[name], full.caches[name], rtol=1e-5, atol=1e-5)

    config = GenerationConfig(max_new_tokens=8)
    requests = [("What is in the picture?", [random_photo(k)]) for k in range(3)] + [(turns, images)]
    expected = [generate(pipe, p, i, config).token_ids for p, i in requests]
    pipe.prefix_cache = cache = PrefixCache(64 << 20)
    assert [generate(pipe, p, i, config).token_ids for p, i in requests] == expected
    assert [r.token_ids for r in generate_batch(pipe, [GenerationRequest(p, i, config) for p, i in requests])] \
        == expected
    assert cache.hits > 0
