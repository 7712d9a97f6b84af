"""LLaVA-NeXT (and LLaVA-NeXT-Video's image path) and LLaVA-OneVision: each image resized into the best of the config's resolutions and cut into tiles,
plus the whole image (``contract.AnyResTiles``), its rows packed by its size with a newline after each row of its
picture (the ``spliced_anyres`` scheme); OneVision's large pictures shrunk (bilinear). The build itself (parity of
every stage, HF generate's tokens alone and batched on the default samples) is test_export_core's."""
from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import (TWO_IMAGE_TURNS, check_answers_equal_hf_generate, check_served_as_in_process, photos,
                      requests_of_every_size)
from vlm_export.errors import AdapterError

FAMILIES = ["llava_next", "llava_onevision"]
#: the families whose built image path these tests check: LLaVA-NeXT-Video's image path is LLaVA-NeXT's
BUILT = [*FAMILIES, "llava_next_video"]
#: (height, width): wider than every resolution (its picture cut top and bottom), taller (cut left and right),
#: square, smaller than a tile, a thin strip; the last three shrunk by OneVision's (its picture past 2 tiles' rows)
SIZES = [(30, 50), (90, 30), (64, 64), (20, 20), (47, 200), (33, 41), (96, 96), (200, 190)]


def test_best_resolution_is_hfs():
    from transformers.image_processing_utils import select_best_resolution

    from vlm_export.contract.layout import best_resolution

    rng = np.random.default_rng(0)
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-1.6's
    for h, w in rng.integers(1, 2000, (300, 2)):
        assert best_resolution((int(h), int(w)), pinpoints) == tuple(select_best_resolution((h, w), pinpoints))


def test_packing_at_llava_16s_sizes_takes_each_tile_row_once_within_the_limits():
    """LLaVA-1.6's tiles (336 px, 24 x 24 patches) on random sizes: every packed row is one of the image's tiles' rows
    (each taken once) or the newline, as many as the processor's count, never more than the build's limit
    (``most_tokens``: the largest picture, nothing cut back: 2928 rows at 672 x 672)."""
    from vlm_export.contract import AnyResTiles

    tiles = AnyResTiles(tile=336, patches=24, pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)),
                        max_tiles=5)
    assert tiles.most_tokens() == 576 + 48 * 49 == 2928
    rng = np.random.default_rng(1)
    for h, w in [*rng.integers(1, 3000, (100, 2)), (672, 672), (336, 1008)]:
        size = (int(h), int(w))
        rows, weight = tiles.packing(size)
        assert rows.shape[1] == 1 and (weight == 1).all()  # no picture shrunk (LLaVA-NeXT's): rows as they are
        rows = rows[:, 0]
        unit = 24 * 24 + 1
        assert len(rows) == tiles.tokens(size) <= tiles.most_tokens()
        picture = rows[rows % unit != unit - 1]
        assert len(set(picture.tolist())) == len(picture) and picture.max() < tiles.count(size) * unit
        assert (rows % unit == unit - 1).sum() == tiles._kept(size)[0]  # a newline per picture row


def test_onevision_packing_at_its_own_sizes_stays_within_the_limits():
    """LLaVA-OneVision's tiles (384 px, 27 x 27 patches, 6 x 6 resolutions, anyres_max_9) on random sizes: every
    shrunk row a weighted sum (weights adding to 1) of its image's own tiles' rows, never more rows than the build's
    limit - which is more than the largest resolution's own (8154), the shrink not being monotonic."""
    from vlm_export.contract import AnyResTiles

    tiles = AnyResTiles(tile=384, patches=27, pinpoints=[[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)],
                        max_tiles=37, picture_tiles=9)
    assert tiles.most_tokens() > max(tiles.tokens(size) for size in tiles.pinpoints) == 8154
    rng = np.random.default_rng(2)
    for h, w in [*rng.integers(1, 4000, (60, 2)), (2304, 2304), (384, 2304), (500, 500)]:
        size = (int(h), int(w))
        index, weight = tiles.packing(size)
        assert len(index) == tiles.tokens(size) <= tiles.most_tokens()
        np.testing.assert_allclose(weight.sum(axis=1), 1, atol=1e-6)
        assert index.min() >= 0 and index.max() < tiles.count(size) * (27 * 27 + 1)


def _processor_tokens(family: str, folder, size) -> int:
    """Image tokens the model's own processor writes for an image of ``size``: LlavaNextProcessor's; for OneVision and
    NeXT-Video, LlavaOnevisionProcessor's and LlavaNextVideoProcessor's own counts over their saved settings (they need
    torchvision to load)."""
    import functools
    import json
    from types import SimpleNamespace

    from PIL import Image
    from transformers import AutoImageProcessor, AutoProcessor, LlavaNextVideoProcessor, LlavaOnevisionProcessor

    if family == "llava_next":
        processor = AutoProcessor.from_pretrained(folder)
        ids = processor(text="<image>", images=Image.new("RGB", size[::-1]))["input_ids"][0]
        return sum(1 for i in ids if i == processor.image_token_id)
    settings = json.loads((folder / "processor_config.json").read_text())
    if family == "llava_next_video":
        ns = SimpleNamespace(image_processor=AutoImageProcessor.from_pretrained(folder), **{
            k: settings[k] for k in ("patch_size", "num_additional_image_tokens", "vision_feature_select_strategy")})
        ns._get_unpadded_features = functools.partial(LlavaNextVideoProcessor._get_unpadded_features, ns)
        tile = ns.image_processor.crop_size["height"]
        tokens = LlavaNextVideoProcessor._get_number_of_features(ns, *size, tile, tile)
        return tokens - (ns.vision_feature_select_strategy == "default")
    ns = SimpleNamespace(image_processor=AutoImageProcessor.from_pretrained(folder), **{
        k: settings[k] for k in ("num_image_tokens", "vision_aspect_ratio", "vision_feature_select_strategy")})
    ns._get_unpadded_features = functools.partial(LlavaOnevisionProcessor._get_unpadded_features, ns)
    tile = ns.image_processor.size["height"]
    return LlavaOnevisionProcessor._get_number_of_features(ns, *size, tile, tile)


@pytest.mark.parametrize("family", BUILT)
def test_rows_and_token_counts_are_hfs(tiny_model_dir, family):
    """Images of every size in one batch: the image path's tiles through the split tower and projector, packed by the
    scheme, are the model's get_image_features rows (OneVision's shrunk pictures included); each image is as many
    tokens as the model's processor writes."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.images import ImageLimits, processed_images

    folder = tiny_model_dir(family)
    loaded = adapter_for(folder).load(folder)
    adapter, cfg = loaded.adapter, loaded.config
    layout, scheme = adapter.prompt_layout(loaded), adapter.scheme(loaded)
    images = photos(SIZES, len(SIZES))
    # each image as its prompt's one (OneVision tiles only those; get_image_features' default treats them so)
    theirs = processed_images(loaded.image_processor, images, ImageLimits(), replace(layout.image_tiles, one_prompt=False))
    arranged = layout.image_tiles.arranged(dict(theirs))
    # the processor's padding between images dropped: each image's own tiles, in order
    counts = [layout.image_tiles.count(s) for s in SIZES]
    assert len(arranged["pixel_values"]) == sum(counts) < theirs["pixel_values"].shape[0] * max(counts)
    vision, projector = adapter.stages(loaded)[:2]
    with torch.no_grad():
        rows = projector.module(vision.module(torch.from_numpy(arranged["pixel_values"]))).numpy()
        want = loaded.model.model.get_image_features(
            pixel_values=torch.from_numpy(theirs["pixel_values"]), image_sizes=torch.from_numpy(theirs["image_sizes"]),
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output
    packed = scheme.image_input_from_values({"image_embeds": rows, "image_sizes": arranged["image_sizes"]})
    np.testing.assert_allclose(packed, torch.cat(list(want)).numpy(), atol=2e-5, rtol=0)
    shrunk = [layout.image_tiles.packing(s)[0].shape[1] == 4 for s in SIZES]
    assert any(shrunk) == (family == "llava_onevision")
    grids = layout.image_tiles.grids(theirs)
    assert grids == SIZES
    for k, size in enumerate(SIZES):
        assert _processor_tokens(family, folder, size) == layout.image_tokens(size) == len(want[k])


def test_conversation_ids_are_llava_next_processors(tiny_model_dir):
    from transformers import AutoProcessor

    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.prompt import build_prompt_ids

    folder = tiny_model_dir("llava_next")
    loaded = adapter_for(folder).load(folder)
    layout = loaded.adapter.prompt_layout(loaded)
    processor = AutoProcessor.from_pretrained(folder)
    images = photos(SIZES, 2, 1)
    text = processor.apply_chat_template(TWO_IMAGE_TURNS, add_generation_prompt=True)
    ids = build_prompt_ids(loaded.tokenizer, layout, TWO_IMAGE_TURNS, 2, [im.size[::-1] for im in images])
    assert ids == list(processor(text=text, images=images)["input_ids"][0])


@pytest.mark.parametrize("family", BUILT)
def test_answers_for_every_size_equal_hf_generate_alone_and_batched(tiny_build, tiny_model_dir, family):
    """Images of every size, alone and two at once: greedy answers = Hugging Face generate's, alone and decoded
    together in one batch on one KV buffer. The build's limits hold its largest image's rows (a 64 x 64 one: 2 x 2 tiles, 88 rows,
    more than its 5 tiles x 17 rows). OneVision's two images in one prompt are one tile each (padded to squares)."""
    from vlm_export.adapters import adapter_for
    from vlm_export.runtime.load import open_build

    pipe = open_build(tiny_build(family).path)
    most = {"llava_next": 88, "llava_next_video": 88, "llava_onevision": 56}[family]
    assert pipe.limits.max_image_tokens == pipe.limits.max_images * most
    # TensorRT's prefill profile: up to every row's images, its optimum at a prompt of one (largest) image
    assert pipe.scheme.dim_ranges(pipe.limits)[0]["image_tokens"] == (0, most, most * pipe.limits.max_images
                                                                      * pipe.limits.max_batch)
    if family == "llava_onevision":  # several images in a prompt: each one tile, its rows and a newline
        assert [pipe.layout.image_tokens(g) for g in pipe.pixel_values_and_grids(photos(SIZES, 2, 3))[1]] == [17, 17]
    assert pipe.kv_in_place  # the fused form, decoding on one KV buffer written in place
    folder = tiny_model_dir(family)
    loaded = adapter_for(folder).load(folder)
    check_answers_equal_hf_generate(pipe, loaded, requests_of_every_size(SIZES))


def _edited(tiny_model_dir, tmp_path, file: str, **changes):
    folder = tmp_path / "edited"
    shutil.copytree(tiny_model_dir("llava_next"), folder)
    settings = json.loads((folder / file).read_text())
    (folder / file).write_text(json.dumps({**settings, **changes}))
    return folder


def test_checkpoints_hugging_face_refuses_are_refused(tiny_model_dir, tmp_path):
    """Each in one line, before any export: an image processor that tiles by other resolutions than the model
    packs, a processor that counts another number of image tokens, a tower whose CLS row is kept."""
    from vlm_export.adapters import adapter_for

    folder = tiny_model_dir("llava_next")
    processor = json.loads((folder / "processor_config.json").read_text())
    cases = [
        ("processor_config.json", {"image_processor": {**processor["image_processor"],
                                                       "image_grid_pinpoints": [[32, 64], [64, 32]]}},
         r"tiles images into \[\[32, 64\], \[64, 32\]\] but the model packs them as"),
        ("processor_config.json", {"num_additional_image_tokens": 0}, r"writes \d+ image tokens for a 53x32 image"),
        ("config.json", {"vision_feature_select_strategy": "full"}, r"gives 17 features per tile .* not its 16 patches"),
    ]
    for k, (file, changes, message) in enumerate(cases):
        edited = _edited(tiny_model_dir, tmp_path / str(k), file, **changes)
        with pytest.raises(AdapterError, match=message) as e:
            adapter_for(edited).load(edited)
        assert "\n" not in str(e.value)


def test_onevision_checkpoints_hugging_face_refuses_are_refused(tiny_model_dir, tmp_path):
    """In one line, before any export: a processor that shrinks pictures to another size than the model, a
    vision_aspect_ratio that is not anyres_max_N."""
    import shutil

    from vlm_export.adapters import adapter_for

    cases = [("processor_config.json", {"vision_aspect_ratio": "anyres_max_9"},
              r"has vision_aspect_ratio 'anyres_max_9' but the model's is 'anyres_max_2'"),
             ("config.json", {"vision_aspect_ratio": "anyres"}, r"vision_aspect_ratio 'anyres' in .* is not 'anyres_max_N'")]
    for k, (file, changes, message) in enumerate(cases):
        folder = tmp_path / str(k)
        shutil.copytree(tiny_model_dir("llava_onevision"), folder)
        settings = json.loads((folder / file).read_text())
        (folder / file).write_text(json.dumps({**settings, **changes}))
        with pytest.raises(AdapterError, match=message) as e:
            adapter_for(folder).load(folder)
        assert "\n" not in str(e.value)


def test_served_answers_and_image_encoder_equal_in_process(tiny_build, tmp_path):
    """Served by a real tritonserver, over gRPC and HTTP (base64 images): answers for images of different sizes (other
    tile counts), two at once, and a conversation's second turn, equal ``generate``'s in process. And the repository's
    image_encoder ensemble, called on its own with encoded images: the preprocess model cuts them as the processor
    does (its options) and hands back each image's size beside the tiles' rows, from which the scheme packs what
    ``encode_images`` packs in process."""
    import tritonclient.grpc as grpcclient

    from vlm_export.runtime.load import open_build

    build = tiny_build("llava_next").path
    pipe = open_build(build)
    sizes = [(40, 52), (70, 20), (10, 10)]

    def image_encoder(server, paths):
        raw = grpcclient.InferenceServerClient(server.grpc_url)
        for sent in ([paths[0]], paths[:2]):
            images = grpcclient.InferInput("images", [len(sent), 1], "BYTES")
            images.set_data_from_numpy(np.array([[p.read_bytes()] for p in sent], dtype=np.object_))
            served = raw.infer("image_encoder", [images])
            values = {name: served.as_numpy(name) for name in pipe.scheme.image_input_sources}
            np.testing.assert_array_equal(values["image_sizes"], [[h, w] for h, w in sizes[:len(sent)]])
            np.testing.assert_allclose(pipe.scheme.image_input_from_values(values),
                                       pipe.encode_images(pipe.pixel_values(sent)), atol=1e-5, rtol=0)

    check_served_as_in_process(build, tmp_path, sizes, over_http=True, also=image_encoder)


@pytest.mark.parametrize("family", FAMILIES)
def test_packing_at_real_sizes_is_pack_image_features(family):
    """At the real checkpoints' sizes (LLaVA-1.6: CLIP-L/336, 24 x 24 patches, 5 resolutions; OneVision: SigLIP at
    384, 27 x 27 patches, 6 x 6 resolutions, anyres_max_9), random rows per tile packed by the scheme equal the
    model's own ``pack_image_features`` on them (Hugging Face's code, on a stand-in config), shrunk pictures
    included."""
    from types import SimpleNamespace

    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    from vlm_export.contract import AnyResTiles, DecoderGeometry
    from vlm_export.contract.anyres import AnyResSplicedScheme

    if family == "llava_next":
        tile, patches, pinpoints, aspect = 336, 24, [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], None
    else:
        tile, patches, aspect = 384, 27, "anyres_max_9"
        pinpoints = [[384 * a, 384 * b] for a in range(1, 7) for b in range(1, 7)]
    tiles = AnyResTiles(tile=tile, patches=patches, pinpoints=pinpoints, max_tiles=37,
                        picture_tiles=9 if aspect else 0)
    hidden = 4
    scheme = AnyResSplicedScheme(DecoderGeometry(num_layers=1, num_kv_heads=1, head_dim=4, hidden_size=hidden,
                                                 vocab_size=10, max_position_embeddings=None), 5, tiles)
    model = SimpleNamespace(config=SimpleNamespace(image_grid_pinpoints=pinpoints, vision_config=SimpleNamespace(
        image_size=tile, patch_size=tile // patches)))
    newline = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(3)
    sizes = [(int(h), int(w)) for h, w in rng.integers(50, 3000, (12, 2))] + [(768, 2304), (2304, 2304), (300, 4000)]
    for size in sizes:
        rows = torch.from_numpy(rng.standard_normal((tiles.count(size), patches ** 2, hidden)).astype(np.float32))
        with torch.no_grad():
            if aspect:
                want, _ = LlavaOnevisionModel.pack_image_features(model, [rows], torch.tensor([size]), newline, aspect)
            else:
                want, _ = LlavaNextModel.pack_image_features(model, [rows], torch.tensor([size]), "default", newline)
        embeds = torch.cat([rows, newline.expand(len(rows), 1, hidden)], dim=1).numpy()  # the projector stage's
        packed = scheme.image_input_from_values({"image_embeds": embeds, "image_sizes": np.array([size])})
        assert packed.shape == tuple(want[0].shape) and len(packed) == tiles.tokens(size), size
        np.testing.assert_allclose(packed, want[0].numpy(), atol=2e-6, rtol=0)  # float32 sums of 4 products
