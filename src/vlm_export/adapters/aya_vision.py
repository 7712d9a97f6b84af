"""Aya Vision: Hugging Face ``AyaVisionForConditionalGeneration`` (Aya Vision 8B / 32B).

The image processor (GotOcr2's, ``crop_to_patches``, which AyaVisionProcessor turns on per call) cuts each image
into up to ``max_patches`` tiles of the tower's size by its aspect ratio, plus a thumbnail of the whole image where
it cuts more than one; each tile goes through the SigLIP tower (LLaVA's feature selection: a hidden state, every
patch kept by the "full" strategy) and the projector (a pixel shuffle by ``downsample_factor``, LayerNorm, SwiGLU)
and becomes (tile / (patch x downsample))² rows. AyaVisionProcessor writes an image as "<|START_OF_IMG|>", then
"TILE_k" + the patch token x rows for each tile, "TILE_GLOBAL" + the thumbnail's, "<|END_OF_IMG|>"
(``PromptLayout.image_tiles`` counted by ``num_patches``, the thumbnail last); the adapter reads those texts off the
processor and checks them against its own ``replace_image_token``. The LM (Cohere 2 in the released checkpoints,
any Hugging Face causal LM here) is spliced as LLaVA's.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..contract import ImageTiles, PromptLayout
from ..contract.spliced import SplicedScheme
from ..errors import AdapterError
from . import register
from .base import LoadedModel, Stage, VLMAdapter, chat_template_takes_parts, check_image_size
from .decoder import SplicedLanguageModel, greedy_reference, spliced_stages
from .llava import LlavaVisionEncoder, check_llava_parts, reference_image_kwargs, tower_tokens
from .loading import load_hf_parts, load_processor


class AyaVisionProjector(nn.Module):
    """features [tiles, patches, hidden] -> rows [tiles, rows, text hidden]: the model's projector (pixel shuffle,
    LayerNorm, SwiGLU), its [tiles, side, side, text hidden] output flattened as get_image_features flattens it."""

    def __init__(self, projector: nn.Module, text_hidden: int):
        super().__init__()
        self.projector, self.text_hidden = projector, text_hidden

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(features).reshape(features.shape[0], -1, self.text_hidden)


@register
class AyaVisionAdapter(SplicedLanguageModel, VLMAdapter):
    name = "aya_vision"
    model_types = ("aya_vision",)
    description = ("Hugging Face AyaVisionForConditionalGeneration (SigLIP on image tiles + pixel shuffle + SwiGLU "
                   "projector + a causal LM)")

    def load(self, path: Path) -> LoadedModel:
        from transformers import AyaVisionForConditionalGeneration, AyaVisionProcessor

        path = Path(path)
        model, tokenizer, image_processor = load_hf_parts(AyaVisionForConditionalGeneration, path)
        loaded = LoadedModel(self, path, model, tokenizer, image_processor, model.config)
        check_llava_parts(loaded)
        if not isinstance(loaded.config.vision_feature_layer, int):
            raise AdapterError(f"vision_feature_layer {loaded.config.vision_feature_layer} in {path} names several "
                               "layers: Aya Vision's projector reads one (Hugging Face's forward fails on several too)")
        if not hasattr(image_processor, "max_patches"):
            raise AdapterError(f"the image processor in {path} ({type(image_processor).__name__}) does not cut images "
                               "into tiles: save the model's own GotOcr2 image processor beside it")
        check_image_size(loaded, (self._tile_size(loaded),) * 2)
        # the processor says how it writes an image (its tokens and tiles' texts): read below, checked here
        loaded.processor = processor = load_processor(AyaVisionProcessor, path, loaded.config.image_token_id)
        written, rows = (processor.img_size // processor.patch_size) ** 2, self.tokens_per_tile(loaded)
        if written != rows:
            raise AdapterError(f"the AyaVisionProcessor in {path} writes {written} image tokens per tile ((img_size "
                               f"{processor.img_size} / patch_size {processor.patch_size})²) but the projector gives "
                               f"{rows} rows per tile; Hugging Face's generate refuses this checkpoint too: fix img_size "
                               "/ patch_size / downsample_factor in processor_config.json")
        layout = self.prompt_layout(loaded)
        for tiles in (1, 3):
            theirs = processor.replace_image_token({"num_patches": [tiles]}, 0)
            if layout.expanded_image(layout.image_tiles.grids({"num_patches": [tiles]})[0]) != theirs:
                raise AdapterError(f"the AyaVisionProcessor in {path} writes an image of {tiles} tile(s) as "
                                   f"{theirs[:120]!r}..., not as its tokens say: save the model's own processor")
        return loaded

    @staticmethod
    def _tile_size(loaded: LoadedModel) -> int:
        return int(loaded.config.vision_config.image_size)

    def vision(self, loaded: LoadedModel) -> LlavaVisionEncoder:
        cfg = loaded.config
        return LlavaVisionEncoder(loaded.model.model.vision_tower, cfg.vision_feature_layer,
                                  cfg.vision_feature_select_strategy)

    @staticmethod
    def projector(loaded: LoadedModel) -> AyaVisionProjector:
        return AyaVisionProjector(loaded.model.model.multi_modal_projector, loaded.config.text_config.hidden_size)

    def tokens_per_tile(self, loaded: LoadedModel) -> int:
        """Rows one tile becomes: a blank tile's selected features (as many as the tower gives) through the
        projector."""
        features = tower_tokens(self.vision(loaded), self._tile_size(loaded))
        with torch.no_grad():
            rows = self.projector(loaded)(torch.zeros(1, features, loaded.config.vision_config.hidden_size))
        return int(rows.shape[1])

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        return spliced_stages(loaded, self.scheme(loaded), self.vision(loaded), self.projector(loaded),
                              self._tile_size(loaded), loaded.model.model.language_model)

    def scheme(self, loaded: LoadedModel) -> SplicedScheme:
        return SplicedScheme(self.geometry(loaded), loaded.config.image_token_id)

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        processor = loaded.processor
        tiles = ImageTiles(tile=processor.tile_token + "_{col}", row_end="", whole=processor.tile_global_token,
                           start=processor.start_of_img_token,
                           alone=processor.start_of_img_token + processor.tile_global_token,
                           end=processor.end_of_img_token, max_tiles=self.max_tiles(loaded), counted_by="num_patches",
                           options=dict(processor.images_kwargs), token=processor.img_patch_token)
        return PromptLayout(kind="inline", image_token_id=loaded.config.image_token_id,
                            tokens_per_image=self.tokens_per_tile(loaded), image_token=processor.image_token,
                            chat_parts=chat_template_takes_parts(loaded.tokenizer, processor.image_token),
                            images_where_written=True, image_tiles=tiles)

    @staticmethod
    def max_tiles(loaded: LoadedModel) -> int:
        most = int(loaded.image_processor.max_patches)
        return most + 1 if most > 1 else 1  # the thumbnail where there are several

    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        return greedy_reference(loaded.model, input_ids, pixel_values, max_new_tokens, eos_token_ids,
                                **reference_image_kwargs(loaded))
