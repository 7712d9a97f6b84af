"""Deploying a rendered Triton model repository: Kubernetes manifests (``kubernetes.py``) that
run it on NVIDIA's Triton container, in an image derived from it (``image.py``,
``deploy/Dockerfile``) pinned to the Triton release this project is checked against
(``triton.py``)."""
from ..errors import DeployError
from .image import DEFAULT_GPU_IMAGE, DEFAULT_IMAGE, build_command, pinned_requirements, requirements_text
from .kubernetes import KubernetesOptions, image_for, kubernetes_objects, render_kubernetes
from .repository import RepositoryInfo, inspect_repository
from .triton import TRITON_BASE_IMAGE, TRITON_CONTAINER_RELEASE, TRITON_SERVER_VERSION

__all__ = ["DEFAULT_GPU_IMAGE", "DEFAULT_IMAGE", "DeployError", "KubernetesOptions", "RepositoryInfo",
           "TRITON_BASE_IMAGE", "TRITON_CONTAINER_RELEASE", "TRITON_SERVER_VERSION", "build_command", "image_for",
           "inspect_repository", "kubernetes_objects", "pinned_requirements", "render_kubernetes", "requirements_text"]
