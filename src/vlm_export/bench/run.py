"""``vlm-export bench``: PyTorch vs ONNX Runtime vs Triton, stage by stage, on the same inputs.

Every backend is driven through the one runner contract (the ``VLMPipeline``'s stages as the
manifest declares them, the decoding scheme's feeds and the one generation loop
``runtime.generate.stream``), so what differs between the rows of the report is
the backend, nothing else. Inputs (real photos through the real preprocessing, one prompt set,
one random KV cache) are made once and shared. Backends take turns in mirrored blocks, so a
busy spell on a shared machine slows all of them alike and the ratios stay meaningful; warm-up
calls are discarded; thread counts are set once and recorded; a run that other processes
disturbed is marked as such.
"""
from __future__ import annotations

import datetime as dt
import io
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..contract import DecodeBatch, scheme_from_dict
from ..errors import InputError
from ..manifest import form_entry, read_manifest, versions
from ..progress import Progress
from ..runtime.pipeline import VLMPipeline
from . import measure
from .batching import step_at_same_length
from .calls import in_process_call
from .prefix import bench_prefix_cache
from .peer import PRECISIONS as PEER_PRECISIONS

BACKENDS = ("torch", "onnxruntime", "triton")
IN_PROCESS = ("torch", "onnxruntime")
FORMAT, VERSION = "vlm-export-bench", 1
# scikit-image's photographs: real images through the real image processor, no download
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket")
# a run is marked busy past these (see contention())
BUSY_LOAD, BUSY_LOAD_END, LOW_CPU_SHARE = 0.5, 1.5, 0.75
E2E_WARMUP = 1  # discarded requests per block of end-to-end requests
PROMPTS = ("What animal is in the picture?", "Describe this image in one sentence.",
           "What is in the cup?", "What is this object used for?")


@dataclass(frozen=True)
class BenchOptions:
    backends: tuple[str, ...] = BACKENDS
    batch: tuple[int, ...] = (1, 4)  # image batch sizes of the vision encoder and projector cases
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16)  # Triton: requests in flight
    new_tokens: int = 64  # generated per end-to-end request (EOS ignored, so every request makes this many)
    threads: int | None = None  # torch and ONNX Runtime intra-op threads; None: every usable core
    out: Path | None = None  # write bench.json, bench.md and the plots here; None: only return the results
    warmup: int = 3  # discarded calls per stage case and backend
    iterations: int = 20  # timed calls per stage case and backend
    stage_budget_s: float = 30.0  # a stage case stops early past this (keeping >= 5 samples)
    requests: int = 6  # timed end-to-end requests per in-process backend; also the minimum per Triton level
    # the decoder's self-attention past in the decode-step case; None: the scheme's decode_lengths
    # (prompt + new_tokens // 2; an encoder-decoder's decoder: its own prompt + new_tokens // 2)
    decode_past: int | None = None
    bandwidth_mb: int = 512  # buffer of the memory-bandwidth measurement (>> the L3 cache)
    name: str | None = None  # label in the report; None: the build folder's name
    check_hashes: bool = True  # refuse graphs that changed since the build
    # issue 16's peers, text only on the build's LM: an onnxruntime-genai model folder, or "build"
    # (its model builder makes one into BUILD/bench/peer-<peer_precision>); a GGUF file of the same
    # LM for llama.cpp. None: no peer.
    peer: str | None = None
    peer_precision: str = "int4"
    peer_gguf: str | None = None
    # issue 17: where the in-process backends run. "cpu" (the default: what every run before measured),
    # "cuda" or "cuda:N": PyTorch on that GPU in ``dtype``; ONNX Runtime on TensorRT/CUDA where it has
    # them (else CPU, with a notice; the report records the providers); timings by CUDA events; the
    # bandwidth ceiling from the GPU's memory. On a machine without a usable GPU, run_bench refuses at once.
    device: str = "cpu"
    dtype: str = "fp32"  # the PyTorch reference's dtype: fp32, fp16 or bf16
    # time to first token with each in-process backend's prefix cache on and off (bench/prefix.py)
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        from ..runtime.devices import Device, parse_dtype

        object.__setattr__(self, "device", str(Device.parse(self.device)))  # kept as text, for JSON
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown or not self.backends:
            raise InputError(f"unknown backend(s) {unknown or list(self.backends)}; choose from {', '.join(BACKENDS)}")
        for name in ("batch", "concurrency"):
            values = getattr(self, name)
            if not values or any(not isinstance(v, int) or v < 1 for v in values):
                raise InputError(f"{name} must be a list of whole numbers >= 1, got {list(values)}")
        for name in ("new_tokens", "iterations", "requests", "bandwidth_mb"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1 or self.warmup < 0:
            raise InputError("threads must be at least 1 and warmup at least 0")
        for name in ("peer", "peer_gguf"):  # paths kept as text, so the options dump to JSON as given
            if getattr(self, name) is not None:
                object.__setattr__(self, name, str(getattr(self, name)))
        if self.peer_precision not in PEER_PRECISIONS:
            raise InputError(f"peer precision {self.peer_precision!r} is not one of {', '.join(PEER_PRECISIONS)}")
        if self.peer is not None and self.peer != "build" and not Path(self.peer).is_dir():
            raise InputError(f"--peer takes 'build' or an onnxruntime-genai model folder; {self.peer} is neither")
        if self.peer_gguf is not None and not Path(self.peer_gguf).is_file():
            raise InputError(f"--peer-gguf {self.peer_gguf}: no such file (pass a GGUF file of the build's LM)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = None if self.out is None else str(self.out)
        return d


def parse_csv(text: str, option: str, cast=str) -> tuple:
    """``"1,4"`` -> ``(1, 4)`` for command lines; InputError naming the option on a bad item."""
    try:
        return tuple(cast(x.strip()) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise InputError(f"{option} takes a comma-separated list, e.g. 1,4; got {text!r}") from None


@dataclass
class BenchInputs:
    """Everything fed to the backends, made once so every backend sees the same bytes."""

    images: list[bytes]  # encoded PNGs
    pixel_values: dict[int, np.ndarray]  # image batch -> preprocessed pixels
    image_feeds: dict[tuple[str, int], dict[str, np.ndarray]]  # (image stage, image batch) -> its feeds
    prompt_ids: list[int]  # one image + a question
    image_input: object  # the decoder's image input for that image (the scheme's: an array or e.g. CrossImages)
    decode_batch: DecodeBatch  # random state of the decode-step case
    requests: list[tuple[str, bytes]] = field(default_factory=list)  # end-to-end: (question, image)
    # each request's image preprocessed (``pixel_shapes``): processors that keep an image's size give each its own
    request_pixel_shapes: list = field(default_factory=list)

    @property
    def past_len(self) -> int:
        return self.decode_batch.length

    def describe(self) -> dict:
        return {"photos": [PHOTOS[i % len(PHOTOS)] for i in range(len(self.images))],
                "prompt": PROMPTS[0], "prompt_tokens": len(self.prompt_ids),
                "pixel_values_shape": pixel_shapes(self.pixel_values[min(self.pixel_values)]),
                # every scheme's image input has a shape (its decoder tensor's) and nbytes (the image cache's size)
                "image_input_shape": list(self.image_input.shape), "image_input_bytes": int(self.image_input.nbytes),
                "decode_past_len": self.past_len,
                # every tensor of the decode-step state (self K/V at the past; an encoder-decoder's
                # cross K/V at the prompt's length): what the step and the ceiling read
                "decode_state_shapes": {n: list(v.shape) for n, v in self.decode_batch.caches.items()},
                "requests": [q for q, _ in self.requests], "request_pixel_shapes": self.request_pixel_shapes}


def pixel_shapes(pixels) -> list | dict:
    """One image's preprocessed shape: of the one pixels array, or per processor output by name."""
    if isinstance(pixels, dict):
        return {name: list(value.shape[1:]) for name, value in pixels.items()}
    return list(pixels.shape[1:])


def _photo_png(name: str) -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def make_inputs(pipe: VLMPipeline, options: BenchOptions) -> BenchInputs:
    n_images = max(options.batch)
    photos = [_photo_png(PHOTOS[i % len(PHOTOS)]) for i in range(max(n_images, len(PROMPTS)))]
    pixel_values = {b: pipe.pixel_values(photos[:b]) for b in options.batch}
    image_feeds = {}
    for b, pv in pixel_values.items():
        pipe.run_image_stages(pv, lambda spec, feeds, _, b=b: image_feeds.__setitem__((spec.name, b), feeds),
                              PROMPTS[0])
    prompt_ids = pipe.prompt_ids(PROMPTS[0], photos[:1])
    one = pixel_values[1] if 1 in pixel_values else pipe.pixel_values(photos[:1])
    image_input = pipe.encode_images(one, prompt=PROMPTS[0])
    pipe.check_length(len(prompt_ids), options.new_tokens // 2 + 1)
    past_len, fixed_len = pipe.scheme.decode_lengths(len(prompt_ids), options.new_tokens)
    past_len = options.decode_past or past_len
    if past_len + 1 > pipe.limits.max_sequence:
        raise InputError(f"a decode step at past {past_len} exceeds this build's max_sequence of "
                         f"{pipe.limits.max_sequence}: lower decode_past")
    rng = np.random.default_rng(0)  # the values do not change the time; fixed so runs are alike
    decode_batch = pipe.scheme.synthetic_batch(1, past_len, rng, fixed_len)
    requests = [(PROMPTS[i % len(PROMPTS)], photos[i % len(photos)]) for i in range(len(PROMPTS))]
    shapes = [pixel_shapes(pipe.pixel_values([image])) for _, image in requests]
    return BenchInputs(photos[:n_images], pixel_values, image_feeds, prompt_ids, image_input, decode_batch, requests,
                       shapes)


# --------------------------------------------------------------------------- loading


def _load(build_dir: Path, manifest: dict, backends: list[str], threads: int, progress: Progress,
          check_hashes: bool = True, device: str = "cpu", dtype: str = "fp32") -> dict[str, VLMPipeline]:
    """The pipelines; ``device``/``dtype`` other than cpu/fp32 load them there (see BenchOptions)."""
    from ..adapters.reference import open_pipeline, open_reference

    placed = device != "cpu" or dtype != "fp32"
    pipes = {}
    for backend in backends:
        if backend == "torch" and not Path(manifest["source"]["path"]).is_dir():
            raise InputError(f"the torch backend runs the source model {manifest['source']['path']}, which is gone; "
                             "restore it or leave torch out of --backends")
        where = f" ({device}{', ' + dtype if backend == 'torch' else ''})" if placed else ""
        with progress.step(f"loading {build_dir.name} on {backend}{where}") as advance:
            if placed and backend == "torch":
                pipes[backend] = open_reference(build_dir, threads, device=device, dtype=dtype)
            elif device != "cpu" and backend == "onnxruntime":
                from ..runtime.load import open_build

                # needs open_build(device=...) (runtime/load.py; /tmp/s5/h1_load.py.diff)
                pipes[backend] = open_build(build_dir, threads=threads, check_hashes=check_hashes, device=device)
            else:
                pipes[backend] = open_pipeline(build_dir, backend, threads=threads, check_hashes=check_hashes)
            advance()
    return pipes


def placement(pipes: dict[str, VLMPipeline], options: BenchOptions) -> dict:
    """Where each in-process backend ran, per stage: the device and dtype of PyTorch's modules, the
    providers ONNX Runtime's sessions really use (``session.get_providers()``), the device itself."""
    from ..runtime.devices import device_description

    out: dict = {"device": device_description(options.device), "backends": {}}
    for backend, pipe in pipes.items():
        stages = {}
        for name, runner in pipe.runners.items():
            if backend == "torch":
                stages[name] = {"device": str(getattr(runner, "device", "cpu")), "dtype": getattr(runner, "dtype", "fp32")}
            else:
                providers = getattr(runner, "providers", None) or runner.session.get_providers()
                stages[name] = {"providers": list(providers),
                                "device": "cpu" if providers[0] == "CPUExecutionProvider" else options.device}
                if getattr(runner, "emulates_qdq", False):  # int8 Q/DQ run as dequantize + fp32 op: not int8 speed
                    stages[name]["qdq_as_written"] = True
        out["backends"][backend] = stages
    return out


def thread_settings(threads: int, pipes: dict[str, VLMPipeline]) -> dict:
    import torch

    settings = {"requested": threads, "torch_intra_op": torch.get_num_threads(),
                "torch_inter_op": torch.get_num_interop_threads()}
    ort = pipes.get("onnxruntime")
    if ort is not None:
        opts = ort.decoder.session.get_session_options()
        settings.update(ort_intra_op=opts.intra_op_num_threads, ort_inter_op=opts.inter_op_num_threads,
                        ort_graph_optimization=str(opts.graph_optimization_level).split(".")[-1],
                        ort_providers=ort.decoder.session.get_providers())
    return settings


# --------------------------------------------------------------------------- in-process


def stage_cases(pipe: VLMPipeline, inputs: BenchInputs, batches: tuple[int, ...]):
    """(stage, batch, what is counted, count per call, call(pipe)): one per timed case; every
    image stage the build declares, an encoder stage (encoder-decoder schemes), then the decoder's prefill
    and one decode step, after the preprocessing of one image."""
    scheme = pipe.scheme
    # an image's bytes to pixels (decode + the model's processor): the same code for every backend,
    # timed so that the time to first token can be told apart (``ttft_breakdown``)
    cases = [("preprocess", 1, "images", 1, lambda p: p.pixel_values(inputs.images[:1]))]
    for spec in pipe.image_stages:
        for b in batches:
            feeds = inputs.image_feeds[(spec.name, b)]
            cases.append((spec.name, b, "images", b, lambda p, n=spec.name, f=feeds: p.runners[n].infer(f)))
    prefill = pipe.prefill_inputs([inputs.prompt_ids], inputs.image_input)  # (an encoder stage runs here once)
    steps: dict[int, object] = {}

    def decode_step(p: VLMPipeline):
        """One step at the same length each call, as generation runs it (``batching.step_at_same_length``)."""
        if id(p) not in steps:
            steps[id(p)] = step_at_same_length(p, inputs.decode_batch, inputs.prompt_ids[-1])
        return steps[id(p)]()

    if scheme.encoder_stage is not None:  # an encoder-decoder's encoder: once per prefill, on the prompt
        encoder_feeds = scheme.encoder_feeds([inputs.prompt_ids], inputs.image_input)
        cases.append((scheme.encoder_stage, 1, "prompt tokens", len(inputs.prompt_ids),
                      lambda p, n=scheme.encoder_stage: p.runners[n].infer(encoder_feeds)))
    # counted by the decoder's own tokens (an encoder-decoder's decoder runs its short start prompt)
    cases.append(("prefill", 1, "prompt tokens", int(np.asarray(prefill["input_ids"]).shape[1]), lambda p: p.decode(prefill)))
    cases.append(("decode_step", 1, "tokens", 1, decode_step))
    return cases


def keep_caches_on_device(pipes: dict[str, VLMPipeline]) -> dict[str, list[str]]:
    """On a GPU run: every in-process decoder keeps its present caches on the device between steps
    (``Runner.keep_on_device``), as a GPU deployment does. Returns what each keeps."""
    kept = {}
    for backend, pipe in pipes.items():
        names = list(getattr(pipe.scheme, "present_names", ()))
        if names and hasattr(pipe.decoder, "keep_on_device"):
            pipe.decoder.keep_on_device(names)
            kept[backend] = names
    return kept


def bench_stages(pipes: dict[str, VLMPipeline], inputs: BenchInputs, options: BenchOptions, threads: int,
                 progress: Progress) -> list[dict]:
    """p50/p90/p99 per stage case and backend, and the share of its cores each backend got.
    On a GPU (``options.device``) each call is timed by CUDA events (``measure.cuda_timed``)."""
    from ..runtime.devices import Device

    device = Device.parse(options.device)

    def timer(call):
        return measure.cuda_timed(call, device.index) if device.is_cuda else measure.timed(call)

    rows = []
    for stage, batch, unit, count, call in stage_cases(next(iter(pipes.values())), inputs, options.batch):
        with progress.step(f"{stage} (batch {batch}): {' vs '.join(pipes)}",
                           total=options.iterations * len(pipes)) as advance:
            samples = measure.alternating({b: timer(lambda p=p: call(p)) for b, p in pipes.items()},
                                          options.warmup, options.iterations, options.stage_budget_s, advance)
        for backend, pairs in samples.items():
            wall, cpu = (np.array(x) for x in zip(*pairs))
            latency = measure.summarize(wall)
            rows.append({"stage": stage, "batch": batch, "backend": backend, "latency_ms": latency,
                         "throughput": {"value": round(count * 1e3 / latency["p50"], 3), "unit": f"{unit}/s"},
                         "cpu_share": round(float(cpu.sum() / wall.sum() / threads), 3)})
    return rows


def bench_end_to_end(pipes: dict[str, VLMPipeline], inputs: BenchInputs, options: BenchOptions,
                     progress: Progress) -> dict[str, dict]:
    """Image bytes + question -> streamed text, in-process, every backend on the same requests."""
    with progress.step(f"end to end, {options.new_tokens} tokens: {' vs '.join(pipes)}",
                       total=options.requests * len(pipes)) as advance:
        timings = measure.alternating({b: in_process_call(p, inputs.requests, options.new_tokens)
                                       for b, p in pipes.items()}, E2E_WARMUP, options.requests, None, advance)
    return {b: measure.summarize_requests(t) for b, t in timings.items()}


def ttft_parts(pipe: VLMPipeline) -> list[str]:
    """The batch-1 stage cases a request's time to first token is made of, in order."""
    encoder = [pipe.scheme.encoder_stage] if pipe.scheme.encoder_stage is not None else []
    return ["preprocess"] + [spec.name for spec in pipe.image_stages] + encoder + ["prefill"]


def ttft_breakdown(stages: list[dict], end_to_end: dict, parts: list[str]) -> dict:
    """Per backend, its time to first token (p50) against the p50s of the batch-1 stage cases it is
    made of: what is left (tokenizing the prompt, scheduling, sampling the first token, joining the
    KV buffer) is ``rest_ms``. Rough: the end-to-end requests' images and prompts vary, the cases'
    do not. A backend missing a case (no batch 1 asked) is left out."""
    p50 = {(r["stage"], r["backend"]): r["latency_ms"]["p50"] for r in stages if r["batch"] == 1}
    out = {}
    for backend, e in end_to_end.items():
        got = {part: p50.get((part, backend)) for part in parts}
        if any(v is None for v in got.values()):
            continue
        total, ttft = sum(got.values()), e["ttft_ms"]["p50"]
        out[backend] = {"parts_ms": {k: round(v, 3) for k, v in got.items()}, "sum_ms": round(total, 3),
                        "ttft_ms": ttft, "rest_ms": round(ttft - total, 3)}
    return out


# --------------------------------------------------------------------------- the ceiling and targets


def ceiling(build_dir: Path, manifest: dict, bandwidth: list[float], stages: list[dict],
            end_to_end: dict, past_len: int, l3_bytes: int | None = None, fixed_state_bytes: int = 0) -> dict:
    """Decode speed against what memory bandwidth allows: bandwidth / bytes read per token.
    ``fixed_state_bytes``: decode-state tensors every step reads besides the growing KV cache (a
    cross-attention scheme's image K/V, a hybrid LM's linear-attention states: ``fixed_state_bytes``), 0 for a
    transformer's spliced schemes.

    A decoder whose bytes per token fit in the last-level cache is not read from memory at all
    after the first steps, so this ceiling does not bound it (the tiny test model beats it).
    """
    scheme = scheme_from_dict(manifest["scheme"])
    graph = form_entry(manifest, scheme.decoder_stage, "onnxruntime")  # the graph ONNX Runtime times
    weights = measure.decoder_weight_bytes(build_dir / graph["file"])
    kv = scheme.geometry.kv_bytes(past_len)
    per_token = weights["read_per_token_bytes"] + kv + fixed_state_bytes
    bw = float(np.median(bandwidth))
    limit = bw * 1e9 / per_token
    out = {"bandwidth_gb_s": {"p50": round(bw, 2), "max": round(max(bandwidth), 2), "min": round(min(bandwidth), 2),
                              "n": len(bandwidth)},
           "decoder_precision": graph["precision"], "decoder_graph_bytes": graph["bytes"], **weights,
           "kv_bytes_at_past": kv, "fixed_state_bytes": fixed_state_bytes, "past_len": past_len,
           "bytes_per_token": per_token,
           "ceiling_tokens_per_s": round(limit, 2),
           "fits_in_l3": None if not l3_bytes else per_token <= l3_bytes, "backends": {}}
    for row in stages:
        if row["stage"] == "decode_step":
            step = 1e3 / row["latency_ms"]["p50"]
            e2e = (end_to_end.get(row["backend"]) or {}).get("tokens_per_s")
            out["backends"][row["backend"]] = {
                "decode_step_tokens_per_s": round(step, 2), "decode_step_fraction": round(step / limit, 4),
                "end_to_end_tokens_per_s": e2e, "end_to_end_fraction": round(e2e / limit, 4) if e2e else None}
    return out


def fixed_state_bytes(batch: DecodeBatch) -> int:
    """Bytes of the decode state's caches that do not grow (read whole by every step all the same)."""
    return int(sum(v.nbytes for name, v in batch.caches.items() if name not in batch.growing))


def ratios(stages: list[dict], end_to_end: dict, reference: str = "torch") -> dict:
    """Speed-ups against PyTorch from the same run: reference p50 / backend p50 (> 1 is faster)."""
    ref = {(r["stage"], r["batch"]): r["latency_ms"]["p50"] for r in stages if r["backend"] == reference}
    out = {"reference": reference, "stages": [], "end_to_end": {}}
    if not ref:
        return out
    for r in stages:
        if r["backend"] != reference and (r["stage"], r["batch"]) in ref:
            out["stages"].append({"stage": r["stage"], "batch": r["batch"], "backend": r["backend"],
                                  "speedup_p50": round(ref[(r["stage"], r["batch"])] / r["latency_ms"]["p50"], 3)})
    base = end_to_end.get(reference)
    for backend, e in end_to_end.items():
        if backend != reference and base:
            out["end_to_end"][backend] = {
                "ttft_speedup_p50": round(base["ttft_ms"]["p50"] / e["ttft_ms"]["p50"], 3),
                "tpot_speedup_p50": round(base["tpot_ms"]["p50"] / e["tpot_ms"]["p50"], 3)}
    return out


def targets(ratio: dict, ceil: dict, served: dict | None) -> list[dict]:
    """Issue 6's speed targets, each a ratio from this run; None where this run cannot say."""
    ort = ratio["end_to_end"].get("onnxruntime", {})
    step = next((r["speedup_p50"] for r in ratio["stages"]
                 if r["backend"] == "onnxruntime" and r["stage"] == "decode_step"), None)
    frac = ceil["backends"].get("onnxruntime", {}).get("end_to_end_fraction")
    overhead = (served or {}).get("overhead", {}).get("per_token_ms")

    def row(name, value, goal, met, note=""):
        return {"target": name, "value": value, "goal": goal, "met": None if value is None else met, "note": note}

    precision = ceil["decoder_precision"]
    return [
        row(f"ONNX Runtime {precision} decode tokens/s vs PyTorch eager", ort.get("tpot_speedup_p50"), ">= 1.8x",
            ort.get("tpot_speedup_p50", 0) >= 1.8,
            f"end-to-end time per output token; a lone decode step: {_times(step)}"),
        row(f"ONNX Runtime {precision} decode, share of the bandwidth ceiling", frac, ">= 0.85", (frac or 0) >= 0.85,
            f"ceiling {ceil['ceiling_tokens_per_s']} tokens/s"),
        row("time to first token (image + question) vs PyTorch eager", ort.get("ttft_speedup_p50"), ">= 2x",
            ort.get("ttft_speedup_p50", 0) >= 2),
        _weight_only_row(row, precision, step, ort.get("tpot_speedup_p50")),
        row("Triton adds per decode step over in-process ONNX Runtime (ms)", overhead, "<= 1 ms",
            overhead is not None and overhead <= 1.0, "served p50 - in-process p50, same requests, concurrency 1"),
    ]


def _times(ratio: float | None) -> str:
    return "not measured (no torch backend in this run)" if ratio is None else f"{ratio}x"


WEIGHT_ONLY_GOALS = {"w4": 5.0, "w8": 3.5}  # decode vs PyTorch eager fp32 (issues 4 and 6)


def _weight_only_row(row, precision: str, step: float | None, tpot: float | None) -> dict:
    """The weight-only target this build's decoder answers (the torch backend is always the fp32 source)."""
    if precision not in WEIGHT_ONLY_GOALS:
        return row("weight-only int4 decode vs PyTorch eager fp32", None, ">= 5x", None,
                   f"this build's decoder is {precision}; bench a build made with --precision decoder=w4")
    goal = WEIGHT_ONLY_GOALS[precision]
    return row(f"weight-only {precision} decode step vs PyTorch eager fp32", step, f">= {goal:g}x",
               (step or 0) >= goal, f"end-to-end time per output token: {_times(tpot)}")


def contention(stages: list[dict], load_start: list | None, load_end: list | None, cores: int) -> dict:
    """Whether other processes competed for the cores: the load average around the run (the
    bench's own threads add about ``threads`` to the one at the end) and the CPU share of each
    stage case long enough to measure it."""
    reasons = []
    if load_start and load_start[0] > BUSY_LOAD * cores:
        reasons.append(f"1-minute load {load_start[0]} on {cores} cores at the start")
    if load_end and load_end[0] > BUSY_LOAD_END * cores:
        reasons.append(f"1-minute load {load_end[0]} on {cores} cores at the end (this bench adds about {cores})")
    for r in stages:  # the preprocessing is single-threaded Python (PIL, the processor): half of 2 cores
        if r["latency_ms"]["p50"] >= 10 and r["cpu_share"] < LOW_CPU_SHARE and r["stage"] != "preprocess":
            reasons.append(f"{r['backend']} {r['stage']} (batch {r['batch']}) got {r['cpu_share']:.2f} of its cores")
    return {"busy": bool(reasons), "reasons": reasons}


# --------------------------------------------------------------------------- the whole run


def run_bench(build_dir: Path, options: BenchOptions | None = None, progress: Progress | None = None) -> dict:
    """Measure a build; returns the results (and writes the reports when ``options.out`` is set)."""
    import torch

    from ..runtime.devices import Device, torch_device

    options = options or BenchOptions()
    device = Device.parse(options.device)
    if device.is_cuda:
        torch_device(device)  # no GPU here: the one-line error, before anything loads
    progress = progress or Progress()
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    if options.out is not None:  # a folder the reports cannot go to is said now, not after the measuring
        from .report import check_reports_folder

        check_reports_folder(Path(options.out), FORMAT)
    threads = options.threads or measure.machine()["usable_cores"] or 1
    torch.set_num_threads(threads)
    results = {"format": FORMAT, "version": VERSION, "name": options.name or build_dir.name,
               "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "build": {"path": str(build_dir.absolute()), "source": manifest["source"]["path"],
                         "graphs": {s: {"precision": g["precision"], "bytes": g["bytes"]}
                                    for s, g in manifest["graphs"].items()}},
               "machine": measure.machine(), "load_average_start": measure.load_average(),
               "versions": versions(), "options": options.to_dict()}

    in_process = [b for b in IN_PROCESS if b in options.backends]
    # the served path and the peers are compared with in-process ONNX Runtime, so that one is loaded for them too
    with_peer = options.peer is not None or options.peer_gguf is not None
    needed = in_process + (["onnxruntime"] if ("triton" in options.backends or with_peer)
                           and "onnxruntime" not in in_process else [])
    pipes = _load(build_dir, manifest, needed, threads, progress, options.check_hashes, options.device, options.dtype)
    timed = {b: pipes[b] for b in in_process}
    inputs = make_inputs(pipes.get("onnxruntime") or next(iter(pipes.values())), options)
    results["threads"] = thread_settings(threads, pipes)
    results["placement"] = placement(pipes, options)
    if device.is_cuda:
        results["placement"]["caches_kept_on_device"] = keep_caches_on_device(timed)
    # which decode steps write one KV buffer in place (VLMPipeline.kv_in_place) and which copy it
    results["placement"]["kv_in_place"] = {b: bool(p.kv_in_place) for b, p in timed.items()}
    results["inputs"] = inputs.describe()
    results["settings"] = {"ignore_eos": True, "sampling": "greedy", "warmup_discarded": options.warmup,
                           "order": "per case, blocks of calls per backend in mirrored order (A B, B A), each block after discarded warm-up calls",
                           "end_to_end_warmup_per_block": E2E_WARMUP,
                           "timer": "CUDA events around each stage call (device synchronised first)" if device.is_cuda
                           else "perf_counter"}

    if device.is_cuda:  # the GPU's memory, read + written by a device-to-device copy
        def bandwidth_of():
            return measure.device_bandwidth(device.index, options.bandwidth_mb)
        what, cache = "GPU memory bandwidth (device-to-device copy)", results["placement"]["device"].get("l2_cache_bytes")
    else:
        def bandwidth_of():
            return measure.memory_bandwidth(options.bandwidth_mb)
        what, cache = "memory bandwidth (torch.sum over a large buffer)", measure.cache_bytes(results["machine"]["l3_cache"])
    with progress.step(what) as advance:
        bandwidth = bandwidth_of()
        advance()
    stages = bench_stages(timed, inputs, options, threads, progress) if timed else []
    end_to_end = bench_end_to_end(timed, inputs, options, progress) if timed else {}
    bandwidth += bandwidth_of()  # again after: a drift would show as a spread
    results.update(stages=stages, end_to_end=end_to_end,
                   ceiling=ceiling(build_dir, manifest, bandwidth, stages, end_to_end, inputs.past_len, cache,
                                   fixed_state_bytes(inputs.decode_batch)))
    results["ceiling"]["measured_on"] = str(device)
    results["ttft_breakdown"] = ttft_breakdown(stages, end_to_end, ttft_parts(next(iter(pipes.values()))))
    # time to first token when the prompt's start (the template's system turn) is cached; off in the
    # rows above, so they stay comparable with earlier runs and with the peers
    results["prefix_cache"] = (bench_prefix_cache(timed, inputs.requests, 2 * options.requests, progress)
                               if timed and options.prefix_cache else {})
    peer = None
    if with_peer:
        from .peer import bench_peers

        peer = bench_peers(build_dir, manifest, pipes["onnxruntime"], options, threads, progress, PROMPTS)
        for notice in peer["notices"]:
            print(f"bench: {notice}", file=sys.stderr)
    results["peer"] = peer
    served = None
    if "triton" in options.backends:
        from .served import bench_served

        served = bench_served(build_dir, pipes["onnxruntime"], inputs, options, threads, progress)
    results["served"] = served
    results["ratios"] = ratios(stages, end_to_end)
    results["targets"] = targets(results["ratios"], results["ceiling"], served)
    results["load_average_end"] = measure.load_average()
    results["contention"] = contention(stages, results["load_average_start"], results["load_average_end"], threads)
    if options.out is not None:
        from .report import write_reports

        results["files"] = {k: str(v) for k, v in write_reports(results, Path(options.out)).items()}
    return results
