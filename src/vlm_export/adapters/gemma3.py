"""Gemma 3: Hugging Face ``Gemma3ForConditionalGeneration``.

SigLIP tower of a fixed input size -> its last hidden state -> the multi-modal projector (average-pooled
to ``mm_tokens_per_image`` tokens, RMS-normed, projected) -> spliced at the image soft tokens of the
Gemma 3 text model. Two things LLaVA does not have:

* the chat template writes ``<start_of_image>`` for an image and the processor puts
  "\\n\\n<start_of_image>" + the soft token x N + "<end_of_image>\\n\\n" in its place
  (``PromptLayout.image_sequence``);
* in the prefill, an image's soft tokens attend to each other both ways (Hugging Face's
  ``token_type_ids`` blocks; text stays causal). The decoder makes that mask from the placeholders
  themselves, as Hugging Face makes it from the processor's ``token_type_ids`` (1 exactly at the soft
  tokens), so the decoder's inputs are LLaVA's; ``DecoderGeometry.prefill_blocks`` "images" tells the
  fusion pass (its attention kernel masks causally) and the prefix cache.

Pan and scan: where the checkpoint's image processor says ``do_pan_and_scan`` true, an image long enough is given
whole and as a few crops, each one more image of the image path and one more run of soft tokens in the text its
processor writes (``ImageCrops``, read off ``Gemma3Processor.replace_image_token`` itself). Hugging Face's
processor takes pan and scan only as a call argument (``do_pan_and_scan=True``: it passes its own defaults over the
saved setting); a build fixes it, so the saved file says it, and its crop settings where set, else the processor's
defaults, are what the build's image processor is given.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..contract import DecoderGeometry, ImageCrops, PromptLayout
from ..contract.spliced import SplicedScheme
from ..errors import AdapterError
from . import register
from .base import LoadedModel, Stage, VLMAdapter, chat_template_takes_parts, check_image_size, set_chat_template
from .decoder import (SplicingDecoder, greedy_reference, image_rows, last_hidden_state_stages, save_language_model,
                      text_geometry)
from .loading import load_hf_parts, load_processor, processor_chat_template


class ImageBlockDecoder(SplicingDecoder):
    """The spliced decoder with Gemma 3's masks: each run of image placeholders (one image) a block that
    attends to itself both ways, over the causal and sliding-window masks, as Gemma3Model makes them from
    ``token_type_ids``. A decode step feeds no image rows: its masks are the causal ones, as Hugging Face's
    generate passes no ``token_type_ids`` after the prefill."""

    def __init__(self, *args, text_config, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_config = text_config

    def attention_masks(self, input_ids, image_embeds, inputs_embeds, attention_mask, position_ids, cache):
        from transformers.models.gemma3.modeling_gemma3 import create_masks_for_vision_model

        return create_masks_for_vision_model(config=self.text_config, inputs_embeds=inputs_embeds,
                                             attention_mask=attention_mask, cache=cache, position_ids=position_ids,
                                             block_sequence_ids=self.image_blocks(input_ids, image_embeds,
                                                                                 attention_mask.shape[1]))

    def image_blocks(self, input_ids, image_embeds, total: int) -> torch.Tensor:
        """Per column of the whole sequence (``total`` wide), the index of the image whose soft token is there
        within the row (0, 1, ...; a run of placeholders is one image), -1 for text: Hugging Face's
        ``get_block_sequence_ids_for_mask`` of the processor's token_type_ids, in int64 ops (TensorRT pads no
        booleans). The masks read it by column from the sequence's start (Hugging Face's prefill always starts
        there); a prefill after a past (a cached prefix, which never ends inside an image) has none in it."""
        image = (image_rows(input_ids, image_embeds, self.image_token_id) > 0).to(torch.int64)
        batch = image.shape[0]
        previous = torch.cat([image.new_zeros(batch, 1), image[:, :-1]], dim=1)
        blocks = torch.where(image > 0, torch.cumsum(image * (1 - previous), dim=1) - 1, -1)
        return torch.cat([blocks.new_full((batch, total - input_ids.shape[1]), -1), blocks], dim=1)


@register
class Gemma3Adapter(VLMAdapter):
    name = "gemma3"
    model_types = ("gemma3",)
    description = "Hugging Face Gemma3ForConditionalGeneration (SigLIP tower + pooled projector + Gemma 3 text model)"

    def load(self, path: Path) -> LoadedModel:
        from transformers import Gemma3ForConditionalGeneration, Gemma3Processor

        model, tokenizer, processor = load_hf_parts(Gemma3ForConditionalGeneration, path)
        cfg, path = model.config, Path(path)
        if getattr(cfg.text_config, "use_bidirectional_attention", False):
            raise AdapterError(f"the text model in {path} attends both ways everywhere (use_bidirectional_attention, "
                               "an embedding model such as EmbeddingGemma): it does not generate text")
        image_token = getattr(tokenizer, "image_token", None)
        if getattr(tokenizer, "image_token_id", None) != cfg.image_token_id or not getattr(tokenizer, "boi_token", None):
            raise AdapterError(
                f"the tokenizer in {path} names image token {image_token!r} (id {getattr(tokenizer, 'image_token_id', None)})"
                f" and begin-of-image token {getattr(tokenizer, 'boi_token', None)!r}, but the model's config says "
                f"image_token_id {cfg.image_token_id}: save the model's own tokenizer beside it")
        template = processor_chat_template(path)
        if template and template != getattr(tokenizer, "chat_template", None):
            set_chat_template(tokenizer, template, f"the processor's chat template in {path}")
        loaded = LoadedModel(self, path, model, tokenizer, processor, cfg)
        crops = self.pan_and_scan(loaded)
        if crops and crops["pan_and_scan_max_num_crops"] < 1:
            raise AdapterError(f"the image processor in {path} pans and scans into at most "
                               f"{crops['pan_and_scan_max_num_crops']} crops: set pan_and_scan_max_num_crops 1 or more, "
                               "or do_pan_and_scan false")
        size = cfg.vision_config.image_size
        check_image_size(loaded, (size, size), crops)
        rows = self.tokens_per_image(loaded)
        if (path / "processor_config.json").is_file():
            written = load_processor(Gemma3Processor, path).image_seq_length
            if written != rows:
                raise AdapterError(f"the Gemma3Processor in {path} writes {written} image tokens per image "
                                   f"(image_seq_length) but the projector gives {rows} (mm_tokens_per_image "
                                   f"{cfg.mm_tokens_per_image}); Hugging Face's generate refuses this checkpoint too: "
                                   f"set image_seq_length {rows} in processor_config.json")
        return loaded

    @staticmethod
    def pan_and_scan(loaded: LoadedModel) -> dict:
        """What the image processor is given to pan and scan (see the module docstring); {} where it does not."""
        from transformers import Gemma3Processor

        image_processor = loaded.image_processor
        if getattr(image_processor, "do_pan_and_scan", None) is not True:
            return {}
        defaults = Gemma3Processor.images_kwargs
        settings = {name: getattr(image_processor, name, None) for name in defaults if "pan_and_scan" in name}
        return {name: defaults[name] if value is None else value for name, value in settings.items()}

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        return last_hidden_state_stages(loaded, self.scheme(loaded), ImageBlockDecoder,
                                        text_config=loaded.config.text_config)

    def scheme(self, loaded: LoadedModel) -> SplicedScheme:
        return SplicedScheme(self.geometry(loaded), loaded.config.image_token_id)

    @staticmethod
    def tokens_per_image(loaded: LoadedModel) -> int:
        """Rows one image becomes: the projector's pooled grid (mm_tokens_per_image where the tower's patches
        divide evenly), measured on the projector itself."""
        m, vision = loaded.model.model, loaded.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        weight = m.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            rows = m.multi_modal_projector(torch.zeros(1, patches, vision.hidden_size, dtype=weight.dtype))
        return int(rows.shape[1])

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        from transformers import Gemma3Processor

        tok = loaded.tokenizer
        rows = self.tokens_per_image(loaded)
        processor = Gemma3Processor(image_processor=loaded.image_processor, tokenizer=tok, image_seq_length=rows)
        layout = PromptLayout(kind="inline", image_token_id=loaded.config.image_token_id, tokens_per_image=rows,
                              image_token=tok.boi_token, chat_parts=chat_template_takes_parts(tok, tok.boi_token),
                              images_where_written=True, image_sequence=processor.full_image_sequence)
        options = self.pan_and_scan(loaded)
        if not options:
            return layout
        # the text of an image with crops as the processor writes it, cut at each image's own text
        one, written = processor.full_image_sequence, processor.replace_image_token({"num_crops": [2]}, 0)
        parts = written.split(one)
        if len(parts) != 4 or parts[3]:
            raise AdapterError(f"Gemma3Processor writes an image with two crops as {written!r}: not the whole image's "
                               "text then the crops' as this adapter reads it; set do_pan_and_scan false in "
                               f"{loaded.path / 'preprocessor_config.json'}")
        crops = ImageCrops(image=one, whole_lead=parts[0], crops_lead=parts[1], crop_separator=parts[2],
                           max_crops=options["pan_and_scan_max_num_crops"], options=options)
        return replace(layout, image_sequence="", image_tiles=crops)

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        geometry = text_geometry(loaded.config.text_config, loaded.model.model.language_model)
        return replace(geometry, prefill_blocks="images")

    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        # what Gemma3Processor returns beside the ids: 1 at the image soft tokens
        token_type_ids = (input_ids == loaded.config.image_token_id).to(torch.int64)
        return greedy_reference(loaded.model, input_ids, pixel_values, max_new_tokens, eos_token_ids,
                                token_type_ids=token_type_ids)

    def write_text_model(self, loaded: LoadedModel, out: Path) -> Path:
        return save_language_model(loaded, out)
