"""``vlm-export build``: load -> split -> export -> fuse -> precision -> parity -> manifest, written atomically.

Graph forms: the decoder stage is also written in ONNX Runtime's form (export/fuse.py: contrib-op
kernels), and so is an fp32 or int8 image stage with attention (export/image_fuse.py: MultiHeadAttention), which
the onnxruntime target runs; TensorRT reads standard ONNX ops only and keeps the standard graph. The
manifest records both and which target runs which (manifest.py, "graph forms"), and parity proves each
form against PyTorch.

The build is written into a hidden temporary folder beside the target and renamed into place
only when every graph exported, passed the ONNX checker and matched PyTorch. A build whose
parity fails is moved to ``<out>.failed/`` (graphs + report, its manifest renamed), so nothing that looks
complete is ever left behind; a later good build at ``<out>`` removes that ``<out>.failed/``.
"""
from __future__ import annotations

import copy
import datetime as dt
import functools
import gc
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .adapters import adapter_for
from .adapters.base import read_chat_template, set_chat_template
from .adapters.lora import merge_lora
from .adapters.reference import (eos_token_ids, generation_defaults, load_source, reference_pipeline, release_weights,
                                 split, unapplied_generation_settings, unread_generation_settings)
from .atomic import atomic_folder
from .compare.accuracy import AccuracyCheck, accuracy_section, answer_all
from .compare.parity import (ArrayStore, ParityResult, Sample, compare_tokens, default_samples, expected_tokens,
                             measure_exact, record_outputs, record_stages, replay_stages)
from .compare.policy import DECODER_ENTRIES, AccuracyGate, ParityPolicy, Tolerance
from .compare.report import record_section, write_report
from .contract import DecoderGeometry, DecodingScheme, Limits, scheme_from_dict
from .datasets import load_items
from .cpu import int8_dot_product
from .errors import BuildError, ParityError, RunnerError, first_line
from .export.fuse import fuse_decoder, load_structure
from .export.image_fuse import fuse_image_stage
from .export.graph_info import check_graph, graph_bytes, graph_io
from .export.onnx_export import export_stage
from .precision.calibration import CalibrationPair, cache_path, default_pairs, stage_feeds
from .precision.convert import PrecisionOptions, image_fallback_path, make_variant, quiet_logging
from .precision.sensitivity import STATIC_INT8_KEY
from .precision.spec import PrecisionPlan
from .precision.weight_only import check_whole_blocks, needs_whole_blocks
from .manifest import (MANIFEST_NAME, derive_targets, folder_hashes, is_build_folder, read_manifest, sha256_file,
                       stage_forms, targets as target_forms, verify_hashes, versions, write_manifest)
from .memory import BUILD_PEAK_FACTOR, PROCESS_BASE_BYTES, available_bytes, fp32_weight_bytes, gigabytes
from .progress import MeasuredProgress, Progress
from .runtime.load import open_build
from .runtime.images import ImageLimits, image_grids
from .runtime.prompt import build_prompt_ids

DEFAULT_MAX_SEQUENCE = 4096
#: where parity's recorded reference (its arrays) waits for the graphs, in the build folder
PARITY_SCRATCH = ".parity-reference"


@dataclass
class BuildOptions:
    adapter: str | None = None  # None: chosen from config.json's model_type
    lora: Path | None = None  # a PEFT adapter folder, merged into the model before the split
    # the chat template the model was trained with, for a checkpoint that ships none (or another one)
    chat_template: Path | None = None
    lora_any_base: bool = False  # merge even if the adapter names another base model
    max_batch: int = 4
    max_images: int = 2
    max_sequence: int | None = None  # None: min(model's max positions, DEFAULT_MAX_SEQUENCE)
    parity_new_tokens: int = 32
    samples: list[Sample] | None = None  # None: real photos + questions (compare.parity.default_samples)
    threads: int | None = None
    force: bool = False
    tolerance_overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    # the fp32 stages' element-wise gate; None: the default Tolerance(), or in verify the build's
    fp32_tolerance: Tolerance | None = None
    precision: PrecisionPlan = field(default_factory=PrecisionPlan)
    precision_options: PrecisionOptions = field(default_factory=PrecisionOptions)
    calibration_pairs: list[CalibrationPair] | None = None  # None: natural photos (precision.calibration)
    accuracy: AccuracyCheck | None = None  # task accuracy of the build vs the fp32 reference, gated
    # the decoder's ONNX Runtime form (export/fuse.py: fused kernels), which the onnxruntime target runs;
    # False: every target runs the standard graph (TensorRT's always does)
    fuse: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_images", "parity_new_tokens"):
            if getattr(self, name) < 1:
                raise BuildError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        decoder = self.precision.of(DecodingScheme.decoder_stage)
        if decoder in ("int8", "w8", "w4"):  # a head choice that cannot go with the decoder fails now, not after export
            self.precision_options.head_precision(decoder)
        self._refuse_unused_precision_options(decoder)
        po = self.precision_options
        if decoder == "int8" and po.int8_kernel == "u8s8" and not int8_dot_product():
            # the build runs its parity on this CPU, where ONNX Runtime's U8S8 kernels are not exact
            raise BuildError("--int8-kernel u8s8 is exact only on a CPU with VNNI or AMX, and the build checks parity "
                             "on this one, which has neither; build on such a CPU, or use --int8-kernel u8u8 (or auto)")

    @property
    def asked_precisions(self) -> set[str]:
        """Every precision --precision names (before it is resolved against a model's stages)."""
        return {precision for _, precision in self.precision.choices} | {self.precision.default}

    @property
    def calibrates(self) -> bool:
        """Whether calibration pairs are read: an int8 stage, or GPTQ rounding of w8/w4 weights."""
        asked = self.asked_precisions
        return "int8" in asked or bool(asked & {"w8", "w4"}) and self.precision_options.rounding("w4") == "gptq"

    def _refuse_unused_precision_options(self, decoder: str) -> None:
        """An option no stage of the plan reads would be ignored silently: refuse it, naming what it sets."""
        po, asked = self.precision_options, self.asked_precisions
        weight_only, default = bool(asked & {"w8", "w4"}), PrecisionOptions()
        int8_decoder = decoder == "int8"
        # a blanket int8 reaches the image stages; a named one only its stage
        int8_image_stage = self.precision.default == "int8" or any(
            precision == "int8" and stage != DecodingScheme.decoder_stage for stage, precision in self.precision.choices)
        #: flag, given, what it sets, whether a stage reads it, a --precision part that would
        rules = (
            ("--weight-rounding", po.weight_rounding is not None, "picks the codes of w8/w4 weights and of an int8 "
             "decoder's", weight_only or int8_decoder, "decoder=w4"),
            ("--lm-head", po.lm_head is not None, "sets a quantized decoder's LM head",
             decoder in ("int8", "w8", "w4"), "decoder=w8"),
            ("--block-size", po.block_size is not None, "sets the blocks of w8/w4 weights (and of an int8 "
             "decoder's w8 head)", weight_only or int8_decoder, "decoder=w4"),
            ("--weight-scheme", po.weight_scheme is not None, "sets how w8/w4 weights are rounded", weight_only,
             "decoder=w4"),
            ("--weight-form", po.weight_form != default.weight_form, "sets the graph form of w8/w4 weights",
             weight_only, "decoder=w4"),
            ("--weight-activations", po.weight_activations != default.weight_activations,
             "sets what a w8/w4 decoder's activations are rounded to", weight_only, "decoder=w4"),
            ("--embeddings", po.embeddings != default.embeddings, "sets a w8/w4 decoder's lookup tables", weight_only,
             "decoder=w4"),
            ("--int8-kernel", po.int8_kernel != default.int8_kernel, "picks an int8 decoder's kernels", int8_decoder,
             "decoder=int8"),
            ("--int8-fp32-matmuls", po.int8_fp32_matmuls != default.int8_fp32_matmuls,
             "sets how many of an int8 stage's MatMuls stay fp32", int8_decoder or int8_image_stage, "decoder=int8"),
            ("--calibration", po.calibration != default.calibration, "sets how int8 image stages are calibrated "
             "(an int8 decoder's ranges are its channels' maxima)", int8_image_stage, "vision=int8"),
            ("--keep-node", bool(po.exclude_nodes), "keeps nodes out of int8/w8/w4 quantization",
             bool(asked & {"int8", "w8", "w4"}), "decoder=w4"),
        )
        for flag, given, sets, read, example in rules:
            if given and not read:
                raise BuildError(f"{flag} {sets}, and --precision {self.precision} makes no such stage; "
                                 f"add e.g. {example} to --precision, or drop {flag}")


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
    template = read_chat_template(options.chat_template) if options.chat_template else None
    steps = MeasuredProgress(progress)
    memory = check_memory(model_path, steps)
    with atomic_folder(out, options.force, BuildError, "build folder", is_build_folder) as tmp:
        _build_into(tmp, out, model_path, adapter, options, questions, template, steps, memory)
    # an earlier failed attempt's <out>.failed describes a build that is not the one at <out> now
    shutil.rmtree(out.with_name(out.name + ".failed"), ignore_errors=True)
    return BuildResult(out, read_manifest(out), [])


def check_memory(model_path: Path, progress: Progress) -> dict:
    """Refuse a model whose fp32 weights alone do not fit in the memory available (the kernel would
    kill the build minutes in, with no message); note one whose build will likely not fit. Returns
    what it read and estimated (the report sets it beside the measured peak)."""
    weights, available = fp32_weight_bytes(model_path), available_bytes()
    peak = None if weights is None else int(weights * BUILD_PEAK_FACTOR) + PROCESS_BASE_BYTES
    checked = {"fp32_weight_bytes": weights, "available_bytes": available, "estimated_peak_bytes": peak}
    if weights is None or available is None:
        return checked
    if weights + PROCESS_BASE_BYTES > available:
        raise BuildError(f"{model_path.name}'s weights take {gigabytes(weights)} in fp32 (a build holds them so, to "
                         f"judge the graphs against PyTorch) and this machine has {gigabytes(available)} of memory "
                         f"available: build it on a machine with about {gigabytes(peak)} free")
    if peak > available:
        progress.note(f"this build may run out of memory: it peaks at about {gigabytes(peak)} for "
                      f"{gigabytes(weights)} of fp32 weights, and {gigabytes(available)} is available")
    return checked


def _build_into(tmp, out, model_path, adapter, options, questions, template, progress: MeasuredProgress,
                memory: dict) -> None:
    with progress.step(f"loading {model_path} ({adapter.name} adapter)") as advance:
        loaded = adapter.load(model_path)
        advance()
    lora = None
    if options.lora:
        with progress.step(f"merging the adapter in {options.lora} (proved per stage against the unmerged one)") as advance:
            loaded, lora = merge_lora(loaded, Path(options.lora).absolute(), check_base=not options.lora_any_base)
            advance()
    if template:
        set_chat_template(loaded.tokenizer, template, f"the chat template {options.chat_template}")
    with progress.step("splitting into stages") as advance:
        stages = split(loaded)
        scheme = adapter.scheme(loaded)
        layout = adapter.prompt_layout(loaded)
        advance()
    if template and not layout.use_chat_template:
        raise BuildError(f"{adapter.name} models take their prompts as written, through no chat template; "
                         "drop --chat-template")
    if layout.use_chat_template and not getattr(loaded.tokenizer, "chat_template", None):
        where = (f" (or where the prompt writes {layout.image_token!r}, once per image)" if layout.images_where_written
                 else "")
        progress.note(f"{model_path.name} ships no chat template: prompts go to the model as written, the image "
                      f"before the text{where}; if it was trained with a format, give it: --chat-template FILE")
    unapplied = unapplied_generation_settings(loaded)
    if unapplied:
        progress.note(f"{model_path.name}'s generation config sets {', '.join(unapplied)}, which vlm-export's "
                      "generation does not apply (greedy or sampled, one sequence; the settings it applies are "
                      "in the manifest's generation section): its answers may differ from Hugging Face "
                      "generate's defaults")
    unread = unread_generation_settings(loaded)
    if unread:
        progress.note(f"{model_path.name}'s generation_config.json sets {', '.join(unread)}, which its own generate "
                      f"never reads ({adapter.name} generates with its language model's generation config): "
                      "neither Hugging Face nor vlm-export applies it; set it in the language model's config")
    specs = [s.spec for s in stages]
    precisions = options.precision.resolve(specs)  # a stage or precision the model lacks fails before the export
    asked = options.max_sequence or DEFAULT_MAX_SEQUENCE
    limits = Limits(
        max_batch=options.max_batch,
        max_images=min(options.max_images, adapter.max_images or options.max_images),
        # an LM without a position table (ALiBi) is bounded by the build's choice alone
        max_sequence=min(asked, scheme.geometry.max_position_embeddings or asked),
        tokens_per_image=layout.tokens_per_image,
        tiles_per_image=layout.image_tiles.max_tiles if layout.tiled else 1,
        image_tokens=layout.most_image_tokens,
    )
    if options.max_sequence and options.max_sequence > limits.max_sequence:
        progress.note(f"--max-sequence {options.max_sequence} is more than the language model's "
                      f"{limits.max_sequence} positions (max_position_embeddings): the build takes {limits.max_sequence}")
    switch = scheme.geometry.batch_switched_positions
    if switch and limits.max_batch > 1 and limits.max_sequence > switch:
        progress.note(f"the language model's longrope rotary switches to its long factors once the batch's longest row "
                      f"passes {switch} positions, as Hugging Face's forward does: a shorter row batched with it then "
                      f"answers differently than alone; --max-sequence {switch} or --max-batch 1 keeps rows independent")
    _check_samples_fit(options.samples or default_samples(limits.max_images), loaded, layout, scheme,
                       limits, options.parity_new_tokens)
    _check_weight_blocks(stages, precisions, options.precision_options)

    graphs = {}
    for stage in stages:
        with progress.step(f"exporting {stage.name} to ONNX") as advance:
            start = time.perf_counter()
            path = export_stage(stage, tmp / "graphs")
            graphs[stage.name] = _describe_graph(path, tmp, "fp32", export_seconds=time.perf_counter() - start)
            advance()
    _fuse_decoder_stage(tmp, graphs, scheme.decoder_stage, precisions[scheme.decoder_stage], limits, options, progress,
                        scheme.geometry)
    _fuse_image_stages(tmp, graphs, [s.name for s in stages if s.name != scheme.decoder_stage], precisions, options,
                       progress)

    # the merged adapter is an input too (calibration caches are keyed by these)
    source_sha256 = {**_source_hashes(model_path), **{f"lora/{k}": v for k, v in (lora.sha256 if lora else {}).items()}}
    converting = any(p != "fp32" for p in precisions.values())
    fp32_modules = adapter.fp32_modules(loaded)
    # Everything that needs PyTorch runs now, then the model is freed: the precision passes and parity's
    # ONNX Runtime sessions never share memory with it (the peak is the larger of the two, not the sum).
    reference = reference_pipeline(loaded, limits, stages)
    calibration = None
    if converting:
        calibration = _calibration(tmp, graphs, precisions, options, reference, source_sha256, progress)
    scratch = tmp / PARITY_SCRATCH  # inside the build being written: gone with it if the build fails on the way
    scratch.mkdir()
    recorded = _record_reference_and_free(loaded, reference, options, progress, scratch, questions)
    if converting:
        _convert_stages(tmp, graphs, precisions, options, calibration, progress, fp32_modules)
        del calibration

    loaded.tokenizer.save_pretrained(tmp / "tokenizer")
    loaded.image_processor.save_pretrained(tmp / "tokenizer")
    image_text = adapter.image_text(loaded)
    if image_text:
        loaded.image_text_tokenizer.save_pretrained(tmp / image_text.tokenizer)
    tokenizer_sha256 = folder_hashes(tmp, ["tokenizer", *([image_text.tokenizer] if image_text else [])])
    manifest = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "source": {"path": str(model_path.absolute()), "adapter": adapter.name,
                   "model_type": getattr(loaded.config, "model_type", None) or loaded.config.get("model_type"),
                   "sha256": source_sha256, "lora": lora.to_dict() if lora else None,
                   **({"chat_template": template} if template else {})},
        "stages": [spec.to_dict() for spec in specs],
        "scheme": scheme.to_dict(),
        "graphs": graphs,
        "targets": derive_targets(graphs),
        "precision": precisions,
        "prompt_layout": layout.to_dict(),
        "limits": limits.to_dict(),
        "tokenizer": "tokenizer",
        "tokenizer_sha256": tokenizer_sha256,
        "image_text": image_text.to_dict() if image_text else None,
        "generation": {"eos_token_ids": eos_token_ids(loaded), **generation_defaults(loaded),
                       **({"caption_prompt": loaded.adapter.caption_prompt} if loaded.adapter.caption_prompt else {})},
    }
    write_manifest(tmp, manifest)

    # parity: the exported graphs (read back from disk) against the split modules and the original
    opener = functools.partial(open_build, tmp, threads=options.threads, check_hashes=False)  # hashed just now
    torch_split = copy.deepcopy(recorded.result)  # a second judgment starts from the reference's own entries
    try:
        judged = _judge(recorded, adapter, opener, precisions, options, progress, manifest["source"],
                        other_forms(manifest), questions)
        why = _only_the_fused_forms_failed(judged[2], manifest, scheme.decoder_stage)
        fused_failures = judged[2]
    except RunnerError as e:
        why = _fused_form_refused(e, tmp, manifest)
        if not why:
            raise
        fused_failures = []  # nothing was judged: the reason says what ONNX Runtime refused
    if why:
        for stage, reason in why.items():
            _drop_fused_form(tmp, manifest, stage, reason, fused_failures, progress)
        recorded.result = torch_split
        judged = _judge(recorded, adapter, opener, precisions, options, progress, manifest["source"],
                        other_forms(manifest), questions)
        if judged[2] and fused_failures:
            for stage in why:
                _standard_failed_too(tmp, manifest, stage, fused_failures, judged[2], progress)
    result, policy, failures, accuracy = judged
    shutil.rmtree(scratch)  # the reference's arrays are no part of the build (nor of a failed one's folder)
    manifest["parity"] = _parity_record(options, result, policy, failures)
    write_report(tmp, manifest, result, policy, failures)
    if accuracy:
        record_section(tmp, "task_accuracy", accuracy)
    record_section(tmp, "cost", {**progress.summary(), "memory_check": memory})
    if failures:
        failed = out.with_name(out.name + ".failed")
        shutil.rmtree(failed, ignore_errors=True)
        # keep what a user needs to debug, but nothing that opens as a build
        os.replace(tmp / MANIFEST_NAME, tmp / "manifest.failed.json")
        os.replace(tmp, failed)
        raise ParityError(f"parity failed for {len(failures)} check(s): " + "; ".join(failures)
                          + f". Graphs and report kept in {failed} (not a usable build)"
                          + _remedies(failures, precisions, scheme.decoder_stage, options.precision_options))
    write_manifest(tmp, manifest)


def _remedies(failures: list[str], precisions: dict[str, str], decoder_stage: str,
              options: PrecisionOptions = PrecisionOptions()) -> str:
    """What to try, for each reduced-precision stage among the failures (parity entries name their
    stage, the decoder's are its prefill and decode; a task-accuracy drop may be any of them). A
    failing fp32 stage gets none: that is an export to report, not a setting to change."""
    suspects = set()
    for failure in failures:
        entry = failure.split("/", 1)[0].split(" (", 1)[0]  # "prefill (standard form)/logits: ..."
        suspects |= set(precisions) if failure.startswith("task accuracy") else \
            {decoder_stage if entry in DECODER_ENTRIES else entry}
    grouped: dict[tuple, list[str]] = {}  # stages with the same precision and the same advice are named together
    for stage in precisions:
        tries = options.remedies(precisions[stage], stage == decoder_stage) if stage in suspects else []
        if tries:
            grouped.setdefault((precisions[stage], *tries), []).append(stage)
    return "".join(f". To try for {', '.join(stages)} ({precision}): {', '.join(tries[:-1])}"
                   f"{' or ' if len(tries) > 1 else ''}{tries[-1]}" for (precision, *tries), stages in grouped.items())


def _check_weight_blocks(stages, precisions: dict[str, str], po: PrecisionOptions) -> None:
    """A w8/w4 stage whose Linear layers' input sizes no block size divides (where the scheme or form
    cannot pad them) is refused before anything is exported, as the quantizer would refuse it after
    (it still checks the graph's MatMuls: other layers than Linear ones become MatMuls too). With
    --keep-node the user may be keeping exactly those layers fp32: the quantizer judges then."""
    if po.exclude_nodes or not needs_whole_blocks(po.weight_form, po.scheme):
        return
    from torch import nn

    for stage in stages:
        if precisions[stage.name] in ("w8", "w4"):
            check_whole_blocks([(name, m.in_features) for name, m in stage.module.named_modules()
                                if isinstance(m, nn.Linear)], po.block_sizes, po.weight_form)


def _fused_precision_problem(precision: str, options: BuildOptions) -> str:
    """Why the decoder's ONNX Runtime (fused) form is not made at ``precision`` ("" when it is):
    variants for TensorRT are made from the standard graph, which the onnxruntime target then runs too."""
    if precision == "fp16":
        return ("fp16 is made for TensorRT and GPUs, from the standard graph; the onnxruntime target runs that "
                "fp16 graph (the fusion pass and the fp16 converter are not combined)")
    if precision in ("w8", "w4") and options.precision_options.weight_form == "dequantize":
        return ("the dequantize weight form (W4A16) is TensorRT's, made from the standard graph; the onnxruntime "
                "target runs that graph (--weight-form matmulnbits makes a fused MatMulNBits form for ONNX Runtime)")
    return ""


#: why a fused MatMulNBits decoder ships no standard form
NO_TENSORRT_FORM = ("the decoder's weights are in ONNX Runtime's MatMulNBits form, which TensorRT does not read: "
                    "only its fused form is shipped (--weight-form dequantize makes a TensorRT form)")


def _fuse_decoder_stage(tmp: Path, graphs: dict, stage: str, precision: str, limits: Limits,
                        options: BuildOptions, progress: Progress, geometry: DecoderGeometry | None = None) -> None:
    """The decoder's fp32 fused form beside its standard graph (``graphs[stage]["forms"]["fused"]``),
    precision variants for ONNX Runtime are made from it later; where none is made, the reason is in
    ``graphs[stage]["fusion"]`` and the onnxruntime target runs the standard graph. ``geometry``: the
    decoder's (its layers' windows; whether its attention is causal), None: no windows, causal."""
    entry = graphs[stage]
    reason = "not made: fusion turned off (--no-fuse)" if not options.fuse else _fused_precision_problem(precision, options)
    if reason:
        entry["fusion"] = {"made": False, "reason": reason}
        return
    src = tmp / entry["file"]
    dst = src.with_name(f"{stage}.fused.onnx")
    with progress.step(f"{stage}: its ONNX Runtime form (fused kernels, export/fuse.py)") as advance:
        start = time.perf_counter()
        try:
            report = fuse_decoder(src, dst, max_positions=limits.max_sequence,
                                  layer_windows=geometry.layer_windows() if geometry else (),
                                  causal=not (geometry and geometry.prefill_blocks))
            record = {"made": report.fused, **report.to_dict()}
            if report.fused:
                check_graph(dst)
            if record.get("kv_in_place") and geometry and geometry.states:
                # the graph could take one shared KV buffer; the runtime's SlotBatch holds no per-row state
                record["kv_copied_because"] = ("the language model's other layers carry fixed-size states per row "
                                               "(linear attention, short convolutions), which one shared KV buffer does not hold")
        except Exception as e:  # noqa: BLE001 - the pass's failure costs the speed-up, never the build
            record = {"made": False, "reason": f"the fusion pass failed: {first_line(e)}"}
        record["seconds"] = round(time.perf_counter() - start, 2)
        advance()
    if _ship_fused_form(tmp, entry, stage, dst, record, progress) and record.get("kv_copied_because"):  # the build still works; the user should know which path decodes
        progress.note(f"{stage}: its fused form decodes on a KV cache copied every step, not one shared buffer: "
                      f"{record['kv_copied_because']}")


def _ship_fused_form(tmp: Path, entry: dict, stage: str, dst: Path, record: dict, progress: Progress) -> bool:
    """A fusion pass's ``record`` into the stage's manifest ``entry``, and its graph at ``dst`` as the stage's fused
    form where one was made (True); else its files removed and the reason said."""
    entry["fusion"] = record
    if not record["made"]:
        for f in (dst, dst.with_name(dst.name + ".data")):  # unfused: a copy of the standard graph, unused
            f.unlink(missing_ok=True)
        progress.note(f"{stage}: no fused form ({record['reason']}); ONNX Runtime runs the standard graph")
        return False
    entry["forms"] = {"fused": _describe_graph(dst, tmp, "fp32", entry["export_seconds"], form="fused",
                                               fuse_seconds=record["seconds"])}
    return True


#: the precisions an image stage's fused form is made at: fp32, and int8 (its MatMuls quantized around the fp32
#: MultiHeadAttention: the tiled kernel's memory at int8's speed elsewhere)
FUSED_IMAGE_PRECISIONS = ("fp32", "int8")


def _fuse_image_stages(tmp: Path, graphs: dict, stages: list[str], precisions: dict[str, str], options: BuildOptions,
                       progress: Progress) -> None:
    """Each fp32 or int8 image (or encoder) stage's ONNX Runtime form beside its standard graph, where its attention
    (or a tanh GELU) fuses (export/image_fuse.py: MultiHeadAttention, ONNX Runtime's tiled kernel for unpadded
    images: memory that grows with the patches, not their square; FastGelu; an int8 stage's is quantized later,
    like the decoder's fused form);
    why not in ``graphs[stage]["fusion"]``. A stage without a softmax (a projector) gets no record."""
    for stage in stages:
        entry = graphs[stage]
        src = tmp / entry["file"]
        loaded = load_structure(src, stage)  # read once: looked at here, rewritten by the pass
        if not any(n.op_type == "Softmax" for n in loaded[0].graph.node):
            continue  # no attention
        reason = "" if options.fuse else "not made: fusion turned off (--no-fuse)"
        if not reason and precisions[stage] not in FUSED_IMAGE_PRECISIONS:
            reason = (f"not made: ONNX Runtime's attention kernel here is fp32 (an int8 stage's fused form quantizes "
                      f"the rest); the {precisions[stage]} variant is made from the standard graph, which the "
                      "onnxruntime target runs")
        if reason:
            entry["fusion"] = {"made": False, "reason": reason}
            continue
        dst = src.with_name(f"{stage}.fused.onnx")
        what = f"{stage}: its ONNX Runtime form (MultiHeadAttention, FastGelu: export/image_fuse.py)"
        with progress.step(what) as advance:
            start = time.perf_counter()
            try:
                report = fuse_image_stage(src, dst, loaded)
                record = {"made": report.fused, **report.to_dict()}
                if report.fused:
                    check_graph(dst)
            except Exception as e:  # noqa: BLE001 - the pass's failure costs the fused form, never the build
                record = {"made": False, "reason": f"the fusion pass failed: {first_line(e)}"}
            record["seconds"] = round(time.perf_counter() - start, 2)
            advance()
        del loaded
        _ship_fused_form(tmp, entry, stage, dst, record, progress)


def _fused_forms(graphs: dict) -> dict:
    """Each stage's fused (ONNX Runtime) form's manifest entry, for the stages that have one."""
    return {stage: g["forms"]["fused"] for stage, g in graphs.items() if "fused" in (g.get("forms") or {})}


@dataclass
class _Calibration:
    """What the precision variants read: the calibration caches by stage (``<stage>.fused`` for a fused
    form) and each stage's inputs on the calibration pairs, computed through PyTorch (empty when every
    range is cached and nothing is GPTQ-rounded)."""

    caches: dict[str, Path]
    feeds: dict[str, list]


def _calibration(tmp, graphs, precisions, options, reference, source_sha256, progress) -> _Calibration:
    """The PyTorch side of the precision variants, run before the model is freed."""
    fused = _fused_forms(graphs)
    int8_stages = [stage for stage, precision in precisions.items() if precision == "int8"]
    # GPTQ measures the layer inputs of each weight-only stage and of an int8 decoder on the same
    # pairs (not cached: K x K per input)
    decoder = reference.scheme.decoder_stage
    gptq_stages = [stage for stage, precision in precisions.items()
                   if (precision in ("w8", "w4") or (precision == "int8" and stage == decoder))
                   and options.precision_options.rounding(precision) == "gptq"]
    pairs = (options.calibration_pairs or default_pairs()) if int8_stages or gptq_stages else []
    po = options.precision_options
    # what an int8 decoder's fallback is chosen for (an image stage's int8 has no LM head)
    head = po.head_precision("int8") if precisions.get(decoder) == "int8" else "none"
    choices = (f"int8-kernel={po.kernel} int8-fp32-matmuls={po.int8_fp32_matmuls} int8-rounding={po.rounding('int8')} "
               f"lm-head={head}")
    # a standard graph only TensorRT serves has its fallback judged with Q/DQ emulated (convert.to_int8)
    # an image stage's cache keeps the fallback chosen on how its candidates were ranked and written
    caches = {stage: cache_path(stage, tmp / graphs[stage]["file"], source_sha256, pairs, po.calibration,
                                choices + (" qdq=emulated" if stage in fused else "")
                                + ("" if stage == decoder else f" {STATIC_INT8_KEY}"))
              for stage in int8_stages}
    caches.update({f"{stage}.fused": cache_path(f"{stage}.fused", tmp / fused[stage]["file"], source_sha256, pairs,
                                                 po.calibration, choices)
                   for stage in int8_stages if stage in fused})
    # an image stage keeps the fp32 fallback chosen on its ranges beside them (convert._static_int8), each form its own
    needed = list(caches.values()) + [image_fallback_path(cache) for key, cache in caches.items()
                                      if key.removesuffix(".fused") != decoder]
    for cache in needed:
        _drop_if_unreadable(cache)
    _check_kept_nodes(tmp, graphs, fused, precisions, po.exclude_nodes)
    feeds = {}
    if gptq_stages or any(not c.exists() for c in needed):  # a rebuild with every range cached skips this
        with progress.step(f"calibration inputs ({len(pairs)} image+text pairs through PyTorch)") as advance:
            feeds = stage_feeds(reference, pairs)
            advance()
    return _Calibration(caches, feeds)


def _convert_stages(tmp, graphs, precisions, options, calibration: _Calibration, progress,
                    fp32_modules: dict[str, tuple[str, ...]] | None = None) -> None:
    """Replace each fp32 graph whose stage asks for another precision by its variant. A decoder with
    a fused form gets its ONNX Runtime variants from that form (packed q/k/v quantize as one larger
    MatMul): MatMulNBits (w8/w4) from the fused graph only (no target runs an unfused
    one), int8 from both (the standard Q/DQ graph is TensorRT's)."""
    fused = _fused_forms(graphs)
    caches, feeds = calibration.caches, calibration.feeds
    for stage, precision in precisions.items():
        if precision == "fp32":
            continue
        entry = graphs[stage]
        weight_only = precision in ("w8", "w4")  # reaching here in the matmulnbits form (dequantize is never fused)
        if stage in fused:
            fused_entry = _fused_variant(tmp, stage, precision, fused[stage], options, feeds.get(stage),
                                         caches.get(f"{stage}.fused"), progress)
            if isinstance(fused_entry, str):  # no fused variant: the onnxruntime target runs the standard one
                entry.pop("forms")
                entry["fusion"] = {**entry["fusion"], "made": False, "reason": fused_entry}
            elif weight_only:  # no target runs an unfused MatMulNBits graph: the fused one is the stage's graph
                for f in (tmp / entry["file"], tmp / (entry["file"] + ".data")):
                    f.unlink(missing_ok=True)
                fusion = {**entry["fusion"], "tensorrt": NO_TENSORRT_FORM}
                graphs[stage] = {**fused_entry, "fusion": fusion}
                continue
            else:
                entry["forms"] = {"fused": fused_entry}
        cached = " (cached calibration)" if stage in caches and caches[stage].exists() else ""
        with progress.step(f"{stage}: fp32 -> {precision}{cached}") as advance:
            start = time.perf_counter()
            src = tmp / entry["file"]
            dst = src.with_name(f"{stage}.{precision}.onnx")
            with quiet_logging():
                info = make_variant(precision, src, dst, options.precision_options, feeds.get(stage), caches.get(stage),
                                    (fp32_modules or {}).get(stage, ()), note=progress.note, tensorrt_only="forms" in entry)
            for f in (src, src.with_name(src.name + ".data")):  # ship the variant only
                f.unlink(missing_ok=True)
            graphs[stage] = {**_describe_graph(dst, tmp, precision, entry["export_seconds"],
                                               convert_seconds=time.perf_counter() - start, variant=info.details),
                             **{k: entry[k] for k in ("forms", "fusion") if k in entry}}
            advance()


def _check_kept_nodes(tmp: Path, graphs: dict, fused: dict, precisions: dict[str, str], names: tuple[str, ...]) -> None:
    """Every --keep-node name is a node of a graph that is quantized (a misspelt one would keep nothing)."""
    if not names:
        return
    import onnx

    quantized = [stage for stage, precision in precisions.items() if precision in ("int8", "w8", "w4")]
    found = set()
    for entry in [graphs[stage] for stage in quantized] + [fused[stage] for stage in quantized if stage in fused]:
        found |= {node.name for node in onnx.load(os.fspath(tmp / entry["file"]), load_external_data=False).graph.node}
    missing = [name for name in names if name not in found]
    if missing:
        raise BuildError(f"--keep-node {', '.join(missing)}: no node of that name in the {', '.join(quantized)} "
                         "graph(s); names are the exported graphs' node names (graphs/*.onnx of an fp32 build, e.g. "
                         "in Netron, or the MatMul names a failed check prints)")


def _check_samples_fit(samples, loaded, layout, scheme, limits: Limits, new_tokens: int) -> None:
    """Every parity sample's prompt plus its new tokens within ``max_sequence``, before any export: an
    LM with few positions for its image tokens (2 images x 256 tokens in a 512-position LM) cannot
    take ``max_images`` images, and its fused attention refuses positions past its rotary table."""
    def length(sample) -> int:
        grids = (image_grids(loaded.image_processor, list(sample.images), ImageLimits(), layout.image_tiles)
                 if layout.tiled else None)
        return len(build_prompt_ids(loaded.tokenizer, layout, sample.prompt, len(sample.images), grids))

    counted = [(sample, length(sample)) for sample in samples]

    def fit(n: int, of=counted) -> bool:
        return all(scheme.length_problem(tokens, n, limits) is None for _, tokens in of)

    failing = [(sample, tokens) for sample, tokens in counted if not fit(new_tokens, [(sample, tokens)])]
    if not failing:
        return
    # one fix for every sample, so that the next try passes: where even one new token does not fit, the most
    # images whose samples a max_sequence within the LM's positions holds (and that max_sequence); else the most
    # new tokens every sample takes, or a max_sequence that takes them all
    crowded = sorted(((s, t) for s, t in failing if not fit(1, [(s, t)])), key=lambda st: len(st[0].images))
    sample, tokens = (crowded or failing)[0]
    most = max(len(s.images) for s, _ in counted)
    if crowded:
        fix = "give shorter parity prompts: the language model's positions cannot hold them"
        for k in range(most, -1, -1):
            needed = _max_sequence_that_fits([(s, t) for s, t in counted if len(s.images) <= k], scheme, limits,
                                             new_tokens)
            if needed is not None:
                fix = " and ".join(([f"raise --max-sequence to {needed}"] if needed > limits.max_sequence else [])
                                   + ([f"build with --max-images {k}"] if k < most else []))
                break
    else:
        fix = f"lower --parity-tokens to {max(n for n in range(1, new_tokens) if fit(n))}"
        needed = _max_sequence_that_fits(counted, scheme, limits, new_tokens)
        if needed is not None:
            fix += f" or raise --max-sequence to {needed}"
    if layout.tiled and sample.images and layout.image_tiles.fewer_tokens:  # the processor's size settings
        fix += f", or {layout.image_tiles.fewer_tokens}"
    # (the scheme says how prompt and new tokens share max_sequence: one budget, or one each for an encoder-decoder)
    raise BuildError(f"the parity sample {sample.label!r} ({len(sample.images)} image(s), {tokens} prompt tokens) "
                     f"does not fit this build's max_sequence of {limits.max_sequence} with {new_tokens} new tokens"
                     + (f" (the LM's positions: {positions})" if (positions := scheme.geometry.max_position_embeddings)
                        else "") + f": {fix}")


def _max_sequence_that_fits(counted, scheme: DecodingScheme, limits: Limits, new_tokens: int) -> int | None:
    """The smallest max_sequence (up to the LM's positions; 1M where it has no table) at which every sample
    of ``counted`` (prompt tokens counted) takes ``new_tokens``, or None where none does."""
    def fits(m: int) -> bool:
        wider = replace(limits, max_sequence=m)
        return all(scheme.length_problem(tokens, new_tokens, wider) is None for _, tokens in counted)

    if fits(limits.max_sequence):
        return limits.max_sequence
    low, high = limits.max_sequence, max(limits.max_sequence, scheme.geometry.max_position_embeddings or 1 << 20)
    if not fits(high):
        return None
    while high - low > 1:  # fits(high), not fits(low)
        middle = (low + high) // 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def _fused_variant(tmp: Path, stage: str, precision: str, fused: dict, options: BuildOptions, feeds, cache,
                   progress: Progress) -> dict | str:
    """The ``precision`` variant of the decoder's fp32 fused form (the fp32 fused file is replaced by it):
    its manifest entry, or why it could not be made (the fused files are then removed)."""
    src = tmp / fused["file"]
    dst = src.with_name(f"{stage}.fused.{precision}.onnx")
    cached = " (cached calibration)" if cache is not None and cache.exists() else ""
    with progress.step(f"{stage} (fused form): fp32 -> {precision}{cached}") as advance:
        start = time.perf_counter()
        try:
            with quiet_logging():
                info = make_variant(precision, src, dst, options.precision_options, feeds, cache, note=progress.note)
        except Exception as e:  # noqa: BLE001 - the fused form is the speed-up; the standard variant still ships
            info, why = None, f"the {precision} pass failed on the fused graph: {first_line(e)}"
        for f in (src, src.with_name(src.name + ".data"), *([] if info else [dst, dst.with_name(dst.name + ".data")])):
            f.unlink(missing_ok=True)
        advance()
    if info is None:
        return why
    return _describe_graph(dst, tmp, precision, fused["export_seconds"], form="fused", fuse_seconds=fused["fuse_seconds"],
                           convert_seconds=time.perf_counter() - start, variant=info.details)


def _only_the_fused_forms_failed(failures: list[str], manifest: dict, decoder_stage: str) -> dict[str, str]:
    """Stage -> why the build would pass with its standard graph on the onnxruntime target ({} if it would not):
    every failure is a fused form's own (its stage's entries - a decoder's prefill / decode, an image stage's
    own - its greedy tokens, the task accuracy it answered) while the standard forms, shipped beside them,
    passed theirs. The stages named are those whose entries failed; where only the end-to-end or task checks
    did, every stage with a fused form beside a standard graph (which of them is not known)."""
    stages = [stage for stage in manifest["graphs"] if _falls_back(manifest, stage)]
    if not failures or not stages:
        return {}  # nothing failed, or no standard graph to fall back to (a fused MatMulNBits decoder)
    by_entry = {entry: stage for stage in stages for entry in (DECODER_ENTRIES if stage == decoder_stage else [stage])}
    failed = [f.split("/", 1)[0] for f in failures]
    if not all(entry in by_entry or f.startswith(("end-to-end onnxruntime", "task accuracy"))
               for entry, f in zip(failed, failures)):
        return {}
    suspects = list(dict.fromkeys(by_entry[e] for e in failed if e in by_entry)) or stages
    why = {}
    for stage in suspects:
        precision = manifest["precision"][stage]
        cause = ("a bug of the fusion pass on this model" if precision == "fp32" else
                 f"each form is converted to {precision} on its own (calibration, the layers kept fp32), so the "
                 "fusion pass or that conversion")
        why[stage] = (f"its fused form failed parity where the standard graph passed ({len(failures)} check(s), the "
                      f"first {failures[0]}): {cause}, its failures kept in this record")
    return why


def _fused_form_refused(error: RunnerError, tmp: Path, manifest: dict) -> dict[str, str]:
    """Stage -> why the build falls back to its standard graph ({} if it does not): ONNX Runtime could not load
    or run the stage's fused form (a kernel limit its schema does not state, met on this model)."""
    if error.graph is None:
        return {}
    for stage in manifest["graphs"]:
        fused = (manifest["graphs"][stage].get("forms") or {}).get("fused")
        if fused is None or not _falls_back(manifest, stage):
            continue
        path = tmp / fused["file"]
        if Path(error.graph).resolve() == path.resolve():
            said = str(error)
            for spelled in {str(error.graph), str(path), str(path.resolve())}:  # the build's temporary folder: gone
                said = said.replace(spelled, fused["file"])
            return {stage: f"ONNX Runtime could not load or run its fused form ({said})"}
    return {}  # another graph failed: not a fused form's doing


def _falls_back(manifest: dict, stage: str) -> bool:
    """Whether a stage ships its standard graph beside the fused form the onnxruntime target runs."""
    return set(stage_forms(manifest["graphs"][stage])) == {"standard", "fused"}


def _drop_fused_form(tmp: Path, manifest: dict, stage: str, why: str, failures: list[str],
                     progress: Progress) -> None:
    """The fused form failed parity, or would not run, where the standard graph would do: a fusion that
    changes the model's answers, or that ONNX Runtime refuses, is a bug of the pass on this model,
    which must cost the speed-up, not the build. Its files go, the parity failures (if any) stay in
    the manifest's fusion record, and the onnxruntime target runs the standard graph (judged again as
    the candidate, end to end and on the task)."""
    entry = manifest["graphs"][stage]
    fused = entry.pop("forms")["fused"]
    for name in fused["sha256"]:
        (tmp / name).unlink(missing_ok=True)
    entry["fusion"] = {**entry.get("fusion", {}), "made": False, "reason": why,
                       **({"parity_failures": failures} if failures else {})}
    manifest["targets"] = derive_targets(manifest["graphs"])
    write_manifest(tmp, manifest)
    progress.note(f"{stage}: {why}; ONNX Runtime runs the standard graph")


def _standard_failed_too(tmp: Path, manifest: dict, stage: str, fused_failures: list[str], failures: list[str],
                         progress: Progress) -> None:
    """The standard graph, judged in the fused form's place, failed too: the fused form's end-to-end and
    task failures (which the standard graph had not been run for) were not the fusion pass's. Say so in
    the fusion record instead of blaming the pass."""
    fusion = manifest["graphs"][stage]["fusion"]
    fusion["reason"] = (f"its fused form failed parity ({len(fused_failures)} check(s), the first {fused_failures[0]}), "
                        f"and so did the standard graph judged in its place ({len(failures)} check(s), the first "
                        f"{failures[0]}): the model's export or its settings, not the fusion pass")
    write_manifest(tmp, manifest)
    progress.note(f"{stage}: the standard graph failed parity too: not the fusion pass's doing")


def other_forms(manifest: dict) -> dict[str, dict[str, list[str]]]:
    """Form -> stage -> the parity entries recorded in that form: for each stage shipping a form the onnxruntime
    target does not run (the standard graph TensorRT reads, beside a fused form), the stage's entries - the
    decoder's prefill and decode, an image stage's own."""
    decoder, used = scheme_from_dict(manifest["scheme"]).decoder_stage, target_forms(manifest)["onnxruntime"]
    entries: dict[str, dict[str, list[str]]] = {}
    for stage, g in manifest["graphs"].items():
        for form in stage_forms(g):
            if form != used.get(stage):
                entries.setdefault(form, {})[stage] = list(DECODER_ENTRIES) if stage == decoder else [stage]
    return entries


def _entries(by_stage: dict[str, list[str]]) -> list[str]:
    """The parity entries of one form's stages (``other_forms``), in order."""
    return [entry for names in by_stage.values() for entry in names]


def _open_in(open_form, form: str, stages) -> object:
    """The build with ``stages`` in ``form`` and the others as the onnxruntime target runs them (a stage may ship
    no ``form``: a fused MatMulNBits decoder has no standard graph)."""
    return open_form(form="onnxruntime", stage_forms=dict.fromkeys(stages, form))


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


@dataclass
class _Recorded:
    """The PyTorch side of parity, recorded before the model is freed (``_record_reference_and_free``)."""

    calls: list  # compare.parity.RecordedCall, their arrays in ``folder``
    folder: Path
    cases: list  # compare.parity.TokenCase: each sample's prompt, ids, pixels and HF generate's tokens
    result: ParityResult  # the split modules' greedy tokens against HF generate (``torch_split``)
    answers: list  # the PyTorch reference's task answers (AccuracyResult), when a build checks them


def _record_reference_and_free(loaded, reference, options: BuildOptions, progress: Progress, folder: Path,
                               questions=None) -> _Recorded:
    """Everything parity needs of PyTorch: each stage's feeds and outputs on the samples (written to
    ``folder``), the original model's and the split modules' greedy tokens, the task answers; then the
    model's weights are freed (``release_weights``: ``loaded`` and ``reference`` cannot run after it), so
    the model and the candidate's ONNX Runtime sessions (each about the decoder's weights) never hold
    memory together (a 569M-parameter LLaVA's fp32 build: 3.74 GB, against 5.99 GB side by side)."""
    samples = options.samples or default_samples(reference.limits.max_images)
    result = ParityResult()
    with progress.step("PyTorch reference: every stage's outputs", total=len(samples)) as advance:
        calls = record_stages(reference, samples, ArrayStore(folder), advance)
    with progress.step(f"PyTorch reference: {options.parity_new_tokens} greedy tokens (HF generate and the "
                       "split modules)", total=2 * len(samples)) as advance:
        cases = expected_tokens(_hf_reference(loaded), reference, samples, options.parity_new_tokens, advance)
        compare_tokens(cases, {"torch_split": reference}, options.parity_new_tokens, result, advance,
                       follow=("torch_split",))
    # both sides decode the build's max_batch questions together, as served (the same answers for the
    # onnxruntime target, tests/test_demo_build.py; PyTorch 3.5x cheaper than one at a time: the demo's
    # 60 questions, 97 against 335 CPU-s)
    answers = []
    if questions:
        answers = answer_all({"torch": reference}, *questions, progress, batch=reference.limits.max_batch)
    release_weights(loaded, reference)
    return _Recorded(calls, folder, cases, result, answers)


def _judge(recorded: _Recorded, adapter, open_form, precisions: dict[str, str], options: BuildOptions,
           progress: Progress, source: dict, other_forms: dict[str, dict[str, list[str]]] | None = None,
           questions=None):
    """The build against the recorded reference, stage by stage and end to end (and, given
    ``questions``, task accuracy), judged by the policy for the build's precisions; returns (result,
    policy, failures, the task-accuracy section or None). ``open_form(form=...)`` opens the build with
    its decoder in a form. The candidate is the build as the onnxruntime target runs it (its entries
    are ``prefill``, ``decode`` and the image stages; end to end and task accuracy run it). Each form of
    ``other_forms`` (``other_forms``: the standard graphs TensorRT reads) has its entries recorded as
    ``prefill (standard form)``, ``vision_encoder (standard form)`` ... and judged by the same tolerances. One
    form is open at a time (two at once were 8.15 GB for a 567M-parameter LLaVA, one 5.75).
    An entry failing its fp32 gate is measured against PyTorch in float64 too (``_measure_against_float64``:
    ``source`` is the manifest's, to load the model again) and judged by that."""
    result, other_forms = recorded.result, other_forms or {}
    for form, by_stage in other_forms.items():
        pipe, extra = _open_in(open_form, form, by_stage), ParityResult()
        entries = _entries(by_stage)
        calls = [call for call in recorded.calls if call.entry in entries]
        with progress.step(f"parity of the {form} form of {', '.join(by_stage)} (PyTorch vs ONNX Runtime)",
                           total=len(calls)) as advance:
            replay_stages(calls, pipe, extra, advance)
        for entry in entries:  # the other stages run the candidate's forms: measured there
            if entry in extra.stages:
                result.stages[form_entry_name(entry, form)] = extra.stages[entry]
        del pipe
        gc.collect()  # its sessions' memory back before the next form opens
    candidate, stages = open_form(form="onnxruntime"), ParityResult()
    with progress.step("parity per stage (PyTorch vs ONNX Runtime)", total=len(recorded.calls)) as advance:
        replay_stages(recorded.calls, candidate, stages, advance)
    result.stages = {**stages.stages, **result.stages}  # the candidate's entries first, as the report lists them
    policy = ParityPolicy.for_precisions(precisions, candidate.scheme.decoder_stage,
                                         options.fp32_tolerance or Tolerance()).with_overrides(
        {**adapter.tolerances(), **options.tolerance_overrides})
    with progress.step(f"parity end to end ({options.parity_new_tokens} greedy tokens vs HF generate)",
                       total=len(recorded.cases)) as advance:
        # where the policy holds the answers to HF's token for token, a divergence is followed to its end
        compare_tokens(recorded.cases, {"onnxruntime": candidate}, options.parity_new_tokens, result, advance,
                       batched=("onnxruntime",), follow=("onnxruntime",) if policy.require_identical_tokens else ())
    # every form of a stage is held to its entries' tolerances (overrides included)
    policy = replace(policy, tolerances={**policy.tolerances, **{
        form_entry_name(entry, form): policy.tolerance(entry) for form, by_stage in other_forms.items()
        for entry in _entries(by_stage)}})
    accuracy, accuracy_failures = None, []
    if questions:
        name, items = questions
        answers = recorded.answers + answer_all({"onnxruntime": candidate}, name, items, progress,
                                                batch=candidate.limits.max_batch)
        accuracy, accuracy_failures = accuracy_section(name, items, answers,
                                                       AccuracyGate(options.accuracy.max_drop_points))
    failing, limits = policy.needs_exact(result.stages), candidate.limits
    opened = {"onnxruntime": candidate}  # handed over, so that it closes before another form opens
    del candidate
    graph_outputs = _graph_outputs_for_float64(recorded, failing, opened, open_form, other_forms, source,
                                               progress) if failing else None
    opened.clear()
    if graph_outputs:
        gc.collect()  # the sessions' memory back before the model comes in float64
        _measure_against_float64(recorded, result, failing, graph_outputs, source, limits, progress)
    failures = policy.judge(result.stages, result.tokens, result.exact) + accuracy_failures
    return result, policy, failures, accuracy


def _graph_outputs_for_float64(recorded: _Recorded, entries: list[str], opened: dict, open_form, other_forms,
                               source: dict, progress: Progress) -> dict | None:
    """Is an fp32 entry's error the export's or the model's own? First half: the failing entries' recorded
    calls run again on their forms (``opened``: those open already, by form, taken from it and closed after
    use; the others opened one at a time), the outputs kept on disk (result entry -> call index -> files), so
    that the model in float64 never shares memory with the graphs. None where the model in float64 (twice its
    fp32 memory) would not fit: a note says so, and the entries stay as judged against PyTorch fp32."""
    weights, available = fp32_weight_bytes(Path(source["path"])), available_bytes()
    if weights and available and 2 * weights + PROCESS_BASE_BYTES > available:
        _not_measured(entries, f"the model takes {gigabytes(2 * weights)} so and {gigabytes(available)} is available",
                      progress)
        return None
    forms = {call.entry: ("onnxruntime", call.entry) for call in recorded.calls}
    forms.update({form_entry_name(entry, form): (form, entry) for form, by_stage in other_forms.items()
                  for entry in _entries(by_stage)})
    by_form: dict[str, dict[str, str]] = {}  # form -> {recorded entry: result entry}
    for entry in entries:
        form, recorded_entry = forms[entry]
        by_form.setdefault(form, {})[recorded_entry] = entry
    for form in [f for f in opened if f not in by_form]:
        del opened[form]  # not needed: closed before any other form opens
    indices = {form: [i for i, call in enumerate(recorded.calls) if call.entry in wanted]
               for form, wanted in by_form.items()}
    store, outputs = ArrayStore(recorded.folder / "float64"), {}
    store.folder.mkdir(exist_ok=True)
    with progress.step(f"float64 check of {', '.join(entries)} (they missed the fp32 gate): the graphs' outputs",
                       total=sum(map(len, indices.values()))) as advance:
        for form in sorted(by_form, key=lambda f: f not in opened):  # the open ones first, then closed
            wanted = by_form[form]
            pipe = opened.pop(form, None) or (open_form(form=form) if form == "onnxruntime"
                                              else _open_in(open_form, form, other_forms[form]))
            for i, files in record_outputs(recorded.calls, indices[form], pipe, store, advance).items():
                outputs.setdefault(wanted[recorded.calls[i].entry], {})[i] = files
            del pipe
    return outputs


def _measure_against_float64(recorded: _Recorded, result: ParityResult, entries: list[str], graph_outputs: dict,
                             source: dict, limits: Limits, progress: Progress) -> None:
    """Second half: the source model loaded again, in float64, runs the same calls on the same feeds;
    ``result.exact`` gets how far PyTorch fp32 and each graph are from it. A model whose code refuses
    float64 leaves the entries as judged against PyTorch fp32, with a note saying why."""
    calls = {i for per_call in graph_outputs.values() for i in per_call}
    # only the stages those calls run are cast (a decoder's call has no runner: the scheme's decoder stage)
    runs = {recorded.calls[i].runner or DecodingScheme.decoder_stage for i in calls}
    with progress.step(f"float64 check: {', '.join(sorted(runs))} in float64 on the same inputs (the export's error, "
                       "or the model's own rounding?)", total=len(calls) + 1) as advance:
        try:
            exact = reference_pipeline(load_source(source), limits, dtype="fp64", only=runs)
            advance()
            measure_exact(recorded.calls, exact, graph_outputs, result, advance)
        except Exception as e:  # noqa: BLE001 - any model code may refuse float64; the fp32 verdict stands
            _not_measured(entries, first_line(e), progress)
            result.exact.clear()
        finally:
            exact = None
            gc.collect()


def _not_measured(entries: list[str], why: str, progress: Progress) -> None:
    progress.note(f"{', '.join(entries)} not measured against PyTorch in float64: {why} (the entries stay as judged "
                  "against PyTorch fp32)")


def form_entry_name(entry: str, form: str) -> str:
    """The parity entry of a decoder form the onnxruntime target does not run: ``prefill (standard form)``."""
    return f"{entry} ({form} form)"


def _hf_reference(loaded):
    """The original model's own greedy generate, trailing EOS dropped (our loop does not emit it)."""
    import torch

    eos_ids = eos_token_ids(loaded)

    def run(prompt: str, ids: list[int], pixel_values, max_new_tokens: int) -> list[int]:
        if isinstance(pixel_values, dict):  # several preprocessed inputs by name (runtime.pipeline.Pixels)
            pixels = {name: torch.from_numpy(value) for name, value in pixel_values.items()}
        else:
            pixels = None if pixel_values is None else torch.from_numpy(pixel_values)
        tokens = loaded.adapter.reference_generate(loaded, torch.tensor([ids]), pixels, max_new_tokens, eos_ids,
                                                   prompt=prompt)
        for i, t in enumerate(tokens):
            if t in eos_ids:
                return tokens[:i]
        return tokens

    return run


def _parity_record(options: BuildOptions, result: ParityResult, policy: ParityPolicy, failures: list[str]) -> dict:
    """The manifest's parity section: the verdict, the failures, the outputs that passed only by the float64
    check, the greedy divergences passed as near ties, and a loosened (or tightened) fp32 gate, which verify
    then applies too."""
    record = {"passed": not failures, "report": "report.json", "failures": failures}
    by_float64 = policy.passed_by_float64(result.stages, result.exact)
    near_ties = policy.near_ties(result.stages, result.tokens)
    if by_float64:
        record["passed_by_float64"] = by_float64
    if near_ties:
        record["near_ties"] = near_ties
    if options.fp32_tolerance is not None:
        record["fp32_tolerance"] = {"atol": options.fp32_tolerance.atol, "rtol": options.fp32_tolerance.rtol}
    return record


def verify(build_dir: Path, options: BuildOptions | None = None, progress: Progress | None = None) -> BuildResult:
    """Re-run the parity report of an existing build against its source model (with the fp32 gate the
    build was judged by, unless ``options`` names another)."""
    options = options or BuildOptions()
    progress = progress or Progress()
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    recorded_gate = manifest.get("parity", {}).get("fp32_tolerance")
    if options.fp32_tolerance is None and recorded_gate:
        options = replace(options, fp32_tolerance=Tolerance(atol=recorded_gate["atol"], rtol=recorded_gate["rtol"]))
    check_memory(Path(manifest["source"]["path"]), progress)
    with progress.step(f"loading {manifest['source']['path']}") as advance:
        loaded = load_source(manifest["source"])
        advance()
    limits, adapter = Limits.from_dict(manifest["limits"]), loaded.adapter
    # refused before any parity work, as the build refuses it
    _check_samples_fit(options.samples or default_samples(limits.max_images), loaded,
                       adapter.prompt_layout(loaded), adapter.scheme(loaded), limits, options.parity_new_tokens)
    precisions = {stage: g["precision"] for stage, g in manifest["graphs"].items()}
    # every form of the decoder is checked again: the one the onnxruntime target runs, and the standard one
    opener = functools.partial(open_build, build_dir, threads=options.threads, check_hashes=False)
    reference = reference_pipeline(loaded, limits)
    scratch = build_dir / PARITY_SCRATCH
    shutil.rmtree(scratch, ignore_errors=True)  # left by a verify that was killed
    scratch.mkdir()
    try:
        recorded = _record_reference_and_free(loaded, reference, options, progress, scratch)
        result, policy, failures, _ = _judge(recorded, adapter, opener, precisions, options, progress,
                                             manifest["source"], other_forms(manifest))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # graphs edited or corrupted since the build are failures too, whatever their parity says
    failures += [f"{name} changed since the build (sha256 mismatch)" for name in verify_hashes(build_dir, manifest)]
    manifest["parity"] = _parity_record(options, result, policy, failures)
    write_report(build_dir, manifest, result, policy, failures)
    write_manifest(build_dir, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    return BuildResult(build_dir, manifest, failures)
