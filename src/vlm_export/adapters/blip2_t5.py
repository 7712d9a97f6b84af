"""BLIP-2 with an encoder-decoder language model: Hugging Face ``Blip2ForConditionalGeneration`` whose
text model is a T5 (Flan-T5; the config's ``use_decoder_only_language_model`` is false).

BLIP-2's image path (``vision_encoder``, ``qformer``: the same modules as ``blip2.py``), then the
``encoder_decoder`` scheme's two stages (``contract/encdec.py``):

* ``lm_encoder``: the prompt's token embeddings with the query embeddings spliced in at the image
  tokens (HF's ``masked_scatter``, row-major) -> the T5 encoder -> its last hidden states, and every
  decoder layer's cross-attention K/V (``EncDecAttention.k``/``.v`` of those states), computed once.
* ``lm_decoder``: the T5 decoder reading its self-attention past and those cross K/V from an
  ``EncoderDecoderCache`` whose cross part is pre-filled and marked updated for every layer, so HF's
  own layers use it instead of projecting the encoder output again; the LM head as the model's own
  forward applies it (``scale_decoder_outputs``). T5's relative position bias is computed from the
  cache's length (HF's ``cache_position``): left padding keeps the distances between a row's real
  tokens, so ``position_ids`` are not read.

The decoder's prompt is the generation config's ``decoder_start_token_id`` (+ a forced BOS where
the model has one); the user's prompt is laid out exactly as ``Blip2Processor`` does (image tokens
in front, the tokenizer's ``</s>`` at the end), checked against the processor at load.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from ..contract import DECODER_PRECISIONS, DecoderGeometry
from ..contract.encdec import ENCODER_STAGE, EncoderDecoderScheme
from ..errors import AdapterError
from . import register
from .base import LoadedModel, Stage
from .blip2 import QFormerAdapterBase, QFormerProjector, VisionEncoder
from .decoder import image_path_stages, splice_image_rows

EXAMPLE_BATCH, EXAMPLE_ENCODER_SEQ, EXAMPLE_SEQ, EXAMPLE_PAST, EXAMPLE_CROSS_SEQ = 2, 7, 3, 4, 5


def decoder_prompt_ids(generation_config, text_config) -> list[int]:
    """The decoder's own prompt, as HF generate starts it: ``decoder_start_token_id`` (the generation
    config's, else the text config's), then ``forced_bos_token_id`` where the model forces one."""
    start = getattr(generation_config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(text_config, "decoder_start_token_id", None)
    if start is None:
        raise AdapterError("the model's generation config and text config have no decoder_start_token_id")
    forced = getattr(generation_config, "forced_bos_token_id", None)
    return [int(start)] + ([int(forced)] if forced is not None else [])


def cross_key_values(hidden: torch.Tensor, attentions: list[nn.Module], heads: int, head_dim: int) -> torch.Tensor:
    """``[batch, 2 x layers, heads, encoder_sequence, head_dim]``: each cross-attention's k and v
    projections of the encoder's output, as the attention itself projects them."""
    batch = hidden.shape[0]
    out = []
    for attn in attentions:
        for proj in (attn.k, attn.v):
            out.append(proj(hidden).view(batch, -1, heads, head_dim).transpose(1, 2))
    return torch.stack(out, dim=1)


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
        cfg = self.t5.config
        return hidden, cross_key_values(hidden, self.cross, cfg.num_heads, cfg.d_kv)


class T5LMDecoder(nn.Module):
    """``(input_ids, attention_mask, position_ids, encoder_attention_mask, cross_key_values, *past) ->
    (logits [batch, 1, vocab], *present)``."""

    def __init__(self, t5: nn.Module):
        super().__init__()
        self.t5 = t5
        self.layers = len(t5.decoder.block)

    def forward(self, input_ids, attention_mask, position_ids, encoder_attention_mask, cross_key_values, *past):
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        for i in range(self.layers):
            cache.self_attention_cache.update(past[2 * i], past[2 * i + 1], i)
            cache.cross_attention_cache.update(cross_key_values[:, 2 * i], cross_key_values[:, 2 * i + 1], i)
            cache.is_updated[i] = True  # HF's layers read the cross K/V from the cache, never project again
        # the cross-attention runs only when encoder states are given; their values are never read
        # (is_updated), their length sizes the encoder mask: a view of the cross keys has both
        keys = cross_key_values[:, 0]
        stand_in = keys.transpose(1, 2).reshape(keys.shape[0], keys.shape[2], -1)
        out = self.t5.decoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=stand_in,
                              encoder_attention_mask=encoder_attention_mask, cache=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1:]
        cfg = self.t5.config
        # T5ForConditionalGeneration.forward's own rule (transformers < 5: the tied-embeddings flag)
        if getattr(cfg, "scale_decoder_outputs", getattr(cfg, "tie_word_embeddings", False)):
            hidden = hidden * (cfg.d_model ** -0.5)
        logits = self.t5.lm_head(hidden)
        present = []
        for layer in cache.self_attention_cache.layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (logits, *present)


@register
class Blip2T5Adapter(QFormerAdapterBase):
    name = "blip2_t5"
    model_types = ("blip-2",)
    description = ("Hugging Face Blip2ForConditionalGeneration with an encoder-decoder LM (Flan-T5): ViT + Q-Former "
                   "+ T5 encoder (once per prompt) + T5 decoder")
    model_cls = "Blip2ForConditionalGeneration"
    processor_cls = "Blip2Processor"
    decoder_only: ClassVar[bool] = False

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        t = loaded.config.text_config
        # relative positions: no table bounds them; n_positions is the length the model was made for
        return DecoderGeometry(num_layers=t.num_decoder_layers, num_kv_heads=t.num_heads, head_dim=t.d_kv,
                               hidden_size=t.d_model, vocab_size=t.vocab_size,
                               max_position_embeddings=getattr(t, "n_positions", None) or 512)

    def scheme(self, loaded: LoadedModel) -> EncoderDecoderScheme:
        cfg = loaded.config
        pad = loaded.tokenizer.pad_token_id
        if pad is None or pad == cfg.image_token_id:
            pad = cfg.text_config.pad_token_id
        return EncoderDecoderScheme(self.geometry(loaded), cfg.image_token_id,
                                    decoder_prompt_ids(loaded.model.generation_config, cfg.text_config), pad)

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        m = loaded.model
        qformer = QFormerProjector(m.query_tokens, m.qformer, m.language_projection)
        scheme = self.scheme(loaded)
        return [*image_path_stages(VisionEncoder(m.vision_model), qformer, self.image_size(loaded),
                                   projector_name="qformer", projector_follows_default=False),
                self._encoder_stage(loaded, scheme), self._decoder_stage(loaded, scheme)]

    def decoder_stage(self, loaded: LoadedModel) -> Stage:
        return self._decoder_stage(loaded, self.scheme(loaded))

    def _encoder_stage(self, loaded: LoadedModel, scheme: EncoderDecoderScheme) -> Stage:
        g = scheme.geometry
        gen = torch.Generator().manual_seed(3)
        ids = torch.randint(3, min(g.vocab_size, 1000), (EXAMPLE_BATCH, EXAMPLE_ENCODER_SEQ), generator=gen)
        ids[ids == scheme.image_token_id] = 3
        ids[0, :2] = ids[1, 0] = scheme.image_token_id  # 2 + 1 placeholders -> 3 rows of image_embeds
        mask = torch.ones_like(ids)
        mask[1, -2:] = 0  # a shorter prompt, padded on the right
        ids[1, -2:] = scheme.pad_id
        example = (ids, mask, torch.randn(3, g.hidden_size, generator=gen))
        module = T5LMEncoder(loaded.model.language_model, scheme.image_token_id).eval()
        return Stage(scheme.encoder_spec(DECODER_PRECISIONS), module, example)

    def _decoder_stage(self, loaded: LoadedModel, scheme: EncoderDecoderScheme) -> Stage:
        g = scheme.geometry
        gen = torch.Generator().manual_seed(4)
        batch, seq, past, cross = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST, EXAMPLE_CROSS_SEQ
        ids = torch.randint(0, min(g.vocab_size, 1000), (batch, seq), generator=gen)
        total = past + seq
        self_mask = torch.ones(batch, total, dtype=torch.int64)
        self_mask[1, :2] = 0  # a row that joined later: left padding
        encoder_mask = torch.ones(batch, cross, dtype=torch.int64)
        encoder_mask[0, -2:] = 0  # a shorter prompt: the encoder axis padded on the right
        kv = torch.randn(batch, 2 * g.num_layers, g.num_kv_heads, cross, g.head_dim, generator=gen)
        past_kv = [torch.randn(batch, g.num_kv_heads, past, g.head_dim, generator=gen) for _ in range(2 * g.num_layers)]
        example = (ids, self_mask, torch.arange(past, total).repeat(batch, 1), encoder_mask, kv, *past_kv)
        return Stage(scheme.decoder_spec(DECODER_PRECISIONS), T5LMDecoder(loaded.model.language_model).eval(), example)

    def fp32_modules(self, loaded: LoadedModel) -> dict[str, tuple[str, ...]]:
        # T5 overflows fp16 in its feed-forward output: HF keeps ``wo`` in fp32 (and so the residual sum)
        keep = tuple(getattr(loaded.model.language_model, "_keep_in_fp32_modules", None) or ())
        return {ENCODER_STAGE: keep, EncoderDecoderScheme.decoder_stage: keep} if keep else {}

    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        """HF generate as BLIP-2-T5's documentation runs it (``processor(images, text)`` ->
        ``model.generate``), our pixels in; text-only prompts to the T5 itself. Its output starts with
        the decoder's prompt (start token, forced tokens), which ours does not count as generated."""
        from PIL import Image

        common = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_token_ids,
                      pad_token_id=loaded.config.text_config.pad_token_id)
        with torch.no_grad():
            if pixel_values is None:
                out = loaded.model.language_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                                           **common)
            else:
                blank = [Image.new("RGB", (8, 8))] * pixel_values.shape[0]  # only the processor's text output is used
                inputs = loaded.processor(images=blank, text=prompt, return_tensors="pt")
                inputs["pixel_values"] = pixel_values
                out = loaded.model.generate(**inputs, **common)
        return out[0, len(self.scheme(loaded).decoder_prompt_ids):].tolist()
