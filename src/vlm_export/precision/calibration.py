"""Calibration inputs for int8: real image+text pairs passed through the real preprocessing and
the PyTorch reference's upstream stages, so each stage is calibrated on what it will really see
(text-only or placeholder-image calibration is what costs int8 VLMs their accuracy)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DatasetError, InputError
from ..runtime.images import load_image
from ..runtime.pipeline import VLMPipeline

DEFAULT_SAMPLES = 16
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "hubble_deep_field", "immunohistochemistry")
QUESTIONS = ("Describe this image.", "What is in the picture?", "What colors do you see?",
             "Is there a person in the image?")


@dataclass(frozen=True)
class CalibrationPair:
    image: object  # path or PIL image
    prompt: str


def default_pairs(limit: int = DEFAULT_SAMPLES) -> list[CalibrationPair]:
    """scikit-image's natural photographs with generic questions. Callers with data of their own
    domain pass it instead (``--calibration``; the demo adds easy-vqa TRAIN pairs)."""
    from skimage import data

    from PIL import Image

    pairs = []
    for i, name in enumerate(PHOTOS):
        array = getattr(data, name)()
        pairs.append(CalibrationPair(Image.fromarray(array).convert("RGB"), QUESTIONS[i % len(QUESTIONS)]))
    return pairs[:limit]


def folder_pairs(folder: Path, prompts_file: Path | None = None, limit: int = DEFAULT_SAMPLES) -> list[CalibrationPair]:
    """Images of a folder (sorted), each with the next line of ``prompts_file`` (cycled). Every image
    used is decoded here, so a bad one is named before the export starts, not minutes into the build."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"calibration folder {folder} {'is not a folder' if folder.exists() else 'does not exist'}; "
                           "pass a folder of images (png/jpg/jpeg/webp/bmp) to --calibration-images")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"))
    if not images:
        raise DatasetError(f"no images (png/jpg/jpeg/webp/bmp) in calibration folder {folder}; add some, or drop "
                           "--calibration-images to calibrate on the built-in photos")
    prompts = ["Describe this image."]
    if prompts_file:
        try:
            text = Path(prompts_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DatasetError(f"calibration prompts file {prompts_file} cannot be read "
                               f"({getattr(e, 'strerror', None) or e}); pass a text file, one prompt per line") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise DatasetError(f"calibration prompts file {prompts_file} is empty")
    for image in images[:limit]:
        try:
            load_image(image)
        except InputError as e:
            raise DatasetError(f"calibration {e}; remove it from {folder} or replace it") from None
    return [CalibrationPair(img, prompts[i % len(prompts)]) for i, img in enumerate(images[:limit])]


def stage_feeds(reference: VLMPipeline, pairs: list[CalibrationPair]) -> dict[str, list[dict[str, np.ndarray]]]:
    """Per-stage input feeds, produced by the reference pipeline's own upstream stages: each image
    stage sees what its predecessor made of real pixels, the decoder (and an encoder stage) a real prefill."""
    scheme = reference.scheme
    feeds: dict[str, list[dict[str, np.ndarray]]] = {spec.name: [] for spec in reference.stages}
    def keep(spec, f, _):
        feeds[spec.name].append(f)

    for pair in pairs:
        image_input = reference.encode_images(reference.pixel_values([pair.image]), keep, pair.prompt)
        ids = reference.prompt_ids(pair.prompt, [pair.image])
        # an encoder stage (encoder-decoder schemes) sees the prefill's own encoder feeds
        feeds[scheme.decoder_stage].append(reference.prefill_inputs([ids], image_input, keep))
    return feeds


def _pair_digest(h, pair: CalibrationPair) -> None:
    image = pair.image
    if isinstance(image, (str, Path)):
        h.update(Path(image).read_bytes())
    else:  # a PIL image
        h.update(f"{image.mode} {image.size}".encode())
        h.update(image.tobytes())
    h.update(pair.prompt.encode())


def _graph_digest(h, graph: Path) -> None:
    """The graph's structure (ops and tensor names, which the cached ranges are keyed by), not its
    bytes: torch.onnx embeds stack traces with file paths, so two exports of one model differ."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    for node in model.graph.node:
        h.update(f"{node.op_type}|{','.join(node.input)}|{','.join(node.output)};".encode())


def cache_path(stage: str, graph: Path, source_sha256: dict[str, str], pairs: list[CalibrationPair],
               method: str, choices: str = "") -> Path:
    """Where the calibrated ranges of one stage are kept: keyed by the fp32 graph's structure, the
    source weights, the calibration pairs (image bytes + prompts), the method, the smoothing and any
    other ``choices`` made from them (an int8 decoder's kernel and fp32 fallback), so any change
    recalibrates and an unchanged rebuild skips calibration."""
    from .. import __version__
    from ..cache import cache_root
    from .smoothquant import SMOOTH_ALPHA

    # a decoder's cached ranges are of its smoothed graph (convert.to_int8): alpha is part of the key
    # layers=matmul+gemm: a fallback chosen before Gemm layers were quantized (OPT's MLP) ranked fewer layers
    h = hashlib.sha256(f"{__version__} {stage} {method} smoothquant-alpha={SMOOTH_ALPHA} layers=matmul+gemm "
                       f"{choices}".encode())
    for name, digest in sorted(source_sha256.items()):
        h.update(f"{name}={digest};".encode())
    _graph_digest(h, graph)
    for pair in pairs:
        _pair_digest(h, pair)
    return cache_root() / "calibration" / f"{stage}-{method}-{h.hexdigest()[:20]}.json"
