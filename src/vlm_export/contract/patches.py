"""The ``spliced_patches`` scheme: the spliced scheme for an image path that reads each image as a row of patches
(``layout.ImagePatches``: Pixtral's and Qwen2-VL's towers on images of any size, padded to the batch's largest).
The projector gives one row per merge block of each image's row of patches, so an image smaller than the batch's
largest has padding rows after its own; the decoder's image input is the real rows, in order, told by the image
path's ``patch_mask`` (a row is real where its block's first patch is). Everything else is the spliced scheme's.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .geometry import DecoderGeometry
from .layout import PATCH_MASK
from .scheme import register_scheme
from .spliced import SplicedScheme


@register_scheme
class PatchRowsScheme(SplicedScheme):
    name = "spliced_patches"

    def __init__(self, geometry: DecoderGeometry, image_token_id: int, merge: int,
                 image_input_name: str = "image_embeds"):
        super().__init__(geometry, image_token_id, image_input_name)
        self.merge = int(merge)

    def params(self) -> dict[str, Any]:
        return {**super().params(), "merge": self.merge}

    @property
    def image_input_sources(self) -> tuple[str, ...]:
        return (self.image_input_name, PATCH_MASK)

    def real_blocks(self, values: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(the projector's padded rows [images, blocks, width], which of them are real [images, blocks]): a row is
        real where the first patch of its merge x merge block is."""
        unit = self.merge ** 2
        rows = np.asarray(values[self.image_input_name])
        real = np.asarray(values[PATCH_MASK])[:, ::unit].astype(bool)
        if rows.shape[:2] != real.shape:
            raise ValueError(f"the image path gives {rows.shape[1]} rows per image for {real.shape[1]} blocks of "
                             f"{unit} patches")
        return rows, real

    def image_input_from_values(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        rows, real = self.real_blocks(values)
        return np.ascontiguousarray(rows[real], dtype=np.float32)

    def image_input_from(self, stage_output: np.ndarray) -> np.ndarray:
        raise ValueError(f"the {self.name} scheme keeps each image's real rows by its patch mask: use "
                         "image_input_from_values")
