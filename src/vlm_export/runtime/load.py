"""Open a build folder's graphs on ONNX Runtime as a pipeline. Imports neither torch nor the
adapters: the manifest says everything (the PyTorch reference is ``adapters.reference``)."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ..contract import ImageText, Limits, PromptLayout, scheme_from_dict, stages_from_manifest
from ..manifest import check_hashes as check_build_hashes, read_manifest
from .pipeline import VLMPipeline
from .prompt import ImageTextEncoder
from .runners import OrtRunner, Runner


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(folder)


def load_image_processor(folder: Path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder)


def image_text_encoder(manifest: dict, root: Path) -> ImageTextEncoder | None:
    """The image path's prompt reader, its tokenizer from ``root`` (a build or a copy of its files)."""
    spec = ImageText.from_dict(manifest.get("image_text"))
    return ImageTextEncoder(spec, load_tokenizer(Path(root) / spec.tokenizer)) if spec else None


def pipeline_from_manifest(manifest: dict, runners: Mapping[str, Runner], tokenizer,
                           image_processor=None, root: Path | None = None) -> VLMPipeline:
    """A pipeline over the given runners, declared by the manifest (stages, scheme, layout, limits);
    ``root`` holds the files the manifest names (needed where the image path reads the prompt)."""
    image_text = image_text_encoder(manifest, root) if manifest.get("image_text") else None
    return VLMPipeline(runners, stages_from_manifest(manifest), scheme_from_dict(manifest["scheme"]), tokenizer,
                       image_processor, PromptLayout.from_dict(manifest["prompt_layout"]),
                       Limits.from_dict(manifest["limits"]), manifest["generation"]["eos_token_ids"], image_text)


def open_build(build_dir: Path, threads: int | None = None, check_hashes: bool = True) -> VLMPipeline:
    """The build's graphs on ONNX Runtime. ``threads``: intra-op threads (None: every core).
    ``check_hashes``: refuse graphs whose bytes differ from the manifest's sha256."""
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    if check_hashes:
        check_build_hashes(build_dir, manifest)
    runners = {spec.name: OrtRunner(spec.name, build_dir / manifest["graphs"][spec.name]["file"], threads=threads,
                                    spin=spec.per_token)
               for spec in stages_from_manifest(manifest)}
    folder = build_dir / manifest["tokenizer"]
    return pipeline_from_manifest(manifest, runners, load_tokenizer(folder), load_image_processor(folder), build_dir)
