"""PaddleOCR-VL: ``PaddleOCRVLForConditionalGeneration`` (PaddleOCR-VL 0.9B: a NaViT-style SigLIP tower, a merging
projector and an ERNIE-4.5-style LM with multimodal rotary positions).

Qwen2-VL's image path, prompt and positions (``adapters/qwen2_vl.py``: rows of patches of any image size, one image
token per merge block, M-RoPE made by the ``spliced_mrope`` scheme, which ``get_rope_index`` computes the same way
for images) with its own tower and projector, each followed here as Hugging Face computes it:

- the image processor gives each image's patches row-major over the image ([channels, patch, patch] each), not by
  merge blocks: ``ImagePatches.raster`` puts them in the order of merge blocks, so the projector's merge of a block
  reads ``merge²`` consecutive patches (Hugging Face reshapes the raster into blocks: the same rows, in the same
  order);
- the patch embedding (a convolution of kernel = stride = the patch: a matmul here) gets the tower's learned position
  grid resampled bilinearly at half-pixel centres to each image's grid (``qwen3_vl.resampled_grid``); SigLIP's
  encoder layers (q/k/v apart, LayerNorms) attend within each image with the axial rotary of each patch's (row,
  column); a final LayerNorm;
- the projector norms each patch, joins each ``merge x merge`` block's patches and runs a GELU MLP;
- the LM is a Llama-like decoder (ERNIE 4.5's: rotate-half rotary, biases where ``use_bias``) with M-RoPE; for text
  alone the three streams are one and it is a plain Llama (``write_text_model``).
"""
from __future__ import annotations

import torch
from torch import nn

from . import register
from .base import LoadedModel
from .qwen2_vl import (BlockMergeProjector, PatchVisionTower, Qwen2VLAdapter, image_attention_mask, raster_pixels,
                       rotary_attention, separate_heads)
from .qwen3_vl import resampled_grid


class SiglipPatchTower(PatchVisionTower):
    """PaddleOCR-VL's vision transformer on rows of patches (``contract.ImagePatches``), as
    ``PaddleOCRVisionTransformer`` computes it on its flat sequence: each patch attends to the real patches of its
    image (a mask in place of the per-image lengths Hugging Face reads at run time)."""

    @property
    def rotary(self) -> nn.Module:
        return self.tower.encoder.rotary_pos_emb

    def embed(self, pixel_values, patch_positions, patch_mask):
        embeddings = self.tower.embeddings
        conv = embeddings.patch_embedding
        hidden = nn.functional.linear(pixel_values, conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)
        grid = resampled_grid(embeddings.position_embedding, embeddings.num_grid_per_side, patch_positions,
                              patch_mask, bool(embeddings.interpolation_align_corners))
        return hidden + grid.to(hidden.dtype)

    def forward(self, pixel_values, patch_positions, patch_mask):
        hidden = self.embed(pixel_values, patch_positions, patch_mask)
        cos, sin = self._angles(patch_positions)
        mask = image_attention_mask(patch_mask)
        for layer in self.tower.encoder.layers:
            attn = layer.self_attn
            heads = separate_heads(attn, layer.layer_norm1(hidden))
            hidden = hidden + attn.out_proj(rotary_attention(*heads, cos, sin, mask, attn.scaling))
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        return self.tower.post_layernorm(hidden)


@register
class PaddleOCRVLAdapter(Qwen2VLAdapter):
    name = "paddleocr_vl"
    model_types = ("paddleocr_vl",)
    model_classes = {"paddleocr_vl": ("PaddleOCRVLForConditionalGeneration", "LlamaConfig")}
    description = ("Hugging Face PaddleOCRVLForConditionalGeneration (a NaViT-style SigLIP tower on patches of any "
                   "image size + merging projector + an ERNIE-4.5-style LM with multimodal rotary positions)")
    default_image_token = "<|IMAGE_PLACEHOLDER|>"
    raster_patches = True

    def vision_modules(self, loaded: LoadedModel) -> tuple[nn.Module, nn.Module]:
        model = loaded.model.model
        return (SiglipPatchTower(model.visual.vision_model),
                BlockMergeProjector(model.projector, "pre_norm",
                                    int(loaded.config.vision_config.spatial_merge_size) ** 2))

    def _text_lm_settings(self, loaded: LoadedModel) -> dict:
        # ERNIE 4.5's biases are one switch; Llama's two
        text = loaded.config.text_config
        bias = bool(getattr(text, "use_bias", False))
        return {"attention_bias": bias, "mlp_bias": bias,
                "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads}

    def _reference_pixels(self, loaded: LoadedModel, pixel_values: dict) -> torch.Tensor:
        """The processor's own pixels back from the rows of patches: [channels, patch, patch] each."""
        vision = loaded.config.vision_config
        return raster_pixels(pixel_values).reshape(-1, vision.num_channels, vision.patch_size, vision.patch_size)
