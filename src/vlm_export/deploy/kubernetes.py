"""Kubernetes manifests that run a rendered model repository on NVIDIA's Triton container.

``render_kubernetes(repo, out, options)`` reads the repository (``repository.py``: which target,
whether it needs a GPU) and writes, atomically, one YAML file per object:

``deployment.yaml``
    One pod per replica: ``triton`` (the derived image, ``image.py``; ``tritonserver
    --model-repository`` on a PersistentVolumeClaim mounted read-only, or on an ``s3://``,
    ``gs://`` or ``as://`` URI that Triton reads itself), probed on Triton's own health endpoints
    (startup ``/v2/health/live``, readiness ``/v2/health/ready``, port 8000) and for liveness by
    ``vlm-export health`` (the live endpoint and every python-backend stub alive: Triton never
    restarts a dead stub and stays "ready" while its model fails every request), with
    CPU/memory requests and limits, ``nvidia.com/gpu`` only when the repository needs a GPU (the
    tensorrt target), and a memory-backed ``/dev/shm`` (the python backend moves every tensor
    through shared memory; a pod's default 64 MiB is too small); and ``openai``, the
    OpenAI-compatible endpoint talking to Triton's gRPC port inside the pod.
    Prometheus scrape annotations point at the metrics port 8002.
``service.yaml``
    HTTP 8000, gRPC 8001, metrics 8002 and the OpenAI port (9000 by default).
``hpa.yaml``
    ``autoscaling/v2`` on the Deployment: CPU utilisation by default, plus, if asked, the
    ``vlm_queue_length`` gauge the vlm model exports (needs a custom-metrics adapter).

Every object is built as a dict and dumped with PyYAML: there is no template to fill. The
manifests are checked offline against Kubernetes' schemas by the tests; they have not been
applied to a cluster here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from .. import __version__
from ..atomic import atomic_folder
from ..engines.tensorrt import triton_server_args
from ..errors import DeployError
from ..runtime.devices import TRT_CACHE_ENV
from .image import DOCKERFILE, default_image
from .repository import RepositoryInfo, inspect_repository
from .triton import TRITON_CONTAINER_RELEASE, TRITON_SERVER_VERSION

HTTP_PORT, GRPC_PORT, METRICS_PORT = 8000, 8001, 8002
MODELS_MOUNT = "/models"
#: where GPU python models cache TensorRT's engines (an emptyDir: the repository is mounted read-only)
TRT_CACHE_MOUNT = "/var/cache/vlm-export/trt"
GCS_KEY_DIR = "/var/run/secrets/vlm-export/gcs"
GCS_KEY_FILE = "credentials.json"  # the key the Secret holds for gs:// repositories
#: URI schemes Triton reads itself with --model-repository (Triton's docs: model_repository.md)
URI_SCHEMES = {"s3": "Amazon S3 (or S3-compatible: s3://host:port/bucket/path)", "gs": "Google Cloud Storage",
               "as": "Azure Storage (as://ACCOUNT/CONTAINER/PATH)"}
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
PULL_POLICIES = ("IfNotPresent", "Always", "Never")
FILES = ("deployment.yaml", "service.yaml", "hpa.yaml")
HEADER_START = "# Written by vlm-export"
ANNOTATION = "vlm-export"  # prefix of the annotations that record what was deployed

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # RFC 1035: Service names
_DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # namespaces
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")  # claims, secrets, service accounts
_CPU = re.compile(r"^(\d+(\.\d+)?|\d+m)$")
_MEMORY = re.compile(r"^\d+(\.\d+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")


def _default_openai_command(port: int) -> tuple[str, ...]:
    return ("vlm-export", "serve-openai", "--triton-grpc", f"localhost:{GRPC_PORT}", "--host", "0.0.0.0",
            "--port", str(port))


@dataclass(frozen=True)
class KubernetesOptions:
    name: str = "vlm"  # of the Deployment, Service and HPA (an RFC 1035 label)
    namespace: str | None = None  # None: none written, kubectl's current namespace applies
    # the derived image (deploy/Dockerfile), pushed where the cluster pulls from; None: image.default_image
    # for the repository (the onnxruntime-gpu build where python models run on a GPU)
    image: str | None = None
    image_pull_policy: str = "IfNotPresent"
    image_pull_secret: str | None = None
    # where Triton reads the repository: exactly one of the two
    pvc: str | None = None  # an existing PersistentVolumeClaim holding the rendered repository
    pvc_subpath: str = ""  # the repository's folder inside the claim ("" = its root)
    repository_uri: str | None = None  # s3://... | gs://... | as://...: Triton downloads it at start
    credentials_secret: str | None = None  # for a URI: envFrom for s3/as, a mounted key file for gs
    service_account: str | None = None  # e.g. one bound to cloud IAM (IRSA, Workload Identity)
    # replicas and autoscaling
    replicas: int | None = None  # written into the Deployment only if given (the HPA owns the count)
    min_replicas: int = 1
    max_replicas: int = 4
    target_cpu_utilization: int = 70  # percent of the pod's CPU request
    target_queue_length: int | None = None  # also scale on vlm_queue_length per pod (custom-metrics adapter)
    # resources of the triton container
    cpu: str = "4"
    memory: str = "16Gi"
    cpu_limit: str | None = None  # None: same as cpu
    memory_limit: str | None = None  # None: same as memory
    gpus: int | None = None  # nvidia.com/gpu per pod for a repository that needs a GPU (None: 1); refused for others
    shm_size: str = "1Gi"  # memory-backed /dev/shm (counts against the memory limit)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    startup_timeout_s: int = 900  # how long model loading may take before the startup probe gives up
    # the OpenAI-compatible sidecar
    openai: bool = True
    openai_port: int = 9000
    openai_command: tuple[str, ...] | None = None  # None: vlm-export serve-openai --triton-grpc localhost:8001 ...
    openai_health_path: str | None = "/v1/models"  # probed with GET; None: a TCP check of the port
    openai_cpu: str = "1"
    openai_memory: str = "2Gi"
    service_type: str = "ClusterIP"

    def __post_init__(self) -> None:
        if len(self.name) > 63 or not _DNS_LABEL.match(self.name):
            raise DeployError(f"name {self.name!r} is not a valid Kubernetes Service name: lowercase letters, digits "
                              "and '-', starting with a letter, at most 63 characters")
        if self.namespace is not None and (len(self.namespace) > 63 or not _DNS_1123_LABEL.match(self.namespace)):
            raise DeployError(f"namespace {self.namespace!r} is not a valid namespace: lowercase letters, digits "
                              "and '-', at most 63 characters")
        for what, value in (("pvc", self.pvc), ("credentials secret", self.credentials_secret),
                            ("service account", self.service_account), ("image pull secret", self.image_pull_secret)):
            if value is not None and (len(value) > 253 or not _DNS_SUBDOMAIN.match(value)):
                raise DeployError(f"{what} {value!r} is not a valid Kubernetes object name")
        if (self.pvc is None) == (self.repository_uri is None):
            raise DeployError("say where Triton reads the repository: either a PersistentVolumeClaim (--pvc NAME) "
                              "or an object-storage URI (--repository-uri s3://|gs://|as://...), not both")
        if self.repository_uri is not None:
            check_repository_uri(self.repository_uri)
        elif self.credentials_secret is not None:
            raise DeployError("--credentials-secret is for object storage (--repository-uri); a PVC needs none")
        if self.pvc_subpath.startswith("/") or ".." in Path(self.pvc_subpath).parts:
            raise DeployError(f"pvc subpath {self.pvc_subpath!r} must be relative, inside the claim")
        if self.image is not None:
            check_image(self.image)
        if self.image_pull_policy not in PULL_POLICIES:
            raise DeployError(f"image pull policy {self.image_pull_policy!r}: choose one of {', '.join(PULL_POLICIES)}")
        if self.service_type not in SERVICE_TYPES:
            raise DeployError(f"service type {self.service_type!r}: choose one of {', '.join(SERVICE_TYPES)}")
        if self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            raise DeployError(f"replicas: need 1 <= min ({self.min_replicas}) <= max ({self.max_replicas})")
        if self.replicas is not None and not self.min_replicas <= self.replicas <= self.max_replicas:
            raise DeployError(f"replicas {self.replicas} is outside the autoscaler's range "
                              f"{self.min_replicas}..{self.max_replicas}")
        if self.target_cpu_utilization < 1 or (self.target_queue_length is not None and self.target_queue_length < 1):
            raise DeployError("autoscaling targets must be at least 1")
        if (self.gpus is not None and self.gpus < 1) or self.startup_timeout_s < 10:
            raise DeployError("gpus must be at least 1 and the startup timeout at least 10 s")
        for what, value in (("cpu", self.cpu), ("cpu limit", self.cpu_limit), ("openai cpu", self.openai_cpu)):
            if value is not None and not _CPU.match(value):
                raise DeployError(f"{what} {value!r} is not a CPU quantity (e.g. 4, 0.5, 500m)")
        for what, value in (("memory", self.memory), ("memory limit", self.memory_limit),
                            ("openai memory", self.openai_memory), ("shm size", self.shm_size)):
            if value is not None and not _MEMORY.match(value):
                raise DeployError(f"{what} {value!r} is not a memory quantity (e.g. 16Gi, 512Mi)")
        if not 1 <= self.openai_port <= 65535 or self.openai_port in (HTTP_PORT, GRPC_PORT, METRICS_PORT):
            raise DeployError(f"openai port {self.openai_port} must be 1..65535 and not one of Triton's "
                              f"({HTTP_PORT}, {GRPC_PORT}, {METRICS_PORT})")
        if self.openai_health_path is not None and not self.openai_health_path.startswith("/"):
            raise DeployError(f"openai health path {self.openai_health_path!r} must start with /")
        if self.openai_command is not None and not self.openai_command:
            raise DeployError("the openai command is empty; leave it unset for the default or pass openai=False")

    @property
    def resolved_openai_command(self) -> tuple[str, ...]:
        return tuple(self.openai_command) if self.openai_command else _default_openai_command(self.openai_port)


def check_repository_uri(uri: str) -> str:
    """The scheme of a URI Triton reads itself; DeployError naming the accepted ones otherwise."""
    scheme, sep, rest = uri.partition("://")
    accepted = "; ".join(f"{s}:// ({what})" for s, what in URI_SCHEMES.items())
    if scheme == "az":
        raise DeployError(f"repository URI {uri!r}: Triton reads Azure Storage as as://ACCOUNT/CONTAINER/PATH, "
                          "not az://; write it that way")
    if not sep or scheme not in URI_SCHEMES:
        raise DeployError(f"repository URI {uri!r} is not one Triton reads itself; use {accepted}, "
                          "or a PersistentVolumeClaim (--pvc) for anything else")
    parts = [p for p in rest.split("/") if p]
    if not parts or (scheme == "as" and len(parts) < 2) or any(c.isspace() for c in uri):
        raise DeployError(f"repository URI {uri!r} names no {'account and container' if scheme == 'as' else 'bucket'}"
                          f"; e.g. {scheme}://{'ACCOUNT/CONTAINER' if scheme == 'as' else 'BUCKET'}/path/to/repository")
    return scheme


def check_image(image: str) -> None:
    """An image pinned to a tag or digest, that is not NVIDIA's bare Triton image."""
    last = image.rsplit("/", 1)[-1]
    if not image or any(c.isspace() for c in image):
        raise DeployError(f"image {image!r} is not an image reference")
    if "@" not in last and (":" not in last or last.rsplit(":", 1)[1] == "latest"):
        raise DeployError(f"image {image!r} is not pinned: give a version tag or a digest (not latest), so every "
                          "replica runs the same server")
    if image.split("@")[0].rsplit(":", 1)[0] in ("nvcr.io/nvidia/tritonserver",):
        raise DeployError(f"image {image!r} is NVIDIA's bare Triton image, which lacks vlm-export for the "
                          f"repository's python models; build {DOCKERFILE} and pass that image")


# --------------------------------------------------------------------------- the objects


def _labels(options: KubernetesOptions) -> dict[str, str]:
    return {"app.kubernetes.io/name": "vlm-export", "app.kubernetes.io/instance": options.name}


def _metadata(options: KubernetesOptions, **extra) -> dict:
    meta = {"name": options.name}
    if options.namespace:
        meta["namespace"] = options.namespace
    meta["labels"] = {**_labels(options), "app.kubernetes.io/version": __version__,
                      "app.kubernetes.io/managed-by": "vlm-export"}
    return {**meta, **extra}


def _prometheus() -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT), "prometheus.io/path": "/metrics"}


def _repository_location(info: RepositoryInfo, options: KubernetesOptions) -> str:
    if options.repository_uri:
        return options.repository_uri.rstrip("/")
    return f"{MODELS_MOUNT}/{options.pvc_subpath}".rstrip("/") if options.pvc_subpath else MODELS_MOUNT


def _triton_container(info: RepositoryInfo, options: KubernetesOptions) -> dict:
    requests = {"cpu": options.cpu, "memory": options.memory}
    limits = {"cpu": options.cpu_limit or options.cpu, "memory": options.memory_limit or options.memory}
    if info.gpu:
        limits["nvidia.com/gpu"] = options.gpus or 1  # extended resources: the request follows the limit
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    env = [{"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}]  # the repository may be read-only
    env_from = []
    if info.python_on_gpu:  # their ONNX Runtime's TensorRT engines: cached per pod, not rebuilt per session
        mounts.append({"name": "trt-cache", "mountPath": TRT_CACHE_MOUNT})
        env.append({"name": TRT_CACHE_ENV, "value": TRT_CACHE_MOUNT})
    if options.pvc:
        mounts.insert(0, {"name": "model-repository", "mountPath": MODELS_MOUNT, "readOnly": True})
    elif options.credentials_secret:
        if options.repository_uri.startswith("gs://"):
            mounts.append({"name": "gcs-credentials", "mountPath": GCS_KEY_DIR, "readOnly": True})
            env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": f"{GCS_KEY_DIR}/{GCS_KEY_FILE}"})
        else:  # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION, or AZURE_STORAGE_ACCOUNT / _KEY
            env_from.append({"secretRef": {"name": options.credentials_secret}})
    http = {"path": "/v2/health/live", "port": "http"}
    container = {
        "name": "triton",
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        # args, not command: the image's entrypoint (NVIDIA's, which sets up CUDA compatibility) runs first
        "args": ["tritonserver", f"--model-repository={_repository_location(info, options)}",
                 f"--http-port={HTTP_PORT}", f"--grpc-port={GRPC_PORT}", f"--metrics-port={METRICS_PORT}",
                 "--exit-timeout-secs=30", *triton_server_args(info.engines)],
        "ports": [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                  {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}],
        "env": env,
        # Triton opens its endpoints only once every model has loaded: the startup probe allows for that,
        # then liveness takes over; readiness is false while models are not ready
        "startupProbe": {"httpGet": http, "periodSeconds": 10, "timeoutSeconds": 5,
                         "failureThreshold": math.ceil(options.startup_timeout_s / 10)},
        # liveness sees a dead python-backend stub too, which Triton's own endpoints do not (they stay 200 while
        # the model fails every request): `vlm-export health` (in the image, as the python models need it)
        "livenessProbe": {"exec": {"command": ["vlm-export", "health", f"--http-port={HTTP_PORT}"]},
                          "periodSeconds": 10, "timeoutSeconds": 10, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": "http"}, "periodSeconds": 5,
                           "timeoutSeconds": 5, "failureThreshold": 3},
        "resources": {"requests": requests, "limits": limits},
        "volumeMounts": mounts,
    }
    if env_from:
        container["envFrom"] = env_from
    return container


def _openai_container(options: KubernetesOptions) -> dict:
    path = options.openai_health_path
    port = {"httpGet": {"path": path, "port": "openai"}} if path else {"tcpSocket": {"port": "openai"}}
    return {
        "name": "openai",
        "image": options.image,
        "imagePullPolicy": options.image_pull_policy,
        "args": list(options.resolved_openai_command),
        "ports": [{"name": "openai", "containerPort": options.openai_port, "protocol": "TCP"}],
        "readinessProbe": {**port, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {**port, "periodSeconds": 10, "failureThreshold": 3},
        "resources": {"requests": {"cpu": options.openai_cpu, "memory": options.openai_memory},
                      "limits": {"cpu": options.openai_cpu, "memory": options.openai_memory}},
    }


def _annotations(info: RepositoryInfo, options: KubernetesOptions) -> dict[str, str]:
    notes = {f"{ANNOTATION}/target": info.target, f"{ANNOTATION}/triton": TRITON_SERVER_VERSION,
             f"{ANNOTATION}/triton-container": TRITON_CONTAINER_RELEASE,
             f"{ANNOTATION}/repository": options.repository_uri or f"pvc:{options.pvc}/{options.pvc_subpath}".rstrip("/")}
    engines = info.engines
    if info.target == "tensorrt" and engines:  # plans run only with the TensorRT version and GPU they were built on
        first = next(iter(engines.values()))
        notes[f"{ANNOTATION}/tensorrt"] = str(first.get("tensorrt"))
        notes[f"{ANNOTATION}/engine-gpu"] = str(first.get("gpu"))
        notes[f"{ANNOTATION}/engine-compute-capability"] = str(first.get("compute_capability"))
    return notes


def deployment(info: RepositoryInfo, options: KubernetesOptions) -> dict:
    containers = [_triton_container(info, options)]
    if options.openai:
        containers.append(_openai_container(options))
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": options.shm_size}}]
    if info.python_on_gpu:
        volumes.append({"name": "trt-cache", "emptyDir": {}})
    if options.pvc:
        volumes.insert(0, {"name": "model-repository",
                           "persistentVolumeClaim": {"claimName": options.pvc, "readOnly": True}})
    elif options.credentials_secret and options.repository_uri.startswith("gs://"):
        volumes.append({"name": "gcs-credentials", "secret": {"secretName": options.credentials_secret}})
    pod = {
        "containers": containers,
        "volumes": volumes,
        "terminationGracePeriodSeconds": 60,  # Triton's --exit-timeout-secs=30 to finish requests, and margin
        # no *_SERVICE_HOST / *_PORT variables from every Service in the namespace (a Service named
        # "triton" would otherwise set TRITON_* variables in Triton's own environment)
        "enableServiceLinks": False,
    }
    if options.service_account:
        pod["serviceAccountName"] = options.service_account
    if options.image_pull_secret:
        pod["imagePullSecrets"] = [{"name": options.image_pull_secret}]
    if options.node_selector:
        pod["nodeSelector"] = dict(options.node_selector)
    if info.gpu:  # GPU nodes are commonly tainted so that only pods asking for a GPU land there
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(options, annotations=_annotations(info, options)),
        "spec": {
            # no replicas unless asked: the autoscaler owns the count, and a replicas field would reset it
            # on every `kubectl apply` (Kubernetes' HPA docs say to leave it out); a new Deployment starts at 1
            **({"replicas": options.replicas} if options.replicas is not None else {}),
            "selector": {"matchLabels": _labels(options)},
            # surge instead of unavailability: a new pod loads its models before an old one goes
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": _labels(options), "annotations": _prometheus()},
                "spec": pod,
            },
        },
    }


def service(options: KubernetesOptions) -> dict:
    ports = [{"name": "http", "port": HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
             {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"},
             {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}]
    if options.openai:
        ports.append({"name": "openai", "port": options.openai_port, "targetPort": "openai", "protocol": "TCP"})
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(options, annotations=_prometheus()),
        "spec": {"type": options.service_type, "selector": _labels(options), "ports": ports},
    }


def autoscaler(options: KubernetesOptions) -> dict:
    metrics = [{"type": "Resource", "resource": {"name": "cpu", "target": {
        "type": "Utilization", "averageUtilization": options.target_cpu_utilization}}}]
    if options.target_queue_length is not None:
        metrics.append({"type": "Pods", "pods": {"metric": {"name": "vlm_queue_length"}, "target": {
            "type": "AverageValue", "averageValue": str(options.target_queue_length)}}})
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(options),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": options.name},
            "minReplicas": options.min_replicas,
            "maxReplicas": options.max_replicas,
            "metrics": metrics,
        },
    }


def image_for(info: RepositoryInfo, options: KubernetesOptions) -> str:
    """The image the pods run: the one asked for, else the default for this repository."""
    return options.image or default_image(bool(info.python_on_gpu))


def kubernetes_objects(info: RepositoryInfo, options: KubernetesOptions) -> dict[str, dict]:
    """File name -> object, in the order they are written."""
    options = replace(options, image=image_for(info, options))
    return dict(zip(FILES, (deployment(info, options), service(options), autoscaler(options))))


def _written_here(folder: Path) -> bool:
    """Whether ``folder`` holds only manifests this writes (``--force`` replaces nothing else)."""
    entries = list(folder.iterdir())
    return bool(entries) and all(p.name in FILES and p.is_file() and p.read_text(errors="replace").startswith(HEADER_START)
                                 for p in entries)


def render_kubernetes(repo: Path, out: Path, options: KubernetesOptions, force: bool = False) -> list[Path]:
    """Write the manifests for ``repo`` (a folder ``vlm-export repository`` wrote; with a
    ``repository_uri`` it is the local copy of what was uploaded there) into ``out``, atomically.
    Returns the files written, in ``kubectl apply`` order."""
    import yaml

    info = inspect_repository(Path(repo))
    if options.gpus is not None and not info.gpu:  # asked for, it would be dropped without a word
        raise DeployError(f"--gpus {options.gpus}: the {info.target} repository {repo} runs on CPU (no model has "
                          "KIND_GPU instances, no TensorRT plan), so its pods request no GPU; drop --gpus, or make a "
                          "GPU repository (vlm-export repository --target tensorrt)")
    pods_see = options.gpus or 1
    if info.gpu and info.pinned_gpus and info.pinned_gpus[-1] >= pods_see:
        # a pod sees its own GPUs only, numbered from 0: Triton would refuse GPU N there at load
        raise DeployError(f"the repository {repo} pins its instances to GPU {info.pinned_gpus[-1]}, but each pod sees "
                          f"{pods_see} GPU(s), numbered from 0; render it with `vlm-export repository BUILD --device "
                          f"cuda` for Kubernetes, or pass --gpus {info.pinned_gpus[-1] + 1}")
    objects = kubernetes_objects(info, options)
    header = (f"{HEADER_START} {__version__} (`vlm-export deploy kubernetes`) for the {info.target} repository "
              f"{Path(repo).absolute().name}/;\n# Triton {TRITON_SERVER_VERSION} (NGC {TRITON_CONTAINER_RELEASE}). "
              f"Apply with: kubectl apply -f {Path(out).name}/\n")
    class Dumper(yaml.SafeDumper):  # no &anchors / *aliases for the dicts two probes share
        def ignore_aliases(self, data):
            return True

    texts = {name: header + yaml.dump(obj, Dumper=Dumper, sort_keys=False, default_flow_style=False)
             for name, obj in objects.items()}
    out = Path(out).absolute()
    with atomic_folder(out, force, DeployError, "Kubernetes manifests folder", _written_here) as tmp:
        for name, text in texts.items():
            (tmp / name).write_text(text)
    return [out / name for name in texts]
