"""Registry of architecture adapters.

Adding an architecture = one file in this folder with a :class:`VLMAdapter` subclass decorated
with :func:`register`, plus one import line at the bottom of this file (or ``register`` called
from your own code before ``vlm_export.build``).
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import AdapterError, ModelLoadError
from .base import LoadedModel, Stage, VLMAdapter

_REGISTRY: dict[str, type[VLMAdapter]] = {}


def register(cls: type[VLMAdapter]) -> type[VLMAdapter]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"an adapter named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> dict[str, type[VLMAdapter]]:
    return dict(_REGISTRY)


def supported_summary() -> str:
    return ", ".join(
        f"{name} (model_type {'/'.join(cls.model_types)})" for name, cls in sorted(_REGISTRY.items())
    )


def get_adapter(name: str) -> VLMAdapter:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise AdapterError(f"unknown adapter {name!r}; supported: {supported_summary()}") from None


def model_class_by_type(path: Path, adapter: str, classes: dict[str, str]):
    """The transformers class (named in ``classes`` by model type) for the folder at ``path``, for an adapter
    that takes several model types; AdapterError naming them for another."""
    import transformers

    model_type = read_config(path).get("model_type")
    if model_type not in classes:
        raise AdapterError(f"the {adapter} adapter takes model types {', '.join(classes)}; {path} is {model_type!r}")
    return getattr(transformers, classes[model_type])


def read_config(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model folder {path} does not exist")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise ModelLoadError(f"{cfg} is missing: pass a Hugging Face model folder (save_pretrained output)")
    try:
        return json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{cfg} is not valid JSON ({e}); re-save the model folder") from None


def adapter_for(path: Path, name: str | None = None) -> VLMAdapter:
    """The adapter named ``name``, or the one whose ``model_types`` match the folder's config (and
    that ``handles`` it, where several share a model type)."""
    if name:
        return get_adapter(name)
    config = read_config(path)
    model_type = config.get("model_type")
    typed = [cls for cls in _REGISTRY.values() if model_type in cls.model_types]
    for cls in typed:
        if cls.handles(config):
            return cls()
    if typed:  # its model type is known, this variant of it is not (InstructBLIP with a T5 LM)
        raise AdapterError(f"model_type {model_type!r} in {Path(path) / 'config.json'} is handled by "
                           f"{', '.join(c.name for c in typed)}, but not this variant of it: "
                           f"{'; '.join(c.refusal(config) for c in typed)}")
    raise AdapterError(
        f"no adapter for model_type {model_type!r} in {Path(path) / 'config.json'}; "
        f"supported: {supported_summary()} (or pass --adapter, or register your own: see docs/adapters.md)"
    )


# built-in adapters register themselves on import
from . import (aya_vision, blip2, blip2_t5, cosmos3_edge, deepseek_vl, exaone4_5, florence2, gemma3, gemma4, glm4v,  # noqa: E402,F401
               got_ocr2, hunyuan_vl, idefics3, instructblip, internvl, lfm3_vl, lighton_ocr, llava, llava_next, llava_next_video,
               llava_onevision, llava_onevision1_5, minicpm_v, mistral3, mllama, paddleocr_vl, paligemma, pixtral, prefix,
               qianfan_ocr, qwen2_vl, qwen3_5, qwen3_vl, vipllava)

__all__ = [
    "LoadedModel", "Stage", "VLMAdapter",
    "register", "registered", "get_adapter", "adapter_for", "read_config", "supported_summary",
]
