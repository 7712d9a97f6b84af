"""The ``encoder_decoder`` scheme: an encoder-decoder LM (T5 in BLIP-2-T5, BART in Florence-2). The
user's prompt, with the image rows spliced in at its placeholder ids, goes through an ENCODER once
per prefill; the DECODER then generates from its own short prompt (the model's decoder start
token, plus any forced tokens) while cross-attending to the encoder's output.

What an adapter provides (two stages, both declared by this scheme's :meth:`encoder_spec` and
:meth:`decoder_spec`, after its image stages; every per-layer tensor has the decoder's geometry:
``L = geometry.num_layers`` decoder layers, ``H = geometry.num_kv_heads`` heads, ``D =
geometry.head_dim``, ``hidden = geometry.hidden_size``):

* ``lm_encoder`` (kind ``encoder``), inputs
  ``input_ids [batch, encoder_sequence]`` int64 (the user's prompt as the processor lays it out,
  placeholders included), ``attention_mask [batch, encoder_sequence]`` int64, and the image input
  ``image_embeds [image_tokens, hidden]`` float32 (the name is the scheme's ``image_input_name``):
  a flat table whose k-th row replaces the k-th placeholder id, row-major over the batch - the
  order Hugging Face's ``masked_scatter`` fills (the spliced scheme's table); outputs
  ``encoder_hidden_states [batch, encoder_sequence, hidden]`` float32 (parity reads it) and
  ``cross_key_values [batch, 2 x L, H, encoder_sequence, D]`` float32: decoder layer i's
  cross-attention keys at ``2 i`` and values at ``2 i + 1``, projected from the encoder's output
  ONCE here, so decode steps never recompute them.
* ``lm_decoder`` (kind ``decoder``), inputs ``input_ids [batch, sequence]``, ``attention_mask
  [batch, total_sequence]`` (the decoder's own tokens, past + new), ``position_ids [batch,
  sequence]`` (each row's decoder positions, counting from 0 at its decoder start token: BART's
  learned positions read them; T5's relative bias may use the column offset instead, as HF does
  with ``cache_position``: the same distances, as the padding is on the left),
  ``encoder_attention_mask [batch, encoder_sequence]`` int64, ``cross_key_values`` as above, and
  the self-attention past ``past_key_values.{i}.key|value [batch, H, past_sequence, D]``; outputs
  ``logits [batch, 1, vocab]`` (the last position) and ``present.{i}.key|value``.

Padding. The ENCODER input is padded on the RIGHT with ``pad_id`` (mask 0): every row's real tokens
sit at columns 0.. so absolute (BART) and relative (T5) positions are the unpadded ones and no
position input is needed; padded query rows attend real keys (finite values), and the decoder's
``encoder_attention_mask`` hides their keys. The DECODER's tokens are laid out as every scheme's
(left-padded, right-aligned; ``contract.scheme``). State (``DecodeBatch``): the self K/V grow; the
cross K/V and the encoder mask are fixed per row, padded on the RIGHT of the encoder axis when rows
with prompts of different lengths run together (``DecodeBatch.padded``). Where the fused decoder runs
on one in-place buffer (``SlotBatch``), the self K/V are written there and the fixed state is kept
per slot, padded alike.

The decoder's prompt is ``decoder_prompt_ids`` (a manifest parameter the adapter reads from the
model's generation config: ``decoder_start_token_id``, then a ``forced_bos_token_id`` where the
model forces one), the same for every row, NOT the user's prompt. Forced tokens are therefore not
generated tokens here (Hugging Face's ``generate`` returns them as its first new tokens: a
reference that compares must drop them). Length limits (:meth:`length_problem`): the prompt goes
through the encoder only and the decoder holds its own prompt + the new tokens, each bounded by
the build's ``max_sequence`` on its own.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np

from .geometry import DecoderGeometry
from .limits import Limits
from .scheme import DecodeBatch, DecodingScheme, Feeds, Range, left_padded, register_scheme
from .spliced import PAST, PRESENT, FlatImageTable, SelfAttentionCache, kv_names, self_attention_io
from .stages import DECODER, ENCODER, StageSpec, TensorSpec

ENCODER_STAGE = "lm_encoder"
ENCODER_STATES, CROSS_KV, ENCODER_MASK = "encoder_hidden_states", "cross_key_values", "encoder_attention_mask"
#: the DecodeBatch axes padded on the right when rows with different encoder lengths join
FIXED_PADDED = {CROSS_KV: 3, ENCODER_MASK: 1}


def right_padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)``, each ``[rows, longest]`` int64: the rows padded on the RIGHT
    with ``pad_id`` (mask 0), the encoder's layout."""
    lengths = [len(r) for r in rows]
    if not rows or min(lengths) < 1:
        raise ValueError(f"an encoder takes at least one prompt of at least one token, got lengths {lengths}")
    mask = (np.arange(max(lengths))[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    ids = np.full(mask.shape, pad_id, dtype=np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
    return ids, mask


@register_scheme
class EncoderDecoderScheme(FlatImageTable, SelfAttentionCache, DecodingScheme):
    name = "encoder_decoder"
    encoder_stage = ENCODER_STAGE

    def __init__(self, geometry: DecoderGeometry, image_token_id: int, decoder_prompt_ids: Sequence[int],
                 pad_id: int, image_input_name: str = "image_embeds"):
        super().__init__(geometry)  # the DECODER's geometry: its layers, heads, head dim, vocabulary
        self.image_token_id = int(image_token_id)
        self.decoder_prompt_ids = [int(t) for t in decoder_prompt_ids]
        if not self.decoder_prompt_ids:
            raise ValueError("an encoder-decoder's decoder prompt has at least its decoder start token")
        self.pad_id = int(pad_id)  # the encoder input's right padding (masked): any id but the placeholder
        if self.pad_id == self.image_token_id:
            raise ValueError(f"the encoder's pad id {pad_id} is the image placeholder id")
        self.image_input_name = image_input_name
        self.past_names = kv_names(geometry.num_layers, PAST)
        self.present_names = kv_names(geometry.num_layers, PRESENT)

    def params(self) -> dict[str, Any]:
        return {"image_token_id": self.image_token_id, "decoder_prompt_ids": list(self.decoder_prompt_ids),
                "pad_id": self.pad_id, "image_input_name": self.image_input_name}

    # ---- declarations ------------------------------------------------------------------
    def cross_kv_spec(self, batch: str | int = "batch") -> TensorSpec:
        g = self.geometry
        return TensorSpec(CROSS_KV, "float32", (batch, 2 * g.num_layers, g.num_kv_heads, "encoder_sequence",
                                                g.head_dim), "decoder")

    def encoder_spec(self, precisions: tuple[str, ...]) -> StageSpec:
        """The ``lm_encoder`` stage's named inputs and outputs (see the module docstring)."""
        g = self.geometry
        inputs = (
            TensorSpec("input_ids", "int64", ("batch", "encoder_sequence"), "decoder"),
            TensorSpec("attention_mask", "int64", ("batch", "encoder_sequence"), "decoder"),
            self.image_input,
        )
        outputs = (TensorSpec(ENCODER_STATES, "float32", ("batch", "encoder_sequence", g.hidden_size)),
                   replace(self.cross_kv_spec(), role=""))
        return StageSpec(ENCODER_STAGE, ENCODER, inputs, outputs, precisions)

    def decoder_spec(self, precisions: tuple[str, ...]) -> StageSpec:
        past, outputs = self_attention_io(self.geometry, self.past_names, self.present_names)
        inputs = (
            TensorSpec("input_ids", "int64", ("batch", "sequence"), "decoder"),
            TensorSpec("attention_mask", "int64", ("batch", "total_sequence"), "decoder"),
            TensorSpec("position_ids", "int64", ("batch", "sequence"), "decoder"),
            TensorSpec(ENCODER_MASK, "int64", ("batch", "encoder_sequence"), "decoder"),
            self.cross_kv_spec(),
            *past,
        )
        return StageSpec(self.decoder_stage, DECODER, inputs, outputs, precisions)

    def encoder_dim_ranges(self, limits: Limits) -> list[dict[str, Range]]:
        batch, seq = limits.max_batch, limits.max_sequence
        image_rows = limits.max_image_tokens * batch
        opt = min(seq, max(limits.tokens_per_image + 32, 64))
        return [{"batch": (1, 1, batch), "encoder_sequence": (1, opt, seq),
                 "image_tokens": (0, min(limits.tokens_per_image, image_rows), image_rows)}]

    def dim_ranges(self, limits: Limits) -> list[dict[str, Range]]:
        batch, seq = limits.max_batch, limits.max_sequence
        start = len(self.decoder_prompt_ids)
        encoder = (1, min(seq, max(limits.tokens_per_image + 32, 64)), seq)
        opt_past = min(seq - 1, 64)
        return [
            {  # prefill: the decoder prompt (the same for every row) from an empty cache
                "batch": (1, 1, batch), "sequence": (start, start, start), "total_sequence": (start, start, start),
                "past_sequence": (0, 0, 0), "encoder_sequence": encoder,
            },
            {  # decode: one token per row on a cache
                "batch": (1, 1, batch), "sequence": (1, 1, 1), "total_sequence": (2, opt_past + 1, seq),
                "past_sequence": (1, opt_past, seq - 1), "encoder_sequence": encoder,
            },
        ]

    def penalty_context(self, prompt_ids: Sequence[int]) -> list[int]:
        # Hugging Face's processors see the decoder's ids: its start (and forced) tokens, not the prompt
        return list(self.decoder_prompt_ids)

    @property
    def forced_new_tokens(self) -> int:
        # HF's generate starts the decoder from its start token alone and generates the forced BOS
        return len(self.decoder_prompt_ids) - 1

    def length_problem(self, prompt_tokens: int, max_new_tokens: int, limits: Limits) -> str | None:
        if prompt_tokens > limits.max_sequence:
            return (f"the prompt is {prompt_tokens} tokens, more than this build's max_sequence of "
                    f"{limits.max_sequence} (the encoder's limit): shorten the prompt")
        decoder = len(self.decoder_prompt_ids) + max_new_tokens
        if decoder > limits.max_sequence:
            return (f"max_tokens {max_new_tokens} with the decoder's {len(self.decoder_prompt_ids)} start token(s) "
                    f"exceeds this build's max_sequence of {limits.max_sequence}: lower max_tokens")
        return None

    # (the image input: the spliced scheme's flat table, FlatImageTable)

    # ---- running a batch ---------------------------------------------------------------
    def encoder_feeds(self, rows: Sequence[Sequence[int]], image_input: np.ndarray) -> dict[str, np.ndarray]:
        ids, mask = right_padded(rows, self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, self.image_input_name: self._table_for(ids, image_input)}

    def prefill_feeds(self, rows: Sequence[Sequence[int]], image_input: np.ndarray,
                      encoded: Feeds | None = None) -> dict[str, np.ndarray]:
        if encoded is None:
            raise ValueError(f"the {self.name} scheme's prefill reads the {ENCODER_STAGE} stage's outputs: "
                             "run it through VLMPipeline.prefill_inputs")
        ids, mask, positions = left_padded([self.decoder_prompt_ids] * len(rows), self.pad_id)
        _, encoder_mask = right_padded(rows, self.pad_id)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            ENCODER_MASK: encoder_mask,
            CROSS_KV: np.asarray(encoded[CROSS_KV]),
            **self._empty_past(len(rows)),
        }

    def state_after_prefill(self, outputs: Feeds, lengths: list[int], feeds: Feeds | None = None) -> DecodeBatch:
        # ``lengths`` are the user's prompts' (the encoder's); the decoder holds its own prompt
        if feeds is None:
            raise ValueError(f"the {self.name} scheme's state holds the prefill's cross K/V: pass its feeds")
        mask = np.asarray(feeds["attention_mask"])
        fixed = {CROSS_KV: np.asarray(feeds[CROSS_KV]), ENCODER_MASK: np.asarray(feeds[ENCODER_MASK])}
        state = DecodeBatch({**self._caches(outputs), **fixed}, mask.copy(), mask.sum(axis=1).astype(np.int64),
                            growing=tuple(self.past_names), padded=dict(FIXED_PADDED))
        return state.zero_masked()

    def _step_state(self, caches: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {ENCODER_MASK: caches[ENCODER_MASK], CROSS_KV: caches[CROSS_KV],
                **{n: caches[n] for n in self.past_names}}

    def decode_lengths(self, prompt_tokens: int, new_tokens: int) -> tuple[int, int]:
        # the decoder holds its own prompt + the new tokens; the cross K/V are the user prompt's length
        return len(self.decoder_prompt_ids) + new_tokens // 2, prompt_tokens

    def synthetic_batch(self, rows: int, length: int, rng: np.random.Generator,
                        fixed_length: int | None = None) -> DecodeBatch:
        """Random caches: the decoder's self K/V at ``length``, the cross K/V and encoder mask at
        ``fixed_length`` encoder positions (None: ``length``)."""
        g = self.geometry
        encoder = length if fixed_length is None else fixed_length
        caches = self._random_caches(rows, length, rng)
        caches[CROSS_KV] = rng.standard_normal((rows, 2 * g.num_layers, g.num_kv_heads, encoder,
                                                g.head_dim)).astype(np.float32)
        caches[ENCODER_MASK] = np.ones((rows, encoder), np.int64)
        return DecodeBatch(caches, np.ones((rows, length), dtype=np.int64), np.full(rows, length, dtype=np.int64),
                           growing=tuple(self.past_names), padded=dict(FIXED_PADDED))
