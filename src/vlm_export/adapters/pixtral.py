"""Pixtral-12B, the Hugging Face form: ``LlavaForConditionalGeneration`` whose vision tower is Pixtral's.

Mistral 3's image path (``adapters/mistral3.py``: images of any size cut into a row of patches each, Pixtral's
tower on the rows, each image written as rows of "[IMG]" with "[IMG_BREAK]" / "[IMG_END]") without the patch
merger: every patch is one image token, through LLaVA's projector. The llava adapter takes towers of a fixed input
size and so passes a LLaVA with a Pixtral tower on to this one (``handles``).
"""
from __future__ import annotations

from torch import nn

from ..errors import AdapterError
from . import register
from .base import LoadedModel
from .llava import has_pixtral_tower
from .mistral3 import Mistral3Adapter


@register
class PixtralLlavaAdapter(Mistral3Adapter):
    name = "llava_pixtral"
    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    description = ("Hugging Face LlavaForConditionalGeneration with a Pixtral tower (Pixtral-12B: images of any size, "
                   "a row of patches each, every patch one image token, any HF causal LM)")

    @classmethod
    def handles(cls, config: dict) -> bool:
        return has_pixtral_tower(config)

    @classmethod
    def refusal(cls, config: dict) -> str:
        return "llava_pixtral takes a LLaVA whose vision tower is Pixtral's"

    def check_projector_input(self, loaded: LoadedModel) -> None:
        """LLaVA's "default" feature strategy drops the first token of what the tower gives: of Pixtral's one
        sequence of every image's patches, not of each image (Hugging Face's count of image tokens then fails)."""
        strategy = loaded.config.vision_feature_select_strategy
        if strategy != "full":
            raise AdapterError(f"vision_feature_select_strategy {strategy!r} in {loaded.path / 'config.json'}: a "
                               "Pixtral tower gives no class token to drop, every patch is an image token; set "
                               "\"full\" (Pixtral-12B's)")

    @staticmethod
    def projector(loaded: LoadedModel, merge: int) -> nn.Module:
        return loaded.model.model.multi_modal_projector  # LLaVA's, on every patch: [images, patches, hidden]

    @staticmethod
    def _merge(loaded: LoadedModel) -> int:
        # no merger: the processor's spatial_merge_size (PixtralProcessor's default 1) must be 1, checked at load
        return 1
