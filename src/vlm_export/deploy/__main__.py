"""``python -m vlm_export.deploy > deploy/requirements.txt``: the derived image's pinned
requirements, from this environment (see image.py)."""
import sys

from .image import requirements_text

sys.stdout.write(requirements_text())
