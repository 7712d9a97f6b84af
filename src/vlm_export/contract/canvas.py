"""The ``spliced_mrope_canvas`` scheme: ``spliced_mrope`` with MiniCPM-V 4.7's "canvas" positions. An image comes as an
overview and, where larger, a grid of slices (``layout.ImageSlices``), each crop of it a run of image tokens between
markers (``<image>``/``</image>`` around the overview, ``<slice>``/``</slice>`` around each slice, a newline after each
row of slices). Every crop of an image is placed on one canvas, the slices' grid of tokens (or the overview's own
where it has no slices): a slice's tokens at their row and column plus the slice's corner, the overview's stretched
over the whole canvas (evenly spaced, rounded), the markers pinned to the corners and edges they close, all of it from
the canvas's origin in the first stream; the text after an image counts on from the origin plus the canvas's larger
side, plus one. Images that only markers and newlines separate share a group, the next one's origin one step past
what lies between. Hugging Face's ``MiniCPMV4_7Model.get_rope_index`` for still images, step for step.

The image input is ``spliced_mrope``'s (:class:`~vlm_export.contract.mrope.PlacedRows`: each image row's place in
its crop's grid of tokens), so each crop's grid is read off its rows' places. No prefix cache (an image's overview is
stretched over the canvas its slices, after it, span: a prefix's positions may depend on what follows it).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .geometry import DecoderGeometry
from .mrope import STREAMS, MRopeSplicedScheme, PlacedRows
from .scheme import register_scheme

#: the markers' order in the scheme's parameters
MARKERS = ("slice_start", "slice_end", "image_start", "image_end", "newline")


def _crops(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) of every run of image tokens (one crop each: markers always part two)."""
    crops, i = [], 0
    while i < len(ids):
        if ids[i] != image_token_id:
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] == image_token_id:
            j += 1
        crops.append((i, j))
        i = j
    return crops


def _spread(start: int, size: int, count: int) -> np.ndarray:
    """``count`` places spread evenly from ``start`` over ``size`` places: ``torch.linspace(0, size - 1, count)``
    rounded (half to even), computed as its CPU kernel does - in float32, the first half up from 0, the rest down from
    the end - so that every rounding falls the same way."""
    if count == 1:
        return np.array([start], dtype=np.int64)
    end = np.float32(size - 1)
    step = end / np.float32(count - 1)
    i = np.arange(count)
    up = (step * i.astype(np.float32)).astype(np.float32)
    down = (end - (step * (count - 1 - i).astype(np.float32)).astype(np.float32)).astype(np.float32)
    return start + np.round(np.where(i < count // 2, up, down)).astype(np.int64)


def canvas_positions(ids: Sequence[int], image_token_id: int, markers: dict[str, int], places: np.ndarray) -> np.ndarray:
    """[3, len(ids)]: the canvas positions of one unpadded row's tokens, the k-th image token at ``places[k]`` (its
    row and column in its crop's grid of tokens)."""
    ids = [int(i) for i in ids]
    n = len(ids)
    out = np.tile(np.arange(n, dtype=np.int64), (STREAMS, 1))
    crops = _crops(ids, image_token_id)
    grids, k = [], 0
    for start, end in crops:
        crop = places[k:k + end - start]
        grids.append((int(crop[:, 0].max()) + 1, int(crop[:, 1].max()) + 1))
        k += end - start
    marks = {markers[name] for name in MARKERS}
    # groups of frames (an overview and its slices), as Hugging Face's _group_visual_frames
    groups: list[tuple[int, list[list]]] = []
    slices: list[int] | None = None
    previous_end = 0
    for c, (start, end) in enumerate(crops):
        if slices is not None and ids[start - 1] == markers["slice_start"]:
            slices.append(c)
        else:
            slices = []
            frame = [c, slices]
            if groups and all(t in marks for t in ids[previous_end:start - 1]):
                groups[-1][1].append(frame)
            else:
                groups.append((start - 1, [frame]))
        previous_end = end

    def frame_end(last: int) -> int:
        while last < n and ids[last] in marks:
            last += 1
        return last

    position, done = 0, 0
    for group_start, frames in groups:
        spans = [(c, s, frame_end(crops[s[-1]][1] if s else crops[c][1])) for c, s in frames]
        group_end = spans[-1][2]
        if group_start > done:  # the text before the group
            out[:, done:group_start] = np.arange(group_start - done) + position
            position += group_start - done
        cursor = group_start
        for c, kept, end in spans:
            thumb_start, thumb_end = crops[c]
            start = thumb_start - 1
            if start > cursor:  # text between two frames, then a step, so the next halo lands on none of it
                out[:, cursor:start] = np.arange(start - cursor) + position
                position += start - cursor + 1
            end = min(end, group_end)
            origin = position
            height, width = grids[c]
            cols = rows = slice_h = slice_w = 0
            if kept:
                cols = len(kept)  # a gap wider than "</slice><slice>" is a newline: it ends the first row
                for j in range(len(kept) - 1):
                    if crops[kept[j + 1]][0] - crops[kept[j]][1] > 2:
                        cols = j + 1
                        break
                rows = len(kept) // cols
                if rows * cols != len(kept):
                    rows, cols = 1, len(kept)
                slice_h, slice_w = grids[kept[0]]
                height, width = rows * slice_h, cols * slice_w
            out[:, start:end] = origin
            out[1:, start] = max(origin - 1, 0)  # <image>: the halo before the canvas
            if thumb_end < end:  # </image>: the canvas's far corner
                out[1, thumb_end], out[2, thumb_end] = origin + height, origin + width
            own = grids[c]
            out[:, thumb_start:thumb_end] = _grid(origin, own, (height, width), (0, 0))
            for j, s in enumerate(kept):
                top, left = (j // cols) * slice_h, (j % cols) * slice_w
                s_start, s_end = crops[s]
                h, w = grids[s]
                if s_start - 1 >= start:  # <slice>: its top-left corner
                    out[1, s_start - 1], out[2, s_start - 1] = origin + top, origin + left
                if s_end < end:  # </slice>: its bottom-right corner
                    out[1, s_end], out[2, s_end] = origin + top + h - 1, origin + left + w - 1
                out[:, s_start:s_end] = _grid(origin, (h, w), (h, w), (top, left))
            for j in range(len(kept) - 1):  # the newline after a row: past its right edge, on its last row
                gap_start, gap_end = crops[kept[j]][1], crops[kept[j + 1]][0]
                if gap_end - gap_start <= 2:
                    continue
                for i in range(gap_start + 1, gap_end - 1):
                    out[1, i] = origin + (j // cols + 1) * slice_h - 1
                    out[2, i] = origin + cols * slice_w
            position = origin + max(height, width) + 1
            cursor = end
        if cursor < group_end:
            out[:, cursor:group_end] = np.arange(group_end - cursor) + position
            position += group_end - cursor
        done = group_end
    if done < n:
        out[:, done:] = np.arange(n - done) + position
    return out


def _grid(origin: int, grid: tuple[int, int], canvas: tuple[int, int], offset: tuple[int, int]) -> np.ndarray:
    """[3, h x w]: a crop of ``grid`` tokens spread over ``canvas`` places from ``offset``, row-major (Hugging Face's
    ``get_vision_position_ids``)."""
    rows = _spread(offset[0], canvas[0], grid[0])
    cols = _spread(offset[1], canvas[1], grid[1])
    r, c = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([np.zeros(r.size, np.int64), r.reshape(-1), c.reshape(-1)]) + origin


@register_scheme
class CanvasMRopeScheme(MRopeSplicedScheme):
    name = "spliced_mrope_canvas"

    def __init__(self, geometry: DecoderGeometry, image_token_id: int, merge: int, markers: dict[str, int],
                 image_input_name: str = "image_embeds"):
        super().__init__(geometry, image_token_id, merge, image_input_name)
        missing = sorted(set(MARKERS) - set(markers))
        if missing:
            raise ValueError(f"canvas positions need the ids of the {', '.join(missing)} markers")
        self.markers = {name: int(markers[name]) for name in MARKERS}

    def params(self) -> dict[str, Any]:
        return {**super().params(), "markers": dict(self.markers)}

    def row_positions(self, ids: Sequence[int], places: np.ndarray) -> np.ndarray:
        return canvas_positions(ids, self.image_token_id, self.markers, places)

    # an image's overview is stretched over the canvas its slices, which come after it, span: a prefix's positions
    # may depend on what follows it, so nothing is continued from a cached prefix
    def prefix_keys(self, prompt_ids: Sequence[int], image_input: PlacedRows) -> None:
        return None

    def generated_keys(self, tokens: Sequence[int]) -> None:
        return None
