"""What every folder data set (questions.jsonl, captions.jsonl) checks per line: a JSON object whose
image names a file in the folder; each failure one line naming ``file:line``."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import DatasetError


def json_object(where: str, line: str, fields: str) -> dict:
    """The line as a JSON object (``fields``: what it must hold, for the error)."""
    try:
        row = json.loads(line)
    except ValueError as err:
        raise DatasetError(f"{where} is not valid JSON: {err}") from err
    if not isinstance(row, dict):
        raise DatasetError(f"{where} must be a JSON object with {fields}")
    return row


def folder_image(folder: Path, name: str, where: str) -> Path:
    image = folder / name
    if not image.is_file():
        raise DatasetError(f"{where}: image {image} not found")
    return image
