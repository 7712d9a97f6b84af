"""TensorRT engines, one plan per stage, through NVIDIA's Polygraphy loaders.

NOT RUN on the development and CI machines (TensorRT cannot be installed there: see docs/tensorrt.md).
Written against Polygraphy 0.53's documented loaders (``NetworkFromOnnxPath``, ``CreateConfig``,
``EngineBytesFromNetwork``, ``TrtRunner``); the parts that need no TensorRT - profiles, the
precision-to-network mapping, metadata checks - are tested everywhere, the rest by tests marked
``tensorrt`` that skip without it (or without a GPU).

* fp32 graphs: a plain network, no precision flag (TensorRT runs it in fp32; Polygraphy clears TF32).
* fp16 graphs are already mixed precision (the export keeps fp32 islands, recorded in the manifest):
  built as a *strongly typed* network, so TensorRT keeps each tensor's type as the graph has it
  instead of re-deciding precisions under the FP16 builder flag (weak typing, deprecated since
  TensorRT 10.12 and removed in 11: "Weak typing APIs deprecated", TensorRT 10.12.0 release notes).
* int8 graphs carry explicit Q/DQ nodes: strongly typed too, so TensorRT follows the graph's own
  precisions.
* w4 decoders: the ``dequantize`` form (``--weight-form dequantize``: W4A16, an fp16 decoder whose
  int4 weights go through block-wise DequantizeLinear with fp16 scales into fp16 MatMuls) is built
  strongly typed, like Q/DQ int8. TensorRT takes weight-only quantization for INT4 only, in blocks of
  64 or 128, so the export refuses a ``w8`` decoder, a ``w8`` LM head and other block sizes in that
  form; a manifest that still has one (an older build) is refused here. The ``matmulnbits`` form is
  ONNX Runtime's own op and is refused with a clear error.

Every build first runs the TensorRT compatibility check (``engines.check``, no TensorRT needed) and
records, beside each plan and in the manifest, the TensorRT version and the GPU's compute capability
it was built for (the GPU name too, as information): a plan loads only on the same compute capability
and, unless built ``version_compatible``, the same TensorRT release.
"""
from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BuildError, RunnerError
from ..runtime.runners import Runner
from ..contract.profiles import stage_profiles


@dataclass(frozen=True)
class BuilderSettings:
    # no precision builder flag is ever set: reduced precision comes from the graph's own types
    strongly_typed: bool


def builder_settings(precision: str, variant: dict | None = None) -> BuilderSettings:
    """``variant``: the manifest's record of how the graph was made (its weight-only form)."""
    if precision == "fp32":
        return BuilderSettings(strongly_typed=False)
    if precision in ("fp16", "int8"):  # the graph's fp32 islands / Q/DQ precisions are kept as they are
        return BuilderSettings(strongly_typed=True)
    if precision in ("w8", "w4") and (variant or {}).get("form") == "dequantize":
        variant = variant or {}
        int8_blocks = [what for what, bits in (("decoder", precision), ("LM head", variant.get("lm_head")))
                       if bits == "w8"]
        if int8_blocks:
            raise BuildError(f"no TensorRT engine for block-wise int8 weights ({' and '.join(int8_blocks)} w8): "
                             "TensorRT's weight-only quantization takes int4 weights only; rebuild with "
                             "--precision decoder=w4 --weight-form dequantize (its LM head is w4)")
        # builds before block_sizes was recorded used their block_size for every MatMul
        sizes = set(variant.get("block_sizes") or ({str(variant["block_size"]): 1} if "block_size" in variant else {}))
        if sizes - {"64", "128"}:
            raise BuildError(f"no TensorRT engine for int4 blocks of {', '.join(sorted(sizes - {'64', '128'}))}: "
                             "TensorRT takes int4 blocks of 64 or 128 only; rebuild with --weight-form dequantize "
                             "(blocks of 128, 64 where needed) and no --block-size, or --block-size 64")
        return BuilderSettings(strongly_typed=True)
    if precision == "w8":  # the dequantize form is w4 only: TensorRT's weight-only quantization takes int4
        raise BuildError("no TensorRT engine for a w8 graph in ONNX Runtime's MatMulNBits form, nor for w8 in any form "
                         "(TensorRT's weight-only quantization takes int4 weights only); rebuild with --precision "
                         "decoder=w4 --weight-form dequantize, or decoder=int8 (Q/DQ)")
    raise BuildError(f"no TensorRT engine for a {precision} graph in ONNX Runtime's MatMulNBits form; "
                     "rebuild with --weight-form dequantize (block-wise DequantizeLinear, which TensorRT reads)")


#: the TensorRT in the Triton release this project pins (deploy.triton; NGC 24.10 release notes: TensorRT
#: 10.5.0.18): plans load only on the TensorRT that built them, or a later one of the same major when
#: version-compatible; tests/test_deploy.py keeps it equal to deploy.triton's record
SERVING_TENSORRT = "10.5"


def installed_tensorrt() -> str | None:
    """The TensorRT version importable here, or None (not installed, or the bindings wheel without
    the libraries it loads, which fails to import with an OSError)."""
    try:
        import tensorrt as trt
    except (ImportError, OSError):
        return None
    return trt.__version__


def _device() -> dict:
    import torch

    if not torch.cuda.is_available():
        raise BuildError("TensorRT engines need a CUDA GPU; none is visible on this machine")
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"}


def release(version: str | None) -> tuple[int, int, int] | None:
    """major.minor.patch of a TensorRT version: a container's "10.7.0.23" and the wheel's "10.7.0"
    (or "10.7.0.post1") are one release, and a plan's compatibility follows the release."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version or "")
    return (int(match[1]), int(match[2]), int(match[3] or 0)) if match else None


def version_problem(built: str | None, runtime: str, version_compatible: bool = False) -> str | None:
    """Why a plan built with TensorRT ``built`` will not load on TensorRT ``runtime``, or None.

    TensorRT's "Version Compatibility" (developer guide, Advanced Topics): a plan loads only on the
    TensorRT it was built with, unless built with ``BuilderFlag.VERSION_COMPATIBLE``; such a plan
    loads on that release and later ones of the same major version (support matrix, "Engine
    Portability"), never on an older runtime."""
    have, want = release(built), release(runtime)
    if have is None or want is None:
        return f"cannot compare TensorRT versions {built!r} (the plan's) and {runtime!r}"
    if not version_compatible and have != want:
        return (f"a plan built with TensorRT {built} loads only on that release, not on {runtime} (build it "
                f"with that TensorRT, or --version-compatible for later TensorRT {have[0]}.x releases)")
    if version_compatible and (want[0] != have[0] or want < have):
        return (f"a version-compatible plan built with TensorRT {built} loads on that and later TensorRT "
                f"{have[0]}.x releases, not on {runtime}")
    return None


#: the tensorrt backend's switch for plans built version-compatible: a server command-line option for
#: every model of the backend, not a model-config parameter (tensorrt_backend README, "Command-line
#: Options": ``--backend-config=tensorrt,...,version-compatible=true``; such a plan carries a lean
#: runtime that Triton deserializes and runs, so the plans must be trusted)
VERSION_COMPATIBLE_BACKEND_CONFIG = "--backend-config=tensorrt,version-compatible=true"


def triton_server_args(engines: dict) -> list[str]:
    """tritonserver options the recorded engines (the manifest's ``engines``) need."""
    return [VERSION_COMPATIBLE_BACKEND_CONFIG] if any(e.get("version_compatible") for e in engines.values()) else []


def engine_metadata(precision: str, profiles: list, version_compatible: bool = False) -> dict:
    import tensorrt as trt

    # the GPU name is information: the plan runs on any GPU of the same compute capability
    return {"tensorrt": trt.__version__, **_device(), "version_compatible": version_compatible,
            "precision": precision,
            "profiles": [{name: [list(s) for s in shapes] for name, shapes in p.items()} for p in profiles]}


def check_metadata(meta: dict, plan: Path, here: dict | None = None) -> None:
    """A plan only runs on the compute capability it was built for, and on the TensorRT release it
    was built with (later ones of the same major too when built version-compatible): say so before
    loading. Sibling GPUs and MIG slices share the compute capability and run the plan, so the GPU
    name is not compared. ``here``: this machine's ``tensorrt`` and ``compute_capability`` (default:
    asked of TensorRT and CUDA)."""
    if here is None:
        import tensorrt as trt

        here = {"tensorrt": trt.__version__, **_device()}
    if meta.get("compute_capability") != here["compute_capability"]:
        raise RunnerError(f"{plan} was built for compute capability {meta.get('compute_capability')!r} "
                          f"({meta.get('gpu', 'unknown GPU')}), this machine has {here['compute_capability']!r}; "
                          "rebuild the engines here (vlm-export engines BUILD)")
    problem = version_problem(meta.get("tensorrt"), here["tensorrt"], bool(meta.get("version_compatible")))
    if problem:
        raise RunnerError(f"{plan}: {problem}; rebuild the engines here (vlm-export engines BUILD)")


def build_engine(onnx_path: Path, plan_path: Path, manifest: dict, stage: str, timing_cache: Path,
                 version_compatible: bool = False) -> dict:
    """Build one plan atomically; returns its metadata (also written beside it as JSON).
    ``version_compatible``: a plan later TensorRT releases of the same major version load too
    (TensorRT's BuilderFlag.VERSION_COMPATIBLE; it carries a lean runtime and may run slower)."""
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
    # no precision flag (fp16 / int8): strongly typed networks take their precisions from the graph
    config = CreateConfig(profiles=trt_profiles, version_compatible=version_compatible or None,
                          load_timing_cache=os.fspath(timing_cache) if timing_cache.exists() else None)
    engine_bytes = EngineBytesFromNetwork(network, config=config, save_timing_cache=os.fspath(timing_cache))()
    tmp = plan_path.with_name(f".{plan_path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(bytes(engine_bytes))
    os.replace(tmp, plan_path)
    meta = engine_metadata(precision, profiles, version_compatible)
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
    continues_prefill = False  # the prefill profile's past is empty (contract: dim_ranges)

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
        # TensorRT drops a network input no layer reads ("Unused Input", e.g. an ALiBi decoder's position_ids,
        # which the stage declares for every LM), and Polygraphy refuses a feed the engine lacks
        engine_inputs = set(self._runner.get_input_metadata())
        self._fed = [n for n in self.input_names if n in engine_inputs]

    def _profile_for(self, feeds) -> int:
        return profile_for(self.meta["profiles"], feeds, self.name)

    def _run(self, feeds):
        index = self._profile_for(feeds)
        if index != self._profile:
            self._runner.set_profile(index)
            self._profile = index
        out = self._runner.infer({n: np.ascontiguousarray(feeds[n]) for n in self._fed})
        # copies: Polygraphy's runners may reuse their output buffers on the next call (BaseRunner.infer
        # docs), and a decode loop keeps the previous step's outputs (the cache) while running the next
        return {n: np.array(out[n], copy=True) for n in self.output_names}


def check_compatibility(build_dir: Path, tensorrt_version: str | None = None, configs: dict | None = None):
    """The TensorRT compatibility check of a build (``engines.check``, no TensorRT needed) for
    ``tensorrt_version``; default: the installed TensorRT where the checker has tables for it, else
    the checker's own default. ``configs``: the tensorrt target's Triton configs, checked too.
    Returns its report."""
    from .check import check_build  # imported here: the checker is its own module

    if tensorrt_version is None and (installed := installed_tensorrt()) is not None:
        try:
            return check_build(Path(build_dir), installed, configs)
        except BuildError:  # no tables for the installed release; any other refusal the default run repeats
            pass
    return check_build(Path(build_dir), tensorrt_version, configs)


def check_before_build(build_dir: Path, tensorrt_version: str | None = None):
    """``check_compatibility``, and BuildError naming the first violations when it fails."""
    report = check_compatibility(build_dir, tensorrt_version)
    if not report.ok:
        first = report.violations[:3]
        more = len(report.violations) - len(first)
        raise BuildError(f"{build_dir} fails the TensorRT {report.tensorrt} compatibility check: "
                         + "; ".join(f"{v.graph}{f' node {v.node}' if v.node else ''}: {v.rule} ({v.detail})"
                                     for v in first)
                         + (f"; and {more} more" if more else "")
                         + " (vlm-export engines BUILD --check-only lists them all)")
    return report


def build_engines(build_dir: Path, progress=None, version_compatible: bool = False,
                  tensorrt_version: str | None = None) -> dict:
    """Plans for every stage of a build into ``engines/``, recorded in the manifest.

    Needs TensorRT and a CUDA GPU; the timing cache in ``engines/timing.cache`` is reused by later
    builds on the same machine. Before anything is built (or needed), the forms TensorRT cannot build
    are refused and the graphs pass the compatibility check for ``tensorrt_version`` (default: the
    installed TensorRT, else the checker's default)."""
    from ..manifest import form_entry, read_manifest, sha256_file, write_manifest
    from ..progress import Progress

    progress = progress or Progress()
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    for stage, graph in manifest["graphs"].items():  # refuse early, before hours of building (or installing)
        builder_settings(graph["precision"], graph.get("variant"))
    check_before_build(build_dir, tensorrt_version)
    installed = installed_tensorrt()
    if installed is None:
        raise BuildError(f"TensorRT is not installed here (on a machine with a CUDA GPU: pip install "
                         f"\"tensorrt=={SERVING_TENSORRT}.*\", the TensorRT of the Triton the plans will serve on: "
                         "a plan loads only on the TensorRT that built it); "
                         "the onnxruntime and python targets run without it")
    if tensorrt_version:  # plans are built by the TensorRT installed here: they must load on the one targeted
        problem = version_problem(installed, tensorrt_version, version_compatible)
        if problem:
            raise BuildError(f"TensorRT {tensorrt_version} is targeted, {installed} is installed here: {problem}")
    _device()
    folder = build_dir / "engines"
    folder.mkdir(exist_ok=True)
    engines = {}
    for stage, graph in manifest["graphs"].items():
        with progress.step(f"TensorRT engine for {stage} ({graph['precision']})") as advance:
            plan = folder / f"{stage}.plan"
            source = form_entry(manifest, stage, "tensorrt")["file"]  # the standard-op form, never the fused one
            meta = build_engine(build_dir / source, plan, manifest, stage, folder / "timing.cache",
                                version_compatible)
            engines[stage] = {"file": str(plan.relative_to(build_dir)), "sha256": sha256_file(plan), **meta}
            advance()
    manifest["engines"] = engines
    write_manifest(build_dir, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    return engines
