"""Shared fixtures: tiny random models (built from configs, no network) and their builds."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import make_tiny_blip2, make_tiny_instructblip, make_tiny_llava, make_tiny_prefix  # noqa: E402

# name -> (maker, kwargs): one per architecture family and text family the tests cover
TINY_MODELS = {
    "llava-llama": (make_tiny_llava, {"family": "llama"}),
    "llava-qwen2-full-multilayer": (make_tiny_llava, {"family": "qwen2", "strategy": "full", "feature_layer": [-2, -1]}),
    "llava-mistral": (make_tiny_llava, {"family": "mistral"}),
    "prefix-llama": (make_tiny_prefix, {"family": "llama"}),
    "blip2-opt": (make_tiny_blip2, {"family": "opt"}),
    "blip2-llama": (make_tiny_blip2, {"family": "llama"}),
    "instructblip-llama": (make_tiny_instructblip, {}),
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            maker, kwargs = TINY_MODELS[name]
            made[name] = maker(tmp_path_factory.mktemp(name), **kwargs)
        return made[name]

    return get


@pytest.fixture(scope="session")
def tiny_build(tiny_model_dir, tmp_path_factory):
    """Builds (export + parity) of the tiny models, made once per session."""
    from vlm_export.build import BuildOptions, build

    built = {}

    def get(name: str):
        if name not in built:
            out = tmp_path_factory.mktemp("builds") / name
            built[name] = build(tiny_model_dir(name), out, BuildOptions(max_sequence=256))
        return built[name]

    return get


def wait_for(predicate, seconds: float = 20.0) -> bool:
    """Poll ``predicate`` every 0.1 s until it holds (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False
