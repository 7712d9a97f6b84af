"""The ``spliced_anyres`` scheme: LLaVA-NeXT's and LLaVA-OneVision's decoder, fed as the spliced scheme's, with each
image's rows packed from its tiles' (:class:`~vlm_export.contract.layout.AnyResTiles`).

The image path makes every tile's rows and the model's ``image_newline`` as each tile's last row; which of them
an image's placeholders take, in which order (and, for OneVision's shrunk pictures, with which bilinear weights),
follows the image's size alone (Hugging Face packs them in ``pack_image_features`` after its projector). So the
packing is a weighted gather over the image path's output, made here from the preprocessed ``image_sizes``, with no
model code: in process and in the served model alike, and for any batch of images (each image's size travels with
its tiles).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Mapping

import numpy as np

from .geometry import DecoderGeometry
from .layout import IMAGE_SIZES, AnyResTiles
from .scheme import register_scheme
from .spliced import SplicedScheme
from .stages import TensorSpec


@register_scheme
class AnyResSplicedScheme(SplicedScheme):
    name = "spliced_anyres"

    def __init__(self, geometry: DecoderGeometry, image_token_id: int, tiles: AnyResTiles | dict[str, Any],
                 image_input_name: str = "image_embeds"):
        super().__init__(geometry, image_token_id, image_input_name)
        self.tiles = tiles if isinstance(tiles, AnyResTiles) else AnyResTiles(**tiles)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "tiles": asdict(self.tiles)}

    @property
    def processor_inputs(self) -> tuple[TensorSpec, ...]:
        # one row per prompt image, where the image path's pixel_values has one per tile
        return (TensorSpec(IMAGE_SIZES, "int64", ("prompt_images", 2), "pixels"),)

    @property
    def image_input_sources(self) -> tuple[str, ...]:
        return (self.image_input_name, IMAGE_SIZES)

    def image_input_from_values(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        embeds = np.asarray(values[self.image_input_name], dtype=np.float32)  # [tiles, patches² + 1, hidden]
        sizes = self.tiles.grids(values)
        unit = self.tiles.patches ** 2 + 1
        if embeds.ndim != 3 or embeds.shape[1] != unit:
            raise ValueError(f"the image path gives rows of shape {embeds.shape[1:]} per tile; this build packs "
                             f"{unit} per tile (its patches and the newline)")
        counts = [self.tiles.count(size) for size in sizes]
        if sum(counts) != len(embeds):
            raise ValueError(f"the image path gives {len(embeds)} tiles for images whose sizes make {sum(counts)}")
        starts = np.cumsum([0, *counts])
        return self.join_image_inputs([self._packed(embeds[first:first + count].reshape(-1, embeds.shape[-1]), size)
                                       for first, count, size in zip(starts, counts, sizes)])

    def _packed(self, table: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        index, weight = self.tiles.packing(size)
        if index.shape[1] == 1:  # rows taken as they are (no shrunk picture): exact copies
            return table[index[:, 0]]
        return np.einsum("rk,rkh->rh", weight, table[index]).astype(np.float32)

    def image_input_from(self, stage_output: np.ndarray) -> np.ndarray:
        raise ValueError("the spliced_anyres scheme packs each image's rows by its size: use image_input_from_values")
