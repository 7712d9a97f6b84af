"""Pieces shared by the encoder-decoder adapters (``blip2_t5``, ``florence2``): the ``encoder_decoder``
scheme's declaration from a model's configs, the example inputs its two stages are traced with, the
pre-filled cross-attention cache the decoder stage runs HF's own layers on, and the HF-generate
reference's length and slice. Helpers, not an adapter: nothing here is registered.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from ..contract import DECODER_PRECISIONS, DecoderGeometry
from ..contract.encdec import EncoderDecoderScheme
from ..errors import AdapterError
from .base import LoadedModel, Stage

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


def encdec_scheme(loaded: LoadedModel, geometry: DecoderGeometry, generation_config) -> EncoderDecoderScheme:
    """The scheme of a model whose config has ``image_token_id`` and a ``text_config``; the padding id
    is the tokenizer's unless it is missing or the image token (then the text config's).
    ``generation_config``: the one HF's generate decodes with (the model's own, or its language model's
    where generate hands over to it, as BLIP-2's does)."""
    cfg = loaded.config
    pad = loaded.tokenizer.pad_token_id
    if pad is None or pad == cfg.image_token_id:
        pad = cfg.text_config.pad_token_id
    return EncoderDecoderScheme(geometry, cfg.image_token_id,
                                decoder_prompt_ids(generation_config, cfg.text_config), pad)


def cross_key_values(hidden: torch.Tensor, projections: Iterable[tuple[nn.Module, nn.Module]],
                     head_dim: int) -> torch.Tensor:
    """``[batch, 2 x layers, heads, encoder_sequence, head_dim]``: each decoder layer's cross-attention
    (k, v) projections of the encoder's output, split into heads as the attention itself does."""
    batch, seq, _ = hidden.shape
    out = []
    for k, v in projections:
        out += [k(hidden).view(batch, seq, -1, head_dim).transpose(1, 2),
                v(hidden).view(batch, seq, -1, head_dim).transpose(1, 2)]
    return torch.stack(out, dim=1)


def prefilled_cache(past: Sequence[torch.Tensor], cross_key_values: torch.Tensor) -> EncoderDecoderCache:
    """An ``EncoderDecoderCache`` holding the self-attention past (``k0, v0, k1, v1, ...``) and the
    cross K/V, every layer's cross part marked updated: HF's layers read it, never project again."""
    layers = len(past) // 2
    self_cache, cross_cache = DynamicCache(), DynamicCache()
    for i in range(layers):
        self_cache.update(past[2 * i], past[2 * i + 1], i)
        cross_cache.update(cross_key_values[:, 2 * i], cross_key_values[:, 2 * i + 1], i)
    cache = EncoderDecoderCache(self_cache, cross_cache)
    for i in range(layers):
        cache.is_updated[i] = True
    return cache


def self_present(cache: EncoderDecoderCache, layers: int) -> list[torch.Tensor]:
    """The grown self-attention cache as the stage's outputs, ``k0, v0, k1, v1, ...``."""
    present = []
    for layer in cache.self_attention_cache.layers[:layers]:
        present += [layer.keys, layer.values]
    return present


def lm_encoder_stage(scheme: EncoderDecoderScheme, module: nn.Module) -> Stage:
    """The ``lm_encoder`` stage with its example: two prompts with 2 + 1 image placeholders (3 rows of
    ``image_embeds``), the second shorter and padded on the right."""
    g = scheme.geometry
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, min(g.vocab_size, 1000), (EXAMPLE_BATCH, EXAMPLE_ENCODER_SEQ), generator=gen)
    ids[ids == scheme.image_token_id] = 3
    ids[0, :2] = ids[1, 0] = scheme.image_token_id
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    ids[1, -2:] = scheme.pad_id
    example = (ids, mask, torch.randn(3, g.hidden_size, generator=gen))
    return Stage(scheme.encoder_spec(DECODER_PRECISIONS), module.eval(), example)


def lm_decoder_stage(scheme: EncoderDecoderScheme, module: nn.Module) -> Stage:
    """The ``lm_decoder`` stage with its example: a second row that joined later (left-padded by 2 in
    the self cache, its positions 2 behind) and a first row whose prompt was shorter (the encoder axis
    padded on the right)."""
    g = scheme.geometry
    gen = torch.Generator().manual_seed(4)
    batch, seq, past, cross = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST, EXAMPLE_CROSS_SEQ
    ids = torch.randint(0, min(g.vocab_size, 1000), (batch, seq), generator=gen)
    total = past + seq
    self_mask = torch.ones(batch, total, dtype=torch.int64)
    self_mask[1, :2] = 0
    positions = torch.stack([torch.arange(past, total), torch.arange(past - 2, total - 2)])
    encoder_mask = torch.ones(batch, cross, dtype=torch.int64)
    encoder_mask[0, -2:] = 0
    kv = torch.randn(batch, 2 * g.num_layers, g.num_kv_heads, cross, g.head_dim, generator=gen)
    past_kv = [torch.randn(batch, g.num_kv_heads, past, g.head_dim, generator=gen) for _ in range(2 * g.num_layers)]
    example = (ids, self_mask, positions, encoder_mask, kv, *past_kv)
    return Stage(scheme.decoder_spec(DECODER_PRECISIONS), module.eval(), example)


def reference_tokens(generate: Callable[..., torch.Tensor], scheme: EncoderDecoderScheme, max_new_tokens: int,
                     **kwargs) -> list[int]:
    """Greedy HF generate of ``max_new_tokens`` of ours, the first row's. HF's output starts with the
    decoder's prompt (start token, forced BOS), which ours does not count as generated; HF counts a
    forced BOS as a new token, so it runs that many tokens longer."""
    start = len(scheme.decoder_prompt_ids)
    with torch.no_grad():
        out = generate(max_new_tokens=max_new_tokens + start - 1, **kwargs)
    return out[0, start:].tolist()
