"""Evaluation and calibration data: the easy-vqa data set and a user folder format (``easyvqa``),
captioning folders and easy-vqa's template captions (``captions``), and choosing items from them.
Below the comparison layer: it imports only ``errors``."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, TypeVar

from ..errors import DatasetError, InputError
from .captions import CAPTIONS_FILE, CaptionItem, load_caption_folder, write_caption_folder
from .easyvqa import CAPTIONS_NOTE, QUESTIONS_FILE, VqaItem, caption_split, load_folder, load_split, normalize_answer

__all__ = ["VqaItem", "CaptionItem", "load_folder", "load_split", "normalize_answer", "load_items",
           "load_caption_items", "dataset_task", "write_caption_folder", "caption_split", "TASKS", "CAPTION_SET"]

TASKS = ("vqa", "caption")
#: easy-vqa's images with template captions made from their labels (easyvqa.caption_split)
CAPTION_SET = "easy-vqa-captions"
T = TypeVar("T")


def dataset_task(dataset: str | Path, task: str | None = None) -> str:
    """``vqa`` or ``caption``: ``task`` when given, else what the data set is: easy-vqa (vqa),
    easy-vqa-captions (caption), or a folder by the file it holds (questions.jsonl / captions.jsonl)."""
    if task is not None and task not in TASKS:
        raise InputError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if str(dataset) in ("easy-vqa", CAPTION_SET):
        named = "caption" if str(dataset) == CAPTION_SET else task or "vqa"
        if task and task != named:
            raise InputError(f"{dataset} is a captioning set; --task vqa needs easy-vqa or a folder with "
                             f"{QUESTIONS_FILE}")
        return named
    if task:
        return task  # the folder reader names the file it lacks
    folder = Path(dataset)
    held = [t for t, name in (("vqa", QUESTIONS_FILE), ("caption", CAPTIONS_FILE)) if (folder / name).is_file()]
    if len(held) == 1:
        return held[0]
    if held:
        raise InputError(f"{folder} holds both {QUESTIONS_FILE} and {CAPTIONS_FILE}; choose one with "
                         "--task vqa|caption")
    raise DatasetError(f"{dataset} is not easy-vqa, {CAPTION_SET} or a folder with {QUESTIONS_FILE} (VQA) or "
                       f"{CAPTIONS_FILE} (captions)")


def load_items(dataset: str | Path, split: str = "test", limit: int | None = None,
               spread: int | None = None) -> tuple[str, list[VqaItem]]:
    """``easy-vqa`` (a split of the installed data set) or a folder with questions.jsonl.
    ``limit``: the first N questions; ``spread``: N questions evenly spaced over the whole set
    (a fairer sample: the set is ordered by image)."""
    name, items = (f"easy-vqa/{split}", load_split(split)) if dataset == "easy-vqa" else (str(dataset), load_folder(dataset))
    return name, _subset(name, items, limit, spread)


def load_caption_items(dataset: str | Path, split: str = "test", limit: int | None = None,
                       spread: int | None = None) -> tuple[str, list[CaptionItem], str]:
    """``easy-vqa-captions`` (or ``easy-vqa``: a split's images with template captions) or a folder
    with captions.jsonl: the name, the items (``limit`` / ``spread`` as ``load_items``) and a note
    on where the references come from (empty for a user folder)."""
    if str(dataset) in ("easy-vqa", CAPTION_SET):
        name = f"{CAPTION_SET}/{split}"
        return name, _subset(name, caption_split(split), limit, spread), CAPTIONS_NOTE
    return str(dataset), _subset(str(dataset), load_caption_folder(dataset), limit, spread), ""


def _subset(name: str, items: Sequence[T], limit: int | None, spread: int | None) -> list[T]:
    items = list(items)
    if spread:
        if spread > len(items):
            raise InputError(f"{name} has {len(items)} items; cannot spread {spread} over it")
        items = items[:: len(items) // spread][:spread]
    return items[:limit] if limit else items
