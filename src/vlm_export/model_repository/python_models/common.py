"""Helpers shared by the Triton python models (imported from the installed vlm_export)."""
from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF")


def model_dirs(args: dict) -> tuple[Path, Path, dict]:
    """(model folder, version folder, parsed config) from the python backend's initialize args."""
    model_dir = Path(args["model_repository"])
    config = json.loads(args["model_config"])
    return model_dir, model_dir / args["model_version"], config


def instance_device(args: dict) -> str:
    """Where this instance runs its graphs: ``cuda:N`` for a KIND_GPU instance (the python backend
    passes the instance's kind and GPU), else ``cpu``. ONNX Runtime without GPU providers falls back
    to the CPU with a one-line notice (``runtime.devices``)."""
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{int(args.get('model_instance_device_id') or 0)}"
    return "cpu"


def parameter(config: dict, key: str, default: str = "") -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


def image_payload(data: bytes) -> bytes:
    """Encoded image bytes from raw bytes, base64 or a data URL (JSON clients cannot send raw bytes)."""
    if data.startswith(b"data:"):
        data = data.split(b",", 1)[-1]
    elif data.startswith(IMAGE_MAGIC):
        return data
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return data  # not base64 either: let the image decoder say what is wrong


def image_limits(config: dict):
    """The repository's image limits (parameters max_image_pixels / max_image_bytes)."""
    from vlm_export.runtime.images import ImageLimits

    return ImageLimits(int(parameter(config, "max_image_pixels", str(ImageLimits.max_pixels))),
                       int(parameter(config, "max_image_bytes", str(ImageLimits.max_bytes))))


def check_files(folder: Path, config: dict) -> None:
    """Refuse to load graph files whose sha256 differs from the build's (the ``sha256`` parameter
    the renderer wrote): a damaged copy would answer differently without any other sign."""
    from vlm_export.manifest import sha256_file

    expected = json.loads(parameter(config, "sha256", "{}"))
    bad = [name for name, digest in expected.items() if sha256_file(folder / name) != digest]
    if bad:
        raise RuntimeError(f"{', '.join(bad)} in {folder} differ from the build's (sha256); render the repository "
                           "again from an intact build (vlm-export repository BUILD --out REPO --force)")
