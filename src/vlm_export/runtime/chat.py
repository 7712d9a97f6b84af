"""Conversations: a list of messages instead of one prompt.

The format is Hugging Face's multimodal chat format, the one chat templates and processors read::

    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
     {"role": "assistant", "content": "A cat."},
     {"role": "user", "content": "What colour is it?"}]

``content`` is a string or a list of ``text`` / ``image`` parts; the k-th image part (in order over
the whole conversation) is the request's k-th image. The runtime renders each message's content
to text (an image part becomes the build's image token where the layout writes one) and lets the
model's chat template lay the turns out, so images land where the template puts that turn.
"""
from __future__ import annotations

from typing import Any, Sequence, Union

from ..errors import InputError

ROLES = ("system", "user", "assistant")
Message = dict[str, Any]
#: what a request asks: one prompt, or a conversation
Prompt = Union[str, Sequence[Message]]


def _parts(message: Message, index: int) -> list[dict]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise InputError(f"messages[{index}].content must be a string or a non-empty list of parts")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        if kind != "image":
            raise InputError(f"messages[{index}].content[{j}] must be {{'type': 'text', 'text': ...}} or "
                             "{'type': 'image'}")
    return content


def check_messages(messages: Any) -> list[Message]:
    """The conversation with every content as a list of parts; InputError naming the first problem."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InputError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        checked.append({"role": message["role"], "content": _parts(message, i)})
    if checked[-1]["role"] != "user":
        raise InputError("the last message must be the user's (the model answers it)")
    return checked


def count_images(messages: Sequence[Message]) -> int:
    return sum(1 for m in messages for p in m["content"] if p["type"] == "image")


def last_user_text(messages: Sequence[Message]) -> str:
    """The text of the last user turn (what an image path that reads the prompt is asked)."""
    return "\n".join(p["text"] for p in messages[-1]["content"] if p["type"] == "text")


def prompt_text(prompt: Prompt) -> str:
    """The text an image path that reads the prompt is given: the prompt, or the conversation's
    last user turn (what the model is asked now)."""
    return prompt if isinstance(prompt, str) else last_user_text(check_messages(prompt))


def render_text(parts: Sequence[dict], image_token: str | None, newline: bool = True) -> str:
    """One message's content as text: an image part becomes ``image_token`` (nothing where images
    do not go into the text), followed by a newline before the text that comes after it (unless
    ``newline`` is off)."""
    out = []
    for k, part in enumerate(parts):
        if part["type"] == "image":
            out.append(image_token or "")
            if newline and k + 1 < len(parts) and parts[k + 1]["type"] == "text" and image_token:
                out.append("\n")
        else:
            out.append(part["text"])
    return "".join(out)
