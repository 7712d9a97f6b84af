"""The served path: the build's python-target Triton repository on a real local tritonserver,
measured through ``VLMClient`` (gRPC streaming, loopback), at several concurrency levels, and
its overhead against in-process ONNX Runtime measured in the same run."""
from __future__ import annotations

import json
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from ..progress import Progress
from ..runtime.pipeline import VLMPipeline
from ..runtime.engine import GenerationEngine
from ..runtime.prefix_cache import PrefixCache
from . import measure
from .batching import scheduler_ceilings
from .calls import client_call, engine_call, in_process_call

# discarded requests per block; the first requests also load lazy state in every served model
SERVED_WARMUP = 2
#: images sent twice (a first sight, then again) to time the served model's image cache
CACHE_ROUNDS = 4
#: requests (2 untimed) timing one request's own work for the scheduler's ceiling (batching.request_cost)
CEILING_REQUESTS = 10


def distinct_requests(requests: list, n: int, start: int = 0) -> list:
    """``n`` requests cycling over ``requests`` whose images all differ AS THE MODEL SEES THEM: each is
    its original rolled by a few pixels (sideways, then down: the same size and work), so neither
    the served model's image cache (keyed by the image's bytes) nor a prefix cache (keyed by the
    image rows the model makes of it) spares a request what the in-process runs pay. (Changing one
    corner pixel made new bytes but, where the processor crops that corner away, the same rows.)
    ``start`` numbers the shifts, so sets made with different starts share no image."""
    import io

    import numpy as np
    from PIL import Image

    bases = {}
    out = []
    for i in range(start, start + n):
        prompt, png = requests[i % len(requests)]
        if png not in bases:
            bases[png] = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        pixels = bases[png]
        width = pixels.shape[1] - 1  # a roll by the whole width would give the original back
        rolled = np.roll(np.roll(pixels, 1 + i % width, axis=1), i // width, axis=0)
        buf = io.BytesIO()
        Image.fromarray(rolled).save(buf, format="PNG")
        out.append((prompt, buf.getvalue()))
    return out


def _server_version(server) -> str | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with opener.open(f"http://{server.http_url}/v2", timeout=5) as r:
            return json.loads(r.read()).get("version")
    except (OSError, ValueError):
        return None


def _concurrent(call, n: int, concurrency: int, advance) -> tuple[list, float]:
    """n requests made by ``call``, ``concurrency`` in flight at any time (closed loop: a client
    sends its next request when its previous one finished). Returns the timings and the wall time."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        start = time.perf_counter()
        futures = [pool.submit(call) for _ in range(n)]
        timings = []
        for f in as_completed(futures):
            timings.append(f.result())
            advance()
        return timings, time.perf_counter() - start


def _level(concurrency: int, timings: list, wall: float) -> dict:
    summary = measure.summarize_requests(timings)
    return {"concurrency": concurrency, "wall_s": round(wall, 3), **summary,
            "throughput_tokens_per_s": round(summary["tokens"] / wall, 3),
            "throughput_requests_per_s": round(len(timings) / wall, 4)}


def bench_served(build_dir: Path, pipe: VLMPipeline, inputs, options, threads: int, progress: Progress) -> dict:
    from ..model_repository.render import RepositoryOptions

    repo_options = RepositoryOptions(threads=threads)
    # the in-process side gets the prefix cache the served model has (repository default), so that
    # both reuse the same prompt starts and the comparison stays like for like
    prefix_mb = repo_options.served_prefix_cache_mb
    pipe.prefix_cache = PrefixCache(prefix_mb << 20) if prefix_mb else None
    fresh = _Fresh(inputs.requests)
    try:
        # first, before the server starts: what any scheduler could reach at each level on this machine,
        # a request's own work measured as the sweep's requests run (new images, the prefix cache on)
        with progress.step("the scheduler's ceiling: one request's own work, decode steps of 1 .. max_batch rows") \
                as advance:
            _, fixed = pipe.scheme.decode_lengths(len(inputs.prompt_ids), options.new_tokens)
            ceiling = scheduler_ceilings(pipe, fresh.take(CEILING_REQUESTS), inputs.past_len, fixed,
                                         options.concurrency, options.new_tokens)
            advance()
        return {**_bench_served(build_dir, pipe, inputs, options, threads, progress, repo_options, fresh),
                "scheduler_ceiling": ceiling}
    finally:
        pipe.prefix_cache = None


def _bench_served(build_dir: Path, pipe: VLMPipeline, inputs, options, threads: int, progress: Progress,
                  repo_options, fresh: "_Fresh") -> dict:
    from ..client.client import VLMClient
    from ..model_repository.render import render_repository
    from ..serve.server import TritonServer

    with tempfile.TemporaryDirectory(prefix="vlm-bench-") as tmp:
        with progress.step("rendering the python-target repository and starting tritonserver") as advance:
            repo = render_repository(build_dir, Path(tmp) / "repo", repo_options, check_hashes=options.check_hashes)
            server = TritonServer(repo, log_file=Path(tmp) / "triton.log").start()
            advance()
        try:
            client = VLMClient(f"grpc://{server.grpc_url}")
            out = {"server": {"tritonserver": _server_version(server), "protocol": "grpc streaming (VLMClient)",
                              "repository": {"target": repo_options.target,
                                             "decoder_mode": repo_options.resolved_decoder_mode,
                                             "vlm_instances": repo_options.vlm_instances,
                                             "prefix_cache_mb": repo_options.served_prefix_cache_mb,
                                             "instances_per_graph_model": repo_options.instances,
                                             "ort_intra_op_threads": threads},
                              "ignore_eos": True, "address": "loopback"}}
            n = options.requests
            with progress.step(f"Triton vs in-process ONNX Runtime, {n} requests each", total=2 * n) as advance:
                # concurrency 1 both ways, on the same requests (every image new to the server), in
                # mirrored blocks like every comparison
                requests = fresh.take(n + 2 * SERVED_WARMUP)
                timings = measure.alternating(
                    {"triton": client_call(client, requests, options.new_tokens),
                     "onnxruntime": in_process_call(pipe, requests, options.new_tokens)},
                    SERVED_WARMUP, n, None, advance)
            served = timings["triton"]
            out["overhead"] = _overhead(served, timings["onnxruntime"])
            out["levels"] = []
            # the same in-flight batching in this process (GenerationEngine over the in-process
            # pipeline), at every level right after Triton's: what serving adds at each concurrency
            engine = GenerationEngine(pipe, max_queue=max(options.concurrency) + 1)
            try:
                for c in options.concurrency:
                    n_c = max(options.requests, 2 * c)
                    with progress.step(f"Triton, then in-process, at concurrency {c} ({n_c} requests each)",
                                       total=2 * n_c) as advance:
                        requests = fresh.take(n_c)
                        level = _level(c, *_concurrent(client_call(client, requests, options.new_tokens),
                                                       n_c, c, advance))
                        level["in_process"] = _level(c, *_concurrent(engine_call(engine, requests,
                                                                                 options.new_tokens), n_c, c, advance))
                    out["levels"].append(level)
            finally:
                engine.close(drain_s=0)
            with progress.step(f"the image cache: {CACHE_ROUNDS} new images, each sent twice",
                               total=2 * CACHE_ROUNDS) as advance:
                out["image_cache"] = _image_cache(server, client, fresh.take(CACHE_ROUNDS), options.new_tokens,
                                                  repo_options.image_cache_mb, advance)
        finally:
            server.stop()
    return out


class _Fresh:
    """Hands out requests whose images the server has not seen in this run (``distinct_requests``)."""

    def __init__(self, requests: list):
        self.requests, self.used = requests, 0

    def take(self, n: int) -> list:
        out = distinct_requests(self.requests, n, self.used)
        self.used += n
        return out


def _image_cache(server, client, requests: list, new_tokens: int, cache_mb: int, advance) -> dict:
    """Time to first token of an image's first sight against the same request again (the served
    model's image cache then skips the image path), with the cache's hit and miss counters before
    and after, so a repeat that missed shows."""
    def counters() -> tuple[float, float]:
        return (server.metric("vlm_image_cache_hits_total") or 0, server.metric("vlm_image_cache_misses_total") or 0)

    hits, misses = counters()
    first, again = [], []
    for prompt, image in requests:
        for timings in (first, again):
            timings.append(measure.time_request(client.stream(prompt, [image], max_tokens=new_tokens, ignore_eos=True)))
            advance()
    time.sleep(0.5)  # the counters are scraped, not pushed
    hits_after, misses_after = counters()
    ttft_first = measure.summarize([t.ttft_s for t in first])
    ttft_again = measure.summarize([t.ttft_s for t in again])
    return {"image_cache_mb": cache_mb, "images": len(requests), "first_sight_ttft_ms": ttft_first,
            "repeat_ttft_ms": ttft_again, "hits": int(hits_after - hits), "misses": int(misses_after - misses),
            "ttft_saved_ms": round(ttft_first["p50"] - ttft_again["p50"], 3),
            "ttft_ratio": round(ttft_first["p50"] / ttft_again["p50"], 3) if ttft_again["p50"] else None}


def _overhead(served: list, local: list) -> dict:
    """Served minus in-process, p50 against p50 (the same requests, measured side by side)."""
    s, l = measure.summarize_requests(served), measure.summarize_requests(local)

    def diff(key: str) -> float | None:
        a, b = s[key].get("p50"), l[key].get("p50")
        return None if a is None or b is None else round(a - b, 4)

    return {"requests": len(served), "served": s, "in_process_onnxruntime": l,
            "per_token_ms": diff("tpot_ms"), "ttft_ms": diff("ttft_ms"), "per_request_ms": diff("request_ms")}
