"""What a rendered model repository needs to run: read from its own configs, not guessed.

Each ``config.pbtxt`` is parsed with Triton's own schema (``model_config_pb2.ModelConfig``, as
the renderer wrote it). The target follows from the graph models' platforms: ``tensorrt_plan``
(TensorRT, needs a GPU), ``onnxruntime_onnx`` (Triton's ONNX Runtime backend, CPU instances as
rendered) or python models only (onnxruntime inside them, CPU). The build manifest that the
renderer copies into ``vlm/1/`` tells the rest (the engines' TensorRT version and GPU).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RepositoryError
from ..manifest import MANIFEST_NAME

RENDER_HINT = "render one with `vlm-export repository BUILD --out DIR` and pass DIR"


@dataclass(frozen=True)
class RepositoryInfo:
    path: Path
    target: str  # python | onnxruntime | tensorrt
    gpu: bool  # some model has KIND_GPU instances or is a TensorRT plan
    models: dict[str, dict] = field(default_factory=dict)  # name -> {"backend"|"platform", "kinds", "instances"}
    manifest: dict = field(default_factory=dict)  # the build manifest the vlm model carries

    @property
    def python_models(self) -> list[str]:
        return sorted(n for n, m in self.models.items() if m.get("backend") == "python")

    @property
    def python_on_gpu(self) -> list[str]:
        """The python models with KIND_GPU instances: they open ONNX Runtime on the GPU, so the image needs
        onnxruntime-gpu (``image.default_image``)."""
        from tritonclient.grpc import model_config_pb2

        gpu_kind = model_config_pb2.ModelInstanceGroup.Kind.KIND_GPU
        return [n for n in self.python_models if gpu_kind in self.models[n]["kinds"]]

    @property
    def pinned_gpus(self) -> list[int]:
        """The GPU indices the repository's instance groups name (``repository --device cuda:N``); empty
        where instances take whatever GPU Triton gives them."""
        return sorted({gpu for m in self.models.values() for gpu in m.get("gpus", ())})

    @property
    def engines(self) -> dict:
        return self.manifest.get("engines") or {}


def _parse(path: Path):
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise RepositoryError("reading a model repository needs tritonclient: pip install 'vlm-export[serve]'") from None
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (text_format.ParseError, UnicodeDecodeError) as e:
        raise RepositoryError(f"{path} is not a valid Triton model config ({e}); {RENDER_HINT}") from None
    except OSError as e:
        raise RepositoryError(f"cannot read {path}: {e.strerror}") from None


def inspect_repository(repo: Path) -> RepositoryInfo:
    """RepositoryError, in one line, for anything that is not a repository vlm-export rendered."""
    repo = Path(repo)
    if not repo.is_dir():
        raise RepositoryError(f"{repo} is not a folder; {RENDER_HINT}")
    if not (repo / "vlm" / "config.pbtxt").is_file():
        raise RepositoryError(f"{repo} is not a model repository rendered by vlm-export (no vlm/config.pbtxt); "
                              f"{RENDER_HINT}")
    configs = sorted(repo.glob("*/config.pbtxt"))
    if not any((cfg_path.parent / "1").is_dir() for cfg_path in configs):
        raise RepositoryError(f"{repo} holds model configs only (rendered with --configs-only, for review), no "
                              "model files; render it without --configs-only and pass that folder")
    models: dict[str, dict] = {}
    for cfg_path in configs:
        name = cfg_path.parent.name
        cfg = _parse(cfg_path)
        if cfg.name and cfg.name != name:
            raise RepositoryError(f"{cfg_path} names model {cfg.name!r} but sits in folder {name!r}; {RENDER_HINT}")
        if not (cfg_path.parent / "1").is_dir():
            raise RepositoryError(f"model {name!r} in {repo} has no version folder 1/; {RENDER_HINT}")
        models[name] = {
            "backend": cfg.backend or None, "platform": cfg.platform or None,
            "kinds": sorted({cfg.instance_group[i].kind for i in range(len(cfg.instance_group))}),
            "gpus": sorted({gpu for group in cfg.instance_group for gpu in group.gpus}),  # pinned GPU indices
            "steps": [s.model_name for s in cfg.ensemble_scheduling.step],
            "decoupled": cfg.model_transaction_policy.decoupled,
        }
    vlm = models["vlm"]
    if vlm["backend"] != "python" or not vlm["decoupled"]:
        raise RepositoryError(f"{repo}/vlm is not vlm-export's decoupled python model; {RENDER_HINT}")
    for name, model in models.items():
        missing = [s for s in model["steps"] if s not in models]
        if missing:
            raise RepositoryError(f"ensemble {name!r} in {repo} calls model(s) {', '.join(missing)} that the "
                                  f"repository lacks; {RENDER_HINT}")
    manifest_path = repo / "vlm" / "1" / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise RepositoryError(f"{manifest_path} is missing: {repo} was not rendered by vlm-export; {RENDER_HINT}") from None
    except (OSError, ValueError) as e:
        raise RepositoryError(f"{manifest_path} is unreadable ({e}); {RENDER_HINT}") from None
    platforms = {m["platform"] for m in models.values()}
    from tritonclient.grpc import model_config_pb2

    gpu_kind = model_config_pb2.ModelInstanceGroup.Kind.KIND_GPU
    if "tensorrt_plan" in platforms:
        target = "tensorrt"
    elif "onnxruntime_onnx" in platforms:
        target = "onnxruntime"
    else:
        target = "python"
    gpu = target == "tensorrt" or any(gpu_kind in m["kinds"] for m in models.values())
    return RepositoryInfo(repo, target, gpu, models, manifest)
