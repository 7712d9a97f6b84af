"""The OpenAI-compatible endpoint (serve/openai_api.py), asked with the official ``openai`` client,
in front of a real tritonserver serving the python repository of a tiny build; its answers are
compared with VLMClient's for the same request."""
from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import re
import socket
import threading
import urllib.error
import urllib.request

import openai
import pytest
from openai import OpenAI

from vlm_export.client.client import VLMClient
from vlm_export.errors import InputError, RequestError, ServeError
from vlm_export.serve.openai_api import (ChatCompletionRequest, Conversation, ImageLoader, OpenAIError,
                                         error_from_vlm, generation_params, run_openai_server, to_conversation)
from conftest import a_word_spelt_in, wait_for  # noqa: E402

MODEL = "tiny-llava"
PROMPTS = ["What is in the picture?", "Describe the colors.", "Is there an animal?"]
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    from PIL import Image
    from skimage import data

    out = []
    for name in ("chelsea", "coffee", "astronaut"):
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).resize((96, 96)).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def stack(llava_server):
    """(tritonserver, the OpenAI API in front of it). The tritonserver (the tiny llava build's python
    repository) is the one test_serving's tests use too (conftest), stopped when the session ends; the API is
    stopped at the end of this module, whatever happens."""
    _, triton = llava_server
    api = run_openai_server(triton.grpc_url, "127.0.0.1", 0, MODEL)
    try:
        yield triton, api
    finally:
        api.stop()


@pytest.fixture()
def oai(stack):
    client = OpenAI(base_url=stack[1].url, api_key="none", max_retries=0, timeout=120)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture()
def vlm(stack):
    return VLMClient(f"grpc://{stack[0].grpc_url}")


@pytest.fixture(scope="module")
def tokenizer(llava_server):
    """The served build's own tokenizer (for the words bad_words spells)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llava_server[0] / "tokenizer")


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def image_part(image: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(image)}}


def ask(oai, content, **params):
    messages = content if isinstance(content, list) and content and "role" in content[0] else \
        [{"role": "user", "content": content}]
    return oai.chat.completions.create(model=MODEL, messages=messages, **{"temperature": 0, **params})


def _metric(server, name: str) -> float:
    with _NO_PROXY.open(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M))


def test_answers_equal_vlm_client(oai, vlm, images, tokenizer):
    for prompt, image in zip(PROMPTS, images):
        got = ask(oai, [image_part(image), {"type": "text", "text": prompt}], max_tokens=12)
        want = vlm.generate(prompt, [image], max_tokens=12)
        assert got.object == "chat.completion" and got.model == MODEL and got.id.startswith("chatcmpl-")
        assert len(got.choices) == 1 and got.choices[0].index == 0
        assert got.choices[0].message.role == "assistant"
        assert got.choices[0].message.content == want.text
        assert got.choices[0].finish_reason == FINISH[want.finish_reason]
        assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.total_tokens) == (
            want.prompt_tokens, want.completion_tokens, want.prompt_tokens + want.completion_tokens)
    # text only (a plain string), max_completion_tokens, two images before the text
    got = ask(oai, "Hello there", max_completion_tokens=6)
    want = vlm.generate("Hello there", max_tokens=6)
    assert got.choices[0].message.content == want.text and got.usage.completion_tokens == want.completion_tokens
    got = ask(oai, [image_part(images[0]), image_part(images[1]), {"type": "text", "text": "Compare them."}],
              max_tokens=6)
    assert got.choices[0].message.content == vlm.generate("Compare them.", images[:2], max_tokens=6).text
    # a stop string met in the answer: the text ends before it, finish_reason "stop"
    full = vlm.generate(PROMPTS[0], [images[0]], max_tokens=12, ignore_eos=True).text
    stop = full.strip()[2:5]
    assert stop.strip(), full
    want = vlm.generate(PROMPTS[0], [images[0]], max_tokens=12, stop=(stop,))
    for stops in (stop, [stop, "never appears"]):
        got = ask(oai, [image_part(images[0]), {"type": "text", "text": PROMPTS[0]}], max_tokens=12, stop=stops)
        assert got.choices[0].message.content == want.text and got.choices[0].finish_reason == "stop"
        assert stop not in got.choices[0].message.content
    # OpenAI's penalties and vLLM's repetition_penalty reach the server: the VLMClient's answer with the same
    for penalties in ({"frequency_penalty": -1.0}, {"presence_penalty": 1.5}, {"repetition_penalty": 1.5}):
        openai_args = {k: v for k, v in penalties.items() if k != "repetition_penalty"}
        extra = {k: v for k, v in penalties.items() if k == "repetition_penalty"}
        got = ask(oai, [image_part(images[1]), {"type": "text", "text": PROMPTS[1]}], max_tokens=12,
                  extra_body={"ignore_eos": True, **extra}, **openai_args)
        want = vlm.generate(PROMPTS[1], [images[1]], max_tokens=12, ignore_eos=True, **penalties)
        assert got.choices[0].message.content == want.text, penalties
    # logit_bias: the first token of the plain answer banned, another favoured; the VLMClient's answer with the same
    plain = vlm.generate(PROMPTS[1], [images[1]], max_tokens=12, ignore_eos=True, logprobs=True)
    bias = {plain.logprobs[0]["token_id"]: -100.0, plain.logprobs[1]["token_id"]: 3.0}
    got = ask(oai, [image_part(images[1]), {"type": "text", "text": PROMPTS[1]}], max_tokens=12,
              logit_bias={str(k): v for k, v in bias.items()}, extra_body={"ignore_eos": True})
    want = vlm.generate(PROMPTS[1], [images[1]], max_tokens=12, ignore_eos=True, logit_bias=bias)
    assert got.choices[0].message.content == want.text != plain.text
    assert ask(oai, "Hello there", max_tokens=8, frequency_penalty=-2.0, extra_body={"ignore_eos": True}) \
        .choices[0].message.content != ask(oai, "Hello there", max_tokens=8, extra_body={"ignore_eos": True}) \
        .choices[0].message.content
    # seeded sampling is reproducible, and max_tokens reached is "length"
    a, b = (ask(oai, "Tell me a story.", max_tokens=8, temperature=1.2, seed=11,
                extra_body={"ignore_eos": True}) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].finish_reason == "length" and a.usage.completion_tokens == 8
    # vLLM's bad_words, top_k and min_p reach the sampler: the VLMClient's answer with the same, each another one
    plain = vlm.generate(PROMPTS[1], [images[1]], max_tokens=12, ignore_eos=True, logprobs=True)
    word = a_word_spelt_in(tokenizer, plain.text, [e["token_id"] for e in plain.logprobs])
    got = ask(oai, [image_part(images[1]), {"type": "text", "text": PROMPTS[1]}], max_tokens=12,
              extra_body={"ignore_eos": True, "bad_words": [word]})
    want = vlm.generate(PROMPTS[1], [images[1]], max_tokens=12, ignore_eos=True, bad_words=[word])
    assert got.choices[0].message.content == want.text != plain.text
    for narrowing in ({"top_k": 2}, {"min_p": 0.5}):
        got = ask(oai, "Tell me a story.", max_tokens=8, temperature=1.2, seed=11,
                  extra_body={"ignore_eos": True, **narrowing})
        want = vlm.generate("Tell me a story.", max_tokens=8, temperature=1.2, seed=11, ignore_eos=True, **narrowing)
        assert got.choices[0].message.content == want.text != a.choices[0].message.content, narrowing


def test_several_choices_are_requests_of_their_own(oai, vlm, images):
    """n choices: each the VLMClient's answer with seed + its index (so they differ and repeat), the
    usage counting the prompt once; streamed, each choice's chunks (by index) make the same text."""
    content = [image_part(images[2]), {"type": "text", "text": PROMPTS[2]}]
    sampled = dict(max_tokens=8, temperature=1.2, seed=5, extra_body={"ignore_eos": True})
    want = [vlm.generate(PROMPTS[2], [images[2]], max_tokens=8, temperature=1.2, seed=5 + i, ignore_eos=True)
            for i in range(3)]
    assert len({w.text for w in want}) == 3, want
    got = ask(oai, content, n=3, **sampled)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.message.content for c in got.choices] == [w.text for w in want]
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want[0].prompt_tokens, 24)
    chunks = list(ask(oai, content, n=3, stream=True, stream_options={"include_usage": True}, **sampled))
    texts, finishes = ["", "", ""], [None, None, None]
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    assert texts == [w.text for w in want] and finishes == ["length"] * 3
    assert chunks[-1].usage.completion_tokens == 24
    greedy = ask(oai, content, n=2, max_tokens=6)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_streaming_equals_non_streaming(oai, vlm, images, stack):
    content = [image_part(images[0]), {"type": "text", "text": PROMPTS[0]}]
    want = vlm.generate(PROMPTS[0], [images[0]], max_tokens=12)
    for include_usage in (False, True):
        options = {"stream_options": {"include_usage": True}} if include_usage else {}
        chunks = list(ask(oai, content, max_tokens=12, stream=True, **options))
        assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
        assert chunks[0].choices[0].delta.role == "assistant"
        with_choices = [c for c in chunks if c.choices]
        assert "".join(c.choices[0].delta.content or "" for c in with_choices) == want.text
        assert len([c for c in with_choices if (c.choices[0].delta.content or "")]) > 1  # it did stream
        finished = [c for c in with_choices if c.choices[0].finish_reason]
        assert finished == with_choices[-1:] and finished[0].choices[0].finish_reason == FINISH[want.finish_reason]
        if include_usage:  # a last chunk without choices carries the usage; the others have none
            assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == want.completion_tokens
            assert chunks[-1].usage.prompt_tokens == want.prompt_tokens
            assert all(c.usage is None for c in chunks[:-1])
        else:
            assert chunks[-1] is with_choices[-1] and all(c.usage is None for c in chunks)
    # the raw events: text/event-stream, "data: {...}" lines, "data: [DONE]" last
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 12,
            "temperature": 0, "stream": True}
    req = urllib.request.Request(f"{stack[1].url}/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with _NO_PROXY.open(req, timeout=120) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in resp.read().decode().split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]) == want.text


def test_logprobs_equal_vlm_clients(oai, vlm, images):
    """logprobs / top_logprobs: OpenAI's per-token entries, equal to VLMClient's for the same request,
    streamed chunk by chunk the same as whole; without them, none."""
    content = [image_part(images[0]), {"type": "text", "text": PROMPTS[0]}]
    want = vlm.generate(PROMPTS[0], [images[0]], max_tokens=8, logprobs=True, top_logprobs=2, ignore_eos=True)
    assert len(want.logprobs) == want.completion_tokens == 8
    got = ask(oai, content, max_tokens=8, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    entries = got.choices[0].logprobs.content

    def flat(entries):  # (token, bytes) and logprob of every token and alternative, in order
        return [((e.token, e.bytes), e.logprob) for entry in entries for e in [entry, *entry.top_logprobs]]

    # the logprobs to the float noise of a prompt served again (continued from the prefix cache)
    theirs = [((e["token"], e["bytes"]), e["logprob"]) for w in want.logprobs for e in [w, *w["top_logprobs"]]]
    assert [f[0] for f in flat(entries)] == [t[0] for t in theirs]
    assert [f[1] for f in flat(entries)] == pytest.approx([t[1] for t in theirs], abs=1e-5)
    assert all((e.bytes == list(e.token.encode()) or "\ufffd" in e.token) and e.logprob <= 0 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= -1e30 for e in entries)
    streamed = [e for chunk in ask(oai, content, max_tokens=8, logprobs=True, top_logprobs=2, stream=True,
                                   extra_body={"ignore_eos": True})
                for choice in chunk.choices if choice.logprobs for e in choice.logprobs.content]
    assert [f[0] for f in flat(streamed)] == [f[0] for f in flat(entries)]
    assert [f[1] for f in flat(streamed)] == pytest.approx([f[1] for f in flat(entries)], abs=1e-5)
    assert ask(oai, content, max_tokens=4).choices[0].logprobs is None


def test_models_listed(oai, stack):
    assert [m.id for m in oai.models.list()] == [MODEL]
    with _NO_PROXY.open(f"{stack[1].url.removesuffix('/v1')}/health", timeout=30) as resp:  # the readiness probe
        assert json.loads(resp.read()) == {"status": "ok", "model": MODEL}
    assert oai.models.retrieve(MODEL).owned_by == "vlm-export"
    with pytest.raises(openai.NotFoundError) as err:
        oai.models.retrieve("gpt-4o")
    assert err.value.code == "model_not_found"


def _assert_openai_error(err, status: int, needle: str, param: str | None = None):
    assert err.status_code == status, (err.status_code, err.body)
    assert set(err.body) == {"message", "type", "param", "code"}, err.body
    assert err.body["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert needle.lower() in err.body["message"].lower(), err.body
    if param is not None:
        assert err.body["param"] == param, err.body


def test_bad_requests_get_openai_errors(oai, images):
    user = functools.partial(dict, role="user")
    hi = {"type": "text", "text": "hi"}

    def with_url(url):
        return {"messages": [user(content=[{"type": "image_url", "image_url": {"url": url}}, hi])]}

    bad = {  # name: (create()'s arguments, the message says, param)
        "http image URL": (with_url("http://example.com/a.png"), "URL fetching is off",
                           "messages[0].content[0].image_url.url"),
        "n=17": ({"n": 17}, "n must be in 1..16", "n"),
        "bad base64": (with_url("data:image/png;base64,%%%"), "not valid base64",
                       "messages[0].content[0].image_url.url"),
        # refused by the vlm model itself (its message passed on)
        "not an image": (with_url(data_url(b"not an image at all")), "cannot be decoded", None),
        "max_tokens=0": ({"max_tokens": 0}, "max_tokens", "max_tokens"),
        "max_tokens over the server's cap": ({"max_tokens": 100000}, "max_tokens", "max_tokens"),
        "max_tokens past 32 bits": ({"max_tokens": 2**32 + 2}, "max_tokens", "max_tokens"),
        "max_tokens past 64 bits": ({"max_tokens": 2**64 + 2}, "max_tokens", "max_tokens"),
        "prompt over max_sequence": ({"messages": [user(content="word " * 400)], "max_tokens": 8}, "max_sequence",
                                     None),
        "too many images": ({"messages": [user(content=[image_part(images[0])] * 3 + [hi])]}, "at most 2", None),
        "tool role": ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "not supported",
                      "messages[0].role"),
        "assistant last": ({"messages": [user(content="hi"), {"role": "assistant", "content": "hello"}]},
                           "last message", None),
        "empty messages": ({"messages": []}, "non-empty", "messages"),
        "temperature": ({"temperature": 3}, "temperature", "temperature"),
        "seed": ({"seed": -1}, "seed", "seed"),
        "frequency_penalty": ({"frequency_penalty": 2.5}, "frequency_penalty", "frequency_penalty"),
        "logit_bias past the vocabulary": ({"logit_bias": {"999999999": 1}}, "outside this model's vocabulary",
                                           "logit_bias"),
        "audio part": ({"messages": [user(content=[{"type": "input_audio", "input_audio": {"format": "wav"}}])]},
                       "not supported", "messages[0].content[0].type"),
    }
    for name, (params, needle, param) in bad.items():
        args = {"model": MODEL, "messages": [user(content="hi")], "max_tokens": 4, **params}
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(**args)
        _assert_openai_error(err.value, 400, needle, param)
        if name in ("not an image", "too many images"):  # refused by the server before streaming began: 400 too
            with pytest.raises(openai.BadRequestError) as err:
                oai.chat.completions.create(**args, stream=True)
            _assert_openai_error(err.value, 400, needle, param)
    # a body without messages, and one that is not JSON
    with pytest.raises(openai.BadRequestError) as err:
        oai.post("/chat/completions", cast_to=object, body={"model": MODEL})
    _assert_openai_error(err.value, 400, "messages", "messages")
    req = urllib.request.Request(f"{oai.base_url}chat/completions", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        _NO_PROXY.open(req, timeout=60)
    assert err.value.code == 400
    body = json.loads(err.value.read())["error"]
    assert set(body) == {"message", "type", "param", "code"} and "not valid JSON" in body["message"]
    with pytest.raises(openai.NotFoundError) as err:
        oai.chat.completions.create(model="gpt-4o", messages=[user(content="hi")])
    _assert_openai_error(err.value, 404, "does not exist", "model")
    # still serving, still right
    assert ask(oai, "Hello there", max_tokens=3).usage.completion_tokens <= 3


# --------------------------------------------------------------------------- conversations


def test_conversations_equal_vlm_client(oai, vlm, images):
    turns = [  # (OpenAI's message, Hugging Face's)
        ({"role": "system", "content": "You are brief."}, {"role": "system", "content": "You are brief."}),
        ({"role": "user", "content": [image_part(images[0]), {"type": "text", "text": "What is this?"}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}),
        ({"role": "assistant", "content": "A cat on a rug."}, {"role": "assistant", "content": "A cat on a rug."}),
        ({"role": "user", "content": "What colour is it?"}, {"role": "user", "content": "What colour is it?"}),
    ]
    for start in (1, 0):  # three turns, then the same with a system message first
        got = ask(oai, [t[0] for t in turns[start:]], max_tokens=8)
        want = vlm.generate(None, [images[0]], messages=[t[1] for t in turns[start:]], max_tokens=8)
        assert got.choices[0].message.content == want.text
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, want.completion_tokens)
    assert ask(oai, [t[0] for t in turns[1:]], max_tokens=8).usage.prompt_tokens != \
        ask(oai, [turns[1][0]], max_tokens=8).usage.prompt_tokens  # the earlier turns were in the prompt
    # two images in one message, the text between them; streamed too
    content = [image_part(images[1]), {"type": "text", "text": "and"}, image_part(images[2]),
               {"type": "text", "text": "Which one is brighter?"}]
    hf = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"},
                                       {"type": "text", "text": "Which one is brighter?"}]}]
    want = vlm.generate(None, images[1:3], messages=hf, max_tokens=8)
    assert ask(oai, content, max_tokens=8).choices[0].message.content == want.text
    chunks = ask(oai, content, max_tokens=8, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == want.text
    # over the build's limits: too long a conversation, and more images than it takes, across turns
    long = [{"role": "user", "content": "tell me more " * 30}, {"role": "assistant", "content": "well " * 30}] * 2
    with pytest.raises(openai.BadRequestError) as err:
        ask(oai, long + [{"role": "user", "content": "and?"}], max_tokens=8)
    _assert_openai_error(err.value, 400, "max_sequence")
    three = [turns[1][0], turns[2][0], {"role": "user", "content": [image_part(images[1]), image_part(images[2]),
                                                                     {"type": "text", "text": "And these?"}]}]
    with pytest.raises(openai.BadRequestError) as err:
        ask(oai, three, max_tokens=8)
    _assert_openai_error(err.value, 400, "at most 2")


# --------------------------------------------------------------------------- cancellation, URLs, the handle


def test_disconnect_stops_generation(oai, stack, llava_server):
    """A client that goes away mid-stream cancels its row. The tiny model makes its longest answer
    (the build's max_sequence less the prompt, ~240 tokens) in a quarter of a second, so on a loaded
    machine it can finish before the disconnect (client socket, uvicorn, the body's worker thread, the
    gRPC stream, Triton's core, the stub) reaches it: once in CI, three tries of 200 tokens all did.
    Such a try shows nothing either way (its row finished, nothing was cancelled) and is made again,
    for up to a minute; a disconnect that is never acted on fails them all."""
    import time

    from vlm_export.contract.limits import Limits
    from vlm_export.manifest import read_manifest

    triton = stack[0]
    story = "Tell me a long story."
    prompt_tokens = ask(oai, story, max_tokens=1).usage.prompt_tokens
    longest = Limits.from_dict(read_manifest(llava_server[0])["limits"]).max_sequence - prompt_tokens
    deadline, tries = time.monotonic() + 60, 0
    while True:
        tries += 1
        cancelled = _metric(triton, "vlm_requests_cancelled_total")
        finished = _metric(triton, "vlm_requests_finished_total")
        stream = ask(oai, story, max_tokens=longest, stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # the first piece of the answer: the row is decoding
        stream.close()  # the client goes away mid-answer
        assert wait_for(lambda: _metric(triton, "vlm_requests_cancelled_total") >= cancelled + 1
                        or _metric(triton, "vlm_requests_finished_total") >= finished + 1), \
            triton.log_file.read_text()[-2000:]
        if _metric(triton, "vlm_requests_cancelled_total") >= cancelled + 1:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"{tries} streams of {longest} tokens whose clients disconnected after the first piece all "
                        "ran to their end")
    after = _metric(triton, "vlm_decode_steps_total")
    assert not wait_for(lambda: _metric(triton, "vlm_decode_steps_total") != after, seconds=1.0)  # nothing runs on
    assert ask(oai, "Hello there", max_tokens=3).usage.completion_tokens <= 3


class _Files(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_image_urls_fetched_when_allowed(stack, vlm, images, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    _Files.files = {"/cat.png": images[0], "/big.png": images[0] + b"\0" * 200_000}
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{files.server_address[1]}"
    api = client = None
    try:
        api = run_openai_server(stack[0].grpc_url, "127.0.0.1", 0, MODEL, allow_url_fetch=True,
                                max_image_bytes=100_000)
        client = OpenAI(base_url=api.url, api_key="none", max_retries=0, timeout=120)

        def url_content(url):
            return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPTS[0]}]

        got = ask(client, url_content(f"{base}/cat.png"), max_tokens=8)
        assert got.choices[0].message.content == vlm.generate(PROMPTS[0], [images[0]], max_tokens=8).text
        for path, needle in (("/big.png", "over this server's limit"), ("/missing.png", "HTTP 404")):
            with pytest.raises(openai.BadRequestError) as err:
                ask(client, url_content(base + path), max_tokens=8)
            _assert_openai_error(err.value, 400, needle, "messages[0].content[0].image_url.url")
        with pytest.raises(openai.BadRequestError) as err:  # other schemes stay refused
            ask(client, url_content("file:///etc/passwd"), max_tokens=8)
        _assert_openai_error(err.value, 400, "data:image", "messages[0].content[0].image_url.url")
    finally:
        if client is not None:
            client.close()
        if api is not None:
            api.stop()
        files.shutdown()
        files.server_close()


def test_server_handle_and_unreachable_triton(stack):
    taken = stack[1].port
    with pytest.raises(ServeError, match="cannot listen"):
        run_openai_server(stack[0].grpc_url, "127.0.0.1", taken, MODEL)
    # nothing listens on the Triton port given: 503 with OpenAI's body
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    api = run_openai_server(f"127.0.0.1:{dead}", "127.0.0.1", 0, MODEL, max_body_bytes=20_000)
    client = OpenAI(base_url=api.url, api_key="none", max_retries=0, timeout=60)
    try:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as err:
                ask(client, "hi", max_tokens=2, stream=stream)
            _assert_openai_error(err.value, 503, "cannot", None)
        with pytest.raises(urllib.error.HTTPError) as err:
            _NO_PROXY.open(f"{api.url.removesuffix('/v1')}/health", timeout=30)
        assert err.value.code == 503 and json.loads(err.value.read())["error"]["code"] == "service_unavailable"
        # a body over the limit: 413, before any of it is decoded
        with pytest.raises(openai.APIStatusError) as err:
            ask(client, [image_part(b"\0" * 20_000), {"type": "text", "text": "hi"}])
        _assert_openai_error(err.value, 413, "over this server's limit")
    finally:
        client.close()
        api.stop()
    assert not api.running
    api.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        _NO_PROXY.open(f"{api.url}/models", timeout=5)


def test_sidecar_serves_until_sigterm():
    """serve_openai_forever (the deployment's sidecar command): up, answering, stopped by SIGTERM."""
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import sys; from vlm_export.serve.openai_api import serve_openai_forever; "
            f"sys.exit(serve_openai_forever('127.0.0.1:1', '127.0.0.1', {port}, 'm'))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            try:
                with _NO_PROXY.open(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
                    return json.loads(resp.read())["data"][0]["id"] == "m"
            except OSError:
                return False

        assert wait_for(up, seconds=60), proc.stdout.read() if proc.poll() is not None else "not up"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "Press Ctrl-C to stop." in out and "Stopped." in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not up()


# --------------------------------------------------------------------------- units (no server)


def test_messages_become_hugging_face_conversations():
    seen = []

    def load(url, param):
        seen.append((url, param))
        return url.encode()

    conv = to_conversation([
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                     {"type": "image_url", "image_url": {"url": "a"}}]},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
        {"role": "user", "name": "bob", "content": [{"type": "image_url", "image_url": "b"},  # a bare URL string too
                                                    {"type": "text", "text": "Now?"}]},
    ], load)
    assert conv.messages == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "No."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Now?"}]},
    ]
    assert conv.images == [b"a", b"b"]
    assert seen[1] == ("b", "messages[3].content[0].image_url.url")
    assert conv.as_request()["messages"] == conv.messages and conv.as_request()["prompt"] is None
    # one user turn of images then its text is a plain prompt (what any served repository takes)
    one = to_conversation([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                                        {"type": "text", "text": "Hi"}]}], load)
    assert one.as_request() == {"prompt": "Hi", "images": [b"x"]}
    assert Conversation([{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image"}]}],
                        [b"x"]).as_request()["prompt"] is None
    # too many images are refused before any is loaded
    seen.clear()
    with pytest.raises(OpenAIError, match="at most 2") as err:
        to_conversation([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}] * 3}], load,
                        max_images=2)
    assert err.value.param == "messages" and seen == []
    for messages, param in (
        ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
          {"role": "user", "content": "hi"}], "messages[0].content[0]"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": []}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages[0].content[0].text"),
        ([{"role": "critic", "content": "hi"}], "messages[0].role"),
        (["hi"], "messages[0]"),
    ):
        with pytest.raises(OpenAIError) as err:
            to_conversation(messages, load)
        assert err.value.status == 400 and err.value.param == param, (messages, err.value.body())


def test_data_urls():
    load = ImageLoader(max_bytes=10)
    assert load("data:image/png;base64," + base64.b64encode(b"12345").decode(), "p") == b"12345"
    assert load("DATA:image/png;base64," + base64.urlsafe_b64encode(b"\xfb\xff").decode(), "p") == b"\xfb\xff"
    for url, needle in (("data:image/png;base64,####", "base64"), ("data:image/png,abc", "base64"),
                        ("data:text/plain;base64,YWJj", "not an image"), ("data:image/png;base64,", "empty"),
                        ("data:image/png;base64," + base64.b64encode(b"x" * 11).decode(), "limit"),
                        ("ftp://x/y.png", "data:image"), ("https://x/y.png", "fetching is off")):
        with pytest.raises(OpenAIError, match=needle) as err:
            load(url, "p")
        assert err.value.status == 400 and err.value.param == "p"


def test_parameters_and_error_mapping():
    def params(**kw):
        return generation_params(ChatCompletionRequest(model="m", messages=[], **kw))

    assert params() == {"max_tokens": 64, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
                        "seed": None, "stop": (), "bad_words": (),
                        "ignore_eos": False, "presence_penalty": 0.0, "frequency_penalty": 0.0,
                        "repetition_penalty": None, "min_tokens": None, "logprobs": False, "top_logprobs": 0,
                        "logit_bias": None}
    assert params(logit_bias={"12": -100, "7": 2.5})["logit_bias"] == {12: -100.0, 7: 2.5}
    got = params(presence_penalty=-2, frequency_penalty=1.5, repetition_penalty=1.2)
    assert (got["presence_penalty"], got["frequency_penalty"], got["repetition_penalty"]) == (-2, 1.5, 1.2)
    assert params(max_tokens=5, max_completion_tokens=7, stop="x", seed=3, temperature=0)["max_tokens"] == 7
    assert params(stop=["a", "b"])["stop"] == ("a", "b")
    assert params(bad_words=["a b", "c"])["bad_words"] == ("a b", "c")
    assert params(top_p=0)["top_p"] == 0.0  # OpenAI's API takes 0: the top token only
    assert (params(top_k=-1)["top_k"], params(top_k=20)["top_k"], params(min_p=0.1)["min_p"]) == (0, 20, 0.1)  # vLLM's
    for kw, param in (({"n": 0}, "n"), ({"n": 17}, "n"), ({"max_completion_tokens": 0}, "max_completion_tokens"),
                      ({"top_p": -0.1}, "top_p"), ({"top_p": 1.01}, "top_p"), ({"stop": [""]}, "stop"),
                      ({"top_k": -2}, "top_k"), ({"bad_words": ["x", " "]}, "bad_words"), ({"top_k": 2**31}, "top_k"), ({"min_p": 1.5}, "min_p"),
                      ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
                      ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_tokens": 65}, "min_tokens"),
                      ({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                      ({"logit_bias": {"a": 1}}, "logit_bias"), ({"logit_bias": {"-3": 1}}, "logit_bias"),
                      ({"logit_bias": {"3": 100.5}}, "logit_bias"),
                      ({"logit_bias": {"5": 1, "05": -1}}, "logit_bias"),
                      ({"tools": [{"type": "function"}]}, "tools"),
                      ({"response_format": {"type": "json_object"}}, "response_format")):
        with pytest.raises(OpenAIError) as err:
            params(**kw)
        assert (err.value.status, err.value.param) == (400, param)
    from tritonclient.utils import InferenceServerException

    cases = [
        (RequestError("server busy: 2 requests already wait for a place (queue limit 2); retry later"), 503,
         "server_busy"),
        (RequestError("the model is shutting down; retry on another instance"), 503, "service_unavailable"),
        (ServeError("cannot reach 127.0.0.1:1: failed to connect to all addresses"), 503, "service_unavailable"),
        (InferenceServerException("The stream is no longer in valid state"), 503, "service_unavailable"),
        (RequestError("internal error: ValueError: boom"), 500, "internal_error"),
        (RequestError("no response from vlm within 300 s"), 500, "internal_error"),
        (RequestError("max_tokens must be an integer in 1..4096, got 0"), 400, None),
        (RequestError("image 0 cannot be decoded: not an image"), 400, None),
        (InputError("cannot read image x"), 400, None),
    ]
    for err, status, code in cases:
        mapped = error_from_vlm(err)
        assert (mapped.status, mapped.code) == (status, code), (err, mapped.body())
        assert mapped.type == ("invalid_request_error" if status < 500 else "server_error")
    assert error_from_vlm(RequestError("max_tokens must be an integer in 1..4096, got 0")).param == "max_tokens"
    assert error_from_vlm(RequestError("server busy: ...")).headers == {"Retry-After": "1"}
