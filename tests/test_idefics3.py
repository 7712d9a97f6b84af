"""Idefics3 and SmolVLM: each image cut by its processor into a grid of tiles that follows the image's size, plus
the whole image; the prompt text an image becomes follows that grid (``PromptLayout.image_tiles``) and the image
path's batch is the tiles. The build itself (parity of every stage, HF generate's tokens alone and batched on the
default samples) is test_export_core's, as for every tiny model; here: prompts and pixels equal the processors'
for images of every grid, answers equal HF generate's for them, served answers equal in-process ones, refusals."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import CONVERSATIONS, CONVERSATION_IDS, check_served_as_in_process, photos, random_photo
from vlm_export.errors import AdapterError, InputError

#: (height, width): a wide image (1 x 2 tiles on the Idefics3 fixture), a tall one, a tiny one (scaled up: 2 x 2),
#: a large one, and one of the tiles' own size
SIZES = [(20, 50), (70, 20), (10, 10), (300, 200), (32, 32)]


@pytest.mark.parametrize("turns", CONVERSATIONS, ids=CONVERSATION_IDS)
@pytest.mark.parametrize("first", [0, 1, 3])
def test_prompt_ids_and_pixels_are_idefics3_processors(tiny_build, tiny_model_dir, turns, first):
    """Each image written as Idefics3Processor writes it for its grid (rows of "<fake_token_around_image>
    <row_r_col_c>" + tokens, the whole image last), where the chat template puts it; ids and tiles equal."""
    from transformers import AutoProcessor

    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("idefics3").path)
    processor = AutoProcessor.from_pretrained(tiny_model_dir("idefics3"))
    n = sum(p["type"] == "image" for m in turns for p in m["content"])
    images = photos(SIZES, n, first)
    text = processor.apply_chat_template(turns, add_generation_prompt=True)
    theirs = processor(text=text, images=images or None, return_tensors="np")
    ids = pipe.prompt_ids(turns, images)
    assert ids == theirs["input_ids"][0].tolist()
    if images:
        np.testing.assert_array_equal(pipe.pixel_values(images), theirs["pixel_values"][0])
        assert ids.count(pipe.layout.image_token_id) == len(theirs["pixel_values"][0]) * pipe.layout.tokens_per_image


def test_prompt_ids_and_pixels_are_smolvlms(tiny_build, tiny_model_dir):
    """SmolVLM's processor (which needs torchvision to load, for its video processor) writes each image with
    transformers' own ``get_image_prompt_string`` from its image processor's rows and columns: ours equal them,
    for a raw prompt that writes the image token where each image goes too."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    from vlm_export.runtime.load import open_build

    folder = tiny_model_dir("smolvlm")
    pipe = open_build(tiny_build("smolvlm").path)
    tokenizer, image_processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    seq_len = json.loads((folder / "processor_config.json").read_text())["image_seq_len"]
    images = photos(SIZES, 2, 3)  # two grids of their own
    theirs = image_processor(images=images, return_row_col_info=True, return_tensors="np")
    strings = [get_image_prompt_string(r, c, seq_len, "<fake_token_around_image>", "<image>", "<global-img>")
               for r, c in zip(theirs["rows"][0], theirs["cols"][0])]
    turns = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "or"}, {"type": "image"},
                                          {"type": "text", "text": "which?"}]}]
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    parts = text.split("<image>")
    want = parts[0] + "".join(s + p for s, p in zip(strings, parts[1:]))
    assert pipe.prompt_ids(turns, images) == tokenizer(want)["input_ids"]
    np.testing.assert_array_equal(pipe.pixel_values(images), theirs["pixel_values"][0])
    raw = "A<image>B<image>C"  # no chat template lays it out: the raw prompt as written
    pipe.tokenizer.chat_template = None
    written = "A" + strings[0] + "B" + strings[1] + "C"
    assert pipe.prompt_ids(raw, images) == tokenizer(written)["input_ids"]
    with pytest.raises(InputError, match="write it once where each image goes"):
        pipe.prompt_ids("A<image>B", images)


@pytest.mark.parametrize("splitting,edge", [(True, 64), (True, 96), (True, 100), (False, 64)])
def test_grids_are_what_the_image_processor_cuts(splitting, edge):
    """The grid an image is written with is the grid its preprocessing makes (its tiles: rows x cols + the whole
    image), for 120 random sizes and any longest edge, splitting on or off; never more tiles than the build's
    limit (``max_tiles``, from the largest image: a square of the longest edge). Not the processor's
    ``get_number_of_image_patches``, which says 3 x 4 where it cuts 4 x 4 on some sizes."""
    from transformers import Idefics3ImageProcessorPil

    from vlm_export.adapters.idefics3 import Idefics3Adapter, _largest_grid, _tiles
    from vlm_export.adapters.base import LoadedModel
    from vlm_export.contract import ImageTiles
    from vlm_export.runtime.images import ImageLimits, image_grids

    processor = Idefics3ImageProcessorPil(do_image_splitting=splitting, size={"longest_edge": edge},
                                          max_image_size={"longest_edge": 32})
    tiles = _tiles(max_tiles=1)
    most = ImageTiles.count(_largest_grid(LoadedModel(Idefics3Adapter(), None, None, None, processor, None), tiles))
    rng = np.random.default_rng(edge)
    sizes = [tuple(int(v) for v in rng.integers(2, 400, 2)) for _ in range(120)] + [(edge, edge), (32, 33), (1, 150)]
    images = [random_photo(k, size) for k, size in enumerate(sizes)]
    grids = image_grids(processor, images, ImageLimits(), tiles)
    for image, grid in zip(images, grids):
        out = processor(images=[image], return_row_col_info=True, return_tensors="np")
        assert grid == (out["rows"][0][0], out["cols"][0][0]), image.size
        assert ImageTiles.count(grid) == out["pixel_values"].shape[1] <= most, image.size
    if edge == 100:  # the size where Hugging Face's own size rule and its preprocessing part
        assert processor.get_number_of_image_patches(307, 334, {})[1:] == (3, 4)
        assert image_grids(processor, [random_photo(0, (307, 334))], ImageLimits(), tiles) == [(4, 4)]


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_answers_for_every_grid_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir, name):
    """Prompts whose images make 1 x 2, 2 x 1, 2 x 2 and larger grids (and two images at once): the build's greedy
    answers are Hugging Face generate's on the processor's inputs, alone and decoded together in one batch."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.generate import GenerationConfig, GenerationRequest, generate, generate_batch
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build(name).path)
    folder = tiny_model_dir(name)
    loaded = adapter_for(folder).load(folder)
    config = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    requests = ([(CONVERSATIONS[0], photos(SIZES, 1, k)) for k in range(len(SIZES))]
                + [(CONVERSATIONS[1], photos(SIZES, 2, 2))])
    alone = []
    for turns, images in requests:
        ids = pipe.prompt_ids(turns, images)
        pixels = torch.from_numpy(pipe.pixel_values(images))
        want = loaded.adapter.reference_generate(loaded, torch.tensor([ids]), pixels, 12, [-1])
        alone.append(generate(pipe, turns, images, config).token_ids)
        assert alone[-1] == want, [im.size for im in images]
    batched = generate_batch(pipe, [GenerationRequest(t, i, config) for t, i in requests])
    assert [r.token_ids for r in batched] == alone


def test_the_manifest_and_limits_count_tiles(tiny_build):
    """The limits count the image path's images as tiles (the most one image becomes: a 3 x 3 grid and the whole
    image on the SmolVLM fixture), the layout carries the tiles' texts, and the standard graphs keep to what
    TensorRT documents."""
    from vlm_export.engines.check import check_build

    build = tiny_build("smolvlm").path
    manifest = json.loads((build / "manifest.json").read_text())
    limits, layout = manifest["limits"], manifest["prompt_layout"]
    assert limits["tiles_per_image"] == 10 and limits["tokens_per_image"] == 4
    assert limits["max_image_tokens"] == limits["max_images"] * 10 * 4
    assert limits["max_images_per_batch"] == limits["max_batch"] * limits["max_images"] * 10
    assert layout["image_tiles"]["max_tiles"] == 10 and layout["image_tiles"]["whole"].endswith("<global-img>")
    report = check_build(build)
    assert report.violations == [], report.lines()


def test_a_processor_that_does_not_split_writes_one_tile(tiny_model_dir, tmp_path):
    """With splitting off every image is one tile, written "<fake_token_around_image><global-img>" + tokens +
    "<fake_token_around_image>": ids equal Idefics3Processor's, the limits one tile per image."""
    from transformers import AutoProcessor

    from tiny_models import make_tiny_idefics3
    from vlm_export.adapters import adapter_for
    from vlm_export.adapters.reference import reference_pipeline
    from vlm_export.contract import Limits

    folder = make_tiny_idefics3(tmp_path / "no-split", splitting=False)
    loaded = adapter_for(folder).load(folder)
    layout = loaded.adapter.prompt_layout(loaded)
    assert layout.image_tiles.max_tiles == 1
    pipe = reference_pipeline(loaded, Limits(2, 2, 256, layout.tokens_per_image, layout.image_tiles.max_tiles))
    processor = AutoProcessor.from_pretrained(folder)
    images = photos(SIZES, 2, 2)
    theirs = processor(text=processor.apply_chat_template(CONVERSATIONS[1], add_generation_prompt=True),
                       images=images, return_tensors="np")
    assert pipe.prompt_ids(CONVERSATIONS[1], images) == theirs["input_ids"][0].tolist()
    assert len(pipe.pixel_values(images)) == 2


def test_a_count_instead_of_the_images_is_refused(tiny_build):
    """A tiled build's prompt depends on its images' sizes: a number of images is not enough (none is)."""
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build("idefics3").path)
    with pytest.raises(ValueError, match="pass the images, not their number"):
        pipe.prompt_ids("What is it?", 1)
    assert pipe.prompt_ids("What is it?", 0) == pipe.prompt_ids("What is it?", [])


@pytest.mark.parametrize("edit,said", [
    (lambda folder: _edit(folder / "processor_config.json", lambda c: c.update(image_seq_len=9)),
     "set image_seq_len 4"),
    (lambda folder: _edit(folder / "processor_config.json",
                          lambda c: c["image_processor"].update(max_image_size={"longest_edge": 48})),
     "makes tiles of 48x48"),
    (lambda folder: _edit(folder / "config.json", lambda c: c.update(image_token_id=5)),
     "makes <image> the ids"),
], ids=["image_seq_len", "tile size", "image token"])
def test_checkpoints_that_would_misplace_image_rows_are_refused(tiny_model_dir, tmp_path, edit, said):
    """A processor that writes another count per tile, tiles of another size than the tower's, or an image token
    other than the config's: each refused at load in one line saying what to set."""
    from vlm_export.adapters import adapter_for

    folder = tmp_path / "edited"
    shutil.copytree(tiny_model_dir("idefics3"), folder)
    edit(folder)
    with pytest.raises(AdapterError, match=said) as e:
        adapter_for(folder).load(folder)
    assert "\n" not in str(e.value)


def _edit(path, change) -> None:
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def test_served_answers_equal_in_process(tiny_build, tmp_path):
    """The python repository served by a real tritonserver: three requests at once whose images make different
    grids (one of them two images), over gRPC and HTTP, then a conversation's second turn (a prefill continued
    after a cached prefix), all as ``generate`` answers in process."""
    check_served_as_in_process(tiny_build("smolvlm").path, tmp_path, [(40, 52), (70, 20), (10, 10), (300, 200)],
                               over_http=True)


def test_the_bench_probes_a_tiled_build_with_an_image(tiny_build):
    """The bench's prefix-cache case asks whether the build takes conversations with a probe prompt: an image, not a
    count (the probe failed on a tiled build, whose prompt follows its images' grids)."""
    from vlm_export.bench.prefix import _takes_conversations
    from vlm_export.runtime.load import open_build

    assert _takes_conversations(open_build(tiny_build("idefics3").path))
