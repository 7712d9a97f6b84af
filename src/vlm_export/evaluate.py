"""``vlm-export eval``: VQA accuracy of the PyTorch reference and the build on the same questions,
judged by the accuracy gate and recorded in the build's report."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from .compare.accuracy import AccuracyResult, accuracy_section, evaluate_vqa
from .compare.policy import AccuracyGate
from .compare.report import record_accuracy
from .demo.easyvqa import load_folder, load_split, normalize_answer
from .errors import InputError
from .progress import Progress
from .runtime.load import open_build
from .runtime.pipeline import VLMPipeline

BACKENDS = ("torch", "onnxruntime")


def load_items(dataset: str, split: str = "test", limit: int | None = None, spread: int | None = None):
    """``easy-vqa`` (a split of the installed data set) or a folder with questions.jsonl.
    ``limit``: the first N questions; ``spread``: N questions evenly spaced over the whole set
    (a fairer sample: the set is ordered by image)."""
    name, items = (f"easy-vqa/{split}", load_split(split)) if dataset == "easy-vqa" else (str(dataset), load_folder(dataset))
    if spread:
        if spread > len(items):
            raise InputError(f"{name} has {len(items)} questions; cannot spread {spread} over it")
        items = items[:: len(items) // spread][:spread]
    return name, items[:limit] if limit else items


def answer_all(pipes: Mapping[str, VLMPipeline], name: str, items: Sequence,
               progress: Progress) -> list[AccuracyResult]:
    """Every pipeline answers the same questions (in the order given; the first is the reference)."""
    results = []
    for label, pipe in pipes.items():
        with progress.step(f"{label}: answering {len(items)} {name} questions", total=len(items)) as advance:
            results.append(evaluate_vqa(pipe, items, name, normalize_answer, advance))
    return results


def evaluate_build(build_dir: Path, dataset: str = "easy-vqa", split: str = "test", limit: int | None = None,
                   backends: tuple[str, ...] = BACKENDS, threads: int | None = None,
                   progress: Progress | None = None, spread: int | None = None,
                   gate: AccuracyGate | None = None) -> dict:
    """Answer, judge (the first backend is the reference) and record in the report. The verdict
    is in ``["gate"]["passed"]`` and the failures in ``["failures"]``."""
    progress = progress or Progress()
    name, items = load_items(dataset, split, limit, spread)
    pipes = {}
    for backend in backends:
        with progress.step(f"loading {backend}") as advance:
            pipes[backend] = open_build(build_dir, backend, threads=threads)
            advance()
    section, failures = accuracy_section(name, items, answer_all(pipes, name, items, progress), gate or AccuracyGate())
    record_accuracy(build_dir, section)
    return {**section, "failures": failures}
