"""LLaVA-NeXT (LLaVA-1.6): Hugging Face ``LlavaNextForConditionalGeneration``.

Its image processor resizes each image into the best of the config's ``image_grid_pinpoints`` (padding the
rest), cuts that into tiles of the tower's size and puts the whole image, shrunk to one tile, first. Every tile
goes through LLaVA's tower and projector; the model then packs an image's rows by its size: the whole image's,
then the tiles' as one picture cut back to the image's aspect, a learned newline after each of its rows
(``pack_image_features``). Here the projector stage gives each tile's rows and the newline after them, and the
``spliced_anyres`` scheme packs them by the preprocessed ``image_sizes`` (``contract.AnyResTiles``), so the
number of image tokens follows each image's size as ``LlavaNextProcessor`` writes it. The LM is any Hugging Face
causal LM (Mistral, Vicuna, Llama 3, Qwen ...), spliced as LLaVA's.

LLaVA-OneVision (``adapters/llava_onevision.py``) is this adapter with a shrunk picture and untiled images where a
prompt has several. Not covered: video.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..contract import AnyResTiles, PromptLayout
from ..contract.layout import IMAGE_SIZES
from ..contract.anyres import AnyResSplicedScheme
from ..errors import AdapterError
from . import register
from .base import LoadedModel, Stage, chat_template_takes_parts, check_image_size
from .decoder import greedy_reference, spliced_stages
from .llava import LlavaAdapter, check_llava_parts, processor_image_tokens, reference_image_kwargs, tower_tokens
from .loading import load_hf_parts


class NewlineProjector(nn.Module):
    """image_features [tiles, patches², vision] -> each tile's projected rows, then the model's ``image_newline``
    [tiles, patches² + 1, hidden]: every row an image's packing takes (``spliced_anyres``)."""

    def __init__(self, projector: nn.Module, newline: torch.Tensor):
        super().__init__()
        self.projector, self.newline = projector, newline

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        rows = self.projector(features)
        newline = self.newline.to(rows.dtype).reshape(1, 1, -1).expand(rows.shape[0], 1, rows.shape[-1])
        return torch.cat([rows, newline], dim=1)


@register
class LlavaNextAdapter(LlavaAdapter):
    name = "llava_next"
    model_types = ("llava_next",)
    description = ("Hugging Face LlavaNextForConditionalGeneration (LLaVA-1.6: images tiled by their size, a CLIP "
                   "tower + MLP projector + image newline, any HF causal LM)")

    #: the Hugging Face class the checkpoint loads as (a subclass's own)
    model_cls = "LlavaNextForConditionalGeneration"

    def load(self, path: Path) -> LoadedModel:
        import transformers

        model, tokenizer, image_processor = load_hf_parts(getattr(transformers, self.model_cls), path)
        loaded = LoadedModel(self, Path(path), model, tokenizer, image_processor, model.config)
        check_llava_parts(loaded)
        cfg, size = model.config, model.config.vision_config.image_size
        theirs = getattr(image_processor, "image_grid_pinpoints", None)
        if theirs is None:
            raise AdapterError(f"the image processor in {path} ({type(image_processor).__name__}) does not tile images "
                               "by their size (no image_grid_pinpoints): save the model's own LlavaNextImageProcessor "
                               "beside it")
        if [list(p) for p in theirs] != [list(p) for p in cfg.image_grid_pinpoints]:
            raise AdapterError(f"the image processor in {path} tiles images into {theirs} but the model packs them as "
                               f"{cfg.image_grid_pinpoints} (image_grid_pinpoints): Hugging Face's generate fails on "
                               "such a checkpoint; make them one")
        try:
            tiles = self.tiles(loaded)
        except ValueError as e:
            raise AdapterError(f"image_grid_pinpoints in {path / 'config.json'}: {e}") from None
        check_image_size(loaded, (size, size))
        patch = cfg.vision_config.patch_size
        rows = tower_tokens(self.vision_encoder(loaded), size)
        if rows != (size // patch) ** 2:
            # pack_image_features lays each tile out as (image_size / patch_size)² rows
            raise AdapterError(f"the vision tower gives {rows} features per tile with vision_feature_select_strategy "
                               f"{cfg.vision_feature_select_strategy!r}, not its {(size // patch) ** 2} patches, "
                               "which LLaVA-NeXT packs into its picture (Hugging Face's own forward fails too): use "
                               "'default' with a tower that has a CLS token, 'full' with one that has none")
        self._check_processor_packing(loaded, tiles)
        return loaded

    @classmethod
    def tiles(cls, loaded: LoadedModel) -> AnyResTiles:
        cfg = loaded.config
        size = cfg.vision_config.image_size
        pinpoints = [tuple(int(v) for v in p) for p in cfg.image_grid_pinpoints]
        return AnyResTiles(tile=size, patches=size // cfg.vision_config.patch_size, pinpoints=tuple(pinpoints),
                           max_tiles=1 + max(h * w // size ** 2 for h, w in pinpoints), options={"do_pad": True})

    @staticmethod
    def _check_processor_packing(loaded: LoadedModel, tiles: AnyResTiles) -> None:
        """The checkpoint's own LlavaNextProcessor must write as many image tokens as the packing makes (its
        patch_size, num_additional_image_tokens and strategy count them); Hugging Face's forward refuses any other
        count. Probed on an image wider than tall, whose picture is cut back. A folder without a processor of its
        own, or with one saved without a patch_size, gets vlm-export's count (``processor_image_tokens``)."""
        from transformers import LlavaNextProcessor

        probe = (5 * tiles.tile // 3, tiles.tile)  # width, height
        probed = processor_image_tokens(loaded, LlavaNextProcessor, probe)
        made = tiles.tokens((probe[1], probe[0]))
        if probed is None or probed[1] == made:
            return
        processor, written = probed
        raise AdapterError(
            f"the LlavaNextProcessor in {loaded.path} writes {written} image tokens for a {probe[0]}x{probe[1]} image "
            f"(patch_size {processor.patch_size}, num_additional_image_tokens "
            f"{processor.num_additional_image_tokens}, vision_feature_select_strategy "
            f"{processor.vision_feature_select_strategy!r}) but the model packs {made} rows for it; Hugging "
            "Face's generate refuses this checkpoint too: fix processor_config.json")

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        m = loaded.model
        projector = NewlineProjector(m.model.multi_modal_projector, m.model.image_newline)
        return spliced_stages(loaded, self.scheme(loaded), self.vision_encoder(loaded), projector,
                              loaded.config.vision_config.image_size, m.model.language_model)

    def scheme(self, loaded: LoadedModel) -> AnyResSplicedScheme:
        return AnyResSplicedScheme(self.geometry(loaded), loaded.config.image_token_id, self.tiles(loaded))

    def tokens_per_image(self, loaded: LoadedModel) -> int:
        """Rows per tile of the image path: its patches and the newline."""
        return self.tiles(loaded).patches ** 2 + 1

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        token = loaded.tokenizer.convert_ids_to_tokens(loaded.config.image_token_id)
        return PromptLayout(kind="inline", image_token_id=loaded.config.image_token_id,
                            tokens_per_image=self.tokens_per_image(loaded), image_token=token,
                            chat_parts=chat_template_takes_parts(loaded.tokenizer, token), images_where_written=True,
                            image_tiles=self.tiles(loaded))

    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        """HF generate with the image path's tiles (every image's, in order: LlavaNextModel takes them stacked)
        and each image's size."""
        if pixel_values is None:
            return greedy_reference(loaded.model, input_ids, None, max_new_tokens, eos_token_ids)
        return greedy_reference(loaded.model, input_ids, pixel_values["pixel_values"], max_new_tokens, eos_token_ids,
                                **self._reference_image_inputs(loaded, pixel_values))

    @staticmethod
    def _reference_image_inputs(loaded: LoadedModel, pixel_values: dict) -> dict:
        """What HF's generate is given besides the tiles: each image's size."""
        return {"image_sizes": pixel_values[IMAGE_SIZES], **reference_image_kwargs(loaded)}
