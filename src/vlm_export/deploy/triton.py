"""Which Triton this project is checked against, and NVIDIA's container of that release.

The tests run the ``tritonserver`` shipped in the ``nvidia-pytriton`` wheel (pinned in the
``serve`` extra). That binary answers ``GET /v2`` with its version (checked by
tests/test_deploy.py); NVIDIA publishes each Triton release as a monthly NGC container whose
tag is the year and month (YY.MM), not the server version, so the map below is what ties the
two. Sources: nvidia-pytriton 0.7.0's CHANGELOG ("Version of Triton Inference Server embedded
in wheel: 2.51.0") and its Makefile, which extracts the wheel's server from
``nvcr.io/nvidia/tritonserver:24.10-pyt-python-py3`` (TRITONSERVER_IMAGE_VERSION ?= 24.10);
NVIDIA's release notes for 24.10 (docs.nvidia.com/deeplearning/triton-inference-server/
release-notes/rel-24-10.html: CUDA 12.6.2, the CUDA runtime the wheel bundles,
libcudart 12.6.77).

24.10 is an Ubuntu 22.04 image whose system Python is 3.10 (the python backend's stub there is
built for 3.10); the versions this project pins need Python 3.11 (transformers 5.24,
onnxruntime 1.32 and pillow 13 declare ``Requires-Python >=3.11``), which is why the derived
image (deploy/Dockerfile) brings its own Python 3.11 and the 3.11 stub NVIDIA built for this
very release (shipped in the same nvidia-pytriton wheel).
"""
from __future__ import annotations

#: nvidia-pytriton release -> the Triton server version its wheel embeds
PYTRITON_SERVER = {"0.7.0": "2.51.0"}
#: Triton server version -> NGC container release (YY.MM)
SERVER_CONTAINER = {"2.51.0": "24.10"}
#: NGC container release -> the TensorRT and CUDA in it (release notes of 24.10: TensorRT 10.5.0.18, CUDA
#: 12.6.2): the tensorrt target's plans and the GPU image's onnxruntime-gpu must be built for these
CONTAINER_TENSORRT = {"24.10": "10.5.0"}
CONTAINER_CUDA = {"24.10": "12.6"}

PYTRITON_VERSION = "0.7.0"  # the `serve` extra's pin (pyproject.toml)
TRITON_SERVER_VERSION = PYTRITON_SERVER[PYTRITON_VERSION]
TRITON_CONTAINER_RELEASE = SERVER_CONTAINER[TRITON_SERVER_VERSION]
#: NVIDIA's image the derived image is built FROM (deploy/Dockerfile)
TRITON_BASE_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_CONTAINER_RELEASE}-py3"
#: the Python of the derived image's environment: the stub for it comes from nvidia-pytriton
IMAGE_PYTHON = "3.11"


def container_tag(server_version: str) -> str:
    """``nvcr.io/nvidia/tritonserver:<YY.MM>-py3`` for a Triton server version we know."""
    try:
        return f"nvcr.io/nvidia/tritonserver:{SERVER_CONTAINER[server_version]}-py3"
    except KeyError:
        raise ValueError(f"no NGC container release recorded for Triton {server_version}; "
                         f"known: {', '.join(sorted(SERVER_CONTAINER))}") from None
