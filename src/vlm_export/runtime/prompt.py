"""Turning (prompt text, number of images) into token ids with image placeholders.

The layout is declared by the adapter at build time and stored in the manifest, so the
runtime (in-process, or inside a Triton python model) needs no model code to build a prompt:

* ``inline``: the image token's text is written into the user message (one per image, then a
  newline), the chat template is applied, and every image token is expanded to
  ``tokens_per_image`` copies, as Hugging Face's LlavaProcessor does.
* ``prefix``: the chat-formatted text is tokenized as is and ``tokens_per_image`` placeholder ids
  per image are put in front of it (prefix-fusion models prepend the image embeddings).

Either way the decoder graph replaces every id equal to ``image_token_id`` with the next row of
the image embeddings, in order.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..errors import InputError

LAYOUTS = ("inline", "prefix")


@dataclass(frozen=True)
class PromptLayout:
    kind: str  # one of LAYOUTS
    image_token_id: int
    tokens_per_image: int
    image_token: str | None = None  # text form of the image token (inline layout only)
    use_chat_template: bool = True

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ValueError(f"prompt layout {self.kind!r} is not one of {LAYOUTS}")
        if self.kind == "inline" and not self.image_token:
            raise ValueError("an inline prompt layout needs the image token's text")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptLayout":
        return cls(**d)


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
        raise InputError("the prompt is empty; pass some text with --prompt")
    text = format_user_text(tokenizer, layout, prompt, n_images)
    if layout.kind == "inline":
        if layout.image_token in prompt:
            raise InputError(
                f"the prompt contains the image token {layout.image_token!r} itself; "
                "pass images separately and remove it from the text"
            )
        text = text.replace(layout.image_token, layout.image_token * layout.tokens_per_image)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected = n_images * layout.tokens_per_image
        got = sum(1 for i in ids if i == layout.image_token_id)
        if got != expected:  # a tokenizer that splits the image token would silently misplace images
            raise InputError(
                f"the tokenizer produced {got} image tokens, expected {expected}; "
                f"check that {layout.image_token!r} is a single special token of the tokenizer"
            )
        return list(ids)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [layout.image_token_id] * (layout.tokens_per_image * n_images) + list(ids)
