"""Timing primitives shared by every measurement of the bench: percentiles, sampling in
alternating blocks, request timing from a stream of events, memory bandwidth, bytes read per
decoded token, and the machine description. No model code here."""
from __future__ import annotations

import itertools
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

import numpy as np

from ..cpu import cpu_flags

T = TypeVar("T")
#: a time budget never cuts a measurement below this many samples
MIN_SAMPLES = 5
#: CPU features that decide which kernels torch and ONNX Runtime pick
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def summarize(seconds: Sequence[float]) -> dict[str, float]:
    """Milliseconds: p50/p90/p99 (linear interpolation; with 20 samples p99 is nearly the max), mean, min, max, n."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        return {"n": 0}
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": round(float(p50), 4), "p90": round(float(p90), 4), "p99": round(float(p99), 4),
            "mean": round(float(ms.mean()), 4), "min": round(float(ms.min()), 4),
            "max": round(float(ms.max()), 4), "n": int(ms.size)}


def timed(call: Callable[[], object]) -> Callable[[], tuple[float, float]]:
    """``call`` made to return (wall seconds, this process's CPU seconds, all threads).

    CPU / (wall x threads) is how much of its cores the call got: about 1 on an idle machine
    (spinning worker threads count as busy), far less when other processes took the cores.
    """
    def run() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        return time.perf_counter() - t0, time.process_time() - c0
    return run


def cuda_timed(call: Callable[[], object], device=None) -> Callable[[], tuple[float, float]]:
    """``timed`` for a GPU run: (seconds between two CUDA events around the call, this process's
    CPU seconds). The device is synchronised before the start event, so no earlier work is
    counted, and the end event is waited for, so all of the call's queued GPU work is.

    Both runners hand numpy back (PyTorch's ``.cpu()`` and ONNX Runtime's copy to the host wait
    for the GPU), so the events bracket the whole call; they are recorded on PyTorch's current
    stream of ``device``, which is idle around the call, so for ONNX Runtime (its own stream) they
    mark the host-side start and end, for PyTorch its kernels too.
    """
    import torch

    def run() -> tuple[float, float]:
        with torch.cuda.device(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            c0 = time.process_time()
            start.record()
            call()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, time.process_time() - c0
    return run


def alternating(calls: Mapping[str, Callable[[], T]], warmup: int, n: int, budget_s: float | None = None,
                advance: Callable[[], None] = lambda: None, blocks: int = 2) -> dict[str, list[T]]:
    """``n`` samples (whatever each call returns) per entry, taken in blocks in mirrored order:
    A B, then B A.

    Mirrored blocks let a slow spell on a shared machine hit every entry alike, so the ratios
    between them stay honest. Blocks rather than call-by-call alternation: a runtime's worker
    threads keep spinning for a moment after a call (ONNX Runtime's pool, torch's OpenMP), and on
    a 2-core machine a call of the other runtime made in that moment competes with them
    (alternating call by call doubled both backends' tiny prefill time here). Each block starts
    with ``warmup`` discarded calls, which also let the other runtime's threads settle.
    ``budget_s`` cuts a block short once spent (never below MIN_SAMPLES per entry in all).
    """
    names = list(calls)
    sizes = [n // blocks + (1 if i < n % blocks else 0) for i in range(blocks)]
    floor = -(-MIN_SAMPLES // blocks)
    block_budget = None if budget_s is None else budget_s / (blocks * len(names))
    samples: dict[str, list[T]] = {name: [] for name in names}
    for k, size in enumerate(sizes):
        for name in (names if k % 2 == 0 else names[::-1]):
            for _ in range(warmup):
                calls[name]()
            start = time.perf_counter()
            for j in range(size):
                samples[name].append(calls[name]())
                advance()
                if block_budget is not None and j + 1 >= floor and time.perf_counter() - start > block_budget:
                    break
    return samples


@dataclass(frozen=True)
class RequestTiming:
    """One streamed request. ``tokens`` counts generated tokens (from the final message)."""

    ttft_s: float  # request sent -> first text piece (the final message where none came before it)
    total_s: float  # request sent -> final message
    tokens: int
    #: whether a text piece came before the final message: tokens that decode to no text (a random model's
    #: EOS or padding, EOS ignored) send none, and then neither the first token's time nor the decode's is seen
    streamed: bool = True

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: every later token is one decode step."""
        return (self.total_s - self.ttft_s) / (self.tokens - 1) if self.tokens > 1 and self.streamed else None


def time_request(events: Iterable) -> RequestTiming:
    """Time a stream of text pieces that ends with a final message carrying ``completion_tokens``.

    The in-process ``runtime.generate.stream`` (TokenEvent..., GenerationResult) and
    ``VLMClient.stream`` (str..., VLMResponse) both have that shape, so the served and the
    in-process figures share one definition. Iterating starts the work (both are generators),
    so the clock starts here.
    """
    t0 = time.perf_counter()
    first = None
    final = None
    for event in events:
        if hasattr(event, "completion_tokens"):
            final = event
            break
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    if final is None:
        raise RuntimeError("the stream ended without a final message")
    return RequestTiming((first or end) - t0, end - t0, int(final.completion_tokens), streamed=first is not None)


def request_call(open_stream: Callable[[str, object], Iterable], requests: Sequence) -> Callable[[], RequestTiming]:
    """A call that sends the next of ``requests`` (prompt, image), in turn, through
    ``open_stream(prompt, image)`` and returns its timing."""
    turn = itertools.count()

    def run() -> RequestTiming:
        prompt, image = requests[next(turn) % len(requests)]
        return time_request(open_stream(prompt, image))

    return run


def summarize_requests(timings: Sequence[RequestTiming]) -> dict:
    tpot = summarize([t.tpot_s for t in timings if t.tpot_s is not None])
    return {
        "requests": len(timings),
        "tokens": int(sum(t.tokens for t in timings)),
        "ttft_ms": summarize([t.ttft_s for t in timings]),
        "tpot_ms": tpot,
        "request_ms": summarize([t.total_s for t in timings]),
        # one stream's decode rate: tokens after the first / the time they took
        "tokens_per_s": round(1e3 / tpot["p50"], 3) if tpot.get("p50") else None,
        # requests whose tokens sent no text before the end: their TTFT is the whole request, no TPOT
        "without_text": sum(not t.streamed for t in timings),
    }


def memory_bandwidth(megabytes: int = 512, repeats: int = 10) -> list[float]:
    """Read bandwidth in GB/s, one sample per full pass of ``torch.sum`` over a float32 buffer.

    The buffer is far larger than any cache, so a sum (one add per 4 bytes read, vectorised and
    run on torch's threads) is limited by memory reads, as a decode step reading its weights is.
    It uses the thread count the bench set, the same the models use.
    """
    import torch

    buf = torch.ones(megabytes * 2**20 // 4, dtype=torch.float32)  # ones(): pages touched, not lazily mapped
    buf.sum()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        samples.append(buf.numel() * 4 / (time.perf_counter() - t0) / 1e9)
    del buf
    return samples


def device_bandwidth(device=None, megabytes: int = 512, repeats: int = 10) -> list[float]:
    """A GPU's memory (HBM) bandwidth in GB/s: one sample per device-to-device copy of a
    ``megabytes`` buffer, counting the bytes read and the bytes written (2 x the buffer) over the
    time between CUDA events around the copy. Make the buffer far larger than the L2 cache (tens
    of MB on an H100/H200) so the copy streams from and to HBM, as a decode step's weight reads do.
    """
    import torch

    n = megabytes * 2**20
    with torch.cuda.device(device):
        src = torch.ones(n, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        dst.copy_(src)  # first touch and warm-up
        torch.cuda.synchronize()
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            samples.append(2 * n / (start.elapsed_time(end) / 1e3) / 1e9)
        del src, dst
        torch.cuda.empty_cache()
    return samples


def decoder_weight_bytes(graph: Path) -> dict[str, int]:
    """Initializer bytes of an ONNX graph, and how many of them a decode step actually reads.

    An initializer consumed only by Gather (the token-embedding table when the LM head is not
    tied to it) is read one row per token, not whole; everything else (every MatMul weight, the LM
    head, norms) is read in full once per decode step. Read from the graph's protobuf without
    loading external data.
    """
    import onnx

    model = onnx.load(os.fspath(graph), load_external_data=False)
    consumers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    # 4-bit types are stored two values per byte (numpy's int4/uint4 stand-ins take a byte each)
    packed = {getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, name)}
    total = gathered = 0
    for init in model.graph.initializer:
        count = int(np.prod(init.dims, dtype=np.int64))
        size = (count + 1) // 2 if init.data_type in packed else \
            count * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        total += size
        if consumers.get(init.name) == {"Gather"}:
            gathered += size
    return {"initializer_bytes": total, "gather_only_bytes": gathered, "read_per_token_bytes": total - gathered}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def cache_bytes(size: str | None) -> int | None:
    """``"32768K"`` (sysfs cache size) -> bytes."""
    if not size:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    try:
        return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
    except ValueError:
        return None


def machine() -> dict:
    """What the numbers were measured on; the load average says how busy the machine was."""
    cpuinfo = _read("/proc/cpuinfo")
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = cpu_flags()
    meminfo = _read("/proc/meminfo").split()
    mem_gb = round(int(meminfo[1]) / 2**20, 1) if len(meminfo) > 1 and meminfo[0] == "MemTotal:" else None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count()
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "l3_cache": _read("/sys/devices/system/cpu/cpu0/cache/index3/size").strip() or None,
        "memory_gb": mem_gb,
        "platform": platform.platform(),
        "hypervisor": "hypervisor" in flags,
    }


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
