"""The prefix cache (runtime/prefix_cache.py): a prompt that starts as an earlier one did is
prefilled only past the shared part, on that part's cached K/V, with the same answer; keys tell
images apart; the cache keeps to its bytes."""
from __future__ import annotations

import numpy as np
import pytest

from vlm_export.adapters.reference import open_pipeline
from vlm_export.runtime.generate import GenerationConfig, GenerationRequest, generate, generate_batch, generate_ids
from vlm_export.runtime.load import open_build
from vlm_export.runtime.prefix_cache import PrefixCache
from conftest import common_prefix  # noqa: E402

CONFIG = GenerationConfig(max_new_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def photos():
    from PIL import Image
    from skimage import data

    return [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("chelsea", "coffee")]


def _requests(photos):
    return [("What animal is this?", (photos[0],)), ("What is in the cup?", (photos[1],)),
            ("Say hello.", ()), ("What animal is this?", (photos[1],))]


@pytest.mark.parametrize("form", ["onnxruntime", "standard", "torch"])
def test_answers_and_logits_equal_a_full_prefill(tiny_build, photos, form):
    """Fused (GroupQueryAttention on a past) and standard graphs, and the PyTorch reference: with the
    cache the greedy tokens are those without, first sight and repeated, one by one and batched; a
    continued prefill's logits and K/V are a full prefill's."""
    build = tiny_build("llava-llama").path
    pipe = open_pipeline(build, "torch") if form == "torch" else open_build(build, form=form)
    requests = _requests(photos)
    expected = [generate(pipe, p, images, CONFIG).token_ids for p, images in requests]

    pipe.prefix_cache = cache = PrefixCache(64 << 20)
    for _ in range(2):  # first sight (only the template's start is shared), then every prompt again
        assert [generate(pipe, p, images, CONFIG).token_ids for p, images in requests] == expected
    assert cache.hits == 2 * len(requests) - 1 and cache.misses == 1
    batched = generate_batch(pipe, [GenerationRequest(p, images, CONFIG) for p, images in requests])
    assert [r.token_ids for r in batched] == expected

    # prompts of different lengths prefilled together (left-padded) go into the cache as their own
    # real positions: each then continues from all of itself but its last token, with the same answer
    pipe.prefix_cache = cache = PrefixCache(64 << 20)
    batched = generate_batch(pipe, [GenerationRequest(p, images, CONFIG) for p, images in requests],
                             max_prefill_padding=1.0)
    assert [r.token_ids for r in batched] == expected and len(cache) == len(requests)
    for (p, images), result in zip(requests, batched):
        reused = cache.reused_tokens
        assert generate(pipe, p, images, CONFIG).token_ids == result.token_ids
        assert cache.reused_tokens - reused == result.prompt_tokens - 1

    ids = pipe.prompt_ids("What animal is this?", 1)
    image = pipe.encode_images(pipe.pixel_values(photos[:1]))
    full_logits, full = pipe.prefill(ids, image)
    keys = pipe.prefix_keys(ids, image)
    hit = cache.lookup(keys)
    assert hit.length == len(ids) - 1  # all but the last token, whose logits the prefill gives
    for length in (hit.length, 5, len(ids) // 2):  # any cut: before, inside and after the image rows
        logits, state = pipe.prefill_continuing(pipe.scheme.prefix_state(hit.caches, length), ids, image)
        np.testing.assert_allclose(logits[0], full_logits, rtol=1e-5, atol=1e-5)
        for name in pipe.scheme.past_names:
            np.testing.assert_allclose(state.caches[name], full.caches[name], rtol=1e-5, atol=1e-5)


def test_keys_tell_images_apart(tiny_build, photos):
    pipe = open_build(tiny_build("llava-llama").path)
    pipe.prefix_cache = cache = PrefixCache(64 << 20)
    scheme = pipe.scheme
    ids = pipe.prompt_ids("What animal is this?", 1)
    first_image = ids.index(scheme.image_token_id)
    cat = pipe.encode_images(pipe.pixel_values(photos[:1]))
    cup = pipe.encode_images(pipe.pixel_values(photos[1:]))
    a, b = pipe.prefix_keys(ids, cat), pipe.prefix_keys(ids, cup)
    text = [i for i, t in enumerate(ids) if t != scheme.image_token_id]
    assert (a[text] == np.asarray(ids)[text]).all() and (a < 0).sum() == len(cat)
    assert int(np.flatnonzero(a != b)[0]) == first_image  # the same text, another picture: shared up to it

    generate(pipe, "What animal is this?", [photos[0]], CONFIG)
    reused = cache.reused_tokens
    generate(pipe, "What animal is this?", [photos[1]], CONFIG)
    assert cache.reused_tokens - reused == first_image


@pytest.mark.parametrize("form", ["onnxruntime", "standard"])  # the in-place KV buffer, and the copying path
def test_a_conversation_reuses_its_last_turn_and_answer(tiny_build, photos, form):
    """A finished row keeps its prompt's and its answer's K/V: the next turn, which starts with both
    (its image re-sent), prefills only what is new, with the answer it has without the cache."""
    pipe = open_build(tiny_build("llava-llama").path, form=form)
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What animal is this?"}]}]
    first = generate(pipe, turn, [photos[0]], CONFIG)
    follow_up = turn + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Is it big?"}]
    expected = generate(pipe, follow_up, [photos[0]], CONFIG).token_ids
    image = pipe.encode_images(pipe.pixel_values(photos[:1]))
    fed = pipe.prompt_ids(turn, 1) + first.token_ids[:-1]  # the last token was sampled, never decoded
    extended = fed + [7, 8, 9]  # a prompt that starts with the whole of it
    expected_ids = generate_ids(pipe, extended, image, CONFIG)

    pipe.prefix_cache = cache = PrefixCache(64 << 20)
    assert generate(pipe, turn, [photos[0]], CONFIG).token_ids == first.token_ids
    assert len(cache) == 1  # the prompt's entry, replaced by the prompt's and answer's
    reused = cache.reused_tokens
    assert generate(pipe, follow_up, [photos[0]], CONFIG).token_ids == expected
    # the previous prompt, its image and as much of its answer as the template re-tokenizes alike
    assert cache.reused_tokens - reused == common_prefix(pipe.prompt_ids(follow_up, 1), fed) >= first.prompt_tokens
    reused = cache.reused_tokens
    assert generate_ids(pipe, extended, image, CONFIG) == expected_ids
    assert cache.reused_tokens - reused == len(fed)  # all of the answer's decoded tokens

    pipe.prefix_cache = small = PrefixCache(4096)  # smaller than any prompt's K/V: nothing copied or kept
    assert generate(pipe, follow_up, [photos[0]], CONFIG).token_ids == expected and len(small) == 0


def test_no_keys_where_the_decoder_cannot_prefill_on_a_past(tiny_build):
    """A TensorRT engine's prefill profile has an empty past: its pipeline makes no keys (no reuse)."""
    pipe = open_build(tiny_build("llava-llama").path)
    ids = pipe.prompt_ids("Say hello.", 0)
    assert pipe.prefix_keys(ids, pipe.scheme.empty_image_input()) is None  # no cache: off
    pipe.prefix_cache = PrefixCache(1 << 20)
    assert pipe.prefix_keys(ids, pipe.scheme.empty_image_input()) is not None
    pipe.decoder.continues_prefill = False
    assert pipe.prefix_keys(ids, pipe.scheme.empty_image_input()) is None


def _kv(length: int, fill: float = 1.0) -> dict[str, np.ndarray]:
    return {"k": np.full((2, length, 4), fill, np.float32)}  # 32 bytes a position


def test_cache_keeps_to_its_bytes_and_holds_a_conversation_once():
    keys = np.arange(100, dtype=np.int64)
    cache = PrefixCache(max_bytes=(32 + 8) * 250, min_reused=8)
    cache.store(keys[:40], _kv(40))
    cache.store(keys[:60], _kv(60))  # extends the first: replaces it
    assert len(cache) == 1 and cache.bytes == 60 * 40
    cache.store(keys[:50], _kv(50))  # already within the second: nothing new
    assert len(cache) == 1
    hit = cache.lookup(keys[:80])
    assert hit.length == 60 and hit.caches["k"].shape == (2, 60, 4)
    assert cache.lookup(keys[:61]).length == 60  # all but the last token
    assert cache.lookup(np.r_[keys[:5], -keys[5:50]]) is None  # 5 in common: under min_reused
    assert (cache.hits, cache.misses, cache.reused_tokens) == (2, 1, 120)

    other = np.arange(1000, 1200, dtype=np.int64)
    cache.store(other[:100], _kv(100, 2.0))  # 60 + 100 positions: fits
    cache.lookup(keys[:80])  # the first entry is now the most recently used
    cache.store(other[100:200], _kv(100, 3.0))  # 260 positions: the least recently used goes
    assert len(cache) == 2 and cache.bytes <= cache.max_bytes
    assert cache.lookup(other[:100]) is None and cache.lookup(keys[:80]).length == 60
    cache.store(np.arange(300), _kv(300))  # larger than the whole cache: not kept, nothing evicted
    assert len(cache) == 2
    assert cache.admits(250, 32) and not cache.admits(251, 32) and not cache.admits(7, 32)  # asked before copying
    with pytest.raises(ValueError, match="prefix cache size"):
        PrefixCache(-1)


@pytest.mark.parametrize("name", ["prefix-llama", "blip2-opt", "instructblip-llama", "gemma4-causal"])
def test_other_spliced_layouts(tiny_build, photos, name):
    """Images before the text (prefix, BLIP-2), a Q-Former that reads the prompt (InstructBLIP,
    whose image rows change with the question) and Gemma 4's KV-shared layers, which read the K/V their
    producers' kernels write over a cached past: with the cache, the answers of first sight and
    repeats are those without."""
    pipe = open_build(tiny_build(name).path)
    requests = [("What is this?", (photos[0],)), ("Describe it.", (photos[0],)), ("What is this?", (photos[1],))]
    expected = [generate(pipe, p, images, CONFIG).token_ids for p, images in requests]
    pipe.prefix_cache = cache = PrefixCache(64 << 20, min_reused=1)  # these tiny prompts are 8-20 tokens
    for _ in range(2):
        assert [generate(pipe, p, images, CONFIG).token_ids for p, images in requests] == expected
    assert cache.hits >= len(requests)  # every repeat at least
    if pipe.reads_prompt:  # the same image under another question: other rows, so other keys from the image on
        ids = [pipe.prompt_ids(q, 1) for q in ("What is this?", "Describe it.")]
        keys = [pipe.prefix_keys(i, pipe.encode_images(pipe.pixel_values(photos[:1]), prompt=q))
                for i, q in zip(ids, ("What is this?", "Describe it."))]
        first_image = ids[0].index(pipe.scheme.image_token_id)
        assert keys[0][first_image] != keys[1][first_image]
