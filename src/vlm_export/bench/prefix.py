"""Time to first token with and without the prefix cache (runtime/prefix_cache.py), in process.

Every request brings an image never seen before (a photo shifted by a few pixels: other embeddings,
the same decoding cost), so what the cache can reuse is the prompt's start up to the image (the
chat template's system turn), as for a service's new conversations; a follow-up turn, which reuses
its whole previous prompt, gains far more and is not what is timed here. Each backend runs the same
requests with its pipeline's cache off and on (warmed by one request), in mirrored blocks, one
backend after the other.
"""
from __future__ import annotations

import io
import itertools
from typing import Sequence

import numpy as np

from ..progress import Progress
from ..runtime.generate import GenerationConfig, stream
from ..runtime.pipeline import VLMPipeline
from ..runtime.prefix_cache import PrefixCache
from . import measure

#: tokens per request: the time to first token is what is timed (EOS ignored, so never fewer)
NEW_TOKENS = 2
#: off/on blocks in mirrored order (off on, on off, ...), each after one discarded call
BLOCKS = 4
CACHE_BYTES = 256 << 20


def shifted_photos(names: Sequence[str], count: int) -> list[bytes]:
    """``count`` PNGs, each a skimage photo rolled sideways by a different number of pixels."""
    from PIL import Image
    from skimage import data

    arrays = [np.asarray(Image.fromarray(getattr(data, n)()).convert("RGB")) for n in names]
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(np.roll(arrays[i % len(arrays)], 1 + i // len(arrays), axis=1)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def bench_prefix_cache(pipes: dict[str, VLMPipeline], photo_names: Sequence[str], prompts: Sequence[str],
                       requests: int, progress: Progress) -> dict:
    """Per backend whose decoder can continue a prefill (``VLMPipeline.prefix_keys``): request timings
    with the cache off and on, the time-to-first-token ratio, and the tokens reused per request."""
    able = {}
    for backend, pipe in pipes.items():
        pipe.prefix_cache = PrefixCache(CACHE_BYTES)
        probe = pipe.prompt_ids(prompts[0], 0)
        if pipe.prefix_keys(probe, pipe.scheme.empty_image_input()) is not None:
            able[backend] = pipe
        pipe.prefix_cache = None
    if not able:
        return {}
    per_entry = requests + BLOCKS  # each request's image new, the blocks' warm-up calls included
    photos = iter(shifted_photos(photo_names, per_entry * 2 * len(able) + len(able)))
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    turn = itertools.count()
    caches = {b: PrefixCache(CACHE_BYTES) for b in able}

    def call(backend: str, cached: bool):
        pipe = able[backend]

        def run() -> measure.RequestTiming:
            pipe.prefix_cache = caches[backend] if cached else None
            try:
                return measure.time_request(stream(pipe, prompts[next(turn) % len(prompts)], [next(photos)], config))
            finally:
                pipe.prefix_cache = None
        return run

    out = {}
    for backend in able:  # one backend at a time: another runtime's spinning threads would tilt its blocks
        call(backend, True)()  # the template's start in the cache, as a serving model has it after its first request
        with progress.step(f"prefix cache on {backend}: time to first token, off vs on",
                           total=2 * requests) as advance:
            timings = measure.alternating({"off": call(backend, False), "on": call(backend, True)}, 1, requests,
                                          None, advance, blocks=BLOCKS)
        off, on = (measure.summarize_requests(timings[m]) for m in ("off", "on"))
        cache = caches[backend]
        out[backend] = {"off": off, "on": on, "ttft_ratio": round(off["ttft_ms"]["p50"] / on["ttft_ms"]["p50"], 3),
                        "reused_tokens_per_hit": round(cache.reused_tokens / max(cache.hits, 1), 1),
                        "hits": cache.hits, "misses": cache.misses}
    return out
