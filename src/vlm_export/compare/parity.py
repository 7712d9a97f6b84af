"""Stage-by-stage and end-to-end parity of a candidate pipeline against the PyTorch reference.

Each stage is fed the REFERENCE's inputs (not the candidate's own upstream outputs), so an
error is attributed to the stage that made it. End to end, the candidate's greedy tokens are
compared with the original model's own Hugging Face ``generate`` - which also proves the split
itself faithful, not only the export of our split modules.

The reference's side runs first and is recorded (``record_stages``: every call's feeds and outputs,
in files; ``expected_tokens``), then the candidate repeats it (``replay_stages``, ``compare_tokens``):
a build frees PyTorch's weights in between, so the model and the candidate's sessions never hold
memory at once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..runtime.generate import MAX_TOP_LOGPROBS, GenerationConfig, GenerationResult, Scheduler, generate_result
from ..runtime.pipeline import VLMPipeline, concat_pixels
from .metrics import ExactMetrics, TensorMetrics, TokenMetrics

PER_LAYER = re.compile(r"^(.+)\.\d+\.([^.]+)$")


@dataclass(frozen=True)
class Sample:
    prompt: str
    images: tuple = ()  # paths, bytes or PIL images
    label: str = ""


def default_samples(max_images: int) -> list[Sample]:
    """Real photographs (scikit-image's data set) and real questions, one without an image."""
    from skimage import data

    from PIL import Image

    photo = {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("astronaut", "chelsea", "coffee")}
    samples = [
        Sample("Describe this image in one sentence.", (photo["astronaut"],), "astronaut"),
        Sample("What animal is in the picture?", (photo["chelsea"],), "chelsea"),
        Sample("What is in the cup?", (photo["coffee"],), "coffee"),
        Sample("What is the capital of France?", (), "text-only"),
        Sample("Write a short story about a robot who learns to paint.", (), "text-only, long answer"),
    ]
    if max_images >= 2:
        samples.append(Sample("What do these two pictures have in common?", (photo["chelsea"], photo["coffee"]),
                              "two-images"))
    return samples


@dataclass
class ParityResult:
    stages: dict[str, dict[str, TensorMetrics]] = field(default_factory=dict)
    tokens: dict[str, list[TokenMetrics]] = field(default_factory=dict)
    #: entries that failed an element-wise gate, measured against PyTorch in float64 (``measure_exact``), one
    #: ExactMetrics per recorded call: each call is judged on its own (an ill-conditioned sample's large fp32 error
    #: must not excuse another sample's)
    exact: dict[str, dict[str, list[ExactMetrics]]] = field(default_factory=dict)

    def add(self, stage: str, name: str, ref: np.ndarray, out: np.ndarray) -> None:
        m = TensorMetrics.of(ref, out)
        outputs = self.stages.setdefault(stage, {})
        outputs[name] = outputs[name].merge(m) if name in outputs else m

    def add_exact(self, stage: str, name: str, exact: np.ndarray, ref: np.ndarray, out: np.ndarray) -> None:
        self.exact.setdefault(stage, {}).setdefault(name, []).append(
            ExactMetrics(TensorMetrics.of(exact, ref), TensorMetrics.of(exact, out)))


class ArrayStore:
    """The reference's arrays on disk while PyTorch's weights are freed and the candidate runs (so the
    two never hold memory together): one ``.npy`` per array, read back memory-mapped. An array met
    again within a sample (the prefill's caches fed back as the decode step's past) is written once."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._written: dict[int, tuple[np.ndarray, Path]] = {}  # id -> (the array, kept alive; its file)
        self._count = 0

    def put(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Path]:
        files = {}
        for name, array in arrays.items():
            seen = self._written.get(id(array))
            if seen is None:
                path = self.folder / f"{self._count}.npy"
                self._count += 1
                np.save(path, np.asarray(array), allow_pickle=False)
                seen = self._written[id(array)] = (array, path)
            files[name] = seen[1]
        return files

    def forget(self) -> None:
        """Drop what identifies the arrays written so far (the end of a sample: they may be freed now)."""
        self._written.clear()

    @staticmethod
    def get(files: Mapping[str, Path]) -> dict[str, np.ndarray]:
        return {name: np.load(path, mmap_mode="r", allow_pickle=False) for name, path in files.items()}


@dataclass(frozen=True)
class RecordedCall:
    """One call of the reference during parity, for the candidate to repeat: the result entry it fills,
    the runner (None: the decoder, through ``decode``), the files of its feeds and outputs, and any
    output recorded under another name than the candidate gives it (``logits_batch2`` <- ``logits``)."""

    entry: str
    runner: str | None
    feeds: dict[str, Path]
    outputs: dict[str, Path]
    renamed: tuple[tuple[str, str], ...] = ()


def record_stages(ref: VLMPipeline, samples: Sequence[Sample], store: ArrayStore,
                  progress: Callable[[], None] = lambda: None) -> list[RecordedCall]:
    """The reference's side of the per-stage comparison: every image stage, any encoder stage (under its
    own name), the decoder's prefill and one decode step; the feeds are the reference's own, so the
    candidate (``replay_stages``) gets the same inputs at every stage."""
    scheme, calls = ref.scheme, []

    def record(entry, feeds, outputs, runner=None, renamed=()):
        calls.append(RecordedCall(entry, runner, store.put(feeds), store.put(outputs), renamed))

    def observe(spec, feeds, outputs):
        record(spec.name, feeds, outputs, runner=spec.name)

    for sample in samples:
        image_input = scheme.empty_image_input()
        if sample.images:
            image_input = ref.encode_images(ref.pixel_values(sample.images), observe, sample.prompt)
        ids = ref.prompt_ids(sample.prompt, sample.images)
        # prefill from an empty state (an encoder stage, where the scheme has one, is recorded like an
        # image stage), then one decode step on the reference's state
        feeds = ref.prefill_inputs([ids], image_input, observe)
        ref_out = ref.decode(feeds)
        record("prefill", feeds, ref_out)
        state = scheme.prefill_state(ref_out, [len(ids)], feeds)
        step = scheme.step_feeds(state, np.argmax(scheme.next_logits(ref_out), axis=-1))
        record("decode", step, ref.decode(step))
        store.forget()
        progress()
    # the graphs' dynamic batch: the same prompt twice in one prefill call
    sample = samples[0]
    pixel_values = ref.pixel_values(sample.images) if sample.images else None
    ids = ref.prompt_ids(sample.prompt, sample.images)
    both = ref.encode_images(None if pixel_values is None else concat_pixels([pixel_values] * 2),
                             prompt=sample.prompt)
    feeds = ref.prefill_inputs([ids, ids], both)
    record("prefill", feeds, {"logits_batch2": ref.decode(feeds)["logits"]}, renamed=(("logits_batch2", "logits"),))
    store.forget()
    return calls


def _repeat(call: RecordedCall, pipe: VLMPipeline, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``pipe`` makes a recorded call; its outputs under the names the reference's were recorded with."""
    out = (pipe.decode if call.runner is None else pipe.runners[call.runner].infer)(feeds)
    names = dict(call.renamed)
    return {name: out[names.get(name, name)] for name in call.outputs}


def replay_stages(calls: Sequence[RecordedCall], cand: VLMPipeline, result: ParityResult,
                  progress: Callable[[], None] = lambda: None) -> None:
    """The candidate makes each recorded call on the reference's feeds; its outputs against the reference's."""
    for call in calls:
        out = _repeat(call, cand, ArrayStore.get(call.feeds))
        for entry, ref, cand_out in _grouped(ArrayStore.get(call.outputs), out):
            result.add(call.entry, entry, ref, cand_out)
        progress()


def record_outputs(calls: Sequence[RecordedCall], indices: Sequence[int], cand: VLMPipeline, store: ArrayStore,
                   progress: Callable[[], None] = lambda: None) -> dict[int, dict[str, Path]]:
    """The candidate's outputs of the recorded calls at ``indices``, written to ``store`` (index -> files), for
    ``measure_exact`` to read once the candidate is closed."""
    written = {}
    for i in indices:
        written[i] = store.put(_repeat(calls[i], cand, ArrayStore.get(calls[i].feeds)))
        store.forget()
        progress()
    return written


def measure_exact(calls: Sequence[RecordedCall], exact: VLMPipeline, candidates: Mapping[str, Mapping[int, dict]],
                  result: ParityResult, progress: Callable[[], None] = lambda: None) -> None:
    """``exact`` (the reference in float64) makes each recorded call that ``candidates`` holds outputs of
    (per result entry: call index -> the candidate's output files, ``record_outputs``), on the recorded
    feeds cast up (exactly); each output of the fp32 reference and of the candidate is measured against it
    (``ParityResult.exact``)."""
    for i in sorted({i for per_call in candidates.values() for i in per_call}):
        call = calls[i]
        # copies (the recorded arrays are read-only memory maps), fp32 ones cast up: exactly the same values
        feeds = {name: np.array(value, dtype=np.float64 if value.dtype == np.float32 else value.dtype)
                 for name, value in ArrayStore.get(call.feeds).items()}
        exact_out, ref = _repeat(call, exact, feeds), ArrayStore.get(call.outputs)
        for entry, per_call in candidates.items():
            if i in per_call:
                out = ArrayStore.get(per_call[i])
                for name, names in _groups(ref).items():
                    result.add_exact(entry, name, *(_gathered(arrays, name, names) for arrays in (exact_out, ref, out)))
        progress()


def _groups(outputs: Mapping) -> dict[str, list[str]]:
    """Per-layer outputs (``present.3.key``) as one entry per kind (``present.*.key``); others alone."""
    groups: dict[str, list[str]] = {}
    for name in outputs:
        groups.setdefault(PER_LAYER.sub(r"\1.*.\2", name), []).append(name)
    return groups


def _gathered(arrays: Mapping[str, np.ndarray], entry: str, names: list[str]) -> np.ndarray:
    """One entry's arrays: the output itself, or every layer's together (the worst layer decides): stacked, or
    where layers differ in shape (Gemma 4's K/V) each flattened, one after another (the metrics read them flat)."""
    if names == [entry]:
        return arrays[entry]
    layers = [arrays[n] for n in names]
    if len({a.shape for a in layers}) == 1:
        return np.stack(layers)
    return np.concatenate([a.reshape(-1) for a in layers])


def _grouped(ref: Mapping, out: Mapping):
    """(entry, reference array, candidate array) for each output entry (``_groups``)."""
    for entry, names in _groups(ref).items():
        yield entry, _gathered(ref, entry, names), _gathered(out, entry, names)


@dataclass(frozen=True)
class TokenCase:
    """One sample's prompt as the reference tokenized and preprocessed it, and the original model's
    greedy tokens for it."""

    prompt: str
    ids: list[int]
    pixel_values: object  # runtime.pipeline.Pixels, or None without images
    expected: list[int]


def expected_tokens(original: Callable[[str, list[int], np.ndarray | None, int], list[int]], ref: VLMPipeline,
                    samples: Sequence[Sample], max_new_tokens: int,
                    progress: Callable[[], None] = lambda: None) -> list[TokenCase]:
    """``original(prompt, ids, pixel_values, n)``'s greedy tokens (the original model's own generate)
    for each sample, on ``ref``'s token ids and pixels."""
    cases = []
    for sample in samples:
        pixel_values = ref.pixel_values(sample.images) if sample.images else None
        ids = ref.prompt_ids(sample.prompt, sample.images)
        cases.append(TokenCase(sample.prompt, ids, pixel_values, original(sample.prompt, ids, pixel_values,
                                                                           max_new_tokens)))
        progress()
    return cases


def compare_tokens(cases: Sequence[TokenCase], pipelines: dict[str, VLMPipeline], max_new_tokens: int,
                   result: ParityResult, progress: Callable[[], None] = lambda: None,
                   batched: Sequence[str] = (), follow: Sequence[str] = ()) -> None:
    """Greedy tokens of each pipeline vs the cases' expected ones. ``follow``: where such a pipeline's answer
    parts from the expected one, it is run again along the expected tokens (teacher forcing), so every
    position where it would choose another token is measured with its margin (``TokenMetrics.departures``),
    not only the first: a near tie does not hide what comes after it. ``batched``: pipelines also run on every
    case at once, as the scheduler batches requests (``<name> batched``, ``compare_batched``), each row against
    the same pipeline's answer alone: a batch must not change an answer, and only a batch shows whether it does."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    prepared = {name: [] for name in batched}
    for case in cases:
        for name, pipe in pipelines.items():
            image = pipe.encode_images(case.pixel_values, prompt=case.prompt)
            run = TokenMetrics(case.prompt, case.expected, generate_result(pipe, case.ids, image, config).token_ids)
            if name in follow and not run.identical:
                forced = generate_result(pipe, case.ids, image, _along(pipe, case.expected, config))
                run = replace(run, departures=_measured(forced), followed=True)
            result.tokens.setdefault(name, []).append(run)
            if name in prepared:
                prepared[name].append((replace(case, expected=run.candidate), image))
        progress()
    for name, rows in prepared.items():
        result.tokens[f"{name} batched"] = compare_batched(pipelines[name], rows, config, follow=name in follow)


def compare_batched(pipe: VLMPipeline, rows: Sequence[tuple[TokenCase, object]], config: GenerationConfig,
                    follow: bool = False) -> list[TokenMetrics]:
    """Every row (a case and its image input) generated at once, as the scheduler batches requests (rows of
    different lengths, joining and leaving, up to the build's max_batch at a time), each against its case's
    expected tokens. Where a row parts from them, the margin at its first divergence is read from its top
    log-probabilities; with ``follow``, the batch is run again with every row fed its expected tokens, and each
    parted row's departures there are measured too. The forced batch is the free one only until a row parts
    (from then on its length, and so the batch's make-up, may differ), so the free divergence is kept where the
    forced batch does not reproduce it."""
    asked = replace(config, logprobs=True, top_logprobs=MAX_TOP_LOGPROBS)
    free = _run_batch(pipe, [(case, image, asked) for case, image in rows])
    runs = [TokenMetrics(case.prompt, case.expected, got.token_ids) for (case, _), got in zip(rows, free)]
    parted = [i for i, run in enumerate(runs) if not run.identical]
    if not parted:
        return runs
    forced = _run_batch(pipe, [(case, image, _along(pipe, case.expected, config)) for case, image in rows]) \
        if follow else None
    for i in parted:
        departures = {runs[i].first_divergence: _margin(rows[i][0].expected, free[i])}
        if forced is not None:
            departures.update(_measured(forced[i]))
        runs[i] = replace(runs[i], departures=tuple(sorted(departures.items())), followed=follow)
    return runs


def _run_batch(pipe: VLMPipeline, requests: Sequence[tuple[TokenCase, object, GenerationConfig]]
               ) -> list[GenerationResult]:
    scheduler = Scheduler(pipe)  # up to the build's max_batch rows at once
    submitted = [scheduler.submit(case.ids, image, config) for case, image, config in requests]
    got = {row: event for row, event in scheduler.run_raising() if isinstance(event, GenerationResult)}
    return [got[row] for row in submitted]


def _along(pipe: VLMPipeline, expected: Sequence[int], config: GenerationConfig) -> GenerationConfig:
    """``config`` feeding ``expected`` (and an EOS after it, where it stopped before the token budget: going on
    there is a departure too)."""
    ended = len(expected) < config.max_new_tokens and pipe.eos_token_ids
    return replace(config, forced_tokens=(*expected, *([pipe.eos_token_ids[0]] if ended else [])))


def _measured(got: GenerationResult) -> tuple:
    """A forced generation's departures as ``TokenMetrics.departures`` (None where the expected token was banned)."""
    return tuple((d.index, d.margin if np.isfinite(d.margin) else None) for d in got.departures)


def _margin(expected: list[int], got: GenerationResult) -> float | None:
    """At the first divergence, the candidate's token's log-probability less the reference's token's there
    (None where either stopped there or the latter is not among the top ones)."""
    at = TokenMetrics("", expected, got.token_ids).first_divergence
    if at is None or at >= min(len(expected), len(got.logprobs or ())):
        return None
    chosen = got.logprobs[at]
    return next((chosen.logprob - logprob for token, logprob in chosen.top if token.token_id == expected[at]), None)


def samples_from_items(items: Sequence) -> list[Sample]:
    """Parity samples from VQA items (anything with .question and .image)."""
    return [Sample(item.question, (item.image,), Path(item.image).name) for item in items]
