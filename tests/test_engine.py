"""In-flight batching in-process: one scheduler loop over requests submitted from many threads,
answers equal to one-at-a-time generation, cancellation within one step, back-pressure, and a
clean close."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from vlm_export.errors import BusyError, InputError, RunnerError, ServeError
from vlm_export.runtime.engine import Cancelled, GenerationEngine
from vlm_export.runtime.generate import GenerationConfig, GenerationResult, TokenEvent, generate
from vlm_export.runtime.load import open_build
from conftest import pipeline_failing_on  # noqa: E402


class Collector:
    """A request's callback: every event, and a flag when its last one arrived."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, event):
        self.events.append(event)
        if not isinstance(event, TokenEvent):
            self.done.set()

    @property
    def final(self):
        assert self.done.wait(120), "no final event"
        return self.events[-1]


@pytest.fixture(scope="module")
def pipe(tiny_build):
    return open_build(tiny_build("llava-llama").path)


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    from PIL import Image

    return Image.fromarray(data.chelsea()).convert("RGB")


def test_concurrent_requests_equal_one_at_a_time(pipe, photo):
    prompts = [("What animal is this?", [photo], GenerationConfig(max_new_tokens=10)),
               ("Tell me a story.", [], GenerationConfig(max_new_tokens=24)),
               ("Hi", [], GenerationConfig(max_new_tokens=6, temperature=1.1, seed=5)),
               ("Describe it.", [photo], GenerationConfig(max_new_tokens=14, stop=("a",)))] * 2
    alone = [generate(pipe, p, i, c) for p, i, c in prompts]
    engine = GenerationEngine(pipe, max_batch=3)
    collectors = [Collector() for _ in prompts]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda a: engine.submit(*a[0], on_event=a[1]), zip(prompts, collectors)))
    finals = [c.final for c in collectors]
    engine.close()
    assert [f.token_ids for f in finals] == [r.token_ids for r in alone]
    assert [f.text for f in finals] == [r.text for r in alone]
    for c, f in zip(collectors, finals):  # the streamed pieces add up to the final text
        assert "".join(e.text for e in c.events if isinstance(e, TokenEvent)) == f.text
    assert engine.stats.finished == len(prompts) and engine.stats.waiting == 0
    assert engine.stats.tokens == sum(len(r.token_ids) for r in alone)


def test_cancelled_row_stops_within_one_step_and_frees_its_place(pipe):
    engine = GenerationEngine(pipe, max_batch=2)
    flag = threading.Event()
    seen_at_cancel = []
    victim = Collector()

    def on_event(event):
        victim(event)
        if isinstance(event, TokenEvent) and len(victim.events) == 3:
            seen_at_cancel.append(engine.stats.steps)
            flag.set()

    engine.submit("Tell me a long story.", [], GenerationConfig(max_new_tokens=200, ignore_eos=True), on_event,
                  is_cancelled=flag.is_set)
    other = Collector()
    engine.submit("Hi", [], GenerationConfig(max_new_tokens=30, ignore_eos=True), other)
    assert isinstance(victim.final, Cancelled)
    tokens_after = [e for e in victim.events[3:] if isinstance(e, TokenEvent)]
    assert len(tokens_after) <= 1  # the cancel is seen before the next step's events
    assert other.final.completion_tokens == 30  # the other row went on
    engine.close()
    assert engine.stats.cancelled == 1 and engine.stats.running == 0


def test_queue_limit_refuses_at_once_and_serving_goes_on(pipe):
    engine = GenerationEngine(pipe, max_batch=1, max_queue=2)
    long = GenerationConfig(max_new_tokens=60, ignore_eos=True)
    accepted, refused = [], 0
    for _ in range(6):
        c = Collector()
        try:
            engine.submit("Tell me a story.", [], long, c)
            accepted.append(c)
        except BusyError as e:
            assert "retry" in str(e)
            refused += 1
    # the batch's one place and max_queue behind it, whether or not the loop has taken the first in yet
    assert (len(accepted), refused) == (3, 3) and engine.stats.refused == refused
    assert all(isinstance(c.final, GenerationResult) for c in accepted)
    good = Collector()
    engine.submit("Hi", [], GenerationConfig(max_new_tokens=4), good)
    assert good.final.completion_tokens >= 1
    engine.close()


def test_bad_requests_end_with_their_error_only(pipe):
    engine = GenerationEngine(pipe)
    bad, good = Collector(), Collector()
    engine.submit("Hi", [b"not an image"], GenerationConfig(), bad)
    engine.submit("Hi", [], GenerationConfig(max_new_tokens=4000), Collector())  # over max_sequence
    engine.submit("Hi", [], GenerationConfig(max_new_tokens=3), good)
    assert isinstance(bad.final, InputError) and "cannot be decoded" in str(bad.final)
    assert isinstance(good.final, GenerationResult)
    engine.close()
    with pytest.raises(ServeError, match="shutting down"):
        engine.submit("Hi", [], GenerationConfig(), Collector())


def test_close_ends_unfinished_requests_with_a_clear_error(pipe):
    engine = GenerationEngine(pipe, max_batch=1)
    c = Collector()
    engine.submit("Tell me a story.", [], GenerationConfig(max_new_tokens=200, ignore_eos=True), c)
    engine.close(drain_s=0.0)
    assert isinstance(c.final, ServeError) and "shut down" in str(c.final)


def test_image_cache_lru_by_content_and_bytes():
    import numpy as np

    from vlm_export.runtime.image_cache import ImageEmbeddingCache, image_key

    cache = ImageEmbeddingCache(max_bytes=3 * 400)
    rows = {k: np.full((10, 10), i, np.float32) for i, k in enumerate("abcd")}  # 400 bytes each
    for k in "abc":
        cache.put(k, rows[k])
    assert cache.get("a") is rows["a"]  # a is now the most recent
    cache.put("d", rows["d"])  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("c") is rows["c"] and cache.bytes == 1200
    assert (cache.hits, cache.misses) == (2, 1)
    cache.put("huge", np.zeros(1000, np.float32))  # larger than the cache: not kept, nothing evicted
    assert cache.get("huge") is None and cache.get("a") is rows["a"]
    assert image_key(b"\x89PNG same") == image_key(bytearray(b"\x89PNG same")) != image_key(b"\x89PNG other")


def test_engine_image_cache_hits_repeated_images_with_the_same_answers(pipe, photo, tmp_path):
    from vlm_export.runtime.image_cache import ImageEmbeddingCache

    path = tmp_path / "cat.png"
    photo.save(path)
    config = GenerationConfig(max_new_tokens=8)
    expected = [generate(pipe, "What is it?", [photo], config), generate(pipe, "Two?", [photo, photo], config)]
    engine = GenerationEngine(pipe, image_cache=ImageEmbeddingCache(64 << 20))
    got = []
    for prompt, images in (("What is it?", [path]), ("What is it?", [path.read_bytes()]), ("Two?", [path, path])):
        c = Collector()
        engine.submit(prompt, images, config, c)
        got.append(c.final)
    engine.close()
    assert [r.token_ids for r in got] == [expected[0].token_ids, expected[0].token_ids, expected[1].token_ids]
    assert (engine.stats.image_cache_misses, engine.stats.image_cache_hits) == (1, 3)


def test_a_failing_prefill_ends_its_own_request_only(pipe):
    """A decoder failure on one request's prefill (an injected fault around the real runner)
    ends that request with the error; the rows already running finish normally."""
    faulty = pipeline_failing_on(pipe)
    engine = GenerationEngine(faulty, max_batch=2)
    good, bad = Collector(), Collector()
    engine.submit("Tell me a story.", [], GenerationConfig(max_new_tokens=20, ignore_eos=True), good)
    engine.submit("poison", [], GenerationConfig(max_new_tokens=5), bad)
    assert isinstance(bad.final, RunnerError) and "injected" in str(bad.final)
    assert isinstance(good.final, GenerationResult) and good.final.completion_tokens == 20
    engine.close()


def test_engine_prefix_cache_keys_made_while_preparing(tiny_build, photo):
    """With the pipeline's prefix cache, concurrent requests give the answers they give alone, the
    keys come from the preparing threads (the loop never makes them), and the stats count the reuse."""
    from vlm_export.runtime.prefix_cache import PrefixCache

    pipe = open_build(tiny_build("llava-llama").path)
    prompts = [("What animal is this?", [photo], GenerationConfig(max_new_tokens=10)),
               ("Describe it.", [photo], GenerationConfig(max_new_tokens=8)),
               ("Hi", [], GenerationConfig(max_new_tokens=6))] * 2
    alone = [generate(pipe, p, i, c).token_ids for p, i, c in prompts]
    pipe.prefix_cache = PrefixCache(64 << 20)
    made_on = set()
    keys = pipe.prefix_keys
    pipe.prefix_keys = lambda *a: (made_on.add(threading.current_thread().name), keys(*a))[1]
    engine = GenerationEngine(pipe, max_batch=2)
    collectors = [Collector() for _ in prompts]
    for (p, i, c), collector in zip(prompts, collectors):
        engine.submit(p, i, c, on_event=collector)
    finals = [c.final for c in collectors]
    engine.close()
    assert [f.token_ids for f in finals] == alone
    assert made_on and all(name.startswith("vlm-prepare") for name in made_on)
    assert engine.stats.prefix_cache_hits >= 3 and engine.stats.prefix_cache_reused_tokens > 0
