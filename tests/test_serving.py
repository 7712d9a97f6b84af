"""The served path: a real tritonserver (the one in nvidia-pytriton) on free ports, the python
target of a tiny build, real HTTP and gRPC clients."""
from __future__ import annotations

import base64
import json
import math
import os
import re
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from vlm_export.client.client import VLMClient, VLMResponse
from vlm_export.errors import RepositoryError, RequestError, ServeError
from vlm_export.model_repository.render import (RepositoryOptions, check_against_graphs, model_configs,
                                                parse_config, render_repository, to_pbtxt)
from vlm_export.runtime.generate import GenerationConfig, generate, prepare_request
from vlm_export.runtime.load import open_build
from vlm_export.serve.server import TritonServer
from conftest import a_word_spelt_in, common_prefix, wait_for  # noqa: E402

PROMPTS = ["What is in the picture?", "Describe the colors.", "Is there an animal?"]


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` pixels with almost no data: what a
    decompression bomb looks like before it is decoded (a reader must refuse it from the header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data
    from PIL import Image

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("chelsea", "coffee", "astronaut"):
        path = folder / f"{name}.png"
        Image.fromarray(getattr(data, name)()).resize((96, 96)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def served(llava_server):
    return llava_server


def greedy_margin(pipe, prompt, images, max_new_tokens: int) -> float:
    """The smallest gap between the best and the second-best logit over the greedy steps of this
    request (each step's logits from a prefill of the prompt plus the tokens chosen so far).

    Served rows share decoder calls with whatever else is running (in-flight batching), so their
    logits carry float rounding that depends on the grouping: at most 2.4e-7 here (measured: this
    build's rows alone vs. all together vs. mixed groups; the image path batched by the ensemble
    gave bit-identical embeddings). A margin far above that makes the greedy answer the same
    however the requests were grouped: the exact-answer checks cannot flake on it."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    result = generate(pipe, prompt, images, config)
    ids, image_input = prepare_request(pipe, prompt, images, config)
    steps = len(result.token_ids) + (1 if result.finish_reason == "eos" else 0)  # EOS was a choice too
    gaps = []
    for k in range(steps):
        logits, _ = pipe.prefill(ids + result.token_ids[:k], image_input)
        best, second = np.sort(logits.astype(np.float64))[[-1, -2]]
        gaps.append(best - second)
    return min(gaps)


BATCH_NOISE = 2.4e-7  # measured (greedy_margin's docstring)


@pytest.mark.parametrize("target", ["python", "onnxruntime", "tensorrt"])
def test_configs_fit_schema_and_graphs(tiny_build, target):
    manifest = json.loads((tiny_build("llava-llama").path / "manifest.json").read_text())
    configs = model_configs(manifest, RepositoryOptions(target=target))
    check_against_graphs(configs, tiny_build("llava-llama").path, manifest)
    for cfg in configs.values():
        parsed = parse_config(cfg)
        assert parsed.name == cfg["name"]
    if target == "python":  # the decoder runs inside the vlm model (in_process): no model of its own
        assert "lm_decoder" not in configs
        configs = model_configs(manifest, RepositoryOptions(target=target, decoder_mode="bls"))
    assert configs["lm_decoder"]["max_batch_size"] == 0
    platform = {"python": None, "onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}[target]
    assert configs["lm_decoder"].get("platform") == platform
    assert "decoupled: true" in to_pbtxt(configs["vlm"])


def test_config_errors_are_loud(tiny_build, tmp_path):
    manifest = json.loads((tiny_build("llava-llama").path / "manifest.json").read_text())
    configs = model_configs(manifest, RepositoryOptions())
    with pytest.raises(RepositoryError, match="schema"):
        parse_config({**configs["vlm"], "max_batchsize": 3})
    configs["projector"]["output"][0]["dims"] = [5, 7]
    with pytest.raises(RepositoryError, match="projector.image_embeds"):
        check_against_graphs(configs, tiny_build("llava-llama").path, manifest)
    # the check reads the graph files themselves: a graph swapped after the build is caught
    import shutil

    build = tmp_path / "swapped"
    shutil.copytree(tiny_build("llava-llama").path, build)
    shutil.copy(build / "graphs" / "vision_encoder.onnx", build / "graphs" / "projector.onnx")
    good = model_configs(manifest, RepositoryOptions())
    with pytest.raises(RepositoryError, match=r"projector inputs \['image_features'\] != graph \['pixel_values'\]"):
        check_against_graphs(good, build, manifest)
    with pytest.raises(RepositoryError, match="no TensorRT engines"):
        render_repository(tiny_build("llava-llama").path, tmp_path / "trt", RepositoryOptions(target="tensorrt"))
    assert not (tmp_path / "trt").exists()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_answers_equal_in_process(served, photos, protocol):
    build, server = served
    pipe = open_build(build)
    url = f"http://{server.http_url}" if protocol == "http" else f"grpc://{server.grpc_url}"
    client = VLMClient(url)
    for prompt, image in zip(PROMPTS, photos):
        expected = generate(pipe, prompt, [image], GenerationConfig(max_new_tokens=12))
        got = client.generate(prompt, [image], max_tokens=12)
        assert got.text == expected.text
        assert (got.completion_tokens, got.prompt_tokens, got.finish_reason) == (
            expected.completion_tokens, expected.prompt_tokens, expected.finish_reason)
    # text only, and two images
    expected = generate(pipe, "Hello there", [], GenerationConfig(max_new_tokens=6))
    assert client.generate("Hello there", max_tokens=6).text == expected.text
    expected = generate(pipe, "Compare them.", photos[:2], GenerationConfig(max_new_tokens=6))
    assert client.generate("Compare them.", photos[:2], max_tokens=6).text == expected.text


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_streaming_equals_non_streaming(served, photos, protocol):
    _, server = served
    client = VLMClient(f"http://{server.http_url}" if protocol == "http" else f"grpc://{server.grpc_url}")
    whole = client.generate(PROMPTS[0], [photos[0]], max_tokens=10, stop=("xyz",))
    events = list(client.stream(PROMPTS[0], [photos[0]], max_tokens=10, stop=("xyz",)))
    pieces, final = events[:-1], events[-1]
    assert isinstance(final, VLMResponse) and all(isinstance(p, str) for p in pieces)
    assert len(pieces) > 1
    assert "".join(pieces) == whole.text
    assert final.completion_tokens == whole.completion_tokens == 10


def test_seeded_sampling_served_equals_in_process(served):
    """temperature, top_p, top_k, min_p and seed reach the served sampler: the served answer is the in-process
    answer for the same settings, and each setting changes the answer (so a server that ignored
    any of them could not pass)."""
    build, server = served
    pipe = open_build(build)
    prompt = "Tell me a story."
    settings = [dict(temperature=1.2, top_p=1.0, seed=11), dict(temperature=1.2, top_p=1.0, seed=12),
                dict(temperature=1.2, top_p=0.5, seed=11), dict(temperature=0.0, top_p=1.0, seed=11),
                dict(temperature=1.2, top_k=3, seed=11), dict(temperature=1.2, min_p=0.5, seed=11)]
    expected = [generate(pipe, prompt, [], GenerationConfig(max_new_tokens=8, **kw)).text for kw in settings]
    assert len(set(expected)) == len(expected), expected  # another seed, filter, or greedy: another answer
    for url in (f"grpc://{server.grpc_url}", f"http://{server.http_url}"):
        client = VLMClient(url)
        assert [client.generate(prompt, max_tokens=8, **kw).text for kw in settings] == expected, url


def test_repetition_settings_served_equal_in_process(served, run_cli, tmp_path):
    """The repetition penalty, the n-gram ban, OpenAI's presence / frequency penalties, logit bias and bad words reach
    the served sampler over both protocols: each changes this greedy answer (an input the random model repeats
    itself on), and the served answer is the in-process one for the same settings."""
    from PIL import Image

    build, server = served
    pipe = open_build(build)
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    png = _png(image)
    plain = generate(pipe, "Tell me a story.", [image], GenerationConfig(max_new_tokens=16))
    first, word = plain.token_ids[0], a_word_spelt_in(pipe.tokenizer, plain.text, plain.token_ids)
    settings = [{}, dict(repetition_penalty=1.5), dict(no_repeat_ngram_size=1), dict(presence_penalty=1.5),
                dict(frequency_penalty=-1.0), dict(logit_bias={first: -100.0, 7: 2.5}), dict(bad_words=[word]),
                dict(repetition_penalty=1.0, no_repeat_ngram_size=0)]
    results = [generate(pipe, "Tell me a story.", [image], GenerationConfig(max_new_tokens=16, **kw))
               for kw in settings]
    expected = [r.text for r in results]
    assert all(text != expected[0] for text in expected[1:-1]), expected  # a server ignoring one could not pass
    for url in (f"grpc://{server.grpc_url}", f"http://{server.http_url}"):
        client = VLMClient(url)
        assert [client.generate("Tell me a story.", [png], max_tokens=16, **kw).text for kw in settings] == expected
    for bad, needle in (({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
                        ({"frequency_penalty": math.nan}, "frequency_penalty must be in"),
                        ({"repetition_penalty": 0.0}, r"repetition_penalty must be in \(0, 10\]"),
                        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size must be an integer >= 0"),
                        ({"min_tokens": -2}, "min_new_tokens must be an integer >= 0"),
                        ({"logit_bias": {3: 101.0}}, r"logit_bias values must be in \[-100, 100\]"),
                        ({"bad_words": [" "]}, "bad_words must be non-blank"),
                        ({"logit_bias": {10**9: 1.0}}, "logit_bias names token id.* outside this model's vocabulary"),
                        ({"logit_bias": {-3: 1.0}}, "logit_bias keys must be token ids"),
                        ({"logit_bias": dict.fromkeys(range(pipe.scheme.geometry.vocab_size + 1), 0.0)},
                         "more than this model's vocabulary")):
        with pytest.raises(RequestError, match=needle):
            VLMClient(f"grpc://{server.grpc_url}").generate("hi", max_tokens=2, **bad)
    # the ask command sends them too
    (tmp_path / "red.png").write_bytes(png)
    for kw, flags in ((settings[1], ["--repetition-penalty", "1.5"]), (settings[4], ["--frequency-penalty", "-1"]),
                      (settings[5], ["--logit-bias", f"{first}=-100", "--logit-bias", "7=2.5"])):
        got = run_cli("ask", "--url", f"grpc://{server.grpc_url}", "--prompt", "Tell me a story.", "--image",
                      str(tmp_path / "red.png"), "--max-tokens", "16", *flags)
        assert got.returncode == 0 and got.stdout == expected[settings.index(kw)] + "\n", got.stderr
    got = run_cli("ask", "--url", f"http://{server.http_url}", "--prompt", "Tell me a story.", "--max-tokens", "4",
                  "--logprobs", "--top-logprobs", "2", "--stream")
    assert got.returncode == 0 and len([line for line in got.stderr.splitlines() if line.startswith("  ")]) == 4


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_logprobs_served_equal_in_process(served, photos, protocol):
    """logprobs / top_logprobs come back per token as generation computed them, whole and streamed (each
    piece carrying its own tokens'), and not at all unless asked for."""
    build, server = served
    pipe = open_build(build)
    config = GenerationConfig(max_new_tokens=8, logprobs=True, top_logprobs=3)
    expected = [entry.to_dict() for entry in generate(pipe, PROMPTS[1], [photos[1]], config).logprobs]
    client = VLMClient(f"http://{server.http_url}" if protocol == "http" else f"grpc://{server.grpc_url}")
    got = client.generate(PROMPTS[1], [photos[1]], max_tokens=8, logprobs=True, top_logprobs=3)
    assert len(got.logprobs) == got.completion_tokens == len(expected)

    def assert_same(entries, want):  # every token and alternative; logprobs to the float noise of another
        # grouping of the decoder's work (a prompt served again continues from the prefix cache)
        got, want = ([(e["token_id"], e["token"], e["bytes"], e["logprob"]) for entry in entries
                      for e in [entry, *entry["top_logprobs"]]] for entries in (entries, want))
        assert [g[:3] for g in got] == [w[:3] for w in want]
        np.testing.assert_allclose([g[3] for g in got], [w[3] for w in want], atol=1e-5)

    assert_same(got.logprobs, expected)
    *pieces, final = client.stream(PROMPTS[1], [photos[1]], max_tokens=8, logprobs=True, top_logprobs=3)
    assert [entry for piece in pieces for entry in piece.logprobs] == final.logprobs
    assert_same(final.logprobs, expected)
    assert client.generate(PROMPTS[1], [photos[1]], max_tokens=8).logprobs is None
    with pytest.raises(RequestError, match="top_logprobs needs logprobs"):
        client.generate("hi", max_tokens=2, top_logprobs=2)


def _png(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_concurrent_clients_all_correct(served, photos):
    build, server = served
    pipe = open_build(build)
    jobs = [(PROMPTS[i % 3], photos[i % 3], "http" if i % 2 else "grpc") for i in range(8)]
    expected = {(p, str(img)): generate(pipe, p, [img], GenerationConfig(max_new_tokens=8)).text
                for p, img, _ in jobs}

    def ask(job):
        prompt, image, protocol = job
        url = f"http://{server.http_url}" if protocol == "http" else f"grpc://{server.grpc_url}"
        return VLMClient(url).generate(prompt, [image], max_tokens=8).text

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [expected[(p, str(img))] for p, img, _ in jobs]
    # how the server grouped them does not matter: no greedy step is near a tie
    for prompt, image in zip(PROMPTS, photos):
        assert greedy_margin(pipe, prompt, [image], 8) > 40 * BATCH_NOISE, prompt


def _post(server, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/vlm/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_errors_and_server_keeps_serving(served, photos):
    build, server = served
    client = VLMClient(f"grpc://{server.grpc_url}")
    png = base64.b64encode(photos[0].read_bytes()).decode()
    image_token = json.loads((build / "manifest.json").read_text())["prompt_layout"]["image_token"]
    typed_token = [{"role": "user", "content": [{"type": "text", "text": f"What is {image_token}?"}]}]
    bad = {
        # refused by the vlm model itself: its request checks, over the wire as JSON
        "image token typed in the prompt": ({"prompt": f"hi {image_token} there", "max_tokens": 2}, "image token"),
        "image token typed in a message": ({"messages": json.dumps(typed_token), "max_tokens": 2}, "image token"),
        "image token beside an image": ({"prompt": f"What is {image_token}?", "images": [png], "max_tokens": 2},
                                        "image token"),
        "temperature over 10": ({"prompt": "hi", "temperature": 11.0, "max_tokens": 2}, "temperature must be in"),
        "negative temperature": ({"prompt": "hi", "temperature": -0.5, "max_tokens": 2}, "temperature must be in"),
        "negative top_p": ({"prompt": "hi", "top_p": -0.5, "max_tokens": 2}, "top_p must be in"),
        "top_p over 1": ({"prompt": "hi", "top_p": 1.5, "max_tokens": 2}, "top_p must be in"),
        "negative top_k": ({"prompt": "hi", "top_k": -1, "max_tokens": 2}, "top_k must be an integer"),
        "min_p over 1": ({"prompt": "hi", "min_p": 1.5, "max_tokens": 2}, "min_p must be in"),
        "undecodable image": ({"prompt": "hi", "images": [base64.b64encode(b"not an image").decode()]},
                              "cannot be decoded"),
        "decompression bomb": ({"prompt": "hi", "images": [base64.b64encode(bomb_png(12000, 12000)).decode()]},
                               "max_image_pixels"),
        "negative seed": ({"prompt": "hi", "seed": -1, "max_tokens": 2}, "seed"),
        "empty stop string": ({"prompt": "hi", "stop": ["", "x"], "max_tokens": 2}, "stop strings must be non-empty"),
        "empty prompt": ({"prompt": ""}, "empty"),
        "prompt over the limit": ({"prompt": "word " * 400, "max_tokens": 8}, "max_sequence"),
        "too many images": ({"prompt": "hi", "images": [png] * 3}, "at most 2"),
        "max_tokens out of range": ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        "max_tokens too large": ({"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
        # past 2^31: read as INT32, Triton's JSON parser wrapped it into a small count, served without a word
        "max_tokens past 32 bits": ({"prompt": "hi", "max_tokens": 2**32 + 2}, "max_tokens"),
        "no prompt": ({"images": [png]}, "prompt"),
        "wrong shape": ({"prompt": ["a", "b"]}, "prompt"),
    }
    for name, (body, needle) in bad.items():
        status, answer = _post(server, body)
        assert status == 400 and "error" in answer, (name, status, answer)
        assert needle.lower() in answer["error"].lower(), (name, answer)
        # still healthy, still right
        assert server.is_ready()
        assert client.generate("Hello there", max_tokens=3).completion_tokens == 3
    with pytest.raises(RequestError, match="cannot be decoded"):
        client.generate("hi", [b"\x89PNG broken"], max_tokens=3)
    with pytest.raises(RequestError, match=r"image 1\b.*cannot be decoded"):  # one good image, one broken
        client.generate("hi", [photos[0], photos[0].read_bytes()[:200]], max_tokens=3)
    # typed tensors over gRPC: out-of-range sampling settings are the model's to refuse
    for params, needle in (({"temperature": math.nan}, "temperature must be in"), ({"temperature": 10.5}, "temperature"),
                           ({"top_p": 1.5}, "top_p must be in"), ({"top_p": -0.1}, "top_p"),
                           ({"seed": -3}, "seed must be an integer"), ({"top_k": -2}, "top_k must be"),
                           ({"min_p": math.nan}, "min_p must be in")):
        with pytest.raises(RequestError, match=needle):
            client.generate("hi", max_tokens=2, **params)
    # HTTP streaming (generate_stream): the refusal is a 400 whose body is a server-sent event;
    # the client raises the server's message, not "Bad Request"
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/vlm/generate_stream",
                                 data=json.dumps({"prompt": "hi", "temperature": 11.0}).encode())
    with pytest.raises(urllib.error.HTTPError) as raw_err:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(req, timeout=60)
    assert raw_err.value.code == 400 and raw_err.value.read().startswith(b'data: {"error":')
    http = VLMClient(f"http://{server.http_url}")
    for kwargs, needle in (({"temperature": 11.0}, r"temperature must be in \[0, 10\], got 11"),
                           ({"images": [photos[0], photos[0].read_bytes()[:200]]}, r"image 1\b.*cannot be decoded"),
                           ({"prompt": f"hi {image_token}"}, "contains the image token")):
        with pytest.raises(RequestError, match=needle):
            list(http.stream(**{"prompt": "hi", "max_tokens": 3, **kwargs}))
    assert list(http.stream("Hello there", max_tokens=3))[-1].completion_tokens == 3
    for url in (f"http://{server.http_url}", f"grpc://{server.grpc_url}"):  # a model the server lacks: named, and ours
        with pytest.raises(RequestError, match="nope.*the generation model of a vlm-export repository is 'vlm'"):
            VLMClient(url, model="nope").generate("hi", max_tokens=2)
    # wrong dtype, over gRPC with a real typed tensor: Triton itself rejects it before the model runs
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    raw = grpcclient.InferenceServerClient(server.grpc_url)
    prompt = grpcclient.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
    tokens = grpcclient.InferInput("max_tokens", [1], "FP32")
    tokens.set_data_from_numpy(np.array([4.0], dtype=np.float32))
    errors = []
    raw.start_stream(callback=lambda result, error: errors.append(error))
    raw.async_stream_infer("vlm", [prompt, tokens])
    raw.stop_stream()
    raw.close()
    assert isinstance(errors[0], InferenceServerException) and "max_tokens" in errors[0].message()
    assert "INT64" in errors[0].message()
    # text that is not UTF-8: an error naming the field, not "internal error"
    for field in ("prompt", "stop"):
        bad_text = grpcclient.InferInput(field, [1], "BYTES")
        bad_text.set_data_from_numpy(np.array([b"\xff\xfe hi"], dtype=np.object_))
        inputs = [bad_text] if field == "prompt" else [prompt, bad_text]
        errors = []
        raw = grpcclient.InferenceServerClient(server.grpc_url)
        raw.start_stream(callback=lambda result, error: errors.append(error))
        raw.async_stream_infer("vlm", inputs)
        raw.stop_stream()
        raw.close()
        assert errors[0] is not None and f"{field} is not valid UTF-8" in errors[0].message(), errors
    assert client.generate("Hello there", max_tokens=3).completion_tokens == 3
    # no image is fine: the prompt is answered as text only
    status, answer = _post(server, {"prompt": "hi", "max_tokens": 2})
    assert status == 200 and answer["completion_tokens"] == 2


def test_unreachable_server_is_a_serve_error():
    """Nothing listens there: ServeError saying so, from both transports, streaming or not."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    for url in (f"http://127.0.0.1:{dead}", f"grpc://127.0.0.1:{dead}"):
        client = VLMClient(url, timeout=30)
        # the reason the connection failed, not gRPC's "the stream is no longer in valid state"
        with pytest.raises(ServeError, match=f"cannot reach 127.0.0.1:{dead}: .*(?i:refused).*serve` running"):
            client.generate("hi", max_tokens=2)
        with pytest.raises(ServeError, match=f"cannot reach 127.0.0.1:{dead}"):
            list(client.stream("hi", max_tokens=2))


BLS_QUEUE = 6  # requests that may wait for a place in the bls server's batch
# Lines of Triton 2.51's verbose log (--log-verbose=1) that the bls tests read: the gRPC frontend
# passing a client's cancellation to the core, the last callback of a request it cancelled, a
# client's cancellation reaching the frontend, and each call of the lm_decoder model (a step's
# prefill or decode call).
CANCEL_ISSUED = "Issuing cancellation for"
CANCELLED_FINAL = re.compile(r"StreamInferComplete, context \d+, \d+ step CANCELLATION_ISSUED, "
                             r"callback index \d+, flags 1")
CANCEL_NOTICE = "Cancellation notification received for ModelStreamInferHandler"
DECODER_CALL = "model lm_decoder, instance lm_decoder_0_0, executing"


def _log_since(server, offset: int) -> str:
    with open(server.log_file, "rb") as f:
        f.seek(offset)
        return f.read().decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def bls_served(tiny_build, tmp_path_factory):
    """decoder_mode=bls (the vlm model calls the lm_decoder model once per step for the whole
    batch) with a short queue: BLS_QUEUE requests may wait for one of the build's max_batch places.
    Triton logs verbosely, so the tests can see what its gRPC frontend cancels. The last test of
    this module stops it (test_vlm_server_stops_cleanly)."""
    build = tiny_build("llava-llama").path
    folder = tmp_path_factory.mktemp("bls")
    repo = render_repository(build, folder / "repo", RepositoryOptions(decoder_mode="bls", max_queue=BLS_QUEUE))
    # a 30 s exit timeout: a slow but clean unload on a loaded machine passes, a model that never unloads fails
    server = TritonServer(repo, log_file=folder / "triton.log", stop_timeout=30, extra_args=("--log-verbose=1",))
    try:
        server.start()
        yield build, server
    finally:
        server.stop()


def test_bls_decoder_mode_batches_concurrent_requests(bls_served, photos):
    """decoder_mode=bls: concurrent requests share decode steps and still get exactly their
    in-process answers (whatever the grouping: no greedy step is near a tie)."""
    build, server = bls_served
    pipe = open_build(build)
    asks = [(PROMPTS[i % 3], [photos[i % 3]] if i % 2 else [], 6 + i) for i in range(6)]
    assert len(asks) <= BLS_QUEUE  # none can be refused
    expected = [generate(pipe, p, i, GenerationConfig(max_new_tokens=n)).text for p, i, n in asks]
    steps_before = server.metric("vlm_decode_steps_total") or 0
    client = VLMClient(f"grpc://{server.grpc_url}")
    with ThreadPoolExecutor(6) as pool:
        served = list(pool.map(lambda a: client.generate(a[0], a[1], max_tokens=a[2]).text, asks))
    assert wait_for(lambda: server.metric("vlm_batch_rows") == 0)
    steps = server.metric("vlm_decode_steps_total") - steps_before
    assert served == expected
    assert steps < sum(n for _, _, n in asks)  # rows shared decode steps
    for prompt, images, n in asks:
        assert greedy_margin(pipe, prompt, images, n) > 40 * BATCH_NOISE, (prompt, images)


def _open_stream(server, prompt: bytes, max_tokens: int):
    """A raw gRPC stream of one request (one stream per request: tritonclient cannot say which
    request an error belongs to); returns (client, queue of (result, error))."""
    import queue

    import tritonclient.grpc as grpcclient

    def tensor(name, value, dtype):
        t = grpcclient.InferInput(name, [1], dtype)
        t.set_data_from_numpy(np.array([value], dtype=np.object_ if dtype == "BYTES" else None))
        return t

    raw = grpcclient.InferenceServerClient(server.grpc_url, channel_args=[("grpc.enable_http_proxy", 0)])
    got: queue.Queue = queue.Queue()
    raw.start_stream(callback=lambda result, error: got.put((result, error)))
    raw.async_stream_infer("vlm", [tensor("prompt", prompt, "BYTES"), tensor("max_tokens", np.int64(max_tokens), "INT64"),
                                   tensor("stream", True, "BOOL"), tensor("ignore_eos", True, "BOOL")])
    return raw, got


def _back_pressure_round(server, pipe, metric, client, seen: list):
    """One flood against a full batch: (every flood request's outcome, the first one answered), or
    None when the long rows did not keep the batch full until the flood had been judged (what was
    seen then is appended to ``seen``)."""
    prompt = b"Hi"
    longest = pipe.limits.max_sequence - len(pipe.prompt_ids("Hi", 0))
    refused = metric("vlm_requests_refused_total") or 0

    def ask(_):
        try:
            return client.generate("Hello there", max_tokens=4, ignore_eos=True).completion_tokens
        except RequestError as e:
            return str(e)

    long_rows = [_open_stream(server, prompt, longest) for _ in range(pipe.limits.max_batch)]
    try:
        assert wait_for(lambda: metric("vlm_batch_rows") == pipe.limits.max_batch, 60)
        with ThreadPoolExecutor(BLS_QUEUE + 1) as pool:
            flood = [pool.submit(ask, i) for i in range(BLS_QUEUE + 1)]
            assert wait_for(lambda: sum(f.done() for f in flood) >= 1, 60)
            assert [e for _, q in long_rows for _, e in list(q.queue) if e is not None] == []
            full = (wait_for(lambda: metric("vlm_queue_length") == BLS_QUEUE, 5)
                    and metric("vlm_batch_rows") == pipe.limits.max_batch)
            first = next(f.result() for f in flood if f.done())
            state = (metric("vlm_batch_rows"), metric("vlm_queue_length"), first)
            for raw, _ in long_rows:  # their places free: the waiting requests run
                _cancel(raw)
            outcomes = [f.result(timeout=120) for f in flood]
    finally:
        for raw, _ in long_rows:
            _cancel(raw)
    if not full:
        seen.append(state)
        return None
    # judged while the batch was full and BLS_QUEUE waited: one refusal, counted once
    assert metric("vlm_requests_refused_total") == refused + 1
    return outcomes, first


def _cancel(raw) -> None:
    """End a raw stream, cancelling its request (a second call does nothing)."""
    if getattr(raw, "_vlm_test_closed", False):
        return
    raw._vlm_test_closed = True
    raw.stop_stream(cancel_requests=True)
    raw.close()


def test_inflight_batching_cancellation_and_back_pressure(bls_served, photos, tmp_path):
    """One scheduler loop in the served model: a stream cancelled by its client stops server-side
    (its row leaves, decode steps stop); with the batch full and BLS_QUEUE requests waiting, one
    more gets UNAVAILABLE at once and the waiting ones are answered; a repeated image comes from
    the image-embedding cache with the same answer as in-process generation."""
    build, server = bls_served
    pipe = open_build(build)
    metric = server.metric
    cancelled = metric("vlm_requests_cancelled_total") or 0
    log_at = server.log_file.stat().st_size
    raw, got = _open_stream(server, b"Tell me a long story.", 200)
    try:
        for _ in range(3):
            result, error = got.get(timeout=60)
            assert error is None
    finally:
        _cancel(raw)
    # 60 s: Triton's cancellation reaches the stub in well under a second, but a loaded 2-core machine
    # (load 10) delayed it past the 20 s default once
    assert wait_for(lambda: (metric("vlm_requests_cancelled_total") or 0) >= cancelled + 1, seconds=60.0), \
        server.log_file.read_text()[-2000:]
    steps = metric("vlm_decode_steps_total")
    assert not wait_for(lambda: metric("vlm_decode_steps_total") != steps, seconds=1.0)  # nothing runs on
    # within one step: between Triton's core learning of the cancellation and the row's final flag,
    # at most the decoder call already under way (the only row, decoding: one call per step)
    assert wait_for(lambda: CANCELLED_FINAL.search(_log_since(server, log_at)))
    log = _log_since(server, log_at)
    until_final = log[:CANCELLED_FINAL.search(log).start()]
    calls = until_final[until_final.rindex(CANCEL_ISSUED):].count(DECODER_CALL)
    assert calls <= 1, f"{calls} lm_decoder calls after the cancellation reached Triton's core (log: {server.log_file})"

    # back-pressure: max_batch rows that run as long as the build allows fill the batch; then
    # BLS_QUEUE + 1 requests at once: exactly one is refused ("busy"), at once. The rows last only
    # as long as max_sequence tokens take (about a second on the tiny model), so a round whose rows
    # ended before the flood was judged (a slow client on a loaded machine) proves nothing and is
    # run again; three such rounds fail the test.
    client = VLMClient(f"grpc://{server.grpc_url}")
    seen: list = []
    for _ in range(3):
        flood_result = _back_pressure_round(server, pipe, metric, client, seen)
        if flood_result is not None:
            break
    else:  # an unbounded queue lands here too (BLS_QUEUE + 1 waiting, nothing refused)
        pytest.fail(f"never judged with the batch full and exactly {BLS_QUEUE} waiting in 3 rounds; seen "
                    f"(rows, waiting, first outcome): {seen}")
    outcomes, refusal = flood_result
    assert "busy" in str(refusal) and f"queue limit {BLS_QUEUE}" in str(refusal), refusal
    assert sorted(outcomes, key=str) == [4] * BLS_QUEUE + [refusal], outcomes

    # an image not seen before, twice: a miss, then a hit from the cache; answers as in-process
    from PIL import Image

    fresh = tmp_path / "fresh.png"
    Image.open(photos[0]).rotate(90).save(fresh)
    hits, misses = metric("vlm_image_cache_hits_total") or 0, metric("vlm_image_cache_misses_total") or 0
    prefix_hits, reused = metric("vlm_prefix_cache_hits_total") or 0, metric("vlm_prefix_cache_reused_tokens_total") or 0
    expected = generate(pipe, PROMPTS[0], [fresh], GenerationConfig(max_new_tokens=8))
    assert client.generate(PROMPTS[0], [fresh], max_tokens=8).text == expected.text
    assert client.generate(PROMPTS[0], [fresh], max_tokens=8).text == expected.text
    assert wait_for(lambda: metric("vlm_image_cache_hits_total") == hits + 1)
    assert metric("vlm_image_cache_misses_total") == misses + 1
    # the prefix cache (on by default): the first of the two continued from the template's start (a
    # prompt seen before), the second from all of the first but its last token; the answers as above
    prompt_tokens = len(pipe.prompt_ids(PROMPTS[0], 1))
    assert wait_for(lambda: metric("vlm_prefix_cache_hits_total") == prefix_hits + 2)
    assert metric("vlm_prefix_cache_reused_tokens_total") - reused > prompt_tokens - 1

    # a conversation's next turn: the served model kept the first turn's answer with its prompt, so the
    # follow-up reuses both (as much of the answer as the template re-tokenizes alike)
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    first = generate(pipe, turn, [fresh], GenerationConfig(max_new_tokens=8))
    assert client.generate(messages=turn, images=[fresh], max_tokens=8).text == first.text
    follow_up = turn + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Is it big?"}]
    decoded = first.token_ids if first.finish_reason == "eos" else first.token_ids[:-1]  # the last: never fed
    fed, ids = pipe.prompt_ids(turn, 1) + decoded, pipe.prompt_ids(follow_up, 1)
    common = common_prefix(fed, ids)
    assert common >= len(pipe.prompt_ids(turn, 1))
    reused = metric("vlm_prefix_cache_reused_tokens_total")
    client.generate(messages=follow_up, images=[fresh], max_tokens=8)
    assert wait_for(lambda: metric("vlm_prefix_cache_reused_tokens_total") - reused == min(common, len(ids) - 1))


CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]},
    {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "What colour is it?"},
]


def test_conversation_layout_follows_the_chat_template(tiny_build):
    """The image of the first turn sits inside that turn, where the template puts it; one user
    prompt is the same as a one-message conversation; over the limit is a clear error."""
    from vlm_export.errors import InputError

    pipe = open_build(tiny_build("llava-llama").path)
    layout = pipe.layout
    ids = pipe.prompt_ids(CONVERSATION, 1)
    text = pipe.tokenizer.decode(ids)
    first_user = text.index("user\n")
    images = [i for i, t in enumerate(ids) if t == layout.image_token_id]
    assert len(images) == layout.tokens_per_image
    assert first_user < len(pipe.tokenizer.decode(ids[: images[0]])) < text.index("A cat.")
    assert text.index("A cat.") < text.index("What colour is it?")
    single = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    assert pipe.prompt_ids(single, 1) == pipe.prompt_ids("What is in the picture?", 1)
    with pytest.raises(InputError, match="max_sequence"):
        generate(pipe, CONVERSATION + [{"role": "assistant", "content": "word " * 300},
                                       {"role": "user", "content": "And?"}], [b""], GenerationConfig(max_new_tokens=8))


def test_served_conversation_equals_in_process(served, photos):
    build, server = served
    pipe = open_build(build)
    expected = generate(pipe, CONVERSATION, [photos[0]], GenerationConfig(max_new_tokens=10))
    for url in (f"grpc://{server.grpc_url}", f"http://{server.http_url}"):
        got = VLMClient(url).generate(messages=CONVERSATION, images=[photos[0]], max_tokens=10)
        assert got.text == expected.text and got.prompt_tokens == expected.prompt_tokens
    client = VLMClient(f"grpc://{server.grpc_url}")
    with pytest.raises(RequestError, match="1 image parts but 0 images"):
        client.generate(messages=CONVERSATION, max_tokens=3)
    with pytest.raises(RequestError, match="last message must be the user's"):
        client.generate(messages=CONVERSATION[:3], images=[photos[0]], max_tokens=3)
    status, answer = _post(server, {"messages": "[{not json", "max_tokens": 2})
    assert status == 400 and "messages is not valid JSON" in answer["error"]
    status, answer = _post(server, {"prompt": "hi", "messages": "[]", "max_tokens": 2})
    assert status == 400 and "one of them" in answer["error"]
    assert client.generate("Hello there", max_tokens=3).completion_tokens == 3


def test_vlm_server_stops_cleanly(bls_served):
    """Last in this module: the bls server, after the heavy use above (concurrent rows, streams
    cancelled mid-way, a flood past the queue) and a burst of short requests, stops in order on
    SIGTERM: every model, vlm included, unloads, Triton exits 0, nothing of its process group is left.

    Triton 2.51's gRPC frontend leaks a request whose client cancels its stream after the final
    response (when the cancellation overtakes the final write), and the leaked request keeps the
    vlm model loaded until the exit timeout (serve/NOTES.md, "A vlm model that would not unload").
    So our client closes a finished stream instead of cancelling it: the burst's requests must
    reach no cancellation in Triton's log."""
    build, server = bls_served
    try:
        log_at = server.log_file.stat().st_size
        client = VLMClient(f"grpc://{server.grpc_url}")
        with ThreadPoolExecutor(6) as pool:
            done = list(pool.map(lambda i: client.generate(PROMPTS[i % 3], max_tokens=2).completion_tokens, range(12)))
        assert done == [2] * 12
        with pytest.raises(RequestError, match="max_tokens"):  # a request that ends in an error is finished too
            client.generate("Hi", max_tokens=0)
        # nothing is left waiting or running (a miscounted queue would hold the unload for its drain time)
        assert wait_for(lambda: server.metric("vlm_queue_length") == 0 and server.metric("vlm_batch_rows") == 0)
        assert CANCEL_NOTICE not in _log_since(server, log_at), "the client cancelled the stream of a finished request"
        pid = server.pid
        assert server.stop() == 0, server.log_tail(30)  # SIGTERM was enough: the models unloaded and Triton exited
        assert "successfully unloaded 'vlm'" in server.log_file.read_text()
        assert not server.running
        with pytest.raises(ProcessLookupError):
            os.killpg(pid, 0)
    finally:
        server.stop()
