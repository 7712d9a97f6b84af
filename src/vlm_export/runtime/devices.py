"""Where a stage runs: one device choice for PyTorch and ONNX Runtime.

``Device`` is ``cpu``, ``cuda`` or ``cuda:N``, parsed from what the user typed. From it:

- ``torch_device(device)``: the ``torch.device``; asking for CUDA where ``torch.cuda.is_available()``
  is False is a one-line InputError (a PyTorch reference cannot quietly become a CPU one: its
  timings and its dtype are what a GPU run records).
- ``ort_providers(device, available)``: the ONNX Runtime execution providers to ask for, best
  first: TensorRT, then CUDA, then CPU (CPU last, so nodes the GPU providers do not take still
  run) for ``cuda``; CPU alone for ``cpu``. An ONNX Runtime without the GPU providers (the
  ``onnxruntime`` wheel, not ``onnxruntime-gpu``) falls back to CPU with a one-line notice on this
  module's logger, said once per stage and process, never silently; ``strict=True`` makes that
  fallback an InputError instead (for callers that must not time a CPU run as a GPU one).
  The session's ``get_providers()`` says what it really got (``OrtRunner.providers`` records it).

This module imports neither torch nor onnxruntime at import time: the served models and the
runtime import it without either being needed for a CPU run.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence, Union

from ..errors import InputError

log = logging.getLogger(__name__)

CPU_EP, CUDA_EP, TRT_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
#: the reference's dtypes (``TorchRunner``, ``reference_pipeline``): names as the manifest writes precisions;
#: fp64 is the yardstick parity measures a failing fp32 entry against (``compare.parity.measure_exact``)
DTYPES = ("fp32", "fp16", "bf16", "fp64")
#: a provider as ``InferenceSession(providers=...)`` takes it: a name, or (name, options)
Provider = Union[str, tuple]

_DEVICE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
_said: set[tuple] = set()  # notices already logged in this process


@dataclass(frozen=True)
class Device:
    """``cpu``, or a CUDA GPU (``index`` None: the current one, as ``cuda`` means in PyTorch)."""

    kind: str = "cpu"
    index: int | None = None

    @classmethod
    def parse(cls, value: "str | Device | None") -> "Device":
        """``"cpu"``, ``"cuda"``, ``"cuda:1"`` (or a Device, or None for cpu); InputError otherwise."""
        if value is None:
            return cls()
        if isinstance(value, Device):
            return value
        match = _DEVICE.match(str(value).strip().lower())
        if not match or (match.group(1) == "cpu" and match.group(2) is not None):
            raise InputError(f"unknown device {value!r}: use cpu, cuda or cuda:N (N: the GPU's index)")
        return cls(match.group(1), None if match.group(2) is None else int(match.group(2)))

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def ordinal(self) -> int:
        """The GPU's index for ONNX Runtime's ``device_id`` and IO binding (0 for ``cuda``)."""
        return self.index or 0

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_dtype(value: str | None) -> str:
    """``fp32`` | ``fp16`` | ``bf16`` | ``fp64`` (also ``float16``, ``bfloat16``, ``double``, ...); None is fp32."""
    if value is None:
        return "fp32"
    aliases = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
               "float64": "fp64", "double": "fp64"}
    name = aliases.get(str(value).strip().lower(), str(value).strip().lower())
    if name not in DTYPES:
        raise InputError(f"unknown dtype {value!r}: use one of {', '.join(DTYPES)}")
    return name


def torch_dtype(value: str | None):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
            "fp64": torch.float64}[parse_dtype(value)]


def torch_device(device: "str | Device | None"):
    """The ``torch.device`` of ``device``; a one-line InputError when it names a GPU this
    process cannot use."""
    import torch

    device = Device.parse(device)
    if not device.is_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise InputError("no CUDA GPU here: torch.cuda.is_available() is False; use --device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise InputError(f"device {device} asked, but this machine has {count} CUDA GPU(s) "
                         f"(cuda:0..cuda:{count - 1}); use one of those")
    return torch.device(str(device))


def device_description(device: "str | Device | None") -> dict:
    """What a report records about the device: its name (the GPU's, or the CPU's), memory, and for
    a GPU its compute capability and the CUDA runtime torch was built with."""
    device = Device.parse(device)
    if not device.is_cuda:
        return {"device": "cpu"}
    import torch

    index = torch_device(device).index
    index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    return {"device": str(device), "name": props.name, "index": index,
            "memory_gb": round(props.total_memory / 2**30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "l2_cache_bytes": getattr(props, "L2_cache_size", None),
            "cuda_runtime": torch.version.cuda}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


#: a writable folder for TensorRT's engine caches where the graphs' own folder is read-only (a repository
#: mounted read-only in a pod: deploy kubernetes sets it to an emptyDir), one sub-folder per graph
TRT_CACHE_ENV = "VLM_EXPORT_TRT_CACHE"


def default_trt_cache(graph: Path) -> Path:
    """Where TensorRT's engines for ``graph`` are cached: ``$VLM_EXPORT_TRT_CACHE/<graph's path hash>`` when
    that is set, else ``trt-cache/`` beside the graph."""
    import hashlib

    root = os.environ.get(TRT_CACHE_ENV)
    if root:
        return Path(root) / hashlib.sha256(os.fspath(Path(graph).resolve()).encode()).hexdigest()[:16]
    return Path(graph).parent / "trt-cache"


def trt_provider_options(device: Device, fp16: bool = False, cache_dir: Path | None = None,
                         profiles: "dict[str, Sequence[Sequence[int]]] | None" = None, int8: bool = False) -> dict:
    """TensorRT execution provider options (onnxruntime.ai, TensorRT-ExecutionProvider, "Configurations"):

    - ``trt_fp16_enable``: let TensorRT pick fp16 kernels. Needed for an fp16 graph to run in fp16
      on TensorRT (TensorRT builds fp32 otherwise); left off for fp32 graphs. The provider builds weakly
      typed (it has no strongly typed option), so with it ``trt_layer_norm_fp32_fallback`` keeps the
      norms' reductions in fp32, as the graph's fp32 islands do. (TensorRT may still pick TF32 for an
      fp32 graph's MatMuls - its builder's default, which the provider does not expose -
      ``NVIDIA_TF32_OVERRIDE=0`` in the environment forbids it.)
    - ``trt_int8_enable``: for a graph with int8 Q/DQ pairs (the build's int8 precision). TensorRT builds
      them as written (explicit quantization, no calibration table) but refuses int8 layers in a
      builder without its INT8 flag ("int8 is not configured in the builder").
    - ``trt_engine_cache_enable`` + ``trt_engine_cache_path``: keep the engines TensorRT builds (minutes
      for an LLM) in a folder and reuse them in later sessions of the same graph, GPU and TensorRT;
      ``trt_timing_cache_enable`` likewise keeps kernel timings. Off when no ``cache_dir`` is given.
    - ``profiles``: {input: (min shape, opt shape, max shape)} -> ``trt_profile_min_shapes`` /
      ``_opt_shapes`` / ``_max_shapes`` ("name:1x3x224x224,other:..."), so a decoder whose past grows
      every step is built once for its whole range instead of again at each new shape.
    """
    options: dict = {"device_id": device.ordinal, "trt_fp16_enable": bool(fp16)}
    if fp16:
        options["trt_layer_norm_fp32_fallback"] = True
    if int8:
        options["trt_int8_enable"] = True
    if cache_dir is not None:
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=os.fspath(cache_dir),
                       trt_timing_cache_enable=True, trt_timing_cache_path=os.fspath(cache_dir))
    if profiles:
        for k, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
            options[key] = ",".join(f"{name}:{'x'.join(str(int(d)) for d in shapes[k])}"
                                    for name, shapes in profiles.items())
    return options


def fallback_notice(device: Device, available: Iterable[str], stage: str | None = None) -> str | None:
    """The one line said when ``device`` asks for a GPU provider this ONNX Runtime lacks; None when
    nothing falls back."""
    if not device.is_cuda or CUDA_EP in available or TRT_EP in available:
        return None
    what = f"stage {stage}" if stage else "ONNX Runtime"
    return (f"onnxruntime here has no {CUDA_EP} (install onnxruntime-gpu); running {what} on CPU "
            f"(--device {device} asked for a GPU)")


def ort_providers(device: "str | Device | None" = None, available: Iterable[str] | None = None, *,
                  stage: str | None = None, fp16: bool = False, int8: bool = False, trt_cache: Path | None = None,
                  trt_profiles: dict | None = None, strict: bool = False) -> list[Provider]:
    """The provider list to ask ONNX Runtime for, best first (see the module docstring).

    ``available``: the providers this ONNX Runtime offers (default ``onnxruntime.get_available_providers()``).
    ``stage`` names the stage in the fallback notice. ``fp16``/``int8``/``trt_cache``/``trt_profiles``:
    TensorRT's options (``trt_provider_options``). ``strict``: an InputError instead of the fallback.
    """
    device = Device.parse(device)
    if not device.is_cuda:
        return [CPU_EP]
    available = list(available_providers() if available is None else available)
    notice = fallback_notice(device, available, stage)
    if notice:
        if strict:
            raise InputError(f"onnxruntime here has no {CUDA_EP} (install onnxruntime-gpu), and {device} was asked "
                             f"strictly: not running {f'stage {stage}' if stage else 'ONNX Runtime'} on CPU")
        key = (str(device), stage, tuple(sorted(available)))
        if key not in _said:
            _said.add(key)
            log.warning(notice)
        return [CPU_EP]
    chosen: list[Provider] = []
    if TRT_EP in available:
        chosen.append((TRT_EP, trt_provider_options(device, fp16, trt_cache, trt_profiles, int8)))
    if CUDA_EP in available:
        # no TF32 (the CUDA provider's default): fp32 graphs and fp16 graphs' fp32 islands stay fp32, as in
        # PyTorch, whose matmuls do not use TF32 by default either
        chosen.append((CUDA_EP, {"device_id": device.ordinal, "use_tf32": 0}))
    return chosen + [CPU_EP]


def provider_names(providers: Sequence[Provider]) -> list[str]:
    """Names only, options dropped (what reports and notices print)."""
    return [p if isinstance(p, str) else p[0] for p in providers]
