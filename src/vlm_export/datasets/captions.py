"""Captioning items: a user folder of images plus ``captions.jsonl``, one JSON object per line::

    {"image": "relative/path.png", "captions": ["a red circle", "a circle that is red"], "prompt": "..."}

``captions`` holds one or more reference captions (``"caption": "..."`` is read as one); ``prompt``
is optional (the prompt that asks this image for a caption; otherwise the eval's ``--prompt`` or the
build's declared default). Every image is opened when the folder is read, so a missing or broken
image fails before any model runs, naming its line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError
from .jsonl import folder_image, json_object

CAPTIONS_FILE = "captions.jsonl"


@dataclass(frozen=True)
class CaptionItem:
    image: Path
    references: tuple[str, ...]
    prompt: str | None = None


def write_caption_folder(folder: str | Path, items: list[CaptionItem], note: str = "") -> Path:
    """Write ``items`` as a captioning folder: the images copied beside ``captions.jsonl`` (and
    ``README.txt`` holding ``note``: where the captions come from)."""
    import shutil

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, item in enumerate(items):
        name = f"images/{i}{item.image.suffix}"
        shutil.copyfile(item.image, folder / name)
        row = {"image": name, "captions": list(item.references)}
        if item.prompt:
            row["prompt"] = item.prompt
        lines.append(json.dumps(row))
    (folder / CAPTIONS_FILE).write_text("\n".join(lines) + "\n")
    if note:
        (folder / "README.txt").write_text(note.strip() + "\n")
    return folder


def load_caption_folder(path: str | Path) -> list[CaptionItem]:
    """Items of a captioning folder (see the module docstring)."""
    folder = Path(path)
    cfile = folder / CAPTIONS_FILE
    if not cfile.is_file():
        raise DatasetError(f"{cfile} not found; a captioning folder needs a {CAPTIONS_FILE} beside its images")
    items = [_item(folder, f"{cfile}:{lineno}", line)
             for lineno, line in enumerate(cfile.read_text().splitlines(), start=1) if line.strip()]
    if not items:
        raise DatasetError(f"{cfile} holds no captions")
    return items


def _item(folder: Path, where: str, line: str) -> CaptionItem:
    row = json_object(where, line, "image and captions")
    if not isinstance(row.get("image"), str) or not row["image"].strip():
        raise DatasetError(f"{where} lacks a non-empty string for: image")
    refs = row.get("captions", [row["caption"]] if "caption" in row else None)
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r.strip() for r in refs):
        raise DatasetError(f"{where} needs \"captions\": a list of one or more non-empty reference captions")
    prompt = row.get("prompt")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise DatasetError(f"{where}: \"prompt\" must be a non-empty string when given")
    image = folder_image(folder, row["image"], where)
    _check_image(image, where)
    return CaptionItem(image, tuple(r.strip() for r in refs), prompt)


def _check_image(image: Path, where: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as img:
            img.verify()  # reads the whole file: a truncated or corrupt image fails here, not mid-eval
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{where}: image {image} cannot be read ({type(err).__name__}: {err})") from err
