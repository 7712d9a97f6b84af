"""The ``spliced_mrope`` scheme: the spliced scheme with multimodal rotary positions (Qwen2-VL's and
Qwen2.5-VL's M-RoPE). The decoder's ``position_ids [3, batch, sequence]`` give each token a (frame, row,
column) position: a text token has its count in all three; an image's tokens share the image's start in
the first and add their row and column in its grid of tokens to it in the others, and the text after an
image counts on from its start plus the larger side of its grid (Hugging Face's ``get_rope_index``). So
a row's next position is not its length, and where its images are decides it: the image input carries
each image row's place in its image (:class:`PlacedRows`, read from the image path's ``patch_positions``
and ``patch_mask``: ``layout.ImagePatches``), and the state keeps each row's next position.

The decoder's rotary is not one ONNX Runtime's attention kernel computes (three position streams): the fused
form keeps it as exported and hands the kernel the rotated q and k, so it still decodes on one KV buffer
written in place (``SlotBatch``, whose per-slot offsets carry each row's next position). A prompt continues from a
cached prefix: the keys digest each image row with its place, so a prefix's positions - decided by what it holds
- are in its keys; the rest's positions are the whole prompt's from the prefix's end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .geometry import DecoderGeometry
from .layout import PATCH_POSITIONS
from .patches import PatchRowsScheme
from .scheme import DecodeBatch, Feeds, SlotBatch, left_padded, left_padded_mask, register_scheme
from .spliced import SplicedScheme
from .stages import DECODER, StageSpec, TensorSpec

#: position streams of the decoder's rotary: frame, row, column
STREAMS = 3


@dataclass(frozen=True)
class PlacedRows:
    """One request's image rows as the decoder takes them, in order, with each row's (row, column) in its
    image's grid of tokens; an image starts at (0, 0)."""

    rows: np.ndarray  # [n, hidden] float32
    places: np.ndarray  # [n, 2] int64

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:  # the decoder's image input (the bench reports it, check_prompt counts it)
        return tuple(self.rows.shape)

    @property
    def nbytes(self) -> int:  # the image-embedding cache bounds its size by this
        return int(self.rows.nbytes + self.places.nbytes)


def rope_positions(ids: Sequence[int], image_token_id: int, places: np.ndarray) -> np.ndarray:
    """[3, len(ids)]: the positions of one row's tokens, the k-th placeholder taking ``places[k]`` (Hugging Face's
    ``get_rope_index`` for still images)."""
    ids = np.asarray(ids, dtype=np.int64)
    out = np.zeros((STREAMS, len(ids)), dtype=np.int64)
    position, k, i = 0, 0, 0
    while i < len(ids):
        if ids[i] != image_token_id or k >= len(places):
            out[:, i] = position
            position, i = position + 1, i + 1
            continue
        start, first = position, k  # one image: its placeholders until the next image's (0, 0)
        while i < len(ids) and ids[i] == image_token_id and k < len(places) and (k == first or places[k].any()):
            out[:, i] = (start, start + places[k, 0], start + places[k, 1])
            i, k = i + 1, k + 1
        position = start + int(places[first:k].max()) + 1
    return out


@register_scheme
class MRopeSplicedScheme(PatchRowsScheme):
    name = "spliced_mrope"

    #: position streams of the decoder's rotary
    streams = STREAMS

    def decoder_spec(self, precisions: tuple[str, ...]) -> StageSpec:
        spec = super().decoder_spec(precisions)
        inputs = tuple(TensorSpec(t.name, t.dtype, (self.streams, "batch", "sequence"), t.role)
                       if t.name == "position_ids" else t for t in spec.inputs)
        return StageSpec(spec.name, DECODER, inputs, spec.outputs, precisions)

    # ---- the image input ---------------------------------------------------------------
    @property
    def image_input_sources(self) -> tuple[str, ...]:
        return (*super().image_input_sources, PATCH_POSITIONS)

    def image_input_from_values(self, values: Mapping[str, np.ndarray]) -> PlacedRows:
        rows, real = self.real_blocks(values)
        # each row's (row, column) in its image's grid of merge blocks: its block's first patch's, over the merge
        places = np.asarray(values[PATCH_POSITIONS])[:, ::self.merge ** 2] // self.merge
        return PlacedRows(np.ascontiguousarray(rows[real], dtype=np.float32), places[real].astype(np.int64))

    def empty_image_input(self) -> PlacedRows:
        return PlacedRows(np.zeros((0, self.image_row_width), np.float32), np.zeros((0, 2), np.int64))

    def join_image_inputs(self, parts: Sequence[PlacedRows]) -> PlacedRows:
        parts = [p for p in parts if len(p)]
        if not parts:
            return self.empty_image_input()
        return PlacedRows(np.concatenate([p.rows for p in parts]), np.concatenate([p.places for p in parts]))

    # ---- running a batch ---------------------------------------------------------------
    def row_positions(self, ids: Sequence[int], places: np.ndarray) -> np.ndarray:
        """[streams, len(ids)]: one unpadded row's positions, its k-th image token at ``places[k]``."""
        return rope_positions(ids, self.image_token_id, places)

    def prefill_feeds(self, rows: Sequence[Sequence[int]], image_input: PlacedRows) -> dict[str, np.ndarray]:
        ids, mask, _ = left_padded(rows, self.pad_id)
        positions = np.zeros((self.streams, *ids.shape), dtype=np.int64)
        used = 0
        for b, row in enumerate(rows):
            count = sum(1 for i in row if i == self.image_token_id)
            positions[:, b, ids.shape[1] - len(row):] = self.row_positions(row, image_input.places[used:used + count])
            used += count
        return {"input_ids": ids, self.image_input_name: self._table_for(ids, image_input.rows),
                "attention_mask": mask, "position_ids": positions, **self._empty_past(len(rows))}

    def state_after_prefill(self, outputs: Feeds, lengths: list[int], feeds: Feeds | None = None) -> DecodeBatch:
        if feeds is None:
            raise ValueError("the spliced_mrope scheme's state follows its prefill's positions: pass its feeds")
        # the padding's positions are 0, so each row's largest is its last real token's stream maximum
        following = np.asarray(feeds["position_ids"]).max(axis=(0, 2)) + 1
        state = DecodeBatch(self._caches(outputs), left_padded_mask(lengths), following.astype(np.int64),
                            growing=tuple(self.past_names))
        return state.zero_masked()

    def _step_state(self, caches: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {self.image_input_name: self.empty_image_input().rows, **caches}

    def _step_tokens(self, batch: DecodeBatch, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return _streams(super()._step_tokens(batch, tokens), self.streams)

    def slot_step_feeds(self, batch: SlotBatch, tokens: np.ndarray) -> dict[str, np.ndarray]:
        return _streams(super().slot_step_feeds(batch, tokens), self.streams)

    # ---- continuing from a cached prefix ---------------------------------------------------
    def prefix_keys(self, prompt_ids: Sequence[int], image_input: PlacedRows) -> np.ndarray | None:
        # the spliced scheme's keys over each image row with its place: a row's K/V depends on its position, which
        # its place and what comes before it (the keys before it) decide, and so does the text's after an image
        placed = np.concatenate([image_input.rows, image_input.places.astype(np.float32)], axis=1)
        return SplicedScheme.prefix_keys(self, prompt_ids, placed)

    def generated_keys(self, tokens: Sequence[int]) -> np.ndarray | None:
        return SplicedScheme.generated_keys(self, tokens)

    def continue_feeds(self, prefix: DecodeBatch, prompt_ids: Sequence[int],
                       image_input: PlacedRows) -> dict[str, np.ndarray]:
        feeds = SplicedScheme.continue_feeds(self, prefix, prompt_ids, image_input.rows)
        # the whole prompt's positions from the prefix's end (its text ends the prompt: the largest, as the state
        # after it reads them)
        return {**feeds, "position_ids": self.row_positions(prompt_ids, image_input.places)[:, None, prefix.length:]}


def _streams(feeds: dict[str, np.ndarray], streams: int) -> dict[str, np.ndarray]:
    """A decode step's feeds with its positions in every stream (text after the prompt)."""
    return {**feeds, "position_ids": np.repeat(feeds["position_ids"][None], streams, axis=0)}


@register_scheme
class DeepstackMRopeScheme(MRopeSplicedScheme):
    """``spliced_mrope`` whose image rows also carry ``levels`` deepstack features (Qwen3-VL's): each row is
    ``hidden x (1 + levels)`` wide, the embedding that replaces its placeholder, then what the decoder adds to that
    position's hidden state after each of its first ``levels`` layers. One table, so the image rows' cache, their
    order in a batch and their transport stay the spliced scheme's; the decoder splits them."""

    name = "spliced_mrope_deepstack"

    def __init__(self, geometry: DecoderGeometry, image_token_id: int, merge: int, levels: int,
                 image_input_name: str = "image_embeds"):
        super().__init__(geometry, image_token_id, merge, image_input_name)
        self.levels = int(levels)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "levels": self.levels}

    @property
    def image_row_width(self) -> int:
        return self.geometry.hidden_size * (1 + self.levels)
