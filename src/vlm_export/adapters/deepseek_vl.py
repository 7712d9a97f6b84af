"""DeepSeek-VL and Janus (understanding): Hugging Face ``DeepseekVLForConditionalGeneration`` and
``JanusForConditionalGeneration`` (Janus / Janus-Pro).

One image of the tower's size (the image processor resizes its longest side and pads it square with the mean colour)
-> the vision model's last hidden state (SigLIP; Janus's own SigLIP-like tower) -> the aligner (an MLP) -> one row per
patch, spliced at the image tokens of a Llama-family LM as LLaVA's. Each image the prompt writes ("<image_placeholder>")
becomes what the model's processor puts in its place (``replace_image_token``: the image token x
``num_image_tokens``; Janus's wrapped in its begin/end-of-image tokens), read off the processor itself. Janus's image
generation (its VQ model and generation head) is not exported: the build answers in text, as its ``generate`` does in
its default "text" mode. DeepSeek-VL-Hybrid (a second, high-resolution SAM tower) is another model type, not taken.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..contract import PromptLayout
from ..contract.spliced import SplicedScheme
from ..errors import AdapterError
from . import register
from .base import (LoadedModel, Stage, VLMAdapter, chat_template_takes_parts, check_image_size,
                   use_saved_chat_template)
from .decoder import LastHiddenState, SplicedLanguageModel, spliced_stages
from .loading import load_hf_parts, load_processor


@register
class DeepseekVLAdapter(SplicedLanguageModel, VLMAdapter):
    name = "deepseek_vl"
    model_types = ("deepseek_vl",)
    description = "Hugging Face DeepseekVLForConditionalGeneration (SigLIP + MLP aligner + a Llama-family LM)"
    model_class, processor_class = "DeepseekVLForConditionalGeneration", "DeepseekVLProcessor"

    def load(self, path: Path) -> LoadedModel:
        import transformers

        path = Path(path)
        model, tokenizer, image_processor = load_hf_parts(getattr(transformers, self.model_class), path)
        cfg = model.config
        loaded = LoadedModel(self, path, model, tokenizer, image_processor, cfg)
        use_saved_chat_template(tokenizer, path)
        loaded.processor = processor = load_processor(getattr(transformers, self.processor_class), path)
        ids = tokenizer(processor.image_token, add_special_tokens=False)["input_ids"]
        if ids != [cfg.image_token_id]:
            raise AdapterError(f"the tokenizer in {path} makes the processor's image token {processor.image_token!r} "
                               f"the ids {ids} but the model's config says image_token_id {cfg.image_token_id}: save "
                               "the model's own tokenizer beside it")
        check_image_size(loaded, (self._image_size(loaded),) * 2)
        rows = self.tokens_per_image(loaded)
        if processor.num_image_tokens != rows:
            raise AdapterError(f"the {self.processor_class} in {path} writes {processor.num_image_tokens} image tokens "
                               f"per image (num_image_tokens) but the aligner gives {rows} rows; Hugging Face's "
                               f"generate refuses this checkpoint too: set num_image_tokens {rows} in "
                               "processor_config.json")
        return loaded

    @staticmethod
    def _image_size(loaded: LoadedModel) -> int:
        size = loaded.config.vision_config.image_size
        return int(size if isinstance(size, int) else size[0])

    @staticmethod
    def vision(loaded: LoadedModel) -> LastHiddenState:
        return LastHiddenState(loaded.model.model.vision_model)

    def tokens_per_image(self, loaded: LoadedModel) -> int:
        """Rows one image becomes: a blank image through the tower and the aligner."""
        weight = next(loaded.model.model.aligner.parameters())
        size = self._image_size(loaded)
        with torch.no_grad():
            features = self.vision(loaded)(torch.zeros(1, 3, size, size, dtype=weight.dtype))
            return int(loaded.model.model.aligner(features).shape[1])

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        m = loaded.model.model
        return spliced_stages(loaded, self.scheme(loaded), self.vision(loaded), m.aligner, self._image_size(loaded),
                              m.language_model)

    def scheme(self, loaded: LoadedModel) -> SplicedScheme:
        return SplicedScheme(self.geometry(loaded), loaded.config.image_token_id)

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        processor = loaded.processor
        rows = processor.num_image_tokens
        written = processor.replace_image_token({}, 0)  # the text one image becomes, as its processor writes it
        return PromptLayout(kind="inline", image_token_id=loaded.config.image_token_id, tokens_per_image=rows,
                            image_token=processor.image_token,
                            chat_parts=chat_template_takes_parts(loaded.tokenizer, processor.image_token),
                            images_where_written=True,
                            image_sequence="" if written == processor.image_token * rows else written)


@register
class JanusAdapter(DeepseekVLAdapter):
    name = "janus"
    model_types = ("janus",)
    description = ("Hugging Face JanusForConditionalGeneration, Janus / Janus-Pro understanding (SigLIP-like tower + "
                   "MLP aligner + a Llama LM; image generation not exported)")
    model_class, processor_class = "JanusForConditionalGeneration", "JanusProcessor"

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        from transformers.models.janus.processing_janus import DEFAULT_SYSTEM_PROMPT

        # its processor puts a system prompt before every text it is given (in its "text" mode) where saved so
        prompt = DEFAULT_SYSTEM_PROMPT if loaded.processor.use_default_system_prompt else ""
        return replace(super().prompt_layout(loaded), text_before=prompt)
