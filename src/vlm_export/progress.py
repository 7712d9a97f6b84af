"""Progress reporting for long steps: a rich progress bar on a terminal, nothing in tests."""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

from .memory import peak_bytes, reset_peak


class Progress:
    """``with progress.step("exporting lm_decoder", total=1) as advance: ...; advance()``"""

    @contextlib.contextmanager
    def step(self, description: str, total: int = 1) -> Iterator[Callable[[], None]]:
        yield lambda: None

    def note(self, text: str) -> None:
        """A line about what a running step is doing (e.g. each trial of a search)."""


class RichProgress(Progress):
    def __init__(self, console=None):
        from rich.console import Console

        # the stream itself, not "whatever sys.stderr is when a bar redraws": a step may silence sys.stderr
        # for a while (torch.export prints whole graphs there on a failed trace) and its bar keeps drawing
        self.console = console or Console(file=sys.stderr)

    @contextlib.contextmanager
    def step(self, description: str, total: int = 1) -> Iterator[Callable[[], None]]:
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RProgress

        with RProgress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda: bar.advance(task)
            bar.update(task, completed=total)

    def note(self, text: str) -> None:
        self.console.print(f"    {text}", highlight=False)  # above a live bar, which stays


@dataclass
class StepCost:
    step: str
    seconds: float
    #: the process's peak resident memory during the step (None: not measurable here)
    peak_bytes: int | None
    #: 0 for a step of its own, 1 for a step inside one, ...
    depth: int = 0


class MeasuredProgress(Progress):
    """Another ``Progress`` whose steps are also timed and their peak resident memory taken (the
    peak is reset as each step starts, so a step's figure is its own; a step inside another counts
    toward both). ``costs`` in the order the steps ended; ``summary()`` for a report."""

    def __init__(self, inner: Progress):
        self.inner = inner
        self.costs: list[StepCost] = []
        self._open: list[int] = []  # the peak each running outer step has seen so far

    @contextlib.contextmanager
    def step(self, description: str, total: int = 1) -> Iterator[Callable[[], None]]:
        if self._open:  # the outer step's peak until now, before the reset forgets it
            self._open[-1] = max(self._open[-1], peak_bytes() or 0)
        measured = reset_peak()
        self._open.append(0)
        start = time.perf_counter()
        try:
            with self.inner.step(description, total) as advance:
                yield advance
        finally:
            peak = max(self._open.pop(), peak_bytes() or 0) if measured else None
            if self._open and peak:
                self._open[-1] = max(self._open[-1], peak)
            self.costs.append(StepCost(description, round(time.perf_counter() - start, 2), peak, len(self._open)))

    def note(self, text: str) -> None:
        self.inner.note(text)

    def summary(self) -> dict:
        """Every step's cost, the highest peak and where it was (the innermost step within 1% of it:
        an outer step's peak includes its inner steps')."""
        peak = max((c.peak_bytes for c in self.costs if c.peak_bytes), default=None)
        at = max((c for c in self.costs if peak and (c.peak_bytes or 0) >= 0.99 * peak), key=lambda c: c.depth,
                 default=None)
        return {"steps": [asdict(c) for c in self.costs], "peak_bytes": peak, "peak_step": at.step if at else None,
                "seconds": round(sum(c.seconds for c in self.costs if c.depth == 0), 2)}
