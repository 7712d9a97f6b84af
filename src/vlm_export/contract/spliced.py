"""The ``spliced`` scheme: a decoder-only LM whose prompt holds image placeholder ids; the
decoder graph embeds the ids and replaces the k-th placeholder (row-major over the batch, the
order Hugging Face's ``masked_scatter`` fills) with row k of a flat table ``image_embeds [n,
hidden]``; state = self-attention K/V per layer. LLaVA-style inline tokens and prefix fusion
both use it; they differ only in the prompt layout. A prefill of prompts of different lengths is
left-padded (see ``contract.scheme``) with ``pad_id``, a text id that is not the placeholder; its
``image_embeds`` is the rows' tables concatenated in row order, which the graph's row-major fill
hands out row by row.
"""
from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InputError
from .geometry import DecoderGeometry, LayerState
from .limits import Limits
from .scheme import (DecodeBatch, DecodingScheme, Feeds, Range, SlotBatch, left_padded, left_padded_mask,
                     register_scheme)
from .stages import DECODER, StageSpec, TensorSpec

PAST, PRESENT = "past_key_values", "present"


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """``past_key_values.0.key, past_key_values.0.value, ...`` (or ``present.``)."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


PAST_STATES, PRESENT_STATES = "past_states", "present_states"


def named_states(g: DecoderGeometry, prefix: str) -> list[tuple[str, LayerState]]:
    """(``past_states.<name>`` or ``present_states.<name>``, the state) for each fixed-size state
    (``DecoderGeometry.states``)."""
    return [(f"{prefix}.{state.name}", state) for state in g.states]


def layer_kv_shapes(g: DecoderGeometry) -> list[tuple[int, int]]:
    """(KV heads, head size) of each name ``kv_names`` gives, in its order (a layer's key, then its value)."""
    return [g.kv_shape(name // 2) for name in range(2 * g.num_layers)]


def self_attention_io(g: DecoderGeometry, past_names: Sequence[str],
                      present_names: Sequence[str]) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(the past K/V inputs, the logits + present K/V outputs) of a decoder with a growing self-attention cache,
    each followed by the fixed-size states of the geometry, if any (past in, present out)."""
    past = tuple(TensorSpec(n, g.cache_dtype, ("batch", heads, "past_sequence", size), "decoder")
                 for n, (heads, size) in zip(past_names, layer_kv_shapes(g)))
    states_in = tuple(TensorSpec(n, s.dtype, ("batch", *s.shape), "decoder") for n, s in named_states(g, PAST_STATES))
    outputs = (TensorSpec("logits", "float32", ("batch", 1, g.vocab_size)),
               *(TensorSpec(n, g.cache_dtype, ("batch", heads, "total_sequence", size))
                 for n, (heads, size) in zip(present_names, layer_kv_shapes(g))),
               *(TensorSpec(n, s.dtype, ("batch", *s.shape)) for n, s in named_states(g, PRESENT_STATES)))
    return past + states_in, outputs


class SelfAttentionCache:
    """The growing self-attention K/V every built-in scheme's decoder carries (``past_names`` in,
    ``present_names`` out, both set by the scheme): its empty past, a step's feeds on either state
    (the scheme adds the rest of its inputs: ``_step_state``), the state after a step, the logits,
    and the in-place form; with the fixed-size states of a hybrid LM's other layers (``DecoderGeometry.states``),
    which a prefill starts at zero, every call replaces, and rows carry as they are when they join or leave
    (DecodeBatch caches neither growing nor padded). A mixin: list it before :class:`DecodingScheme`."""

    geometry: DecoderGeometry
    past_names: list[str]
    present_names: list[str]
    pad_id: int

    def _step_state(self, caches: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A step's inputs besides its tokens: the past K/V and any fixed state, from the caches."""
        raise NotImplementedError

    def _empty_past(self, rows: int) -> dict[str, np.ndarray]:
        g = self.geometry
        return {**{n: np.zeros((rows, heads, 0, size), dtype=g.cache_dtype)
                   for n, (heads, size) in zip(self.past_names, layer_kv_shapes(g))},
                **{n: np.zeros((rows, *s.shape), dtype=s.dtype) for n, s in named_states(g, PAST_STATES)}}

    def _caches(self, outputs: Feeds) -> dict[str, np.ndarray]:
        states = zip(named_states(self.geometry, PAST_STATES), named_states(self.geometry, PRESENT_STATES))
        pairs = [*zip(self.past_names, self.present_names), *((past, present) for (past, _), (present, _) in states)]
        return {past: outputs[present] for past, present in pairs}

    def _random_caches(self, rows: int, length: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        g = self.geometry
        return {**{n: rng.standard_normal((rows, heads, length, size)).astype(g.cache_dtype)
                   for n, (heads, size) in zip(self.past_names, layer_kv_shapes(g))},
                **{n: rng.standard_normal((rows, *s.shape)).astype(s.dtype) for n, s in named_states(g, PAST_STATES)}}

    def _step_tokens(self, batch: DecodeBatch, tokens: np.ndarray) -> dict[str, np.ndarray]:
        """A step's token inputs: one new token per row, the mask one column longer, its position."""
        rows = batch.rows
        return {"input_ids": np.asarray(tokens, dtype=np.int64).reshape(rows, 1),
                "attention_mask": np.concatenate([batch.mask, np.ones((rows, 1), dtype=np.int64)], axis=1),
                "position_ids": batch.positions.reshape(rows, 1).copy()}

    def step_feeds(self, batch: DecodeBatch, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return {**self._step_tokens(batch, tokens), **self._step_state(batch.caches)}

    def in_place_caches(self) -> dict[str, str]:
        # a SlotBatch holds caches that grow by a position per step; fixed-size states are replaced whole
        return {} if self.geometry.states else dict(zip(self.present_names, self.past_names))

    def slot_step_feeds(self, batch: SlotBatch, tokens: np.ndarray) -> dict[str, np.ndarray]:
        # one row per slot, an idle slot a masked-out pad; fixed state (SlotBatch.padded) is kept per
        # slot, and an idle slot's stale values only reach its own row, whose logits nobody reads
        return {"input_ids": batch.by_slot(np.asarray(tokens, dtype=np.int64), self.pad_id).reshape(-1, 1),
                "attention_mask": batch.step_mask(),
                "position_ids": batch.by_slot(batch.positions, 0).reshape(-1, 1),
                **self._step_state(batch.caches)}

    def advance(self, batch: DecodeBatch, outputs: Feeds) -> DecodeBatch:
        # the self K/V replaced by the step's presents; any fixed state (cross K/V, masks) kept
        mask = np.concatenate([batch.mask, np.ones((batch.rows, 1), dtype=np.int64)], axis=1)
        return replace(batch, caches={**batch.caches, **self._caches(outputs)}, mask=mask,
                       positions=batch.positions + 1)

    def next_logits(self, outputs: Feeds) -> np.ndarray:
        return outputs["logits"][:, -1, :]


class FlatImageTable:
    """The image input as one flat table ``image_embeds [image_tokens, hidden]`` whose k-th row
    replaces the k-th placeholder id, row-major over the batch (Hugging Face's ``masked_scatter``
    order): the spliced scheme's and the encoder-decoder's encoder's. A mixin: list it before
    :class:`DecodingScheme`; the scheme sets ``image_token_id`` and ``image_input_name``."""

    geometry: DecoderGeometry
    image_token_id: int
    image_input_name: str

    @property
    def image_row_width(self) -> int:
        """The width of one image row: the LM's hidden size (a scheme that carries more per row says so)."""
        return self.geometry.hidden_size

    @property
    def image_input(self) -> TensorSpec:
        return TensorSpec(self.image_input_name, "float32", ("image_tokens", self.image_row_width), "decoder")

    def empty_image_input(self) -> np.ndarray:
        return np.zeros((0, self.image_row_width), dtype=np.float32)

    def image_input_from(self, stage_output: np.ndarray) -> np.ndarray:
        return stage_output.reshape(-1, stage_output.shape[-1])  # [images, tokens, hidden] -> rows in order

    def join_image_inputs(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(list(parts), axis=0) if parts else self.empty_image_input()

    def batch_image_inputs(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return self.join_image_inputs(parts)  # one flat table: row 0's rows, then row 1's, ...

    def check_prompt(self, prompt_ids: Sequence[int], image_input: np.ndarray) -> None:
        placeholders = sum(1 for i in prompt_ids if i == self.image_token_id)
        if placeholders != image_input.shape[0]:
            raise InputError(f"the prompt has {placeholders} image placeholders but the images give "
                             f"{image_input.shape[0]} embeddings")

    def _table_for(self, ids: np.ndarray, image_input: np.ndarray) -> np.ndarray:
        """``image_input`` as float32, checked against the placeholders of a prefill's padded ``ids``."""
        placeholders = int((ids == self.image_token_id).sum())
        if placeholders != len(image_input):  # rows would take each other's images
            raise ValueError(f"the prefill's prompts hold {placeholders} image placeholders but its image "
                             f"input has {len(image_input)} rows")
        return np.asarray(image_input, dtype=np.float32)


@register_scheme
class SplicedScheme(FlatImageTable, SelfAttentionCache, DecodingScheme):
    name = "spliced"

    def __init__(self, geometry: DecoderGeometry, image_token_id: int, image_input_name: str = "image_embeds"):
        super().__init__(geometry)
        self.image_token_id = int(image_token_id)
        self.image_input_name = image_input_name
        self.past_names = kv_names(geometry.num_layers, PAST)
        self.present_names = kv_names(geometry.num_layers, PRESENT)
        # the prefill's padding: any id the graph embeds as text (masked, so its value never matters)
        self.pad_id = 0 if self.image_token_id != 0 else 1

    def params(self) -> dict[str, Any]:
        return {"image_token_id": self.image_token_id, "image_input_name": self.image_input_name}

    # ---- declarations ------------------------------------------------------------------
    def decoder_spec(self, precisions: tuple[str, ...]) -> StageSpec:
        past, outputs = self_attention_io(self.geometry, self.past_names, self.present_names)
        inputs = (
            TensorSpec("input_ids", "int64", ("batch", "sequence"), "decoder"),
            self.image_input,
            TensorSpec("attention_mask", "int64", ("batch", "total_sequence"), "decoder"),
            TensorSpec("position_ids", "int64", ("batch", "sequence"), "decoder"),
            *past,
        )
        return StageSpec(self.decoder_stage, DECODER, inputs, outputs, precisions)

    def dim_ranges(self, limits: Limits) -> list[dict[str, Range]]:
        batch, seq = limits.max_batch, limits.max_sequence
        image_rows = limits.max_image_tokens * batch
        tokens = limits.tokens_per_prompt_image  # the optimum: a prompt of one image (all its tiles, where tiled)
        opt_seq = min(seq, max(tokens + 64, 128))
        opt_past = min(seq - 1, 256)
        return [
            {  # prefill: the prompt with its image rows, from an empty cache
                "batch": (1, 1, batch), "sequence": (1, opt_seq, seq), "total_sequence": (1, opt_seq, seq),
                "past_sequence": (0, 0, 0), "image_tokens": (0, min(tokens, image_rows), image_rows),
            },
            {  # decode: one token per row on a cache
                "batch": (1, 1, batch), "sequence": (1, 1, 1), "total_sequence": (2, opt_past + 1, seq),
                "past_sequence": (1, opt_past, seq - 1), "image_tokens": (0, 0, 0),
            },
        ]

    # ---- running a batch ---------------------------------------------------------------
    def prefill_feeds(self, rows: Sequence[Sequence[int]], image_input: np.ndarray) -> dict[str, np.ndarray]:
        ids, mask, positions = left_padded(rows, self.pad_id)
        return {
            "input_ids": ids,
            self.image_input_name: self._table_for(ids, image_input),
            "attention_mask": mask,
            "position_ids": positions,
            **self._empty_past(len(rows)),
        }

    def state_after_prefill(self, outputs: Feeds, lengths: list[int], feeds: Feeds | None = None) -> DecodeBatch:
        state = DecodeBatch(self._caches(outputs), left_padded_mask(lengths), np.asarray(lengths, dtype=np.int64),
                            growing=tuple(self.past_names))
        return state.zero_masked()

    def _step_state(self, caches: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {self.image_input_name: self.empty_image_input(), **caches}

    # ---- continuing from a cached prefix ---------------------------------------------------
    def prefix_keys(self, prompt_ids: Sequence[int], image_input: np.ndarray) -> np.ndarray | None:
        # text: its id; the k-th placeholder: a 62-bit digest of the image row it takes (negative, so
        # never a token id). The row's content, not the image's file: a Q-Former's rows that depend
        # on the prompt differ where they should
        if self.geometry.prefill_blocks == "prompt":  # every prompt token's K/V depends on the whole prompt
            return None
        if self.geometry.states:  # a state after the whole prompt is not the state after a prefix of it
            return None
        keys = np.asarray(prompt_ids, dtype=np.int64).copy()
        placeholders = np.flatnonzero(keys == self.image_token_id)
        table = np.ascontiguousarray(image_input, dtype=np.float32)
        # where an image's placeholders attend to each other both ways, each one's K/V depends on the whole
        # image: every key of a run of placeholders digests all of the run's rows (and its place in the run),
        # so two prompts share all of an image or none of it, and a reused prefix never ends inside one
        runs = (np.split(np.arange(len(placeholders)), np.flatnonzero(np.diff(placeholders) != 1) + 1)
                if self.geometry.prefill_blocks == "images" else [[k] for k in range(len(placeholders))])
        for run in runs:
            whole = hashlib.blake2b(table[run[0]:run[-1] + 1].tobytes()).digest() if len(run) > 1 else b""
            for k in run:
                digest = hashlib.blake2b(whole + table[k].tobytes(), digest_size=8).digest()
                keys[placeholders[k]] = -1 - (int.from_bytes(digest, "little") >> 2)
        return keys

    def generated_keys(self, tokens: Sequence[int]) -> np.ndarray | None:
        ids = np.asarray(tokens, dtype=np.int64)
        if self.geometry.states:  # as prefix_keys
            return None
        # a decode step feeds no image rows: a generated placeholder id is not what a prompt's would be
        return None if (ids == self.image_token_id).any() else ids

    def prefix_state(self, caches: Mapping[str, np.ndarray], length: int) -> DecodeBatch:
        cut = {n: np.ascontiguousarray(caches[n][None, :, :length]) for n in self.past_names}
        return DecodeBatch(cut, np.ones((1, length), np.int64), np.asarray([length], np.int64),
                           growing=tuple(self.past_names))

    def continue_feeds(self, prefix: DecodeBatch, prompt_ids: Sequence[int],
                       image_input: np.ndarray) -> dict[str, np.ndarray]:
        start, ids = prefix.length, np.asarray(prompt_ids, dtype=np.int64)
        if prefix.rows != 1 or not 0 < start < len(ids):
            raise ValueError(f"a prefill continues one row's prefix of 1..{len(ids) - 1} tokens, got "
                             f"{prefix.rows} rows of {start}")
        used = int((ids[:start] == self.image_token_id).sum())  # image rows the prefix already holds
        rest = ids[None, start:]
        return {"input_ids": rest, self.image_input_name: self._table_for(rest, image_input[used:]),
                "attention_mask": np.ones((1, len(ids)), np.int64),
                "position_ids": np.arange(start, len(ids), dtype=np.int64)[None], **prefix.caches}


    def synthetic_batch(self, rows: int, length: int, rng: np.random.Generator,
                        fixed_length: int | None = None) -> DecodeBatch:
        return DecodeBatch(self._random_caches(rows, length, rng), np.ones((rows, length), dtype=np.int64),
                           np.full(rows, length, dtype=np.int64),
                           growing=tuple(self.past_names))
