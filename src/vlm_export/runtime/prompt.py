"""Turning (prompt text, number of images) into token ids with image placeholders, as the
build's :class:`~vlm_export.contract.PromptLayout` says (see there for the layouts). The decoding
scheme then puts each image's rows where its placeholders are."""
from __future__ import annotations

import numpy as np

from ..contract import ImageText, PromptLayout
from ..errors import InputError


def format_user_text(tokenizer, layout: PromptLayout, prompt: str, n_images: int) -> str:
    """The full text fed to the tokenizer, image tokens not yet expanded."""
    content = prompt
    if layout.kind == "inline" and n_images:
        content = layout.image_token * n_images + "\n" + prompt
    if layout.use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    return content


def build_prompt_ids(tokenizer, layout: PromptLayout, prompt: str, n_images: int) -> list[int]:
    """Token ids for one prompt with ``n_images`` images, placeholders expanded."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("the prompt is empty; send some text")
    text = format_user_text(tokenizer, layout, prompt, n_images)
    if layout.kind == "inline":
        if layout.image_token in prompt:
            raise InputError(
                f"the prompt contains the image token {layout.image_token!r} itself; "
                "pass images separately and remove it from the text"
            )
        text = text.replace(layout.image_token, layout.image_token * layout.tokens_per_image)
        ids = tokenizer(text, add_special_tokens=layout.add_special_tokens)["input_ids"]
        expected = n_images * layout.tokens_per_image
        got = sum(1 for i in ids if i == layout.image_token_id)
        if got != expected:  # a tokenizer that splits the image token would silently misplace images
            raise InputError(
                f"the tokenizer produced {got} image tokens, expected {expected}; "
                f"check that {layout.image_token!r} is a single special token of the tokenizer"
            )
        return list(ids)
    ids = tokenizer(text, add_special_tokens=layout.add_special_tokens)["input_ids"]
    if layout.image_token_id in ids:  # the model would splice image rows into the text's own copy of it
        raise InputError("the prompt contains the image token itself; pass images separately and remove it from the text")
    return [layout.image_token_id] * (layout.tokens_per_image * n_images) + list(ids)


class ImageTextEncoder:
    """The prompt as the image path's text inputs (see :class:`~vlm_export.contract.ImageText`)."""

    def __init__(self, spec: ImageText, tokenizer):
        self.spec, self.tokenizer = spec, tokenizer

    def feeds(self, prompt: str, n_images: int) -> dict[str, np.ndarray]:
        # the raw prompt with the tokenizer's own special tokens, as InstructBlipProcessor does
        enc = self.tokenizer(prompt, add_special_tokens=True)
        ids = list(enc["input_ids"])
        if len(ids) > self.spec.max_length:
            raise InputError(f"the prompt is {len(ids)} tokens for the image path's text reader, which takes at most "
                             f"{self.spec.max_length}; shorten the prompt")
        mask = list(enc.get("attention_mask") or [1] * len(ids))
        return {self.spec.ids: np.tile(np.asarray([ids], np.int64), (n_images, 1)),
                self.spec.mask: np.tile(np.asarray([mask], np.int64), (n_images, 1))}
