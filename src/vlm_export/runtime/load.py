"""Open a build folder as a pipeline on a backend, or the PyTorch reference from the source."""
from __future__ import annotations

from pathlib import Path

from ..adapters.base import LoadedModel
from ..adapters.decoder import decoder_input_names, decoder_output_names
from ..manifest import read_manifest
from .pipeline import KVSpec, Limits, VLMPipeline
from .prompt import PromptLayout
from .runners import OrtRunner, TorchRunner


def _tokenizer_and_processor(folder: Path):
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)


def open_build(build_dir: Path, backend: str = "onnxruntime", threads: int | None = None) -> VLMPipeline:
    """The build's graphs on ONNX Runtime (``backend="torch"`` loads the source model instead).
    ``threads``: intra-op threads of either runtime (None: its default, every core)."""
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    if backend == "torch":
        import torch

        from ..adapters import get_adapter

        if threads:  # PyTorch's intra-op pool is process-wide
            torch.set_num_threads(threads)

        adapter = get_adapter(manifest["source"]["adapter"])
        return reference_pipeline(adapter.load(Path(manifest["source"]["path"])), Limits.from_dict(manifest["limits"]))
    if backend != "onnxruntime":
        raise ValueError(f"unknown backend {backend!r}: choose torch or onnxruntime")
    tokenizer, processor = _tokenizer_and_processor(build_dir / manifest["tokenizer"])
    runners = {stage: OrtRunner(stage, build_dir / g["file"], threads=threads) for stage, g in manifest["graphs"].items()}
    return VLMPipeline(runners["vision_encoder"], runners["projector"], runners["lm_decoder"], tokenizer, processor,
                       PromptLayout.from_dict(manifest["prompt_layout"]), KVSpec(**manifest["kv_cache"]),
                       Limits.from_dict(manifest["limits"]), manifest["generation"]["eos_token_ids"])


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    """EOS ids of the model's generation config and of the tokenizer, as HF generate would stop."""
    ids: list[int] = []
    gen = getattr(loaded.model, "generation_config", None) or getattr(getattr(loaded.model, "text", None),
                                                                      "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    for value in (eos if isinstance(eos, list) else [eos]) + [loaded.tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


def reference_pipeline(loaded: LoadedModel, limits: Limits) -> VLMPipeline:
    """The PyTorch reference: the split modules, exactly as exported, behind TorchRunners."""
    adapter = loaded.adapter
    stages = adapter.stages(loaded)
    spec = adapter.decoder_spec(loaded)
    runners = (
        TorchRunner("vision_encoder", stages.vision_encoder, ["pixel_values"], ["image_features"]),
        TorchRunner("projector", stages.projector, ["image_features"], ["image_embeds"]),
        TorchRunner("lm_decoder", stages.lm_decoder, decoder_input_names(spec.num_layers),
                    decoder_output_names(spec.num_layers)),
    )
    kv = KVSpec(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.hidden_size)
    return VLMPipeline(*runners, loaded.tokenizer, loaded.image_processor, adapter.prompt_layout(loaded), kv,
                       limits, eos_token_ids(loaded))
