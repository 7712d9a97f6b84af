"""Folders written atomically: built in a hidden sibling, renamed into place only when complete,
removed on any failure. Replacing an existing folder happens only at that final rename."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from .errors import VlmExportError


@contextlib.contextmanager
def atomic_folder(out: Path, force: bool, error: type[VlmExportError], what: str) -> Iterator[Path]:
    out = Path(out).absolute()
    if out.exists() and not force:
        raise error(f"{out} already exists; pass --force to replace it, or choose another --out")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except OSError as e:
        raise error(f"cannot write the {what} {out}: {e.strerror}; choose a writable --out") from None
    try:
        yield tmp
        if tmp.exists():  # the body may have moved it elsewhere (a failed build is kept as <out>.failed)
            _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _publish(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
