"""Task accuracy: the same VQA questions answered by each backend through the one generation
loop (greedy), normalised exact match. Differences between backends are listed, not only
counted, so a drop can be traced to the questions that changed."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from ..runtime.generate import GenerationConfig, generate
from ..runtime.pipeline import VLMPipeline

MAX_ANSWER_TOKENS = 8


@dataclass
class AccuracyResult:
    backend: str
    dataset: str
    questions: int
    correct: int
    seconds: float
    answers: list[str] = field(repr=False, default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions if self.questions else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "accuracy": self.accuracy}


def evaluate_vqa(pipe: VLMPipeline, items: Sequence, dataset: str, normalize: Callable[[str], str],
                 advance: Callable[[], None] = lambda: None) -> AccuracyResult:
    config = GenerationConfig(max_new_tokens=MAX_ANSWER_TOKENS)
    answers, correct = [], 0
    start = time.perf_counter()
    for item in items:
        text = generate(pipe, item.question, [item.image], config).text
        answers.append(text)
        correct += normalize(text) == normalize(item.answer)
        advance()
    return AccuracyResult(pipe.backend, dataset, len(items), correct, time.perf_counter() - start, answers)


def disagreements(a: AccuracyResult, b: AccuracyResult, items: Sequence) -> list[dict]:
    return [{"question": it.question, "image": str(it.image), "expected": it.answer, a.backend: x, b.backend: y}
            for it, x, y in zip(items, a.answers, b.answers) if x != y]
