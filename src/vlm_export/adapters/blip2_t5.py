"""BLIP-2 with an encoder-decoder language model: Hugging Face ``Blip2ForConditionalGeneration`` whose
text model is a T5 (Flan-T5; the config's ``use_decoder_only_language_model`` is false). The T5 side
(``T5LanguageModel``) serves InstructBLIP with a Flan-T5 too (``instructblip.py``).

BLIP-2's image path (``vision_encoder``, ``qformer``: the same modules as ``blip2.py``), then the
``encoder_decoder`` scheme's two stages (``contract/encdec.py``):

* ``lm_encoder``: the prompt's token embeddings with the query embeddings spliced in at the image
  tokens (HF's ``masked_scatter``, row-major) -> the T5 encoder -> its last hidden states, and every
  decoder layer's cross-attention K/V (``EncDecAttention.k``/``.v`` of those states), computed once.
* ``lm_decoder``: the T5 decoder reading its self-attention past and those cross K/V from an
  ``EncoderDecoderCache`` whose cross part is pre-filled and marked updated for every layer, so HF's
  own layers use it instead of projecting the encoder output again; the LM head as the model's own
  forward applies it (``scale_decoder_outputs``). T5's relative position bias is computed per row from
  ``position_ids`` (the queries') and the attention mask (each real key's position: its count of real
  columns before it), not from the cache's length as HF's ``compute_bias`` does: one row alone gets
  HF's bias, and rows at different lengths in one buffer (``contract.scheme.SlotBatch``) or with masked
  holes each get their own distances, so the decoder's KV can be one buffer written in place.

The decoder's prompt is the generation config's ``decoder_start_token_id`` (+ a forced BOS where
the model has one); the user's prompt is laid out exactly as ``Blip2Processor`` does (image tokens
in front, the tokenizer's ``</s>`` at the end), checked against the processor at load.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import ClassVar

import torch
from torch import nn

from ..contract import DecoderGeometry
from ..contract.encdec import ENCODER_STAGE, EncoderDecoderScheme
from . import register
from .base import LoadedModel, Stage
from .blip2 import Blip2Adapter
from .decoder import splice_image_rows
from .encdec import (cross_key_values, encdec_scheme, lm_decoder_stage, lm_encoder_stage, prefilled_cache,
                     reference_tokens, self_present)


class T5LMEncoder(nn.Module):
    """``(input_ids, attention_mask, image_embeds) -> (encoder_hidden_states, cross_key_values)``."""

    def __init__(self, t5: nn.Module, image_token_id: int):
        super().__init__()
        self.t5 = t5
        self.image_token_id = int(image_token_id)
        self.cross = [block.layer[1].EncDecAttention for block in t5.decoder.block]

    def forward(self, input_ids, attention_mask, image_embeds):
        embeds = splice_image_rows(self.t5.get_input_embeddings(), input_ids, image_embeds, self.image_token_id)
        hidden = self.t5.encoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        return hidden, cross_key_values(hidden, [(a.k, a.v) for a in self.cross], self.t5.config.d_kv)


class T5LMDecoder(nn.Module):
    """``(input_ids, attention_mask, position_ids, encoder_attention_mask, cross_key_values, *past) ->
    (logits [batch, 1, vocab], *present)``."""

    def __init__(self, t5: nn.Module):
        super().__init__()
        self.t5 = t5
        self.layers = len(t5.decoder.block)

    def forward(self, input_ids, attention_mask, position_ids, encoder_attention_mask, cross_key_values, *past):
        cache = prefilled_cache(past, cross_key_values)
        first = self.t5.decoder.block[0].layer[0].SelfAttention  # computes the bias every layer reads
        key_positions = attention_mask.cumsum(-1) - 1  # a real key's position in its row (masked keys: unread)
        buckets = first._relative_position_bucket(
            key_positions[:, None, :] - position_ids[:, :, None], bidirectional=False,
            num_buckets=first.relative_attention_num_buckets, max_distance=first.relative_attention_max_distance)
        bias = first.relative_attention_bias(buckets).permute(0, 3, 1, 2)  # [batch, heads, sequence, total]
        # the cross-attention runs only when encoder states are given; their values are never read
        # (is_updated), their length sizes the encoder mask: a view of the cross keys has both
        keys = cross_key_values[:, 0]
        stand_in = keys.transpose(1, 2).reshape(keys.shape[0], keys.shape[2], -1)
        with _bias_given(first, bias):
            out = self.t5.decoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=stand_in,
                                  encoder_attention_mask=encoder_attention_mask, cache=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1:]
        cfg = self.t5.config
        # T5ForConditionalGeneration.forward's own rule (transformers < 5: the tied-embeddings flag)
        if getattr(cfg, "scale_decoder_outputs", getattr(cfg, "tie_word_embeddings", False)):
            hidden = hidden * (cfg.d_model ** -0.5)
        logits = self.t5.lm_head(hidden)
        return (logits, *self_present(cache, self.layers))


@contextmanager
def _bias_given(attention: nn.Module, bias: torch.Tensor):
    """``attention.compute_bias`` returns ``bias`` while inside (HF's T5 computes it in its first layer's
    self-attention and passes it down the stack; no argument takes one from outside)."""
    attention.compute_bias = lambda *args, **kwargs: bias
    try:
        yield
    finally:
        del attention.compute_bias  # the class's own again


class T5LanguageModel:
    """The language-model side of a Q-Former model whose LM is a T5 (mixed in before BLIP-2's or
    InstructBLIP's adapter, which give the image path): the ``encoder_decoder`` scheme's ``lm_encoder``
    and ``lm_decoder`` stages, its geometry, the T5's fp32 modules and the reference."""

    decoder_only: ClassVar[bool] = False

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        t = loaded.config.text_config
        # relative positions: no table bounds them; n_positions is the length the model was made for
        return DecoderGeometry(num_layers=t.num_decoder_layers, num_kv_heads=t.num_heads, head_dim=t.d_kv,
                               hidden_size=t.d_model, vocab_size=t.vocab_size,
                               max_position_embeddings=getattr(t, "n_positions", None) or 512)

    def scheme(self, loaded: LoadedModel) -> EncoderDecoderScheme:
        return encdec_scheme(loaded, self.geometry(loaded), self.generation_config(loaded))

    def language_stages(self, loaded: LoadedModel) -> list[Stage]:
        scheme = self.scheme(loaded)
        return [lm_encoder_stage(scheme, T5LMEncoder(loaded.model.language_model, scheme.image_token_id)),
                lm_decoder_stage(scheme, T5LMDecoder(loaded.model.language_model))]

    def decoder_stage(self, loaded: LoadedModel) -> Stage:
        return lm_decoder_stage(self.scheme(loaded), T5LMDecoder(loaded.model.language_model))

    def fp32_modules(self, loaded: LoadedModel) -> dict[str, tuple[str, ...]]:
        # T5 overflows fp16 in its feed-forward output: HF keeps ``wo`` in fp32 (and so the residual sum)
        keep = tuple(getattr(loaded.model.language_model, "_keep_in_fp32_modules", None) or ())
        return {ENCODER_STAGE: keep, EncoderDecoderScheme.decoder_stage: keep} if keep else {}

    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        """HF generate as the model's documentation runs it (``processor(images, text)`` ->
        ``model.generate``), our pixels in; text-only prompts to the T5 itself. Its output starts with
        the decoder's prompt (start token, forced tokens), which ours does not count as generated."""
        from PIL import Image

        text = loaded.config.text_config
        # transformers 5.24 sizes generate's cache by the encoder's depth: a deeper decoder's layer past it
        # fails (IndexError) with the cache; without it, the same maths recomputed per token
        cache = (text.num_decoder_layers or text.num_layers) <= text.num_layers
        common = dict(do_sample=False, num_beams=1, eos_token_id=eos_token_ids, pad_token_id=text.pad_token_id,
                      use_cache=cache)
        if pixel_values is None:
            return reference_tokens(loaded.model.language_model.generate, self.scheme(loaded), max_new_tokens,
                                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **common)
        blank = [Image.new("RGB", (8, 8))] * pixel_values.shape[0]  # only the processor's text output is used
        inputs = loaded.processor(images=blank, text=prompt, return_tensors="pt")
        inputs["pixel_values"] = pixel_values
        return reference_tokens(loaded.model.generate, self.scheme(loaded), max_new_tokens, **inputs, **common)


@register
class Blip2T5Adapter(T5LanguageModel, Blip2Adapter):
    name = "blip2_t5"
    description = ("Hugging Face Blip2ForConditionalGeneration with an encoder-decoder LM (Flan-T5): ViT + Q-Former "
                   "+ T5 encoder (once per prompt) + T5 decoder")
