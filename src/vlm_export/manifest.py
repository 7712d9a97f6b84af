"""The build manifest: one JSON file written by the build and read by everything after it
(runtime, verify, Triton repository, engines). Limits that depend on others are derived in
``Limits``, never stored twice by hand."""
from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

from .errors import ManifestError

MANIFEST_NAME = "manifest.json"
FORMAT = "vlm-export-build"
# 2: stages and decoding scheme declared in the manifest. Graph forms (below) were added without a
# new version: they are additive (a reader that ignores them opens every stage's primary graph, as before)
VERSION = 2

#: the forms a stage's graph is shipped in: ``standard`` (the exporter's standard ONNX ops, or its
#: precision variant: what TensorRT reads) and ``fused`` (ONNX Runtime's contrib ops, export/fuse.py)
FORMS = ("standard", "fused")
#: the runtimes a build is made for, each taking one form per stage (manifest["targets"])
TARGETS = ("onnxruntime", "tensorrt")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import torch
    import transformers

    from . import __version__

    return {"vlm_export": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__}


def write_manifest(build_dir: Path, manifest: dict[str, Any]) -> Path:
    path = Path(build_dir) / MANIFEST_NAME
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION, **manifest}, indent=2))
    return path


def read_manifest(build_dir: Path) -> dict[str, Any]:
    build_dir = Path(build_dir)
    path = build_dir / MANIFEST_NAME
    if not path.is_file():
        hint = " (this is a failed build: read its report.md)" if build_dir.name.endswith(".failed") else ""
        raise ManifestError(f"{path} not found: {build_dir} is not a vlm-export build folder{hint}; "
                            "run `vlm-export build MODEL --out DIR` first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); rebuild") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path} is not a vlm-export manifest (a JSON {type(manifest).__name__}, not an object); rebuild")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ManifestError(f"{path} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
                            f"this vlm-export reads {FORMAT!r} version {VERSION}: rebuild with this version")
    _check_structure(manifest, path)
    stages = [s["name"] for s in manifest["stages"]]
    if not (build_dir / manifest["tokenizer"]).is_dir():
        raise ManifestError(f"{build_dir}: the tokenizer folder listed in the manifest ({manifest['tokenizer']}) is "
                            "missing; rebuild")
    image_text = manifest.get("image_text")
    if isinstance(image_text, dict) and not (build_dir / str(image_text.get("tokenizer"))).is_dir():
        raise ManifestError(f"{build_dir}: the image path's tokenizer folder listed in the manifest "
                            f"({image_text.get('tokenizer')}) is missing; rebuild")
    for stage in stages:
        graph = manifest["graphs"].get(stage)
        if not isinstance(graph, dict) or not isinstance(graph.get("file"), str) \
                or not (build_dir / graph["file"]).is_file():
            raise ManifestError(f"{build_dir}: the {stage} graph listed in the manifest is missing; rebuild")
        for form, entry in stage_forms(graph).items():
            if not (build_dir / entry["file"]).is_file():
                raise ManifestError(f"{build_dir}: the {form} form of the {stage} graph listed in the manifest "
                                    f"({entry['file']}) is missing; rebuild")
    return manifest


def is_build_folder(folder: Path) -> bool:
    """Whether ``folder`` is one a build wrote (any version, even with a damaged manifest), so that
    ``build --force`` may replace it."""
    try:
        return FORMAT in (Path(folder) / MANIFEST_NAME).read_text(errors="replace")[:4096]
    except OSError:
        return False


#: what every reader of a manifest indexes without looking first: key -> the JSON type it must have
_REQUIRED = {"stages": list, "graphs": dict, "scheme": dict, "prompt_layout": dict, "limits": dict,
             "tokenizer": str, "generation": dict}
#: limits every reader needs (``Limits.from_dict``); all limits are integers, these two positive
_REQUIRED_LIMITS = ("max_batch", "max_images", "max_sequence", "tokens_per_image")
_POSITIVE_LIMITS = ("max_batch", "max_sequence")


def _check_structure(manifest: dict[str, Any], path: Path) -> None:
    """A manifest edited or damaged by hand fails here with one line, not deep in a reader."""
    def bad(what: str) -> ManifestError:
        return ManifestError(f"{path} is damaged: {what}; rebuild")

    for key, kind in _REQUIRED.items():
        if not isinstance(manifest.get(key), kind):
            raise bad(f"{key!r} is {'missing' if key not in manifest else type(manifest[key]).__name__}, "
                      f"not a JSON {_JSON_NAMES[kind]}")
    if not manifest["stages"]:
        raise bad("it declares no stages")
    if not all(isinstance(stage, dict) and isinstance(stage.get("name"), str) for stage in manifest["stages"]):
        raise bad("a stage has no name")
    limits = manifest["limits"]
    for key in _REQUIRED_LIMITS:
        if key not in limits:
            raise bad(f"limits.{key} is missing")
    for key, value in limits.items():
        positive = key in _POSITIVE_LIMITS
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if positive else 0):
            raise bad(f"limits.{key} is {value!r}, not an integer >= {1 if positive else 0}")
    eos = manifest["generation"].get("eos_token_ids")
    if not isinstance(eos, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos):
        raise bad("generation.eos_token_ids is not a list of token ids")
    penalty = manifest["generation"].get("repetition_penalty", 1.0)
    if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not 0 < penalty <= 10:
        raise bad(f"generation.repetition_penalty is {penalty!r}, not a number in (0, 10]")
    for name in ("no_repeat_ngram_size", "min_new_tokens", "min_length"):
        count = manifest["generation"].get(name, 0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise bad(f"generation.{name} is {count!r}, not an integer >= 0")
    def token_ids(seq) -> bool:
        return isinstance(seq, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in seq)

    for name in ("suppress_tokens", "begin_suppress_tokens"):
        ids = manifest["generation"].get(name, [])
        if not token_ids(ids):
            raise bad(f"generation.{name} is {ids!r}, not a list of token ids")
    bad_words = manifest["generation"].get("bad_words_ids", [])
    if not isinstance(bad_words, list) or not all(seq and token_ids(seq) for seq in bad_words):
        raise bad(f"generation.bad_words_ids is {bad_words!r}, not a list of token id lists")
    bias = manifest["generation"].get("sequence_bias", [])
    if not isinstance(bias, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and pair[0] and token_ids(pair[0]) and isinstance(pair[1], (int, float))
            and not isinstance(pair[1], bool) for pair in bias):
        raise bad(f"generation.sequence_bias is {bias!r}, not a list of [token ids, bias] pairs")
    # the declarations every reader parses: a bad one is damage, said here (not a reader's KeyError later)
    from .contract import ImageText, Limits, PromptLayout, scheme_from_dict, stages_from_manifest

    for what, parse in (("stages", lambda: stages_from_manifest(manifest)),
                        ("scheme", lambda: scheme_from_dict(manifest["scheme"])),
                        ("prompt_layout", lambda: PromptLayout.from_dict(manifest["prompt_layout"])),
                        ("limits", lambda: Limits.from_dict(limits)),
                        ("image_text", lambda: ImageText.from_dict(manifest.get("image_text")))):
        try:
            parse()
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise bad(f"its {what} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
                from None
    for stage, graph in manifest["graphs"].items():
        if not isinstance(graph, dict):
            continue  # read_manifest names it as missing
        for entry in stage_forms(graph).values():
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                    or not isinstance(entry.get("sha256"), dict):
                raise bad(f"the {stage} graph's entry has no file name or no sha256 table")
            for rel in (entry["file"], *entry["sha256"]):
                if not _inside(rel):
                    raise bad(f"the {stage} graph names {rel!r}, a file outside the build folder")
    for rel in manifest.get("tokenizer_sha256") or {}:
        if not _inside(rel):
            raise bad(f"the tokenizer files name {rel!r}, a file outside the build folder")


def _inside(rel: str) -> bool:
    """Whether ``rel`` is a relative path that stays inside the folder it is read from."""
    path = Path(rel)
    return bool(rel) and not path.is_absolute() and ".." not in path.parts


_JSON_NAMES = {list: "list", dict: "object", str: "string"}


# ---------------------------------------------------------------- graph forms and targets
#
# manifest["graphs"][stage] is the stage's primary graph entry (file, precision, I/O, bytes, sha256):
# the standard form, or - when no target uses a standard form (a MatMulNBits decoder, which TensorRT
# cannot read) - the fused one, saying so in its "form". A second form shipped beside it is in
# "forms": {"fused": {file, precision, bytes, sha256, inputs, outputs, fusion, ...}}. "fusion" on a
# stage's entry (the decoder's, an image stage's with attention) records what the fusion pass did, or why
# there is no fused form (its "reason").
# manifest["targets"] says which form each target runs: {"onnxruntime": {stage: "fused"|"standard"},
# "tensorrt": {stage: "standard"|None}} (None: no form TensorRT reads). A manifest without these
# keys (builds before forms) is all-standard.

def stage_forms(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every form a stage's graph entry ships, by form name (the primary entry without its "forms")."""
    primary = {k: v for k, v in entry.items() if k != "forms"}
    return {entry.get("form", "standard"): primary, **(entry.get("forms") or {})}


def derive_targets(graphs: dict[str, dict[str, Any]]) -> dict[str, dict[str, str | None]]:
    """Which form each target runs per stage, from the forms shipped: ONNX Runtime the fused one
    where there is one, TensorRT the standard one - None where none is shipped or it is in ONNX
    Runtime's MatMulNBits weight form (which TensorRT does not read; ``--no-fuse`` w4/w8 builds)."""
    forms = {stage: stage_forms(entry) for stage, entry in graphs.items()}

    def tensorrt_reads(f: dict) -> bool:
        return "standard" in f and (f["standard"].get("variant") or {}).get("form") != "matmulnbits"

    return {"onnxruntime": {stage: "fused" if "fused" in f else "standard" for stage, f in forms.items()},
            "tensorrt": {stage: "standard" if tensorrt_reads(f) else None for stage, f in forms.items()}}


def targets(manifest: dict[str, Any]) -> dict[str, dict[str, str | None]]:
    """Target -> stage -> the form that target runs (manifest["targets"]; derived from the graphs for
    a manifest without it, which is all-standard)."""
    recorded, derived = manifest.get("targets") or {}, derive_targets(manifest["graphs"])
    return {target: dict(recorded.get(target) or derived[target]) for target in TARGETS}


def form_entry(manifest: dict[str, Any], stage: str, form: str) -> dict[str, Any]:
    """The graph entry a stage runs in ``form``: a form name (``standard``, ``fused``) or a target
    (``onnxruntime``, ``tensorrt``: the form that target runs). A stage with one form only serves
    ``fused`` with it (a projector has no fused form); ManifestError when ``standard`` or a
    target's form is not shipped."""
    entry = manifest["graphs"][stage]
    forms = stage_forms(entry)
    if form in TARGETS:
        chosen = targets(manifest)[form].get(stage)
        if chosen is None or chosen not in forms:
            why = (entry.get("fusion") or {}).get("tensorrt") or (
                "its standard graph is in ONNX Runtime's MatMulNBits weight form, which TensorRT does not read"
                if "standard" in forms else "no standard-op graph was shipped")
            raise ManifestError(f"the {stage} graph has no form for the {form} target ({why})")
        return forms[chosen]
    if form not in FORMS:
        raise ManifestError(f"unknown graph form {form!r}: choose one of {', '.join(FORMS + TARGETS)}")
    if form in forms:
        return forms[form]
    if form == "fused":
        return next(iter(forms.values()))
    raise ManifestError(f"the {stage} graph has no standard form in this build (only {', '.join(forms)}: "
                        f"{(entry.get('fusion') or {}).get('tensorrt') or 'no target uses it'})")


def gpu_form(manifest: dict[str, Any], stage: str) -> str:
    """The form ONNX Runtime runs ``stage`` in on a CUDA GPU: the standard form where the build
    ships one, else the onnxruntime target's. The fused forms are fp32 (fp16 builds ship none) and
    ONNX Runtime's CUDA GroupQueryAttention takes fp16/bf16 only (its OperatorKernels.md), so on a
    GPU a fused fp32 decoder would run its attention on the CPU provider, copying across every layer.
    A stage with a fused form only (w4/w8 quantized after fusing) keeps it: ``gpu_form_note`` says so."""
    forms = stage_forms(manifest["graphs"][stage])
    return "standard" if "standard" in forms else targets(manifest)["onnxruntime"][stage]


def gpu_form_note(manifest: dict[str, Any], stage: str) -> str | None:
    """One line for a stage whose GPU form is a fused fp32 graph (see ``gpu_form``), else None."""
    if gpu_form(manifest, stage) != "fused":
        return None
    return (f"{stage} ships only ONNX Runtime's fused form, whose fp32 GroupQueryAttention has no CUDA kernel: "
            "on a GPU those nodes run on the CPU provider; build with --no-fuse for a GPU deployment")


def served_entry(manifest: dict[str, Any], stage: str, target: str) -> dict[str, Any]:
    """The graph entry ``target`` serves for ``stage``: its form (``form_entry``), or - for a stage
    with no form that target reads (a MatMulNBits decoder for TensorRT) - the stage's primary
    graph, so the checkers report what that target cannot read instead of failing to look."""
    if targets(manifest)[target].get(stage) is None:
        return manifest["graphs"][stage]
    return form_entry(manifest, stage, target)


def verify_hashes(build_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Files whose content no longer matches the manifest (a missing file among them): every form's graphs,
    and the tokenizer folders' files (a lost chat template would change every prompt without a sign)."""
    tables = [entry["sha256"] for graph in manifest["graphs"].values() for entry in stage_forms(graph).values()]
    bad = []
    for rel, digest in (item for table in (*tables, manifest.get("tokenizer_sha256") or {}) for item in table.items()):
        path = Path(build_dir) / rel
        if rel not in bad and (not path.is_file() or sha256_file(path) != digest):
            bad.append(rel)
    return bad


def folder_hashes(root: Path, folders: list[str]) -> dict[str, str]:
    """sha256 of every file under ``folders`` (relative to ``root``), keyed by its path relative to ``root``."""
    return {str(p.relative_to(root)): sha256_file(p) for folder in folders
            for p in sorted((Path(root) / folder).rglob("*")) if p.is_file()}


HASH_CHECK_HINT = "--no-hash-check skips this check (e.g. for a huge build you trust)"


def check_hashes(build_dir: Path, manifest: dict[str, Any]) -> None:
    """ManifestError naming every graph or tokenizer file that changed since the build (flipped bytes, a
    partial copy, a deleted chat template): such a build would answer differently without any other sign."""
    bad = verify_hashes(build_dir, manifest)
    if bad:
        raise ManifestError(f"{build_dir}: {', '.join(bad)} changed since the build (sha256 differs from the "
                            f"manifest's, or missing); copy the build again or rebuild ({HASH_CHECK_HINT})")
