"""``vlm-export eval``: VQA accuracy of the PyTorch reference and the build on the same questions,
recorded in the build's report."""
from __future__ import annotations

from pathlib import Path

from .compare.accuracy import AccuracyResult, disagreements, evaluate_vqa
from .compare.report import record_accuracy
from .demo.easyvqa import load_folder, load_split, normalize_answer
from .progress import Progress
from .runtime.load import open_build

BACKENDS = ("torch", "onnxruntime")


def load_items(dataset: str, split: str = "test", limit: int | None = None):
    """``easy-vqa`` (a split of the installed data set) or a folder with questions.jsonl."""
    if dataset == "easy-vqa":
        return f"easy-vqa/{split}", load_split(split, limit)
    return str(dataset), load_folder(dataset, limit)


def evaluate_build(build_dir: Path, dataset: str = "easy-vqa", split: str = "test", limit: int | None = None,
                   backends: tuple[str, ...] = BACKENDS, threads: int | None = None,
                   progress: Progress | None = None) -> dict:
    progress = progress or Progress()
    name, items = load_items(dataset, split, limit)
    results: list[AccuracyResult] = []
    for backend in backends:
        with progress.step(f"loading {backend}") as advance:
            pipe = open_build(build_dir, backend, threads=threads)
            advance()
        with progress.step(f"{backend}: answering {len(items)} {name} questions", total=len(items)) as advance:
            results.append(evaluate_vqa(pipe, items, name, normalize_answer, advance))
    diffs = []
    for other in results[1:]:
        diffs += disagreements(results[0], other, items)
    accuracy = {"dataset": name, "questions": len(items), "results": [r.to_dict() for r in results],
                "disagreements": diffs}
    record_accuracy(build_dir, accuracy)
    return accuracy
