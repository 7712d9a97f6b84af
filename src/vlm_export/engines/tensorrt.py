"""TensorRT engines, one plan per stage, through NVIDIA's Polygraphy loaders.

NOT RUN on the development and CI machines (TensorRT cannot be installed there: see the README).
Written against Polygraphy 0.53's documented loaders (``NetworkFromOnnxPath``, ``CreateConfig``,
``EngineBytesFromNetwork``, ``TrtRunner``); the parts that need no TensorRT - profiles, the
precision-to-flags mapping, metadata checks - are tested everywhere, the rest by tests marked
``tensorrt`` that skip without it.

* fp32 / fp16 graphs: a plain network; fp16 sets the builder's FP16 flag (TensorRT keeps layers it
  judges sensitive in fp32).
* int8 graphs carry explicit Q/DQ nodes: built as a strongly typed network, so TensorRT follows
  the graph's own precisions instead of re-deciding them.
* w4 decoders: the ``dequantize`` form (``--weight-form dequantize``: int4 weights, block-wise
  DequantizeLinear, symmetric) is built strongly typed, like Q/DQ int8. TensorRT takes weight-only
  quantization for INT4 only (INT8 it quantizes weights *and* activations), so a ``w8`` decoder and a
  w4 decoder whose LM head is ``w8`` (the default head) are refused; ``--lm-head w4`` or ``fp32``
  builds. The ``matmulnbits`` form is ONNX Runtime's own op and is refused with a clear error. The dequantize
  form keeps the exported graph's fp32 activations; TensorRT's fastest weight-only GEMMs want fp16
  activations, which would need an fp16 conversion before the weights are quantized (not done).
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BuildError, RunnerError
from ..runtime.runners import Runner
from .profiles import stage_profiles


@dataclass(frozen=True)
class BuilderSettings:
    fp16: bool
    strongly_typed: bool


def builder_settings(precision: str, variant: dict | None = None) -> BuilderSettings:
    """``variant``: the manifest's record of how the graph was made (its weight-only form)."""
    if precision == "fp32":
        return BuilderSettings(fp16=False, strongly_typed=False)
    if precision == "fp16":
        return BuilderSettings(fp16=True, strongly_typed=False)
    if precision == "int8":
        return BuilderSettings(fp16=False, strongly_typed=True)
    if precision in ("w8", "w4") and (variant or {}).get("form") == "dequantize":
        int8_blocks = [what for what, bits in (("decoder", precision), ("LM head", (variant or {}).get("lm_head")))
                       if bits == "w8"]
        if int8_blocks:
            raise BuildError(f"no TensorRT engine for block-wise int8 weights ({' and '.join(int8_blocks)} w8): "
                             "TensorRT's weight-only quantization takes int4 weights only; rebuild with "
                             "--precision decoder=w4 --lm-head w4 (or --lm-head fp32)")
        return BuilderSettings(fp16=False, strongly_typed=True)
    raise BuildError(f"no TensorRT engine for a {precision} graph in ONNX Runtime's MatMulNBits form; "
                     "rebuild with --weight-form dequantize (block-wise DequantizeLinear, which TensorRT reads)")


def _device() -> dict:
    import torch

    if not torch.cuda.is_available():
        raise BuildError("TensorRT engines need a CUDA GPU; none is visible on this machine")
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def engine_metadata(precision: str, profiles: list) -> dict:
    import tensorrt as trt

    return {"tensorrt": trt.__version__, **_device(), "precision": precision,
            "profiles": [{name: [list(s) for s in shapes] for name, shapes in p.items()} for p in profiles]}


def check_metadata(meta: dict, plan: Path, here: dict | None = None) -> None:
    """A plan only runs on the TensorRT version and GPU it was built for: say so before loading.
    ``here``: this machine's ``tensorrt``, ``gpu`` and ``compute_capability`` (default: asked of
    TensorRT and CUDA)."""
    if here is None:
        import tensorrt as trt

        here = {"tensorrt": trt.__version__, **_device()}
    for key in ("tensorrt", "gpu", "compute_capability"):
        if meta.get(key) != here[key]:
            raise RunnerError(f"{plan} was built for {key} {meta.get(key)!r}, this machine has {here[key]!r}; "
                              "rebuild the engines here (vlm-export engines BUILD)")


def build_engine(onnx_path: Path, plan_path: Path, manifest: dict, stage: str, timing_cache: Path) -> dict:
    """Build one plan atomically; returns its metadata (also written beside it as JSON)."""
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

    precision = manifest["graphs"][stage]["precision"]
    settings = builder_settings(precision, manifest["graphs"][stage].get("variant"))
    profiles = stage_profiles(manifest, stage)
    trt_profiles = []
    for shapes in profiles:
        profile = Profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.add(name, min=lo, opt=opt, max=hi)
        trt_profiles.append(profile)
    network = NetworkFromOnnxPath(os.fspath(onnx_path), strongly_typed=settings.strongly_typed or None)
    config = CreateConfig(fp16=settings.fp16 or None, profiles=trt_profiles,
                          load_timing_cache=os.fspath(timing_cache) if timing_cache.exists() else None)
    engine_bytes = EngineBytesFromNetwork(network, config=config, save_timing_cache=os.fspath(timing_cache))()
    tmp = plan_path.with_name(f".{plan_path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(bytes(engine_bytes))
    os.replace(tmp, plan_path)
    meta = engine_metadata(precision, profiles)
    plan_path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return meta


def profile_for(profiles: list[dict], feeds, name: str = "") -> int:
    """Index of the first optimization profile (as the plan's metadata records them: input name ->
    [min shape, opt shape, max shape]) whose ranges hold the shape of every feed."""
    for index, profile in enumerate(profiles):
        if all(all(lo <= d <= hi for d, lo, hi in zip(np.shape(feeds[n]), shapes[0], shapes[2]))
               for n, shapes in profile.items()):
            return index
    raise RunnerError(f"{name}: input shapes {({n: np.shape(v) for n, v in feeds.items()})} are outside "
                      "every optimization profile; rebuild with larger limits")


class TensorRTRunner(Runner):
    """The runner contract over a TensorRT plan (Polygraphy's TrtRunner); numpy in, numpy out.

    Picks the optimization profile whose ranges hold the feed's shapes (prefill vs decode)."""

    backend = "tensorrt"

    def __init__(self, name: str, plan: Path, input_names: list[str], output_names: list[str]):
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        meta_path = Path(plan).with_suffix(".json")
        self.meta = json.loads(meta_path.read_text())
        check_metadata(self.meta, Path(plan))
        super().__init__(name, input_names, output_names)
        self._runner = TrtRunner(EngineFromBytes(BytesFromPath(os.fspath(plan))))
        self._runner.activate()
        self._profile = 0

    def _profile_for(self, feeds) -> int:
        return profile_for(self.meta["profiles"], feeds, self.name)

    def _run(self, feeds):
        index = self._profile_for(feeds)
        if index != self._profile:
            self._runner.set_profile(index)
            self._profile = index
        out = self._runner.infer({n: np.ascontiguousarray(feeds[n]) for n in self.input_names})
        return {n: np.asarray(out[n]) for n in self.output_names}


def build_engines(build_dir: Path, progress=None) -> dict:
    """Plans for every stage of a build into ``engines/``, recorded in the manifest.

    Needs TensorRT and a CUDA GPU; the timing cache in ``engines/timing.cache`` is reused by later
    builds on the same machine."""
    from ..manifest import read_manifest, sha256_file, write_manifest
    from ..progress import Progress

    progress = progress or Progress()
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    for stage, graph in manifest["graphs"].items():  # refuse early, before hours of building (or installing)
        builder_settings(graph["precision"], graph.get("variant"))
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise BuildError("TensorRT is not installed here (pip install tensorrt on a machine with a CUDA GPU); "
                         "the onnxruntime and python targets run without it") from None
    _device()
    folder = build_dir / "engines"
    folder.mkdir(exist_ok=True)
    engines = {}
    for stage, graph in manifest["graphs"].items():
        with progress.step(f"TensorRT engine for {stage} ({graph['precision']})") as advance:
            plan = folder / f"{stage}.plan"
            meta = build_engine(build_dir / graph["file"], plan, manifest, stage, folder / "timing.cache")
            engines[stage] = {"file": str(plan.relative_to(build_dir)), "sha256": sha256_file(plan), **meta}
            advance()
    manifest["engines"] = engines
    write_manifest(build_dir, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    return engines
