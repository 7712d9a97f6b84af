"""Evaluation and calibration data: the easy-vqa data set and a user folder format (``easyvqa``),
and choosing questions from them. Below the comparison layer: it imports only ``errors``."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from .easyvqa import VqaItem, load_folder, load_split, normalize_answer

__all__ = ["VqaItem", "load_folder", "load_split", "normalize_answer", "load_items"]


def load_items(dataset: str | Path, split: str = "test", limit: int | None = None,
               spread: int | None = None) -> tuple[str, list[VqaItem]]:
    """``easy-vqa`` (a split of the installed data set) or a folder with questions.jsonl.
    ``limit``: the first N questions; ``spread``: N questions evenly spaced over the whole set
    (a fairer sample: the set is ordered by image)."""
    name, items = (f"easy-vqa/{split}", load_split(split)) if dataset == "easy-vqa" else (str(dataset), load_folder(dataset))
    if spread:
        if spread > len(items):
            raise InputError(f"{name} has {len(items)} questions; cannot spread {spread} over it")
        items = items[:: len(items) // spread][:spread]
    return name, items[:limit] if limit else items
