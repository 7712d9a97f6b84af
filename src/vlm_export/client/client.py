"""Client for the served ``vlm`` model: HTTP (Triton's generate / generate_stream endpoints)
and gRPC (tritonclient's bidirectional stream), streaming or not, images from files or bytes.

    client = VLMClient("http://127.0.0.1:8000")
    print(client.generate("What is in the picture?", ["cat.png"]).text)
    for piece in client.stream("Describe it.", ["cat.png"]):
        print(piece, end="")
"""
from __future__ import annotations

import base64
import contextlib
import json
import queue
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union
from urllib.parse import urlparse

import numpy as np

from ..errors import InputError, RequestError, ServeError

Image = Union[str, Path, bytes]
#: the settings a request sends only where they differ from the server's default (None: the server's
#: own, for the repetition penalty and the no-repeat n-gram size the build's), so a repository rendered
#: before a setting existed still takes requests without it: name -> (Triton type, numpy type, default)
OPTIONAL_SETTINGS = {"seed": ("INT64", np.int64, None), "ignore_eos": ("BOOL", bool, False),
                     "repetition_penalty": ("FP32", np.float32, None), "min_tokens": ("INT64", np.int64, None),
                     "no_repeat_ngram_size": ("INT64", np.int64, None),
                     "presence_penalty": ("FP32", np.float32, 0.0), "frequency_penalty": ("FP32", np.float32, 0.0),
                     "logprobs": ("BOOL", bool, False), "top_logprobs": ("INT64", np.int64, 0),
                     "top_k": ("INT64", np.int64, 0), "min_p": ("FP32", np.float32, 0.0)}


@dataclass
class VLMResponse:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    #: where the request asked for them (``logprobs=True``): one dict per generated token, ``token_id``,
    #: ``token``, ``logprob`` and ``top_logprobs`` (the alternatives' dicts); streamed, all of them
    logprobs: list[dict] | None = None


class TextPiece(str):
    """A streamed piece of text; ``logprobs``: its tokens' (as VLMResponse's), where asked for. The
    tokens of a piece are those sampled since the previous one, so a piece may be empty and carry
    tokens whose text is not settled yet (the start of a stop string, part of a character)."""

    logprobs: tuple[dict, ...] = ()

    def __new__(cls, text: str, logprobs=()):
        piece = super().__new__(cls, text)
        piece.logprobs = tuple(logprobs)
        return piece


def _image_bytes(image: Image) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    try:
        return Path(image).read_bytes()
    except OSError as e:
        raise InputError(f"cannot read image {image}: {e.strerror}") from None


def parse_url(url: str) -> tuple[str, str]:
    """('http'|'grpc', 'host:port'); a bare host:port means HTTP."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    if parsed.scheme not in ("http", "grpc"):
        raise InputError(f"unsupported URL scheme {parsed.scheme!r} in {url}; use http://HOST:PORT or grpc://HOST:PORT")
    if not parsed.hostname or not parsed.port:
        raise InputError(f"{url} lacks a host and port, e.g. http://127.0.0.1:8000")
    return parsed.scheme, f"{parsed.hostname}:{parsed.port}"


def connect_host(host: str) -> str:
    """The address a local client uses for a server bound to ``host``."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _http_error_message(error: urllib.error.HTTPError) -> str:
    """The server's own message in an HTTP error response: ``{"error": ...}``, or, from
    ``generate_stream``, the same object as a server-sent event (``data: {"error": ...}``)."""
    body = error.read()
    for chunk in (body, *(line[5:] for line in body.splitlines() if line.startswith(b"data:"))):
        try:
            message = json.loads(chunk).get("error")
        except (ValueError, AttributeError):
            continue
        if message:
            return str(message)
    return str(error.reason)


def _unknown_model_hint(message: str) -> str:
    """Triton names the model it lacks; say which one a repository from ``vlm-export repository`` serves."""
    if "unknown model" in message.lower():
        return f"{message}; the generation model of a vlm-export repository is 'vlm' (--model)"
    return message


class VLMClient:
    def __init__(self, url: str, model: str = "vlm", timeout: float = 300.0):
        self.protocol, self.address = parse_url(url)
        self.model, self.timeout = model, timeout

    # ---- public API ----------------------------------------------------------------------
    def generate(self, prompt: str | None = None, images: Sequence[Image] = (), *,
                 messages: Sequence[dict] | None = None, **params) -> VLMResponse:
        """The whole answer in one response. Send a ``prompt``, or a conversation as ``messages``
        (Hugging Face's chat format: the k-th ``{"type": "image"}`` part is ``images[k]``)."""
        final = None
        for event in self._events(prompt, images, messages, stream=False, **params):
            final = event
        return final

    def stream(self, prompt: str | None = None, images: Sequence[Image] = (), *,
               messages: Sequence[dict] | None = None, **params) -> Iterator[str | VLMResponse]:
        """Text pieces (``TextPiece``: a str with its tokens' ``logprobs``) as they are generated, then the
        final VLMResponse (text empty; join the pieces)."""
        yield from self._events(prompt, images, messages, stream=True, **params)

    # ---- transport -----------------------------------------------------------------------
    def _events(self, prompt, images, messages, stream, max_tokens=64, temperature=0.0, top_p=1.0, stop=(),
                logit_bias=None, bad_words=(), **options):
        if (prompt is None) == (messages is None):
            raise RequestError("send a prompt or messages (one of them)")
        unknown = set(options) - set(OPTIONAL_SETTINGS)
        if unknown:
            raise TypeError(f"unexpected generation setting(s) {sorted(unknown)}; known: max_tokens, temperature, "
                            f"top_p, stop, logit_bias, bad_words, {', '.join(OPTIONAL_SETTINGS)}")
        if isinstance(bad_words, str):  # one string would go as its characters
            raise TypeError("bad_words takes a list of words, not one string")
        # {token id: bias}: sent as two lists, the ids and their biases (the vlm model's two inputs)
        bias = dict(logit_bias or {})
        request = {"prompt": prompt, "messages": None if messages is None else json.dumps(list(messages)),
                   "images": [_image_bytes(i) for i in images], "max_tokens": max_tokens,
                   "temperature": temperature, "top_p": top_p, "stop": list(stop), "bad_words": list(bad_words),
                   "stream": stream,
                   "logit_bias": ([int(t) for t in bias], [float(v) for v in bias.values()]) if bias else None,
                   "options": {k: v for k, v in options.items() if v is not None and v != OPTIONAL_SETTINGS[k][2]}}
        events = self._http(request) if self.protocol == "http" else self._grpc(request)
        asked = bool(request["options"].get("logprobs"))
        streamed: list[dict] = []
        try:
            for fields in events:
                # a repository rendered before logprobs existed has no such output
                logprobs = json.loads(fields.get("logprobs") or "[]")
                if fields["finish_reason"]:
                    yield VLMResponse(fields["text_output"], fields["finish_reason"], int(fields["prompt_tokens"]),
                                      int(fields["completion_tokens"]), streamed + logprobs if asked else None)
                    return
                streamed += logprobs
                yield TextPiece(fields["text_output"], logprobs)
        finally:  # a caller that stops reading (a disconnected client) cancels the request on the server
            events.close()
        raise RequestError("the server closed the stream without a final response")

    def _http(self, request: dict) -> Iterator[dict]:
        body = {k: request[k] for k in ("prompt", "messages", "max_tokens", "temperature", "top_p", "stream")
                if request[k] is not None}
        if request["images"]:  # JSON carries no raw bytes: the server accepts base64
            body["images"] = [base64.b64encode(i).decode("ascii") for i in request["images"]]
        for name in ("stop", "bad_words"):
            if request[name]:
                body[name] = request[name]
        if request["logit_bias"]:
            body["logit_bias_tokens"], body["logit_bias"] = request["logit_bias"]
        body.update({k: np.array(v, dtype=OPTIONAL_SETTINGS[k][1]).item() for k, v in request["options"].items()})
        endpoint = "generate_stream" if request["stream"] else "generate"
        req = urllib.request.Request(f"http://{self.address}/v2/models/{self.model}/{endpoint}",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                if not request["stream"]:
                    yield json.loads(resp.read())
                    return
                for line in resp:  # server-sent events: "data: {...}" lines
                    line = line.strip()
                    if line.startswith(b"data:"):
                        event = json.loads(line[5:])
                        if "error" in event:
                            raise RequestError(event["error"])
                        yield event
        except urllib.error.HTTPError as e:
            raise RequestError(_unknown_model_hint(_http_error_message(e))) from None
        except urllib.error.URLError as e:
            raise ServeError(f"cannot reach {self.address}: {e.reason}; is `vlm-export serve` running?") from None

    def _grpc(self, request: dict) -> Iterator[dict]:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        def tensor(name, array, dtype):
            t = grpcclient.InferInput(name, list(array.shape), dtype)
            t.set_data_from_numpy(array)
            return t

        text = "prompt" if request["prompt"] is not None else "messages"
        inputs = [tensor(text, np.array([request[text].encode()], dtype=np.object_), "BYTES"),
                  tensor("max_tokens", np.array([request["max_tokens"]], dtype=np.int64), "INT64"),
                  tensor("temperature", np.array([request["temperature"]], dtype=np.float32), "FP32"),
                  tensor("top_p", np.array([request["top_p"]], dtype=np.float32), "FP32"),
                  tensor("stream", np.array([request["stream"]], dtype=bool), "BOOL")]
        if request["images"]:
            inputs.append(tensor("images", np.array(request["images"], dtype=np.object_), "BYTES"))
        for name in ("stop", "bad_words"):
            if request[name]:
                inputs.append(tensor(name, np.array([s.encode() for s in request[name]], dtype=np.object_), "BYTES"))
        if request["logit_bias"]:
            tokens, values = request["logit_bias"]
            inputs += [tensor("logit_bias_tokens", np.array(tokens, dtype=np.int64), "INT64"),
                       tensor("logit_bias", np.array(values, dtype=np.float32), "FP32")]
        for name, value in request["options"].items():
            triton_type, dtype, _ = OPTIONAL_SETTINGS[name]
            inputs.append(tensor(name, np.array([value], dtype=dtype), triton_type))
        results: queue.Queue = queue.Queue()
        # tritonclient's gRPC would route even 127.0.0.1 through an http_proxy from the environment
        client = grpcclient.InferenceServerClient(self.address, channel_args=[("grpc.enable_http_proxy", 0)])
        finished = False  # the server sent this request's last response (its result or its error)
        try:
            try:
                client.start_stream(callback=lambda result, error: results.put((result, error)))
                client.async_stream_infer(self.model, inputs)
            except InferenceServerException as e:  # the channel never came up
                reason = e.message()  # "the stream is no longer in valid state": its callback got the cause
                with contextlib.suppress(queue.Empty):
                    _, error = results.get(timeout=1.0)
                    if error is not None:
                        reason = error.message() if isinstance(error, InferenceServerException) else str(error)
                raise ServeError(f"cannot reach {self.address}: {reason}; is `vlm-export serve` running?") from None
            while True:
                try:
                    result, error = results.get(timeout=self.timeout)
                except queue.Empty:
                    raise RequestError(f"no response from {self.model} within {self.timeout:.0f} s") from None
                if error is not None:
                    message = error.message() if isinstance(error, InferenceServerException) else str(error)
                    low = message.lower()
                    if "failed to connect" in low or "unavailable" in low:
                        raise ServeError(f"cannot reach {self.address}: {message}; is `vlm-export serve` running?")
                    if "socket closed" in low or "stream removed" in low:
                        raise ServeError(f"{self.address} closed the connection mid-request (the server died or "
                                         f"was restarted; retry): {message}")
                    finished = True  # an error ends its request
                    raise RequestError(_unknown_model_hint(message))
                fields = {name: result.as_numpy(name).reshape(-1)[0] for name in
                          ("text_output", "finish_reason", "prompt_tokens", "completion_tokens", "logprobs")
                          if result.as_numpy(name) is not None}
                fields = {k: v.decode() if isinstance(v, bytes) else v for k, v in fields.items()}
                finished = bool(fields["finish_reason"])
                yield fields
                if finished:
                    return
        finally:
            # cancel only a request that is still running: cancelling a stream after its final response
            # leaks the request in Triton 2.51's gRPC frontend, and its model never unloads (serve/NOTES.md)
            client.stop_stream(cancel_requests=not finished)
            client.close()
