"""Task accuracy: the same VQA questions answered by each backend through the one generation
loop (greedy), normalised exact match. Differences between backends are listed, not only
counted, so a drop can be traced to the questions that changed."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

from ..datasets import normalize_answer
from ..progress import Progress
from ..runtime.generate import GenerationConfig, GenerationRequest, generate, generate_batch
from ..runtime.pipeline import VLMPipeline
from .policy import DEFAULT_MAX_ACCURACY_DROP_POINTS, AccuracyGate

MAX_ANSWER_TOKENS = 8


@dataclass(frozen=True)
class AccuracyCheck:
    """Task accuracy measured inside a build: ``questions`` evenly spaced over a split of
    easy-vqa (or a folder with questions.jsonl), the fp32 PyTorch reference and the build
    answering the same ones, judged by an AccuracyGate."""

    dataset: str = "easy-vqa"
    split: str = "test"
    questions: int = 60
    max_drop_points: float = DEFAULT_MAX_ACCURACY_DROP_POINTS


@dataclass
class AccuracyResult:
    backend: str
    dataset: str
    questions: int
    correct: int
    seconds: float
    answers: list[str] = field(repr=False, default_factory=list)
    batch: int = 1  # questions decoded together (generate_batch); 1: one at a time

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions if self.questions else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy}


def evaluate_vqa(pipe: VLMPipeline, items: Sequence, dataset: str, normalize: Callable[[str], str] = normalize_answer,
                 advance: Callable[[], None] = lambda: None, batch: int = 1) -> AccuracyResult:
    """Greedy answers to every item. ``batch`` > 1 decodes that many questions together
    (``generate_batch``); 1 answers one at a time."""
    config = GenerationConfig(max_new_tokens=MAX_ANSWER_TOKENS)
    start = time.perf_counter()
    if batch > 1:
        requests = [GenerationRequest(item.question, (item.image,), config) for item in items]
        answers = [r.text for r in generate_batch(pipe, requests, batch, lambda i, r: advance())]
    else:
        answers = []
        for item in items:
            answers.append(generate(pipe, item.question, [item.image], config).text)
            advance()
    correct = sum(normalize(text) == normalize(item.answer) for text, item in zip(answers, items))
    return AccuracyResult(pipe.backend, dataset, len(items), correct, time.perf_counter() - start, answers, batch)


def answer_all(pipes: Mapping[str, VLMPipeline], name: str, items: Sequence, progress: Progress,
               batch: int = 1) -> list[AccuracyResult]:
    """Every pipeline answers the same questions (in the order given; the first is the reference)."""
    results = []
    for label, pipe in pipes.items():
        with progress.step(f"{label}: answering {len(items)} {name} questions", total=len(items)) as advance:
            results.append(evaluate_vqa(pipe, items, name, normalize_answer, advance, batch))
    return results


def disagreements(a: AccuracyResult, b: AccuracyResult, items: Sequence) -> list[dict]:
    return [{"question": it.question, "image": str(it.image), "expected": it.answer, a.backend: x, b.backend: y}
            for it, x, y in zip(items, a.answers, b.answers) if x != y]


def accuracy_section(dataset: str, items: Sequence, results: Sequence[AccuracyResult],
                     gate: AccuracyGate | None = None) -> tuple[dict, list[str]]:
    """The report's task-accuracy section (results, differing answers, the gate's verdict) and the
    gate's failures. ``results[0]`` is the reference the others are judged against."""
    reference, candidates = results[0], list(results[1:])
    diffs = [d for other in candidates for d in disagreements(reference, other, items)]
    section = {"dataset": dataset, "questions": len(items), "results": [r.to_dict() for r in results],
               "disagreements": diffs}
    failures: list[str] = []
    if gate is not None and candidates:
        failures = gate.judge(reference, candidates)
        section["gate"] = {"reference": reference.backend, "max_drop_points": gate.max_drop_points,
                           "drop_points": gate.drops(reference, candidates), "passed": not failures}
    return section, failures
