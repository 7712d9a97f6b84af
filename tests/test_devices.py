"""Issue 17, the GPU path: the device and provider choice (runtime.devices), the runners on a device
and in a dtype, and the bench's device option.

Everything but the two ``gpu`` tests runs on a CPU-only machine: the provider choice from given
``available`` lists, the fallback notice, a real ONNX Runtime session recording its providers,
IO binding with the cache kept in ONNX Runtime's memory between calls, the dtype path of the
PyTorch reference (bf16 on the CPU), and the one-line refusal of ``cuda`` where there is no GPU.
"""
from __future__ import annotations

import logging

import numpy as np
import pytest

from vlm_export.errors import InputError
from vlm_export.runtime.devices import (CPU_EP, CUDA_EP, TRT_EP, Device, fallback_notice, ort_providers,
                                        parse_dtype, provider_names, torch_device, trt_provider_options)

import torch

HAS_CUDA = torch.cuda.is_available()

NO_GPU = "no CUDA GPU here: torch.cuda.is_available() is False; use --device cpu"
needs_no_gpu = pytest.mark.skipif(HAS_CUDA, reason="checks the refusal on a machine without a GPU")


@pytest.fixture(autouse=True)
def _fresh_notices(monkeypatch):
    """Each test sees the once-per-process notices afresh."""
    import vlm_export.runtime.devices as devices

    monkeypatch.setattr(devices, "_said", set())


def _notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "vlm_export.runtime.devices"]


# --------------------------------------------------------------------------- parsing


def test_devices_and_dtypes_are_parsed():
    assert Device.parse(None) == Device.parse("cpu") == Device("cpu")
    assert str(Device.parse("cuda")) == "cuda" and Device.parse("cuda").ordinal == 0
    assert Device.parse(" CUDA:1 ") == Device("cuda", 1) and str(Device("cuda", 1)) == "cuda:1"
    assert Device.parse(Device("cuda", 2)).ordinal == 2
    for bad in ("gpu", "cuda:x", "cpu:0", "", "cuda:-1", "mps"):
        with pytest.raises(InputError, match=r"unknown device .*: use cpu, cuda or cuda:N") as err:
            Device.parse(bad)
        assert "\n" not in str(err.value)
    assert [parse_dtype(x) for x in (None, "fp32", "float16", "BF16", "bfloat16", "double")] == \
        ["fp32", "fp32", "fp16", "bf16", "bf16", "fp64"]
    with pytest.raises(InputError, match="unknown dtype 'int8': use one of fp32, fp16, bf16, fp64"):
        parse_dtype("int8")


# --------------------------------------------------------------------------- provider choice


def test_providers_with_tensorrt_cuda_and_cpu(caplog, tmp_path):
    caplog.set_level(logging.INFO)
    chosen = ort_providers("cuda:1", [TRT_EP, CUDA_EP, CPU_EP], fp16=True, trt_cache=tmp_path / "cache")
    assert provider_names(chosen) == [TRT_EP, CUDA_EP, CPU_EP]
    trt, cuda = chosen[0][1], chosen[1][1]
    assert cuda == {"device_id": 1, "use_tf32": 0}  # fp32 stays fp32 (the provider's default is TF32)
    # fp16 on the weakly typed provider: the norms' reductions kept fp32, as the graph's fp32 islands
    assert trt["device_id"] == 1 and trt["trt_fp16_enable"] is True and trt["trt_layer_norm_fp32_fallback"] is True
    assert trt["trt_engine_cache_enable"] is True and trt["trt_engine_cache_path"] == str(tmp_path / "cache")
    assert not _notices(caplog)


def test_providers_with_cuda_and_cpu(caplog):
    caplog.set_level(logging.INFO)
    assert ort_providers("cuda", [CUDA_EP, CPU_EP, "AzureExecutionProvider"]) == [(CUDA_EP, {"device_id": 0, "use_tf32": 0}),
                                                                                      CPU_EP]
    assert not _notices(caplog)


def test_cpu_only_onnxruntime_falls_back_with_one_notice_per_stage(caplog):
    caplog.set_level(logging.INFO)
    available = [CPU_EP, "AzureExecutionProvider"]  # what the plain onnxruntime wheel offers
    assert ort_providers("cuda", available, stage="decoder") == [CPU_EP]
    assert ort_providers("cuda", available, stage="decoder") == [CPU_EP]  # said once, not per session
    assert ort_providers("cuda", available, stage="vision_encoder") == [CPU_EP]
    assert _notices(caplog) == [
        f"onnxruntime here has no {CUDA_EP} (install onnxruntime-gpu); running stage {s} on CPU "
        "(--device cuda asked for a GPU)" for s in ("decoder", "vision_encoder")]
    assert all(r.levelno == logging.WARNING for r in caplog.records)  # shown without any logging set-up


def test_strict_cuda_refuses_the_fallback():
    with pytest.raises(InputError) as err:
        ort_providers("cuda", [CPU_EP], stage="decoder", strict=True)
    assert str(err.value) == (f"onnxruntime here has no {CUDA_EP} (install onnxruntime-gpu), and cuda was asked "
                              "strictly: not running stage decoder on CPU")


def test_cpu_asks_for_cpu_alone_whatever_is_installed(caplog):
    caplog.set_level(logging.INFO)
    assert ort_providers("cpu", [TRT_EP, CUDA_EP, CPU_EP]) == [CPU_EP]
    assert ort_providers(None, [CPU_EP]) == [CPU_EP]
    assert fallback_notice(Device(), [CPU_EP]) is None
    assert not _notices(caplog)


def test_tensorrt_options():
    plain = trt_provider_options(Device("cuda"))
    assert plain == {"device_id": 0, "trt_fp16_enable": False}  # no cache folder: no engine cache
    # an int8 Q/DQ graph needs TensorRT's INT8 flag (its int8 layers are refused without it); others do not set it
    assert trt_provider_options(Device("cuda"), int8=True)["trt_int8_enable"] is True
    profiles = {"input_ids": ((1, 1), (1, 64), (4, 256)), "past_key_0": ((1, 2, 0, 8), (1, 2, 64, 8), (4, 2, 255, 8))}
    opts = trt_provider_options(Device("cuda", 0), profiles=profiles)
    assert opts["trt_profile_min_shapes"] == "input_ids:1x1,past_key_0:1x2x0x8"
    assert opts["trt_profile_opt_shapes"] == "input_ids:1x64,past_key_0:1x2x64x8"
    assert opts["trt_profile_max_shapes"] == "input_ids:4x256,past_key_0:4x2x255x8"


# --------------------------------------------------------------------------- ONNX Runtime runner


def _cache_graph(path):
    """``(x [1, 1, 4], past [1, t, 4]) -> (present = concat(past, x) [1, t+1, 4], total = sum(present) [1])``:
    a decoder's cache in miniature."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Concat", ["past", "x"], ["present"], axis=1),
         helper.make_node("ReduceSum", ["present"], ["total"], keepdims=0)],
        "cache",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4]),
         helper.make_tensor_value_info("past", TensorProto.FLOAT, [1, "t", 4])],
        [helper.make_tensor_value_info("present", TensorProto.FLOAT, [1, "t1", 4]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def test_ort_runner_records_the_providers_it_got(tmp_path, caplog):
    from vlm_export.runtime.runners import OrtRunner

    caplog.set_level(logging.INFO)
    graph = _cache_graph(tmp_path / "cache.onnx")
    runner = OrtRunner("decoder", graph)
    assert runner.providers == [CPU_EP] and runner.device == Device("cpu") and runner.io_device == ("cpu", 0)
    x, past = np.ones((1, 1, 4), np.float32), np.zeros((1, 2, 4), np.float32)
    out = runner.infer({"x": x, "past": past})
    assert out["present"].shape == (1, 3, 4) and float(out["total"]) == 4.0
    assert not _notices(caplog)


def test_spinning_is_the_stages_choice_unless_turned_off(tmp_path, monkeypatch):
    """A per-token stage's session spins (ONNX Runtime's default), others do not; VLM_EXPORT_ORT_SPIN=0
    (set for this test suite by conftest) turns it off for every session. Read back from the session."""
    from vlm_export.runtime.runners import OrtRunner

    graph = _cache_graph(tmp_path / "cache.onnx")

    def spinning(spin: bool) -> str:
        runner = OrtRunner("decoder", graph, spin=spin)
        setting = runner.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
        assert setting == ("1" if runner.spin else "0")
        return setting

    monkeypatch.setenv("VLM_EXPORT_ORT_SPIN", "1")
    assert (spinning(True), spinning(False)) == ("1", "0")
    monkeypatch.delenv("VLM_EXPORT_ORT_SPIN")
    assert (spinning(True), spinning(False)) == ("1", "0")
    monkeypatch.setenv("VLM_EXPORT_ORT_SPIN", "0")
    assert (spinning(True), spinning(False)) == ("0", "0")


@pytest.mark.skipif(HAS_CUDA, reason="checks the fallback of a CPU-only onnxruntime")
def test_ort_runner_on_cuda_without_onnxruntime_gpu_runs_on_cpu_and_says_so(tmp_path, caplog):
    import onnxruntime as ort

    from vlm_export.runtime.runners import OrtRunner

    if CUDA_EP in ort.get_available_providers():  # pragma: no cover - onnxruntime-gpu without a GPU
        pytest.skip("this onnxruntime has the CUDA provider")
    caplog.set_level(logging.INFO)
    runner = OrtRunner("decoder", _cache_graph(tmp_path / "cache.onnx"), device="cuda")
    assert runner.providers == [CPU_EP] and runner.io_device == ("cpu", 0)
    assert _notices(caplog) == [f"onnxruntime here has no {CUDA_EP} (install onnxruntime-gpu); running stage "
                                "decoder on CPU (--device cuda asked for a GPU)"]
    assert not (tmp_path / "trt-cache").exists()  # nothing written next to the graph


@pytest.mark.filterwarnings("ignore:Specified provider")
def test_gpu_providers_the_session_cannot_start_are_said(tmp_path, caplog, monkeypatch):
    """An onnxruntime that lists TensorRT and CUDA but cannot start them (no GPU, libraries missing)
    runs on the CPU: the runner records what the session got and says so. Here the list is faked."""
    import vlm_export.runtime.devices as devices
    from vlm_export.runtime.runners import OrtRunner

    if HAS_CUDA:  # pragma: no cover - the providers might start there
        pytest.skip("checks a machine without a GPU")
    monkeypatch.setattr(devices, "available_providers", lambda: [TRT_EP, CUDA_EP, CPU_EP])
    caplog.set_level(logging.INFO)
    runner = OrtRunner("decoder", _cache_graph(tmp_path / "cache.onnx"), device="cuda", fp16=True)
    assert provider_names(runner.requested_providers) == [TRT_EP, CUDA_EP, CPU_EP]
    trt = runner.requested_providers[0][1]
    assert trt["trt_fp16_enable"] is True and trt["trt_engine_cache_path"] == str(tmp_path / "trt-cache")
    assert (tmp_path / "trt-cache").is_dir()  # made for TensorRT's engine cache
    assert runner.providers == [CPU_EP] and runner.io_device == ("cpu", 0)
    assert _notices(caplog) == [f"ONNX Runtime could not start {TRT_EP}, {CUDA_EP} for stage decoder; "
                                f"it runs on {CPU_EP}"]




@pytest.mark.filterwarnings("ignore:Specified provider")
def test_sessions_with_tensorrts_engine_cache_open_one_at_a_time(tmp_path, monkeypatch):
    """Two Triton instances of a stage are two processes opening one engine cache: a session with
    TensorRT's cache waits for the cache folder's lock (held here as another process would hold it)."""
    import fcntl
    import threading

    import vlm_export.runtime.devices as devices
    from vlm_export.runtime.runners import OrtRunner

    if HAS_CUDA:  # pragma: no cover - the providers might start there
        pytest.skip("checks a machine without a GPU")
    monkeypatch.setattr(devices, "available_providers", lambda: [TRT_EP, CUDA_EP, CPU_EP])
    graph = _cache_graph(tmp_path / "cache.onnx")
    (tmp_path / "trt-cache").mkdir()
    opened = []
    with open(tmp_path / "trt-cache" / ".vlm-export-build.lock", "a") as other:  # another open file: flock conflicts
        fcntl.flock(other, fcntl.LOCK_EX)
        thread = threading.Thread(target=lambda: opened.append(OrtRunner("decoder", graph, device="cuda")))
        thread.start()
        thread.join(timeout=1.0)
        assert thread.is_alive() and not opened  # waiting for the lock
        fcntl.flock(other, fcntl.LOCK_UN)
        thread.join(timeout=120)
    assert opened and opened[0].providers == [CPU_EP]
    # the lock is released after opening: another session opens at once
    assert OrtRunner("decoder", graph, device="cuda").providers == [CPU_EP]

@pytest.mark.filterwarnings("ignore:Specified provider")
def test_strict_cuda_refuses_gpu_providers_the_session_could_not_start(tmp_path, monkeypatch):
    """Listed but not started (the faked list above) is a CPU run too: ``strict_device`` refuses it."""
    import vlm_export.runtime.devices as devices
    from vlm_export.errors import InputError
    from vlm_export.runtime.runners import OrtRunner

    if HAS_CUDA:  # pragma: no cover - the providers might start there
        pytest.skip("checks a machine without a GPU")
    monkeypatch.setattr(devices, "available_providers", lambda: [CUDA_EP, CPU_EP])
    with pytest.raises(InputError) as e:
        OrtRunner("decoder", _cache_graph(tmp_path / "cache.onnx"), device="cuda", strict_device=True)
    assert str(e.value).startswith(f"ONNX Runtime could not start {CUDA_EP} for stage decoder, and cuda was "
                                   f"asked strictly: not running it on {CPU_EP}")
    # not strict: the same runner runs on the CPU (and says so, above)
    assert OrtRunner("decoder", _cache_graph(tmp_path / "cache.onnx"), device="cuda").providers == [CPU_EP]

def test_io_binding_keeps_the_cache_between_calls(tmp_path):
    """``infer_bound``: the present cache handed to the next call as an OrtValue, never as numpy,
    gives what the numpy contract gives; outputs not kept come back as numpy."""
    import onnxruntime as ort

    from vlm_export.errors import RunnerError
    from vlm_export.runtime.runners import OrtRunner

    runner = OrtRunner("decoder", _cache_graph(tmp_path / "cache.onnx"))
    rng = np.random.default_rng(0)
    steps = [rng.standard_normal((1, 1, 4)).astype(np.float32) for _ in range(4)]
    past_np = past_dev = np.zeros((1, 0, 4), np.float32)
    for x in steps:
        want = runner.infer({"x": x, "past": past_np})
        got = runner.infer_bound({"x": x, "past": past_dev}, keep={"present"})
        assert isinstance(got["present"], ort.OrtValue) and isinstance(got["total"], np.ndarray)
        np.testing.assert_array_equal(got["present"].numpy(), want["present"])
        np.testing.assert_array_equal(got["total"], want["total"])
        past_np, past_dev = want["present"], got["present"]
    assert past_dev.shape() == [1, 4, 4]
    on_device = runner.to_device(np.ones((1, 1, 4), np.float32))  # a feed placed by hand
    assert float(runner.infer_bound({"x": on_device, "past": past_dev})["total"]) == pytest.approx(
        float(past_np.sum()) + 4, rel=1e-6)
    with pytest.raises(RunnerError, match=r"missing inputs \['past'\]"):
        runner.infer_bound({"x": steps[0]})
    with pytest.raises(RunnerError, match=r"no outputs \['logits'\] to keep"):
        runner.infer_bound({"x": steps[0], "past": past_np}, keep={"logits"})


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_generation_with_the_cache_kept_on_the_device_equals_the_numpy_path(tiny_build, backend):
    """``keep_on_device``: the decoder's present caches stay where the backend made them
    (``DeviceArray``: an OrtValue in ONNX Runtime's memory, a torch tensor) and go back in as the next
    step's past without a host copy; rows joining and leaving a batch (numpy ops on the caches)
    read them through ``__array__``. Same tokens as the numpy path, for one request and for a batch
    of requests of different lengths. On the CPU the "device" is the backend's CPU memory; on a GPU
    run it is the GPU's (the bench keeps them there on cuda)."""
    from vlm_export.adapters.reference import open_pipeline
    from vlm_export.runtime.generate import GenerationConfig, GenerationRequest, generate, generate_batch
    from vlm_export.runtime.runners import DeviceArray, OrtDeviceArray, TorchDeviceArray

    build = tiny_build("llava-llama").path
    plain, kept = open_pipeline(build, backend, threads=1), open_pipeline(build, backend, threads=1)
    scheme, decoder = kept.scheme, kept.decoder
    decoder.keep_on_device(scheme.present_names)
    fed = []
    real = decoder._run
    decoder._run = lambda feeds: fed.append({n: type(feeds[n]) for n in scheme.past_names}) or real(feeds)

    greedy = GenerationConfig(max_new_tokens=6, ignore_eos=True)
    assert generate(kept, "Tell me a story.", (), greedy).token_ids == generate(plain, "Tell me a story.", (), greedy).token_ids
    made = OrtDeviceArray if backend == "onnxruntime" else TorchDeviceArray
    # the prefill's empty past is numpy; every step after it takes the previous step's outputs as they are
    assert len(fed) == 6 and all(t is np.ndarray for t in fed[0].values())
    assert all(t is made for step in fed[1:] for t in step.values())

    out = decoder.infer(scheme.step_feeds(scheme.synthetic_batch(1, 3, np.random.default_rng(0)), np.asarray([1])))
    cache = out[scheme.present_names[0]]
    assert isinstance(cache, made) and isinstance(cache, DeviceArray) and isinstance(out["logits"], np.ndarray)
    assert np.asarray(cache).shape == cache.shape and cache.ndim == 4 and np.asarray(cache).dtype == cache.dtype
    assert isinstance(decoder.place(np.zeros((1, 2), np.float32)), made)

    requests = [GenerationRequest("Hi", (), GenerationConfig(max_new_tokens=3)),
                GenerationRequest("Write a short story about a robot.", (), GenerationConfig(max_new_tokens=7)),
                GenerationRequest("Name a colour.", (), GenerationConfig(max_new_tokens=5, temperature=1.1, seed=2))]
    assert [r.token_ids for r in generate_batch(kept, requests, max_batch=2)] == \
        [r.token_ids for r in generate_batch(plain, requests, max_batch=2)]
    decoder.keep_on_device(())  # back to the plain path
    out = decoder.infer(scheme.step_feeds(scheme.synthetic_batch(1, 3, np.random.default_rng(0)), np.asarray([1])))
    assert isinstance(out[scheme.present_names[0]], np.ndarray) and isinstance(decoder.place(np.zeros(2)), np.ndarray)


# --------------------------------------------------------------------------- PyTorch runner


class _Tiny(torch.nn.Module):
    """ids [b, s] int64 and x [b, s, 8] float -> (y [b, s, 8] float, argmax [b, s] int64)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(16, 8)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, ids, x):
        y = torch.tanh(self.proj(self.embed(ids) + x))
        return y, y.argmax(-1)


def _tiny_feeds():
    rng = np.random.default_rng(1)
    return {"ids": rng.integers(0, 16, (2, 5)).astype(np.int64), "x": rng.standard_normal((2, 5, 8)).astype(np.float32)}


def test_torch_runner_fp32_cpu_is_the_plain_path():
    from vlm_export.runtime.runners import TorchRunner

    module = _Tiny()
    runner = TorchRunner("stage", module, ["ids", "x"], ["y", "index"])
    assert runner.plain and runner.device == Device("cpu") and runner.dtype == "fp32"
    assert module.proj.weight.dtype == torch.float32
    feeds = _tiny_feeds()
    got = runner.infer(feeds)
    with torch.no_grad():
        want = module(torch.from_numpy(feeds["ids"]), torch.from_numpy(feeds["x"]))
    np.testing.assert_array_equal(got["y"], want[0].numpy())  # bit for bit
    assert got["y"].dtype == np.float32 and got["index"].dtype == np.int64


def test_torch_runner_bf16_on_cpu_casts_floats_only_and_returns_fp32():
    from vlm_export.runtime.runners import TorchRunner

    feeds = _tiny_feeds()
    ref = TorchRunner("stage", _Tiny(), ["ids", "x"], ["y", "index"]).infer(feeds)
    module = _Tiny()
    runner = TorchRunner("stage", module, ["ids", "x"], ["y", "index"], device="cpu", dtype="bf16")
    assert not runner.plain and module.proj.weight.dtype == torch.bfloat16  # moved and cast once, in place
    got = runner.infer(feeds)
    assert got["y"].dtype == np.float32 and got["index"].dtype == np.int64  # ids were not cast
    assert not np.array_equal(got["y"], ref["y"])  # it really ran in bf16
    np.testing.assert_allclose(got["y"], ref["y"], atol=3e-2)


def test_torch_runner_fp64_returns_float64_and_takes_read_only_feeds():
    """fp64 (parity's yardstick for a failing fp32 entry): outputs stay float64 (no cast down), and a feed in
    read-only memory (a recorded array, memory-mapped) is taken without torch's non-writable warning."""
    import warnings

    from vlm_export.runtime.runners import TorchRunner

    feeds = _tiny_feeds()
    ref = TorchRunner("stage", _Tiny(), ["ids", "x"], ["y", "index"]).infer(feeds)
    module = _Tiny()
    runner = TorchRunner("stage", module, ["ids", "x"], ["y", "index"], dtype="fp64")
    assert module.proj.weight.dtype == torch.float64
    for value in feeds.values():
        value.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = runner.infer(feeds)
    assert got["y"].dtype == np.float64 and got["index"].dtype == np.int64
    np.testing.assert_allclose(got["y"], ref["y"], rtol=1e-5, atol=1e-6)
    assert not np.array_equal(got["y"], ref["y"].astype(np.float64))  # computed in float64, not fp32 cast up


@needs_no_gpu
def test_torch_runner_on_cuda_without_a_gpu_is_one_line():
    from vlm_export.runtime.runners import TorchRunner

    with pytest.raises(InputError) as err:
        torch_device("cuda")
    assert str(err.value) == NO_GPU
    module = _Tiny()
    with pytest.raises(InputError, match="no CUDA GPU here"):
        TorchRunner("stage", module, ["ids", "x"], ["y", "index"], device="cuda", dtype="fp16")
    assert module.proj.weight.dtype == torch.float32  # refused before anything was cast


def _first_logits(pipe, prompt="What is in the picture?"):
    """Prefill logits and one greedy decode step's logits of one image + prompt."""
    spec = pipe.image_stages[0].inputs[0]
    pixels = np.random.default_rng(0).standard_normal((1, *spec.dims[1:]), dtype=np.float32)
    image = pipe.encode_images(pixels, prompt=prompt)
    logits, state = pipe.prefill(pipe.prompt_ids(prompt, 1), image)
    step = pipe.decode(pipe.scheme.step_feeds(state, np.asarray([int(np.argmax(logits))])))
    return np.concatenate([logits.ravel(), pipe.scheme.next_logits(step).ravel()]).astype(np.float64)


def _cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_reference_in_half_precision_on_cpu_is_close_to_fp32(tiny_build, dtype):
    """The dtype path of the real split modules (what a GPU run in fp16/bf16 goes through), on the CPU."""
    from vlm_export.adapters.reference import open_reference

    build = tiny_build("llava-llama").path
    ref = open_reference(build)
    half = open_reference(build, dtype=dtype)
    assert {r.dtype for r in half.runners.values()} == {dtype} and {r.dtype for r in ref.runners.values()} == {"fp32"}
    a, b = _first_logits(ref), _first_logits(half)
    assert not np.array_equal(a, b)
    assert _cosine(a, b) > 0.99, _cosine(a, b)


@needs_no_gpu
def test_cuda_asked_on_a_cpu_machine_fails_at_once(tmp_path):
    """The reference, the bench (Python API) refuse before loading anything: the build need not exist."""
    from vlm_export.adapters.reference import open_reference
    from vlm_export.bench import BenchOptions, run_bench

    with pytest.raises(InputError) as err:
        open_reference(tmp_path / "no-build", device="cuda")
    assert str(err.value) == NO_GPU
    with pytest.raises(InputError) as err:
        run_bench(tmp_path / "no-build", BenchOptions(device="cuda:0", dtype="fp16"))
    assert str(err.value) == NO_GPU
    with pytest.raises(InputError, match="unknown device 'gpu'"):
        BenchOptions(device="gpu")
    options = BenchOptions(device="CUDA:0", dtype="bfloat16")  # kept as text, normalised, for the JSON
    assert (options.to_dict()["device"], options.to_dict()["dtype"]) == ("cuda:0", "bf16")


def _cli_has_bench_device() -> bool:
    from vlm_export.cli import _parser

    _, unknown = _parser().parse_known_args(["bench", "build", "--device", "cuda"])
    return not unknown


@needs_no_gpu
def test_cli_bench_on_cuda_without_a_gpu_is_one_line(run_cli, tmp_path):
    from conftest import assert_one_line_error

    if not _cli_has_bench_device():
        pytest.skip("vlm-export bench has no --device yet (the lead's cli.py change, /tmp/s5/h1_cli.py.diff)")
    assert_one_line_error(run_cli("bench", str(tmp_path / "no-build"), "--device", "cuda"), NO_GPU)


def test_bench_records_where_it_ran(tiny_build, tmp_path):
    """A CPU bench with the reference in bf16: the placement (device, dtype, providers per stage) is
    in the results and the markdown."""
    from vlm_export.bench import BenchOptions, run_bench
    from vlm_export.bench.report import markdown

    options = BenchOptions(backends=("torch", "onnxruntime"), batch=(1,), new_tokens=2, threads=2, warmup=0,
                           iterations=1, requests=1, bandwidth_mb=16, dtype="bf16")
    results = run_bench(tiny_build("llava-llama").path, options)
    place = results["placement"]
    assert place["device"] == {"device": "cpu"}
    assert {v["dtype"] for v in place["backends"]["torch"].values()} == {"bf16"}
    assert {tuple(v["providers"]) for v in place["backends"]["onnxruntime"].values()} == {(CPU_EP,)}
    assert results["settings"]["timer"] == "perf_counter" and results["ceiling"]["measured_on"] == "cpu"
    assert f"Device: the CPU. PyTorch on cpu bf16; ONNX Runtime with {CPU_EP}." in markdown(results)


def test_bench_decode_step_with_the_cache_on_the_device(tiny_build):
    """What a GPU bench does to its decoders (``keep_caches_on_device``) and to the decode-step case's
    synthetic cache (placed once where the decoder keeps its own), run on the CPU: same logits."""
    from vlm_export.bench.run import BenchOptions, keep_caches_on_device, make_inputs, stage_cases
    from vlm_export.runtime.load import open_build
    from vlm_export.runtime.runners import OrtDeviceArray

    build = tiny_build("llava-llama").path
    plain, kept = open_build(build, threads=1), open_build(build, threads=1)
    assert keep_caches_on_device({"onnxruntime": kept}) == {"onnxruntime": list(kept.scheme.present_names)}
    inputs = make_inputs(plain, BenchOptions(batch=(1,), new_tokens=2))
    step = {stage: call for stage, _, _, _, call in stage_cases(plain, inputs, (1,))}["decode_step"]
    fed = []
    real = kept.decoder._run
    kept.decoder._run = lambda feeds: fed.append(feeds) or real(feeds)
    want, got, again = step(plain), step(kept), step(kept)
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(again[kept.scheme.present_names[0]]),
                                  np.asarray(got[kept.scheme.present_names[0]]))
    assert all(isinstance(f[n], OrtDeviceArray) for f in fed for n in kept.scheme.past_names)
    assert fed[0][kept.scheme.past_names[0]] is fed[1][kept.scheme.past_names[0]]  # placed once, not per call


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available())")
def test_reference_on_cuda_fp16_matches_the_fp32_cpu_reference(tiny_build):  # pragma: no cover - GPU only
    from vlm_export.adapters.reference import open_reference

    build = tiny_build("llava-llama").path
    ref = open_reference(build)
    gpu_pipe = open_reference(build, device="cuda", dtype="fp16")
    runner = next(iter(gpu_pipe.runners.values()))
    assert next(runner.module.parameters()).device.type == "cuda"
    assert next(runner.module.parameters()).dtype == torch.float16
    a, b = _first_logits(ref), _first_logits(gpu_pipe)
    assert _cosine(a, b) > 0.999, _cosine(a, b)
    np.testing.assert_allclose(b, a, atol=5e-2 * max(1.0, float(np.abs(a).max())))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available())")
def test_bench_on_cuda(tiny_build, tmp_path):  # pragma: no cover - GPU only
    from vlm_export.bench import BenchOptions, run_bench

    options = BenchOptions(backends=("torch", "onnxruntime"), batch=(1,), new_tokens=4, threads=2, warmup=1,
                           iterations=3, requests=2, bandwidth_mb=1024, device="cuda", dtype="fp16",
                           out=tmp_path / "bench")
    results = run_bench(tiny_build("llava-llama").path, options)
    place = results["placement"]
    assert place["device"]["name"] and place["device"]["device"] == "cuda"
    assert {v["dtype"] for v in place["backends"]["torch"].values()} == {"fp16"}
    assert {v["device"] for v in place["backends"]["torch"].values()} == {"cuda"}
    assert results["settings"]["timer"].startswith("CUDA events")
    assert results["ceiling"]["bandwidth_gb_s"]["p50"] > 100  # HBM, not host memory
    assert all(r["latency_ms"]["p50"] > 0 for r in results["stages"])
    assert "Device: **" in (tmp_path / "bench" / "bench.md").read_text()


def test_tensorrt_engines_cache_beside_the_graph_or_where_the_environment_says(tmp_path, monkeypatch):
    """A repository mounted read-only (a pod's) cannot hold TensorRT's engine cache beside its graphs:
    VLM_EXPORT_TRT_CACHE names a writable folder, one sub-folder per graph (deploy kubernetes sets it)."""
    from vlm_export.runtime.devices import TRT_CACHE_ENV, default_trt_cache

    graph, other = tmp_path / "repo" / "vision.onnx", tmp_path / "repo2" / "vision.onnx"
    monkeypatch.delenv(TRT_CACHE_ENV, raising=False)
    assert default_trt_cache(graph) == tmp_path / "repo" / "trt-cache"
    monkeypatch.setenv(TRT_CACHE_ENV, str(tmp_path / "cache"))
    assert default_trt_cache(graph).parent == tmp_path / "cache"
    assert default_trt_cache(graph) == default_trt_cache(graph) != default_trt_cache(other)
