"""Mistral 3: Hugging Face ``Mistral3ForConditionalGeneration`` (Mistral Small 3.1 / 3.2 and their fine-tunes).

Pixtral's vision tower on images of any size: the image processor resizes each image within its longest edge
to whole merge blocks of patches and pads the batch to its largest (``pixel_values [images, 3, H, W]`` with
``image_sizes``); Hugging Face's tower cuts every image's patches out and runs them as one sequence whose
attention is cut per image, with 2-D rotary positions per patch. The image path reads one row of patches per
image instead (``contract.ImagePatches`` with ``patch``: the arrangement cuts them, in merge-block order, with
each patch's place and a mask): :class:`PixtralPatchTower` runs the tower's own layers on the padded rows, a patch
attending to the real patches of its image. The projector (RMSNorm, the merger of each ``merge x merge`` block,
two linears) reads each block's patches, consecutive in that order, as Hugging Face's unfold does; the rows of
padding it makes are dropped by the ``spliced_patches`` scheme. An image is written as its processor writes it:
a row of "[IMG]" per row of blocks, each followed by "[IMG_BREAK]", the last by "[IMG_END]".

The LM is a Mistral (or any causal LM) with ordinary positions.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn

from ..contract import DecoderGeometry, ImagePatches, PromptLayout
from ..contract.layout import PATCH_MASK, PATCH_POSITIONS
from ..contract.patches import PatchRowsScheme
from ..errors import AdapterError
from . import register
from .base import LoadedModel, Stage, VLMAdapter, chat_template_takes_parts, processor_setting, use_saved_chat_template
from .decoder import (SplicingDecoder, greedy_reference, save_language_model, spliced_decoder_stage, text_geometry)
from .llava import check_feature_layers
from .loading import load_hf_parts
from .qwen2_vl import image_attention_mask, patch_grids, patch_row_stages, rotary_attention, separate_heads


class PixtralPatchTower(nn.Module):
    """(pixel_values [images, patches, channels x patch x patch], patch_positions [images, patches, 2], patch_mask
    [images, patches]) -> the tower's hidden states at ``feature_layers`` (0: the embeddings, k: after layer k;
    several side by side) [images, patches, width], layer by layer as PixtralVisionModel computes them: the patch
    convolution as the matmul it is (kernel = stride = the patch), ``ln_pre``, then each layer up to the last one
    read with the axial rotary of the places given and a mask for the image's own real patches in place of Hugging
    Face's mask of blocks."""

    def __init__(self, tower: nn.Module, feature_layers: tuple[int, ...]):
        super().__init__()
        self.tower, self.feature_layers = tower, tuple(feature_layers)

    def forward(self, pixel_values, patch_positions, patch_mask):
        tower = self.tower
        conv = tower.patch_conv
        hidden = nn.functional.linear(pixel_values, conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)
        hidden = tower.ln_pre(hidden)
        cos, sin = self._angles(patch_positions)
        mask = image_attention_mask(patch_mask)
        states = [hidden]
        for layer in tower.transformer.layers[:max(self.feature_layers)]:  # the layers after the last read: not run
            hidden = hidden + self._attention(layer.attention, layer.attention_norm(hidden), cos, sin, mask)
            hidden = hidden + layer.feed_forward(layer.ffn_norm(hidden))
            states.append(hidden)
        picked = [states[i] for i in self.feature_layers]
        return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)

    def _angles(self, places):
        """(cos, sin) [images, 1, patches, head size]: PixtralRotaryEmbedding's - the rows' angles at the even
        frequencies, the columns' at the odd ones, side by side, twice."""
        rotary = self.tower.patch_positional_embedding
        freqs = places.unsqueeze(-1).float() * rotary.inv_freq  # [images, patches, (row, col), head / 2]
        quarter = freqs.shape[-1] // 2
        angles = torch.cat([freqs[..., 0, :quarter], freqs[..., 1, quarter:]], dim=-1)
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
        return angles.cos() * rotary.attention_scaling, angles.sin() * rotary.attention_scaling

    @staticmethod
    def _attention(attn: nn.Module, x, cos, sin, mask):
        return attn.o_proj(rotary_attention(*separate_heads(attn, x), cos, sin, mask, attn.scaling))


class MergedPatchProjector(nn.Module):
    """Mistral3MultiModalProjector on rows of patches: image_features [images, patches, width] -> image_embeds
    [images, patches / merge², hidden] (RMSNorm per patch, each block's ``merge²`` consecutive patches merged as
    Hugging Face's unfold lays them out - channel by channel, the block's patches row-major within each -, then the
    two linears)."""

    def __init__(self, projector: nn.Module, merge: int):
        super().__init__()
        self.projector, self.merge = projector, merge

    def forward(self, image_features):
        p = self.projector
        x = p.norm(image_features)
        images, patches, width = x.shape
        unit = self.merge ** 2
        blocks = x.reshape(images, patches // unit, unit, width).transpose(-1, -2).reshape(images, -1, width * unit)
        return p.linear_2(p.act(p.linear_1(p.patch_merger.merging_layer(blocks))))


@contextlib.contextmanager
def _layer_zero_from_the_end(config):
    """``vision_feature_layer`` 0 (the embeddings) counted from the end while Hugging Face's forward runs: transformers
    asks the tower for hidden states only where that index is truthy, so at 0 its own forward fails (the layer is the
    same)."""
    layer = getattr(config, "vision_feature_layer", None)  # None: a model that reads the last hidden state alone
    if layer == 0:
        config.vision_feature_layer = -(config.vision_config.num_hidden_layers + 1)
    try:
        yield
    finally:
        if layer is not None:
            config.vision_feature_layer = layer


@register
class Mistral3Adapter(VLMAdapter):
    name = "mistral3"
    model_types = ("mistral3",)
    description = ("Hugging Face Mistral3ForConditionalGeneration (Pixtral's tower on images of any size + patch "
                   "merger + a Mistral LM)")

    #: the Hugging Face class
    model_class = "Mistral3ForConditionalGeneration"

    def load(self, path: Path) -> LoadedModel:
        import transformers

        path = Path(path)
        model, tokenizer, image_processor = load_hf_parts(getattr(transformers, self.model_class), path)
        cfg = model.config
        loaded = LoadedModel(self, path, model, tokenizer, image_processor, cfg)
        use_saved_chat_template(tokenizer, path)  # the processor's (typed parts), not the tokenizer's text-only one
        self.check_tower_layers(loaded)
        self.check_projector_input(loaded)
        tokens = self._tokens(loaded)
        for name, token in tokens.items():
            if token not in tokenizer.get_vocab():
                raise AdapterError(f"the tokenizer in {path} has no {token!r} (the processor's {name}): save the "
                                   "model's own tokenizer beside it")
        if tokenizer.convert_tokens_to_ids(tokens["image_token"]) != cfg.image_token_id:
            raise AdapterError(f"the tokenizer in {path} makes {tokens['image_token']} the id "
                               f"{tokenizer.convert_tokens_to_ids(tokens['image_token'])} but the model's config says "
                               f"image_token_id {cfg.image_token_id}: save the model's own tokenizer beside it")
        saved = processor_setting(path, "patch_size")
        if saved is not None and int(saved) != cfg.vision_config.patch_size:
            raise AdapterError(f"the processor in {path} cuts patches of {saved} pixels but the vision tower takes "
                               f"{cfg.vision_config.patch_size}: save the model's own PixtralProcessor beside it")
        merge = processor_setting(path, "spatial_merge_size") or self.processor_merge
        if int(merge) != self._merge(loaded):
            raise AdapterError(f"the processor in {path} merges {merge} x {merge} patches per image token but the "
                               f"projector merges {self._merge(loaded)}: save the model's own PixtralProcessor")
        self._patches(loaded)  # its largest image must be known
        return loaded

    #: the processor's spatial_merge_size where none is saved (PixtralProcessor's)
    processor_merge = 1

    def check_tower_layers(self, loaded: LoadedModel) -> None:
        """The tower's layers the projector reads must exist."""
        check_feature_layers(loaded.config.vision_feature_layer, loaded.config.vision_config.num_hidden_layers,
                             loaded.path)

    def check_projector_input(self, loaded: LoadedModel) -> None:
        """The projector must take what the tower gives it: one layer (Mistral 3's norm and merger are one layer
        wide, so Hugging Face's own forward fails on several)."""
        layer = loaded.config.vision_feature_layer
        if isinstance(layer, (list, tuple)):
            raise AdapterError(f"vision_feature_layer {list(layer)} in {loaded.path / 'config.json'}: the Mistral 3 "
                               "projector's norm and merger take one layer's width, so Hugging Face's own forward "
                               "fails on several layers; set one layer")

    @staticmethod
    def _tokens(loaded: LoadedModel) -> dict[str, str]:
        """The processor's image, row-break and end tokens (PixtralProcessor's defaults where none is saved)."""
        defaults = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
        return {name: processor_setting(loaded.path, name) or token for name, token in defaults.items()}

    def _patches(self, loaded: LoadedModel) -> ImagePatches:
        """The image arrangement: images resized within the processor's longest edge to whole ``patch x merge``
        blocks (PixtralProcessor passes its image processor that block as its patch size), cut into patches."""
        cfg, processor = loaded.config, loaded.image_processor
        patch, merge = int(cfg.vision_config.patch_size), self._merge(loaded)
        size = getattr(processor, "size", None) or {}
        longest = size.get("longest_edge") if hasattr(size, "get") else getattr(size, "longest_edge", None)
        if not longest:
            raise AdapterError(f"the image processor in {loaded.path} ({type(processor).__name__}) sets no longest "
                               "edge: save the model's own PixtralImageProcessor beside it")
        block = patch * merge
        side = math.ceil(int(longest) / block) * merge  # patches per side of the largest image
        tokens = self._tokens(loaded)
        return ImagePatches(merge=merge, max_patches=side * side, patch=patch, options=self._processor_options(block),
                            row_end=tokens.get("image_break_token", ""), end=tokens.get("image_end_token", ""))

    @staticmethod
    def _processor_options(block: int) -> dict:
        """What the processor passes its image processor: PixtralProcessor its block of ``patch x merge`` pixels as
        the patch size, so images are resized to whole blocks."""
        return {"patch_size": {"height": block, "width": block}}

    @staticmethod
    def _feature_layers(loaded: LoadedModel) -> tuple[int, ...]:
        """The hidden states the projector reads: 0 the embeddings, k after layer k."""
        layer, count = loaded.config.vision_feature_layer, loaded.config.vision_config.num_hidden_layers + 1
        return tuple(int(i) % count for i in (layer if isinstance(layer, (list, tuple)) else [layer]))

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        m, cfg = loaded.model, loaded.config
        patches = self._patches(loaded)
        tower = PixtralPatchTower(self._tower(loaded), self._feature_layers(loaded))
        # two images as the processor gives them: 4 x 4 merge blocks and 2 x 4, padded to the first
        block = patches.patch * patches.merge
        sizes = [(4 * block, 4 * block), (2 * block, 4 * block)]
        pixels = torch.randn(2, cfg.vision_config.num_channels, *sizes[0], generator=torch.Generator().manual_seed(0))
        scheme = self.scheme(loaded)
        text = m.model.language_model
        decoder = SplicingDecoder(text.get_input_embeddings(), text, m.lm_head, cfg.image_token_id,
                                  scheme.geometry.num_layers)
        return [*patch_row_stages(tower, self.projector(loaded, patches.merge), patches,
                                  {"pixel_values": pixels.numpy(), "image_sizes": sizes}),
                spliced_decoder_stage(decoder, scheme)]

    @staticmethod
    def _tower(loaded: LoadedModel) -> nn.Module:
        return loaded.model.model.vision_tower

    @staticmethod
    def projector(loaded: LoadedModel, merge: int) -> nn.Module:
        return MergedPatchProjector(loaded.model.model.multi_modal_projector, merge)

    @staticmethod
    def _merge(loaded: LoadedModel) -> int:
        """Patches per side of the block one image token merges (the projector's)."""
        return int(loaded.config.spatial_merge_size)

    def scheme(self, loaded: LoadedModel) -> PatchRowsScheme:
        return PatchRowsScheme(self.geometry(loaded), loaded.config.image_token_id, self._merge(loaded))

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        patches = self._patches(loaded)
        token = self._tokens(loaded)["image_token"]
        # the chat template writes the image token once per image part; the processor puts the image's rows of
        # tokens, breaks and end in its place (a raw prompt's too)
        return PromptLayout(kind="inline", image_token_id=loaded.config.image_token_id,
                            tokens_per_image=patches.most_tokens(), image_token=token,
                            chat_parts=chat_template_takes_parts(loaded.tokenizer, token),
                            images_where_written=True, image_tiles=patches)

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        return text_geometry(loaded.config.text_config, loaded.model.model.language_model)

    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        """HF generate on our prompt ids with the processor's own inputs: the images padded to the largest and
        their sizes, rebuilt from the image path's rows of patches (the real ones, at their places)."""
        if pixel_values is None:
            return greedy_reference(loaded.model, input_ids, None, max_new_tokens, eos_token_ids)
        patch = int(loaded.config.vision_config.patch_size)
        real = pixel_values[PATCH_MASK].bool()
        places = pixel_values[PATCH_POSITIONS]
        rows = pixel_values["pixel_values"]
        grids = patch_grids(pixel_values)
        height, width = max(h for h, _ in grids), max(w for _, w in grids)
        channels = rows.shape[-1] // patch ** 2
        images = torch.zeros(len(grids), channels, height * patch, width * patch)
        for k, (h, w) in enumerate(grids):
            cells = torch.zeros(h, w, rows.shape[-1])
            cells[places[k][real[k]][:, 0], places[k][real[k]][:, 1]] = rows[k][real[k]]
            images[k, :, :h * patch, :w * patch] = (cells.reshape(h, w, channels, patch, patch)
                                                    .permute(2, 0, 3, 1, 4).reshape(channels, h * patch, w * patch))
        sizes = torch.tensor([[h * patch, w * patch] for h, w in grids])
        with _layer_zero_from_the_end(loaded.config):
            return greedy_reference(loaded.model, input_ids, images, max_new_tokens, eos_token_ids,
                                    image_sizes=sizes)

    def write_text_model(self, loaded: LoadedModel, out: Path) -> Path:
        return save_language_model(loaded, out)
