"""Hybrid LMs: attention layers that keep a K/V cache beside token mixers that keep per-row fixed-size states
(Qwen3.5's gated delta-nets, LFM3's gated short convolutions).

A :class:`Mixer` says what one such layer kind is: the module of a layer that mixes tokens, a function that runs it
on the new tokens from its states and returns the replaced states, and the states it keeps (from the config).
:class:`HybridDecoder` runs Hugging Face's own text model with each mixer module's ``forward`` replaced for the call
by its function, so the model's own layers, norms, MLPs and attention run as they are; ``hybrid_geometry`` declares
the attention layers' K/V and every mixer's states (``DecoderGeometry.states``). Each architecture family's mixer
lives in its adapter's file.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..contract import DecoderGeometry, LayerState
from ..errors import AdapterError
from .decoder import SplicingDecoder

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class Mixer:
    """One kind of token-mixing layer with fixed-size states. ``attribute``: its module's name in a decoder layer
    (``linear_attn``, ``conv``); ``run(module, hidden_states, mask, *states) -> (output, *new states)`` on the new
    tokens [batch, sequence, hidden], ``mask`` [batch, sequence] marking the real ones; ``states(text_cfg)`` ->
    (name suffix, shape without the batch) of each state, in ``run``'s order, raising AdapterError where the config
    asks for what the decoder cannot carry."""

    attribute: str
    run: Callable
    states: Callable[[object], Sequence[tuple[str, tuple[int, ...]]]]


class HybridDecoder(SplicingDecoder):
    """The spliced decoder over a hybrid LM: ``past`` holds the K/V of its attention layers (in layer order), then
    each mixer layer's states (in layer order, each layer's in its mixer's order); the outputs follow the same
    order. ``layer_types``: the config's kind of every layer; ``mixers``: the mixer of each non-attention kind."""

    def __init__(self, embed_tokens: nn.Module, text_model: nn.Module, lm_head: nn.Module, image_token_id: int,
                 layer_types: Sequence[str], mixers: Mapping[str, Mixer]):
        self.attention_layers = tuple(i for i, kind in enumerate(layer_types) if kind in (FULL, SLIDING))
        self.sliding_layers = frozenset(i for i, kind in enumerate(layer_types) if kind == SLIDING)
        self.mixer_layers = tuple((i, mixers[kind]) for i, kind in enumerate(layer_types) if kind in mixers)
        super().__init__(embed_tokens, text_model, lm_head, image_token_id, len(self.attention_layers))
        config = text_model.config
        self._state_counts = tuple(len(mixer.states(config)) for _, mixer in self.mixer_layers)

    def _cache(self, kv) -> DynamicCache:
        """A cache typed by the config, so Hugging Face's masks read the past's length off an attention layer (a
        mixer layer's placeholder holds no K/V), whose attention layers keep every position: a sliding layer's
        window is its mask's, as for any decoder here (Hugging Face's sliding layer would drop old K/V)."""
        cache = DynamicCache(config=self.text_model.config)
        for j, layer in enumerate(self.attention_layers):
            cache.layers[layer] = DynamicLayer()
            cache.layers[layer].is_sliding = layer in self.sliding_layers  # where the sliding mask reads sizes
            cache.update(kv[2 * j], kv[2 * j + 1], layer)
        return cache

    def forward(self, input_ids, image_embeds, attention_mask, position_ids, *past):
        kv, states = past[:2 * self.num_layers], past[2 * self.num_layers:]
        cache = self._cache(kv)
        current = attention_mask[:, attention_mask.shape[1] - input_ids.shape[1]:]
        new_states: dict[int, tuple[torch.Tensor, ...]] = {}
        start = 0
        with contextlib.ExitStack() as stack:
            for (layer, mixer), count in zip(self.mixer_layers, self._state_counts):
                module = getattr(self.text_model.layers[layer], mixer.attribute)
                stack.enter_context(_running(module, functools.partial(
                    _mixing, mixer, module, current, states[start:start + count], new_states, layer)))
                start += count
            out = self.text_model(inputs_embeds=self.embed(input_ids, image_embeds), attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache, use_cache=True)
        logits = self.head(out.last_hidden_state[:, -1:])
        present = []
        for layer in self.attention_layers:
            present += [cache.layers[layer].keys, cache.layers[layer].values]
        for layer, _ in self.mixer_layers:
            present += list(new_states[layer])
        return (logits, *present)


def _mixing(mixer: Mixer, module, mask, states, sink, layer, hidden_states, *args, **kwargs):
    output, *new = mixer.run(module, hidden_states, mask, *states)
    sink[layer] = tuple(new)
    return output


@contextlib.contextmanager
def _running(module: nn.Module, forward):
    """``module`` calling ``forward`` instead of its own for the duration."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward  # its class's again


def hybrid_geometry(text_cfg, max_position_embeddings: int | None, mixers: Mapping[str, Mixer],
                    attention: Sequence[str] = (FULL,)) -> DecoderGeometry:
    """The attention layers' K/V geometry (``attention``: the attention kinds the model has; a sliding layer's window
    recorded in the attention layers' own numbering) and each mixer layer's states, from the config."""
    kinds = list(text_cfg.layer_types)
    unknown = sorted(set(kinds) - set(mixers) - set(attention))
    if unknown:
        raise AdapterError(f"the language model has layers of kind {', '.join(unknown)}; vlm-export takes "
                           f"{', '.join([*mixers, *attention])} layers here: not supported")
    attention_layers = [i for i, kind in enumerate(kinds) if kind in attention]
    if not attention_layers:
        raise AdapterError("the language model has no attention layer: vlm-export's decoder carries at least one "
                           "K/V cache; not supported")
    states = []
    for layer, kind in enumerate(kinds):
        if kind in mixers:
            states += [LayerState(f"{layer}.{suffix}", shape) for suffix, shape in mixers[kind].states(text_cfg)]
    windowed = tuple(j for j, layer in enumerate(attention_layers) if kinds[layer] == SLIDING)
    window = getattr(text_cfg, "sliding_window", None) if windowed else None
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    return DecoderGeometry(num_layers=len(attention_layers), num_kv_heads=int(text_cfg.num_key_value_heads),
                           head_dim=int(head_dim), hidden_size=int(text_cfg.hidden_size),
                           vocab_size=int(text_cfg.vocab_size), max_position_embeddings=max_position_embeddings,
                           states=tuple(states),
                           **({"sliding_window": int(window), "windowed_layers": windowed} if window else {}))
