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

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ..contract import DecoderGeometry
from ..contract.mrope import MRopeSplicedScheme
from ..errors import AdapterError
from . import hybrid, register
from .base import LoadedModel
from .decoder import SplicingDecoder
from .hybrid import HybridDecoder, Mixer
from .qwen2_vl import PatchMergerProjector, Qwen2VLAdapter
from .qwen3_vl import LearnedGridPatchTower, Qwen3VLAdapter

LINEAR = "linear_attention"


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


def _delta_net_states(text_cfg) -> list[tuple[str, tuple[int, ...]]]:
    """A gated delta-net's convolution window over its q/k/v channels and its recurrent matrix."""
    kernel = int(text_cfg.linear_conv_kernel_dim)
    if kernel < 2:
        raise AdapterError(f"linear_conv_kernel_dim is {kernel}: a causal convolution of one tap keeps no state, "
                           "which vlm-export's decoder does not take; not supported")
    key_dim = int(text_cfg.linear_num_key_heads) * int(text_cfg.linear_key_head_dim)
    value_heads, value_size = int(text_cfg.linear_num_value_heads), int(text_cfg.linear_value_head_dim)
    return [("conv", (2 * key_dim + value_heads * value_size, kernel - 1)),
            ("recurrent", (value_heads, int(text_cfg.linear_key_head_dim), value_size))]


#: Qwen3.5's linear-attention layers (``layer.linear_attn``)
GATED_DELTA_NET = {LINEAR: Mixer("linear_attn", gated_delta_net, _delta_net_states)}


def hybrid_geometry(text_cfg, max_position_embeddings: int | None) -> DecoderGeometry:
    """The attention layers' K/V geometry and each linear-attention layer's two states, from the config."""
    return hybrid.hybrid_geometry(text_cfg, max_position_embeddings, GATED_DELTA_NET)


def delta_net_geometry(loaded: LoadedModel) -> DecoderGeometry:
    """:func:`hybrid_geometry` of a model whose LM is Qwen3.5's text model (``config.text_config``)."""
    text = loaded.config.text_config
    return hybrid_geometry(text, getattr(text, "max_position_embeddings", None))


def delta_net_decoder(loaded: LoadedModel) -> HybridDecoder:
    """The spliced decoder over a model's Qwen3.5 text model (``model.model.language_model``, ``model.lm_head``)."""
    text = loaded.model.model.language_model
    return HybridDecoder(text.get_input_embeddings(), text, loaded.model.lm_head, loaded.config.image_token_id,
                         loaded.config.text_config.layer_types, GATED_DELTA_NET)


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
        return delta_net_geometry(loaded)

    def decoder(self, loaded: LoadedModel, scheme: MRopeSplicedScheme) -> SplicingDecoder:
        return delta_net_decoder(loaded)

    def scheme(self, loaded: LoadedModel) -> MRopeSplicedScheme:
        return Qwen2VLAdapter.scheme(self, loaded)  # no deepstack levels: Qwen2-VL's scheme over this geometry
