"""ViP-LLaVA: ``VipLlavaForConditionalGeneration``.

LLaVA's image path and prompt (``adapters/llava.py``: a CLIP tower of a fixed input size, one image token per patch)
with ViP-LLaVA's feature selection - the hidden states of several layers (``vision_feature_layer``, five by
default), each without its first (CLS) row, side by side - and its projector, which LayerNorms them before the MLP.
"""
from __future__ import annotations

from . import register
from .llava import LlavaAdapter


@register
class VipLlavaAdapter(LlavaAdapter):
    name = "vipllava"
    model_types = ("vipllava",)
    model_cls = "VipLlavaForConditionalGeneration"
    description = ("Hugging Face VipLlavaForConditionalGeneration (a CLIP tower's layers side by side + a LayerNorm "
                   "MLP projector + any HF causal LM)")

    @classmethod
    def handles(cls, config: dict) -> bool:
        return True

    @staticmethod
    def feature_strategy(config) -> str:
        return "default"  # VipLlavaModel drops every selected layer's first row; its config has no such setting
