"""Triton python model ``vlm`` (decoupled): prompt + images -> streamed text.

A thin shell over vlm_export's one generation loop; the build's manifest (copied beside this
file) declares the stages and the decoding scheme. Images go through the ``image_encoder``
ensemble (one BLS call per request); where the prompt's text follows each image's grid of tiles or
patches, they are preprocessed here once (for the grid and the pixels) and the image stages are
called one by one instead. The decoder runs where the ``decoder_mode`` parameter
says: ``in_process`` holds an ONNX Runtime session here, so a decode step crosses no model
boundary; ``bls`` calls the decoder model per step with its state as tensors (for native
onnxruntime / TensorRT decoders; one call per step for the whole batch).

In-flight batching: ``execute`` only checks each request and hands it to the
``GenerationEngine`` (runtime/engine.py), whose one scheduler loop decodes every active request
together, streams each row's text through its own response sender, and drops a row within a
step when its client cancels. Responses go out from a thread of their own (``_Outbox``), so the
scheduler's next step does not wait for them. Past ``max_queue`` waiting requests a new one gets
UNAVAILABLE at once. A bad request gets an error response and the model keeps serving.
"""
import sys

# The served models never use torch (the deploy image has none). Where it is installed (a development venv)
# transformers would import it all the same: hidden here, each stub starts as it does in the image, about 3.5 CPU-s
# sooner and 300 MB smaller (measured on this model and preprocess's).
sys.modules.setdefault("torch", None)
import json
import queue
import threading
from functools import partial

import numpy as np
import triton_python_backend_utils as pb_utils
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from vlm_export.contract import prompt_inputs, stages_from_manifest
from vlm_export.contract.profiles import trt_settings
from vlm_export.errors import BusyError, InputError, RunnerError, VlmExportError
from vlm_export.model_repository.python_models.common import (check_files, image_limits, image_payload,
                                                               instance_device, model_dirs, parameter)
from vlm_export.runtime.engine import DEFAULT_MAX_QUEUE, Cancelled, GenerationEngine
from vlm_export.runtime.generate import (DEFAULT_MAX_PREFILL_PADDING, DEFAULT_MAX_PREFILL_TOKENS, GenerationConfig,
                                         GenerationResult, TokenEvent)
from vlm_export.runtime.image_cache import ImageEmbeddingCache
from vlm_export.runtime.prefix_cache import PrefixCache
from vlm_export.runtime.images import load_image_processor
from vlm_export.runtime.load import built_with_onnxruntime, pipeline_from_manifest
from vlm_export.runtime.runners import OrtRunner, Runner

DRAIN_S = 5.0  # finalize lets running requests finish this long (Triton's own exit timeout is longer)


class _Outbox:
    """Responses leave on a thread of their own, in the order they were made. A send is a round
    trip to Triton's core through the stub's shared memory, then its frontend's work; on the scheduler
    thread it would add to every decode step once per running row (the step's decoder call releases
    the GIL, so here the sends overlap it)."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vlm-responses", daemon=True)
        self._thread.start()

    def put(self, send) -> None:
        self._queue.put(send)

    def _run(self) -> None:
        while (send := self._queue.get()) is not None:
            try:
                send()
            except Exception as e:  # one response that cannot go out must not stop the others'
                pb_utils.Logger.log_warn(f"vlm: a response was not sent ({type(e).__name__}: {e})")

    def close(self, timeout_s: float = 10.0) -> None:
        """Send what is queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout_s)


class BlsRunner(Runner):
    """The runner contract over a BLS call to another model of this server."""

    backend = "triton-bls"

    def _run(self, feeds):
        # outputs in CPU memory: a model on a GPU instance (the tensorrt target, onnxruntime with --device cuda)
        # would otherwise hand them back in GPU memory, which as_numpy() refuses
        request = pb_utils.InferenceRequest(
            model_name=self.name, requested_output_names=self.output_names,
            inputs=[pb_utils.Tensor(n, np.ascontiguousarray(feeds[n])) for n in self.input_names],
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0))
        response = request.exec()
        if response.has_error():  # the called model's own message says whose fault it was
            raise RunnerError(f"{self.name}: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in self.output_names}


def _optional(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return default if tensor is None else tensor.as_numpy().reshape(-1)


def _logit_bias(request, vocab_size: int) -> tuple:
    tokens, values = _optional(request, "logit_bias_tokens", []), _optional(request, "logit_bias", [])
    if len(tokens) != len(values):
        raise InputError(f"logit_bias_tokens and logit_bias must be as long as each other (one bias per token), "
                         f"got {len(tokens)} and {len(values)}")
    if len(tokens) > vocab_size:  # refused before any per-token work: more than the model has cannot be right
        raise InputError(f"logit_bias names {len(tokens)} tokens, more than this model's vocabulary ({vocab_size})")
    return tuple(zip((int(t) for t in tokens), (float(v) for v in values)))


def _text(value, field: str) -> str:
    if not isinstance(value, bytes):
        return str(value)
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{field} is not valid UTF-8 text; send UTF-8 strings") from None


class TritonPythonModel:
    def initialize(self, args):
        _, version_dir, config = model_dirs(args)
        hf_logging.set_verbosity_error()
        manifest = json.loads((version_dir / "manifest.json").read_text())
        specs = {spec.name: spec for spec in stages_from_manifest(manifest)}
        pipe = pipeline_from_manifest(manifest, {}, AutoTokenizer.from_pretrained(version_dir / "tokenizer"),
                                      root=version_dir)
        if pipe.layout.tiled:
            # a prompt's text follows each image's grid of tiles (or patches), which the image processor's
            # preprocessing gives (saved with the tokenizer, as the preprocess model's is): each image is preprocessed
            # here once, for its grid and its pixels, and the image stages are called on the pixels directly (the
            # ensemble's preprocess model would preprocess it a second time)
            pipe.image_processor = load_image_processor(version_dir / "tokenizer")
            for spec in pipe.image_stages:
                pipe.runners[spec.name] = BlsRunner(spec.name, spec.input_names, spec.output_names)
        name = pipe.scheme.decoder_stage
        if parameter(config, "decoder_mode", "in_process") == "in_process":
            threads = int(parameter(config, "intra_op_threads", "0")) or None
            check_files(version_dir, config)  # the decoder graph the renderer put beside this model
            device = instance_device(args)
            with built_with_onnxruntime(manifest):
                decoder = OrtRunner(name, version_dir / parameter(config, "decoder_graph"), threads=threads, spin=True,
                                    device=device, **(trt_settings(manifest, name) if device != "cpu" else {}))
        else:
            decoder = BlsRunner(name, specs[name].input_names, specs[name].output_names)
        pipe.runners[name] = decoder
        encoder = pipe.scheme.encoder_stage  # an encoder-decoder's encoder: its own model, called once per prefill
        if encoder:
            pipe.runners[encoder] = BlsRunner(encoder, specs[encoder].input_names, specs[encoder].output_names)
        # the ensemble takes the encoded images, plus the prompt's tokens where the image path reads it, and
        # gives what the scheme builds its image input from
        inputs = ["images", *(t.name for t in prompt_inputs(pipe.stages))]
        sources = list(pipe.scheme.image_input_sources)
        self.image_encoder = BlsRunner("image_encoder", inputs, sources) if sources and not pipe.layout.tiled else None
        self.pipe = pipe
        self.limits = image_limits(config)  # the bytes limit is checked here, the pixels by preprocess
        pipe.image_limits = self.limits  # (and here too, where a tiled build's images are preprocessed)
        self.metrics = _Metrics()
        cache_mb = int(parameter(config, "image_cache_mb", "0"))
        prefix_mb = int(parameter(config, "prefix_cache_mb", "0"))
        pipe.prefix_cache = PrefixCache(prefix_mb << 20) if prefix_mb else None
        self.outbox = _Outbox()
        self.engine = GenerationEngine(pipe, max_queue=int(parameter(config, "max_queue", str(DEFAULT_MAX_QUEUE))),
                                       encode_images=self._encode_images if self.image_encoder else None,
                                       on_stats=self.metrics.update,
                                       image_cache=ImageEmbeddingCache(cache_mb << 20) if cache_mb else None,
                                       max_prefill_tokens=int(parameter(config, "max_prefill_tokens",
                                                                        str(DEFAULT_MAX_PREFILL_TOKENS))),
                                       max_prefill_padding=float(parameter(config, "max_prefill_padding",
                                                                           str(DEFAULT_MAX_PREFILL_PADDING))))

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                prompt, images, config, streaming = self._parse(request)
                self.engine.submit(prompt, images, config, partial(self._on_event, sender, streaming),
                                   sender.is_cancelled)
            except BusyError as e:  # counted in the engine's stats (vlm_requests_refused_total)
                self._fail(sender, str(e), _code("UNAVAILABLE"))
            except VlmExportError as e:
                self._fail(sender, str(e))
            except Exception as e:  # never let one request take the model down
                self._fail(sender, f"internal error: {type(e).__name__}: {e}")
        return None

    def _encode_images(self, images, prompt):
        raw = np.array([[bytes(i)] for i in images], dtype=np.object_)
        feeds = {"images": raw, **self.pipe.image_text_feeds(prompt, len(images))}
        return self.pipe.scheme.image_input_from_values(self.image_encoder.infer(feeds))

    @staticmethod
    def _prompt(request):
        """The request's ``prompt`` string, or its ``messages`` (a JSON conversation): one of them."""
        given = {name: _optional(request, name, None) for name in ("prompt", "messages")}
        given = {name: value for name, value in given.items() if value is not None}
        if len(given) != 1:
            raise InputError("send a 'prompt' string or a 'messages' conversation (JSON), one of them")
        (name, value), = given.items()
        if value.size != 1:
            raise InputError(f"{name} must hold exactly one string, got {value.size}")
        text = _text(value[0], name)
        if name == "prompt":
            return text
        try:
            return json.loads(text)  # checked with the prompt ids (runtime.chat)
        except json.JSONDecodeError as e:
            raise InputError(f"messages is not valid JSON ({e.msg} at position {e.pos})") from None

    def _parse(self, request):
        prompt = self._prompt(request)
        # decoded once here (JSON clients send base64 or data URLs): the prompt of a tiled build reads the images
        images = [image_payload(bytes(image)) for image in _optional(request, "images", [])]
        if len(images) > self.pipe.limits.max_images:
            raise InputError(f"{len(images)} images given; this model takes at most "
                             f"{self.pipe.limits.max_images} per prompt")
        if images and not self.pipe.image_stages:
            raise InputError("this model takes no images; send the prompt alone")
        for i, image in enumerate(images):
            self.limits.check_bytes(len(image), f"image {i}")
        seed = _optional(request, "seed", None)
        repetition_penalty, ngram, min_tokens = (_optional(request, name, None) for name in (
            "repetition_penalty", "no_repeat_ngram_size", "min_tokens"))
        config = GenerationConfig(
            max_new_tokens=int(_optional(request, "max_tokens", [64])[0]),
            temperature=float(_optional(request, "temperature", [0.0])[0]),
            top_p=float(_optional(request, "top_p", [1.0])[0]),
            top_k=int(_optional(request, "top_k", [0])[0]),
            min_p=float(_optional(request, "min_p", [0.0])[0]),
            seed=None if seed is None else int(seed[0]),
            stop=tuple(_text(s, "stop") for s in _optional(request, "stop", [])),
            bad_words=tuple(_text(s, "bad_words") for s in _optional(request, "bad_words", [])),
            ignore_eos=bool(_optional(request, "ignore_eos", [False])[0]),
            repetition_penalty=None if repetition_penalty is None else float(repetition_penalty[0]),
            no_repeat_ngram_size=None if ngram is None else int(ngram[0]),
            min_new_tokens=None if min_tokens is None else int(min_tokens[0]),
            presence_penalty=float(_optional(request, "presence_penalty", [0.0])[0]),
            frequency_penalty=float(_optional(request, "frequency_penalty", [0.0])[0]),
            logprobs=bool(_optional(request, "logprobs", [False])[0]),
            top_logprobs=int(_optional(request, "top_logprobs", [0])[0]),
            logit_bias=_logit_bias(request, self.pipe.scheme.geometry.vocab_size),
        )
        return prompt, images, config, bool(_optional(request, "stream", [False])[0])

    def _on_event(self, sender, streaming, event):
        """Called on the scheduler thread for each of a request's events: sent from the outbox's."""
        self.outbox.put(partial(self._send, sender, streaming, event))

    def _send(self, sender, streaming, event):
        if isinstance(event, TokenEvent):
            if streaming:
                sender.send(self._response(event.text, "", 0, 0, event.logprobs))
        elif isinstance(event, GenerationResult):
            text = "" if streaming else event.text
            logprobs = () if streaming else event.logprobs or ()  # streamed with the tokens' events
            sender.send(self._response(text, event.finish_reason, event.prompt_tokens, event.completion_tokens,
                                       logprobs), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        elif isinstance(event, Cancelled):  # nobody reads an answer; Triton still needs the final flag
            _close(sender)
        else:
            self._fail(sender, str(event))

    @staticmethod
    def _response(text, finish_reason, prompt_tokens, completion_tokens, logprobs=()):
        logprobs = json.dumps([entry.to_dict() for entry in logprobs])
        return pb_utils.InferenceResponse([
            pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("finish_reason", np.array([finish_reason.encode("utf-8")], dtype=np.object_)),
            pb_utils.Tensor("prompt_tokens", np.array([prompt_tokens], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([completion_tokens], dtype=np.int32)),
            pb_utils.Tensor("logprobs", np.array([logprobs.encode("utf-8")], dtype=np.object_)),
        ])

    @staticmethod
    def _fail(sender, message, code=None):
        error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
        try:
            sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # the client went away: the request must still be closed, or unloading waits for it
            _close(sender)

    def finalize(self):
        self.engine.close(DRAIN_S)
        self.outbox.close()


def _close(sender):
    """The final flag alone (Triton's documented answer to a cancelled request): without it the
    request stays open and the model can never unload."""
    try:
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception:  # already closed
        pass


def _code(name):
    """A TritonError status code by name (None where this python backend has no codes)."""
    return getattr(pb_utils.TritonError, name, None)


class _Metrics:
    """The engine's counters on Triton's metrics endpoint (``vlm_*`` families), where the python
    backend offers custom metrics; a no-op otherwise. Families are kept alive as long as their
    metrics (the backend refuses to touch a metric whose family was collected)."""

    GAUGES = {"running": ("vlm_batch_rows", "Sequences in the running batch"),
              "waiting": ("vlm_queue_length", "Requests waiting for a place in the batch")}
    COUNTERS = {"tokens": ("vlm_generated_tokens_total", "Tokens generated by finished requests"),
                "finished": ("vlm_requests_finished_total", "Requests that finished"),
                "cancelled": ("vlm_requests_cancelled_total", "Requests cancelled by their client"),
                "refused": ("vlm_requests_refused_total", "Requests refused because the queue was full"),
                "steps": ("vlm_decode_steps_total", "Batched decode steps"),
                "image_cache_hits": ("vlm_image_cache_hits_total", "Images served from the embedding cache"),
                "image_cache_misses": ("vlm_image_cache_misses_total", "Images sent through the image path"),
                "prefix_cache_hits": ("vlm_prefix_cache_hits_total", "Prompts that continued from a cached prefix"),
                "prefix_cache_reused_tokens": ("vlm_prefix_cache_reused_tokens_total",
                                               "Prompt tokens not prefilled again: taken from the prefix cache")}

    def __init__(self):
        self._last = {}
        self._families, self._gauges, self._counters = [], {}, {}
        try:
            for kind, table, into in ((pb_utils.MetricFamily.GAUGE, self.GAUGES, self._gauges),
                                      (pb_utils.MetricFamily.COUNTER, self.COUNTERS, self._counters)):
                for stat, (name, description) in table.items():
                    family = pb_utils.MetricFamily(name=name, description=description, kind=kind)
                    self._families.append(family)
                    into[stat] = family.Metric(labels={"model": "vlm"})
        except Exception as e:  # a python backend without custom metrics: serve without them
            pb_utils.Logger.log_warn(f"vlm: no custom metrics ({type(e).__name__}: {e})")
            self._families, self._gauges, self._counters = [], {}, {}

    def update(self, stats):
        for stat, metric in self._gauges.items():
            metric.set(getattr(stats, stat))
        for stat, metric in self._counters.items():
            value = getattr(stats, stat)
            if value > self._last.get(stat, 0):
                metric.increment(value - self._last.get(stat, 0))
                self._last[stat] = value
