"""The generic KV-cache decoder stage shared by adapters whose text model is a Hugging Face
causal LM (Llama, Mistral, Qwen2, ... anything whose base model takes ``inputs_embeds`` and a
``Cache``).

Why the decoder embeds ids itself: the token-embedding matrix is then shipped once (inside the
decoder, shared with the LM head when the model ties them) instead of once in a separate
embedding graph and again as the LM head, and a serving client sends token ids, not
embeddings. Image features arrive as a flat table ``image_embeds [n, hidden]``; the k-th
placeholder id (row-major over the batch, as Hugging Face's ``masked_scatter`` fills) takes
row k. Decode steps pass an empty table ``[0, hidden]``.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from .base import DecoderSpec


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """``past_key_values.0.key, past_key_values.0.value, ...`` (or ``present.``)."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


DECODER_INPUTS = ["input_ids", "image_embeds", "attention_mask", "position_ids"]


def decoder_input_names(num_layers: int) -> list[str]:
    return DECODER_INPUTS + kv_names(num_layers, "past_key_values")


def decoder_output_names(num_layers: int) -> list[str]:
    return ["logits"] + kv_names(num_layers, "present")


class SplicingDecoder(nn.Module):
    """``(input_ids, image_embeds, attention_mask, position_ids, *past) -> (logits, *present)``,
    ``logits [batch, 1, vocab]`` for the last position (prompts are left-padded when batched).

    ``embed_tokens``, ``text_model`` (the base model, called with ``inputs_embeds``) and
    ``lm_head`` are the original modules, shared, not copied.
    """

    def __init__(self, embed_tokens: nn.Module, text_model: nn.Module, lm_head: nn.Module,
                 image_token_id: int, num_layers: int):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.text_model = text_model
        self.lm_head = lm_head
        self.image_token_id = int(image_token_id)
        self.num_layers = num_layers

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        is_image = input_ids == self.image_token_id
        # placeholder ids may lie outside the vocabulary (prefix layout): embed a valid id there
        text_embeds = self.embed_tokens(torch.where(is_image, torch.zeros_like(input_ids), input_ids))
        batch, seq, hidden = text_embeds.shape
        # row 0 of the table is padding so text positions (index 0) and an empty table work
        table = torch.cat([text_embeds.new_zeros(1, hidden), image_embeds.to(text_embeds.dtype)], dim=0)
        flat = is_image.reshape(-1).to(torch.int64)
        index = torch.cumsum(flat, dim=0) * flat
        spliced = table.index_select(0, index).reshape(batch, seq, hidden)
        return torch.where(is_image.unsqueeze(-1), spliced, text_embeds)

    def forward(self, input_ids, image_embeds, attention_mask, position_ids, *past):
        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.text_model(
            inputs_embeds=self.embed(input_ids, image_embeds),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        # the next token needs the last position only: logits for every prompt position would cost
        # a [sequence x vocab] matmul and output at prefill (Hugging Face generate's logits_to_keep=1)
        logits = self.lm_head(out.last_hidden_state[:, -1:])
        present = []
        for layer in cache.layers[: self.num_layers]:
            present += [layer.keys, layer.values]
        return (logits, *present)


def text_decoder_spec(text_cfg) -> DecoderSpec:
    """KV geometry of a Hugging Face causal-LM config (shared by adapters that wrap one)."""
    heads = text_cfg.num_attention_heads
    return DecoderSpec(
        num_layers=text_cfg.num_hidden_layers,
        num_kv_heads=getattr(text_cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads,
        hidden_size=text_cfg.hidden_size,
        vocab_size=text_cfg.vocab_size,
        max_position_embeddings=text_cfg.max_position_embeddings,
    )
