"""Qianfan-OCR: ``QianfanOCRForConditionalGeneration`` (Baidu's Qianfan-OCR: InternVL's image path and prompt over
a Qwen3 LM).

InternVL's in every part the export sees (``adapters/internvl.py``): GotOcr2's tiles plus a thumbnail, an
InternViT-style tower (here its layers directly under the tower, stochastic depth that does nothing at inference),
the pixel shuffle and the projector, "<img>" + the context token x rows x tiles + "</img>" per image. One thing
differs: the chat template and a raw prompt write an image as the processor's ``image_placeholder_token``
("<image>"), which QianfanOCRProcessor replaces with that run of tokens; the layout's mark is that text.
"""
from __future__ import annotations

from . import register
from .base import LoadedModel, processor_setting
from .internvl import InternVLAdapter


@register
class QianfanOCRAdapter(InternVLAdapter):
    name = "qianfan_ocr"
    model_types = ("qianfan_ocr",)
    model_cls = "QianfanOCRForConditionalGeneration"
    description = ("Hugging Face QianfanOCRForConditionalGeneration (InternVL's tiles, tower, pixel shuffle and "
                   "projector; an image written as <image>; a Qwen3 LM)")

    def image_mark(self, loaded: LoadedModel) -> str:
        # QianfanOCRProcessor's default where its processor_config.json names none
        return processor_setting(loaded.path, "image_placeholder_token") or "<image>"
