"""Florence-2: Hugging Face ``Florence2ForConditionalGeneration`` (DaViT vision tower, a projector,
a BART encoder-decoder), decoded by the ``encoder_decoder`` scheme (``contract/encdec.py``).

Stages:

* ``vision_encoder``: the DaViT backbone, ``pixel_values [images, 3, H, W]`` -> its last feature map
  ``image_features [images, C, h, w]``.
* ``projector``: ``multi_modal_projector`` (learned 2-D position embeddings, the 1-D temporal
  embedding, spatial + temporal pooling, linear + LayerNorm) -> ``image_embeds [images, h x w + 1,
  hidden]``: exactly what ``get_image_features`` returns as its pooled output.
* ``lm_encoder``: the BART encoder over the prompt's token embeddings with the image rows spliced in
  at the ``<image>`` ids (the order ``masked_scatter`` fills), -> ``encoder_hidden_states`` and the
  cross-attention keys and values of every decoder layer (``cross_key_values``), computed once per
  prompt; decode steps only read them.
* ``lm_decoder``: the BART decoder, one or more new tokens with their ``position_ids`` (BART's
  positions are learned and absolute: a row's position counts its own decoder tokens), the
  self-attention cache and the fixed cross K/V under the encoder's padding mask, -> logits of the
  last position and the grown self cache.

The prompt is Florence-2's task prompt as its processor expands it (``<CAPTION>`` -> "What does the
image describe?"), laid out ``<image> x N, <s>, text, </s>``; the decoder starts from the generation
config's ``decoder_start_token_id`` with ``forced_bos_token_id`` forced first.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from .base import LoadedModel, Stage, VLMAdapter
from .decoder import SplicingDecoder, image_path_stages

EXAMPLE_BATCH, EXAMPLE_ENCODER_SEQ, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 7, 3, 4


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # float32's lowest, not -inf: a fully masked row stays finite (see contract/scheme.py)
    return torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype))


class Florence2Vision(nn.Module):
    """``pixel_values [images, 3, H, W]`` -> the DaViT's last feature map ``[images, C, h, w]``."""

    def __init__(self, vision_tower: nn.Module):
        super().__init__()
        self.vision_tower = vision_tower

    def forward(self, pixel_values):
        return self.vision_tower(pixel_values).last_hidden_state


class Florence2Encoder(nn.Module):
    """``(input_ids [batch, encoder_sequence], attention_mask, image_embeds [image_tokens, hidden])``
    -> ``(encoder_hidden_states [batch, encoder_sequence, hidden], cross_key_values [batch,
    2 x decoder layers, heads, encoder_sequence, head_dim])``: Florence2Model's embedding + splice +
    BART encoder, then each decoder layer's ``encoder_attn`` k/v projections of the encoder states
    (what BartAttention computes at the first decoder call and caches). The batch is RIGHT-padded:
    BART's encoder positions are ``arange(sequence)`` whatever the mask."""

    embed = SplicingDecoder.embed  # the row-major splice of the decoder-only adapters, export-friendly

    def __init__(self, language_model: nn.Module, image_token_id: int):
        super().__init__()
        self.embed_tokens = language_model.get_input_embeddings()  # BART's scaled word embedding
        self.encoder = language_model.encoder
        self.cross = nn.ModuleList([layer.encoder_attn for layer in language_model.decoder.layers])
        self.image_token_id = int(image_token_id)

    def forward(self, input_ids, attention_mask, image_embeds):
        states = self.encoder(inputs_embeds=self.embed(input_ids, image_embeds),
                              attention_mask=attention_mask).last_hidden_state
        batch, seq, _ = states.shape
        kv = []
        for attn in self.cross:
            shape = (batch, seq, -1, attn.head_dim)
            kv += [attn.k_proj(states).view(shape).transpose(1, 2), attn.v_proj(states).view(shape).transpose(1, 2)]
        return states, torch.stack(kv, dim=1)


class Florence2Decoder(nn.Module):
    """``(input_ids [batch, sequence], attention_mask [batch, total_sequence], position_ids [batch,
    sequence], encoder_attention_mask [batch, encoder_sequence], cross_key_values, *self past)`` ->
    ``(logits [batch, 1, vocab], *self present)``: BartDecoder's forward with an EncoderDecoderCache
    whose cross part is pre-filled (``is_updated`` for every layer, so no layer recomputes it), the
    positions given per row (rows left-padded in the self cache), and the LM head on the last position."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.decoder = language_model.decoder
        self.lm_head = lm_head

    def forward(self, input_ids, attention_mask, position_ids, encoder_attention_mask, cross_key_values, *past):
        dec = self.decoder
        layers = len(dec.layers)
        self_cache, cross_cache = DynamicCache(), DynamicCache()
        for i in range(layers):
            self_cache.update(past[2 * i], past[2 * i + 1], i)
            cross_cache.update(cross_key_values[:, 2 * i], cross_key_values[:, 2 * i + 1], i)
        cache = EncoderDecoderCache(self_cache, cross_cache)
        for i in range(layers):
            cache.is_updated[i] = True
        embeds = dec.embed_tokens(input_ids)
        positions = nn.functional.embedding(position_ids + dec.embed_positions.offset, dec.embed_positions.weight)
        hidden = dec.layernorm_embedding(embeds + positions)
        seq, total = input_ids.shape[1], attention_mask.shape[1]
        # key column k is visible to new token i when it is real and not after it (rows right-aligned)
        causal = torch.arange(total)[None, :] <= (torch.arange(seq) + (total - seq))[:, None]
        self_mask = _additive((attention_mask[:, None, None, :] > 0) & causal[None, None], hidden.dtype)
        cross_mask = _additive(encoder_attention_mask[:, None, None, :] > 0, hidden.dtype)
        for layer in dec.layers:
            # encoder_hidden_states only switches the cross block on: its K/V come from the cache
            hidden = layer(hidden, self_mask, cross_key_values, encoder_attention_mask=cross_mask, cache=cache,
                           use_cache=True)
        logits = self.lm_head(hidden[:, -1:])
        present = []
        for layer in self_cache.layers[:layers]:
            present += [layer.keys, layer.values]
        return (logits, *present)
