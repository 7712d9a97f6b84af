"""The PyTorch reference: an adapter's split modules behind TorchRunners, as one VLMPipeline.

It lives here, above the runtime, because it needs the adapters (and torch); the runtime's own
``open_build`` opens a build's graphs and never imports either.
"""
from __future__ import annotations

from pathlib import Path

from ..contract import Limits
from ..manifest import read_manifest
from ..runtime.load import open_build
from ..runtime.pipeline import VLMPipeline
from ..runtime.prompt import ImageTextEncoder
from ..runtime.runners import TorchRunner
from . import get_adapter
from .base import LoadedModel, Stage, set_chat_template
from .split import split

BACKENDS = ("torch", "onnxruntime")


def eos_token_ids(loaded: LoadedModel) -> list[int]:
    """EOS ids of the generation config the model's own generate uses (the adapter's
    ``generation_config``), and the tokenizer's EOS too. Hugging Face's generate stops at the
    generation config's alone; a chat model's turn end (``<|im_end|>``) is often only the
    tokenizer's, and an answer that runs past it is not one a server should send. Parity runs the
    reference with the same list, and the manifest records it (``generation.eos_token_ids``)."""
    ids: list[int] = []
    eos = getattr(loaded.adapter.generation_config(loaded), "eos_token_id", None)
    for value in (eos if isinstance(eos, list) else [eos]) + [loaded.tokenizer.eos_token_id]:
        if value is not None and value not in ids:
            ids.append(int(value))
    return ids


def generation_defaults(loaded: LoadedModel) -> dict:
    """The settings of the generation config the model's own generate uses that change even greedy
    answers and that vlm-export's generation applies (``runtime.pipeline.GENERATION_DEFAULTS``), where
    they are set: the manifest records them (``generation``) and generation applies them unless a
    request says otherwise, as HF's generate."""
    cfg = loaded.adapter.generation_config(loaded)
    found = {}
    penalty = getattr(cfg, "repetition_penalty", None)
    if penalty is not None and float(penalty) != 1.0:
        found["repetition_penalty"] = float(penalty)
    for name in ("no_repeat_ngram_size", "min_new_tokens", "min_length"):
        if getattr(cfg, name, None):
            found[name] = int(getattr(cfg, name))
    if found.get("min_new_tokens"):  # vlm-export counts answer tokens; HF counts a forced BOS as one too
        found["min_new_tokens"] -= loaded.adapter.scheme(loaded).forced_new_tokens
        if found["min_new_tokens"] <= 0:
            del found["min_new_tokens"]
    for name in ("suppress_tokens", "begin_suppress_tokens"):
        if getattr(cfg, name, None):
            found[name] = [int(i) for i in getattr(cfg, name)]
    if getattr(cfg, "bad_words_ids", None):
        found["bad_words_ids"] = [[int(i) for i in seq] for seq in cfg.bad_words_ids]
    bias = getattr(cfg, "sequence_bias", None)
    if bias:  # HF takes a mapping {ids: bias} or a list of [ids, bias] pairs (a later pair wins, as its dict)
        pairs = {tuple(int(i) for i in seq): float(value)
                 for seq, value in (bias.items() if isinstance(bias, dict) else bias)}
        found["sequence_bias"] = [[list(seq), value] for seq, value in pairs.items()]
    return found


#: settings of a generation config that change HF's answers and that vlm-export's generation does not
#: apply (it decodes greedily unless a request asks for temperature / top-p, one sequence): (attribute,
#: the value that means "off")
UNAPPLIED_GENERATION_SETTINGS = (("do_sample", False), ("num_beams", 1), ("encoder_repetition_penalty", 1.0),
                                 ("encoder_no_repeat_ngram_size", 0), ("exponential_decay_length_penalty", None))


def unread_generation_settings(loaded: LoadedModel) -> list[str]:
    """``name=value`` for each setting the model's own generation config sets (its generation_config.json)
    that its ``generate`` never reads, because it hands over to another config (BLIP-2's ends in its
    language model's, ``Adapter.generation_config``) where the setting differs: neither HF nor vlm-export
    applies it, which a checkpoint's author would not guess."""
    from transformers import GenerationConfig

    from ..runtime.pipeline import GENERATION_DEFAULTS

    top, used = getattr(loaded.model, "generation_config", None), loaded.adapter.generation_config(loaded)
    if top is None or used is None or top is used:
        return []
    default = GenerationConfig()
    names = [*GENERATION_DEFAULTS, *(name for name, _ in UNAPPLIED_GENERATION_SETTINGS)]
    return [f"{name}={getattr(top, name)!r}" for name in names
            if getattr(top, name, None) not in (None, getattr(default, name, None), [], {})
            and getattr(top, name) != getattr(used, name, None)]


def unapplied_generation_settings(loaded: LoadedModel) -> list[str]:
    """``name=value`` for each setting of the model's generation config in
    ``UNAPPLIED_GENERATION_SETTINGS`` that is on: the build says its answers may differ there."""
    cfg = loaded.adapter.generation_config(loaded)
    return [f"{name}={getattr(cfg, name)!r}" for name, off in UNAPPLIED_GENERATION_SETTINGS
            if getattr(cfg, name, off) not in (off, None, [], {})]


def reference_pipeline(loaded: LoadedModel, limits: Limits, stages: list[Stage] | None = None,
                       device=None, dtype: str | None = None, only: set[str] | None = None) -> VLMPipeline:
    """The split modules, exactly as exported, behind TorchRunners.

    ``device`` (``cpu``, ``cuda``, ``cuda:N``; default cpu) and ``dtype`` (``fp32``, ``fp16``, ``bf16``;
    default fp32): where and in what the reference runs (``runtime.devices``). Anything but the
    default moves and casts the loaded model's modules in place (the stages share its weights):
    ``loaded`` then lives there too. CUDA asked where PyTorch has none is a one-line InputError,
    before anything is moved. ``only``: the stages that get ``device`` and ``dtype`` (the others stay fp32 on the
    CPU, unmoved): the float64 check of one image stage casts that stage, not the decoder (twice its weights)."""
    from ..runtime.devices import Device, parse_dtype, torch_device

    device, dtype = Device.parse(device), parse_dtype(dtype)
    if device.is_cuda:
        torch_device(device)  # fail before splitting or moving anything
    adapter = loaded.adapter
    stages = stages or split(loaded)
    runners = {s.name: TorchRunner(s.name, s.module, s.spec.input_names, s.spec.output_names,
                                   **({"device": device, "dtype": dtype} if only is None or s.name in only else {}))
               for s in stages}
    text = adapter.image_text(loaded)
    return VLMPipeline(runners, [s.spec for s in stages], adapter.scheme(loaded), loaded.tokenizer,
                       loaded.image_processor, adapter.prompt_layout(loaded), limits, eos_token_ids(loaded),
                       ImageTextEncoder(text, loaded.image_text_tokenizer) if text else None,
                       generation_defaults(loaded))


def release_weights(loaded: LoadedModel, reference: VLMPipeline) -> None:
    """Free the PyTorch model's memory once its side of a comparison is recorded: every parameter and
    buffer of the loaded model and of the reference's split modules gets an empty tensor as its data, in
    place, so whatever still holds one holds no memory (a checkpoint read memory-mapped stays mapped
    while any one of its tensors lives; export/onnx_export.py keeps none). A later call fails loudly."""
    import gc

    import torch

    modules = (loaded.model, *(r.module for r in reference.runners.values() if isinstance(r, TorchRunner)))
    with torch.no_grad():
        for module in modules:
            for tensor in (*module.parameters(), *module.buffers()):
                tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    gc.collect()


def load_source(source: dict) -> LoadedModel:
    """A build's source model as the build saw it: loaded by its adapter, its PEFT adapter merged."""
    from .lora import merge_lora

    loaded = get_adapter(source["adapter"]).load(Path(source["path"]))
    if source.get("lora"):
        loaded, _ = merge_lora(loaded, Path(source["lora"]["path"]), check_base=False)  # checked at build
    if source.get("chat_template"):  # given at build time (--chat-template): the prompts were made with it
        set_chat_template(loaded.tokenizer, source["chat_template"], "the build's chat template")
    return loaded


def open_reference(build_dir: Path, threads: int | None = None, device=None, dtype: str | None = None) -> VLMPipeline:
    """The PyTorch reference of a build, loaded from the build's source model folder; on ``device``
    in ``dtype`` (``reference_pipeline``; default cpu, fp32)."""
    import torch

    from ..runtime.devices import Device, torch_device

    if Device.parse(device).is_cuda:
        torch_device(device)  # no GPU: say so before loading the model
    manifest = read_manifest(build_dir)
    if threads:  # PyTorch's intra-op pool is process-wide
        torch.set_num_threads(threads)
    return reference_pipeline(load_source(manifest["source"]), Limits.from_dict(manifest["limits"]),
                              device=device, dtype=dtype)


def open_pipeline(build_dir: Path, backend: str = "onnxruntime", threads: int | None = None,
                  check_hashes: bool = True, form: str = "onnxruntime") -> VLMPipeline:
    """A build on ``backend``: ``onnxruntime`` runs its graphs (checked against the manifest's
    hashes) in ``form`` (the onnxruntime target's by default; see runtime.load.open_build), ``torch``
    its source model's split modules."""
    if backend == "torch":
        return open_reference(Path(build_dir), threads)
    if backend == "onnxruntime":
        return open_build(build_dir, threads=threads, check_hashes=check_hashes, form=form)
    raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
