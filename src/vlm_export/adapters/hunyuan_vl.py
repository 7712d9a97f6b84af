"""HunYuanVL: ``HunYuanVLForConditionalGeneration`` (Tencent's HunyuanOCR: a NaViT-style SigLIP tower, a convolutional
patch merger that frames each image, and a HunYuan dense LM with its "XD-RoPE" multimodal positions).

Qwen2-VL's image path (``adapters/qwen2_vl.py``: rows of patches of any image size, ``contract.ImagePatches``) with
HunYuanVL's own modules, each followed here as Hugging Face computes it:

- the image processor gives each image's patches row-major over the image, [channels, patch, patch] each
  (``ImagePatches.raster``, as PaddleOCR-VL's);
- the patch embedding (a convolution of kernel = stride = the patch: a matmul here) gets the tower's learned
  position grid (its table past the first, class, row) resampled bilinearly at half-pixel centres to each image's
  grid (``qwen3_vl.resampled_grid``, PyTorch's ``interpolate`` for ``interpolate_mode`` "bilinear"); SigLIP encoder
  layers attend within each image (a mask in place of Hugging Face's per-image lengths), without a rotary;
- the merger (the projector) RMS-norms each patch, merges each ``merge x merge`` block by its convolution (a
  matmul on the block's consecutive patches), a 1 x 1 convolution and its MLP, then RMS-norms every row; it frames
  each image with rows of its own - a newline after each row of blocks (its learned newline through the MLP), a
  begin and an end row - which are the same for every image: the projector gives them after each image's blocks and
  the ``spliced_xdrope`` scheme puts them in place (``ImagePatches.framed``: the processor writes ``rows x (cols +
  1) + 2`` image tokens per image);
- the LM is HunYuan's dense decoder (q/k RMS-normed per head after the rotary) whose rotary turns sections of each
  head by other position streams (``mrope_section``): positions count on through images, an image's grid rows take
  their column, row and image number in the last three streams (``contract/xdrope.py``). For text alone the streams
  are one and it is HunYuan's dense causal LM (``write_text_model``).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..contract import ImagePatches
from ..contract.xdrope import XDRopeSplicedScheme
from ..errors import AdapterError
from . import register
from .base import LoadedModel
from .qwen2_vl import PatchVisionTower, Qwen2VLAdapter, image_attention_mask, masked_attention, raster_pixels, \
    separate_heads
from .qwen3_vl import resampled_grid


class FramedPatchTower(PatchVisionTower):
    """HunYuanVL's vision transformer on rows of patches, as ``HunYuanVLVisionTransformer`` computes it on its flat
    sequence, up to its merger."""

    def embed(self, pixel_values, patch_positions, patch_mask):
        embeddings = self.tower.embeddings
        conv = embeddings.patch_embedding
        hidden = nn.functional.linear(pixel_values, conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)
        table = embeddings.position_embedding.weight[1:]  # the first row is a class token's, which no patch takes
        grid = resampled_grid(lambda index: nn.functional.embedding(index, table), embeddings.position_edge,
                              patch_positions, patch_mask, False)
        return hidden + grid.to(hidden.dtype)

    def forward(self, pixel_values, patch_positions, patch_mask):
        hidden = self.embed(pixel_values, patch_positions, patch_mask)
        mask = image_attention_mask(patch_mask)
        for layer in self.tower.layers:
            attn = layer.self_attn
            heads = separate_heads(attn, layer.layer_norm1(hidden))
            hidden = hidden + attn.o_proj(masked_attention(*heads, mask, attn.scaling))
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        return hidden


class FramedMergerProjector(nn.Module):
    """image_features [images, patches, width] (each merge block's ``block`` patches consecutive, row-major within it)
    -> image_embeds [images, blocks + 3, hidden]: each block's row, then the begin, newline and end rows that frame
    every image (``contract.xdrope``), as ``HunYuanVLVisionPatchMerger`` makes them."""

    def __init__(self, merger: nn.Module, block: int):
        super().__init__()
        self.merger, self.block = merger, block

    def forward(self, image_features):
        m = self.merger
        images, _, width = image_features.shape
        blocks = m.before_rms(image_features).reshape(images, -1, self.block * width)
        conv = m.proj_conv.weight  # [out, width, row, column]: a block's patches are (row, column, width) here
        hidden = nn.functional.linear(blocks, conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1), m.proj_conv.bias)
        hidden = nn.functional.linear(m.proj_act(hidden), m.proj_out.weight.flatten(1), m.proj_out.bias)
        frame = torch.stack([m.image_begin, m.mlp(m.image_newline), m.image_end])
        rows = torch.cat([m.mlp(hidden), frame.expand(images, -1, -1)], dim=1)
        return m.after_rms(rows)


@register
class HunYuanVLAdapter(Qwen2VLAdapter):
    name = "hunyuan_vl"
    model_types = ("hunyuan_vl",)
    model_classes = {"hunyuan_vl": ("HunYuanVLForConditionalGeneration", "HunYuanDenseV1Config")}
    description = ("Hugging Face HunYuanVLForConditionalGeneration (HunyuanOCR: a SigLIP tower on patches of any image "
                   "size + a merger that frames each image + a HunYuan dense LM with XD-RoPE positions)")
    raster_patches = True

    def load(self, path):
        loaded = super().load(path)
        vision = loaded.config.vision_config
        if getattr(vision, "interpolate_mode", "bilinear") != "bilinear":
            raise AdapterError(f"the vision tower of {path} resizes its position grid by {vision.interpolate_mode!r}; "
                               "only bilinear is exported")
        self._streams(loaded)
        return loaded

    def _image_token(self, loaded: LoadedModel) -> str:
        token = getattr(loaded.tokenizer, "image_token", None)
        if not token:
            raise AdapterError(f"the tokenizer in {loaded.path} names no image_token (HunYuanVLProcessor reads it and "
                               "its start and end tokens from the tokenizer): save the model's own tokenizer beside it")
        return token

    @staticmethod
    def _streams(loaded: LoadedModel) -> int:
        """Position streams of the LM's rotary: one per ``mrope_section`` (the last three column, row and image)."""
        sections = (loaded.config.text_config.rope_parameters or {}).get("mrope_section") or []
        if len(sections) < 3:
            raise AdapterError(f"the LM of {loaded.path} has rope_parameters.mrope_section {sections or 'unset'}: "
                               "HunYuanVL's positions need at least three sections (column, row, image)")
        return len(sections)

    def _patches(self, loaded: LoadedModel) -> ImagePatches:
        return dataclasses.replace(super()._patches(loaded), framed=True)

    def vision_modules(self, loaded: LoadedModel) -> tuple[nn.Module, nn.Module]:
        tower = loaded.model.model.vision_tower
        merge = int(loaded.config.vision_config.spatial_merge_size)
        return FramedPatchTower(tower), FramedMergerProjector(tower.patch_merger, merge * merge)

    def scheme(self, loaded: LoadedModel) -> XDRopeSplicedScheme:
        return XDRopeSplicedScheme(self.geometry(loaded), loaded.config.image_token_id,
                                   int(loaded.config.vision_config.spatial_merge_size), self._streams(loaded))

    def _reference_pixels(self, loaded: LoadedModel, pixel_values: dict) -> torch.Tensor:
        return raster_pixels(pixel_values)
