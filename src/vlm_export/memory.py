"""What a build needs in memory, and what this machine (or its container) has.

A build holds the model in fp32 (the PyTorch reference the graphs are judged against) while it exports
and records the reference's side of parity, then frees it (``adapters.reference.release_weights``)
before ONNX Runtime opens the graphs: the peak is the larger of the two, not their sum. The export
writes a graph from the module's tensors one at a time. Peak resident memory measured on fp32 builds
(each build's own cost report): the demo (135M-parameter LM, 0.54 GB of fp32 weights) 2.40 GB, in its
decoder's export; a 569M-parameter random LLaVA (2.27 GB) 3.74 GB in parity (its ONNX Runtime sessions;
3.34 GB exporting), 5.99 GB before the model was freed first (2026-12-02).
A machine that cannot even hold the fp32 weights is refused before anything is loaded: the kernel
would kill the build minutes later with no message. Precision variants need more than this
estimate: the demo's int8 build (calibration, GPTQ, the fallback's trials) peaked at 5.44 GB, measured
while the model was still held through them."""
from __future__ import annotations

import json
import struct
from pathlib import Path

#: an fp32 build's peak resident memory ~ BUILD_PEAK_FACTOR x the fp32 weights + PROCESS_BASE_BYTES
#: (both measured, see the docstring; the estimate is above both measurements)
BUILD_PEAK_FACTOR = 1.5
#: the process around the model: Python, torch, transformers, ONNX Runtime (~0.5 GB before any model),
#: torch.export's tracing, the graph checker's transient copy of a graph
PROCESS_BASE_BYTES = 1_700_000_000

_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8, "int8": 1,
                "uint8": 1}


def _safetensors_elements(path: Path) -> int:
    """Elements of the floating-point tensors in a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > path.stat().st_size - 8:
            raise ValueError(f"{path} is not a safetensors file")  # damaged: loading says so
        header = json.loads(f.read(size))
    total = 0
    for name, info in header.items():
        if name != "__metadata__" and info.get("dtype", "").startswith(("F", "BF")):
            n = 1
            for d in info.get("shape", []):
                n *= int(d)
            total += n
    return total


def fp32_weight_bytes(model_dir: Path) -> int | None:
    """Bytes the checkpoint's floating-point weights take in fp32 (how a build loads them): read from
    the safetensors headers, else estimated from the PyTorch ``.bin`` files' sizes and the config's
    dtype. None when there are no weight files or they cannot be read (loading then says why)."""
    model_dir = Path(model_dir)
    try:
        safetensors = sorted(model_dir.glob("*.safetensors"))
        if safetensors:  # what Hugging Face loads when both kinds are there
            return 4 * sum(_safetensors_elements(p) for p in safetensors)
        bins = sorted(model_dir.glob("*.bin"))
        if not bins:
            return None
        config = json.loads((model_dir / "config.json").read_text())
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
        return sum(p.stat().st_size for p in bins) * 4 // _DTYPE_BYTES.get(dtype, 4)
    except (OSError, ValueError, TypeError, AttributeError, struct.error):  # damaged: loading says how
        return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _numbers(path: str) -> dict[str, int]:
    """``key value`` lines (a cgroup's memory.stat) or ``Key:  value kB`` lines (/proc/meminfo), in bytes."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                words = line.replace(":", " ").split()
                if len(words) >= 2 and words[1].isdigit():
                    out[words[0]] = int(words[1]) * (1024 if words[2:3] == ["kB"] else 1)
    except OSError:
        pass
    return out


def available_bytes(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Memory a new allocation can get: the kernel's MemAvailable plus free swap, or less where this
    process's cgroup (a container's memory limit, v2 or v1) allows less. None where it cannot be read
    (not Linux)."""
    info = _numbers(meminfo)
    if "MemAvailable" not in info:
        return None
    available = info["MemAvailable"] + info.get("SwapFree", 0)
    for folder, limit_file, usage_file, cache_key in (
            (cgroup, "memory.max", "memory.current", "inactive_file"),  # cgroup v2
            (f"{cgroup}/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):  # v1
        limit, usage = _read_int(f"{folder}/{limit_file}"), _read_int(f"{folder}/{usage_file}")
        if limit is None or usage is None or limit >= 1 << 60:  # no limit ("max"; v1 writes a huge number)
            continue
        # the usage counts the page cache, which the kernel reclaims first (the working set is what counts)
        cache = _numbers(f"{folder}/memory.stat").get(cache_key, 0)
        available = min(available, max(limit - (usage - cache), 0))
    return available


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def reset_peak() -> bool:
    """Start measuring a new peak of this process's resident memory (Linux: "5" written to
    /proc/self/clear_refs sets VmHWM to the current RSS). False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int | None:
    """This process's peak resident memory since it started or since ``reset_peak`` (VmHWM); None
    where the kernel does not say (not Linux)."""
    return _numbers("/proc/self/status").get("VmHWM")
