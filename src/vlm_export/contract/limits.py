"""Serving limits of a build; the ones that depend on others are computed, never entered."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_batch: int  # sequences decoded together
    max_images: int  # per prompt
    max_sequence: int  # prompt + generated tokens, per sequence
    tokens_per_image: int

    @property
    def max_image_tokens(self) -> int:
        return self.max_images * self.tokens_per_image

    @property
    def max_images_per_batch(self) -> int:
        return self.max_batch * self.max_images

    def to_dict(self) -> dict[str, int]:
        return {"max_batch": self.max_batch, "max_images": self.max_images, "max_sequence": self.max_sequence,
                "tokens_per_image": self.tokens_per_image, "max_image_tokens": self.max_image_tokens,
                "max_images_per_batch": self.max_images_per_batch}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "Limits":
        return cls(d["max_batch"], d["max_images"], d["max_sequence"], d["tokens_per_image"])
