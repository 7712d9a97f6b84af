"""The ``spliced_xdrope`` scheme: ``spliced_mrope`` with HunYuanVL's positions (its "XD-RoPE"). The decoder's
``position_ids [streams, batch, sequence]``: every token counts on in every stream, one by one, images included (no
jump past an image); an image's grid rows then take, in the last three streams, their column and row in the image's
grid of tokens and the image's number in the prompt (from 0) - the first ``streams - 3`` streams keep the count. An
image's rows are its projector's: a begin row, each row of merge blocks followed by a newline row (at the column past
the last), an end row (``layout.ImagePatches.framed``); the begin and end rows are positioned as text. Hugging Face's
``HunYuanVLModel.get_rope_index``, except that images are numbered per prompt: Hugging Face numbers them on across
the rows of a batch, so a prompt's positions there depend on the prompts batched before it (its answer alone is the
one this scheme gives, in any batch).

The image input is ``spliced_mrope``'s (:class:`~vlm_export.contract.mrope.PlacedRows`), built here from the
projector's rows: each image's real merge blocks (by the image path's ``patch_mask``), then the three rows the
projector adds after them in its output (begin, newline, end; the same for every image), put in the image's order,
each with its place (the begin and end rows at :data:`BEGIN` / :data:`END`).

A prompt continues from a cached prefix as ``spliced_mrope``'s does (a prefix's positions follow from what it holds:
text counts on, images are numbered from the prompt's start).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .geometry import DecoderGeometry
from .layout import PATCH_MASK, PATCH_POSITIONS
from .mrope import MRopeSplicedScheme, PlacedRows
from .scheme import register_scheme

#: the places of an image's begin and end rows (positioned as text)
BEGIN, END = (-1, -1), (-2, -2)
#: rows the projector writes after each image's merge blocks: begin, newline, end
FRAME_ROWS = 3


def xdrope_positions(ids: Sequence[int], image_token_id: int, places: np.ndarray, streams: int) -> np.ndarray:
    """[streams, len(ids)]: the positions of one unpadded row's tokens, the k-th image token at ``places[k]``."""
    out = np.tile(np.arange(len(ids), dtype=np.int64), (streams, 1))
    k, image = 0, -1
    for i, token in enumerate(ids):
        if token != image_token_id or k >= len(places):
            continue
        row, col = (int(v) for v in places[k])
        k += 1
        if (row, col) == BEGIN:
            image += 1
        elif (row, col) != END:
            out[streams - 3:, i] = (col, row, image)
    return out


@register_scheme
class XDRopeSplicedScheme(MRopeSplicedScheme):
    name = "spliced_xdrope"

    def __init__(self, geometry: DecoderGeometry, image_token_id: int, merge: int, streams: int,
                 image_input_name: str = "image_embeds"):
        super().__init__(geometry, image_token_id, merge, image_input_name)
        if int(streams) < 3:
            raise ValueError(f"XD-RoPE positions in {streams} streams: at least 3 (column, row, image)")
        self.streams = int(streams)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "streams": self.streams}

    def image_input_from_values(self, values: Mapping[str, np.ndarray]) -> PlacedRows:
        rows = np.asarray(values[self.image_input_name], dtype=np.float32)
        real = np.asarray(values[PATCH_MASK])[:, ::self.merge ** 2].astype(bool)
        if rows.shape[:2] != (real.shape[0], real.shape[1] + FRAME_ROWS):
            raise ValueError(f"the image path gives {rows.shape[1]} rows per image for {real.shape[1]} blocks of "
                             f"{self.merge ** 2} patches and the {FRAME_ROWS} rows around them")
        blocks = np.asarray(values[PATCH_POSITIONS])[:, ::self.merge ** 2] // self.merge
        return self.join_image_inputs([self._framed(rows[k], blocks[k][real[k]], int(real[k].sum()))
                                       for k in range(len(rows))])

    @staticmethod
    def _framed(rows: np.ndarray, places: np.ndarray, count: int) -> PlacedRows:
        """One image's rows in its order: begin, each row of blocks (row-major) and a newline after it, end."""
        begin, newline, end = rows[-FRAME_ROWS:]
        height, width = int(places[:, 0].max()) + 1, int(places[:, 1].max()) + 1
        grid = np.empty((height, width + 1, rows.shape[1]), np.float32)
        grid[places[:, 0], places[:, 1]] = rows[:count]
        grid[:, width] = newline
        r, c = np.meshgrid(np.arange(height), np.arange(width + 1), indexing="ij")
        table = np.concatenate([begin[None], grid.reshape(-1, rows.shape[1]), end[None]])
        where = np.concatenate([[BEGIN], np.stack([r.reshape(-1), c.reshape(-1)], axis=-1), [END]])
        return PlacedRows(table, where.astype(np.int64))

    def row_positions(self, ids: Sequence[int], places: np.ndarray) -> np.ndarray:
        return xdrope_positions(ids, self.image_token_id, places, self.streams)
