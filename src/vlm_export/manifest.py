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
VERSION = 2  # 2: stages and decoding scheme declared in the manifest


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
    stages = [s.get("name") for s in manifest.get("stages") or []]
    if not stages:
        raise ManifestError(f"{path} declares no stages; rebuild")
    for stage in stages:
        graph = manifest.get("graphs", {}).get(stage)
        if not graph or not (build_dir / graph["file"]).is_file():
            raise ManifestError(f"{build_dir}: the {stage} graph listed in the manifest is missing; rebuild")
    return manifest


def verify_hashes(build_dir: Path, manifest: dict[str, Any]) -> list[str]:
    """Files whose content no longer matches the manifest (a missing file among them)."""
    bad = []
    for stage, graph in manifest["graphs"].items():
        for rel, digest in graph["sha256"].items():
            path = Path(build_dir) / rel
            if not path.is_file() or sha256_file(path) != digest:
                bad.append(rel)
    return bad


HASH_CHECK_HINT = "--no-hash-check skips this check (e.g. for a huge build you trust)"


def check_hashes(build_dir: Path, manifest: dict[str, Any]) -> None:
    """ManifestError naming every graph file that changed since the build (flipped bytes, a
    partial copy): such a build would answer differently without any other sign."""
    bad = verify_hashes(build_dir, manifest)
    if bad:
        raise ManifestError(f"{build_dir}: {', '.join(bad)} changed since the build (sha256 differs from the "
                            f"manifest's); copy the build again or rebuild ({HASH_CHECK_HINT})")
