"""What in-flight batching can reach on the machine at hand, from costs measured on it.

A request's own work - its preprocessing, image path and prefill - is compute bound: b of them cost b
times one, batched or not (on a model so small that a call's fixed cost dominates, batching them does
save, and the ceiling is then an underestimate). A decode step of b rows reads the weights once, so it
costs far less than b steps of one row. A closed loop of b clients making requests of T tokens is at
best b prefills one after another, then T steps of b rows, against one request's prefill and T one-row
steps:

    ceiling(b) = b (P + T s_1) / (b P + T s_b)

No scheduler beats it; a served sweep below it loses something, one at it loses nothing and only
cheaper prefills, cheaper b-row steps or longer answers raise it (benchmarks/README.md, issue 14).
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Sequence

import numpy as np

from ..contract import DecodeBatch
from ..runtime.generate import GenerationConfig, generate
from ..runtime.pipeline import VLMPipeline
from . import measure


def step_at_same_length(pipe: VLMPipeline, batch: DecodeBatch, token: int) -> Callable[[], object]:
    """A call timing one decode step of ``batch``'s rows (every row fed ``token``) as generation runs it:
    on the one KV buffer written in place where the build can, the same column rewritten each call so
    that every call is a step at the same length; else on the copying cache, kept where the decoder
    keeps it (on the GPU on a GPU run: no host-to-device copy of the cache per step)."""
    tokens = np.full(batch.mask.shape[0], token, np.int64)
    if pipe.kv_in_place:
        state = {"slots": pipe.running(batch, [batch.length + 1] * batch.mask.shape[0])}

        def in_place():
            slots = state["slots"]
            out, bound = pipe.decode_in_place(pipe.scheme.slot_step_feeds(slots, tokens), slots.bound)
            state["slots"] = replace(slots, bound=bound)  # reuse the buffers' binding, as generation does
            return out
        return in_place
    past = set(getattr(pipe.scheme, "past_names", ()))
    feeds = {n: (pipe.decoder.place(v) if n in past else v)
             for n, v in pipe.scheme.step_feeds(batch, tokens).items()}
    return lambda: pipe.decode(feeds)


def step_costs(pipe: VLMPipeline, rows: Sequence[int], past: int, fixed_length: int | None, token: int,
               warmup: int = 3, n: int = 20) -> dict[int, dict]:
    """Latency summary (ms) of one decode step at ``past`` positions for each row count, the counts
    taking turns (``measure.alternating``) so that a busy spell hits all alike."""
    rng = np.random.default_rng(0)  # the values do not change the time
    calls = {str(b): measure.timed(step_at_same_length(pipe, pipe.scheme.synthetic_batch(b, past, rng, fixed_length),
                                                       token)) for b in rows}
    samples = measure.alternating(calls, warmup, n)
    return {int(b): measure.summarize([wall for wall, _ in pairs]) for b, pairs in samples.items()}


def request_cost(pipe: VLMPipeline, requests: Sequence[tuple], warmup: int = 2) -> dict:
    """Latency summary (ms) of one request's own work alone: the first token of a generation -
    preprocessing, image path, prefill past whatever prefix cache the pipeline holds (as served),
    sampling. Each (prompt, image) of ``requests`` is made once, the first ``warmup`` untimed; give
    requests whose images differ as the model sees them (``served.distinct_requests``), or a prefix
    cache reuses a repeated one whole."""
    config = GenerationConfig(max_new_tokens=1, ignore_eos=True)
    walls = []
    for i, (prompt, image) in enumerate(requests):
        start = time.perf_counter()
        generate(pipe, prompt, [image], config)
        if i >= warmup:
            walls.append(time.perf_counter() - start)
    return measure.summarize(walls)


def ceiling(request_ms: float, step_ms: dict[int, float], new_tokens: int, rows: int) -> float:
    """The throughput ratio against one request at a time that no scheduler beats (module docstring)."""
    return rows * (request_ms + new_tokens * step_ms[1]) / (rows * request_ms + new_tokens * step_ms[rows])


def scheduler_ceilings(pipe: VLMPipeline, requests: Sequence[tuple], past: int, fixed_length: int | None,
                       concurrency: Sequence[int], new_tokens: int) -> dict:
    """Each concurrency level's ceiling (``ceiling``) from costs measured here (``requests``: as
    ``request_cost`` takes them): at most ``max_batch`` rows run together, so a level past it is
    bounded as ``max_batch`` is."""
    rows = sorted({1} | {min(c, pipe.limits.max_batch) for c in concurrency})
    prompt = requests[0][0]  # each request is one prompt with one image
    steps = step_costs(pipe, rows, past, fixed_length, pipe.prompt_ids(prompt, [requests[0][1]])[-1])
    request = request_cost(pipe, requests)
    p50 = {b: s["p50"] for b, s in steps.items()}
    return {"request_ms": request, "decode_step_ms": {str(b): s for b, s in steps.items()}, "decode_past": past,
            "new_tokens": new_tokens, "max_batch": pipe.limits.max_batch,
            "levels": {str(c): round(ceiling(request["p50"], p50, new_tokens, min(c, pipe.limits.max_batch)), 3)
                       for c in concurrency}}
