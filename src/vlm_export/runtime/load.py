"""Open a build folder's graphs on ONNX Runtime as a pipeline. Imports neither torch nor the
adapters: the manifest says everything (the PyTorch reference is ``adapters.reference``)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Mapping

from ..contract import ImageText, Limits, PromptLayout, scheme_from_dict, stages_from_manifest
from ..contract.profiles import trt_settings
from ..manifest import check_hashes as check_build_hashes, form_entry, gpu_form, gpu_form_note, read_manifest
from ..errors import RunnerError
from .devices import Device, log
from .images import load_image_processor
from .pipeline import GENERATION_DEFAULTS, VLMPipeline
from .prompt import ImageTextEncoder
from .runners import OrtRunner, Runner


@contextlib.contextmanager
def built_with_onnxruntime(manifest: dict):
    """A graph this onnxruntime refuses, where the build was made and checked with a newer one: the
    error says so and what to do (the fused forms use contrib-op inputs of the release they were checked
    on: GroupQueryAttention's query_seqlens is refused by 1.31 and 1.19). Other errors pass as they are."""
    try:
        yield
    except RunnerError as e:
        import onnxruntime
        from packaging.version import InvalidVersion, Version

        built = (manifest.get("versions") or {}).get("onnxruntime")
        try:
            newer = built is not None and Version(built) > Version(onnxruntime.__version__)
        except InvalidVersion:
            newer = False
        if not newer:
            raise
        raise RunnerError(f"{e}; the build was made and checked with onnxruntime {built}, this is "
                          f"{onnxruntime.__version__}: install onnxruntime {built} or newer (onnxruntime-gpu on a GPU), "
                          "or rebuild with this one", graph=e.graph) from None


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # local only: a build's folder is never a hub name (a missing one would otherwise be fetched, with retries)
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def image_text_encoder(manifest: dict, root: Path) -> ImageTextEncoder | None:
    """The image path's prompt reader, its tokenizer from ``root`` (a build or a copy of its files)."""
    spec = ImageText.from_dict(manifest.get("image_text"))
    return ImageTextEncoder(spec, load_tokenizer(Path(root) / spec.tokenizer)) if spec else None


def pipeline_from_manifest(manifest: dict, runners: Mapping[str, Runner], tokenizer,
                           image_processor=None, root: Path | None = None,
                           encodes_images_alone: bool = False) -> VLMPipeline:
    """A pipeline over the given runners, declared by the manifest (stages, scheme, layout, limits);
    ``root`` holds the files the manifest names (needed where the image path reads the prompt).
    ``encodes_images_alone``: ``VLMPipeline.encodes_images_alone``."""
    image_text = image_text_encoder(manifest, root) if manifest.get("image_text") else None
    return VLMPipeline(runners, stages_from_manifest(manifest), scheme_from_dict(manifest["scheme"]), tokenizer,
                       image_processor, PromptLayout.from_dict(manifest["prompt_layout"]),
                       Limits.from_dict(manifest["limits"]), manifest["generation"]["eos_token_ids"], image_text,
                       {k: v for k, v in manifest["generation"].items() if k in GENERATION_DEFAULTS},
                       encodes_images_alone)


def _masked_fused_attention(manifest: dict, stage: str, entry: dict) -> bool:
    """Whether ``entry`` (the form a stage is opened in) is an image stage's fused form with a masked attention
    behind an ``If`` (export/image_fuse.py): the tiled kernel only where nothing in the batch is padded."""
    fusion = manifest["graphs"][stage].get("fusion") or {}
    return entry.get("form") == "fused" and bool((fusion.get("fusions") or {}).get("masked_attention"))


def open_build(build_dir: Path, threads: int | None = None, check_hashes: bool = True,
               form: str = "onnxruntime", device=None, stage_forms: Mapping[str, str] | None = None) -> VLMPipeline:
    """The build's graphs on ONNX Runtime. ``threads``: intra-op threads (None: every core).
    ``check_hashes``: refuse graphs whose bytes differ from the manifest's sha256 (every form's).
    ``form``: ``onnxruntime`` (default) opens each stage in the form the manifest's onnxruntime
    target runs (the fused decoder where the build has one); ``standard`` the standard-op graphs
    TensorRT reads; ``fused`` the fused form where a stage has one (see manifest.form_entry).
    ``device``: ``cpu`` (default) or ``cuda[:N]``: ONNX Runtime's TensorRT/CUDA providers where it
    has them, else CPU with a one-line notice (``runtime.devices.ort_providers``); TensorRT builds
    fp16 kernels for the stages whose graph is fp16. On ``cuda`` the ``onnxruntime`` form is
    ``manifest.gpu_form`` (the standard graph where one is shipped: the fused forms' fp32 attention
    has no CUDA kernel).

    An int8 standard graph that only TensorRT serves (the onnxruntime target runs the stage's fused form)
    is run on a CPU with its Q/DQ pairs emulated (``OrtRunner``'s ``emulate_qdq``): the
    arithmetic TensorRT does, which is what its parity must judge."""
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    if check_hashes:
        check_build_hashes(build_dir, manifest)
    specs = stages_from_manifest(manifest)
    cuda = Device.parse(device).is_cuda
    on_gpu = form == "onnxruntime" and cuda
    forms = {spec.name: gpu_form(manifest, spec.name) if on_gpu else form for spec in specs} | dict(stage_forms or {})
    for note in filter(None, (gpu_form_note(manifest, spec.name) for spec in specs if on_gpu)):
        log.warning(note)
    entries = {spec.name: form_entry(manifest, spec.name, forms[spec.name]) for spec in specs}
    files = {name: entry["file"] for name, entry in entries.items()}
    # a graph the onnxruntime target does not run is the standard one only TensorRT serves
    served = {spec.name: form_entry(manifest, spec.name, "onnxruntime")["file"] for spec in specs}
    with built_with_onnxruntime(manifest):
        runners = {spec.name: OrtRunner(spec.name, build_dir / files[spec.name], threads=threads, spin=spec.per_token,
                                        device=device, **(trt_settings(manifest, spec.name) if cuda else {}),
                                        emulate_qdq=not cuda and files[spec.name] != served[spec.name]
                                        and entries[spec.name]["precision"] == "int8")
                   for spec in specs}
    folder = build_dir / manifest["tokenizer"]
    alone = any(_masked_fused_attention(manifest, spec.name, entries[spec.name]) for spec in specs)
    return pipeline_from_manifest(manifest, runners, load_tokenizer(folder), load_image_processor(folder), build_dir,
                                  encodes_images_alone=alone)
