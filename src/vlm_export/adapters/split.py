"""An adapter's stages, checked: the one entry point from a loaded model to its split modules."""
from __future__ import annotations

from ..contract import check_chain, check_image_text
from ..errors import AdapterError
from .base import LoadedModel, Stage


def split(loaded: LoadedModel) -> list[Stage]:
    """The adapter's stages, checked to chain (AdapterError naming the adapter otherwise)."""
    stages = loaded.adapter.stages(loaded)
    scheme = loaded.adapter.scheme(loaded)
    try:
        check_chain([s.spec for s in stages], scheme.image_input.name if scheme.image_input else "")
    except ValueError as e:
        raise AdapterError(f"the {loaded.adapter.name} adapter declares stages that do not chain: {e}") from None
    text = loaded.adapter.image_text(loaded)
    try:
        check_image_text([s.spec for s in stages], text)
    except ValueError as e:
        raise AdapterError(f"the {loaded.adapter.name} adapter: {e}") from None
    if text and loaded.image_text_tokenizer is None:
        raise AdapterError(f"the {loaded.adapter.name} adapter declares image_text but loaded no tokenizer for it")
    return stages
