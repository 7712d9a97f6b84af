"""How prompt ids are laid out around image placeholders, declared by the adapter and stored in
the manifest, so the runtime (in-process, or inside a Triton python model) builds prompts with no
model code (``runtime.prompt.build_prompt_ids``):

* ``inline``: the image token's text is written into the user message (one per image, then a
  newline), the chat template is applied, and every image token is expanded to
  ``tokens_per_image`` copies, as Hugging Face's LlavaProcessor does.
* ``prefix``: the chat-formatted text is tokenized as is and ``tokens_per_image`` placeholder ids
  per image are put in front of it (prefix-fusion models prepend the image embeddings).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

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
