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
from . import measure
from .calls import client_call, engine_call, in_process_call

# discarded requests per block; the first requests also load lazy state in every served model
SERVED_WARMUP = 2


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
    from ..client.client import VLMClient
    from ..model_repository.render import RepositoryOptions, render_repository
    from ..serve.server import TritonServer

    repo_options = RepositoryOptions(threads=threads)
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
                                             "instances_per_graph_model": repo_options.instances,
                                             "ort_intra_op_threads": threads},
                              "ignore_eos": True, "address": "loopback"}}
            n = options.requests
            with progress.step(f"Triton vs in-process ONNX Runtime, {n} requests each", total=2 * n) as advance:
                # concurrency 1 both ways, on the same requests, in mirrored blocks like every comparison
                timings = measure.alternating(
                    {"triton": client_call(client, inputs.requests, options.new_tokens),
                     "onnxruntime": in_process_call(pipe, inputs.requests, options.new_tokens)},
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
                        level = _level(c, *_concurrent(client_call(client, inputs.requests, options.new_tokens),
                                                       n_c, c, advance))
                        level["in_process"] = _level(c, *_concurrent(engine_call(engine, inputs.requests,
                                                                                 options.new_tokens), n_c, c, advance))
                    out["levels"].append(level)
            finally:
                engine.close(drain_s=0)
        finally:
            server.stop()
    return out


def _overhead(served: list, local: list) -> dict:
    """Served minus in-process, p50 against p50 (the same requests, measured side by side)."""
    s, l = measure.summarize_requests(served), measure.summarize_requests(local)

    def diff(key: str) -> float | None:
        a, b = s[key].get("p50"), l[key].get("p50")
        return None if a is None or b is None else round(a - b, 4)

    return {"requests": len(served), "served": s, "in_process_onnxruntime": l,
            "per_token_ms": diff("tpot_ms"), "ttft_ms": diff("ttft_ms"), "per_request_ms": diff("request_ms")}
