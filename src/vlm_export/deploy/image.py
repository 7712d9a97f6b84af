"""The image the Kubernetes manifests run: NVIDIA's Triton container plus vlm-export.

Every repository that ``vlm-export repository`` renders has python models - ``vlm`` (the
generation loop) and ``preprocess`` always, and the graph models too for the python target -
and they import ``vlm_export``, ``transformers``, ``onnxruntime`` and ``numpy<2`` (numpy 2
corrupts tensors in the stub; ../shared/env-notes.md). NVIDIA's container has none of them.

Two ways to get them there were weighed:

* a packed environment (conda-pack, Triton's documented ``EXECUTION_ENV_PATH``): every python
  model's config.pbtxt must then name the tarball, so the repository ``vlm-export repository``
  wrote (portable on purpose: no EXECUTION_ENV_PATH) would have to be rewritten for the cluster;
  the backend unpacks the archive on each model load, per model, into the pod's disk; and the
  stub is still the container's Python 3.10 one, which cannot run these pins (transformers 5.24,
  onnxruntime 1.32 and pillow 13 need Python >= 3.11), so a custom stub is needed anyway.
* a derived image (chosen, ``deploy/Dockerfile``): FROM the pinned Triton image, a Python 3.11
  virtual environment with the exact versions the tests ran with (``deploy/requirements.txt``,
  written by :func:`requirements_text` from this environment), vlm-export itself, and the
  python-backend stub for 3.11 that NVIDIA built from python_backend r24.10 for this very release
  (shipped in the nvidia-pytriton wheel; this project's tests run that stub). The repository stays
  as rendered, the pod starts without unpacking anything, the image is built, scanned and cached
  once, and the OpenAI-compatible sidecar runs from the same image.

Python models that run their graphs on a GPU (the python target, or the ``vlm`` model's own decoder,
rendered with ``repository --device cuda``: KIND_GPU python instances) need onnxruntime-gpu in place of
the CPU wheel; the same Dockerfile builds that image with ``--build-arg ONNXRUNTIME_GPU=VERSION``
(:func:`build_command`), and ``deploy kubernetes`` defaults to it for such a repository. Its version is
the newest onnxruntime-gpu built for CUDA 12, the CUDA of the Triton container (``deploy.triton``:
12.6): 1.27 and later are CUDA 13 builds (their ``[cuda]`` extra pulls ``nvidia-cuda-runtime-cu13``),
whose CUDA and TensorRT providers cannot load their libraries there - the sessions would fall back to
the CPU. The Dockerfile refuses an image whose CUDA provider misses a library. That onnxruntime-gpu
runs the standard graphs (what a GPU gets), not the fused forms, which need ONNX Runtime 1.32. The
Triton ``onnxruntime`` and ``tensorrt`` targets need neither, since Triton's own backends run those graphs.

``torch`` is left out: the served models never need it (transformers imports it only when it is
installed), and a CUDA build of it would add several GB to the image.

``python -m vlm_export.deploy`` prints the requirements file (regenerate it with
``python -m vlm_export.deploy > deploy/requirements.txt`` after changing the venv).
"""
from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, distribution

from .. import __version__
from ..errors import DeployError
from .triton import TRITON_CONTAINER_RELEASE

#: what the python models and the OpenAI sidecar import (their dependencies follow): jinja2 is an
#: optional dependency of transformers that its chat templates need (found by serving a repository
#: from an environment with only these); fastapi and uvicorn serve the OpenAI-compatible endpoint
#: (serve/openai_api.py), tritonclient[grpc] is how it reaches Triton
SERVING_ROOTS = ("fastapi", "jinja2", "numpy", "onnxruntime", "pillow", "transformers", "tritonclient[grpc]",
                 "uvicorn")
#: never in the image: the served models do not use them (see the module docstring)
EXCLUDED = ("torch",)
#: the derived image's default name; push it to a registry and pass --image REGISTRY/NAME:TAG
DEFAULT_IMAGE = f"vlm-export-triton:{__version__}-{TRITON_CONTAINER_RELEASE}"
#: the GPU image (python models on KIND_GPU instances): the same Dockerfile with onnxruntime-gpu
ONNXRUNTIME_GPU = "1.26.0"  # the newest CUDA 12 build (see the module docstring)
DEFAULT_GPU_IMAGE = f"{DEFAULT_IMAGE}-gpu"
DOCKERFILE = "deploy/Dockerfile"
REQUIREMENTS = "deploy/requirements.txt"


def default_image(python_on_gpu: bool) -> str:
    """The image a repository's pods run by default: the GPU one where python models run graphs on a GPU."""
    return DEFAULT_GPU_IMAGE if python_on_gpu else DEFAULT_IMAGE


def build_command(image: str, python_on_gpu: bool) -> str:
    """How to build ``image`` from the repository root (onnxruntime-gpu in it where ``python_on_gpu``)."""
    arg = f"--build-arg ONNXRUNTIME_GPU={ONNXRUNTIME_GPU} " if python_on_gpu else ""
    return f"docker build -f {DOCKERFILE} {arg}-t {image} ."


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return canonicalize_name(name)


def pinned_requirements(roots: tuple[str, ...] = SERVING_ROOTS) -> list[str]:
    """``name==version`` for ``roots`` and everything they need, as installed in this environment
    (markers evaluated here: Linux, this Python), sorted by name."""
    from packaging.requirements import Requirement

    pins: dict[str, str] = {}
    done: set[tuple[str, str]] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = _canonical(req.name)
        if name in EXCLUDED:
            continue
        extras = sorted(req.extras)
        key = (name, ",".join(extras))
        if key in done:
            continue
        done.add(key)
        try:
            dist = distribution(req.name)
        except PackageNotFoundError:
            raise DeployError(f"{req.name} is not installed here, so its version cannot be pinned for the image; "
                              "install vlm-export with its serve extra first") from None
        pins[name] = dist.version
        for text in dist.requires or []:
            dep = Requirement(text)
            envs = [{"extra": e} for e in extras] or [{"extra": ""}]
            if dep.marker is None or any(dep.marker.evaluate(env) for env in envs):
                todo.append(dep)
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def requirements_text() -> str:
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    lines = ["# The python models' and the OpenAI sidecar's dependencies at the exact versions the tests ran with",
             f"# (Python {py}); written by `python -m vlm_export.deploy`, checked by tests/test_deploy.py.",
             "# vlm-export itself is installed with --no-deps after these (deploy/Dockerfile). No torch: see",
             "# src/vlm_export/deploy/image.py.",
             *pinned_requirements()]
    return "\n".join(lines) + "\n"
