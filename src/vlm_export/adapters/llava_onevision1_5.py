"""LLaVA-OneVision-1.5: ``LlavaOnevision15ForConditionalGeneration`` (a RiceViT tower + a norm-and-merge projector +
a Qwen3 LM).

Qwen2-VL's image processor and prompt (patches of any image size, here of one frame each, one ``<|image_pad|>`` per
``merge x merge`` block, ``contract.ImagePatches``). The tower (RiceViT) embeds each patch by a bias-free
convolution, puts a learned class token before each image's patches - with a rotary angle of its own, learned
(``class_pos_emb``), where the patches get the axial rotary of their (row, column) - LayerNorms the whole, runs
LayerNorm + GELU-MLP blocks whose attention sees each image alone, and drops the class token again:
:class:`ClassTokenPatchTower` does the same on the padded rows of patches, the class token in front of each row.
The merger norms each patch and joins each merge block into one row. As in EXAONE 4.5, whose model it extends, the
LM reads one stream of positions (``spliced_patches``). Video inputs are not supported.
"""
from __future__ import annotations

import torch
from torch import nn

from . import register
from .base import LoadedModel
from .qwen2_vl import BlockMergeProjector, PatchVisionTower, Qwen2VLAdapter, image_attention_mask


class ClassTokenPatchTower(PatchVisionTower):
    """RiceViT on rows of patches (``contract.ImagePatches``): the class token and its angle put before each image's
    row, which it attends with, and dropped from the output."""

    def forward(self, pixel_values, patch_positions, patch_mask):
        tower = self.tower
        patches = self.embed(pixel_values, patch_positions, patch_mask)
        images = patches.shape[0]
        cls = tower.cls_embeddings
        hidden = torch.cat([cls.class_embedding.to(patches.dtype).expand(images, 1, -1), patches], dim=1)
        cos, sin = self._angles(patch_positions)  # [images, 1, patches, head size]
        angle = torch.cat([cls.class_pos_emb, cls.class_pos_emb], dim=-1).float()  # [1, head size]
        cos = torch.cat([angle.cos().expand(images, 1, 1, -1), cos], dim=2)
        sin = torch.cat([angle.sin().expand(images, 1, 1, -1), sin], dim=2)
        mask = image_attention_mask(torch.cat([torch.ones_like(patch_mask[:, :1]), patch_mask], dim=1))
        hidden = tower.pre_layernorm(hidden)
        for block in tower.blocks:
            hidden = hidden + self._attention(block.attn, block.norm1(hidden), (cos, sin), mask)
            hidden = hidden + block.mlp(block.norm2(hidden))
        return hidden[:, 1:]


@register
class LlavaOnevision15Adapter(Qwen2VLAdapter):
    name = "llava_onevision1_5"
    model_types = ("llava_onevision1_5",)
    model_classes = {"llava_onevision1_5": ("LlavaOnevision15ForConditionalGeneration", "Qwen3Config")}
    multimodal_positions = False
    description = ("Hugging Face LlavaOnevision15ForConditionalGeneration (RiceViT with a class token per image on "
                   "patches of any image size + a norm-and-merge projector + a Qwen3 LM with one-stream positions)")

    def vision_modules(self, loaded: LoadedModel) -> tuple[nn.Module, nn.Module]:
        visual = loaded.model.model.visual
        # the merger norms each patch, then joins a block (Qwen3-VL's merger without its norm after the join)
        merger = BlockMergeProjector(visual.merger, "norm", int(loaded.config.vision_config.spatial_merge_size) ** 2,
                                     ("linear_fc1", "act_fn", "linear_fc2"))
        return ClassTokenPatchTower(visual), merger
