"""Idefics3 and SmolVLM: Hugging Face ``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration``.

The image processor cuts each image into a grid of tiles of the tower's size (more tiles the larger the image,
up to its ``size["longest_edge"]``) plus the whole image shrunk to one tile; each tile goes through the SigLIP
tower, the connector's pixel shuffle and projection, and becomes ``image_seq_len`` rows spliced at the LM's
image tokens, in the processor's order. The text an image becomes depends on its grid
(``PromptLayout.image_tiles``): "<fake_token_around_image><row_1_col_1>" + tokens, ... a newline after each
row, then "\\n<fake_token_around_image><global-img>" + tokens + "<fake_token_around_image>". So the image path's
batch is the tiles, and the number of image rows a prompt holds follows its images' sizes.

Every tile the processor makes for a request is a whole tile of the tower's size (padding tiles appear only
between prompts of one processor call, which vlm-export never makes), so the tower runs with every patch
real: its position ids are those Hugging Face's embeddings give a whole tile, measured once.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..contract import DecoderGeometry, ImageTiles, PromptLayout
from ..contract.spliced import SplicedScheme
from ..errors import AdapterError
from ..runtime.images import ImageLimits, image_grids
from . import model_class_by_type, register
from .base import (LoadedModel, Stage, VLMAdapter, chat_template_takes_parts, check_image_token,
                   processor_setting, use_saved_chat_template)
from .decoder import greedy_reference, save_language_model, spliced_stages, text_geometry
from .loading import load_hf_parts, run_processor

# the texts Idefics3Processor and SmolVLMProcessor write around each tile (constants in both)
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
IMAGE_TOKEN = "<image>"


class WholeTileTower(nn.Module):
    """pixel_values [tiles, 3, size, size] -> the tower's last hidden state (post-layernormed), every patch
    real. Hugging Face's embeddings find each patch's position by bucketizing its fractional coordinates
    (``torch.bucketize``, which ONNX has no operator for); for a whole tile those positions are fixed, so they
    are taken once from the embeddings themselves and kept as a constant."""

    def __init__(self, vision_model: nn.Module, image_size: int):
        super().__init__()
        self.vision_model = vision_model
        embeddings = vision_model.embeddings
        seen = []
        hook = embeddings.position_embedding.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
        side = image_size // embeddings.patch_size
        try:
            with torch.no_grad():
                embeddings(torch.zeros(1, 3, image_size, image_size),
                           torch.ones(1, side, side, dtype=torch.bool))
        finally:
            hook.remove()
        self.register_buffer("position_ids", seen[0].reshape(1, -1).clone(), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.vision_model
        embeddings = vm.embeddings
        patches = embeddings.patch_embedding(pixel_values.to(embeddings.patch_embedding.weight.dtype))
        hidden = patches.flatten(2).transpose(1, 2) + embeddings.position_embedding(self.position_ids)
        hidden = vm.encoder(inputs_embeds=hidden, attention_mask=None).last_hidden_state
        return vm.post_layernorm(hidden)


@register
class Idefics3Adapter(VLMAdapter):
    name = "idefics3"
    model_types = ("idefics3", "smolvlm")
    description = ("Hugging Face Idefics3ForConditionalGeneration / SmolVLMForConditionalGeneration (SigLIP tower on "
                   "image tiles + pixel-shuffle connector + Llama-family LM)")

    def load(self, path: Path) -> LoadedModel:
        path = Path(path)
        model, tokenizer, image_processor = load_hf_parts(model_class_by_type(path, self.name, {
            "idefics3": "Idefics3ForConditionalGeneration", "smolvlm": "SmolVLMForConditionalGeneration"}), path)
        cfg = model.config
        loaded = LoadedModel(self, path, model, tokenizer, image_processor, cfg)
        use_saved_chat_template(tokenizer, path)
        self._check_tokens(loaded)
        self._check_tiles(loaded)
        return loaded

    @staticmethod
    def _check_tokens(loaded: LoadedModel) -> None:
        """The image token must be one token of this tokenizer, of the config's id. (The texts around the tiles are
        tokenized as the processor's are, whatever they become.)"""
        check_image_token(loaded, IMAGE_TOKEN)

    def _check_tiles(self, loaded: LoadedModel) -> None:
        """Each tile must be the tower's input size, and the processor must write as many image tokens per tile as
        the connector gives rows (Hugging Face's forward refuses a mismatch at the first image)."""
        from PIL import Image

        path, cfg = loaded.path, loaded.config
        size = cfg.vision_config.image_size
        made = run_processor(loaded.image_processor, path, images=[Image.new("RGB", (97, 61))],
                             return_tensors="np")["pixel_values"].shape[-2:]
        if tuple(made) != (size, size):
            raise AdapterError(f"the image processor in {path} makes tiles of {made[0]}x{made[1]} but the vision tower "
                               f"takes {size}x{size} (vision_config.image_size): set max_image_size "
                               f"{{\"longest_edge\": {size}}} in preprocessor_config.json")
        written, rows = processor_setting(path, "image_seq_len"), self.tokens_per_tile(loaded)
        if written is not None and written != rows:
            raise AdapterError(f"the processor in {path} writes {written} image tokens per tile (image_seq_len) but the "
                               f"connector gives {rows} rows per tile; Hugging Face's generate refuses this checkpoint "
                               f"too: set image_seq_len {rows} in processor_config.json")

    @staticmethod
    def tokens_per_tile(loaded: LoadedModel) -> int:
        """Rows one tile becomes: the tower's patches after the connector's pixel shuffle, measured on it."""
        m, vision = loaded.model.model, loaded.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        weight = next(m.connector.parameters())
        with torch.no_grad():
            rows = m.connector(torch.zeros(1, patches, vision.hidden_size, dtype=weight.dtype))
        return int(rows.shape[1])

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        m, size = loaded.model, loaded.config.vision_config.image_size
        return spliced_stages(loaded, self.scheme(loaded), WholeTileTower(m.model.vision_model, size), m.model.connector,
                              size, m.model.text_model)

    def scheme(self, loaded: LoadedModel) -> SplicedScheme:
        return SplicedScheme(self.geometry(loaded), loaded.config.image_token_id)

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        tiles = _tiles(max_tiles=1)
        tiles = replace(tiles, max_tiles=ImageTiles.count(_largest_grid(loaded, tiles)))
        return PromptLayout(kind="inline", image_token_id=loaded.config.image_token_id,
                            tokens_per_image=self.tokens_per_tile(loaded), image_token=IMAGE_TOKEN,
                            chat_parts=chat_template_takes_parts(loaded.tokenizer, IMAGE_TOKEN),
                            images_where_written=True, image_tiles=tiles)

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        return text_geometry(loaded.config.text_config, loaded.model.model.text_model)

    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        # the processor's pixel_values are [prompts, tiles, 3, size, size]: this one prompt's tiles
        pixels = None if pixel_values is None else pixel_values.unsqueeze(0)
        return greedy_reference(loaded.model, input_ids, pixels, max_new_tokens, eos_token_ids)

    def write_text_model(self, loaded: LoadedModel, out: Path) -> Path:
        return save_language_model(loaded, out, loaded.model.model.text_model)


def _tiles(max_tiles: int) -> ImageTiles:
    """How Idefics3Processor and SmolVLMProcessor write a tiled image, and ask their image processor for its grid."""
    return ImageTiles(tile=FAKE_TOKEN + "<row_{row}_col_{col}>", row_end="\n", whole=f"\n{FAKE_TOKEN}{GLOBAL_TOKEN}",
                      alone=FAKE_TOKEN + GLOBAL_TOKEN, end=FAKE_TOKEN, max_tiles=max_tiles,
                      options={"return_row_col_info": True})


def _largest_grid(loaded: LoadedModel, tiles: ImageTiles) -> tuple[int, int]:
    """The grid of the largest image the image processor makes (a square of its longest edge), as it cuts it: the
    most tiles one image becomes."""
    from PIL import Image

    processor = loaded.image_processor
    edge = int((getattr(processor, "size", None) or {}).get("longest_edge", 0))
    if not edge:
        raise AdapterError(f"the image processor in {loaded.path} ({type(processor).__name__}) has no "
                           "size[\"longest_edge\"]: save the model's own Idefics3 / SmolVLM image processor beside it")
    return image_grids(processor, [Image.new("RGB", (edge, edge))], ImageLimits(), tiles)[0]
