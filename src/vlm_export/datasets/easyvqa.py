"""VQA items: the easy-vqa data set (PyPI ``easy-vqa==1.0``, MIT) and a user folder format.

easy-vqa ships 64x64 images of one coloured shape, with questions about its colour and shape
and 13 one-word answers. A user folder holds images plus ``questions.jsonl``, one JSON object
per line: ``{"image": "relative/path.png", "question": "...", "answer": "..."}``.

easy-vqa has no captions. ``caption_split`` makes TEMPLATE captions from its labels (the shape and
colour its own questions answer, e.g. "a red circle"): enough to exercise caption metrics and to
compare a build's captions with PyTorch's, not a measure of captioning quality.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DatasetError
from .captions import CaptionItem
from .jsonl import folder_image, json_object

SPLITS = ("train", "test")
QUESTIONS_FILE = "questions.jsonl"
INSTALL_HINT = "pip install easy-vqa==1.0"
ANSWERS = (
    "circle", "rectangle", "triangle",
    "red", "green", "blue", "black", "gray", "teal", "brown", "yellow",
    "yes", "no",
)  # fmt: skip
SHAPES, COLORS = ANSWERS[:3], ANSWERS[3:11]
#: the reference captions of an image, from its two labels; several phrasings, as captioning sets have
CAPTION_TEMPLATES = ("a {color} {shape}", "a {shape} that is {color}", "a {color} {shape} in the image")
CAPTIONS_NOTE = ("Template captions made from easy-vqa's labels (the shape and colour its questions answer), "
                 "with vlm-export's CAPTION_TEMPLATES: not written by people; they test the caption metrics "
                 "and agreement with PyTorch, not captioning quality.")


@dataclass(frozen=True)
class VqaItem:
    image: Path
    question: str
    answer: str


def normalize_answer(text: str) -> str:
    """The form answers are compared in: trimmed, lower case, no trailing punctuation."""
    return text.strip().lower().rstrip(".!?,;:").strip()


def data_dir() -> Path:
    """``easy_vqa/data`` of the installed package."""
    # find_spec, not import: only the data files are needed.
    spec = importlib.util.find_spec("easy_vqa")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the easy-vqa data set is not installed; run: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not folder.is_dir():
        raise DatasetError(f"{folder} is missing; reinstall with: {INSTALL_HINT}")
    return folder


def load_split(split: str, limit: int | None = None) -> list[VqaItem]:
    """The questions of one easy-vqa split, in the order of its ``questions.json``."""
    if split not in SPLITS:
        raise DatasetError(f"easy-vqa has no split {split!r}; use one of {', '.join(SPLITS)}")
    folder = data_dir() / split
    path = folder / "questions.json"
    try:
        rows = json.loads(path.read_text())
        items = [VqaItem(folder / "images" / f"{int(i)}.png", str(q), str(a)) for q, a, i in rows]
    except (OSError, ValueError, TypeError) as err:
        raise DatasetError(f"cannot read easy-vqa questions {path}: {err}; reinstall with: {INSTALL_HINT}") from err
    return items[:limit] if limit is not None else items


def load_folder(path: str | Path, limit: int | None = None) -> list[VqaItem]:
    """Items of a user folder: images plus ``questions.jsonl`` (see the module docstring)."""
    folder = Path(path)
    qfile = folder / QUESTIONS_FILE
    if not qfile.is_file():
        raise DatasetError(f"{qfile} not found; a VQA folder needs a {QUESTIONS_FILE} beside its images")
    items = []
    for lineno, line in enumerate(qfile.read_text().splitlines(), start=1):
        if line.strip():
            items.append(_folder_item(folder, qfile, lineno, line))
    if not items:
        raise DatasetError(f"{qfile} holds no questions")
    return items[:limit] if limit is not None else items


def _folder_item(folder: Path, qfile: Path, lineno: int, line: str) -> VqaItem:
    where = f"{qfile}:{lineno}"
    row = json_object(where, line, "image, question and answer")
    missing = [k for k in ("image", "question", "answer") if not isinstance(row.get(k), str) or not row[k].strip()]
    if missing:
        raise DatasetError(f"{where} lacks a non-empty string for: {', '.join(missing)}")
    return VqaItem(folder_image(folder, row["image"], where), row["question"], row["answer"])


def image_labels(split: str) -> dict[Path, tuple[str, str]]:
    """(shape, colour) of every image of a split whose questions tell both: "what ..." questions
    answered with a shape or a colour, which may name the other label ("what is the red shape?")."""
    shapes: dict[Path, str] = {}
    colors: dict[Path, str] = {}
    for item in load_split(split):
        if not item.question.startswith("what"):
            continue  # yes/no questions name a shape or colour that may be absent
        answer = normalize_answer(item.answer)
        if answer in SHAPES:
            shapes[item.image] = answer
            named = [c for c in COLORS if f" {c} shape" in item.question]  # "what is the red shape?"
            if named:
                colors[item.image] = named[0]
        elif answer in COLORS:
            colors[item.image] = answer
            named = [s for s in SHAPES if f"the {s}" in item.question]  # "what is the color of the triangle?"
            if named:
                shapes[item.image] = named[0]
    return {image: (shapes[image], colors[image]) for image in sorted(shapes, key=lambda p: int(p.stem))
            if image in colors}


def caption_split(split: str, limit: int | None = None) -> list[CaptionItem]:
    """Captioning items of an easy-vqa split: each labelled image (in image order) with its template
    captions (``CAPTION_TEMPLATES``; see the module docstring for what they are and are not)."""
    labels = image_labels(split)
    if not labels:
        raise DatasetError(f"no image of easy-vqa/{split} has both a shape and a colour answer; reinstall with: "
                           f"{INSTALL_HINT}")
    items = [CaptionItem(image, tuple(t.format(shape=shape, color=color) for t in CAPTION_TEMPLATES))
             for image, (shape, color) in labels.items()]
    return items[:limit] if limit is not None else items
