"""One runner contract for every backend: named numpy arrays in, named numpy arrays out.

Parity checks, benchmarks, the generation loop and the Triton python models all talk to a
stage through this contract, so swapping PyTorch for ONNX Runtime (or TensorRT, or a remote
Triton model) changes nothing above it. Modelled on Polygraphy's runners.
"""
from __future__ import annotations

import abc
import contextlib
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ..contract.scheme import KV_IN_PLACE
from ..cpu import INT8_DOT_PRODUCT_METADATA, INT8_QDQ_METADATA, QDQ_AS_WRITTEN, int8_dot_product, u8s8_saturates
from ..errors import InputError, RunnerError

Feeds = Mapping[str, np.ndarray]


# ONNX TensorProto element types -> numpy (bf16 has no numpy type: read as the host copy's)
_ONNX_NUMPY = {1: np.float32, 2: np.uint8, 3: np.int8, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
               10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}


class DeviceArray:
    """A runner output left where the backend made it (GPU memory on a GPU run): an ``OrtValue``
    (``OrtDeviceArray``) or a torch tensor (``TorchDeviceArray``) that reads as numpy wherever
    numpy touches it.

    Fed back to the runner that made it (a decoder's present cache as the next step's past) it is
    used as it is: no copy to the host and back. Anything else (``np.asarray``, ``np.concatenate``,
    indexing: a batch's rows joining or leaving) gets a host copy through ``__array__``, made once,
    so code written for numpy stays correct and pays the copy only where it needs the values.
    Runners make them only for the outputs named in their ``keep_on_device``.
    """

    __slots__ = ("value", "_host")

    def __init__(self, value):
        self.value, self._host = value, None

    shape: tuple[int, ...]
    dtype: np.dtype
    device: str

    def _to_host(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numpy(self) -> np.ndarray:
        if self._host is None:
            self._host = self._to_host()
        return self._host

    def __array__(self, dtype=None, copy=None):
        host = self.numpy()
        return host if dtype is None or host.dtype == dtype else host.astype(dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        return self.numpy()[key]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}, device={self.device})"


class OrtDeviceArray(DeviceArray):
    """An ``OrtValue`` output of ``OrtRunner`` (in ONNX Runtime's memory on the session's device)."""

    __slots__ = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape())

    @property
    def dtype(self) -> np.dtype:
        known = _ONNX_NUMPY.get(self.value.element_type())
        return np.dtype(known) if known is not None else self.numpy().dtype

    @property
    def device(self) -> str:
        return self.value.device_name()

    def _to_host(self) -> np.ndarray:
        return self.value.numpy()


class TorchDeviceArray(DeviceArray):
    """A tensor output of ``TorchRunner``, on its device and in its dtype; read on the host as the
    numpy contract gives it (floating point as fp32)."""

    __slots__ = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32) if self.value.is_floating_point() else self._to_host().dtype

    @property
    def device(self) -> str:
        return str(self.value.device)

    def _to_host(self) -> np.ndarray:
        t = self.value.detach()
        return (t.float() if t.is_floating_point() else t).cpu().numpy()


class Runner(abc.ABC):
    """Runs one stage. ``input_names``/``output_names`` fix the order of tensors."""

    backend: str = "?"

    def __init__(self, name: str, input_names: list[str], output_names: list[str]):
        self.name, self.input_names, self.output_names = name, list(input_names), list(output_names)
        self.kept: frozenset[str] = frozenset()

    def keep_on_device(self, names) -> "Runner":
        """From now on ``infer`` leaves these outputs where the backend made them, as
        ``DeviceArray``s (a decoder's present caches), and takes the ``DeviceArray``s it made back
        as feeds without a copy; every other output is numpy as before. Empty: the plain path again.
        Backends that cannot (a remote model) keep the plain path."""
        names = frozenset(names)
        unknown = names - set(self.output_names)
        if unknown:
            raise RunnerError(f"{self.name} has no outputs {sorted(unknown)} to keep on the device")
        self.kept = names
        return self

    def place(self, array: np.ndarray) -> "DeviceArray | np.ndarray":
        """``array`` where this runner keeps its kept outputs (a benchmark's synthetic cache), so a
        call fed with it costs what a call fed with its own outputs does. numpy where nothing is kept."""
        return array

    #: whether a decoder's prefill may start from a past state (a cached prompt prefix: several
    #: tokens on a non-empty past); a TensorRT engine cannot (its prefill profile's past is empty)
    continues_prefill: bool = True

    #: whether ``infer_in_place`` runs this stage on KV buffers bound as past and present at once
    #: (a decoder graph with ``contract.scheme.KV_IN_PLACE`` on a backend that can bind host memory)
    kv_in_place: bool = False

    def infer_in_place(self, feeds: Feeds, aliases: Mapping[str, str],
                       bound=None) -> tuple[dict[str, np.ndarray], object]:
        """Run once with each output named in ``aliases`` (output -> input) written into that input's
        numpy buffer, in place. Returns (the other outputs as numpy, the binding of the buffers):
        pass that binding back with the same buffers and the next call skips binding them again.
        Only where ``kv_in_place``."""
        raise RunnerError(f"the {self.backend} runner for {self.name} cannot write its outputs in place")

    def infer(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """Run once; every input in ``input_names`` must be present (extra feeds are ignored)."""
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise RunnerError(f"{self.backend} runner for {self.name}: missing inputs {missing}")
        return self._run(feeds)

    @abc.abstractmethod
    def _run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """The backend's call; ``feeds`` holds every input."""


class TorchRunner(Runner):
    """The PyTorch reference: the same split module that was exported; fp32 on the CPU by default.

    ``device``/``dtype`` (``runtime.devices``): the module is moved and cast once, here (in place:
    a split module shares its weights with the loaded model, and a copy would double a large
    model's memory); every call moves the inputs to the device and casts floating-point inputs
    to ``dtype``, and hands back numpy with fp16/bf16 outputs in fp32 (numpy has no bf16; fp16/bf16 ->
    fp32 is exact, so a cache fed back next step is the same values) and fp64 ones as they are. The default
    (cpu, fp32) is the plain path: numpy in, torch on the CPU, numpy out, nothing cast.
    """

    backend = "torch"

    def __init__(self, name, module, input_names, output_names, device=None, dtype: str | None = None):
        from .devices import Device, parse_dtype

        super().__init__(name, input_names, output_names)
        self.device, self.dtype = Device.parse(device), parse_dtype(dtype)
        self.plain = not self.device.is_cuda and self.dtype == "fp32"
        self.module = module.eval()
        if not self.plain:
            from .devices import torch_device, torch_dtype

            self._torch_device, self._torch_dtype = torch_device(self.device), torch_dtype(self.dtype)
            self.module.to(device=self._torch_device, dtype=self._torch_dtype)

    def _tensor(self, value):
        """A feed as the module takes it: on the device, floating point in the dtype."""
        import torch

        if isinstance(value, TorchDeviceArray):
            return value.value
        value = np.ascontiguousarray(value)
        # torch wants writable memory (a recorded feed is a read-only memory map); the cast copies floats anyway
        t = torch.from_numpy(value if value.flags.writeable or self.plain else value.copy())
        if self.plain:
            return t
        return t.to(self._torch_device, dtype=self._torch_dtype if t.is_floating_point() else None)

    def place(self, array: np.ndarray):
        return TorchDeviceArray(self._tensor(array)) if self.kept else array

    def _run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        import torch

        if self.plain and not self.kept:
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in self.input_names]
            with torch.no_grad():
                out = self.module(*args)
            out = out if isinstance(out, (tuple, list)) else (out,)
            return {n: t.detach().cpu().numpy() for n, t in zip(self.output_names, out)}
        args = [self._tensor(feeds[n]) for n in self.input_names]
        with torch.no_grad():
            out = self.module(*args)
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: (TorchDeviceArray(t.detach()) if n in self.kept else
                    (t.detach().float() if t.dtype in (torch.float16, torch.bfloat16) else t.detach()).cpu().numpy())
                for n, t in zip(self.output_names, out)}


@contextlib.contextmanager
def _engine_cache_lock(providers: list):
    """Held while a session opens with TensorRT's engine cache: ONNX Runtime builds (with our explicit
    profiles) and writes the engine then, and locks that only within its own process. Triton runs each
    python-model instance in its own process, so two instances of one stage would otherwise build it at
    once and one could read the other's half-written file; with this the second waits and reads the cache.
    An flock on a file in the cache folder: released when the holder exits, however it exits."""
    cache = next((p[1].get("trt_engine_cache_path") for p in providers
                  if isinstance(p, tuple) and p[0] == "TensorrtExecutionProvider"), None)
    if cache is None:
        yield
        return
    import fcntl

    try:
        lock = open(Path(cache) / ".vlm-export-build.lock", "a")
    except OSError:  # a cache folder we cannot write: nothing is written there to race on
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class OrtRunner(Runner):
    """ONNX Runtime on the providers ``device`` asks for (``runtime.devices.ort_providers``): CPU by
    default; TensorRT, CUDA, CPU for ``cuda`` where this ONNX Runtime has them (else CPU, with a
    one-line notice). An explicit ``providers`` list wins over ``device``. ``providers`` (the
    attribute) is what the session really uses, ``session.get_providers()``: reports record it.
    For TensorRT: ``fp16`` (the graph is fp16: let TensorRT build fp16 kernels), ``int8`` (its Q/DQ
    pairs are int8: TensorRT needs its INT8 flag to build them), ``trt_cache`` (its
    engine and timing caches; default ``trt-cache/`` beside the graph), ``trt_profiles`` (min/opt/max
    input shapes); ``strict_device``: no CPU fallback for ``cuda`` (an InputError instead).

    ``emulate_qdq``: run the graph's QuantizeLinear/DequantizeLinear pairs as written (dequantize,
    then the fp32 op) instead of letting ONNX Runtime fuse them into its CPU integer kernels. For a
    graph only TensorRT serves: TensorRT sums int8 products exactly in int32, and so does this, up to
    fp32 rounding; ONNX Runtime's U8S8 CPU kernel adds products pairwise in int16 on a CPU without
    VNNI/AMX and saturates there, an error TensorRT never makes (measured on an AVX2-only EPYC: the
    demo's int8 decode logits cosine 0.9878 fused into kernels). ``emulates_qdq`` records it. A graph
    ONNX Runtime serves in Q/DQ form (an int8 image stage, marked ``cpu.INT8_QDQ_METADATA``) is run so
    on such a CPU whatever is asked (``cpu.u8s8_saturates``), with a warning.

    ``spin``: whether the session's worker threads busy-wait after a call (ONNX Runtime's default).
    Right for the decoder, called again within microseconds; wrong for the once-per-request image
    stages, whose spinning threads then compete with the prefill that follows on the same cores
    (measured on the demo, 2 cores: time to first token 203 ms spinning, 150 ms not; the decoder
    not spinning costs 10% per token). Callers pass the stage's ``StageSpec.per_token``.
    VLM_EXPORT_ORT_SPIN=0 turns it off for every session: where other busy processes share the
    cores (parallel test workers on 2 cores: a tiny decoder's generation took 2.3 CPU-s spinning,
    1.0 not, and no longer in wall time), the spinning threads take the cores those need.

    ``infer`` (named numpy in and out) is the contract for every caller. ``infer_bound`` is the
    device-resident path: its feeds may hold ``OrtValue``s (a previous call's outputs) and the
    outputs named in ``keep`` come back as ``OrtValue``s on the session's device instead of numpy,
    so a decode loop can hand one step's present cache to the next step without a host round trip.
    On the CPU it is the same computation with the values in ONNX Runtime's CPU memory.
    """

    backend = "onnxruntime"

    def __init__(self, name: str, path: Path, threads: int | None = None,
                 providers: list | None = None, spin: bool = False, device=None, *,
                 fp16: bool = False, int8: bool = False, trt_cache: Path | None = None,
                 trt_profiles: dict | None = None,
                 strict_device: bool = False, emulate_qdq: bool = False):
        import onnxruntime as ort

        from .devices import Device, default_trt_cache, ort_providers, provider_names

        self.device = Device.parse(device)
        if not providers:
            if self.device.is_cuda and trt_cache is None:
                trt_cache = default_trt_cache(Path(path))
            providers = ort_providers(self.device, stage=name, fp16=fp16, int8=int8, trt_cache=trt_cache,
                                      trt_profiles=trt_profiles, strict=strict_device)
            if trt_cache is not None and "TensorrtExecutionProvider" in provider_names(providers):
                try:
                    Path(trt_cache).mkdir(parents=True, exist_ok=True)
                except OSError:  # a read-only build: TensorRT builds its engines again each session
                    providers = ort_providers(self.device, stage=name, fp16=fp16, int8=int8,
                                              trt_profiles=trt_profiles)
        self.requested_providers, self.path = providers, Path(path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.spin = spin and os.environ.get("VLM_EXPORT_ORT_SPIN", "1") != "0"
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
        opts.log_severity_level = 3
        self.emulates_qdq = emulate_qdq
        if emulate_qdq:
            opts.add_session_config_entry(*QDQ_AS_WRITTEN)
        self.session = self._open(path, opts, providers)
        self.providers = list(self.session.get_providers())
        self._say_if_providers_dropped(name, strict_device)
        # where bound outputs live: the GPU when a GPU provider runs the graph, else the CPU
        gpu = any(p in self.providers for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider"))
        if (not gpu and not emulate_qdq and u8s8_saturates()
                and INT8_QDQ_METADATA in self.session.get_modelmeta().custom_metadata_map):
            # its fused int8 kernels would saturate here (wrong answers, no error): open it again, as written
            from .devices import log

            log.warning(f"{name}: ONNX Runtime's int8 kernels can saturate on this CPU (no VNNI/AMX), so its Q/DQ "
                        "pairs run as written (exact, at about fp32's speed; int8 is faster on a CPU with them)")
            opts.add_session_config_entry(*QDQ_AS_WRITTEN)
            self.session, self.emulates_qdq = self._open(path, opts, providers), True
        self.io_device = ("cuda", self.device.ordinal) if gpu else ("cpu", 0)
        super().__init__(name, [i.name for i in self.session.get_inputs()],
                         [o.name for o in self.session.get_outputs()])
        metadata = self.session.get_modelmeta().custom_metadata_map
        # in place on host memory (OrtValues over the numpy buffers): the CPU provider only
        self.kv_in_place = not gpu and metadata.get(KV_IN_PLACE) == "1"
        needs = metadata.get(INT8_DOT_PRODUCT_METADATA)
        if needs and not gpu and int8_dot_product() is None:  # wrong answers, not an error, if it ran
            raise RunnerError(f"{name}: its int8 kernels (ONNX Runtime U8S8) are exact only on a CPU with "
                              f"{' or '.join(needs.split(','))}, which this one lacks (they would saturate); "
                              "rebuild it on this machine, or with --int8-kernel u8u8")

    @staticmethod
    def _open(path: Path, opts, providers):
        import onnxruntime as ort

        try:
            with _engine_cache_lock(providers):
                return ort.InferenceSession(os.fspath(path), opts, providers=providers)
        except Exception as e:
            first = str(e).splitlines()[0]
            # no kernel for a node (a bfloat16 Mul the model's own code computes, say): rebuilding changes nothing
            fix = ("this ONNX Runtime has no kernel for a node of the graph, which the model's code computes that way: "
                   "not supported" if "NOT_IMPLEMENTED" in first else "rebuild the graph")
            raise RunnerError(f"ONNX Runtime cannot load {path}: {first}; {fix}", graph=Path(path)) from None

    def _say_if_providers_dropped(self, name: str, strict: bool) -> None:
        """ONNX Runtime skips a provider it cannot create (e.g. CUDA libraries missing) with a log
        line we silence; say it ourselves, so a CPU run is never taken for a GPU one. ``strict``: a
        ``cuda`` runner left with no GPU provider is an InputError, as when none is installed."""
        from .devices import CUDA_EP, TRT_EP, log, provider_names

        dropped = [p for p in provider_names(self.requested_providers) if p not in self.providers]
        if strict and self.device.is_cuda and not {CUDA_EP, TRT_EP} & set(self.providers):
            raise InputError(f"ONNX Runtime could not start {', '.join(dropped) or 'a GPU provider'} for stage "
                             f"{name}, and {self.device} was asked strictly: not running it on "
                             f"{', '.join(self.providers)} (check the CUDA / TensorRT libraries onnxruntime-gpu needs)")
        if dropped:
            log.warning(f"ONNX Runtime could not start {', '.join(dropped)} for stage {name}; "
                        f"it runs on {', '.join(self.providers)}")

    def _failed(self, e: Exception) -> RunnerError:
        """ONNX Runtime's error running this graph, in one line, naming the graph it refused."""
        return RunnerError(f"ONNX Runtime failed on {self.name}: {str(e).splitlines()[0]}", graph=self.path)

    def _run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        if self.kept:
            out = self.infer_bound({n: (v.value if isinstance(v := feeds[n], OrtDeviceArray) else v)
                                    for n in self.input_names}, self.kept)
            return {n: (OrtDeviceArray(v) if n in self.kept else v) for n, v in out.items()}
        try:
            out = self.session.run(self.output_names, {n: feeds[n] for n in self.input_names})
        except Exception as e:
            raise self._failed(e) from None
        return dict(zip(self.output_names, out))

    def infer_in_place(self, feeds: Feeds, aliases: Mapping[str, str],
                       bound=None) -> tuple[dict[str, np.ndarray], object]:
        if not self.kv_in_place:
            return super().infer_in_place(feeds, aliases, bound)
        if not (isinstance(bound, _InPlaceBinding) and bound.holds(self.session, feeds, aliases)):
            missing = [n for n in self.input_names if n not in feeds]
            if missing:
                raise RunnerError(f"{self.backend} runner for {self.name}: missing inputs {missing}")
            bound = _InPlaceBinding(self, {n: feeds[n] for n in aliases.values()}, aliases)
        binding = bound.binding
        try:
            bound.bind_step_inputs(feeds)
            for _, n in bound.plain_outputs:
                binding.bind_output(n, "cpu")
            self.session.run_with_iobinding(binding)
            values = binding.get_outputs_as_ortvaluevector()  # in output_names order (bound in that order first)
            out = {n: values[i].numpy() for i, n in bound.plain_outputs}
        except Exception as e:
            raise self._failed(e) from None
        return out, bound

    def to_device(self, array: np.ndarray):
        """``array`` as an OrtValue on this session's device (for ``infer_bound``'s feeds)."""
        import onnxruntime as ort

        kind, index = self.io_device
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), kind, index)

    def place(self, array: np.ndarray):
        return OrtDeviceArray(self.to_device(array)) if self.kept else array

    def infer_bound(self, feeds: Mapping[str, object], keep: "set[str] | frozenset[str]" = frozenset()) -> dict:
        """One call through IO binding. ``feeds``: numpy arrays (copied to the device by ONNX
        Runtime) or OrtValues (bound as they are: no copy when already on the device). Outputs named
        in ``keep`` stay on the device as OrtValues; the others come back as numpy."""
        import onnxruntime as ort

        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise RunnerError(f"{self.backend} runner for {self.name}: missing inputs {missing}")
        unknown = set(keep) - set(self.output_names)
        if unknown:
            raise RunnerError(f"{self.name} has no outputs {sorted(unknown)} to keep on the device")
        kind, index = self.io_device
        binding = self.session.io_binding()
        try:
            for n in self.input_names:
                value = feeds[n]
                if isinstance(value, ort.OrtValue):
                    binding.bind_ortvalue_input(n, value)
                else:
                    binding.bind_cpu_input(n, np.ascontiguousarray(value))
            for n in self.output_names:
                binding.bind_output(n, kind if n in keep else "cpu", index if n in keep else 0)
            self.session.run_with_iobinding(binding)
            values = binding.get_outputs()
        except Exception as e:
            raise self._failed(e) from None
        return {n: (v if n in keep else v.numpy()) for n, v in zip(self.output_names, values)}


class _InPlaceBinding:
    """An ONNX Runtime IO binding of in-place buffers: each aliased output bound to its input's numpy
    memory (the same pointer, which is how GroupQueryAttention tells a shared past/present buffer),
    reused by every call with these same arrays (binding ~60 caches costs about a millisecond a step
    on a loaded 2-core machine). The binding holds the arrays, so it lives as long as they do; which
    inputs a step binds and which outputs it reads are worked out once, here."""

    def __init__(self, runner: OrtRunner, buffers: Mapping[str, np.ndarray], aliases: Mapping[str, str]):
        for n, value in buffers.items():
            if not (isinstance(value, np.ndarray) and value.flags.c_contiguous and value.flags.writeable):
                raise RunnerError(f"{runner.name}: the in-place buffer {n} must be a writeable C-contiguous array")
        self.session, self.buffers, self.aliases = runner.session, dict(buffers), dict(aliases)
        self.binding = runner.session.io_binding()
        #: the inputs each step binds (not the buffers), and the outputs it reads (index, name)
        self.step_inputs = [n for n in runner.input_names if n not in self.buffers]
        self.plain_outputs = [(i, n) for i, n in enumerate(runner.output_names) if n not in aliases]
        for n in runner.output_names:  # every output once, in order: get_outputs keeps this order
            if n in aliases:
                array = self.buffers[aliases[n]]
                self.binding.bind_cpu_input(aliases[n], array)  # the array's own memory, no copy
                self.binding.bind_output(n, "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data)
            else:
                self.binding.bind_output(n, "cpu")

    def bind_step_inputs(self, feeds: Mapping[str, np.ndarray]) -> None:
        """A step's small inputs (tokens, positions, the mask), bound as they are (no copy)."""
        for n in self.step_inputs:
            self.binding.bind_cpu_input(n, np.ascontiguousarray(feeds[n]))

    def holds(self, session, feeds: Mapping[str, np.ndarray], aliases: Mapping[str, str]) -> bool:
        """Whether ``feeds`` carry this binding's very buffers, for ``session`` and ``aliases``."""
        return session is self.session and aliases == self.aliases \
            and all(feeds.get(n) is array for n, array in self.buffers.items())
