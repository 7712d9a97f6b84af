"""Where vlm-export keeps what is slow to make and safe to reuse (assembled demo model, int8
calibration ranges, the Triton python-backend folder): ``$VLM_EXPORT_CACHE``, else
``$XDG_CACHE_HOME/vlm-export``, else ``~/.cache/vlm-export``."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    if os.environ.get("VLM_EXPORT_CACHE"):
        return Path(os.environ["VLM_EXPORT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlm-export"
