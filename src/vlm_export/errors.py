"""One exception type per stage.

Every error carries a message that says what went wrong, on which file or input, and what to
do about it; the CLI prints ``str(err)`` on one line and exits non-zero, without a traceback.
"""
from __future__ import annotations

import re


class VlmExportError(Exception):
    """Base class: anything the CLI should report as one clear line."""

    exit_code = 1


class AdapterError(VlmExportError):
    """Unknown architecture, or a model whose structure the adapter cannot split."""


class ModelLoadError(VlmExportError):
    """Missing, unreadable or corrupt model files."""


class ExportError(VlmExportError):
    """torch -> ONNX capture or the ONNX checker failed."""


class ParityError(VlmExportError):
    """The exported graphs do not match the PyTorch reference within tolerance."""


class BuildError(VlmExportError):
    """The build folder cannot be written, or an existing build is in the way."""


class ManifestError(VlmExportError):
    """A build folder whose manifest is missing, unreadable or from an incompatible version."""


class InputError(VlmExportError):
    """A bad request at inference time: unreadable image, empty or over-long prompt, bad params."""


class RunnerError(VlmExportError):
    """A backend failed to load or run a graph. ``graph``: the graph file the backend refused, where
    one is known (a build falls back from a fused decoder form ONNX Runtime cannot load or run)."""

    def __init__(self, message: str, graph=None):
        super().__init__(message)
        self.graph = graph


class DatasetError(VlmExportError):
    """An evaluation data set that is missing or malformed."""


class RepositoryError(VlmExportError):
    """A Triton model repository that cannot be rendered or fails its schema checks."""


class DeployError(VlmExportError):
    """Deployment options that cannot work (a name Kubernetes refuses, a repository URI Triton
    cannot read, an image without vlm-export), or manifests that cannot be written."""


class ServeError(VlmExportError):
    """tritonserver could not be found, started or reached."""


class BusyError(VlmExportError):
    """The server's waiting queue is full: the request was refused at once; retry later."""


class RequestError(VlmExportError):
    """The server answered a request with an error (bad input, or the server could not serve it)."""


def first_line(err: BaseException) -> str:
    """``Type: the message's first line`` (terminal colour codes removed, as torch puts in some), for a
    one-line error that quotes a library's. A first line that only announces what follows ("... were
    found:") takes the next non-empty line with it, which holds the reason."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()]
    text = lines[0] if lines else ""
    if text.endswith(":"):
        text = " ".join([text, *[line for line in lines[1:] if line][:1]])
    return f"{type(err).__name__}: {text}"
