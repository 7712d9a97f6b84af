"""``vlm-export build``: load -> split -> export -> parity -> manifest, written atomically.

The build is written into a hidden temporary folder beside the target and renamed into place
only when every graph exported, passed the ONNX checker and matched PyTorch. A build whose
parity fails is moved to ``<out>.failed/`` (graphs + report, its manifest renamed), so nothing that looks
complete is ever left behind; a later good build at ``<out>`` removes that ``<out>.failed/``.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import adapter_for
from .adapters.lora import merge_lora
from .adapters.reference import eos_token_ids, load_source, reference_pipeline, split
from .atomic import atomic_folder
from .compare.accuracy import AccuracyCheck, accuracy_section, answer_all
from .compare.parity import ParityResult, Sample, compare_stages, compare_tokens, default_samples
from .compare.policy import AccuracyGate, ParityPolicy
from .compare.report import record_accuracy, write_report
from .contract import DecodingScheme, Limits
from .datasets import load_items
from .errors import BuildError, ParityError
from .export.graph_info import graph_bytes, graph_io
from .export.onnx_export import export_stage
from .precision.calibration import CalibrationPair, cache_path, default_pairs, stage_feeds
from .precision.convert import PrecisionOptions, make_variant, quiet_logging
from .precision.spec import PrecisionPlan
from .manifest import MANIFEST_NAME, read_manifest, sha256_file, verify_hashes, versions, write_manifest
from .progress import Progress
from .runtime.load import open_build

DEFAULT_MAX_SEQUENCE = 4096


@dataclass
class BuildOptions:
    adapter: str | None = None  # None: chosen from config.json's model_type
    lora: Path | None = None  # a PEFT adapter folder, merged into the model before the split
    lora_any_base: bool = False  # merge even if the adapter names another base model
    max_batch: int = 4
    max_images: int = 2
    max_sequence: int | None = None  # None: min(model's max positions, DEFAULT_MAX_SEQUENCE)
    parity_new_tokens: int = 32
    samples: list[Sample] | None = None  # None: real photos + questions (compare.parity.default_samples)
    threads: int | None = None
    force: bool = False
    tolerance_overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    precision: PrecisionPlan = field(default_factory=PrecisionPlan)
    precision_options: PrecisionOptions = field(default_factory=PrecisionOptions)
    calibration_pairs: list[CalibrationPair] | None = None  # None: natural photos (precision.calibration)
    accuracy: AccuracyCheck | None = None  # task accuracy of the build vs the fp32 reference, gated

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_images", "parity_new_tokens"):
            if getattr(self, name) < 1:
                raise BuildError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        decoder = self.precision.of(DecodingScheme.decoder_stage)
        if decoder in ("int8", "w8", "w4"):  # a head choice that cannot go with the decoder fails now, not after export
            self.precision_options.head_precision(decoder)


@dataclass
class BuildResult:
    path: Path
    manifest: dict
    failures: list[str]


def _source_hashes(path: Path) -> dict[str, str]:
    """Content hashes of the model's config and weight files (the build's inputs)."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors", ".bin"))
    return {str(p.relative_to(path)): sha256_file(p) for p in files}


def build(model_path: Path, out: Path, options: BuildOptions | None = None,
          progress: Progress | None = None) -> BuildResult:
    options = options or BuildOptions()
    progress = progress or Progress()
    model_path, out = Path(model_path), Path(out).absolute()
    adapter = adapter_for(model_path, options.adapter)  # fails fast on an unknown architecture
    # and on a missing data set or an impossible question count, before the export
    check = options.accuracy
    questions = load_items(check.dataset, check.split, spread=check.questions) if check else None
    with atomic_folder(out, options.force, BuildError, "build folder") as tmp:
        _build_into(tmp, out, model_path, adapter, options, questions, progress)
    # an earlier failed attempt's <out>.failed describes a build that is not the one at <out> now
    shutil.rmtree(out.with_name(out.name + ".failed"), ignore_errors=True)
    return BuildResult(out, read_manifest(out), [])


def _build_into(tmp, out, model_path, adapter, options, questions, progress) -> None:
    with progress.step(f"loading {model_path} ({adapter.name} adapter)") as advance:
        loaded = adapter.load(model_path)
        advance()
    lora = None
    if options.lora:
        with progress.step(f"merging the adapter in {options.lora} (proved per stage against the unmerged one)") as advance:
            loaded, lora = merge_lora(loaded, Path(options.lora).absolute(), check_base=not options.lora_any_base)
            advance()
    with progress.step("splitting into stages") as advance:
        stages = split(loaded)
        scheme = adapter.scheme(loaded)
        layout = adapter.prompt_layout(loaded)
        advance()
    specs = [s.spec for s in stages]
    precisions = options.precision.resolve(specs)  # a stage or precision the model lacks fails before the export
    limits = Limits(
        max_batch=options.max_batch,
        max_images=min(options.max_images, adapter.max_images or options.max_images),
        max_sequence=min(options.max_sequence or DEFAULT_MAX_SEQUENCE, scheme.geometry.max_position_embeddings),
        tokens_per_image=layout.tokens_per_image,
    )

    graphs = {}
    for stage in stages:
        with progress.step(f"exporting {stage.name} to ONNX") as advance:
            start = time.perf_counter()
            path = export_stage(stage, tmp / "graphs")
            graphs[stage.name] = _describe_graph(path, tmp, "fp32", export_seconds=time.perf_counter() - start)
            advance()

    reference = reference_pipeline(loaded, limits, stages)
    # the merged adapter is an input too (calibration caches are keyed by these)
    source_sha256 = {**_source_hashes(model_path), **{f"lora/{k}": v for k, v in (lora.sha256 if lora else {}).items()}}
    if any(p != "fp32" for p in precisions.values()):
        _convert_stages(tmp, graphs, precisions, options, reference, source_sha256, progress)

    loaded.tokenizer.save_pretrained(tmp / "tokenizer")
    loaded.image_processor.save_pretrained(tmp / "tokenizer")
    image_text = adapter.image_text(loaded)
    if image_text:
        loaded.image_text_tokenizer.save_pretrained(tmp / image_text.tokenizer)
    manifest = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "source": {"path": str(model_path.absolute()), "adapter": adapter.name,
                   "model_type": getattr(loaded.config, "model_type", None) or loaded.config.get("model_type"),
                   "sha256": source_sha256, "lora": lora.to_dict() if lora else None},
        "stages": [spec.to_dict() for spec in specs],
        "scheme": scheme.to_dict(),
        "graphs": graphs,
        "precision": precisions,
        "prompt_layout": layout.to_dict(),
        "limits": limits.to_dict(),
        "tokenizer": "tokenizer",
        "image_text": image_text.to_dict() if image_text else None,
        "generation": {"eos_token_ids": eos_token_ids(loaded)},
    }
    write_manifest(tmp, manifest)

    # parity: the exported graphs (read back from disk) against the split modules and the original
    candidate = open_build(tmp, threads=options.threads, check_hashes=False)  # hashed just now
    result, policy, failures = _parity(loaded, reference, candidate, precisions, options, progress)
    accuracy = None
    if questions:
        accuracy, accuracy_failures = _task_accuracy(reference, candidate, questions, options.accuracy, progress)
        failures += accuracy_failures
    manifest["parity"] = {"passed": not failures, "report": "report.json", "failures": failures}
    write_report(tmp, manifest, result, policy, failures)
    if accuracy:
        record_accuracy(tmp, accuracy)
    if failures:
        failed = out.with_name(out.name + ".failed")
        shutil.rmtree(failed, ignore_errors=True)
        # keep what a user needs to debug, but nothing that opens as a build
        os.replace(tmp / MANIFEST_NAME, tmp / "manifest.failed.json")
        os.replace(tmp, failed)
        raise ParityError(f"parity failed for {len(failures)} check(s): " + "; ".join(failures)
                          + f". Graphs and report kept in {failed} (not a usable build)")
    write_manifest(tmp, manifest)


def _convert_stages(tmp, graphs, precisions, options, reference, source_sha256, progress) -> None:
    """Replace each fp32 graph whose stage asks for another precision by its variant."""
    int8_stages = [stage for stage, precision in precisions.items() if precision == "int8"]
    pairs = (options.calibration_pairs or default_pairs()) if int8_stages else []
    caches = {stage: cache_path(stage, tmp / graphs[stage]["file"], source_sha256, pairs,
                                options.precision_options.calibration) for stage in int8_stages}
    for cache in caches.values():
        _drop_if_unreadable(cache)
    feeds = {}
    if any(not c.exists() for c in caches.values()):  # a rebuild with every range cached skips this
        with progress.step(f"calibration inputs ({len(pairs)} image+text pairs through PyTorch)") as advance:
            feeds = stage_feeds(reference, pairs)
            advance()
    for stage, precision in precisions.items():
        if precision == "fp32":
            continue
        cached = " (cached calibration)" if stage in caches and caches[stage].exists() else ""
        with progress.step(f"{stage}: fp32 -> {precision}{cached}") as advance:
            start = time.perf_counter()
            src = tmp / graphs[stage]["file"]
            dst = src.with_name(f"{stage}.{precision}.onnx")
            with quiet_logging():
                info = make_variant(precision, src, dst, options.precision_options, feeds.get(stage), caches.get(stage))
            for f in (src, src.with_name(src.name + ".data")):  # ship the variant only
                f.unlink(missing_ok=True)
            graphs[stage] = _describe_graph(dst, tmp, precision, graphs[stage]["export_seconds"],
                                            convert_seconds=time.perf_counter() - start, variant=info.details)
            advance()


def _drop_if_unreadable(cache: Path) -> None:
    """A truncated or hand-edited calibration cache is recalibrated, not trusted."""
    import json

    try:
        if cache.exists():
            json.loads(cache.read_text())
    except (OSError, ValueError):
        cache.unlink(missing_ok=True)


def _describe_graph(path: Path, root: Path, precision: str, export_seconds: float, **extra) -> dict:
    """The manifest entry of one shipped graph: file, precision, I/O, size, hashes."""
    inputs, outputs = graph_io(path)
    files = [p for p in (path, path.with_name(path.name + ".data")) if p.exists()]
    entry = {
        "file": str(path.relative_to(root)),
        "precision": precision,
        "bytes": graph_bytes(path),
        "export_seconds": round(export_seconds, 2),
        "inputs": [i.to_dict() for i in inputs],
        "outputs": [o.to_dict() for o in outputs],
        "sha256": {str(f.relative_to(root)): sha256_file(f) for f in files},
    }
    for key, value in extra.items():
        entry[key] = round(value, 2) if isinstance(value, float) else value
    return entry


def _parity(loaded, reference, candidate, precisions: dict[str, str], options: BuildOptions, progress: Progress):
    """Stage-by-stage and end-to-end comparison, judged by the policy for the build's precisions."""
    samples = options.samples or default_samples(reference.limits.max_images)
    result = ParityResult()
    with progress.step("parity per stage (PyTorch vs ONNX Runtime)", total=len(samples)) as advance:
        compare_stages(reference, candidate, samples, result, advance)
    with progress.step(f"parity end to end ({options.parity_new_tokens} greedy tokens vs HF generate)",
                       total=len(samples)) as advance:
        compare_tokens(_hf_reference(loaded, candidate.eos_token_ids),
                       {"torch_split": reference, "onnxruntime": candidate}, samples,
                       options.parity_new_tokens, result, advance)
    policy = ParityPolicy.for_precisions(precisions, reference.scheme.decoder_stage).with_overrides(
        {**loaded.adapter.tolerances(), **options.tolerance_overrides})
    return result, policy, policy.judge(result.stages, result.tokens)


def _task_accuracy(reference, candidate, questions, check: AccuracyCheck, progress: Progress) -> tuple[dict, list[str]]:
    """The fp32 PyTorch reference and the build answer the same questions; the gate judges the drop."""
    name, items = questions
    results = answer_all({"torch": reference, "onnxruntime": candidate}, name, items, progress)
    return accuracy_section(name, items, results, AccuracyGate(check.max_drop_points))


def _hf_reference(loaded, eos_ids: list[int]):
    """The original model's own greedy generate, trailing EOS dropped (our loop does not emit it)."""
    import numpy as np
    import torch

    def run(prompt: str, ids: list[int], pixel_values: np.ndarray | None, max_new_tokens: int) -> list[int]:
        tokens = loaded.adapter.reference_generate(
            loaded, torch.tensor([ids]), None if pixel_values is None else torch.from_numpy(pixel_values),
            max_new_tokens, eos_ids, prompt=prompt)
        for i, t in enumerate(tokens):
            if t in eos_ids:
                return tokens[:i]
        return tokens

    return run


def verify(build_dir: Path, options: BuildOptions | None = None, progress: Progress | None = None) -> BuildResult:
    """Re-run the parity report of an existing build against its source model."""
    options = options or BuildOptions()
    progress = progress or Progress()
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    with progress.step(f"loading {manifest['source']['path']}") as advance:
        loaded = load_source(manifest["source"])
        advance()
    precisions = {stage: g["precision"] for stage, g in manifest["graphs"].items()}
    result, policy, failures = _parity(loaded, reference_pipeline(loaded, Limits.from_dict(manifest["limits"])),
                                       open_build(build_dir, threads=options.threads, check_hashes=False),
                                       precisions, options, progress)
    # graphs edited or corrupted since the build are failures too, whatever their parity says
    failures += [f"{name} changed since the build (sha256 mismatch)" for name in verify_hashes(build_dir, manifest)]
    manifest["parity"] = {"passed": not failures, "report": "report.json", "failures": failures}
    write_report(build_dir, manifest, result, policy, failures)
    write_manifest(build_dir, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    return BuildResult(build_dir, manifest, failures)
