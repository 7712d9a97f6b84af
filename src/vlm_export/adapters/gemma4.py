"""Gemma 4: Hugging Face ``Gemma4ForConditionalGeneration`` (images and text; its audio and video inputs are not
supported).

The image processor resizes each image to whole ``k x k`` cells of patches (``k`` the tower's
``pooling_kernel_size``) within ``max_soft_tokens`` cells and gives its patches row-major, padded, with their (x, y)
places (``contract.ImagePatches``, merge ``k``, read in the order of cells). The tower adds a learned 2-D position
embedding, attends over the image's real patches with a 2-D rotary, and averages each cell's ``k²`` patches into
one soft token (Hugging Face pools by the places; :class:`CellPoolTower` averages each run of ``k²`` consecutive
patches - the same cells, in the same row-major order); the projector (``embed_vision``) norms and projects them.
Each image is written as the begin-of-image token, a soft token per cell, the end-of-image token: the
``spliced_patches`` scheme takes each image's real rows, in order.

The text model differs from Gemma 3's in three ways the decoder carries (:class:`Gemma4Decoder`):

* its full-attention layers may have fewer, wider K/V heads than its sliding ones (``global_head_dim``,
  ``num_global_key_value_heads``, and with ``attention_k_eq_v`` values projected by the keys' weights):
  ``DecoderGeometry.layer_kv``;
* its last ``num_kv_shared_layers`` layers keep no cache: each reads the K/V of the last earlier layer of its
  kind, which the decoder has in hand (that layer's cache, grown by the call), so only the other layers' K/V are
  the decoder's state;
* per-layer input embeddings (``hidden_size_per_layer_input``): a second embedding of the text ids (image
  placeholders as the pad id), inside the decoder like the first;

and, where ``use_bidirectional_attention`` is "vision", an image's soft tokens attend to each other both ways on
the sliding layers only (``create_masks_for_vision_model``; the full layers stay causal).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..contract import DecoderGeometry, ImagePatches, PromptLayout
from ..contract.patches import PatchRowsScheme
from ..errors import AdapterError
from . import register
from .base import LoadedModel, Stage, VLMAdapter, chat_template_takes_parts, use_saved_chat_template
from .decoder import greedy_reference, image_rows, save_language_model, spliced_decoder_stage, text_geometry
from .gemma3 import ImageBlockDecoder
from .loading import load_hf_parts
from .qwen2_vl import patch_grids, patch_row_stages, raster_pixels


class CellPoolTower(nn.Module):
    """(pixel_values [images, patches, patch x patch x channels], patch_positions [images, patches, (row, col)],
    patch_mask [images, patches]: ``contract.ImagePatches``, each cell's ``k²`` patches consecutive) -> the soft
    tokens [images, patches / k², width], each image's real cells first, as ``Gemma4VisionModel`` computes them
    before it strips the padding (kept here: the scheme takes the real rows by the patch mask)."""

    def __init__(self, tower: nn.Module, cell: int):
        super().__init__()
        self.tower, self.cell = tower, int(cell)

    def forward(self, pixel_values, patch_positions, patch_mask):
        t = self.tower
        padding = patch_mask == 0
        # Hugging Face's places are (x, y), -1 on padding
        places = torch.where(padding.unsqueeze(-1), -1, patch_positions.flip(-1))
        embeds = t.patch_embedder(pixel_values, places, padding)
        hidden = t.encoder(inputs_embeds=embeds, attention_mask=~padding, pixel_position_ids=places).last_hidden_state
        hidden = hidden.masked_fill(padding.unsqueeze(-1), 0.0)
        images, patches, width = hidden.shape
        unit = self.cell ** 2
        # the pooler's average of each cell (its weights 1/k² on a whole cell), scaled in float32 as it is
        pooled = hidden.float().reshape(images, patches // unit, unit, width).sum(dim=2) / unit
        pooled = pooled * t.pooler.root_hidden_size
        if t.config.standardize:
            pooled = (pooled - t.std_bias.float()) * t.std_scale.float()
        return pooled.to(embeds.dtype)


class Gemma4Decoder(ImageBlockDecoder):
    """The spliced decoder of a Gemma 4 text model (see the module docstring): per-layer inputs from the text ids,
    Gemma 4's masks where images attend both ways, the final soft cap on the logits."""

    def __init__(self, *args, text_config, **kwargs):
        super().__init__(*args, text_config=text_config, **kwargs)
        self.pad_token_id = int(text_config.pad_token_id or 0)
        self.both_ways = text_config.use_bidirectional_attention == "vision"
        self.softcap = text_config.final_logit_softcapping

    def text_inputs(self, input_ids, image_embeds) -> dict:
        if not self.text_model.hidden_size_per_layer_input:
            return {}
        # Hugging Face embeds the image placeholders as the pad id here (their first embedding is replaced anyway)
        image = image_rows(input_ids, image_embeds, self.image_token_id) > 0
        text_ids = torch.where(image, torch.full_like(input_ids, self.pad_token_id), input_ids)
        return {"per_layer_inputs": self.text_model.get_per_layer_inputs(text_ids, None)}

    def attention_masks(self, input_ids, image_embeds, inputs_embeds, attention_mask, position_ids, cache):
        if not self.both_ways:
            return attention_mask
        from transformers.models.gemma4.modeling_gemma4 import create_masks_for_vision_model

        return create_masks_for_vision_model(config=self.text_config, inputs_embeds=inputs_embeds,
                                             attention_mask=attention_mask, cache=cache, position_ids=position_ids,
                                             block_sequence_ids=self.image_blocks(input_ids, image_embeds,
                                                                                 attention_mask.shape[1]))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap


@register
class Gemma4Adapter(VLMAdapter):
    name = "gemma4"
    model_types = ("gemma4",)
    description = ("Hugging Face Gemma4ForConditionalGeneration, images and text (a ViT on patches of any image size "
                   "pooled into cells + a Gemma 4 text model with per-layer K/V shapes, shared K/V layers and "
                   "per-layer input embeddings)")

    def load(self, path: Path) -> LoadedModel:
        from transformers import Gemma4ForConditionalGeneration

        path = Path(path)
        model, tokenizer, image_processor = load_hf_parts(Gemma4ForConditionalGeneration, path)
        cfg = model.config
        if cfg.vision_config is None or model.model.vision_tower is None:
            raise AdapterError(f"the Gemma 4 model in {path} has no vision tower (vision_config): vlm-export builds "
                               "its image path; a text-only Gemma 4 is not a vision-language model")
        text = cfg.text_config
        if text.use_bidirectional_attention == "all":
            raise AdapterError(f"the text model in {path} attends both ways everywhere (use_bidirectional_attention "
                               "'all', an embedding model): it does not generate text")
        if getattr(model.model, "audio_tower", None) is not None:
            # E2B / E4B ship an audio tower, which no stage and no reference call here reads: its memory goes back
            model.model.audio_tower = model.model.embed_audio = None
        use_saved_chat_template(tokenizer, path)
        loaded = LoadedModel(self, path, model, tokenizer, image_processor, cfg)
        vision = cfg.vision_config
        for name, want in (("patch_size", vision.patch_size), ("pooling_kernel_size", vision.pooling_kernel_size)):
            have = getattr(image_processor, name, None)
            if have != want:
                raise AdapterError(f"the image processor in {path} ({type(image_processor).__name__}) has {name} "
                                   f"{have} but the vision tower takes {want}: save the model's own image processor "
                                   "beside it")
        for name, want in (("image_token", cfg.image_token_id), ("boi_token", cfg.boi_token_id),
                           ("eoi_token", cfg.eoi_token_id)):
            token = getattr(tokenizer, name, None)
            if token is None or tokenizer.convert_tokens_to_ids(token) != want:
                raise AdapterError(f"the tokenizer in {path} names {name} {token!r} (id "
                                   f"{None if token is None else tokenizer.convert_tokens_to_ids(token)}) but the "
                                   f"model's config says {want}: save the model's own tokenizer beside it")
        if vision.pooling_kernel_size < 2:
            # its pooler passes the patches through unpooled with the padding mask, which the model then keeps
            raise AdapterError(f"the vision tower in {path} pools cells of {vision.pooling_kernel_size} patch: Hugging "
                               "Face's Gemma4VisionModel then keeps an image's padding patches instead of its own, so "
                               "there is no reference to match; not supported (pooling_kernel_size 2 or more)")
        self._patches(loaded)
        return loaded

    def _patches(self, loaded: LoadedModel) -> ImagePatches:
        processor, vision, tok = loaded.image_processor, loaded.config.vision_config, loaded.tokenizer
        cells = getattr(processor, "max_soft_tokens", None)
        if not cells:
            raise AdapterError(f"the image processor in {loaded.path} sets no max_soft_tokens: save the model's own "
                               f"{type(processor).__name__} beside it")
        cell = int(vision.pooling_kernel_size)
        return ImagePatches(merge=cell, max_patches=int(cells) * cell ** 2, raster=True, begin=tok.boi_token,
                            end=tok.eoi_token)

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        patches = self._patches(loaded)
        m, vision = loaded.model.model, loaded.config.vision_config
        cell = patches.merge
        # two images as the processor gives them: 4 x 4 cells and 2 x 4 (padded to the larger)
        grids = [(2 * cell, 2 * cell), (cell, 2 * cell)]
        depth = 3 * vision.patch_size ** 2
        gen = torch.Generator().manual_seed(0)
        width = max(h * w for h, w in grids)
        pixels = np.zeros((len(grids), width, depth), np.float32)
        places = np.full((len(grids), width, 2), -1, np.int64)
        for k, (h, w) in enumerate(grids):
            pixels[k, :h * w] = torch.rand(h * w, depth, generator=gen).numpy()
            x, y = np.meshgrid(np.arange(w), np.arange(h))
            places[k, :h * w] = np.stack([x.reshape(-1), y.reshape(-1)], axis=-1)
        scheme = self.scheme(loaded)
        text = m.language_model
        decoder = Gemma4Decoder(text.get_input_embeddings(), text, loaded.model.lm_head, loaded.config.image_token_id,
                                scheme.geometry.num_layers, text_config=loaded.config.text_config)
        return [*patch_row_stages(CellPoolTower(m.vision_tower, cell), m.embed_vision, patches,
                                  {"pixel_values": pixels, "image_position_ids": places}),
                spliced_decoder_stage(decoder, scheme)]

    def scheme(self, loaded: LoadedModel) -> PatchRowsScheme:
        return PatchRowsScheme(self.geometry(loaded), loaded.config.image_token_id,
                               int(loaded.config.vision_config.pooling_kernel_size))

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        patches = self._patches(loaded)
        token = loaded.tokenizer.image_token
        # the chat template writes the image token per image part; Gemma4Processor writes the begin-of-image token,
        # a soft token (the image token) per cell and the end-of-image token in its place
        return PromptLayout(kind="inline", image_token_id=loaded.config.image_token_id,
                            tokens_per_image=patches.most_tokens(), image_token=token,
                            chat_parts=chat_template_takes_parts(loaded.tokenizer, token),
                            images_where_written=True, image_tiles=patches)

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        text = loaded.config.text_config
        geometry = text_geometry(text, loaded.model.model.language_model)
        return replace(geometry, prefill_blocks="images") if text.use_bidirectional_attention == "vision" else geometry

    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        """HF generate on our prompt ids with the processor's own inputs: each image's patches row-major, padded to
        ``max_soft_tokens`` cells with their (x, y) places (-1 on padding), and the image tokens' type ids."""
        inputs = {}
        if pixel_values is not None:
            patches = self._patches(loaded)
            grids = patch_grids(pixel_values)
            flat = raster_pixels(pixel_values)
            pixels = flat.new_zeros(len(grids), patches.max_patches, flat.shape[-1])
            places = torch.full((len(grids), patches.max_patches, 2), -1, dtype=torch.int64)
            start = 0
            for k, (h, w) in enumerate(grids):
                pixels[k, :h * w] = flat[start:start + h * w]
                y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                places[k, :h * w] = torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)
                start += h * w
            inputs = {"image_position_ids": places,
                      "mm_token_type_ids": (input_ids == loaded.config.image_token_id).to(torch.int64)}
            pixel_values = pixels
        return greedy_reference(loaded.model, input_ids, pixel_values, max_new_tokens, eos_token_ids, **inputs)

    def write_text_model(self, loaded: LoadedModel, out: Path) -> Path:
        return save_language_model(loaded, out)  # Gemma4ForCausalLM: the same layers, head and soft cap
