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

from ..contract import DecoderGeometry, PromptLayout
from ..contract.encdec import EncoderDecoderScheme
from ..errors import AdapterError
from ..runtime.prompt import build_prompt_ids
from . import register
from .base import LoadedModel, Stage, VLMAdapter
from .decoder import image_path_stages, splice_image_rows
from .encdec import (cross_key_values, encdec_scheme, lm_decoder_stage, lm_encoder_stage, prefilled_cache,
                     reference_tokens, self_present)
from .loading import load_hf_parts, load_processor, run_processor
PROBE_PROMPTS = ("What is in the picture?", "<CAPTION>", "<CAPTION_TO_PHRASE_GROUNDING>a dog")


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

    def __init__(self, language_model: nn.Module, image_token_id: int):
        super().__init__()
        self.embed_tokens = language_model.get_input_embeddings()  # BART's scaled word embedding
        self.encoder = language_model.encoder
        self.cross = nn.ModuleList([layer.encoder_attn for layer in language_model.decoder.layers])
        self.image_token_id = int(image_token_id)

    def forward(self, input_ids, attention_mask, image_embeds):
        embeds = splice_image_rows(self.embed_tokens, input_ids, image_embeds, self.image_token_id)
        states = self.encoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        return states, cross_key_values(states, [(a.k_proj, a.v_proj) for a in self.cross], self.cross[0].head_dim)


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
        cache = prefilled_cache(past, cross_key_values)
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
        return (logits, *self_present(cache, layers))


@register
class Florence2Adapter(VLMAdapter):
    name = "florence2"
    model_types = ("florence2",)
    description = ("Hugging Face Florence2ForConditionalGeneration (DaViT vision tower + projector, BART encoder "
                   "once per prompt, BART decoder with cross K/V)")
    max_images = 1  # the processor writes one image's tokens in front of each prompt
    caption_prompt = "<CAPTION>"  # the task token its model card captions with

    def load(self, path: Path) -> LoadedModel:
        from transformers import Florence2ForConditionalGeneration, Florence2Processor

        model, tokenizer, image_processor = load_hf_parts(Florence2ForConditionalGeneration, path)
        cfg = model.config
        processor = load_processor(Florence2Processor, path, cfg.image_token_id)
        loaded = LoadedModel(self, Path(path), model, tokenizer, image_processor, cfg, processor=processor)
        self._check_processor(loaded)
        return loaded

    def image_size(self, loaded: LoadedModel) -> tuple[int, int]:
        ip = loaded.image_processor
        size = ip.crop_size if getattr(ip, "do_center_crop", False) else ip.size
        if "height" not in size:
            raise AdapterError(f"the image processor in {loaded.path} resizes to {dict(size)}, not to a fixed height and "
                               "width; Florence-2's processor gives every image one size (size: {height, width})")
        return int(size["height"]), int(size["width"])

    def _check_processor(self, loaded: LoadedModel) -> None:
        """The projector's rows per image must be the processor's image tokens, and our prompt ids the
        processor's own for a probe prompt."""
        from PIL import Image

        h, w = self.image_size(loaded)
        m = loaded.model
        with torch.no_grad():
            rows = m.model.multi_modal_projector(m.model.vision_tower(torch.zeros(1, 3, h, w)).last_hidden_state).shape[1]
        if rows != loaded.processor.num_image_tokens:
            raise AdapterError(f"the processor in {loaded.path} writes {loaded.processor.num_image_tokens} image tokens "
                               f"per image but the projector gives {rows} rows for a {h}x{w} image; set its "
                               f"image_seq_length to {rows}")
        for probe in PROBE_PROMPTS:
            theirs = run_processor(loaded.processor, loaded.path, text=probe, images=Image.new("RGB", (w, h)))["input_ids"][0]
            ours = build_prompt_ids(loaded.tokenizer, self.prompt_layout(loaded), probe, 1)
            if list(theirs) != ours:
                raise AdapterError(f"the processor in {loaded.path} lays out the prompt {probe!r} differently from "
                                   f"its tokenizer ({len(theirs)} vs {len(ours)} tokens); save them together")

    # ---- declarations ----------------------------------------------------------------------
    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        t = loaded.config.text_config
        return DecoderGeometry(num_layers=t.decoder_layers, num_kv_heads=t.decoder_attention_heads,
                               head_dim=t.d_model // t.decoder_attention_heads, hidden_size=t.d_model,
                               vocab_size=t.vocab_size, max_position_embeddings=t.max_position_embeddings)

    def scheme(self, loaded: LoadedModel) -> EncoderDecoderScheme:
        return encdec_scheme(loaded, self.geometry(loaded), self.generation_config(loaded))

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        # the processor: its task tokens rewritten ("<CAPTION>" -> "What does the image describe?"), image
        # tokens in front, then the text between <s> and </s> (the BART tokenizer's own), no chat template
        processor = loaded.processor
        tasks = {**processor.task_prompts_without_inputs, **processor.task_prompts_with_input}
        return PromptLayout(kind="prefix", image_token_id=loaded.config.image_token_id,
                            tokens_per_image=processor.num_image_tokens, use_chat_template=False,
                            add_special_tokens=True, task_prompts=tasks)

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        m = loaded.model
        scheme = self.scheme(loaded)
        return [*image_path_stages(Florence2Vision(m.model.vision_tower), m.model.multi_modal_projector,
                                   self.image_size(loaded)),
                self._encoder_stage(loaded, scheme), self._decoder_stage(loaded, scheme)]

    def _encoder_stage(self, loaded: LoadedModel, scheme: EncoderDecoderScheme) -> Stage:
        return lm_encoder_stage(scheme, Florence2Encoder(loaded.model.model.language_model, scheme.image_token_id))

    def _decoder_stage(self, loaded: LoadedModel, scheme: EncoderDecoderScheme) -> Stage:
        return lm_decoder_stage(scheme, Florence2Decoder(loaded.model.model.language_model, loaded.model.lm_head))

    # ---- the reference ---------------------------------------------------------------------
    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        """HF generate as Florence-2's model card runs it (``processor(text=prompt, images=image)`` ->
        ``model.generate(input_ids, pixel_values)``), our pixels in, greedy: one beam (the generation
        config's beam search is not what a greedy build runs; its n-gram ban is, as the build applies
        it too). The forced BOS is
        counted by HF as a new token and is the decoder's prompt here, so HF runs that many tokens
        longer; its forced EOS at the length limit is off (a limit, not the model's choice)."""
        from PIL import Image

        common = dict(do_sample=False, num_beams=1, forced_eos_token_id=None,
                      eos_token_id=eos_token_ids, pad_token_id=loaded.config.text_config.pad_token_id)
        if pixel_values is None:  # no processor form for text alone: our ids
            inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        else:
            h, w = pixel_values.shape[-2:]
            text = loaded.processor(text=prompt, images=[Image.new("RGB", (w, h))] * pixel_values.shape[0],
                                    return_tensors="pt")  # only its text output is used
            inputs = dict(input_ids=text["input_ids"], pixel_values=pixel_values, attention_mask=text["attention_mask"])
        return reference_tokens(loaded.model.generate, self.scheme(loaded), max_new_tokens, **inputs, **common)
