"""TensorRT optimization profiles derived from the manifest's limits (never typed twice): what the
plans are built with (``engines``) and what ONNX Runtime's TensorRT provider is given (``runtime.devices``).

Every dynamic dim of every graph input is named at export; a profile gives each NAME a
(min, opt, max), and the shapes follow. Image stages get one profile over the number of images
(plus any ranges the stage declares itself); the decoder gets the profiles its decoding scheme
derives from the limits (for the spliced scheme: prefill - many tokens, empty cache, image rows -
and decode - one token per row on a cache up to max_sequence - 1), and so does an encoder stage
(``scheme.encoder_dim_ranges``).
"""
from __future__ import annotations

import logging

from .limits import Limits
from .scheme import Range, scheme_from_dict
from .stages import stages_from_manifest
from ..errors import BuildError

log = logging.getLogger(__name__)


def dim_ranges(manifest: dict) -> dict[str, list[dict[str, Range]]]:
    """Per stage: a list of profiles, each mapping dim name -> (min, opt, max)."""
    limits = Limits.from_dict(manifest["limits"])
    scheme = scheme_from_dict(manifest["scheme"])
    images = limits.max_images_per_batch
    image_profile = {"images": (1, max(1, min(images, limits.max_images)), images)}
    ranges = {}
    for spec in stages_from_manifest(manifest):
        if spec.name == scheme.decoder_stage:
            ranges[spec.name] = [{**spec.dim_ranges, **p} for p in scheme.dim_ranges(limits)]
        elif spec.name == scheme.encoder_stage:
            ranges[spec.name] = [{**spec.dim_ranges, **p} for p in scheme.encoder_dim_ranges(limits)]
        else:
            ranges[spec.name] = [{**image_profile, **spec.dim_ranges}]
    return ranges


def stage_profiles(manifest: dict, stage: str) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """Input name -> (min shape, opt shape, max shape), one dict per profile."""
    profiles = []
    for ranges in dim_ranges(manifest)[stage]:
        shapes = {}
        for info in manifest["graphs"][stage]["inputs"]:
            picks = []
            for dim in info["shape"]:
                if isinstance(dim, int):
                    picks.append((dim, dim, dim))
                elif dim in ranges:
                    picks.append(ranges[dim])
                else:
                    raise BuildError(f"{stage} input {info['name']} has a dynamic dim {dim!r} that no limit "
                                     f"bounds; known: {', '.join(sorted(ranges))}")
            shapes[info["name"]] = tuple(tuple(p[i] for p in picks) for i in range(3))
        profiles.append(shapes)
    return profiles


def one_profile(profiles: list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]
                ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """The profiles of ``stage_profiles`` as ONE covering them all (each input's smallest min and largest
    max per dim), optimised for the last one's opt: a decoder's decode profile, which every scheme lists
    last. For a runtime that builds one engine per session (ONNX Runtime's TensorRT provider), so that
    neither a prefill nor a decode step falls outside it and makes TensorRT build again."""
    merged = {}
    for name in profiles[-1]:
        shapes = [p[name] for p in profiles]
        low = tuple(min(dims) for dims in zip(*(s[0] for s in shapes)))
        high = tuple(max(dims) for dims in zip(*(s[2] for s in shapes)))
        merged[name] = (low, profiles[-1][name][1], high)
    return merged


def trt_profile(manifest: dict, stage: str) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] | None:
    """``one_profile`` of the stage's profiles for ONNX Runtime's TensorRT provider; None where a dynamic
    dim has no limit to bound it (the provider then builds an engine per new shape, as without one; a
    warning says why, since each rebuild stalls a request for seconds)."""
    try:
        return one_profile(stage_profiles(manifest, stage))
    except BuildError as e:
        log.warning(f"no TensorRT shape profile for stage {stage} ({e}); ONNX Runtime's TensorRT provider will "
                    "build an engine for each new input shape")
        return None


def trt_settings(manifest: dict, stage: str) -> dict:
    """What ONNX Runtime's TensorRT provider is told about a stage (``OrtRunner``'s keywords): the fp16 and
    int8 flags of its precision and ``trt_profile``. The w4 decoder's DequantizeLinear form computes in fp16
    (W4A16): without the flag the provider's weakly typed builder would run those layers in fp32."""
    graph = manifest["graphs"][stage]
    precision = graph.get("precision")
    fp16 = precision == "fp16" or (graph.get("variant") or {}).get("form") == "dequantize"
    return {"fp16": fp16, "int8": precision == "int8", "trt_profiles": trt_profile(manifest, stage)}
