"""``vlm-export eval``: the PyTorch reference and the build on the same data, recorded in the build's
report. VQA (``evaluate_build``): accuracy, judged by the accuracy gate. Captioning
(``evaluate_captions``): BLEU / ROUGE-L / CIDEr against the references and against PyTorch's own
captions, side by side. ``dataset_task`` tells which a data set is."""
from __future__ import annotations

from pathlib import Path

from .adapters.reference import BACKENDS, open_pipeline
from .compare.accuracy import accuracy_section, answer_all
from .compare.captions import DEFAULT_CAPTION_TOKENS, CaptionGate, caption_all, caption_section
from .compare.policy import AccuracyGate
from .compare.report import record_section
from .datasets import dataset_task, load_caption_items, load_items
from .manifest import read_manifest
from .progress import Progress

__all__ = ["BACKENDS", "evaluate_build", "evaluate_captions", "dataset_task", "declared_caption_prompt"]


def evaluate_build(build_dir: Path, dataset: str = "easy-vqa", split: str = "test", limit: int | None = None,
                   backends: tuple[str, ...] = BACKENDS, threads: int | None = None,
                   progress: Progress | None = None, spread: int | None = None,
                   gate: AccuracyGate | None = None, check_hashes: bool = True) -> dict:
    """Answer, judge (the first backend is the reference) and record in the report. The verdict
    is in ``["gate"]["passed"]`` and the failures in ``["failures"]``."""
    progress = progress or Progress()
    name, items = load_items(dataset, split, limit, spread)
    pipes = _open(build_dir, backends, threads, check_hashes, progress)
    section, failures = accuracy_section(name, items, answer_all(pipes, name, items, progress), gate or AccuracyGate())
    record_section(build_dir, "task_accuracy", section)
    return {**section, "failures": failures}


def declared_caption_prompt(build_dir: Path) -> str | None:
    """The captioning prompt a build declares (manifest ``generation.caption_prompt``, e.g. Florence-2's
    ``<CAPTION>``), or None."""
    return (read_manifest(build_dir).get("generation") or {}).get("caption_prompt")


def evaluate_captions(build_dir: Path, dataset: str = "easy-vqa-captions", split: str = "test",
                      limit: int | None = None, backends: tuple[str, ...] = BACKENDS, threads: int | None = None,
                      progress: Progress | None = None, spread: int | None = None, prompt: str | None = None,
                      max_new_tokens: int | None = None, tokenizer: str = "simple",
                      gate: CaptionGate | None = None, check_hashes: bool = True) -> dict:
    """Caption every image with each backend (the first is the reference), score, and record the
    section in the report. The prompt per image: its own (captions.jsonl), else ``prompt``, else
    the build's declared one (``declared_caption_prompt``); none of them is a one-line error. The
    gate's verdict is in ``["gate"]["passed"]`` and its failures in ``["failures"]``."""
    from .compare.captions import caption_prompt, check_scoring

    progress = progress or Progress()
    name, items, note = load_caption_items(dataset, split, limit, spread)
    check_scoring(tokenizer)
    default = declared_caption_prompt(build_dir)
    prompts = [caption_prompt(item.prompt, prompt, default) for item in items]  # before any model loads
    pipes = _open(build_dir, backends, threads, check_hashes, progress)
    results = caption_all(pipes, name, items, progress, prompts, max_new_tokens or DEFAULT_CAPTION_TOKENS, tokenizer)
    section, failures = caption_section(name, items, results, tokenizer, note, prompts, gate or CaptionGate())
    record_section(build_dir, "captions", section)
    return {**section, "failures": failures}


def _open(build_dir: Path, backends, threads, check_hashes: bool, progress: Progress) -> dict:
    pipes = {}
    for backend in backends:
        with progress.step(f"loading {backend}") as advance:
            pipes[backend] = open_pipeline(build_dir, backend, threads=threads, check_hashes=check_hashes)
            advance()
    return pipes
