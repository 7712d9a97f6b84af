"""An OpenAI-compatible chat-completions endpoint in front of the served ``vlm`` model.

    app = create_app("grpc://127.0.0.1:8001", "my-model")          # an ASGI app (FastAPI)
    api = run_openai_server("127.0.0.1:8001", "127.0.0.1", 8080, "my-model")   # uvicorn in a thread
    ...                                                              # OpenAI(base_url=api.url, api_key="none")
    api.stop()

``POST /v1/chat/completions`` takes OpenAI's request (system / user / assistant messages; user
content a string or ``text`` and ``image_url`` parts, images as ``data:image/...;base64,`` URLs;
``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``,
``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``logprobs`` / ``top_logprobs``, ``stream`` with
``stream_options.include_usage``, ``n`` up to ``MAX_CHOICES``; as vLLM's extensions, ``top_k``, ``min_p``,
``bad_words``, ``repetition_penalty``, ``min_tokens`` and ``ignore_eos``) and answers a ``chat.completion``, or
``chat.completion.chunk`` server-sent events ending with ``data: [DONE]``. ``GET /v1/models``
lists the one model served; ``GET /health`` is 200 while Triton has the model ready, else 503
(a readiness probe). Errors have OpenAI's body ``{"error": {"message", "type", "param",
"code"}}``: 400 for a bad request (ours, or the vlm model's own refusal), 404 for another model
name, 503 when the server is busy or unreachable, 500 otherwise.

Each request goes to Triton through :class:`~vlm_export.client.client.VLMClient` over its gRPC
stream, whose blocking iterator runs in a worker thread. A streaming client that disconnects
closes that iterator, which cancels the gRPC stream, so the served model drops the request within
a decode step.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, AsyncIterator, Callable, Iterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import StreamingResponse

from ..client.client import VLMClient, VLMResponse, connect_host
from ..errors import InputError, RequestError, ServeError, VlmExportError

DEFAULT_MAX_IMAGE_BYTES = 32 << 20  # the repository's default max_image_mb
DEFAULT_FETCH_TIMEOUT_S = 10.0
DEFAULT_MAX_TOKENS = 64  # VLMClient's and the vlm model's default
DEFAULT_TEMPERATURE = 1.0  # OpenAI's documented default (VLMClient's own is 0: greedy)
DEFAULT_MAX_CONCURRENCY = 256  # requests whose gRPC stream a worker thread waits on at once
# images per request, counted before any is decoded or fetched (the server checks the build's own limit)
DEFAULT_MAX_IMAGES = 16
#: choices a request may ask for (``n``): each is a row of the served batch, and rows past the
#: repository's max_batch only queue behind the others
MAX_CHOICES = 16
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# what the vlm model (or Triton) says when the fault is the server's, not the request's
_BUSY = ("server busy",)
_UNAVAILABLE = ("shutting down", "shut down before", "not healthy", "unknown model", "is not ready",
                "failed to connect", "connection reset", "socket closed", "unavailable")
_INTERNAL = ("internal error", "onnx runtime failed", "onnx runtime cannot load", "runner for",
             "closed the stream", "no response from")


# --------------------------------------------------------------------------- errors


class OpenAIError(Exception):
    """An error answered with OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 1 << 20 else f"{n} bytes"


def _bad(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def error_from_vlm(err: Exception) -> OpenAIError:
    """What a VLMClient error means for the caller: the server's refusal of a bad request is 400,
    busy or unreachable 503, anything else the server's fault (500). The gRPC stream carries only
    the message, so the kind is read from it. A tritonclient error that VLMClient let through
    (a stream that broke as it opened) means the server cannot be reached."""
    if not isinstance(err, VlmExportError):
        message = err.message() if callable(getattr(err, "message", None)) else str(err)
        err = ServeError(f"cannot reach the model server: {message}")
    message = str(err)
    low = message.lower()
    if isinstance(err, InputError):
        return _bad(message)
    if any(s in low for s in _BUSY):
        return OpenAIError(503, message, code="server_busy", headers={"Retry-After": "1"})
    if isinstance(err, ServeError) or any(s in low for s in _UNAVAILABLE):
        return OpenAIError(503, message, code="service_unavailable", headers={"Retry-After": "1"})
    if not isinstance(err, RequestError) or any(s in low for s in _INTERNAL):
        return OpenAIError(500, message, code="internal_error")
    field = re.match(r"(max_tokens|temperature|top_p|top_k|min_p|seed|stop|bad_words|presence_penalty|"
                     r"frequency_penalty|repetition_penalty|no_repeat_ngram_size|min_new_tokens|top_logprobs|"
                     r"logit_bias)\b", message)
    param = field.group(1) if field else ("messages" if re.search(r"\b(image|prompt|messages?)\b", low) else None)
    return _bad(message, param=param)


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = exc.errors()
    if not errors:
        return _bad("the request is not valid")
    first = errors[0]
    loc = [p for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return _bad(f"the request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or None
    message = first.get("msg", "invalid value")
    if param:
        message = f"{param}: {message}"
    if first.get("type") == "missing" and param:
        message = f"missing required parameter: {param!r}"
    return _bad(message + (f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""), param=param)


# --------------------------------------------------------------------------- the request


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat-completion request; fields this server has no use for are accepted and ignored
    (``user``, ``metadata``, ``store``, ...), those it cannot honour are refused (400)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Any]  # checked by to_conversation, whose messages name the part that is wrong
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    #: extensions, as in vLLM: generate max_tokens tokens, EOS or not (benchmarks); Hugging Face's
    #: repetition penalty and the fewest tokens before EOS (absent: the build's, from its checkpoint's
    #: generation config); the top-k and min-p sampling filters (-1 or 0 / 0: off); words never generated
    top_k: int | None = None
    min_p: float | None = None
    bad_words: list[str] | None = None
    ignore_eos: bool = False
    repetition_penalty: float | None = None
    min_tokens: int | None = None


def _unsupported(req: ChatCompletionRequest) -> None:
    if not 1 <= (1 if req.n is None else req.n) <= MAX_CHOICES:
        raise _bad(f"n must be in 1..{MAX_CHOICES} (each choice is a row of the served batch), got {req.n}", "n")
    if req.tools or req.functions or req.tool_choice not in (None, "none"):
        raise _bad("tools and function calling are not supported by this server", "tools")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise _bad("response_format other than text is not supported by this server", "response_format")


def generation_params(req: ChatCompletionRequest, default_max_tokens: int = DEFAULT_MAX_TOKENS,
                      default_temperature: float = DEFAULT_TEMPERATURE) -> dict:
    """VLMClient's keyword arguments for the request; 400 for values out of OpenAI's ranges."""
    _unsupported(req)
    max_tokens, param = req.max_completion_tokens, "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = req.max_tokens, "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens < 1:
        raise _bad(f"{param} must be at least 1, got {max_tokens}", param)
    if max_tokens > 2**63 - 1:  # the served protocol's INT64
        raise _bad(f"{param} is too large: {max_tokens}", param)
    temperature = default_temperature if req.temperature is None else req.temperature
    if not 0.0 <= temperature <= 2.0:
        raise _bad(f"temperature must be in [0, 2], got {temperature}", "temperature")
    top_p = 1.0 if req.top_p is None else req.top_p
    if not 0.0 <= top_p <= 1.0:
        raise _bad(f"top_p must be in [0, 1], got {top_p}", "top_p")
    top_k = 0 if req.top_k in (None, -1) else req.top_k  # vLLM's -1: every token, as 0
    if not 0 <= top_k < 2**31:  # as runtime.generate.MAX_TOP_K
        raise _bad(f"top_k must be -1 or an integer in 0..2^31-1 (-1 or 0: every token), got {req.top_k}", "top_k")
    min_p = 0.0 if req.min_p is None else req.min_p
    if not 0.0 <= min_p <= 1.0:
        raise _bad(f"min_p must be in [0, 1], got {min_p}", "min_p")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise _bad(f"seed must be an integer in 0..2^63-1, got {req.seed}", "seed")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if any(not s for s in stop):
        raise _bad("stop strings must not be empty", "stop")
    bad_words = tuple(req.bad_words or ())
    if any(not w.strip() for w in bad_words):
        raise _bad("bad_words must not be blank", "bad_words")
    penalties = {name: 0.0 if getattr(req, name) is None else getattr(req, name)
                 for name in ("presence_penalty", "frequency_penalty")}
    for name, value in penalties.items():
        if not -2.0 <= value <= 2.0:
            raise _bad(f"{name} must be in [-2, 2], got {value}", name)
    if req.min_tokens is not None and not 0 <= req.min_tokens <= max_tokens:
        raise _bad(f"min_tokens must be in 0..max_tokens ({max_tokens}), got {req.min_tokens}", "min_tokens")
    if req.repetition_penalty is not None and not 0.0 < req.repetition_penalty <= 10.0:
        raise _bad(f"repetition_penalty must be in (0, 10] (1: none), got {req.repetition_penalty}",
                   "repetition_penalty")
    top_logprobs = req.top_logprobs or 0
    # OpenAI's limit, as runtime.generate.MAX_TOP_LOGPROBS (not imported: the sidecar needs only the client)
    if not 0 <= top_logprobs <= 20:
        raise _bad(f"top_logprobs must be an integer in 0..20, got {top_logprobs}", "top_logprobs")
    if top_logprobs and not req.logprobs:
        raise _bad("top_logprobs needs logprobs: set logprobs to true", "top_logprobs")
    logit_bias = {}
    for key, value in (req.logit_bias or {}).items():  # JSON's keys are strings: token ids written out
        if not re.fullmatch(r"\d{1,18}", key):
            raise _bad(f"logit_bias keys must be token ids (integers >= 0), got {key!r}", "logit_bias")
        if not -100.0 <= value <= 100.0:  # OpenAI's range, as runtime.generate.MAX_LOGIT_BIAS
            raise _bad(f"logit_bias values must be in [-100, 100], got {value} for token {key}", "logit_bias")
        if int(key) in logit_bias:  # "5" and "05": which bias was meant?
            raise _bad(f"logit_bias names token {int(key)} twice ({key!r})", "logit_bias")
        logit_bias[int(key)] = value
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k, "min_p": min_p,
            "seed": req.seed,
            "stop": tuple(stop), "bad_words": bad_words, "ignore_eos": bool(req.ignore_eos), **penalties,
            "repetition_penalty": req.repetition_penalty, "min_tokens": req.min_tokens, "logprobs": bool(req.logprobs),
            "top_logprobs": top_logprobs, "logit_bias": logit_bias or None}


def openai_logprobs(entries) -> dict | None:
    """VLMClient's log-probabilities as OpenAI's ``choices[].logprobs`` (None where not asked for)."""
    if entries is None:
        return None

    def token(entry: dict) -> dict:
        return {"token": entry["token"], "logprob": entry["logprob"], "bytes": entry["bytes"]}

    return {"content": [{**token(e), "top_logprobs": [token(t) for t in e["top_logprobs"]]} for e in entries],
            "refusal": None}


# --------------------------------------------------------------------------- messages


@dataclass
class Conversation:
    """A request's messages in Hugging Face's chat format and its images, in order."""

    messages: list[dict]
    images: list[bytes]

    def as_request(self) -> dict:
        """VLMClient's (prompt | messages, images): one user turn of images, then its text, is
        exactly a single prompt (which any served repository takes); anything else a conversation."""
        if len(self.messages) == 1 and self.messages[0]["role"] == "user":
            parts = self.messages[0]["content"]
            kinds = [p["type"] for p in parts]
            if kinds.count("text") == 1 and kinds[-1] == "text":
                return {"prompt": parts[-1]["text"], "images": self.images}
        return {"prompt": None, "messages": self.messages, "images": self.images}


ImageFetcher = Callable[[str, str], bytes]


def to_conversation(messages: Any, load_image: ImageFetcher, max_images: int = DEFAULT_MAX_IMAGES) -> Conversation:
    """OpenAI's messages -> Hugging Face's chat format: each ``image_url`` part becomes an
    ``{"type": "image"}`` part and its bytes (``load_image(url, param)``) the next image. More
    than ``max_images`` image parts are refused before any is loaded."""
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {'role': ..., 'content': ...}", "messages")
    n_images = sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                   for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url")
    if n_images > max_images:
        raise _bad(f"{n_images} images given; this server takes at most {max_images} per request", "messages")
    out: list[dict] = []
    images: list[bytes] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(f"{where} must be an object with a role and content", where)
        role = message.get("role")
        if role not in ROLES:
            known = ", ".join(ROLES)
            if role in ("tool", "function"):
                raise _bad(f"{where}.role {role!r} is not supported: this server has no tools", f"{where}.role")
            raise _bad(f"{where}.role must be one of {known}, got {role!r}", f"{where}.role")
        content = message.get("content")
        if content is None:
            if message.get("tool_calls") or message.get("function_call"):
                raise _bad(f"{where} holds tool calls, which this server does not support", f"{where}.tool_calls")
            raise _bad(f"{where}.content is missing", f"{where}.content")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list) and content:
            parts = [_part(part, f"{where}.content[{j}]", role, load_image, images)
                     for j, part in enumerate(content)]
        else:
            raise _bad(f"{where}.content must be a string or a non-empty list of parts", f"{where}.content")
        out.append({"role": ROLES[role], "content": parts})
    if out[-1]["role"] != "user":
        raise _bad("the last message must be the user's: the model answers it", f"messages[{len(out) - 1}].role")
    return Conversation(out, images)


def _part(part: Any, where: str, role: str, load_image: ImageFetcher, images: list[bytes]) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" or (role == "assistant" and kind == "refusal"):
        text = part.get(kind)
        if not isinstance(text, str):
            raise _bad(f"{where}.{kind} must be a string", f"{where}.{kind}")
        return {"type": "text", "text": text}
    if kind == "image_url":
        if role != "user":
            raise _bad(f"{where}: only user messages may hold images", where)
        spec = part.get("image_url")
        url = spec.get("url") if isinstance(spec, dict) else spec
        if not isinstance(url, str) or not url:
            raise _bad(f"{where}.image_url.url must be a string URL", f"{where}.image_url.url")
        images.append(load_image(url, f"{where}.image_url.url"))
        return {"type": "image"}
    allowed = "'text' and 'image_url'" if role == "user" else "'text'"
    raise _bad(f"{where}.type {kind!r} is not supported here; {role} content parts may be {allowed}",
               f"{where}.type")


_DATA_URL = re.compile(r"data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.S | re.I)


class ImageLoader:
    """Image bytes from a ``data:`` URL, or from ``http(s)`` where fetching is on (with a size
    limit and an overall timeout); 400 for anything else."""

    def __init__(self, allow_url_fetch: bool = False, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                 timeout: float = DEFAULT_FETCH_TIMEOUT_S):
        self.allow_url_fetch, self.max_bytes, self.timeout = allow_url_fetch, max_bytes, timeout

    def __call__(self, url: str, param: str) -> bytes:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return self._data(url, param)
        if scheme in ("http", "https"):
            if not self.allow_url_fetch:
                raise _bad("image URLs are not fetched: URL fetching is off on this server; send the image "
                           "inline as a data:image/...;base64, URL", param, "image_url_fetch_disabled")
            return self._fetch(url, param)
        raise _bad("an image URL must be a data:image/...;base64, URL"
                   + (" (or http(s), which this server fetches)" if self.allow_url_fetch else ""), param,
                   "invalid_image_url")

    def _data(self, url: str, param: str) -> bytes:
        m = _DATA_URL.fullmatch(url)
        if m is None:
            raise _bad("the data URL is malformed; use data:image/png;base64,<data>", param, "invalid_image_url")
        mime = m.group("mime").strip().lower()
        if mime and not mime.startswith("image/"):
            raise _bad(f"the data URL holds {mime!r}, not an image", param, "invalid_image_url")
        if "base64" not in [p.strip().lower() for p in m.group("params").split(";")]:
            raise _bad("the data URL must be base64-encoded (data:image/...;base64,...)", param, "invalid_image_url")
        data = re.sub(r"\s+", "", m.group("data"))
        if len(data) * 3 // 4 > self.max_bytes + 3:  # before decoding it
            raise self._too_big(len(data) * 3 // 4, param)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            try:  # the URL-safe alphabet, as some clients send it
                raw = base64.b64decode(data, altchars=b"-_", validate=True)
            except (binascii.Error, ValueError):
                raise _bad("the image's data URL is not valid base64", param, "invalid_image_url") from None
        if not raw:
            raise _bad("the image's data URL is empty", param, "invalid_image_url")
        if len(raw) > self.max_bytes:
            raise self._too_big(len(raw), param)
        return raw

    def _too_big(self, size: int, param: str) -> OpenAIError:
        return _bad(f"the image is {_size(size)}, over this server's limit of {_size(self.max_bytes)}", param,
                    "image_too_large")

    def _fetch(self, url: str, param: str) -> bytes:
        deadline = time.monotonic() + self.timeout
        request = urllib.request.Request(url, headers={"User-Agent": "vlm-export", "Accept": "image/*"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > self.max_bytes:
                    raise self._too_big(int(length), param)
                chunks, size = [], 0
                while True:
                    if time.monotonic() > deadline:
                        raise _bad(f"fetching the image took longer than {self.timeout:g} s", param,
                                   "image_fetch_failed")
                    chunk = resp.read(1 << 16)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise self._too_big(size, param)
                    chunks.append(chunk)
        except urllib.error.HTTPError as e:
            raise _bad(f"fetching the image failed: HTTP {e.code} {e.reason}", param, "image_fetch_failed") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            raise _bad(f"fetching the image failed: {reason}", param, "image_fetch_failed") from None
        if not size:
            raise _bad("the fetched image is empty", param, "image_fetch_failed")
        return b"".join(chunks)


# --------------------------------------------------------------------------- responses


def _finish_reason(reason: str) -> str:
    return FINISH_REASONS.get(reason, "stop")


def _usage(finals: list[VLMResponse]) -> dict:
    """OpenAI's usage of a request's choices: the prompt once, every choice's tokens."""
    completion = sum(final.completion_tokens for final in finals)
    return {"prompt_tokens": finals[0].prompt_tokens, "completion_tokens": completion,
            "total_tokens": finals[0].prompt_tokens + completion}


def choice_requests(ask: dict, n: int) -> list[dict]:
    """The VLMClient requests of a request's ``n`` choices: each its own row on the server. A seed
    becomes seed + choice, so seeded choices differ from each other and repeat from run to run."""
    seed = ask.get("seed")
    return [{**ask, "seed": None if seed is None else (seed + i) % 2**63} for i in range(n)]


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


class _EventStream(StreamingResponse):
    """Server-sent events that stop when the client goes away, whatever the ASGI server: the
    body is cancelled on ``http.disconnect`` and its iterator closed in every case (Starlette
    leaves an unfinished async iterator to the garbage collector)."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as group:
                async def body() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the connection broke under a send
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(body)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


_DONE = object()


def _next(iterator: Iterator):
    return next(iterator, _DONE)


# --------------------------------------------------------------------------- the app


def _grpc_url(url: str) -> str:
    return url if "://" in url else f"grpc://{url}"


class _BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 (from its Content-Length at
    once, else as soon as the bytes read pass the limit), before it is all held in memory."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _error(self) -> OpenAIError:
        return OpenAIError(413, f"the request body is over this server's limit of {_size(self.max_bytes)}",
                           code="request_too_large")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._error().response()(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI lets an HTTPException through its body parsing
                    raise StarletteHTTPException(413, self._error().message)
            return message

        await self.app(scope, limited_receive, send)


def create_app(triton_grpc_url: str, model_name: str, allow_url_fetch: bool = False, *,
               triton_model: str = "vlm", max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
               fetch_timeout: float = DEFAULT_FETCH_TIMEOUT_S, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               default_temperature: float = DEFAULT_TEMPERATURE, request_timeout: float = 300.0,
               max_concurrency: int = DEFAULT_MAX_CONCURRENCY, max_images: int = DEFAULT_MAX_IMAGES,
               max_body_bytes: int | None = None) -> FastAPI:
    """The OpenAI-compatible app for the ``triton_model`` served at ``triton_grpc_url``
    (``host:port`` or ``grpc://host:port``), listed and addressed as ``model_name``.

    ``allow_url_fetch``: fetch ``http(s)`` image URLs (each at most ``max_image_bytes``, within
    ``fetch_timeout`` s; at most ``max_images`` per request); off, they are refused with a 400.
    A data-URL image is held to ``max_image_bytes`` too, and a request body to ``max_body_bytes``
    (default: four base64 images at the limit, plus 1 MiB; 413 past it). ``default_max_tokens``
    and ``default_temperature`` stand in where a request leaves them out. ``max_concurrency``:
    requests whose gRPC stream a worker thread waits on at once (more wait for a thread)."""
    from tritonclient.utils import InferenceServerException

    client_errors = (VlmExportError, InferenceServerException)
    client = VLMClient(_grpc_url(triton_grpc_url), model=triton_model, timeout=request_timeout)
    load_image = ImageLoader(allow_url_fetch, max_image_bytes, fetch_timeout)
    created = int(time.time())
    state: dict[str, anyio.CapacityLimiter] = {}

    def limiter() -> anyio.CapacityLimiter:  # made in the event loop, on first use
        if "limiter" not in state:
            state["limiter"] = anyio.CapacityLimiter(max_concurrency)
        return state["limiter"]

    async def in_thread(fn, *args):
        return await anyio.to_thread.run_sync(fn, *args, limiter=limiter())

    app = FastAPI(title="vlm-export OpenAI-compatible API", version="1")
    app.state.vlm_client = client
    if max_body_bytes is None:
        max_body_bytes = 4 * (max_image_bytes * 4 // 3 + 4) + (1 << 20)
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return OpenAIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error").response()

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "vlm-export"}

    def model_ready() -> bool:
        import tritonclient.grpc as grpcclient

        triton = grpcclient.InferenceServerClient(client.address, channel_args=[("grpc.enable_http_proxy", 0)])
        try:
            return bool(triton.is_model_ready(triton_model, client_timeout=5.0))
        except InferenceServerException:
            return False
        finally:
            triton.close()

    @app.get("/health")
    async def health():
        if not await in_thread(model_ready):
            raise OpenAIError(503, f"the model server at {client.address} does not have {triton_model!r} ready",
                              code="service_unavailable", headers={"Retry-After": "1"})
        return {"status": "ok", "model": model_name}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str):
        if model != model_name:
            raise _no_model(model)
        return model_card()

    def _no_model(model: str) -> OpenAIError:
        return OpenAIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        if req.model != model_name:
            raise _no_model(req.model)
        params = generation_params(req, default_max_tokens, default_temperature)
        conversation = await in_thread(to_conversation, req.messages, load_image, max_images)
        asks = choice_requests({**conversation.as_request(), **params}, req.n or 1)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        now = int(time.time())
        if not req.stream:
            try:
                finals = await each_in_thread([partial(client.generate, **ask) for ask in asks])
            except client_errors as e:
                raise error_from_vlm(e) from None
            return {"id": completion_id, "object": "chat.completion", "created": now, "model": model_name,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": final.text, "refusal": None},
                                 "logprobs": openai_logprobs(final.logprobs),
                                 "finish_reason": _finish_reason(final.finish_reason)}
                                for i, final in enumerate(finals)],
                    "usage": _usage(finals)}

        streams = [client.stream(**ask) for ask in asks]
        try:  # the first events before answering: the server's refusal of the request is still a 400
            firsts = await each_in_thread([partial(_next, events) for events in streams])
        except BaseException as e:
            with anyio.CancelScope(shield=True):
                for events in streams:
                    await in_thread(events.close)
            if isinstance(e, client_errors):
                raise error_from_vlm(e) from None
            raise
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return _EventStream(_chunks(streams, firsts, completion_id, now, model_name, usage, in_thread, client_errors),
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def each_in_thread(calls: list) -> list:
        """The calls' results, run at once (each choice's request starts at once); the first error."""
        if len(calls) == 1:
            return [await in_thread(calls[0])]
        results: list = [None] * len(calls)
        errors: list[BaseException] = []

        async def run(i: int) -> None:
            try:
                results[i] = await in_thread(calls[i])
            except client_errors as e:
                errors.append(e)

        async with anyio.create_task_group() as group:
            for i in range(len(calls)):
                group.start_soon(run, i)
        if errors:
            raise errors[0]
        return results

    return app


async def _chunks(streams: list[Iterator], firsts: list, completion_id: str, created: int, model: str,
                  include_usage: bool, in_thread, client_errors: tuple) -> AsyncIterator[bytes]:
    """``chat.completion.chunk`` events: each choice's role, its content deltas and its finish reason,
    then the usage (when asked), ``[DONE]``. The choices' streams are read in turn, one event each:
    their rows step together on the server, so none waits more than a step, and no task is left
    running when the client goes away. Closing this closes every stream, which cancels its gRPC
    stream."""

    def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> bytes:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return _sse(body)

    try:
        for index in range(len(streams)):
            yield chunk(index, {"role": "assistant", "content": ""})
        pending, finals, failed = dict(enumerate(firsts)), {}, None
        while pending and failed is None:
            for index, event in list(pending.items()):
                if event is _DONE:
                    failed = OpenAIError(500, "the model server ended the stream without a final response",
                                         code="internal_error")
                    break
                if isinstance(event, VLMResponse):
                    yield chunk(index, {}, _finish_reason(event.finish_reason))
                    finals[index] = event
                    del pending[index]
                    continue
                if event or event.logprobs:  # an empty piece may carry tokens not yet shown
                    yield chunk(index, {"content": str(event)}, logprobs=openai_logprobs(event.logprobs or None))
                try:
                    pending[index] = await in_thread(_next, streams[index])
                except client_errors as e:  # after the answer began, the error goes in the stream
                    failed = error_from_vlm(e)
                    break
        if failed is not None:
            yield _sse(failed.body())
        elif include_usage:
            yield _sse({"id": completion_id, "object": "chat.completion.chunk", "created": created,
                        "model": model, "choices": [], "usage": _usage([finals[i] for i in sorted(finals)])})
        yield _sse("[DONE]")
    finally:
        with anyio.CancelScope(shield=True):
            for events in streams:
                await in_thread(events.close)


# --------------------------------------------------------------------------- running it


class OpenAIServer:
    """uvicorn serving the app in a daemon thread; ``url`` is the base URL OpenAI clients take."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8080, *, log_level: str = "warning",
                 stop_timeout: float = 5.0):
        import uvicorn

        self.app, self.host, self.stop_timeout = app, host, stop_timeout
        self._socket = _listen(host, port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=max(1, int(stop_timeout)))
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"openai-api-{self.port}", daemon=True)
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{connect_host(self.host)}:{self.port}/v1"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._socket])
        except BaseException as e:  # noqa: BLE001 - reported by start()
            self._error = e

    def start(self, timeout: float = 30.0) -> "OpenAIServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ServeError(f"the OpenAI-compatible API did not start on {self.host}:{self.port}"
                                 + (f": {self._error}" if self._error else ""))
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop serving: open streams are cut after ``stop_timeout`` s (which cancels their
        generation). Idempotent."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(self.stop_timeout + 5)
            if self._thread.is_alive():
                self.server.force_exit = True
                self._thread.join(5)
        self._socket.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "OpenAIServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"the OpenAI-compatible API cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def run_openai_server(triton_grpc_url: str, host: str, port: int, model_name: str, **app_options) -> OpenAIServer:
    """Serve ``create_app(triton_grpc_url, model_name, **app_options)`` on ``host:port`` (0: a
    free port) in a background thread, started; ``.url`` is the base URL, ``.stop()`` stops it."""
    return OpenAIServer(create_app(triton_grpc_url, model_name, **app_options), host, port).start()


def serve_openai_forever(triton_grpc_url: str, host: str = "127.0.0.1", port: int = 9000, model_name: str = "vlm",
                         *, echo=print, **app_options) -> int:
    """Serve the API alone, in front of a Triton that runs elsewhere (``vlm-export serve-openai``,
    the sidecar of a deployment), until Ctrl-C or SIGTERM; returns 0. Requests get 503 while
    Triton cannot be reached; ``GET /health`` says whether it has the model ready."""
    stop = threading.Event()
    old = {s: signal.signal(s, lambda signum, frame: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    api = None
    try:
        api = run_openai_server(triton_grpc_url, host, port, model_name, **app_options)
        echo(f"OpenAI-compatible API on {api.url} (model {model_name!r}), in front of Triton at {triton_grpc_url}")
        echo("Press Ctrl-C to stop.")
        while not stop.wait(0.5):
            if not api.running:
                raise ServeError("the OpenAI-compatible API stopped by itself")
        echo("Stopping ...")
        return 0
    finally:
        for s in old:  # a second Ctrl-C while stopping must not leave it half-stopped
            signal.signal(s, signal.SIG_IGN)
        if api is not None:
            api.stop()
            echo("Stopped.")
        for s, handler in old.items():
            signal.signal(s, handler)
