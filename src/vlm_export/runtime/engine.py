"""In-flight batching: ONE scheduler loop, on a thread of its own, over every active request.

The served ``vlm`` model is a thin shell over this (it hands each request over and returns at
once); tests and in-process servers use it directly. A request is prepared (prompt ids, its
images through the image path) on a small worker pool, then joins the running batch at the next
step; every step decodes all running rows in one decoder call (``Scheduler``), sends each row's
events through its own callback, lets finished rows leave, and polls each request's
``is_cancelled`` so a cancelled row stops within one step and frees its place.

Back-pressure: at most ``max_queue`` requests wait (prepared or not) for a place in the batch;
past that, ``submit`` raises BusyError at once, so a flood costs neither threads nor memory.
"""
from __future__ import annotations

import queue
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from ..errors import BusyError, ServeError, VlmExportError
from .generate import GenerationConfig, GenerationResult, ImageEncoder, Scheduler, TokenEvent, image_input_for
from .pipeline import ImageInput, VLMPipeline

#: what a request's callback receives: text as it appears, the final result, or the error that ended it
Event = TokenEvent | GenerationResult | VlmExportError
DEFAULT_MAX_QUEUE = 64
PREPARE_WORKERS = 2
IDLE_WAIT_S = 0.05


class Cancelled(VlmExportError):
    """The client cancelled the request (or went away); its row was dropped."""


@dataclass
class EngineStats:
    """Counters an operator watches (the served model exports them as Triton metrics)."""

    running: int = 0  # rows in the batch
    waiting: int = 0  # accepted, not yet in the batch
    steps: int = 0
    tokens: int = 0  # generated, all requests
    finished: int = 0
    cancelled: int = 0
    refused: int = 0  # turned away by back-pressure


@dataclass
class _Job:
    on_event: Callable[[Event], None]
    is_cancelled: Callable[[], bool]
    config: GenerationConfig
    prompt_ids: list[int] = field(default_factory=list)
    image_input: np.ndarray | None = None
    row: int | None = None
    started: bool = False


class GenerationEngine:
    def __init__(self, pipe: VLMPipeline, max_batch: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 encode_images: ImageEncoder | None = None,
                 on_stats: Callable[[EngineStats], None] | None = None):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.pipe, self.max_queue = pipe, max_queue
        self.encode_images = encode_images
        self.on_stats = on_stats
        self.scheduler = Scheduler(pipe, max_batch or pipe.limits.max_batch)
        self.stats = EngineStats()
        self._reported: EngineStats | None = None
        self._lock = threading.Lock()
        self._inbox: queue.Queue[_Job] = queue.Queue()
        self._jobs: dict[int, _Job] = {}  # scheduler row id -> job
        self._closing = False
        self._stop = threading.Event()
        self._prepare = ThreadPoolExecutor(PREPARE_WORKERS, thread_name_prefix="vlm-prepare")
        self._thread = threading.Thread(target=self._loop, name="vlm-scheduler", daemon=True)
        self._thread.start()

    # ---- called from any thread ---------------------------------------------------------------
    def submit(self, prompt: str, images: Sequence[ImageInput], config: GenerationConfig,
               on_event: Callable[[Event], None], is_cancelled: Callable[[], bool] = lambda: False) -> None:
        """Accept a request or raise BusyError (queue full) / ServeError (shutting down) at once.
        Everything after acceptance, errors included, arrives through ``on_event``."""
        with self._lock:
            if self._closing:
                raise ServeError("the model is shutting down; retry on another instance")
            if self.stats.waiting >= self.max_queue:
                self.stats.refused += 1
                raise BusyError(f"server busy: {self.stats.waiting} requests already wait for a place "
                                f"(queue limit {self.max_queue}); retry later")
            self.stats.waiting += 1
        job = _Job(on_event, is_cancelled, config)
        self._prepare.submit(self._prepare_job, job, prompt, list(images))

    def close(self, drain_s: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to ``drain_s``, end the rest with an
        error, and stop the loop."""
        with self._lock:
            self._closing = True
        self._prepare.shutdown(wait=True)
        deadline = time.monotonic() + drain_s
        while self._thread.is_alive() and time.monotonic() < deadline and (self.stats.waiting or self.stats.running):
            time.sleep(IDLE_WAIT_S)
        self._stop.set()
        self._inbox.put(None)  # wake the loop
        self._thread.join(timeout=10)

    # ---- preparation (worker pool) --------------------------------------------------------------
    def _prepare_job(self, job: _Job, prompt: str, images: list) -> None:
        try:
            job.prompt_ids = self.pipe.prompt_ids(prompt, len(images))
            self.pipe.check_length(len(job.prompt_ids), job.config.max_new_tokens)  # before any image work
            job.image_input = image_input_for(self.pipe, images, self.encode_images)
            self.pipe.scheme.check_prompt(job.prompt_ids, job.image_input)
        except VlmExportError as e:
            self._end(job, e)
            return
        except Exception as e:  # never let one request take the loop down
            self._end(job, ServeError(f"internal error: {type(e).__name__}: {e}"))
            return
        self._inbox.put(job)

    # ---- the loop (its own thread) --------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._iteration()
            except Exception as e:  # a failed decoder call (or a bug) fails the rows it touched, not the server
                self._fail_all(e if isinstance(e, VlmExportError) else
                               ServeError(f"internal error: {type(e).__name__}: {e}"))
        # shutting down: whatever is left, in the batch or still in the inbox, ends with a clear error
        self._take_inbox(block=False)
        self._fail_all(ServeError("the model shut down before this request finished; retry"))

    def _iteration(self) -> None:
        self._take_inbox(block=self.scheduler.idle)
        self._cancel_requested()
        if not self.scheduler.idle:
            self._step()
        self._report()

    def _step(self) -> None:
        events = self.scheduler.step()
        self._mark_started()
        for row, event in events:
            job = self._jobs[row]
            if isinstance(event, GenerationResult):
                del self._jobs[row]
                self.stats.tokens += event.completion_tokens
                self._end(job, event)
            else:
                self._deliver(job, event)
        self.stats.steps += 1
        self.stats.running = len(self.scheduler.running)

    def _fail_all(self, error: VlmExportError) -> None:
        for row in list(self._jobs):
            self.scheduler.cancel(row)
            self._end(self._jobs.pop(row), error)
        self.stats.running = len(self.scheduler.running)

    def _report(self) -> None:
        """The stats to ``on_stats`` whenever they changed (also while idle: cancels and refusals count)."""
        if self.on_stats is None or self.stats == self._reported:
            return
        self._reported = replace(self.stats)
        try:
            self.on_stats(self.stats)
        except Exception as e:  # metrics are worth less than serving: report once, then go on without
            self.on_stats = None
            print(f"vlm-export engine: stats callback failed ({type(e).__name__}: {e}); continuing without it",
                  file=sys.stderr)

    def _take_inbox(self, block: bool) -> None:
        try:
            job = self._inbox.get(timeout=IDLE_WAIT_S) if block else self._inbox.get_nowait()
            while True:
                if job is not None:
                    job.row = self.scheduler.submit(job.prompt_ids, job.image_input, job.config)
                    job.image_input = None
                    self._jobs[job.row] = job
                job = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _cancel_requested(self) -> None:
        for row, job in list(self._jobs.items()):
            try:
                cancelled = job.is_cancelled()
            except Exception:  # a sender that cannot say is treated as alive
                cancelled = False
            if cancelled:
                self.scheduler.cancel(row)
                del self._jobs[row]
                self.stats.cancelled += 1
                self._end(job, Cancelled("the request was cancelled"))
        self.stats.running = len(self.scheduler.running)

    def _mark_started(self) -> None:
        running = {r.id for r in self.scheduler.running}
        for row, job in self._jobs.items():
            if not job.started and row in running:
                job.started = True
                with self._lock:
                    self.stats.waiting -= 1

    def _end(self, job: _Job, event: Event) -> None:
        if not job.started:  # it never got a place: it no longer waits either
            job.started = True
            with self._lock:
                self.stats.waiting -= 1
        if isinstance(event, GenerationResult):
            self.stats.finished += 1
        self._deliver(job, event)

    @staticmethod
    def _deliver(job: _Job, event: Event) -> None:
        try:
            job.on_event(event)
        except Exception:  # a client that went away must not stop the others
            pass
