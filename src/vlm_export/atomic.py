"""Folders written atomically: built in a hidden sibling, renamed into place only when complete,
removed on any failure. Replacing an existing folder happens only at that final rename.

The hidden siblings carry the writing process's id (``.<name>.tmp-<pid>-<random>``): a process
killed mid-write (out of memory, Ctrl-C twice) cannot clean up, so the next write to the same
path removes the siblings whose process is gone - and never those of a write still running."""
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
        remove_stale_siblings(out)
        tmp = out.parent / f".{out.name}.tmp-{_tag()}"
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
        old = out.parent / f".{out.name}.old-{_tag()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tag() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_siblings(out: Path) -> list[Path]:
    """Remove ``.<name>.tmp-*`` / ``.<name>.old-*`` left by writers that no longer run."""
    removed = []
    for kind in ("tmp", "old"):
        for path in out.parent.glob(f".{out.name}.{kind}-*"):
            pid = path.name.rsplit(f".{kind}-", 1)[-1].split("-")[0]
            if pid.isdigit() and _alive(int(pid)):
                continue  # a write in progress (or a pid reused since: left for the next time)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
