"""Progress reporting for long steps: a rich progress bar on a terminal, nothing in tests."""
from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator


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
