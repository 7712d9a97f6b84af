"""Time to first token with and without the prefix cache (runtime/prefix_cache.py), in process.

Every request brings an image never seen before (``served.distinct_requests``: a photo rolled by a
few pixels, so other image rows at the same cost), so what the cache can reuse is the prompt's start up to the image (the
chat template's system turn), as for a service's new conversations. Then the follow-up turn of a
conversation (its first turn with a new image answered untimed, then the timed second turn,
which re-sends the image as chat clients do): the cache can reuse the whole first prompt. Each
backend runs the same requests with its pipeline's cache off and on (warmed by one request), in
mirrored blocks, one backend after the other.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import InputError
from ..progress import Progress
from ..runtime.generate import GenerationConfig, generate, stream
from ..runtime.pipeline import VLMPipeline
from ..runtime.prefix_cache import PrefixCache
from . import measure
from .served import distinct_requests

#: tokens per request: the time to first token is what is timed (EOS ignored, so never fewer)
NEW_TOKENS = 2
#: off/on blocks in mirrored order (off on, on off, ...), each after one discarded call
BLOCKS = 4
CACHE_BYTES = 256 << 20
FOLLOW_UP = "Tell me more about it."
FIRST_ANSWER_TOKENS = 16


def _first_turn(question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]


def bench_prefix_cache(pipes: dict[str, VLMPipeline], originals: Sequence[tuple[str, bytes]], requests: int,
                       progress: Progress) -> dict:
    """Per backend whose decoder can continue a prefill (``VLMPipeline.prefix_keys``): request timings
    with the cache off and on, the time-to-first-token ratio, and the tokens reused per request."""
    able = {}
    for backend, pipe in pipes.items():
        pipe.prefix_cache = PrefixCache(CACHE_BYTES)
        probe = pipe.prompt_ids(originals[0][0], 0)
        if pipe.prefix_keys(probe, pipe.scheme.empty_image_input()) is not None:
            able[backend] = pipe
        pipe.prefix_cache = None
    if not able:
        return {}
    per_entry = requests + BLOCKS  # each request's image new, the blocks' warm-up calls included
    fresh = iter(distinct_requests(list(originals), 2 * (per_entry * 2 * len(able) + len(able))))
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    caches = {b: PrefixCache(CACHE_BYTES) for b in able}

    def new_question(pipe: VLMPipeline) -> measure.RequestTiming:
        prompt, image = next(fresh)
        return measure.time_request(stream(pipe, prompt, [image], config))

    def second_turn(pipe: VLMPipeline, reused: list[int]) -> measure.RequestTiming:
        """A conversation's second turn, timed after its first (answered untimed, same cache setting);
        ``reused`` gets the tokens each cached second turn took from the cache."""
        question, image = next(fresh)
        first = _first_turn(question)
        answer = generate(pipe, first, [image], GenerationConfig(max_new_tokens=FIRST_ANSWER_TOKENS))
        second = first + [{"role": "assistant", "content": answer.text}, {"role": "user", "content": FOLLOW_UP}]
        before = pipe.prefix_cache.reused_tokens if pipe.prefix_cache else None
        timing = measure.time_request(stream(pipe, second, [image], config))
        if before is not None:
            reused.append(pipe.prefix_cache.reused_tokens - before)
        return timing

    out = {}
    for backend, pipe in able.items():  # one at a time: another runtime's spinning threads would tilt its blocks
        cache = caches[backend]
        pipe.prefix_cache = cache  # the template's start in the cache, as a serving model has it after one request
        new_question(pipe)
        pipe.prefix_cache = None
        out[backend] = _off_on(pipe, cache, new_question, f"prefix cache on {backend}: time to first token",
                               requests, progress)
        out[backend].update(reused_tokens_per_hit=round(cache.reused_tokens / max(cache.hits, 1), 1),
                            hits=cache.hits, misses=cache.misses)
        out[backend]["follow_up"] = None
        if _takes_conversations(pipe):
            reused: list[int] = []
            out[backend]["follow_up"] = _off_on(pipe, cache, lambda p: second_turn(p, reused),
                                                f"prefix cache on {backend}: a conversation's second turn",
                                                requests, progress)
            out[backend]["follow_up"]["reused_tokens_per_request"] = round(float(np.mean(reused)), 1) if reused else 0.0
    return out


def _off_on(pipe: VLMPipeline, cache: PrefixCache, request, what: str, requests: int, progress: Progress) -> dict:
    """``request(pipe)`` timed with the pipeline's prefix cache off and on (``cache``), in mirrored
    blocks: both summaries and the TTFT ratio. The pipeline is left without a cache."""
    def run(cached: bool):
        def call() -> measure.RequestTiming:
            pipe.prefix_cache = cache if cached else None
            try:
                return request(pipe)
            finally:
                pipe.prefix_cache = None
        return call

    with progress.step(f"{what}, off vs on", total=2 * requests) as advance:
        timings = measure.alternating({"off": run(False), "on": run(True)}, 1, requests, None, advance, blocks=BLOCKS)
    off, on = (measure.summarize_requests(timings[m]) for m in ("off", "on"))
    return {"off": off, "on": on, "ttft_ratio": round(off["ttft_ms"]["p50"] / on["ttft_ms"]["p50"], 3)}


def _takes_conversations(pipe: VLMPipeline) -> bool:
    """Whether the build's prompts take a conversation (a chat template); the second turn needs one. (An image,
    not a count: a tiled build's prompt follows its image's grid.)"""
    from PIL import Image

    try:
        pipe.prompt_ids(_first_turn("?") + [{"role": "assistant", "content": "."},
                                             {"role": "user", "content": FOLLOW_UP}], [Image.new("RGB", (64, 48))])
    except InputError:
        return False
    return True
