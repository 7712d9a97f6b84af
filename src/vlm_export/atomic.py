"""Folders written atomically: built in a hidden sibling, renamed into place only when complete,
removed on any failure. Replacing an existing folder happens only at that final rename, and
only when it is empty or (with ``force``) one the same writer made: ``--force`` never deletes a
user's own files.

The hidden siblings carry the writing process's id (``.<name>.tmp-<pid>-<random>``): a process
killed mid-write (out of memory, Ctrl-C twice) cannot clean up, so the next write to the same
path removes the siblings whose process is gone - and never those of a write still running."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .errors import VlmExportError


def write_text(path: Path, text: str) -> None:
    """``path`` holds ``text`` whole or keeps what it held: written to a hidden sibling (this process's
    own, so two writers never share one) and renamed into place; its folder is made first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_folder(out: Path, force: bool, error: type[VlmExportError], what: str,
                  made_here: Callable[[Path], bool]) -> Iterator[Path]:
    """``made_here(folder)``: whether an existing folder is one this writer made before, so that
    ``force`` may replace it."""
    out = Path(out).absolute()
    if out.exists() or out.is_symlink():
        _check_replaceable(out, force, error, what, made_here)
    try:
        _make_parent(out.parent)
        remove_stale_siblings(out)
        tmp = out.parent / f".{out.name}.tmp-{_tag()}"
        tmp.mkdir()
    except OSError as e:
        raise error(f"cannot write the {what} {out}: {e.strerror}; choose a writable --out") from None
    try:
        yield tmp
        if tmp.exists():  # the body may have moved it elsewhere (a failed build is kept as <out>.failed)
            if out.exists() or out.is_symlink():  # again: something may have appeared there meanwhile
                try:
                    _check_replaceable(out, force, error, what, made_here)
                except VlmExportError as e:
                    raise error(f"while this {what} was written, {str(e)[0].lower()}{str(e)[1:]} (it was not "
                                "published)") from None
            _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_replaceable(out: Path, force: bool, error: type[VlmExportError], what: str,
                       made_here: Callable[[Path], bool]) -> None:
    cwd = Path.cwd().absolute()
    if out == cwd or out in cwd.parents:  # replaced, it would leave the shell in a deleted folder
        raise error(f"{out} holds the current folder; it cannot be replaced: choose another --out")
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return  # an empty folder (made for the output beforehand) loses nothing
    if not force:
        raise error(f"{out} already exists; pass --force to replace it, or choose another --out")
    if out.is_symlink() or not out.is_dir():
        raise error(f"{out} exists and is not a folder; --force replaces only a {what} written before: "
                    "choose another --out")
    if not made_here(out):
        raise error(f"{out} is not a {what} vlm-export wrote, and --force replaces only those (never other "
                    "files): remove it yourself or choose another --out")


def _make_parent(parent: Path) -> None:
    """``parent`` and its ancestors as folders; a file in the way is named (mkdir says only 'File exists')."""
    for folder in (parent, *parent.parents):
        if folder.exists():
            if not folder.is_dir():
                raise NotADirectoryError(20, f"{folder} is a file, not a folder")
            break
    parent.mkdir(parents=True, exist_ok=True)


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
