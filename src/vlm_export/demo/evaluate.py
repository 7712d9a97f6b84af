"""VQA accuracy of a PyTorch LLaVA model: greedy answers, normalised, exact match.

Prompts are built by ``vlm_export.runtime.prompt`` with the demo's layout, exactly as the
runtime builds them, so this is the reference the exported builds are compared with.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import DatasetError, InputError
from ..runtime import pipeline
from ..contract import PromptLayout
from ..runtime.prompt import build_prompt_ids
from ..datasets import VqaItem, normalize_answer
from .model import prompt_layout

MAX_NEW_TOKENS = 8  # the longest easy-vqa answer is 2 tokens plus <|im_end|>


def load_image(path):
    """The runtime's image loader; an unreadable data-set image is a DatasetError here."""
    try:
        return pipeline.load_image(path)
    except InputError as err:
        raise DatasetError(str(err)) from err


def pixel_values(processor, paths: Sequence) -> torch.Tensor:
    return processor(images=[load_image(p) for p in paths], return_tensors="pt")["pixel_values"]


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, left-padded so every row's next token comes at the end."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


@torch.no_grad()
def generate_answers(
    model,
    tokenizer,
    processor,
    items: Sequence[VqaItem],
    *,
    layout: PromptLayout | None = None,
    batch_size: int = 16,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[str]:
    """Greedy answer text (special tokens dropped, not normalised) for each item, in order."""
    layout = layout or prompt_layout()
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        ids, mask = left_pad([build_prompt_ids(tokenizer, layout, it.question, n_images=1) for it in batch], pad)
        pixels = pixel_values(processor, [it.image for it in batch]).to(device, next(model.parameters()).dtype)
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            pixel_values=pixels,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        new = out[:, ids.shape[1] :].cpu()
        answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    return answers


def accuracy(predictions: Sequence[str], items: Sequence[VqaItem]) -> float:
    """Exact match of normalised answers."""
    if not items:
        raise DatasetError("no questions to evaluate")
    hits = sum(normalize_answer(p) == normalize_answer(it.answer) for p, it in zip(predictions, items, strict=True))
    return hits / len(items)


def answer_questions(model, tokenizer, processor, items: Sequence[VqaItem], **kwargs) -> float:
    """VQA accuracy of ``model`` on ``items`` (greedy, normalised exact match)."""
    return accuracy(generate_answers(model, tokenizer, processor, items, **kwargs), items)
