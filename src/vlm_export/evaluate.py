"""``vlm-export eval``: VQA accuracy of the PyTorch reference and the build on the same questions,
judged by the accuracy gate and recorded in the build's report."""
from __future__ import annotations

from pathlib import Path

from .adapters.reference import BACKENDS, open_pipeline
from .compare.accuracy import accuracy_section, answer_all
from .compare.policy import AccuracyGate
from .compare.report import record_accuracy
from .datasets import load_items
from .progress import Progress


def evaluate_build(build_dir: Path, dataset: str = "easy-vqa", split: str = "test", limit: int | None = None,
                   backends: tuple[str, ...] = BACKENDS, threads: int | None = None,
                   progress: Progress | None = None, spread: int | None = None,
                   gate: AccuracyGate | None = None, check_hashes: bool = True) -> dict:
    """Answer, judge (the first backend is the reference) and record in the report. The verdict
    is in ``["gate"]["passed"]`` and the failures in ``["failures"]``."""
    progress = progress or Progress()
    name, items = load_items(dataset, split, limit, spread)
    pipes = {}
    for backend in backends:
        with progress.step(f"loading {backend}") as advance:
            pipes[backend] = open_pipeline(build_dir, backend, threads=threads, check_hashes=check_hashes)
            advance()
    section, failures = accuracy_section(name, items, answer_all(pipes, name, items, progress), gate or AccuracyGate())
    record_accuracy(build_dir, section)
    return {**section, "failures": failures}
