"""Where vlm-export keeps what is slow to make and safe to reuse (assembled demo model,
int8 calibration ranges): ``$VLM_EXPORT_CACHE`` or ``~/.cache/vlm-export``."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("VLM_EXPORT_CACHE") or Path.home() / ".cache" / "vlm-export")
