"""Stage-by-stage and end-to-end parity of a candidate pipeline against the PyTorch reference.

Each stage is fed the REFERENCE's inputs (not the candidate's own upstream outputs), so an
error is attributed to the stage that made it. End to end, the candidate's greedy tokens are
compared with the original model's own Hugging Face ``generate`` - which also proves the split
itself faithful, not only the export of our split modules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..runtime.generate import GenerationConfig, GenerationResult, Scheduler, generate_ids
from ..runtime.pipeline import VLMPipeline, concat_pixels
from .metrics import TensorMetrics, TokenMetrics

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

    def add(self, stage: str, name: str, ref: np.ndarray, out: np.ndarray) -> None:
        m = TensorMetrics.of(ref, out)
        outputs = self.stages.setdefault(stage, {})
        outputs[name] = outputs[name].merge(m) if name in outputs else m


def compare_stages(ref: VLMPipeline, cand: VLMPipeline, samples: Sequence[Sample],
                   result: ParityResult, progress: Callable[[], None] = lambda: None) -> None:
    """Every image stage and any encoder stage (under its own name) and the decoder's prefill and one
    decode step."""
    scheme = ref.scheme

    def observe(spec, feeds, outputs):
        _add_outputs(result, spec.name, outputs, cand.runners[spec.name].infer(feeds))

    for sample in samples:
        image_input = scheme.empty_image_input()
        if sample.images:
            image_input = ref.encode_images(ref.pixel_values(sample.images), observe, sample.prompt)
        ids = ref.prompt_ids(sample.prompt, len(sample.images))
        # prefill from an empty state, the same inputs to both (an encoder stage, where the scheme
        # has one, is compared on the reference's feeds like an image stage)
        feeds = ref.prefill_inputs([ids], image_input, observe)
        ref_out = ref.decode(feeds)
        _add_outputs(result, "prefill", ref_out, cand.decode(feeds))
        # one decode step on the reference's state
        state = scheme.prefill_state(ref_out, [len(ids)], feeds)
        step = scheme.step_feeds(state, np.argmax(scheme.next_logits(ref_out), axis=-1))
        _add_outputs(result, "decode", ref.decode(step), cand.decode(step))
        progress()
    # the graphs' dynamic batch: the same prompt twice in one prefill call
    sample = samples[0]
    pixel_values = ref.pixel_values(sample.images) if sample.images else None
    ids = ref.prompt_ids(sample.prompt, len(sample.images))
    both = ref.encode_images(None if pixel_values is None else concat_pixels([pixel_values] * 2),
                             prompt=sample.prompt)
    feeds = ref.prefill_inputs([ids, ids], both)
    result.add("prefill", "logits_batch2", ref.decode(feeds)["logits"], cand.decode(feeds)["logits"])


def _add_outputs(result: ParityResult, stage: str, ref: dict, out: dict) -> None:
    """Every output; per-layer outputs (``present.3.key``) as one entry per kind (``present.*.key``,
    every layer stacked: the worst layer decides)."""
    groups: dict[str, list[str]] = {}
    for name in ref:
        groups.setdefault(PER_LAYER.sub(r"\1.*.\2", name), []).append(name)
    for entry, names in groups.items():
        if len(names) == 1 and entry == names[0]:
            result.add(stage, entry, ref[entry], out[entry])
        else:
            result.add(stage, entry, np.stack([ref[n] for n in names]), np.stack([out[n] for n in names]))


def compare_tokens(reference_tokens: Callable[[str, list[int], np.ndarray | None, int], list[int]],
                   pipelines: dict[str, VLMPipeline], samples: Sequence[Sample], max_new_tokens: int,
                   result: ParityResult, progress: Callable[[], None] = lambda: None,
                   batched: Sequence[str] = ()) -> None:
    """Greedy tokens of each pipeline vs ``reference_tokens(prompt, ids, pixel_values, n)`` (the original
    model). ``batched``: pipelines also run on every sample at once, as the scheduler batches requests
    (rows of different lengths, joining and leaving; ``<name> batched``): a batch must not change an
    answer, and only a batch shows whether it does."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    first = next(iter(pipelines.values()))
    prepared = {name: [] for name in batched}
    for sample in samples:
        pixel_values = first.pixel_values(sample.images) if sample.images else None
        ids = first.prompt_ids(sample.prompt, len(sample.images))
        expected = reference_tokens(sample.prompt, ids, pixel_values, max_new_tokens)
        for name, pipe in pipelines.items():
            image = pipe.encode_images(pixel_values, prompt=sample.prompt)
            got = generate_ids(pipe, ids, image, config)
            result.tokens.setdefault(name, []).append(TokenMetrics(sample.prompt, expected, got))
            if name in prepared:
                prepared[name].append((sample.prompt, expected, ids, image))
        progress()
    for name, rows in prepared.items():
        scheduler = Scheduler(pipelines[name])  # up to the build's max_batch rows at once
        submitted = [scheduler.submit(ids, image, config) for _, _, ids, image in rows]
        got = {row: event.token_ids for row, event in scheduler.run_raising() if isinstance(event, GenerationResult)}
        result.tokens[f"{name} batched"] = [TokenMetrics(prompt, expected, got[row])
                                            for (prompt, expected, _, _), row in zip(rows, submitted)]


def samples_from_items(items: Sequence) -> list[Sample]:
    """Parity samples from VQA items (anything with .question and .image)."""
    return [Sample(item.question, (item.image,), Path(item.image).name) for item in items]
