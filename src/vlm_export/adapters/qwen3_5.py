"""Qwen3.5: ``Qwen3_5ForConditionalGeneration`` and ``Qwen3_5MoeForConditionalGeneration`` (every MLP a mixture of
experts with a gated shared expert; the same attention and delta-net layers).

Qwen3-VL's image path without deepstack (``adapters/qwen3_vl.py``: rows of patches of any image size, a learned
position grid resampled to each image, one image token per merge block, interleaved multimodal rotary positions made
by the scheme), over a hybrid LM: most layers are gated delta-nets (linear attention), the rest gated full attention
(q/k norms, a partial rotary, the output times a sigmoid gate).

A gated delta-net keeps no K/V: each row carries two fixed-size states, the last ``kernel - 1`` inputs of its causal
depthwise convolution and a ``[value heads, key size, value size]`` recurrent matrix, which every call replaces whole
(``DecoderGeometry.states``). The decoder's graph reads them as ``past_states.<layer>.conv`` / ``.recurrent`` and
returns them as ``present_states.``; the attention layers carry their K/V as any decoder's. Each delta-net runs
here in a form one graph takes for a prefill from zeros and a decode step alike: the convolution over the state's
window followed by the new inputs, then the gated delta rule token by token in a ``scan`` (ONNX ``Scan``), the
recurrence Hugging Face's own decode step computes (its prefill computes the same sums chunk by chunk: equal to
float32 rounding). A prefill's left padding is zeroed before the convolution, as Hugging Face's forward does, so a
padded row's states are its own alone's.

Video inputs are not supported.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache
from transformers.activations import ACT2FN

from ..contract import DecoderGeometry, LayerState
from ..contract.mrope import MRopeSplicedScheme
from ..errors import AdapterError
from . import register
from .base import LoadedModel
from .decoder import SplicingDecoder
from .qwen2_vl import PatchMergerProjector, Qwen2VLAdapter
from .qwen3_vl import LearnedGridPatchTower, Qwen3VLAdapter

LINEAR, FULL = "linear_attention", "full_attention"


def _l2_normalized(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)  # Hugging Face's (FLA's) l2norm


def gated_delta_rule(query, key, value, decay, beta, state):
    """(outputs [batch, sequence, value heads, value size], the final state): the gated delta rule from ``state``
    [batch, value heads, key size, value size], one token at a time (Hugging Face's
    ``torch_recurrent_gated_delta_rule`` with its q/k normalization, as a ``scan`` over the sequence so one graph
    takes any length). ``query``/``key`` [batch, sequence, key heads, key size], each key head serving
    ``value heads / key heads`` consecutive value heads; ``decay`` (log space) and ``beta`` [batch, sequence, value
    heads]. Computed in float32."""
    from torch._higher_order_ops.scan import scan

    groups = value.shape[-2] // key.shape[-2]
    if groups > 1:
        query, key = query.repeat_interleave(groups, dim=2), key.repeat_interleave(groups, dim=2)
    query, key, value, decay, beta = (t.to(torch.float32) for t in (query, key, value, decay, beta))
    query = _l2_normalized(query) / (query.shape[-1] ** 0.5)
    key = _l2_normalized(key)

    def step(carried, token):
        q, k, v, g, b = token  # [batch, heads, key size], .., [batch, heads, value size], [batch, heads] x 2
        carried = carried * g.exp()[..., None, None]
        remembered = (carried * k.unsqueeze(-1)).sum(dim=-2)
        delta = (v - remembered) * b.unsqueeze(-1)
        carried = carried + k.unsqueeze(-1) * delta.unsqueeze(-2)
        return carried.clone(), (carried * q.unsqueeze(-1)).sum(dim=-2)

    final, outputs = scan(step, state.to(torch.float32), (query, key, value, decay, beta), dim=1)
    return outputs, final


def gated_delta_net(module: nn.Module, hidden_states, mask, conv_state, recurrent_state):
    """(output, the new convolution window, the new recurrent state) of one ``Qwen3_5GatedDeltaNet`` on
    ``hidden_states`` [batch, sequence, hidden] whose real tokens ``mask`` [batch, sequence] marks, after ``conv_state``
    [batch, channels, kernel - 1] (the inputs before them; zeros before a prompt) and ``recurrent_state``. Hugging
    Face's forward, in a form that exports for any sequence length."""
    x = hidden_states * mask[:, :, None].to(hidden_states.dtype)  # its padding zeroed (apply_mask_to_padding_states)
    batch, length, _ = x.shape
    mixed = module.in_proj_qkv(x).transpose(1, 2)  # [batch, channels, sequence]
    gate = module.in_proj_z(x).reshape(batch, length, -1, module.head_v_dim)
    b, a = module.in_proj_b(x), module.in_proj_a(x)
    window = torch.cat([conv_state.to(mixed.dtype), mixed], dim=-1)
    kept = module.conv_kernel_size - 1
    new_conv = window[:, :, window.shape[-1] - kept:]
    conv = module.conv1d
    mixed = ACT2FN[module.activation](F.conv1d(window, conv.weight, conv.bias, groups=window.shape[1]))
    query, key, value = torch.split(mixed.transpose(1, 2), [module.key_dim, module.key_dim, module.value_dim], dim=-1)
    query = query.reshape(batch, length, -1, module.head_k_dim)
    key = key.reshape(batch, length, -1, module.head_k_dim)
    value = value.reshape(batch, length, -1, module.head_v_dim)
    beta = b.sigmoid()
    decay = -module.A_log.float().exp() * F.softplus(a.float() + module.dt_bias)
    core, new_state = gated_delta_rule(query, key, value, decay, beta, recurrent_state)
    core = module.norm(core.to(hidden_states.dtype).reshape(-1, module.head_v_dim), gate.reshape(-1, module.head_v_dim))
    return module.out_proj(core.reshape(batch, length, -1)), new_conv, new_state


class HybridDecoder(SplicingDecoder):
    """The spliced decoder over a hybrid LM: ``past`` holds the K/V of its attention layers (in layer order), then
    each linear-attention layer's (convolution window, recurrent state); the outputs follow the same order. The
    linear-attention modules run :func:`gated_delta_net` for the call (their ``forward`` replaced, then restored),
    so Hugging Face's own layers, norms, MLPs and attention run as they are."""

    def __init__(self, embed_tokens: nn.Module, text_model: nn.Module, lm_head: nn.Module, image_token_id: int,
                 layer_types: Sequence[str]):
        self.attention_layers = tuple(i for i, kind in enumerate(layer_types) if kind == FULL)
        self.linear_layers = tuple(i for i, kind in enumerate(layer_types) if kind == LINEAR)
        super().__init__(embed_tokens, text_model, lm_head, image_token_id, len(self.attention_layers))

    def forward(self, input_ids, image_embeds, attention_mask, position_ids, *past):
        kv, states = past[:2 * self.num_layers], past[2 * self.num_layers:]
        # typed by the config, so Hugging Face's masks read the past's length off an attention layer's K/V
        cache = DynamicCache(config=self.text_model.config)
        for j, layer in enumerate(self.attention_layers):
            cache.update(kv[2 * j], kv[2 * j + 1], layer)
        current = attention_mask[:, attention_mask.shape[1] - input_ids.shape[1]:]
        new_states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with contextlib.ExitStack() as stack:
            for j, layer in enumerate(self.linear_layers):
                module = self.text_model.layers[layer].linear_attn
                stack.enter_context(_running(module, functools.partial(
                    _linear_attention, module, current, states[2 * j], states[2 * j + 1], new_states, layer)))
            out = self.text_model(inputs_embeds=self.embed(input_ids, image_embeds), attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache, use_cache=True)
        logits = self.head(out.last_hidden_state[:, -1:])
        present = []
        for layer in self.attention_layers:
            present += [cache.layers[layer].keys, cache.layers[layer].values]
        for layer in self.linear_layers:
            present += list(new_states[layer])
        return (logits, *present)


def _linear_attention(module, mask, conv_state, recurrent_state, sink, layer, hidden_states, *args, **kwargs):
    output, new_conv, new_state = gated_delta_net(module, hidden_states, mask, conv_state, recurrent_state)
    sink[layer] = (new_conv, new_state)
    return output


@contextlib.contextmanager
def _running(module: nn.Module, forward):
    """``module`` calling ``forward`` instead of its own for the duration."""
    module.forward = forward
    try:
        yield
    finally:
        del module.forward  # its class's again


def hybrid_geometry(text_cfg, max_position_embeddings: int | None) -> DecoderGeometry:
    """The attention layers' K/V geometry and each linear-attention layer's two states, from the config."""
    kinds = list(text_cfg.layer_types)
    unknown = sorted(set(kinds) - {LINEAR, FULL})
    if unknown:
        raise AdapterError(f"the language model has layers of kind {', '.join(unknown)}; vlm-export takes Qwen3.5's "
                           f"{LINEAR} and {FULL} layers: not supported")
    if FULL not in kinds:
        raise AdapterError("the language model has no full-attention layer: vlm-export's decoder carries at least "
                           "one K/V cache; not supported")
    kernel = int(text_cfg.linear_conv_kernel_dim)
    if kernel < 2:
        raise AdapterError(f"linear_conv_kernel_dim is {kernel}: a causal convolution of one tap keeps no state, "
                           "which vlm-export's decoder does not take; not supported")
    key_dim = int(text_cfg.linear_num_key_heads) * int(text_cfg.linear_key_head_dim)
    value_heads, value_size = int(text_cfg.linear_num_value_heads), int(text_cfg.linear_value_head_dim)
    channels = 2 * key_dim + value_heads * value_size
    states = []
    for layer, kind in enumerate(kinds):
        if kind == LINEAR:
            states += [LayerState(f"{layer}.conv", (channels, kernel - 1)),
                       LayerState(f"{layer}.recurrent", (value_heads, int(text_cfg.linear_key_head_dim), value_size))]
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    return DecoderGeometry(num_layers=kinds.count(FULL), num_kv_heads=int(text_cfg.num_key_value_heads),
                           head_dim=int(head_dim), hidden_size=int(text_cfg.hidden_size),
                           vocab_size=int(text_cfg.vocab_size), max_position_embeddings=max_position_embeddings,
                           states=tuple(states))


@register
class Qwen3_5Adapter(Qwen3VLAdapter):
    name = "qwen3_5"
    model_types = ("qwen3_5", "qwen3_5_moe")
    model_classes = {"qwen3_5": ("Qwen3_5ForConditionalGeneration", "Qwen3_5TextConfig"),
                     "qwen3_5_moe": ("Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeTextConfig")}
    description = ("Hugging Face Qwen3_5ForConditionalGeneration / Qwen3_5MoeForConditionalGeneration (Qwen3-VL's "
                   "vision tower and patch merger without deepstack + a hybrid LM of gated delta-net linear-attention "
                   "layers and gated full-attention layers with interleaved multimodal rotary positions; Qwen3.5-MoE's "
                   "MLPs experts with a gated shared expert)")

    @staticmethod
    def _kept_blocks(loaded: LoadedModel) -> tuple[int, ...]:
        return ()  # no deepstack

    def vision_modules(self, loaded: LoadedModel) -> tuple[nn.Module, nn.Module]:
        visual = loaded.model.model.visual
        return (LearnedGridPatchTower(visual),
                PatchMergerProjector(visual.merger, loaded.config.text_config.hidden_size))

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        text = loaded.config.text_config
        return hybrid_geometry(text, getattr(text, "max_position_embeddings", None))

    def decoder(self, loaded: LoadedModel, scheme: MRopeSplicedScheme) -> SplicingDecoder:
        text = loaded.model.model.language_model
        return HybridDecoder(text.get_input_embeddings(), text, loaded.model.lm_head, loaded.config.image_token_id,
                             loaded.config.text_config.layer_types)

    def scheme(self, loaded: LoadedModel) -> MRopeSplicedScheme:
        return Qwen2VLAdapter.scheme(self, loaded)  # no deepstack levels: Qwen2-VL's scheme over this geometry
