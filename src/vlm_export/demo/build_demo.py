"""``vlm-export demo``: assemble the demo VLM from the installed SmolLM2 and the committed
vision weights, build it like any user's model, and measure its easy-vqa accuracy."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..build import BuildOptions, BuildResult, build
from ..compare.parity import default_samples, samples_from_items
from ..datasets import load_split
from ..precision.calibration import DEFAULT_SAMPLES, CalibrationPair, default_pairs
from ..progress import Progress
from . import DEMO_MAX_BATCH
from .model import assemble_demo

PARITY_QUESTIONS = 3  # easy-vqa test questions added to the photo samples for parity


def build_demo(out: Path, options: BuildOptions | None = None, progress: Progress | None = None) -> BuildResult:
    """The demo's build; without ``options``, BuildOptions with ``max_batch=DEMO_MAX_BATCH``."""
    progress = progress or Progress()
    options = options or BuildOptions(max_batch=DEMO_MAX_BATCH)
    with progress.step("assembling the demo VLM (SmolLM2-135M-Instruct + trained vision tower)") as advance:
        model_dir = assemble_demo()
        advance()
    samples = samples_from_items(load_split("test", PARITY_QUESTIONS)) + default_samples(options.max_images)
    return build(model_dir, out, replace(options, samples=samples,
                                         calibration_pairs=options.calibration_pairs or calibration_pairs()), progress)


def calibration_pairs(limit: int = DEFAULT_SAMPLES) -> list[CalibrationPair]:
    """Natural photos, then easy-vqa TRAIN pairs (never test): int8 sees the demo's own domain."""
    pairs = default_pairs(limit) + [CalibrationPair(it.image, it.question) for it in load_split("train", limit)]
    return pairs[:limit]
