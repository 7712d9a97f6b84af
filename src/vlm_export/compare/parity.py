"""Stage-by-stage and end-to-end parity of a candidate pipeline against the PyTorch reference.

Each stage is fed the REFERENCE's inputs (not the candidate's own upstream outputs), so an
error is attributed to the stage that made it. End to end, the candidate's greedy tokens are
compared with the original model's own Hugging Face ``generate`` - which also proves the split
itself faithful, not only the export of our split modules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..runtime.generate import GenerationConfig, generate_tokens
from ..runtime.pipeline import VLMPipeline
from .metrics import TensorMetrics, TokenMetrics


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
    for sample in samples:
        pixel_values = ref.pixel_values(sample.images) if sample.images else None
        if pixel_values is not None:
            feeds = {"pixel_values": pixel_values}
            feats = ref.vision.infer(feeds)
            _add_all(result, "vision_encoder", feats, cand.vision.infer(feeds))
            embeds = ref.projector.infer(feats)
            _add_all(result, "projector", embeds, cand.projector.infer(feats))
        image_embeds = ref.image_embeds(pixel_values)
        ids = np.asarray([ref.prompt_ids(sample.prompt, len(sample.images))], dtype=np.int64)
        # prefill from an empty cache, the same inputs to both
        ref_logits, ref_past = ref.decode(ids, image_embeds, ref.empty_past(), 0)
        cand_logits, cand_past = cand.decode(ids, image_embeds, cand.empty_past(), 0)
        result.add("prefill", "logits", ref_logits, cand_logits)
        _add_kv(result, "prefill", ref_past, cand_past)
        # one decode step on the reference's cache
        step = np.asarray([[int(np.argmax(ref_logits[0, -1]))]], dtype=np.int64)
        ref_logits, ref_next = ref.decode(step, image_embeds[:0], ref_past, ids.shape[1])
        cand_logits, cand_next = cand.decode(step, image_embeds[:0], ref_past, ids.shape[1])
        result.add("decode", "logits", ref_logits, cand_logits)
        _add_kv(result, "decode", ref_next, cand_next)
        progress()
    # the graphs' dynamic batch: the same prompt twice in one prefill call
    sample = samples[0]
    pixel_values = ref.pixel_values(sample.images) if sample.images else None
    ids = np.asarray([ref.prompt_ids(sample.prompt, len(sample.images))] * 2, dtype=np.int64)
    embeds = ref.image_embeds(None if pixel_values is None else np.concatenate([pixel_values] * 2))
    ref_logits, _ = ref.decode(ids, embeds, ref.empty_past(2), 0)
    cand_logits, _ = cand.decode(ids, embeds, cand.empty_past(2), 0)
    result.add("prefill", "logits_batch2", ref_logits, cand_logits)


def _add_all(result: ParityResult, stage: str, ref: dict, out: dict) -> None:
    for name, value in ref.items():
        result.add(stage, name, value, out[name])


def _add_kv(result: ParityResult, stage: str, ref: dict, out: dict) -> None:
    """All layers' keys and values as two entries (the worst layer decides)."""
    for kind in ("key", "value"):
        names = [n for n in ref if n.endswith("." + kind)]
        result.add(stage, f"present.*.{kind}", np.stack([ref[n] for n in names]), np.stack([out[n] for n in names]))


def compare_tokens(reference_tokens: Callable[[list[int], np.ndarray | None, int], list[int]],
                   pipelines: dict[str, VLMPipeline], samples: Sequence[Sample], max_new_tokens: int,
                   result: ParityResult, progress: Callable[[], None] = lambda: None) -> None:
    """Greedy tokens of each pipeline vs ``reference_tokens(ids, pixel_values, n)`` (the original model)."""
    config = GenerationConfig(max_new_tokens=max_new_tokens)
    first = next(iter(pipelines.values()))
    for sample in samples:
        pixel_values = first.pixel_values(sample.images) if sample.images else None
        ids = first.prompt_ids(sample.prompt, len(sample.images))
        expected = reference_tokens(ids, pixel_values, max_new_tokens)
        for name, pipe in pipelines.items():
            got = list(generate_tokens(pipe, ids, pipe.image_embeds(pixel_values), config))
            result.tokens.setdefault(name, []).append(TokenMetrics(sample.prompt, expected, got))
        progress()


def samples_from_items(items: Sequence) -> list[Sample]:
    """Parity samples from VQA items (anything with .question and .image)."""
    return [Sample(item.question, (item.image,), Path(item.image).name) for item in items]
