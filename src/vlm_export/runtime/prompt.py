"""Turning (a prompt or a conversation, number of images) into token ids with image placeholders, as the
build's :class:`~vlm_export.contract.PromptLayout` says (see there for the layouts). The decoding
scheme then puts each image's rows where its placeholders are."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..contract import ImageText, PromptLayout
from ..errors import InputError
from .chat import Message, Prompt, check_messages, count_images, prompt_text, render_text


def as_messages(prompt: Prompt, n_images: int) -> list[Message]:
    """A conversation from one prompt (its images before the text, as one user turn) or checked
    from the messages given, whose image parts must match the images sent."""
    if isinstance(prompt, str):
        if not prompt.strip() and not n_images:
            raise InputError("the prompt is empty; send some text, or an image to describe")
        # images alone: the model continues from them (BLIP-2 captions so: its processor with images only)
        text = [{"type": "text", "text": prompt}] if prompt.strip() else []
        return [{"role": "user", "content": [{"type": "image"}] * n_images + text}]
    messages = check_messages(prompt)
    if count_images(messages) != n_images:
        sent = f"{n_images} image was" if n_images == 1 else f"{n_images} images were"
        raise InputError(f"the messages have {count_images(messages)} image parts but {sent} sent; "
                         "send one image per image part, in order")
    return messages


def _processor_template(tokenizer, layout: PromptLayout) -> bool:
    """Whether the turns go through a chat template written for the model's processor (typed parts in,
    the image token written by the template: ``PromptLayout.chat_parts``)."""
    return layout.use_chat_template and layout.chat_parts and bool(getattr(tokenizer, "chat_template", None))


def format_text(tokenizer, layout: PromptLayout, messages: Sequence[Message], sent: Prompt = "") -> str:
    """The full text fed to the tokenizer, image tokens not yet expanded: each turn rendered, then
    the chat template (where the layout uses one), which decides where each turn - and so each
    image - goes. ``sent``: the conversation as the caller wrote it, whose string contents a template
    written for the model's processor gets as strings, as that processor gives them (HunyuanOCR's prints
    an answer's content as it is: a list of parts would be printed as a list)."""
    image_token = layout.image_token if layout.kind == "inline" else None
    if _processor_template(tokenizer, layout):  # the template writes each image part's token itself
        written = sent if not isinstance(sent, str) else [{}] * len(messages)
        turns = [{"role": m["role"], "content": m["content"][0]["text"] if isinstance(w.get("content"), str)
                  else [dict(p) for p in m["content"]]} for m, w in zip(messages, written)]
        return _render_template(tokenizer, turns)
    turns = [{"role": m["role"], "content": render_text(m["content"], image_token, layout.image_newline)} for m in messages]
    if layout.use_chat_template and getattr(tokenizer, "chat_template", None):
        return _render_template(tokenizer, turns)
    if len(turns) > 1:
        raise InputError("this model has no chat template: send one prompt (a single user message)")
    return turns[0]["content"]


def _render_template(tokenizer, turns: list[dict]) -> str:
    """The chat template over ``turns``; a template that refuses them (``raise_exception``: Mistral's,
    Llama 2's and Gemma's reject a system turn or roles that do not alternate) is the caller's input
    error, in the template's own words."""
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    except TemplateError as e:
        raise InputError(f"the model's chat template refuses this conversation: {e}; "
                         f"send the turns it takes (roles sent: {', '.join(t['role'] for t in turns)})") from None


def expand_task(layout: PromptLayout, text: str) -> str:
    """``text`` with a task token replaced as the model's processor replaces it (``layout.task_prompts``;
    Florence2Processor._construct_prompts): tasks without input first, the whole prompt or an
    error; then tasks with input, the rest of the prompt as their input."""
    tasks = layout.task_prompts
    for token, value in tasks.items():
        if "{input}" not in value and token in text:
            if text != token:
                raise InputError(f"the task token {token} must be the only content of the prompt")
            text = value
            break
    for token, value in tasks.items():
        if "{input}" in value and token in text:
            return value.format(input=text.replace(token, "").strip())
    return text


def _expanded(layout: PromptLayout, content):
    if isinstance(content, str):
        return expand_task(layout, content)
    return [{**p, "text": expand_task(layout, p["text"])} if p.get("type") == "text" else p for p in content]


def _images_as_written(tokenizer, layout: PromptLayout, prompt: Prompt, n_images: int) -> str:
    """A prompt that writes the image token itself: the model's input as written, where the layout
    takes images where written and no chat template lays the prompt out (``PromptLayout.images_where_written``),
    one token per image; else an InputError saying how to send it."""
    token = layout.image_token
    templated = layout.use_chat_template and bool(getattr(tokenizer, "chat_template", None))
    if not layout.images_where_written or templated or not isinstance(prompt, str):
        why = "its chat template places each image" if templated else "images go before the text"
        raise InputError(f"the prompt contains the image token {token!r} itself; pass images separately and remove it "
                         f"from the text ({why})")
    if prompt.count(token) != n_images:
        raise InputError(f"the prompt writes the image token {token!r} {prompt.count(token)} time(s) for {n_images} "
                         "image(s): write it once where each image goes, or not at all (images then go before the text)")
    return prompt


def _expand_images(layout: PromptLayout, text: str, grids: Sequence[tuple[int, int]]) -> str:
    """``text`` with its k-th image token replaced by the text image k becomes (its grid's, where tiled)."""
    parts = text.split(layout.image_token)
    if len(parts) != len(grids) + 1:  # the template or the prompt wrote another count than the images sent
        raise InputError(f"the prompt holds {len(parts) - 1} image tokens {layout.image_token!r} for {len(grids)} "
                         "image(s): write one per image, or none")
    out = [parts[0]]
    for index, (grid, part) in enumerate(zip(grids, parts[1:])):
        out += [layout.expanded_image(grid, index), part]
    return "".join(out)


def build_prompt_ids(tokenizer, layout: PromptLayout, prompt: Prompt, n_images: int,
                     grids: Sequence[tuple[int, int]] | None = None) -> list[int]:
    """Token ids for one prompt or conversation with ``n_images`` images, placeholders expanded.
    ``grids``: each image's tiles (rows, cols) as its image processor cuts it, where the layout tiles
    images (``PromptLayout.image_tiles``; ``runtime.images.image_grids`` reads them)."""
    if layout.tiled and (grids is None or len(grids) != n_images):
        raise ValueError(f"this build cuts each image into tiles: pass the {n_images} image(s)' grids "
                         f"(got {'none' if grids is None else len(grids)})")
    grids = list(grids) if layout.tiled else [(0, 0)] * n_images
    messages = as_messages(prompt, n_images)
    if layout.task_prompts:
        messages = [{**m, "content": _expanded(layout, m["content"])} for m in messages]
    texts = [p["text"] for m in messages for p in m["content"] if p["type"] == "text"]
    if layout.kind == "inline" and any(layout.image_token in t for t in texts):
        text = _images_as_written(tokenizer, layout, prompt, n_images)
    else:
        text = format_text(tokenizer, layout, messages, prompt)
    if layout.kind == "inline":
        # tokenized as the model's processor tokenizes text (processor(text=...), and its rendered template in
        # ProcessorMixin.apply_chat_template): with the tokenizer's special tokens (a Llama tokenizer's BOS)
        # unless the text already starts with the BOS (a template that writes it)
        bos = getattr(tokenizer, "bos_token", None)
        special = layout.add_special_tokens or not (bos and text.startswith(bos))
        text = layout.text_before + _expand_images(layout, text, grids)  # the processor's own prefix (Janus's)
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        expected = sum(layout.image_tokens(grid) for grid in grids)
        got = sum(1 for i in ids if i == layout.image_token_id)
        if got != expected:  # a tokenizer that splits the image token would silently misplace images
            raise InputError(
                f"the tokenizer produced {got} image tokens, expected {expected}; check that the image token "
                f"(id {layout.image_token_id}, written {layout.image_token!r}) is a single special token of the tokenizer"
            )
        return list(ids)
    text = layout.text_before + text + layout.text_after
    ids = tokenizer(text, add_special_tokens=layout.add_special_tokens)["input_ids"]
    if layout.image_token_id in ids:  # the model would splice image rows into the text's own copy of it
        raise InputError("the prompt contains the image token itself; pass images separately and remove it from the text")
    return [layout.image_token_id] * (layout.tokens_per_image * n_images) + list(ids)


class ImageTextEncoder:
    """The prompt as the image path's text inputs (see :class:`~vlm_export.contract.ImageText`)."""

    def __init__(self, spec: ImageText, tokenizer):
        self.spec, self.tokenizer = spec, tokenizer

    def feeds(self, prompt: Prompt, n_images: int) -> dict[str, np.ndarray]:
        # the raw prompt (a conversation's last user turn) with the tokenizer's own special tokens,
        # as InstructBlipProcessor does
        enc = self.tokenizer(prompt_text(prompt), add_special_tokens=True)
        ids = list(enc["input_ids"])
        if len(ids) > self.spec.max_length:
            raise InputError(f"the prompt is {len(ids)} tokens for the image path's text reader, which takes at most "
                             f"{self.spec.max_length}; shorten the prompt")
        mask = list(enc.get("attention_mask") or [1] * len(ids))
        return {self.spec.ids: np.tile(np.asarray([ids], np.int64), (n_images, 1)),
                self.spec.mask: np.tile(np.asarray([mask], np.int64), (n_images, 1))}
