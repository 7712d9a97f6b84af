"""The ``cross_attention`` scheme: a decoder whose interleaved cross-attention layers read the
images' keys and values (Llama-3.2-Vision / mllama). The text keeps its tokens: one image token
per image marks where the image enters the prompt, nothing is spliced.

The image path ends in a stage that emits the K/V of every cross-attention layer ONCE per image
(``cross_key_values [images, 2 x cross layers, kv heads, tiles x tokens per tile, head dim]``, keys
already through the layer's k_norm), so decode steps never recompute them. The decoder takes them
per row, images concatenated on the position axis (``cross_sequence``), plus:

* ``cross_attention_mask [batch, sequence, images, tiles]``: 1 where a text position attends an
  image's real tile, built here from the prompt ids exactly as Hugging Face's MllamaProcessor
  builds it (each image token opens a span up to the next image token, consecutive image tokens
  share the span after the last, the last image's runs to the end; a tile beyond the image's own
  count is padding). During generation the last row repeats for every new token (HF does so).
* ``cross_image_mask [batch, images]``: 1 for the row's real images. A text position that attends no
  image spreads its attention evenly over the row's real keys (what HF's mask, zeroed on such rows,
  does over one request's keys), never over another row's padding images; a row with none (a
  text-only request) skips the cross-attention layers, as HF skips them without images.

State (``DecodeBatch``): the self-attention K/V grow (right-aligned, as in the spliced scheme); the
cross K/V, the last mask row and the image mask are fixed per row, padded on the right (images) when
rows with different numbers of images run together - the masks hide the padding. Where the fused
decoder runs on one in-place buffer (``SlotBatch``), the self-attention K/V are written there and the
fixed state is kept per slot, padded alike.

The image input of one request is a :class:`CrossImages` (its K/V and each image's real tile count,
read from the preprocessed tile mask); a prefill's is its rows' joined in row order, which
``prefill_feeds`` hands out by each row's image tokens (as the spliced scheme's flat table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InputError
from .geometry import DecoderGeometry
from .limits import Limits
from .scheme import DecodeBatch, DecodingScheme, Feeds, Range, left_padded, left_padded_mask, register_scheme
from .spliced import PAST, PRESENT, SelfAttentionCache, kv_names, self_attention_io
from .stages import DECODER, StageSpec, TensorSpec

CROSS_KV, CROSS_MASK, IMAGE_MASK = "cross_key_values", "cross_attention_mask", "cross_image_mask"


@dataclass(frozen=True)
class CrossImages:
    """One request's images as the decoder reads them."""

    key_values: np.ndarray  # [images, 2 x cross layers, kv heads, tiles x tokens per tile, head dim]
    tiles: np.ndarray  # [images] int64: each image's real tiles

    def __len__(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:  # the scheme's image_input tensor for these images (the bench reports it)
        return tuple(self.key_values.shape)

    @property
    def nbytes(self) -> int:  # the image-embedding cache bounds its size by this
        return int(self.key_values.nbytes + self.tiles.nbytes)


def image_spans(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """Per image token, in order, the [start, end) text positions that attend to its image (the
    rule of Hugging Face's MllamaProcessor: up to the next image token; a run of consecutive image
    tokens all attend from their own position to where the run's last one stops; the last image to
    the end of the prompt - and, in generation, beyond)."""
    where = [i for i, t in enumerate(ids) if t == image_token_id]
    ends = where[1:] + [len(ids)]
    spans = [[start, end] for start, end in zip(where, ends)]
    for k in range(len(spans) - 2, -1, -1):  # a token directly followed by another shares the next's end
        if spans[k][1] == spans[k][0] + 1:
            spans[k][1] = spans[k + 1][1]
    return [(s, e) for s, e in spans]


@register_scheme
class CrossAttentionScheme(SelfAttentionCache, DecodingScheme):
    name = "cross_attention"

    def __init__(self, geometry: DecoderGeometry, image_token_id: int, cross_layers: int, tiles: int,
                 tokens_per_tile: int, tile_mask_input: str = "aspect_ratio_mask"):
        super().__init__(geometry)  # geometry.num_layers: the self-attention layers (the growing cache)
        self.image_token_id = int(image_token_id)
        self.cross_layers, self.tiles, self.tokens_per_tile = int(cross_layers), int(tiles), int(tokens_per_tile)
        self.tile_mask_input = tile_mask_input
        self.past_names = kv_names(geometry.num_layers, PAST)
        self.present_names = kv_names(geometry.num_layers, PRESENT)
        self.pad_id = 0 if self.image_token_id != 0 else 1

    def params(self) -> dict[str, Any]:
        return {"image_token_id": self.image_token_id, "cross_layers": self.cross_layers, "tiles": self.tiles,
                "tokens_per_tile": self.tokens_per_tile, "tile_mask_input": self.tile_mask_input}

    @property
    def tokens_per_image(self) -> int:
        return self.tiles * self.tokens_per_tile

    # ---- declarations ------------------------------------------------------------------
    @property
    def image_input(self) -> TensorSpec:
        g = self.geometry
        return TensorSpec(CROSS_KV, "float32", ("images", 2 * self.cross_layers, g.num_kv_heads,
                                                self.tokens_per_image, g.head_dim), "decoder")

    def decoder_spec(self, precisions: tuple[str, ...]) -> StageSpec:
        g = self.geometry
        past, outputs = self_attention_io(g, self.past_names, self.present_names)
        inputs = (
            TensorSpec("input_ids", "int64", ("batch", "sequence"), "decoder"),
            TensorSpec("attention_mask", "int64", ("batch", "total_sequence"), "decoder"),
            TensorSpec("position_ids", "int64", ("batch", "sequence"), "decoder"),
            TensorSpec(CROSS_MASK, "int64", ("batch", "sequence", "images", self.tiles), "decoder"),
            TensorSpec(IMAGE_MASK, "int64", ("batch", "images"), "decoder"),
            TensorSpec(CROSS_KV, "float32", ("batch", 2 * self.cross_layers, g.num_kv_heads, "cross_sequence",
                                             g.head_dim), "decoder"),
            *past,
        )
        return StageSpec(self.decoder_stage, DECODER, inputs, outputs, precisions)

    def dim_ranges(self, limits: Limits) -> list[dict[str, Range]]:
        batch, seq, images = limits.max_batch, limits.max_sequence, max(1, limits.max_images)
        per_image = self.tokens_per_image
        opt_seq, opt_past = min(seq, 128), min(seq - 1, 256)
        cross = {"images": (1, 1, images), "cross_sequence": (per_image, per_image, images * per_image)}
        return [
            {"batch": (1, 1, batch), "sequence": (1, opt_seq, seq), "total_sequence": (1, opt_seq, seq),
             "past_sequence": (0, 0, 0), **cross},
            {"batch": (1, 1, batch), "sequence": (1, 1, 1), "total_sequence": (2, opt_past + 1, seq),
             "past_sequence": (1, opt_past, seq - 1), **cross},
        ]

    # ---- the image input ---------------------------------------------------------------
    def empty_image_input(self) -> CrossImages:
        g = self.geometry
        kv = np.zeros((0, 2 * self.cross_layers, g.num_kv_heads, self.tokens_per_image, g.head_dim), np.float32)
        return CrossImages(kv, np.zeros(0, np.int64))

    def image_input_from(self, stage_output: np.ndarray) -> CrossImages:
        raise ValueError(f"the {self.name} scheme's image input needs each image's tile mask "
                         f"({self.tile_mask_input!r}) besides {CROSS_KV!r}: use image_input_from_values")

    @property
    def image_input_sources(self) -> tuple[str, ...]:
        return CROSS_KV, self.tile_mask_input

    def image_input_from_values(self, values: Mapping[str, np.ndarray]) -> CrossImages:
        tiles = np.asarray(values[self.tile_mask_input]).reshape(-1, self.tiles).sum(axis=1).astype(np.int64)
        return CrossImages(np.asarray(values[CROSS_KV], np.float32), tiles)

    def join_image_inputs(self, parts: Sequence[CrossImages]) -> CrossImages:
        if not parts:
            return self.empty_image_input()
        return CrossImages(np.concatenate([p.key_values for p in parts]), np.concatenate([p.tiles for p in parts]))

    def check_prompt(self, prompt_ids: Sequence[int], image_input: CrossImages) -> None:
        tokens = sum(1 for i in prompt_ids if i == self.image_token_id)
        if tokens != len(image_input):
            raise InputError(f"the prompt has {tokens} image tokens but {len(image_input)} images were given")

    # ---- running a batch ---------------------------------------------------------------
    def batch_image_inputs(self, parts: Sequence[CrossImages]) -> CrossImages:
        return self.join_image_inputs(parts)  # every row's images in row order; prefill_feeds splits them

    def _per_row(self, rows: Sequence[Sequence[int]], images: CrossImages) -> tuple[np.ndarray, np.ndarray]:
        """(K/V ``[rows, 2L, kv heads, most images x per image, head dim]``, tiles ``[rows, most
        images]``): each row's images (as many as its image tokens, in order) padded to the most of
        any row, at least one (all zero, tiles 0, for a row without): the key axis is never empty."""
        counts = [sum(1 for i in r if i == self.image_token_id) for r in rows]
        if sum(counts) != len(images):  # rows would take each other's images
            raise ValueError(f"the prefill's prompts hold {sum(counts)} image tokens but its image input has "
                             f"{len(images)} images")
        most, g = max([1, *counts]), self.geometry
        per_image = self.tokens_per_image
        kv = np.zeros((len(rows), 2 * self.cross_layers, g.num_kv_heads, most * per_image, g.head_dim), np.float32)
        tiles = np.zeros((len(rows), most), np.int64)
        start = 0
        for row, n in enumerate(counts):
            part = images.key_values[start:start + n]  # [n, 2L, heads, per image, dim] -> images along positions
            kv[row, :, :, :n * per_image] = part.transpose(1, 2, 0, 3, 4).reshape(*kv.shape[1:3], -1, kv.shape[4])
            tiles[row, :n] = images.tiles[start:start + n]
            start += n
        return kv, tiles

    def cross_mask(self, rows: Sequence[Sequence[int]], tiles: np.ndarray) -> np.ndarray:
        """``[rows, longest, images, tiles]`` int64 for left-padded ``rows`` (the padding attends nothing)."""
        width = max(len(r) for r in rows)
        mask = np.zeros((len(rows), width, tiles.shape[1], self.tiles), np.int64)
        for r, ids in enumerate(rows):
            offset = width - len(ids)
            spans = image_spans(ids, self.image_token_id)
            if len(spans) > tiles.shape[1] or any(tiles[r, k] < 1 for k in range(len(spans))):
                raise ValueError(f"row {r} has {len(spans)} image tokens but {int((tiles[r] > 0).sum())} images")
            for k, (start, end) in enumerate(spans):
                mask[r, offset + start:offset + end, k, :tiles[r, k]] = 1
        return mask

    def prefill_feeds(self, rows: Sequence[Sequence[int]], image_input: CrossImages) -> dict[str, np.ndarray]:
        ids, mask, positions = left_padded(rows, self.pad_id)
        kv, tiles = self._per_row(rows, image_input)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            CROSS_MASK: self.cross_mask(rows, tiles),
            IMAGE_MASK: (tiles > 0).astype(np.int64),
            CROSS_KV: kv,
            **self._empty_past(len(rows)),
        }

    def state_after_prefill(self, outputs: Feeds, lengths: list[int], feeds: Feeds | None = None) -> DecodeBatch:
        if feeds is None:
            raise ValueError(f"the {self.name} scheme's state holds the prefill's image K/V: pass its feeds")
        fixed = {CROSS_KV: np.asarray(feeds[CROSS_KV]), CROSS_MASK: np.asarray(feeds[CROSS_MASK])[:, -1],
                 IMAGE_MASK: np.asarray(feeds[IMAGE_MASK])}
        state = DecodeBatch({**self._caches(outputs), **fixed}, left_padded_mask(lengths),
                            np.asarray(lengths, dtype=np.int64), growing=tuple(self.past_names),
                            padded={CROSS_KV: 3, CROSS_MASK: 1, IMAGE_MASK: 1})
        return state.zero_masked()

    def _step_state(self, caches: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            CROSS_MASK: caches[CROSS_MASK][:, None],  # the last prompt row, repeated for each new token
            IMAGE_MASK: caches[IMAGE_MASK],
            CROSS_KV: caches[CROSS_KV],
            **{n: caches[n] for n in self.past_names},
        }

    def synthetic_batch(self, rows: int, length: int, rng: np.random.Generator,
                        fixed_length: int | None = None) -> DecodeBatch:
        # the image K/V: one image's, whatever the prompt's length
        g = self.geometry
        caches = self._random_caches(rows, length, rng)
        caches[CROSS_KV] = rng.standard_normal((rows, 2 * self.cross_layers, g.num_kv_heads, self.tokens_per_image,
                                                g.head_dim)).astype(np.float32)
        caches[CROSS_MASK] = np.ones((rows, 1, self.tiles), np.int64)
        caches[IMAGE_MASK] = np.ones((rows, 1), np.int64)
        return DecodeBatch(caches, np.ones((rows, length), dtype=np.int64), np.full(rows, length, dtype=np.int64),
                           growing=tuple(self.past_names), padded={CROSS_KV: 3, CROSS_MASK: 1, IMAGE_MASK: 1})
