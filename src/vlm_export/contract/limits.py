"""Serving limits of a build; the ones that depend on others are computed, never entered."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    max_batch: int  # sequences decoded together
    max_images: int  # per prompt
    max_sequence: int  # prompt + generated tokens, per sequence
    tokens_per_image: int  # per image of the image path (a tile, where an image is cut into tiles)
    #: images of the image path one prompt image becomes at most (its tiles; 1 where images are not tiled)
    tiles_per_image: int = 1
    #: image placeholders one prompt image becomes at most, where that is not its tiles x their tokens (LLaVA-NeXT's
    #: images, whose rows are packed from their tiles' with a newline per row); 0: tiles x tokens
    image_tokens: int = 0

    @property
    def tokens_per_prompt_image(self) -> int:
        """Image placeholders one prompt image becomes at most."""
        return self.image_tokens or self.tiles_per_image * self.tokens_per_image

    @property
    def max_image_tokens(self) -> int:
        return self.max_images * self.tokens_per_prompt_image

    @property
    def max_images_per_batch(self) -> int:
        """Images of the image path in one batch (tiles, where images are tiled)."""
        return self.max_batch * self.max_images * self.tiles_per_image

    def to_dict(self) -> dict[str, int]:
        tiles = {"tiles_per_image": self.tiles_per_image} if self.tiles_per_image != 1 else {}  # earlier readers
        if self.image_tokens and self.image_tokens != self.tiles_per_image * self.tokens_per_image:  # likewise
            tiles["image_tokens"] = self.image_tokens
        return {"max_batch": self.max_batch, "max_images": self.max_images, "max_sequence": self.max_sequence,
                "tokens_per_image": self.tokens_per_image, **tiles, "max_image_tokens": self.max_image_tokens,
                "max_images_per_batch": self.max_images_per_batch}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> "Limits":
        return cls(d["max_batch"], d["max_images"], d["max_sequence"], d["tokens_per_image"], d.get("tiles_per_image", 1),
                   d.get("image_tokens", 0))
