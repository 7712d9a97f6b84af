"""An image-embedding cache: a conversation that re-sends the same image every turn (as
OpenAI-style clients do) skips the image path after the first time.

Keyed by the image's content (sha256 of its encoded bytes, or of a decoded image's pixels), so the
same picture under another file name still hits; bounded in bytes with least-recently-used
eviction. Where the image path also reads the prompt (InstructBLIP's Q-Former summarises the
image for the instruction), the prompt is part of the key: the same image hits only when asked
the same thing again (a conversation re-sending its image with a new turn misses).
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import VlmExportError
from .chat import Prompt, prompt_text
from .generate import ImageEncoder
from .pipeline import ImageInput


def image_key(image: ImageInput) -> str:
    h = hashlib.sha256()
    if isinstance(image, (bytes, bytearray)):
        h.update(image)
    elif isinstance(image, (str, Path)):
        h.update(Path(image).read_bytes())
    else:  # a PIL image
        h.update(f"{image.mode} {image.size}".encode())
        h.update(image.tobytes())
    return h.hexdigest()


class ImageEmbeddingCache:
    """Thread-safe LRU of per-image decoder inputs, at most ``max_bytes`` of them. A value is the
    scheme's image input for one image (an array, or e.g. the cross-attention scheme's CrossImages:
    its K/V and tile count); its ``nbytes`` counts against the bound."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"the image cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = self.hits = self.misses = 0

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: np.ndarray) -> None:
        if value.nbytes > self.max_bytes:
            return  # larger than the whole cache: not worth evicting everything for
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self.bytes += value.nbytes
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.nbytes

    def wrap(self, encode: Callable[[Sequence[ImageInput], Prompt], np.ndarray],
             join: Callable[[list[np.ndarray]], np.ndarray], by_prompt: bool = False,
             together: bool = False) -> ImageEncoder:
        """An encoder over a request's images: each image from the cache, or encoded alone (``encode`` on a list of
        one, with the request's prompt) and kept; ``join`` makes the request's decoder input from the per-image
        ones, in order. ``by_prompt``: the prompt is part of the key. ``together``: an image's rows depend on the
        other images of its prompt (LLaVA-OneVision tiles only a prompt's one image), so a request's images are one
        entry, encoded and kept together."""
        def cached(images: Sequence[ImageInput], prompt: Prompt) -> np.ndarray:
            suffix = " " + hashlib.sha256(prompt_text(prompt).encode()).hexdigest() if by_prompt else ""
            if together:
                key = " ".join(image_key(image) for image in images) + suffix
                value = self.get(key)
                if value is None:
                    value = encode(images, prompt)
                    self.put(key, value)
                return value
            parts = []
            for index, image in enumerate(images):
                key = image_key(image) + suffix
                value = self.get(key)
                if value is None:
                    try:
                        value = encode([image], prompt)
                    except VlmExportError as e:  # encoded alone: say which of the request's images failed
                        if len(images) == 1:
                            raise
                        raise type(e)(f"image {index}: {e}") from None
                    self.put(key, value)
                parts.append(value)
            return join(parts)

        return cached
