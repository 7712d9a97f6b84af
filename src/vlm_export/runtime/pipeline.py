"""The three stages behind runners, plus what turns a request into their inputs: image
preprocessing, prompt ids and the KV-cache geometry. No model code: everything comes from the
manifest (or, for the PyTorch reference, from the adapter's split modules)."""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from ..errors import InputError
from .prompt import PromptLayout, build_prompt_ids
from .runners import Runner

ImageInput = Union[str, Path, bytes, "PIL.Image.Image"]  # noqa: F821


@dataclass(frozen=True)
class Limits:
    """Serving limits; derived ones are properties so they can never disagree."""

    max_batch: int
    max_images: int  # per prompt
    max_sequence: int  # prompt + generated tokens
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


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    dtype: str = "float32"


def load_image(src: ImageInput):
    """A PIL RGB image from a path, encoded bytes or a PIL image; InputError if unreadable."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(src, Image.Image):
        return src.convert("RGB")
    what = "the image bytes" if isinstance(src, (bytes, bytearray)) else f"image {src}"
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
        img.load()
        return img.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"{what} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot decode {what} ({type(e).__name__}); pass a PNG or JPEG file") from None


class VLMPipeline:
    """vision_encoder -> projector -> lm_decoder behind runners, and the request plumbing."""

    def __init__(self, vision: Runner, projector: Runner, decoder: Runner, tokenizer, image_processor,
                 layout: PromptLayout, kv: KVSpec, limits: Limits, eos_token_ids: list[int]):
        self.vision, self.projector, self.decoder = vision, projector, decoder
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.layout, self.kv, self.limits = layout, kv, limits
        self.eos_token_ids = list(eos_token_ids)

    @property
    def backend(self) -> str:
        return self.decoder.backend

    # ---- request -> tensors ------------------------------------------------------------------
    def pixel_values(self, images: Sequence[ImageInput]) -> np.ndarray:
        pil = [load_image(i) for i in images]
        return np.asarray(self.image_processor(images=pil, return_tensors="np")["pixel_values"], dtype=np.float32)

    def prompt_ids(self, prompt: str, n_images: int) -> list[int]:
        if n_images > self.limits.max_images:
            raise InputError(f"{n_images} images given; this build takes at most {self.limits.max_images} per prompt")
        return build_prompt_ids(self.tokenizer, self.layout, prompt, n_images)

    def check_length(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.limits.max_sequence:
            raise InputError(
                f"the prompt is {prompt_tokens} tokens; with max_tokens {max_new_tokens} it exceeds this build's "
                f"max_sequence of {self.limits.max_sequence}: shorten the prompt or lower max_tokens"
            )

    # ---- stages ------------------------------------------------------------------------------
    def image_embeds(self, pixel_values: np.ndarray | None) -> np.ndarray:
        """[n_images * tokens_per_image, hidden], or an empty table without images."""
        if pixel_values is None or len(pixel_values) == 0:
            return np.zeros((0, self.kv.hidden_size), dtype=np.float32)
        feats = self.vision.infer({"pixel_values": pixel_values})["image_features"]
        embeds = self.projector.infer({"image_features": feats})["image_embeds"]
        return embeds.reshape(-1, embeds.shape[-1])

    def empty_past(self, batch: int = 1) -> dict[str, np.ndarray]:
        shape = (batch, self.kv.num_kv_heads, 0, self.kv.head_dim)
        names = [n for n in self.decoder.input_names if n.startswith("past_key_values.")]
        return {n: np.zeros(shape, dtype=self.kv.dtype) for n in names}

    def decode(self, input_ids: np.ndarray, image_embeds: np.ndarray, past: dict[str, np.ndarray],
               past_len: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One decoder call (prefill or step). Returns (logits [b, 1, vocab] of the last position, next past)."""
        batch, seq = input_ids.shape
        feeds = {
            "input_ids": input_ids.astype(np.int64),
            "image_embeds": image_embeds.astype(np.float32),
            "attention_mask": np.ones((batch, past_len + seq), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy(),
            **past,
        }
        out = self.decoder.infer(feeds)
        present = {n.replace("present.", "past_key_values.", 1): v for n, v in out.items() if n.startswith("present.")}
        return out["logits"], present

