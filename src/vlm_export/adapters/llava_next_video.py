"""LLaVA-NeXT-Video, its image path: ``LlavaNextVideoForConditionalGeneration`` with images (and text) only.

LLaVA-NeXT-Video is LLaVA-NeXT (``adapters/llava_next.py``) with a video path beside it: for images the same
tiles by ``image_grid_pinpoints``, the same tower, projector, packing and learned newline, the same "<image>" expanded
by its processor as LlavaNextProcessor expands it. Its video path (frames through the tower, pooled by
``spatial_pool_stride``, written as "<video>") is not exported: a message part of type "video" is refused as any
part but text and image is; a "<video>" written in a text stays a token, as the model reads it given no video.
"""
from __future__ import annotations

from . import register
from .llava_next import LlavaNextAdapter


@register
class LlavaNextVideoAdapter(LlavaNextAdapter):
    name = "llava_next_video"
    model_types = ("llava_next_video",)
    model_cls = "LlavaNextVideoForConditionalGeneration"
    description = ("Hugging Face LlavaNextVideoForConditionalGeneration, images only (LLaVA-NeXT's tiles, CLIP tower, "
                   "projector and newline; any HF causal LM); its video path is not exported")
