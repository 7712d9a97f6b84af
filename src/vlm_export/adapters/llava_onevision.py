"""LLaVA-OneVision: Hugging Face ``LlavaOnevisionForConditionalGeneration`` (SigLIP + a Qwen2 LM in the llava-hf
checkpoints).

A prompt's one image is tiled and packed as LLaVA-NeXT's (``adapters/llava_next.py``), but a packed picture that
holds more than N tiles' rows by over 10% (``vision_aspect_ratio`` "anyres_max_N") is shrunk, bilinear, to about N
tiles' worth (``AnyResTiles.picture_tiles``: a weighted packing, still data). Where a prompt holds several images,
its processor pads each to a square and does not tile it: one tile, its rows and a newline
(``AnyResTiles.one_prompt``: a request's images go to the image processor as one prompt's, and are encoded and
cached together). ``LlavaOnevisionProcessor`` counts the tokens so.

Not covered: video.
"""
from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from ..contract import AnyResTiles
from ..contract.layout import IMAGE_SIZES
from ..errors import AdapterError
from . import register
from .base import LoadedModel, processor_setting
from .llava_next import LlavaNextAdapter


@register
class LlavaOnevisionAdapter(LlavaNextAdapter):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    description = ("Hugging Face LlavaOnevisionForConditionalGeneration (a prompt's one image tiled by its size, a "
                   "large picture shrunk, several images one tile each; SigLIP + MLP projector + image newline, any HF "
                   "causal LM)")
    model_cls = "LlavaOnevisionForConditionalGeneration"

    @staticmethod
    def picture_tiles(loaded: LoadedModel) -> int:
        """N of the config's ``vision_aspect_ratio`` "anyres_max_N" (how Hugging Face reads it)."""
        ratio = str(loaded.config.vision_aspect_ratio)
        found = re.fullmatch(r"anyres_max_(\d+)", ratio)
        if not found or not int(found.group(1)):
            raise AdapterError(f"vision_aspect_ratio {ratio!r} in {loaded.path / 'config.json'} is not 'anyres_max_N' "
                               "(N tiles at most in a packed picture), which LlavaOnevisionModel reads")
        return int(found.group(1))

    @classmethod
    def tiles(cls, loaded: LoadedModel) -> AnyResTiles:
        return replace(super().tiles(loaded), picture_tiles=cls.picture_tiles(loaded), one_prompt=True)

    @staticmethod
    def _check_processor_packing(loaded: LoadedModel, tiles: AnyResTiles) -> None:
        """LlavaOnevisionProcessor counts an image's tokens from its saved ``num_image_tokens`` (a tile's rows) and
        ``vision_aspect_ratio``: both must be the model's (read from processor_config.json; the processor itself
        needs torchvision to load)."""
        path = Path(loaded.path)
        for name, want in (("num_image_tokens", tiles.patches ** 2),
                           ("vision_aspect_ratio", str(loaded.config.vision_aspect_ratio)),
                           ("vision_feature_select_strategy", loaded.config.vision_feature_select_strategy)):
            saved = processor_setting(path, name)
            if saved is not None and saved != want:
                raise AdapterError(f"the processor in {path} has {name} {saved!r} but the model's is {want!r}, so it "
                                   "writes another number of image tokens than the model packs; Hugging Face's generate "
                                   "refuses this checkpoint too: fix processor_config.json")

    @staticmethod
    def _reference_image_inputs(loaded: LoadedModel, pixel_values: dict) -> dict:
        """LLaVA-NeXT's, and that the images are one prompt's (``batch_num_images``): several are one tile each."""
        return {**LlavaNextAdapter._reference_image_inputs(loaded, pixel_values),
                "batch_num_images": torch.tensor([len(pixel_values[IMAGE_SIZES])])}
