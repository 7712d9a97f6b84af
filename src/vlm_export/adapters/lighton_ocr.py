"""LightOnOCR: ``LightOnOcrForConditionalGeneration`` (LightOnOCR-1B and its kin: Mistral 3's image path under other
names, a Qwen3 LM).

Mistral 3's image path (``adapters/mistral3.py``: images of any size within the image processor's longest edge, cut
into a row of patches each, Pixtral's tower on the rows, the patch merger) with LightOnOCR's differences, each followed
as Hugging Face computes it:

- the tower is ``model.vision_encoder`` and the projector ``model.vision_projection`` (Mistral 3's, bias-free), which
  reads the tower's last hidden state: there is no ``vision_feature_layer``;
- ``LightOnOcrProcessor`` writes an image as ``rows x columns`` image tokens, one per merge block, with no row-break or
  end token, and reads its tokens off the tokenizer's attributes; it passes the image processor no patch size, so the
  image processor's own must be one merge block of patches (checked at load).
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import AdapterError
from . import register
from .base import LoadedModel
from .mistral3 import MergedPatchProjector, Mistral3Adapter


@register
class LightOnOcrAdapter(Mistral3Adapter):
    name = "lighton_ocr"
    model_types = ("lighton_ocr",)
    model_class = "LightOnOcrForConditionalGeneration"
    description = ("Hugging Face LightOnOcrForConditionalGeneration (LightOnOCR: Pixtral's tower on images of any size "
                   "+ Mistral 3's patch merger + a Qwen3 LM; rows x columns image tokens per image)")
    processor_merge = 2  # LightOnOcrProcessor's default spatial_merge_size

    def load(self, path: Path) -> LoadedModel:
        loaded = super().load(path)
        have = (getattr(loaded.image_processor, "patch_size", None) or {}).get("height")
        block = int(loaded.config.vision_config.patch_size) * self._merge(loaded)
        if have != block:
            raise AdapterError(f"the image processor in {path} resizes images to blocks of {have} pixels but one image "
                               f"token is {block} (patch x spatial_merge_size), and LightOnOcrProcessor passes it no "
                               "other: save the model's own image processor beside it")
        return loaded

    def check_tower_layers(self, loaded: LoadedModel) -> None:
        pass  # the projector reads the tower's last hidden state

    def check_projector_input(self, loaded: LoadedModel) -> None:
        pass

    @staticmethod
    def _feature_layers(loaded: LoadedModel) -> tuple[int, ...]:
        return (int(loaded.config.vision_config.num_hidden_layers),)

    def _tokens(self, loaded: LoadedModel) -> dict[str, str]:
        """The image token, off the tokenizer's attributes as LightOnOcrProcessor reads it (it writes no other)."""
        token = getattr(loaded.tokenizer, "image_token", None)
        if not token:
            raise AdapterError(f"the tokenizer in {loaded.path} names no image_token (LightOnOcrProcessor reads it off "
                               "the tokenizer): save the model's own tokenizer beside it")
        return {"image_token": token}

    @staticmethod
    def _processor_options(block: int) -> dict:
        return {}  # the image processor's own patch size (a block: checked at load)

    @staticmethod
    def _tower(loaded: LoadedModel) -> nn.Module:
        return loaded.model.model.vision_encoder

    @staticmethod
    def projector(loaded: LoadedModel, merge: int) -> nn.Module:
        return MergedPatchProjector(loaded.model.model.vision_projection, merge)
