"""Qwen3-VL: ``Qwen3VLForConditionalGeneration`` and ``Qwen3VLMoeForConditionalGeneration`` (its LM a mixture of
experts).

Qwen2-VL's image path and prompt (``adapters/qwen2_vl.py``: rows of patches of any image size, one image token
per merge block, multimodal rotary positions made by the scheme) with three differences, each followed here as
Hugging Face computes it:

- the tower adds a learned square grid of position embeddings, resampled to each image's grid of patches
  (bilinear, corners aligned) - from the image's own rows and columns, read off ``patch_positions`` and
  ``patch_mask`` in the graph, so images of different sizes share one batch;
- deepstack: the outputs of some vision blocks (``deepstack_visual_indexes``) go through their own mergers and are
  added to the LM's hidden states at the image positions after its first layers, one block's per layer. The
  projector gives each image row its embedding and these features side by side (``hidden x (1 + levels)`` wide;
  the ``spliced_mrope_deepstack`` scheme), and the decoder adds each level to its layer's output;
- the LM is Qwen3's or Qwen3-MoE's (q/k norms) with interleaved M-RoPE, which its own rotary computes from the three
  streams the scheme gives; for text alone the streams are one and it is a plain Qwen3 (Qwen3-MoE).

Video inputs are not supported.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from ..contract.mrope import DeepstackMRopeScheme
from ..errors import AdapterError
from . import register
from .base import LoadedModel
from .decoder import SplicingDecoder, image_rows
from .qwen2_vl import PatchVisionTower, Qwen2VLAdapter, image_grid_sizes


def resampled_grid(table: nn.Embedding, side: int, patch_positions, patch_mask, corners_aligned: bool):
    """[images, patches, width]: a learned ``side x side`` grid of position embeddings (``table``, rows outer)
    resampled bilinearly to each image's grid of patches at ``patch_positions`` - the four nearest grid entries of
    a patch's place scaled into the grid, by their weights, with corners aligned (Qwen3-VL's) or at half-pixel
    centres (PaddleOCR-VL's), out-of-grid taps clamped to the border: Hugging Face's
    ``get_vision_interpolation_indices_and_weights``, same float ops. An image's grid is read off its own rows
    (``qwen2_vl.image_grid_sizes``)."""
    grid = image_grid_sizes(patch_positions, patch_mask)
    places = patch_positions.to(torch.float32)
    if corners_aligned:
        source = places * (side - 1) / torch.clamp(grid - 1, min=1)  # [images, patches, 2]
    else:
        source = (places + 0.5) * side / grid - 0.5
    floor = torch.floor(source)
    offsets = torch.arange(2, device=source.device)
    taps = (floor.long().unsqueeze(-1) + offsets).clamp(0, side - 1)  # [images, patches, (row, column), 2]
    weights = (1 - (source.unsqueeze(-1) - floor.unsqueeze(-1) - offsets).abs()).clamp(min=0)
    index = (taps[..., 0, :, None] * side + taps[..., 1, None, :]).flatten(-2)  # the 2 x 2 taps, rows outer
    weight = (weights[..., 0, :, None] * weights[..., 1, None, :]).flatten(-2)
    return (table(index) * weight.unsqueeze(-1)).sum(-2)


class LearnedGridPatchTower(PatchVisionTower):
    """:class:`PatchVisionTower` whose patch embeddings get the tower's learned ``side x side`` position grid
    resampled to each image's grid (:func:`resampled_grid`, corners aligned)."""

    def embed(self, pixel_values, patch_positions, patch_mask):
        hidden = super().embed(pixel_values, patch_positions, patch_mask)
        grid = resampled_grid(self.tower.pos_embed, self.tower.num_grid_per_side, patch_positions, patch_mask, True)
        return hidden + grid.to(hidden.dtype)


class DeepstackMergerProjector(nn.Module):
    """image_features [images, patches, width x (1 + levels)] (the tower's last hidden state, then each kept
    block's: ``LearnedGridPatchTower(kept_blocks=...)``) -> image_embeds [images, patches / merge², hidden x (1 +
    levels)]: the merger's rows, then each level's own merger's."""

    def __init__(self, merger: nn.Module, level_mergers: list[nn.Module], hidden_size: int):
        super().__init__()
        self.mergers = nn.ModuleList([merger, *level_mergers])
        self.hidden_size = hidden_size

    def forward(self, image_features):
        images, patches, width = image_features.shape
        parts = image_features.reshape(images * patches, len(self.mergers), width // len(self.mergers)).unbind(1)
        rows = torch.cat([merger(part.contiguous()) for merger, part in zip(self.mergers, parts)], dim=-1)
        return rows.reshape(images, -1, self.hidden_size * len(self.mergers))


class DeepstackDecoder(SplicingDecoder):
    """The spliced decoder whose image rows carry ``levels`` deepstack features after the embedding (``hidden x
    (1 + levels)`` wide): the embedding replaces the placeholder as in :class:`SplicingDecoder`, and level ``l``
    is added to the output of the text model's layer ``l`` at that position, as Qwen3-VL's text model adds its
    ``deepstack_visual_embeds`` (text positions get a zero row: unchanged). Added by forward hooks held for one
    call, so Hugging Face's own forward runs as it is."""

    def __init__(self, embed_tokens: nn.Module, text_model: nn.Module, lm_head: nn.Module, image_token_id: int,
                 num_layers: int, levels: int, hidden_size: int):
        super().__init__(embed_tokens, text_model, lm_head, image_token_id, num_layers)
        self.levels, self.hidden_size = levels, hidden_size

    def forward(self, input_ids, image_embeds, attention_mask, position_ids, *past):
        width = self.hidden_size
        index = image_rows(input_ids, image_embeds, self.image_token_id).reshape(-1)
        hooks = []
        for level, layer in enumerate(self.text_model.layers[:self.levels]):
            rows = image_embeds[:, width * (level + 1):width * (level + 2)]
            table = torch.cat([rows.new_zeros(1, width), rows], dim=0)  # row 0: what text positions get
            added = table.index_select(0, index).reshape(*input_ids.shape, width)
            hooks.append(layer.register_forward_hook(functools.partial(_add_to_output, added=added)))
        try:
            return super().forward(input_ids, image_embeds[:, :width], attention_mask, position_ids, *past)
        finally:
            for hook in hooks:
                hook.remove()


def _add_to_output(module, args, output, *, added):
    return output + added.to(output.dtype)


@register
class Qwen3VLAdapter(Qwen2VLAdapter):
    name = "qwen3_vl"
    model_types = ("qwen3_vl", "qwen3_vl_moe")
    model_classes = {"qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3Config"),
                     "qwen3_vl_moe": ("Qwen3VLMoeForConditionalGeneration", "Qwen3MoeConfig")}
    # Qwen3-VL-MoE's router always renormalizes its top k experts' weights; Qwen3-MoE's does where its config says
    text_lm_settings = {"qwen3_vl_moe": {"norm_topk_prob": True}}
    description = ("Hugging Face Qwen3VLForConditionalGeneration / Qwen3VLMoeForConditionalGeneration (a ViT with a "
                   "resampled position grid on patches of any image size + patch merger + deepstack features added "
                   "to the first LM layers + a Qwen3 or Qwen3-MoE LM with interleaved multimodal rotary positions)")

    def load(self, path):
        loaded = super().load(path)
        visual = loaded.model.model.visual
        how = (getattr(visual, "interpolation_mode", "bilinear"), getattr(visual, "interpolation_align_corners", True))
        if how != ("bilinear", True):
            raise AdapterError(f"the vision tower in {path} resamples its position grid by {how[0]} (align_corners "
                               f"{how[1]}); the exported tower does it bilinearly with corners aligned, as Qwen3-VL "
                               "does: not supported")
        return loaded

    @staticmethod
    def _kept_blocks(loaded: LoadedModel) -> tuple[int, ...]:
        """The vision blocks whose outputs are deepstack features, in block order (Hugging Face collects them in
        that order, each through the merger at its place in ``deepstack_visual_indexes``)."""
        return tuple(sorted(set(int(i) for i in loaded.model.model.visual.deepstack_visual_indexes)))

    def vision_modules(self, loaded: LoadedModel) -> tuple[nn.Module, nn.Module]:
        visual = loaded.model.model.visual
        kept = self._kept_blocks(loaded)
        order = [int(i) for i in visual.deepstack_visual_indexes]
        mergers = [visual.deepstack_merger_list[order.index(block)] for block in kept]
        return (LearnedGridPatchTower(visual, kept_blocks=kept),
                DeepstackMergerProjector(visual.merger, mergers, loaded.config.text_config.hidden_size))

    def decoder(self, loaded: LoadedModel, scheme: DeepstackMRopeScheme) -> SplicingDecoder:
        text = loaded.model.model.language_model
        return DeepstackDecoder(text.get_input_embeddings(), text, loaded.model.lm_head, loaded.config.image_token_id,
                                scheme.geometry.num_layers, scheme.levels, scheme.geometry.hidden_size)

    def scheme(self, loaded: LoadedModel) -> DeepstackMRopeScheme:
        return DeepstackMRopeScheme(self.geometry(loaded), loaded.config.image_token_id,
                                    int(loaded.config.vision_config.spatial_merge_size),
                                    levels=len(self._kept_blocks(loaded)))
