"""Cosmos3 Edge: ``Cosmos3EdgeForConditionalGeneration`` (NVIDIA's: a SigLIP2 tower on patches of any image size, a
merging projector and a Llama-style LM with interleaved multimodal rotary positions).

Qwen2-VL's image path, prompt and positions (``adapters/qwen2_vl.py``: rows of patches of any image size in merge-block
order, one image token per merge block, M-RoPE made by the ``spliced_mrope`` scheme, which ``get_rope_index``
computes the same way for images) with its own parts, each followed here as Hugging Face computes it:

- the image processor is GLM-4V's (``smart_resize`` bounds frames x height x width; one frame per patch here) with
  each patch flattened as (row, column, channel): the patch embedding, a linear layer, reads it as given;
- the embedding adds the tower's learned ``side x side`` position grid resized to each image's grid of patches by
  ``F.interpolate`` (bilinear, half-pixel centres, antialiased): :func:`antialiased_grid`, the same weights as a
  matrix, from the image's own rows and columns read off ``patch_positions`` and ``patch_mask``;
- SigLIP2's encoder layers (q/k/v apart, LayerNorms, no rotary) attend within each image; a final LayerNorm;
- the projector norms each patch, joins each ``merge x merge`` block and runs a GELU MLP (``PatchMergerProjector``);
- the LM is Llama's attention with Qwen3-VL's interleaved M-RoPE and a two-layer ReLU² MLP without a gate; for text
  alone the three streams are one and it is an Arcee (AFM) LM, Llama with that MLP (``write_text_model``).

Video inputs are not supported (the processor writes a timestamp before each frame).
"""
from __future__ import annotations

import torch
from torch import nn

from . import register
from .base import LoadedModel
from .glm4v import Glm4vAdapter
from .qwen2_vl import (PatchMergerProjector, PatchVisionTower, Qwen2VLAdapter, image_attention_mask, image_grid_sizes,
                       masked_attention, separate_heads)


def antialiased_grid(table: nn.Embedding, side: int, patch_positions, patch_mask):
    """[images, patches, width]: a learned ``side x side`` grid of position embeddings (``table``, rows outer) resized
    to each image's grid of patches as ``F.interpolate(mode="bilinear", align_corners=False, antialias=True)`` does,
    read at ``patch_positions``. That resize is separable: along an axis of ``n`` places each place ``i`` weighs grid
    entry ``j`` by a triangle around its centre ``(i + 0.5) x side / n``, widened by the shrink ``side / n`` where
    the grid shrinks, normalized (PyTorch's antialiased kernel; plain half-pixel bilinear where it grows). A patch's
    embedding is the table weighed by its row's and its column's weights: a matmul, exact for every size, where
    ONNX's antialiased Resize is not in TensorRT."""
    size = image_grid_sizes(patch_positions, patch_mask).float()  # [images, 1, (rows, columns)]
    rows, columns = size[..., 0], size[..., 1]  # [images, 1]
    places = patch_positions.float()
    # PyTorch's antialiased resize to one column and another number of rows gives every row the first row's values
    # (its pass over the rows reads a width-1 image as one row); Hugging Face's embeddings have them so
    places = torch.stack([torch.where((columns == 1) & (rows != side), 0.0, places[..., 0]), places[..., 1]], -1)
    scale = side / size  # grid entries per place
    centre = (places + 0.5) * scale  # [images, patches, 2]
    entries = torch.arange(side, device=places.device, dtype=torch.float32) + 0.5
    weights = (1 - ((entries - centre.unsqueeze(-1)) / scale.clamp(min=1).unsqueeze(-1)).abs()).clamp(min=0)
    weights = weights / weights.sum(-1, keepdim=True)  # [images, patches, (row, column), side]
    weight = (weights[..., 0, :, None] * weights[..., 1, None, :]).flatten(-2)  # [images, patches, side²]
    return weight @ table.weight


class Siglip2PatchTower(PatchVisionTower):
    """Cosmos3 Edge's SigLIP2 tower on rows of patches (``contract.ImagePatches``), as ``Cosmos3EdgeVisionModel``
    computes it on its flat sequence: each patch attends to the real patches of its image (a mask in place of the
    per-image lengths Hugging Face reads at run time)."""

    def embed(self, pixel_values, patch_positions, patch_mask):
        embeddings = self.tower.embeddings
        hidden = embeddings.patch_embedding(pixel_values)
        grid = antialiased_grid(embeddings.position_embedding, embeddings.position_embedding_size, patch_positions,
                                patch_mask)
        return hidden + grid.to(hidden.dtype)

    def forward(self, pixel_values, patch_positions, patch_mask):
        hidden = self.embed(pixel_values, patch_positions, patch_mask)
        mask = image_attention_mask(patch_mask)
        for layer in self.tower.encoder.layers:
            attn = layer.self_attn
            heads = separate_heads(attn, layer.layer_norm1(hidden))
            hidden = hidden + attn.out_proj(masked_attention(*heads, mask, attn.scale))
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
        return self.tower.post_layernorm(hidden)


@register
class Cosmos3EdgeAdapter(Qwen2VLAdapter):
    name = "cosmos3_edge"
    model_types = ("cosmos3_edge",)
    model_classes = {"cosmos3_edge": ("Cosmos3EdgeForConditionalGeneration", "ArceeConfig")}
    # the two-layer MLP's projections, as Arcee names them
    text_lm_renamed = {".mlp.fc1.": ".mlp.up_proj.", ".mlp.fc2.": ".mlp.down_proj."}
    description = ("Hugging Face Cosmos3EdgeForConditionalGeneration (Cosmos3 Edge: a SigLIP2 tower with an "
                   "antialiased resized position grid on patches of any image size + merging projector + a Llama-style "
                   "LM with a ReLU² MLP and interleaved multimodal rotary positions)")
    # its image processor is GLM-4V's: smart_resize bounds frames x height x width
    _largest_image_pixels = staticmethod(Glm4vAdapter._largest_image_pixels)

    def vision_modules(self, loaded: LoadedModel) -> tuple[nn.Module, nn.Module]:
        model = loaded.model.model
        return Siglip2PatchTower(model.visual), PatchMergerProjector(model.projector, loaded.config.text_config.hidden_size)
