"""The build folder's promises, through the real ``build()``: an existing build is replaced only by
``--force`` and only at the final rename; a build interrupted mid-write (a real KeyboardInterrupt,
as Ctrl-C raises it) leaves the old build byte for byte; nothing hidden (``.tmp-`` / ``.old-``) is
left beside it; and a stale ``<out>.failed`` does not survive next to a later good build."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_export.build import BuildOptions, build
from vlm_export.compare.parity import Sample
from vlm_export.errors import BuildError
from vlm_export.manifest import read_manifest, verify_hashes
from vlm_export.progress import Progress


def hidden_siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dead_pid() -> int:
    """The id of a process that has exited (a writer killed outright leaves such a name behind)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.fixture
def existing(tiny_build, tmp_path):
    """A private copy of a finished build at tmp_path/build, with a file only the old one has."""
    import shutil

    out = tmp_path / "build"
    shutil.copytree(tiny_build("llava-llama").path, out)
    (out / "notes.txt").write_text("only in the old build")
    return out


class InterruptAt(Progress):
    """Raises KeyboardInterrupt when the build reaches the step starting with ``prefix``, after
    noting what the hidden folder being written holds at that moment."""

    def __init__(self, prefix: str, out: Path):
        self.prefix, self.out = prefix, out
        self.writing: list[str] = []
        self.written: list[str] = []

    @contextlib.contextmanager
    def step(self, description: str, total: int = 1):
        if description.startswith(self.prefix):
            self.writing = hidden_siblings(self.out)
            if self.writing:
                self.written = sorted(contents(self.out.parent / self.writing[0]))
            raise KeyboardInterrupt
        yield lambda: None


def test_interrupted_force_build_leaves_the_old_build_intact(existing, tiny_model_dir):
    model = tiny_model_dir("llava-llama")
    before = contents(existing)
    with pytest.raises(BuildError, match="already exists; pass --force"):
        build(model, existing, BuildOptions(max_sequence=256))
    assert contents(existing) == before

    progress = InterruptAt("exporting projector", existing)
    with pytest.raises(KeyboardInterrupt):
        build(model, existing, BuildOptions(force=True, max_sequence=256), progress)
    # it was writing in one hidden sibling (the vision graph already there), never in the old build
    assert len(progress.writing) == 1 and progress.writing[0].startswith(".build.tmp-"), progress.writing
    assert "graphs/vision_encoder.onnx" in progress.written
    assert contents(existing) == before
    assert hidden_siblings(existing) == []
    assert verify_hashes(existing, read_manifest(existing)) == []


def test_force_build_replaces_the_old_one_and_clears_stale_leftovers(existing, tiny_model_dir, tmp_path):
    old = read_manifest(existing)
    failed = tmp_path / "build.failed"  # what an earlier failed attempt at the same --out left
    (failed / "graphs").mkdir(parents=True)
    (failed / "report.md").write_text("# Parity report: FAILED\n")
    (failed / "manifest.failed.json").write_text("{}")
    pid = dead_pid()
    for kind in ("tmp", "old"):  # writers killed outright, mid-write and mid-swap
        (tmp_path / f".build.{kind}-{pid}-0badc0de" / "graphs").mkdir(parents=True)

    options = BuildOptions(force=True, max_sequence=256, max_images=1, parity_new_tokens=2,
                           samples=[Sample("What is the capital of France?")])
    result = build(tiny_model_dir("llava-llama"), existing, options)

    assert result.path == existing and result.manifest["parity"]["passed"]
    new = read_manifest(existing)
    assert (old["limits"]["max_images"], new["limits"]["max_images"]) == (2, 1)  # the new build, not the old
    assert not (existing / "notes.txt").exists()  # replaced whole, not merged into
    assert verify_hashes(existing, new) == []
    assert not failed.exists()  # no stale failure report beside a good build
    assert hidden_siblings(existing) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]


def test_a_folder_that_appears_while_writing_is_not_replaced(tmp_path):
    """Checked at the start and again at the final rename: a folder made at --out meanwhile (a user's, or
    a concurrent build's without --force) keeps its files, and the new one is not published."""
    from vlm_export.atomic import atomic_folder

    out = tmp_path / "race"
    with pytest.raises(BuildError, match=r"^while this build folder was written, .*race already exists; pass --force"):
        with atomic_folder(out, False, BuildError, "build folder", lambda folder: False) as tmp:
            (tmp / "manifest.json").write_text("{}")
            out.mkdir()
            (out / "notes.txt").write_text("precious")
    assert contents(out) == {"notes.txt": b"precious"}
    assert hidden_siblings(out) == []
    with atomic_folder(out, True, BuildError, "build folder", lambda folder: True) as tmp:  # --force, ours: replaced
        (tmp / "manifest.json").write_text("{}")
    assert contents(out) == {"manifest.json": b"{}"}


def test_sigterm_during_a_finalizer_is_not_lost():
    """A signal that lands while a __del__ runs (CI saw one in regex's Group.__del__): Python drops an exception
    raised there, so the handler sends the signal again and it unwinds the ordinary code that follows."""
    import os
    import signal
    import time

    from vlm_export.cli import _on_sigterm, _Terminated

    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs at one of these bytecodes, inside __del__
                pass

    before = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with pytest.raises(_Terminated):
            obj = SignalledWhileCollected()
            del obj
            time.sleep(5)
    finally:
        signal.signal(signal.SIGTERM, before)


def test_sigterm_mid_build_leaves_nothing_behind(tiny_model_dir, tmp_path):
    """What timeout, docker, systemd and Kubernetes send: unwound as Ctrl-C is, the half-written folder removed."""
    import os
    import signal
    import time

    out = tmp_path / "build"
    proc = subprocess.Popen([sys.executable, "-m", "vlm_export.cli", "build", str(tiny_model_dir("llava-llama")),
                             "--out", str(out), "--max-sequence", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not hidden_siblings(out) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)  # until it writes
        assert hidden_siblings(out), "the build never started writing"
        time.sleep(2)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "terminated", err
    assert not out.exists() and hidden_siblings(out) == []
