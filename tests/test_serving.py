"""The served path: a real tritonserver (the one in nvidia-pytriton) on free ports, the python
target of a tiny build, real HTTP and gRPC clients."""
from __future__ import annotations

import base64
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from vlm_export.client.client import VLMClient, VLMResponse
from vlm_export.errors import RepositoryError, RequestError
from vlm_export.model_repository.render import (RepositoryOptions, check_against_graphs, model_configs,
                                                parse_config, render_repository, to_pbtxt)
from vlm_export.runtime.generate import GenerationConfig, generate
from vlm_export.runtime.load import open_build
from vlm_export.serve.server import TritonServer
from conftest import wait_for  # noqa: E402

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
def served(tiny_build, tmp_path_factory):
    build = tiny_build("llava-llama").path
    repo = render_repository(build, tmp_path_factory.mktemp("repo") / "repo", RepositoryOptions(vlm_instances=1))
    with TritonServer(repo, log_file=tmp_path_factory.mktemp("log") / "triton.log") as server:
        yield build, server


@pytest.mark.parametrize("target", ["python", "onnxruntime", "tensorrt"])
def test_configs_fit_schema_and_graphs(tiny_build, target):
    manifest = json.loads((tiny_build("llava-llama").path / "manifest.json").read_text())
    configs = model_configs(manifest, RepositoryOptions(target=target))
    check_against_graphs(configs, tiny_build("llava-llama").path, manifest)
    for cfg in configs.values():
        parsed = parse_config(cfg)
        assert parsed.name == cfg["name"]
    assert configs["vision_encoder"]["max_batch_size"] == manifest["limits"]["max_images_per_batch"]
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


def test_seeded_sampling_is_reproducible_when_served(served):
    _, server = served
    client = VLMClient(f"grpc://{server.grpc_url}")
    a = client.generate("Tell me a story.", max_tokens=8, temperature=1.2, seed=11)
    b = client.generate("Tell me a story.", max_tokens=8, temperature=1.2, seed=11)
    assert a.text == b.text


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


def _post(server, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/vlm/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_errors_and_server_keeps_serving(served, photos):
    _, server = served
    client = VLMClient(f"grpc://{server.grpc_url}")
    png = base64.b64encode(photos[0].read_bytes()).decode()
    bad = {
        "undecodable image": ({"prompt": "hi", "images": [base64.b64encode(b"not an image").decode()]},
                              "cannot be decoded"),
        "decompression bomb": ({"prompt": "hi", "images": [base64.b64encode(bomb_png(12000, 12000)).decode()]},
                               "max_image_pixels"),
        "negative seed": ({"prompt": "hi", "seed": -1, "max_tokens": 2}, "seed"),
        "empty prompt": ({"prompt": ""}, "empty"),
        "prompt over the limit": ({"prompt": "word " * 400, "max_tokens": 8}, "max_sequence"),
        "too many images": ({"prompt": "hi", "images": [png] * 3}, "at most 2"),
        "max_tokens out of range": ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        "max_tokens too large": ({"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
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
    assert "INT32" in errors[0].message()
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


def test_server_stops_cleanly(tiny_build, tmp_path):
    repo = render_repository(tiny_build("prefix-llama").path, tmp_path / "repo")
    server = TritonServer(repo, log_file=tmp_path / "log.txt").start()
    answer = VLMClient(f"grpc://{server.grpc_url}").generate("Hi", max_tokens=2)
    assert answer.completion_tokens == 2
    pid = server.pid
    server.stop()
    assert not server.running
    import os
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _metric(server, name: str) -> float | None:
    import re

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(server.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    values = [float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)]
    return sum(values) if values else None


def test_inflight_batching_cancellation_and_back_pressure(tiny_build, photos, tmp_path):
    """One scheduler loop in the served model: a stream cancelled by its client stops server-side
    (its row leaves, decode steps stop), a flood past the queue limit gets UNAVAILABLE at once,
    and afterwards the server answers a good request exactly as in-process generation does."""
    import queue

    import tritonclient.grpc as grpcclient

    build = tiny_build("llava-llama").path
    repo = render_repository(build, tmp_path / "repo", RepositoryOptions(max_queue=2))
    with TritonServer(repo, log_file=tmp_path / "triton.log") as server:
        raw = grpcclient.InferenceServerClient(server.grpc_url, channel_args=[("grpc.enable_http_proxy", 0)])
        got: queue.Queue = queue.Queue()
        raw.start_stream(callback=lambda result, error: got.put((result, error)))

        def tensor(name, value, dtype):
            t = grpcclient.InferInput(name, [1], dtype)
            t.set_data_from_numpy(np.array([value], dtype=np.object_ if dtype == "BYTES" else None))
            return t

        raw.async_stream_infer("vlm", [tensor("prompt", b"Tell me a long story.", "BYTES"),
                                       tensor("max_tokens", np.int32(200), "INT32"),
                                       tensor("stream", True, "BOOL"), tensor("ignore_eos", True, "BOOL")])
        for _ in range(3):
            result, error = got.get(timeout=60)
            assert error is None
        raw.stop_stream(cancel_requests=True)
        raw.close()
        assert wait_for(lambda: (_metric(server, "vlm_requests_cancelled_total") or 0) >= 1), \
            (tmp_path / "triton.log").read_text()[-2000:]
        steps = _metric(server, "vlm_decode_steps_total")
        assert steps < 200  # the row left long before its 200 tokens
        assert not wait_for(lambda: _metric(server, "vlm_decode_steps_total") != steps, seconds=1.0)

        # a flood: the batch holds max_batch (4) rows and 2 more may wait; the rest are refused at once
        client = VLMClient(f"grpc://{server.grpc_url}")

        def ask(_):
            try:
                return client.generate("Tell me a story.", max_tokens=60, ignore_eos=True).completion_tokens
            except RequestError as e:
                return str(e)

        with ThreadPoolExecutor(12) as pool:
            outcomes = list(pool.map(ask, range(12)))
        refused = [o for o in outcomes if isinstance(o, str)]
        assert refused and all("busy" in o for o in refused), outcomes
        assert [o for o in outcomes if not isinstance(o, str)] == [60] * (12 - len(refused))
        assert _metric(server, "vlm_requests_refused_total") == len(refused)

        expected = generate(open_build(build), PROMPTS[0], [photos[0]], GenerationConfig(max_new_tokens=8))
        assert client.generate(PROMPTS[0], [photos[0]], max_tokens=8).text == expected.text
        # the same image again: served from the image-embedding cache, same answer
        assert client.generate(PROMPTS[0], [photos[0]], max_tokens=8).text == expected.text
        assert wait_for(lambda: _metric(server, "vlm_image_cache_hits_total") == 1)
        assert _metric(server, "vlm_image_cache_misses_total") == 1


def test_bls_decoder_mode_batches_concurrent_requests(tiny_build, photos, tmp_path):
    """decoder_mode=bls: the vlm model's loop calls the lm_decoder model once per step for the whole
    batch; concurrent requests still get exactly their in-process answers."""
    build = tiny_build("llava-llama").path
    pipe = open_build(build)
    asks = [(PROMPTS[i % 3], [photos[i % 3]] if i % 2 else [], 6 + i) for i in range(6)]
    expected = [generate(pipe, p, i, GenerationConfig(max_new_tokens=n)).text for p, i, n in asks]
    repo = render_repository(build, tmp_path / "repo", RepositoryOptions(decoder_mode="bls"))
    with TritonServer(repo, log_file=tmp_path / "triton.log") as server:
        client = VLMClient(f"grpc://{server.grpc_url}")
        with ThreadPoolExecutor(6) as pool:
            served = list(pool.map(lambda a: client.generate(a[0], a[1], max_tokens=a[2]).text, asks))
        assert wait_for(lambda: _metric(server, "vlm_batch_rows") == 0)
        steps = _metric(server, "vlm_decode_steps_total")
    assert served == expected
    assert steps < sum(n for _, _, n in asks)  # rows shared decode steps


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
