"""PaliGemma (1 and 2): Hugging Face ``PaliGemmaForConditionalGeneration``.

SigLIP tower of a fixed input size -> its last hidden state -> one linear projection -> one row per patch,
spliced at the image tokens of a Gemma (PaliGemma 1) or Gemma 2 (PaliGemma 2) text model. A prefix LM,
as its processor lays the prompt out: the image tokens first, then the BOS, the prompt and a newline
(``prefix`` layout with ``text_before`` / ``text_after``; no chat template), and in the prefill the whole
prompt, images and text, attends to itself both ways (Hugging Face's ``token_type_ids`` 0 throughout a
prompt); the tokens it generates attend causally. Its positions count from 1.

The decoder makes that mask from the call's shape alone: every token of the call is one block, the
past's columns none. A prefill (no past) is then the bidirectional prompt; a decode step's one token is a
block of itself, which adds nothing to the causal mask. So ``DecoderGeometry.prefill_blocks`` is
``"prompt"``: the fusion pass leaves the attention as exported, and no prefill continues after a cached
prefix (every prompt token's K/V depends on the whole prompt).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..contract import DecoderGeometry, PromptLayout
from ..contract.spliced import SplicedScheme
from ..errors import AdapterError
from . import register
from .base import LoadedModel, Stage, VLMAdapter, check_image_size
from .decoder import SplicingDecoder, greedy_reference, last_hidden_state_stages, save_language_model, text_geometry
from .loading import load_hf_parts


class PrefixLMDecoder(SplicingDecoder):
    """The spliced decoder with PaliGemma's masks, its positions counted from 1 (its
    ``prepare_inputs_for_generation`` adds 1 to generate's) and its forward's final soft cap on the logits."""

    def __init__(self, *args, text_config, **kwargs):
        super().__init__(*args, **kwargs)
        self.text_config = text_config

    def forward(self, input_ids, image_embeds, attention_mask, position_ids, *past):
        return super().forward(input_ids, image_embeds, attention_mask, position_ids + 1, *past)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = getattr(self.text_config, "final_logit_softcapping", None)  # PaliGemma 2's Gemma 2: 30
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def attention_masks(self, input_ids, image_embeds, inputs_embeds, attention_mask, position_ids, cache):
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        batch, new = input_ids.shape
        # this call's tokens one block (PaliGemmaModel: token_type_ids 0 -> block 0), the past's columns none
        blocks = torch.cat([input_ids.new_full((batch, attention_mask.shape[1] - new), -1),
                            torch.zeros_like(input_ids)], dim=1)
        kwargs = dict(config=self.text_config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                      cache=cache, position_ids=position_ids, block_sequence_ids=blocks)
        full = create_causal_mask(**kwargs)
        if getattr(self.text_config, "sliding_window", None) is None:  # PaliGemma 1's Gemma: no window
            return full
        return {"full_attention": full, "sliding_attention": create_sliding_window_causal_mask(**kwargs)}


@register
class PaliGemmaAdapter(VLMAdapter):
    name = "paligemma"
    model_types = ("paligemma",)
    description = ("Hugging Face PaliGemmaForConditionalGeneration (SigLIP tower + linear projector + Gemma / Gemma 2, "
                   "a prefix LM)")

    def load(self, path: Path) -> LoadedModel:
        from transformers import PaliGemmaForConditionalGeneration

        model, tokenizer, processor = load_hf_parts(PaliGemmaForConditionalGeneration, path)
        cfg, path = model.config, Path(path)
        vocab = cfg.text_config.vocab_size
        if not 0 <= cfg.image_token_id < vocab:
            raise AdapterError(f"image_token_id {cfg.image_token_id} in {path / 'config.json'} is outside the language "
                               f"model's {vocab} token embeddings: save the model's own tokenizer and config together")
        if tokenizer.convert_tokens_to_ids("<image>") != cfg.image_token_id or not tokenizer.bos_token:
            raise AdapterError(f"the tokenizer in {path} has no '<image>' token of id {cfg.image_token_id} (the config's "
                               "image_token_id) or no BOS token, as PaliGemmaProcessor writes them: save the model's "
                               "own tokenizer (its processor adds them) beside it")
        loaded = LoadedModel(self, path, model, tokenizer, processor, cfg)
        size = cfg.vision_config.image_size
        check_image_size(loaded, (size, size))
        written, rows = getattr(processor, "image_seq_length", None), self.tokens_per_image(loaded)
        if written is not None and written != rows:
            raise AdapterError(f"the image processor in {path} says image_seq_length {written} but the vision tower "
                               f"gives {rows} rows per image (({size} // {cfg.vision_config.patch_size}) ** 2); "
                               f"Hugging Face's generate refuses this checkpoint too: set image_seq_length {rows}")
        return loaded

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        return last_hidden_state_stages(loaded, self.scheme(loaded), PrefixLMDecoder,
                                        text_config=loaded.config.text_config)

    def scheme(self, loaded: LoadedModel) -> SplicedScheme:
        return SplicedScheme(self.geometry(loaded), loaded.config.image_token_id)

    @staticmethod
    def tokens_per_image(loaded: LoadedModel) -> int:
        vision = loaded.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        # PaliGemmaProcessor: "<image>" x N per image, then BOS + prompt + "\n", tokenized without special tokens
        return PromptLayout(kind="prefix", image_token_id=loaded.config.image_token_id,
                            tokens_per_image=self.tokens_per_image(loaded), use_chat_template=False,
                            text_before=loaded.tokenizer.bos_token, text_after="\n")

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        geometry = text_geometry(loaded.config.text_config, loaded.model.model.language_model)
        return replace(geometry, prefill_blocks="prompt")

    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        # token_type_ids: what PaliGemmaProcessor returns for a prompt (0 throughout)
        return greedy_reference(loaded.model, input_ids, pixel_values, max_new_tokens, eos_token_ids,
                                token_type_ids=torch.zeros_like(input_ids))

    def write_text_model(self, loaded: LoadedModel, out: Path) -> Path:
        return save_language_model(loaded, out)
