"""InternVL (the Hugging Face form): ``InternVLForConditionalGeneration`` (InternVL 2.5 / 3 "-hf" checkpoints).

The image processor (GotOcr2's, ``crop_to_patches``) cuts each image into up to ``max_patches`` tiles of the
tower's size, by its aspect ratio, plus a thumbnail of the whole image where it cuts more than one; each tile goes
through the InternViT tower (the selected layer, its CLS row dropped), the pixel shuffle (``downsample_ratio``) and
the projector, and becomes ``image_seq_length`` rows. The processor writes an image as "<img>" + the context
token x rows x tiles + "</img>" (``PromptLayout.image_tiles`` counted by ``num_patches``), so the image path's
batch is the tiles and a prompt's image rows follow its images' sizes. The LM is any Hugging Face causal LM
(Qwen2 in InternVL 2.5 / 3), spliced as LLaVA's.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..contract import ImageTiles, PromptLayout
from ..contract.spliced import SplicedScheme
from ..errors import AdapterError
from . import register
from .base import (LoadedModel, Stage, VLMAdapter, chat_template_takes_parts, check_image_size, check_image_token,
                   processor_setting, use_saved_chat_template)
from .decoder import SplicedLanguageModel, spliced_stages
from .loading import load_hf_parts


class InternVLVisionFeatures(nn.Module):
    """pixel_values -> the tower's selected features, as InternVLModel.get_image_features selects them (the last
    hidden state, post-norm, for layer -1; else that layer's hidden state; the CLS row dropped by "default")."""

    def __init__(self, vision_tower: nn.Module, feature_layer: int, strategy: str):
        super().__init__()
        self.vision_tower, self.layer, self.drop_first = vision_tower, feature_layer, strategy == "default"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.vision_tower(pixel_values=pixel_values, output_hidden_states=self.layer != -1, return_dict=True)
        features = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        return features[:, 1:] if self.drop_first else features


class InternVLProjector(nn.Module):
    """features [tiles, patches, hidden] -> the pixel shuffle and the multi-modal projector, as get_image_features."""

    def __init__(self, model: nn.Module, downsample_ratio: float):
        super().__init__()
        self.pixel_shuffle, self.projector, self.ratio = model.pixel_shuffle, model.multi_modal_projector, downsample_ratio

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tiles, patches, hidden = features.shape
        side = int(patches ** 0.5)
        shuffled = self.pixel_shuffle(features.reshape(tiles, side, side, hidden), scale_factor=self.ratio)
        return self.projector(shuffled.reshape(tiles, -1, shuffled.shape[-1]))


@register
class InternVLAdapter(SplicedLanguageModel, VLMAdapter):
    name = "internvl"
    model_types = ("internvl",)
    description = ("Hugging Face InternVLForConditionalGeneration (InternViT on image tiles + pixel shuffle + "
                   "projector + a causal LM)")

    #: the Hugging Face class of the whole model
    model_cls = "InternVLForConditionalGeneration"

    def load(self, path: Path) -> LoadedModel:
        import transformers

        path = Path(path)
        model, tokenizer, image_processor = load_hf_parts(getattr(transformers, self.model_cls), path)
        cfg = model.config
        loaded = LoadedModel(self, path, model, tokenizer, image_processor, cfg)
        use_saved_chat_template(tokenizer, path)
        for name in ("start_image_token", "end_image_token", "context_image_token"):
            if not getattr(tokenizer, name, None):
                raise AdapterError(f"the tokenizer in {path} names no {name} (InternVLProcessor writes each image with "
                                   "them): save the model's own tokenizer beside it")
        check_image_token(loaded, tokenizer.context_image_token)
        if not hasattr(image_processor, "max_patches"):
            raise AdapterError(f"the image processor in {path} ({type(image_processor).__name__}) does not cut images "
                               "into patches: save the model's own GotOcr2 image processor beside it")
        size = self._tile_size(loaded)
        check_image_size(loaded, (size, size))
        written, rows = processor_setting(path, "image_seq_length"), self.tokens_per_tile(loaded)
        if written is not None and written != rows:
            raise AdapterError(f"the processor in {path} writes {written} image tokens per tile (image_seq_length) but "
                               f"the projector gives {rows} rows per tile; Hugging Face's generate refuses this "
                               f"checkpoint too: set image_seq_length {rows} in processor_config.json")
        return loaded

    @staticmethod
    def _tile_size(loaded: LoadedModel) -> int:
        size = loaded.config.vision_config.image_size
        size = size if isinstance(size, int) else size[0]
        return int(size)

    def vision(self, loaded: LoadedModel) -> InternVLVisionFeatures:
        cfg = loaded.config
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            raise AdapterError(f"InternVL reads one vision_feature_layer; {loaded.path} names {layer}")
        return InternVLVisionFeatures(loaded.model.model.vision_tower, layer, cfg.vision_feature_select_strategy)

    def tokens_per_tile(self, loaded: LoadedModel) -> int:
        """Rows one tile becomes: the tower's patches (its CLS row dropped) after the pixel shuffle, measured on the
        projector (the tower itself need not run)."""
        vision = loaded.config.vision_config
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        features = torch.zeros(1, (self._tile_size(loaded) // patch) ** 2, vision.hidden_size)
        with torch.no_grad():
            return int(InternVLProjector(loaded.model.model, loaded.config.downsample_ratio)(features).shape[1])

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        m = loaded.model
        return spliced_stages(loaded, self.scheme(loaded), self.vision(loaded),
                              InternVLProjector(m.model, loaded.config.downsample_ratio), self._tile_size(loaded),
                              m.model.language_model)

    def scheme(self, loaded: LoadedModel) -> SplicedScheme:
        return SplicedScheme(self.geometry(loaded), loaded.config.image_token_id)

    def image_mark(self, loaded: LoadedModel) -> str:
        """The text a prompt (and the chat template) writes where an image goes: InternVLProcessor's, the context
        token itself."""
        return loaded.tokenizer.context_image_token

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        tok = loaded.tokenizer
        most = int(loaded.image_processor.max_patches)
        mark = self.image_mark(loaded)
        # InternVLProcessor: "<img>" + the context token x image_seq_length x num_patches + "</img>", every tile in
        # one run (an empty text around each), in place of each mark; its image processor cuts with crop_to_patches
        # and says num_patches
        tiles = ImageTiles(tile="", row_end="", whole="", start=tok.start_image_token, alone=tok.start_image_token,
                           end=tok.end_image_token, max_tiles=most + 1 if most > 1 else 1, counted_by="num_patches",
                           options={"crop_to_patches": True},
                           token="" if mark == tok.context_image_token else tok.context_image_token)
        return PromptLayout(kind="inline", image_token_id=loaded.config.image_token_id,
                            tokens_per_image=self.tokens_per_tile(loaded), image_token=mark,
                            chat_parts=chat_template_takes_parts(tok, mark), images_where_written=True,
                            image_tiles=tiles)
