"""The end-to-end request calls the bench times: in-process on a pipeline, or through the client
to a server. Both make the next request of a list in turn and return its RequestTiming, and
both ignore EOS, so every request makes exactly ``new_tokens`` (as benchmarks of LLM servers
do: a model that answers in two words would otherwise time nothing)."""
from __future__ import annotations

import queue

from ..errors import VlmExportError
from ..runtime.generate import GenerationConfig, GenerationResult, stream
from ..runtime.pipeline import VLMPipeline
from .measure import request_call


def in_process_call(pipe: VLMPipeline, requests: list, new_tokens: int):
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    return request_call(lambda prompt, image: stream(pipe, prompt, [image], config), requests)


def client_call(client, requests: list, new_tokens: int):
    """``client``: a ``VLMClient`` of a running server."""
    return request_call(lambda prompt, image: client.stream(prompt, [image], max_tokens=new_tokens, ignore_eos=True),
                        requests)


def engine_call(engine, requests: list, new_tokens: int):
    """``engine``: an in-process ``GenerationEngine`` (the served model's scheduler, without Triton),
    so concurrency sweeps compare the served path with the same in-flight batching in this process."""
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)

    def run(prompt, image):
        events: queue.Queue = queue.Queue()
        engine.submit(prompt, [image], config, events.put)
        while True:
            event = events.get()
            if isinstance(event, VlmExportError):
                raise event
            yield event
            if isinstance(event, GenerationResult):
                return

    return request_call(run, requests)
