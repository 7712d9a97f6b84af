"""Render a Triton model repository from a build manifest.

Every config is built as a dict from the manifest, parsed into Triton's own schema
(``tritonclient.grpc.model_config_pb2.ModelConfig``; an unknown or misspelt field fails loudly,
and there are no template placeholders to leave unfilled), checked against the ONNX graphs'
tensor names, dtypes and dims, and only then written as ``config.pbtxt``.

Layout (the same for every target; only the graph models change backend). One graph model per
stage the manifest declares; for a LLaVA-style build::

    preprocess/      python: encoded image bytes -> every image-processor output the image stages
                     read (pixel_values; mllama's tiled vision also aspect_ratio_ids and _mask)
    vision_encoder/  python (onnxruntime inside) | onnxruntime_onnx | tensorrt_plan
    projector/       same choice (every image stage, in the declared order)
    image_encoder/   ensemble: preprocess -> the image stages -> what the decoding scheme builds its
                     image input from (``image_input_sources``: the decoder's image input, plus
                     e.g. the tile mask for cross-attention); its inputs: the encoded images, plus
                     the prompt's tokens where an image stage reads them
    lm_encoder/      (an encoder-decoder scheme's encoder: prompt + image rows -> encoder states and
                     cross K/V) same choice; the vlm model calls it once per prefill
    lm_decoder/      same choice as the image stages; state in and out as the decoding scheme says
    vlm/             python, decoupled: prompt + images -> streamed text (the generation loop)
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_folder
from ..cpu import INT8_DOT_PRODUCT
from ..contract import image_stages, scheme_from_dict, stages_from_manifest
from ..contract.layout import image_arrangement
from ..contract.profiles import stage_profiles, trt_settings
from ..engines.tensorrt import release, version_problem
from ..errors import InputError, ManifestError, RepositoryError
from ..export.graph_info import graph_io
from ..manifest import (check_hashes as check_build_hashes, form_entry, gpu_form, gpu_form_note, read_manifest,
                        served_entry, write_manifest)
from ..runtime.devices import Device
from ..runtime.engine import DEFAULT_MAX_QUEUE
from ..runtime.generate import DEFAULT_MAX_PREFILL_PADDING, DEFAULT_MAX_PREFILL_TOKENS
from ..runtime.pipeline import image_limits_for, pixel_inputs

TARGETS = ("python", "onnxruntime", "tensorrt")
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "bool": "TYPE_BOOL", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8"}
PYTHON_MODELS = Path(__file__).parent / "python_models"
# where the vlm model runs the decoder: in its own process (no model boundary per token) or via BLS
DECODER_MODES = ("in_process", "bls")
#: the ONNX Runtime inside the onnxruntime backend of the Triton this project pins (2.51.0 = NGC 24.10;
#: the server's build.py, TRITON_VERSION_MAP at tag v2.51.0): the onnxruntime target's graphs must load
#: there, not in the onnxruntime vlm-export runs (tests/test_forms.py loads them in that very version)
TRITON_ONNXRUNTIME = "1.19.2"

#: the vlm model's request and response, shared by the renderer, the model and the client
VLM_INPUTS = [
    {"name": "prompt", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    # or a conversation: JSON, Hugging Face's chat format (the k-th image part is the k-th image)
    {"name": "messages", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    {"name": "images", "data_type": "TYPE_STRING", "dims": [-1], "optional": True},
    {"name": "max_tokens", "data_type": "TYPE_INT64", "dims": [1], "optional": True},
    {"name": "temperature", "data_type": "TYPE_FP32", "dims": [1], "optional": True},
    {"name": "top_p", "data_type": "TYPE_FP32", "dims": [1], "optional": True},
    {"name": "top_k", "data_type": "TYPE_INT64", "dims": [1], "optional": True},  # 0: every token
    {"name": "min_p", "data_type": "TYPE_FP32", "dims": [1], "optional": True},  # 0: every token
    {"name": "seed", "data_type": "TYPE_INT64", "dims": [1], "optional": True},
    {"name": "stop", "data_type": "TYPE_STRING", "dims": [-1], "optional": True},
    {"name": "bad_words", "data_type": "TYPE_STRING", "dims": [-1], "optional": True},  # vLLM's: never generated
    {"name": "stream", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "ignore_eos", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    # absent: the build's (its checkpoint's generation config), as in-process generation
    {"name": "repetition_penalty", "data_type": "TYPE_FP32", "dims": [1], "optional": True},
    {"name": "no_repeat_ngram_size", "data_type": "TYPE_INT64", "dims": [1], "optional": True},
    {"name": "min_tokens", "data_type": "TYPE_INT64", "dims": [1], "optional": True},  # no EOS before
    {"name": "presence_penalty", "data_type": "TYPE_FP32", "dims": [1], "optional": True},
    {"name": "frequency_penalty", "data_type": "TYPE_FP32", "dims": [1], "optional": True},
    # each generated token's log-probability, and the top_logprobs alternatives' (OpenAI's)
    {"name": "logprobs", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "top_logprobs", "data_type": "TYPE_INT64", "dims": [1], "optional": True},
    # OpenAI's logit_bias as two lists of one length: token ids, and the bias each gets in [-100, 100]
    {"name": "logit_bias_tokens", "data_type": "TYPE_INT64", "dims": [-1], "optional": True},
    {"name": "logit_bias", "data_type": "TYPE_FP32", "dims": [-1], "optional": True},
]
VLM_OUTPUTS = [
    {"name": "text_output", "data_type": "TYPE_STRING", "dims": [1]},
    {"name": "finish_reason", "data_type": "TYPE_STRING", "dims": [1]},
    {"name": "prompt_tokens", "data_type": "TYPE_INT32", "dims": [1]},
    {"name": "completion_tokens", "data_type": "TYPE_INT32", "dims": [1]},
    # JSON: the log-probabilities of the tokens this response covers ("[]" unless asked for)
    {"name": "logprobs", "data_type": "TYPE_STRING", "dims": [1]},
]

DEFAULT_PREFIX_CACHE_MB = 256  # ~5 MB a prompt of 100 tokens on the demo's LM (45 KB of K/V a token)


@dataclass(frozen=True)
class RepositoryOptions:
    target: str = "python"
    instances: int = 1  # per graph model
    vlm_instances: int = 1
    max_queue_delay_us: int = 500  # dynamic batching window of the image path
    # requests that may wait for a place in the vlm model's running batch (the batch itself holds the
    # build's max_batch); past it a request gets UNAVAILABLE at once instead of growing a queue
    max_queue: int = DEFAULT_MAX_QUEUE
    # the vlm model's image-embedding cache (LRU by image content); 0 turns it off
    image_cache_mb: int = 256
    # the vlm model's prefix cache (runtime/prefix_cache.py): prompts' K/V for later prompts that start
    # the same way; 0 turns it off. None: DEFAULT_PREFIX_CACHE_MB, and off on the tensorrt target (its
    # prefill profile has no past), where asking for one gets a note
    prefix_cache_mb: int | None = None
    # new requests prefilled in one step (see runtime.generate.Scheduler): at most this many prompt
    # tokens (the pause the running rows see), and at most this share of a call's slots padding
    # (padding costs like real tokens on a CPU; on a GPU a batched prefill costs about one row's time)
    max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS
    max_prefill_padding: float = DEFAULT_MAX_PREFILL_PADDING
    # request images are refused before they are decoded past these (None: 64x the model's input area,
    # at least 64 M pixels; see runtime/images.py)
    max_image_pixels: int | None = None
    max_image_mb: int = 32
    decoder_mode: str | None = None  # default: in_process for python, bls for native backends
    # onnxruntime intra-op threads inside python models. No EXECUTION_ENV_PATH is written, so configs
    # stay portable (e.g. to NVIDIA's container); `vlm-export serve` puts this venv first on the
    # server's PATH, which the stub follows.
    threads: int | None = None
    # tensorrt target: the TensorRT version of the Triton that will serve the plans (its container's);
    # plans that will not load on it are refused. None: not checked (render says so)
    tensorrt_version: str | None = None
    # where the models run: cpu, or cuda[:N] - KIND_GPU instance groups (on GPU N), the python models'
    # ONNX Runtime sessions on the instance's GPU; the tensorrt target is always on a GPU
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise RepositoryError(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        if self.decoder_mode not in (None, *DECODER_MODES):
            raise RepositoryError(f"unknown decoder mode {self.decoder_mode!r}; choose one of {', '.join(DECODER_MODES)}")
        if self.decoder_mode == "in_process" and self.target != "python":
            raise RepositoryError("decoder_mode in_process needs the python target (the decoder runs in the vlm model)")
        pixels = 1 if self.max_image_pixels is None else self.max_image_pixels  # None: derived; 0 is no limit to accept
        if min(self.instances, self.vlm_instances, self.max_queue, self.max_image_mb, pixels) < 1 \
                or min(self.max_queue_delay_us, self.image_cache_mb, self.prefix_cache_mb or 0) < 0:
            raise RepositoryError("instances, max_queue and the image limits must be >= 1, the queue delay, "
                                  "image cache and prefix cache >= 0")
        if self.tensorrt_version is not None and self.target != "tensorrt":
            raise RepositoryError(f"tensorrt_version is for the tensorrt target, not {self.target!r}")
        if self.tensorrt_version is not None and release(self.tensorrt_version) is None:
            raise RepositoryError(f"tensorrt_version {self.tensorrt_version!r} is not a TensorRT version "
                                  "(MAJOR.MINOR[.PATCH], e.g. 10.5.0)")
        try:
            Device.parse(self.device)
        except InputError as e:
            raise RepositoryError(str(e)) from None
        if self.max_prefill_tokens < 1 or not 0.0 <= self.max_prefill_padding <= 1.0:
            raise RepositoryError(f"max_prefill_tokens must be >= 1 (got {self.max_prefill_tokens}) and "
                                  f"max_prefill_padding in [0, 1] (got {self.max_prefill_padding})")

    @property
    def resolved_decoder_mode(self) -> str:
        return self.decoder_mode or ("in_process" if self.target == "python" else "bls")

    @property
    def served_prefix_cache_mb(self) -> int:
        """The prefix cache the vlm model gets: none on the tensorrt target, whose engines' prefill
        profile has an empty past (a prompt cannot continue from a cached prefix there)."""
        if self.target == "tensorrt":
            return 0
        return DEFAULT_PREFIX_CACHE_MB if self.prefix_cache_mb is None else self.prefix_cache_mb

    @property
    def on_gpu(self) -> bool:
        return self.target == "tensorrt" or Device.parse(self.device).is_cuda

    def instance_group(self, count: int, runs_graphs: bool = True) -> list[dict]:
        """Triton's instance group: KIND_GPU for a model that runs graphs on a GPU (the python backend
        tells each instance its GPU, which the python models run ONNX Runtime on), pinned to GPU N for
        ``cuda:N``; KIND_CPU otherwise (image decoding, a vlm model whose decoder is another model)."""
        gpu = self.on_gpu and runs_graphs
        group = {"kind": "KIND_GPU" if gpu else "KIND_CPU", "count": count}
        index = Device.parse(self.device).index
        if gpu and index is not None:
            group["gpus"] = [index]
        return [group]


def _dims(shape: list, batched: bool) -> list[int]:
    dims = [d if isinstance(d, int) else -1 for d in shape]
    return dims[1:] if batched else dims


def _tensors(infos: list[dict], batched: bool) -> list[dict]:
    tensors = []
    for i in infos:
        t = {"name": i["name"], "data_type": TRITON_DTYPES[i["dtype"]], "dims": _dims(i["shape"], batched)}
        if not t["dims"]:  # one value per image (mllama's aspect_ratio_ids): Triton wants dims past the batch;
            t["dims"], t["reshape"] = [1], {"shape": []}  # the model sees [batch], clients [batch, 1]
        tensors.append(t)
    return tensors


def model_dims(tensor: dict) -> list[int]:
    """A config tensor's dims as the model sees them (its ``reshape`` where it has one)."""
    return list(tensor["reshape"]["shape"]) if "reshape" in tensor else list(tensor["dims"])


def _python_params(**values) -> dict:
    return {k: {"string_value": str(v)} for k, v in values.items()}


def _file_hashes(entry: dict, graph_name: str | None = None) -> str:
    """The sha256 of a stage's files under their names in the version folder they are copied to
    (the graph as ``graph_name`` if given, its external data under its own name), as JSON: the
    python models check them at load."""
    return json.dumps({graph_name if graph_name and rel == entry["file"] else Path(rel).name: digest
                       for rel, digest in entry["sha256"].items()})


def target_graphs(manifest: dict, target: str, gpu: bool = False) -> dict[str, dict]:
    """Stage -> the graph entry a repository target serves: the python target runs vlm-export's own
    ONNX Runtime, so the form the manifest's onnxruntime target names (the fused decoder where the
    build has one); the onnxruntime target (Triton's ONNX Runtime) and a GPU get ``manifest.gpu_form``
    (the standard graph where one is shipped); the tensorrt target's plans are built from the standard
    form (engines/tensorrt.py; a stage without one is checked as shipped, so the check names what
    TensorRT cannot read)."""
    if target == "tensorrt":
        return {stage: served_entry(manifest, stage, "tensorrt") for stage in manifest["graphs"]}
    if gpu or target == "onnxruntime":
        # Triton's own onnxruntime backend (TRITON_ONNXRUNTIME) predates the contrib-op inputs the fused
        # form is written with and checked on (GroupQueryAttention's query_seqlens): it gets the standard
        # form where the build ships one, as a GPU does (gpu_form), else the fused one, which
        # check_triton_onnxruntime then refuses in one line
        return {stage: form_entry(manifest, stage, gpu_form(manifest, stage)) for stage in manifest["graphs"]}
    return {stage: served_entry(manifest, stage, "onnxruntime") for stage in manifest["graphs"]}


def check_triton_onnxruntime(build_dir: Path, manifest: dict) -> None:
    """RepositoryError (one line) for a graph the onnxruntime target serves that Triton's onnxruntime
    backend (ONNX Runtime TRITON_ONNXRUNTIME) cannot load: a fused form (its GroupQueryAttention has
    inputs that ONNX Runtime lacks: "input size 17 not in range [min=7, max=16]" in 1.31, "INVALID_GRAPH"
    in 1.19), or a MatMulNBits of other than 4 bits (the w8 head or decoder: 1.19 "Only 4b quantization is
    supported for MatMulNBits op"). Both measured by loading the graphs in those versions."""
    import onnx

    for stage, entry in target_graphs(manifest, "onnxruntime").items():
        fix = "serve it with the python target (vlm-export's own onnxruntime runs it)" + {
            "w4": ", or build with --no-fuse --lm-head w4", "w8": f" ({TRITON_ONNXRUNTIME} runs 4-bit MatMulNBits only)"
        }.get(entry.get("precision"), ", or build with --no-fuse")
        if gpu_form(manifest, stage) == "fused":
            raise RepositoryError(f"{stage} ships only ONNX Runtime's fused form, which Triton's onnxruntime backend "
                                  f"(ONNX Runtime {TRITON_ONNXRUNTIME}) cannot load; {fix}")
        graph = onnx.load(Path(build_dir) / entry["file"], load_external_data=False)
        bits = sorted({a.i for n in graph.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
                       if a.name == "bits" and a.i != 4})
        if bits:
            raise RepositoryError(f"{stage} has MatMulNBits weights of {'/'.join(map(str, bits))} bits, which Triton's "
                                  f"onnxruntime backend (ONNX Runtime {TRITON_ONNXRUNTIME}) does not run (4 bits "
                                  f"only); {fix}")


def model_configs(manifest: dict, options: RepositoryOptions) -> dict[str, dict]:
    """Every model's config as a dict in Triton's schema (JSON field names)."""
    image_batch = manifest["limits"]["max_images_per_batch"]
    graphs = target_graphs(manifest, options.target, options.on_gpu)
    stages = stages_from_manifest(manifest)
    scheme = scheme_from_dict(manifest["scheme"])
    configs: dict[str, dict] = {}
    for spec in stages:
        if spec.kind == "decoder" and options.resolved_decoder_mode == "in_process":
            continue  # the vlm model runs it itself: a model of its own would hold a second copy, unused
        # image stages batch images; the decoder's state differs per request: Triton does not batch it
        batched = spec.kind == "image"
        cfg = {
            "name": spec.name,
            "max_batch_size": image_batch if batched else 0,
            "input": _tensors(graphs[spec.name]["inputs"], batched),
            "output": _tensors(graphs[spec.name]["outputs"], batched),
            "instance_group": options.instance_group(options.instances),
        }
        if options.target == "tensorrt":
            # Every instance gets every optimization profile of its plan. Without `profile` Triton uses
            # profile 0 only (model_config.proto), the decoder's prefill profile, and decode steps fail.
            # The tensorrt backend makes one execution context per listed profile in each instance and,
            # per request, runs the one whose [min, max] hold the request's shapes (nearest opt among
            # them; tensorrt_backend src/instance_state.cc GetMostOptimizedProfile). One group per
            # profile would not work: the scheduler hands a request to any instance, not by shape.
            # Image stages have one profile (over the number of images), the decoder one per phase of
            # its scheme (prefill, decode); stage_profiles is what the plans are built with.
            cfg["instance_group"][0]["profile"] = [str(i) for i in range(len(stage_profiles(manifest, spec.name)))]
        if batched:
            cfg["dynamic_batching"] = {"max_queue_delay_microseconds": options.max_queue_delay_us}
        if options.target == "python":
            cfg["backend"] = "python"
            cfg["parameters"] = _python_params(intra_op_threads=options.threads or 0, spin=int(spec.per_token),
                                               sha256=_file_hashes(graphs[spec.name], "model.onnx"))
            if options.on_gpu:  # for ONNX Runtime's TensorRT provider: its precision flags, one engine for the whole range
                trt = trt_settings(manifest, spec.name)
                cfg["parameters"].update(_python_params(fp16=int(trt["fp16"]), int8=int(trt["int8"]),
                                                        **({"trt_profiles": json.dumps(trt["trt_profiles"])}
                                                           if trt["trt_profiles"] else {})))
        elif options.target == "onnxruntime":
            cfg["platform"] = "onnxruntime_onnx"
        else:
            cfg["platform"] = "tensorrt_plan"
        configs[spec.name] = cfg

    decoder_params = {}
    if options.resolved_decoder_mode == "in_process":
        entry = graphs[scheme.decoder_stage]
        decoder_params = _python_params(decoder_graph=Path(entry["file"]).name, sha256=_file_hashes(entry))
    image = image_stages(stages)
    limits = image_limits_for(stages, options.max_image_pixels, options.max_image_mb << 20)
    image_params = _python_params(max_image_pixels=limits.max_pixels, max_image_bytes=limits.max_bytes)
    if image:
        configs.update(_image_path_configs(configs, image, scheme, image_batch, options))
        # how the processor's outputs become the image path's (patches of all images -> a row per image)
        arrangement = manifest["prompt_layout"].get("image_tiles") or {}
        configs["preprocess"]["parameters"] = {**image_params, **_python_params(image_arrangement=json.dumps(arrangement))}
        if arrangement and image_arrangement(arrangement).one_prompt:
            # its images are cut as one prompt's (LLaVA-OneVision): requests batched together would be cut as one
            del configs["preprocess"]["dynamic_batching"]
    configs["vlm"] = {
        "name": "vlm",
        "backend": "python",
        "max_batch_size": 0,
        "input": VLM_INPUTS,
        "output": VLM_OUTPUTS,
        "model_transaction_policy": {"decoupled": True},
        "instance_group": options.instance_group(options.vlm_instances,
                                                 runs_graphs=options.resolved_decoder_mode == "in_process"),
        "parameters": {**_python_params(decoder_mode=options.resolved_decoder_mode, intra_op_threads=options.threads or 0,
                                        max_queue=options.max_queue, image_cache_mb=options.image_cache_mb,
                                        prefix_cache_mb=options.served_prefix_cache_mb,
                                        max_prefill_tokens=options.max_prefill_tokens,
                                        max_prefill_padding=options.max_prefill_padding),
                       **image_params, **decoder_params},
    }
    return configs


def _image_path_configs(configs: dict, image, scheme, image_batch: int, options) -> dict[str, dict]:
    """``preprocess`` (bytes -> every image-processor output the image stages read) and the
    ``image_encoder`` ensemble over the image stages, whose outputs are what the decoding scheme
    builds its image input from (``scheme.image_input_sources``: a stage output, or a preprocessed
    tensor the ensemble hands back as well)."""
    # each tensor's config as a graph model reading (inputs) or making (outputs) it has it (the last one
    # in stage order; each graph model's config is checked against its own graph below)
    read = {t["name"]: t for spec in image for t in configs[spec.name]["input"]}
    made = {t["name"]: t for spec in image for t in configs[spec.name]["output"]}
    # and what the scheme reads of the processor's outputs besides (LLaVA-NeXT's image sizes)
    extra = [s for s in scheme.processor_inputs if s.name not in read]
    read.update({t["name"]: t for t in _tensors([{"name": s.name, "dtype": s.dtype, "shape": list(s.dims)}
                                                 for s in extra], True)})
    pixels = [t.name for t in pixel_inputs(image)] + [s.name for s in extra]
    preprocess = {
        "name": "preprocess",
        "backend": "python",
        "max_batch_size": image_batch,
        "input": [{"name": "images", "data_type": "TYPE_STRING", "dims": [1]}],
        "output": [read[name] for name in pixels],
        "instance_group": options.instance_group(options.instances, runs_graphs=False),
        "dynamic_batching": {"max_queue_delay_microseconds": options.max_queue_delay_us},
    }
    steps = [{"model_name": "preprocess", "model_version": -1,
              "input_map": {"images": "images"}, "output_map": {n: n for n in pixels}}]
    for spec in image:  # ensemble tensors are named after the stage tensors: each stage reads its inputs by name
        steps.append({"model_name": spec.name, "model_version": -1,
                      "input_map": {n: n for n in spec.input_names}, "output_map": {n: n for n in spec.output_names}})
    available = {**{n: read[n] for n in pixels}, **made}
    missing = [n for n in scheme.image_input_sources if n not in available]
    if missing:
        raise RepositoryError(f"the {scheme.name} scheme builds its image input from {', '.join(missing)}, which "
                              "no image stage makes and the image processor does not give")
    # the prompt's tokens (InstructBLIP's Q-Former), made by the vlm model, go straight to the stages reading them
    text_inputs = {t["name"]: t for spec in image for t in configs[spec.name]["input"]
                   if any(s.name == t["name"] and s.role == "prompt" for s in spec.inputs)}
    ensemble = {
        "name": "image_encoder",
        "platform": "ensemble",
        "max_batch_size": image_batch,
        "input": [{"name": "images", "data_type": "TYPE_STRING", "dims": [1]}, *text_inputs.values()],
        "output": [available[n] for n in scheme.image_input_sources],
        "ensemble_scheduling": {"step": steps},
    }
    return {"preprocess": preprocess, "image_encoder": ensemble}


def parse_config(cfg: dict):
    """Into Triton's ModelConfig message; RepositoryError naming the model on any schema error."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    try:
        return json_format.ParseDict(cfg, model_config_pb2.ModelConfig())
    except json_format.ParseError as e:
        raise RepositoryError(f"config of model {cfg.get('name')!r} does not fit Triton's schema: {e}") from None


def to_pbtxt(cfg: dict) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(parse_config(cfg))


def check_against_graphs(configs: dict[str, dict], build_dir: Path, manifest: dict, target: str = "python",
                         gpu: bool = False) -> None:
    """Tensor names, dtypes and dims of every graph model against the ONNX graph files themselves
    (read from disk, not from the manifest the configs were made from), in the form ``target`` serves
    (on a GPU where ``gpu``)."""
    problems = []
    graphs = target_graphs(manifest, target, gpu)
    for spec in stages_from_manifest(manifest):
        if spec.name not in configs:  # run inside the vlm model (in_process decoder)
            continue
        cfg = configs[spec.name]
        batched = cfg["max_batch_size"] > 0
        inputs, outputs = graph_io(Path(build_dir) / graphs[spec.name]["file"])
        for kind, infos in (("input", inputs), ("output", outputs)):
            declared = {t["name"]: t for t in cfg[kind]}
            actual = {i.name: i for i in infos}
            if set(declared) != set(actual):
                problems.append(f"{spec.name} {kind}s {sorted(declared)} != graph {sorted(actual)}")
                continue
            for name, info in actual.items():
                t = declared[name]
                if t["data_type"] != TRITON_DTYPES.get(info.dtype):
                    problems.append(f"{spec.name}.{name}: {t['data_type']} != graph {info.dtype}")
                shape, dims = info.shape[1:] if batched else info.shape, model_dims(t)
                if len(dims) != len(shape) or any(
                        isinstance(g, int) and d not in (g, -1) or not isinstance(g, int) and d != -1
                        for d, g in zip(dims, shape)):
                    problems.append(f"{spec.name}.{name}: dims {dims} do not fit graph shape {info.shape}")
    if problems:
        raise RepositoryError("Triton configs disagree with the ONNX graphs: " + "; ".join(problems))


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # graphs can be hundreds of MB: share the bytes when on one file system
    except OSError:
        shutil.copy2(src, dst)


def check_engines(build_dir: Path, manifest: dict, configs: dict[str, dict], options: RepositoryOptions) -> list[str]:
    """The build's TensorRT plans against the configs and the Triton that will serve them: RepositoryError
    (one line) for a plan that is missing, was built with other optimization profiles than the configs
    list, or will not load on ``options.tensorrt_version``. Returns notes on what was not checked."""
    engines = manifest.get("engines") or {}
    for stage in (name for name, cfg in configs.items() if cfg.get("platform") == "tensorrt_plan"):
        entry = engines.get(stage)
        if entry is None:
            raise RepositoryError(f"{build_dir} has no TensorRT engine for {stage}; rebuild the engines "
                                  "(vlm-export engines BUILD)")
        # what the config lists (stage_profiles) must be what the plan was built with
        if entry.get("profiles") != json.loads(json.dumps(stage_profiles(manifest, stage))):
            raise RepositoryError(f"{entry['file']} was built with other optimization profiles than the limits "
                                  f"in {build_dir}'s manifest give; rebuild the engines (vlm-export engines BUILD)")
        if options.tensorrt_version is not None:
            problem = version_problem(entry.get("tensorrt"), options.tensorrt_version,
                                      bool(entry.get("version_compatible")))
            if problem:
                raise RepositoryError(f"{entry['file']} will not load on the target Triton's TensorRT "
                                      f"{options.tensorrt_version}: {problem}")
    notes = []
    if options.tensorrt_version is None and engines:
        built = ", ".join(sorted({f"TensorRT {e.get('tensorrt')} on compute capability {e.get('compute_capability')}"
                                  for e in engines.values()}))
        notes.append(f"TensorRT version not checked: the plans were built with {built} and load only on a Triton "
                     "with that TensorRT (pass --tensorrt-version, the serving Triton's, to check)")
    if any(e.get("version_compatible") for e in engines.values()):
        notes.append("the plans are version-compatible: tritonserver needs --backend-config=tensorrt,"
                     "version-compatible=true (vlm-export serve passes it)")
    return notes


def _is_model_repository(folder: Path) -> bool:
    """Whether ``folder`` looks like a repository this renders (model folders, each with a config.pbtxt):
    only such a folder is replaced by ``--force``."""
    entries = [p for p in folder.iterdir() if not p.name.startswith(".")]
    return bool(entries) and all((p / "config.pbtxt").is_file() for p in entries)


def render_repository(build_dir: Path, out: Path, options: RepositoryOptions | None = None,
                      force: bool = False, check_hashes: bool = True, configs_only: bool = False,
                      echo=print) -> Path:
    """Write the repository atomically (temporary folder, then rename). ``check_hashes``: refuse
    graphs that changed since the build (the python models then check their own copies at load).
    ``configs_only``: only each model's ``config.pbtxt`` (rendered and checked as always), no model
    files - for the tensorrt target, before any engine exists (the configs list the profiles the
    engines will be built with); such a folder is for review and CI, it does not load in Triton.
    ``echo`` gets one line per note (what was not checked, what is missing)."""
    options = options or RepositoryOptions()
    build_dir, out = Path(build_dir), Path(out).absolute()
    manifest = read_manifest(build_dir)
    if check_hashes:
        check_build_hashes(build_dir, manifest)
    if options.target == "tensorrt":  # --configs-only too: configs for plans that can never be built help no one
        for stage in manifest["graphs"]:
            try:
                form_entry(manifest, stage, "tensorrt")
            except ManifestError as e:
                raise RepositoryError(f"{build_dir} cannot be served by the tensorrt target: {e}; `vlm-export engines "
                                      f"{build_dir} --check-only` lists what TensorRT cannot read") from None
    if options.target == "onnxruntime":
        check_triton_onnxruntime(build_dir, manifest)
    configs = model_configs(manifest, options)
    if not check_hashes:  # nor do the python models at load
        for cfg in configs.values():
            cfg.get("parameters", {}).pop("sha256", None)
    check_against_graphs(configs, build_dir, manifest, options.target, options.on_gpu)
    pbtxt = {name: to_pbtxt(cfg) for name, cfg in configs.items()}
    notes = [note for stage in manifest["graphs"] if options.on_gpu and options.target != "tensorrt"
             and (note := gpu_form_note(manifest, stage))]
    if options.target == "onnxruntime":  # vlm-export's runners refuse such a graph on the wrong CPU; Triton's backend cannot
        served = target_graphs(manifest, options.target, options.on_gpu)
        notes += [f"{stage}: its int8 kernels (ONNX Runtime U8S8) are exact only on a CPU with "
                  f"{' or '.join(entry['variant']['requires_cpu'])}, which Triton's onnxruntime backend does not check: "
                  "serve it only on such CPUs, or " + (
                      "serve it with the python target, which runs its Q/DQ pairs as written on other CPUs"
                      if entry["variant"].get("format") == "QDQ" else "build with --int8-kernel u8u8")
                  for stage, entry in served.items() if (entry.get("variant") or {}).get("requires_cpu")]
        notes += [f"{stage}: Triton's onnxruntime backend gets its standard Q/DQ form (it cannot load the fused one), "
                  "whose gates judged its Q/DQ pairs run as written (TensorRT's arithmetic); ONNX Runtime may run them "
                  f"on its CPU int8 kernels instead, exact only on a CPU with {' or '.join(INT8_DOT_PRODUCT)}: serve it "
                  "on such CPUs, or with the python target"
                  for stage, entry in served.items()
                  if not options.on_gpu and str((entry.get("variant") or {}).get("fallback_judged_on", "")).startswith(
                      "Q/DQ run as written")]
    if options.target == "tensorrt" and options.prefix_cache_mb:  # asked for (the default is None)
        notes.append("prefix cache off: the TensorRT decoder's prefill profile has an empty past, so a prompt "
                     "cannot continue from cached K/V there (--prefix-cache-mb applies to the python and "
                     "onnxruntime targets)")
    if options.target == "tensorrt" and not manifest.get("engines"):
        if not configs_only:
            raise RepositoryError(f"{build_dir} has no TensorRT engines; build them on a GPU machine with TensorRT "
                                  "first, or render --configs-only (the python and onnxruntime targets run without)")
    elif options.target == "tensorrt":
        notes += check_engines(build_dir, manifest, configs, options)
    if options.target == "tensorrt":  # what the tensorrt backend needs of a config (profiles, GPU, batching)
        from ..engines.check import check_configs

        violations = check_configs(configs, manifest, build_dir)
        if violations:
            raise RepositoryError("the tensorrt configs break the backend's rules: " + "; ".join(
                f"{v.graph} {v.node}: {v.rule} ({v.detail})" for v in violations[:3]))
    with atomic_folder(out, force, RepositoryError, "model repository", _is_model_repository) as tmp:
        for name, text in pbtxt.items():
            (tmp / name).mkdir()
            (tmp / name / "config.pbtxt").write_text(text)
        if not configs_only:
            _model_files(tmp, build_dir, manifest, configs, options)
    if configs_only:
        missing = "the TensorRT plans" if options.target == "tensorrt" else "the model files"
        notes.append(f"configs only: {out} holds the config.pbtxt files; {missing} are missing (not loadable in Triton)")
    for note in notes:
        echo(note)
    return out


def _model_files(tmp: Path, build_dir: Path, manifest: dict, configs: dict[str, dict], options: RepositoryOptions) -> None:
    """Each model's version folder ``1/``: graphs or plans, python model code, tokenizers, the manifest."""
    for name in configs:
        (tmp / name / "1").mkdir()
    for stage, entry in target_graphs(manifest, options.target, options.on_gpu).items():
        graph = build_dir / entry["file"]
        if stage not in configs:  # the in-process decoder: its graph under its own name inside vlm/1/
            for rel in entry["sha256"]:
                _link_or_copy(build_dir / rel, tmp / "vlm" / "1" / Path(rel).name)
            continue
        if options.target == "tensorrt":
            _link_or_copy(build_dir / manifest["engines"][stage]["file"], tmp / stage / "1" / "model.plan")
            continue
        _link_or_copy(graph, tmp / stage / "1" / "model.onnx")
        data = graph.with_name(graph.name + ".data")
        if data.exists():  # external data keeps its file name, which the graph refers to
            _link_or_copy(data, tmp / stage / "1" / data.name)
        if options.target == "python":
            shutil.copy2(PYTHON_MODELS / "stage.py", tmp / stage / "1" / "model.py")
    if "preprocess" in configs:
        shutil.copy2(PYTHON_MODELS / "preprocess.py", tmp / "preprocess" / "1" / "model.py")
        shutil.copytree(build_dir / manifest["tokenizer"], tmp / "preprocess" / "1" / "processor")
    shutil.copy2(PYTHON_MODELS / "vlm.py", tmp / "vlm" / "1" / "model.py")
    shutil.copytree(build_dir / manifest["tokenizer"], tmp / "vlm" / "1" / "tokenizer")
    if manifest.get("image_text"):  # the image path's own tokenizer: the vlm model tokenizes for it
        folder = manifest["image_text"]["tokenizer"]
        shutil.copytree(build_dir / folder, tmp / "vlm" / "1" / folder)
    write_manifest(tmp / "vlm" / "1", {k: v for k, v in manifest.items() if k not in ("format", "version")})
