"""LFM3-VL: ``Lfm3VlForConditionalGeneration``.

Qwen2-VL's image processor and prompt (patches of any image size, one ``<|image_pad|>`` per ``merge x merge`` block,
``contract.ImagePatches``), a vision tower of its own and an LFM3 LM with plain (one-stream) rotary positions, so the
scheme is ``spliced_patches`` (each image's real rows, in order).

The tower mixes patches two ways: gated depthwise ``k x k`` convolutions over each image's grid of patches, and
bidirectional grouped-query attention with per-head q/k norms and an axial rotary. Hugging Face reshapes each image to
its grid by sizes read at run time; :class:`ConvAttentionPatchTower` runs the same layers on the padded rows of
patches: a convolution tap reads the patch at its offset in the grid by arithmetic on the patch's place (patches come
block by block, as the processor gives them) and zero past the grid's edges, the attention is masked to the image's
real patches. The projector norms each patch, then merges each block of ``merge²`` consecutive patches.

The LM is a hybrid (``adapters/hybrid.py``): gated short convolutions (``in_proj`` to B, C, x; a causal depthwise
convolution of ``conv_L_cache`` taps over B·x; times C; ``out_proj``), whose state is the last ``conv_L_cache - 1``
inputs of the convolution, beside full and sliding-window attention layers (K/V caches; the window is the mask's).

Video inputs are not supported.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..contract import DecoderGeometry
from ..contract.patches import PatchRowsScheme
from ..errors import AdapterError
from . import register
from .base import LoadedModel
from .decoder import SplicingDecoder
from .hybrid import FULL, SLIDING, HybridDecoder, Mixer, hybrid_geometry
from .qwen2_vl import (BlockMergeProjector, Qwen2VLAdapter, _rotate_half, image_attention_mask, image_grid_sizes,
                       masked_attention)


def short_conv(module: nn.Module, hidden_states, mask, conv_state):
    """(output, the new convolution window) of one ``Lfm3ShortConv`` on ``hidden_states`` [batch, sequence, hidden]
    whose real tokens ``mask`` [batch, sequence] marks, after ``conv_state`` [batch, hidden, taps - 1] (the
    convolution's inputs before them; zeros before a prompt). Hugging Face's forward in a form that exports for any
    length; a padded position's convolution input is zero (Hugging Face zeroes its hidden state only, which an
    ``in_proj`` bias would undo), so a left-padded row computes what it computes alone."""
    real = mask[:, None, :].to(hidden_states.dtype)
    b, c, x = module.in_proj(hidden_states * real.transpose(1, 2)).transpose(-1, -2).chunk(3, dim=-2)
    window = torch.cat([conv_state.to(x.dtype), b * x * real], dim=-1)
    new_conv = window[:, :, window.shape[-1] - (module.conv_kernel_size - 1):]
    conv = module.conv
    mixed = F.conv1d(window, conv.weight, conv.bias, groups=window.shape[1])
    return module.out_proj((c * mixed).transpose(-1, -2)), new_conv


def _short_conv_states(text_cfg) -> list[tuple[str, tuple[int, ...]]]:
    taps = int(text_cfg.conv_L_cache)
    if taps < 2:
        raise AdapterError(f"conv_L_cache is {taps}: a causal convolution of one tap keeps no state, which "
                           "vlm-export's decoder does not take; not supported")
    return [("conv", (int(text_cfg.hidden_size), taps - 1))]


#: LFM3's convolution layers (``layer.conv``)
SHORT_CONV = {"conv": Mixer("conv", short_conv, _short_conv_states)}


class ConvAttentionPatchTower(nn.Module):
    """(pixel_values [images, patches, channels x frames x patch x patch], patch_positions [images, patches, 2],
    patch_mask [images, patches]: ``contract.ImagePatches``, each image's patches block by block) -> the tower's
    last hidden state [images, patches, width], layer by layer as Hugging Face's ``Lfm3VlVisionModel`` computes it."""

    def __init__(self, tower: nn.Module, merge: int):
        super().__init__()
        self.tower, self.merge = tower, int(merge)

    def forward(self, pixel_values, patch_positions, patch_mask):
        tower = self.tower
        hidden = tower.embedding_norm(tower.patch_embed(pixel_values))
        freqs = (patch_positions.unsqueeze(-1).float() * tower.rotary_pos_emb.inv_freq).flatten(-2)
        angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(2)  # [images, patches, 1, head size]
        rotary = (angles.cos() * tower.rotary_pos_emb.attention_scaling,
                  angles.sin() * tower.rotary_pos_emb.attention_scaling)
        mask = image_attention_mask(patch_mask)
        taps = None
        for layer in tower.layers:
            x = layer.operator_norm(hidden)
            if layer.is_attention_layer:
                out = self._attention(layer.self_attn, x, rotary, mask)
            else:
                if taps is None:  # every convolution layer has the same kernel
                    taps = self._taps(patch_positions, patch_mask, layer.conv.spatial_conv.kernel_size)
                out = self._convolution(layer.conv, x, *taps)
            hidden = hidden + out
            hidden = hidden + layer.feed_forward(layer.ffn_norm(hidden))
        return hidden

    def _taps(self, patch_positions, patch_mask, kernel):
        """(index [images, patches x taps], inside [images, patches, taps, 1]): for each patch and each tap of a
        ``kernel`` convolution centred on it, the row of the patch the tap reads, and whether that patch is in the
        image's grid (outside: the convolution's zero padding)."""
        grid = image_grid_sizes(patch_positions, patch_mask)  # [images, 1, (rows, columns)]
        rows, columns = grid[..., 0:1], grid[..., 1:2]  # [images, 1, 1]
        offsets = torch.tensor([(i - kernel[0] // 2, j - kernel[1] // 2) for i in range(kernel[0])
                                for j in range(kernel[1])], dtype=patch_positions.dtype)
        place = patch_positions.unsqueeze(2) + offsets  # [images, patches, taps, 2]
        row, column = place[..., 0], place[..., 1]
        inside = (row >= 0) & (row < rows) & (column >= 0) & (column < columns) & patch_mask.bool().unsqueeze(-1)
        row, column, m = row.clamp(min=0), column.clamp(min=0), self.merge
        # the processor's order: merge blocks row by row, the patches of each block row by row. (Truncating
        # division: the same on these non-negative places, and one ONNX Div, where floor division exports sign
        # tests of booleans that TensorRT's Equal refuses.)
        blocks = torch.div(row, m, rounding_mode="trunc"), torch.div(column, m, rounding_mode="trunc")
        per_row = torch.div(columns, m, rounding_mode="trunc")
        index = (blocks[0] * per_row + blocks[1]) * (m * m) + (row - blocks[0] * m) * m + column - blocks[1] * m
        index = torch.where(inside, index, 0).clamp(max=patch_mask.shape[1] - 1)
        return index.flatten(1), inside.unsqueeze(-1)

    @staticmethod
    def _convolution(conv: nn.Module, x, index, inside):
        """Hugging Face's ``Lfm3VlVisionShortConv``: an input-gated depthwise convolution over the grid, gated
        again, projected."""
        input_gate, output_gate, values = conv.in_proj(x).chunk(3, dim=-1)
        gated = input_gate * values
        images, patches, width = gated.shape
        read = torch.gather(gated, 1, index.unsqueeze(-1).expand(-1, -1, width)).reshape(images, patches, -1, width)
        weight = conv.spatial_conv.weight.reshape(width, -1).transpose(0, 1)  # [taps, width], taps row-major
        mixed = (torch.where(inside, read, 0.0) * weight).sum(dim=2)
        return conv.out_proj(output_gate * mixed)

    @staticmethod
    def _attention(attn: nn.Module, x, rotary, mask):
        images, patches, _ = x.shape
        q = attn.q_norm(attn.q_proj(x).reshape(images, patches, -1, attn.head_dim))
        k = attn.k_norm(attn.k_proj(x).reshape(images, patches, -1, attn.head_dim))
        v = attn.v_proj(x).reshape(images, patches, -1, attn.head_dim)
        cos, sin = rotary
        q = (q.float() * cos + _rotate_half(q.float()) * sin).to(q.dtype)
        k = (k.float() * cos + _rotate_half(k.float()) * sin).to(k.dtype)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [images, heads, patches, head size]
        groups = attn.num_key_value_groups
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return attn.out_proj(masked_attention(q, k, v, mask, attn.scaling))


@register
class Lfm3VlAdapter(Qwen2VLAdapter):
    name = "lfm3_vl"
    model_types = ("lfm3_vl",)
    model_classes = {"lfm3_vl": ("Lfm3VlForConditionalGeneration", "Lfm3Config")}
    multimodal_positions = False
    description = ("Hugging Face Lfm3VlForConditionalGeneration (Qwen2-VL's patches of any image size, a vision tower "
                   "of gated grid convolutions and attention, a norm + merge projector, and an LFM3 LM of gated short "
                   "convolutions beside full and sliding-window attention)")

    def vision_modules(self, loaded: LoadedModel) -> tuple[nn.Module, nn.Module]:
        model = loaded.model.model
        return (ConvAttentionPatchTower(model.vision_tower, loaded.config.vision_config.spatial_merge_size),
                BlockMergeProjector(model.multi_modal_projector, "layer_norm",
                                    int(loaded.config.vision_config.spatial_merge_size) ** 2))

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        text = loaded.config.text_config
        return hybrid_geometry(text, getattr(text, "max_position_embeddings", None), SHORT_CONV, (FULL, SLIDING))

    def decoder(self, loaded: LoadedModel, scheme: PatchRowsScheme) -> SplicingDecoder:
        text = loaded.model.model.language_model
        return HybridDecoder(text.get_input_embeddings(), text, loaded.model.lm_head, loaded.config.image_token_id,
                             loaded.config.text_config.layer_types, SHORT_CONV)
