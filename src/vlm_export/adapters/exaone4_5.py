"""EXAONE 4.5: ``Exaone4_5_ForConditionalGeneration`` (LG AI Research's EXAONE 4.5: a Qwen2.5-VL-style tower with
grouped-query attention + the patch merger + an EXAONE 4 LM).

Qwen2-VL's image processor and prompt (patches of any image size, one ``<|image_pad|>`` per ``merge x merge`` block,
``contract.ImagePatches``) and Qwen2.5-VL's tower - windowed blocks, RMSNorms, SwiGLU MLPs, the axial rotary -
whose attention projects fewer K/V heads than query heads (``num_key_value_heads``; ``PatchVisionTower`` repeats
each K/V head for its group, as Hugging Face's eager attention does). Unlike Qwen2.5-VL the LM reads one stream of
positions (``get_rope_index`` is switched off: an image token's position is its place in the prompt), so the scheme
is ``spliced_patches``. The LM is EXAONE 4 (q/k norms after the projections; where some layers slide, the full
layers use no rotary), a causal LM of its own for text (``write_text_model``). Video inputs are not supported.
"""
from __future__ import annotations

from . import register
from .qwen2_vl import Qwen2VLAdapter


@register
class Exaone45Adapter(Qwen2VLAdapter):
    name = "exaone4_5"
    model_types = ("exaone4_5",)
    model_classes = {"exaone4_5": ("Exaone4_5_ForConditionalGeneration", "Exaone4Config")}
    multimodal_positions = False
    description = ("Hugging Face Exaone4_5_ForConditionalGeneration (Qwen2.5-VL's windowed tower with grouped-query "
                   "attention on patches of any image size + patch merger + an EXAONE 4 LM with one-stream positions)")
