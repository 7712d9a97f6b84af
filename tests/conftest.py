"""Shared fixtures: tiny random models (built from configs, no network) and their builds."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# PyTorch's OpenMP threads busy-wait between parallel regions by default. On tiny test models
# nearly all of their time is that wait, burning the core the other xdist worker needs: a tiny
# LLaVA build's 32-token parity took 17 CPU-s spinning, 2.5 passive (2 cores, measured both ways
# alternately). libgomp reads this when torch loads it, so it is set before the first torch import
# (tiny_models below); subprocesses (CLI, tritonserver stubs) inherit it. Set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# ONNX Runtime's decoder sessions spin the same way (runners.OrtRunner): off for the tests, whose two
# workers share two cores (generation with the tiny decoder: 2.3 CPU-s spinning, 1.0 not). The
# python-target models under tritonserver inherit it too.
os.environ.setdefault("VLM_EXPORT_ORT_SPIN", "0")
# a bug's traceback, not the one line users get (tests assert that line where they mean it)
os.environ.setdefault("VLM_EXPORT_TRACEBACK", "1")


def _hf_image_processors_on_the_tools_backend() -> None:
    """The tool makes pixels on Pillow's backend (runtime.images.IMAGE_PROCESSOR_BACKEND); where torchvision is
    installed transformers would make the Hugging Face processors the tests compare with on torchvision's, a
    rounding step away. There, an image processor asked for no backend gets Pillow's (video processors, which have
    no Pillow backend, are left as they are). Nothing changes where torchvision is absent (CI)."""
    import importlib.util

    if importlib.util.find_spec("torchvision") is None:
        return
    from transformers.models.auto import image_processing_auto as auto

    resolve = auto._resolve_backend
    auto._resolve_backend = lambda backend, use_fast, base_class_name: resolve(
        backend if backend is not None or use_fast is not None else "pil", use_fast, base_class_name)


_hf_image_processors_on_the_tools_backend()

from tiny_models import make_tiny_blip2, make_tiny_instructblip, make_tiny_llava, make_tiny_mllama, make_tiny_prefix  # noqa: E402
from tiny_models import (make_tiny_blip2_t5, make_tiny_exaone4_5, make_tiny_got_ocr2, make_tiny_lfm3_vl,  # noqa: E402
                         make_tiny_minicpm_v)
from tiny_models import make_tiny_aya_vision, make_tiny_deepseek_vl, make_tiny_florence2  # noqa: E402
from tiny_models import (make_tiny_gemma3, make_tiny_gemma4, make_tiny_idefics3, make_tiny_internvl, make_tiny_paligemma,  # noqa: E402
                         make_tiny_llava_next, make_tiny_llava_onevision, make_tiny_mistral3,
                         make_tiny_cosmos3_edge, make_tiny_glm4v, make_tiny_hunyuan_vl, make_tiny_lighton_ocr,
                         make_tiny_paddleocr_vl, make_tiny_qwen2_vl)

# name -> (maker, kwargs): one per architecture family and text family the tests cover
TINY_MODELS = {
    "llava-llama": (make_tiny_llava, {"family": "llama"}),
    "llava-qwen2-full-multilayer": (make_tiny_llava, {"family": "qwen2", "strategy": "full", "feature_layer": [-2, -1]}),
    "llava-mistral": (make_tiny_llava, {"family": "mistral"}),
    "llava-siglip-qwen3": (make_tiny_llava, {"family": "qwen3", "tower": "siglip", "strategy": "full", "feature_layer": -1}),
    "llava-gemma3": (make_tiny_llava, {"family": "gemma3", "hf_processor": True}),  # saved as llava-hf checkpoints are
    # LLaVA-1.5's own tokenizer kind: Llama 2's SentencePiece BPE with byte fallback
    "llava-llama2-tokenizer": (make_tiny_llava, {"family": "llama", "hf_processor": True, "sentencepiece": True}),
    "llava-phi3-longrope": (make_tiny_llava, {"family": "phi3-longrope"}),
    "llava-phi": (make_tiny_llava, {"family": "phi"}),
    "llava-gemma2": (make_tiny_llava, {"family": "gemma2"}),
    "llava-cohere": (make_tiny_llava, {"family": "cohere"}),
    "llava-glm": (make_tiny_llava, {"family": "glm"}),
    "llava-gptj": (make_tiny_llava, {"family": "gptj"}),
    "llava-stablelm-qknorm": (make_tiny_llava, {"family": "stablelm-qknorm"}),
    "llava-llama-head24": (make_tiny_llava, {"family": "llama-head24"}),
    "llava-gptneox": (make_tiny_llava, {"family": "gptneox"}),
    "llava-falcon-mq": (make_tiny_llava, {"family": "falcon-mq"}),
    "llava-mixtral": (make_tiny_llava, {"family": "mixtral"}),
    "llava-llama-dynamic-rope": (make_tiny_llava, {"family": "llama-dynamic-rope"}),
    "llava-granite": (make_tiny_llava, {"family": "granite"}),
    "llava-olmo2": (make_tiny_llava, {"family": "olmo2"}),
    "llava-starcoder2": (make_tiny_llava, {"family": "starcoder2"}),
    # sizes unlike every other fixture's (the adapters must read them from the config): 8 query heads of 12
    # over 2 KV heads (8 x 12 = 96 != hidden 72), 3 layers, SigLIP at 30 px in patches of 10 with 3 heads
    # of 12, every patch kept from the last layer
    "llava-odd-shapes": (make_tiny_llava, {
        "family": "mistral", "tower": "siglip", "strategy": "full", "feature_layer": -1, "image_size": 30,
        "text_sizes": {"hidden_size": 72, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 12,
                       "num_hidden_layers": 3, "intermediate_size": 144},
        "vision_sizes": {"patch_size": 10, "hidden_size": 36, "intermediate_size": 72, "num_attention_heads": 3}}),
    # ViP-LLaVA: three of the tower's hidden states side by side (CLS rows dropped), a LayerNorm + MLP projector, as
    # llava-hf's vip-llava checkpoints are saved (LlavaProcessor, LLaVA-1.5's template)
    "vipllava": (make_tiny_llava, {"vip": True, "hf_processor": True, "feature_layer": [-2, 0, -1]}),
    "prefix-llama": (make_tiny_prefix, {"family": "llama"}),
    "blip2-opt": (make_tiny_blip2, {"family": "opt"}),  # (BLIP-2 over Llama: instructblip-llama's Q-Former and LM)
    "instructblip-llama": (make_tiny_instructblip, {}),
    "instructblip-t5": (make_tiny_instructblip, {"family": "t5"}),
    "mllama": (make_tiny_mllama, {}),
    "blip2-t5": (make_tiny_blip2_t5, {}),
    "florence2": (make_tiny_florence2, {}),
    "gemma3": (make_tiny_gemma3, {}),  # Gemma3ForConditionalGeneration: image blocks attend both ways
    # Gemma 4: patches of any image size pooled into cells; K/V heads and head sizes that differ by layer, shared K/V
    # layers, per-layer input embeddings, image blocks both ways on the sliding layers only
    "gemma4": (make_tiny_gemma4, {}),
    # Gemma 4 E2B / E4B's text model: images attend causally (the layers that write K/V fused, the shared ones not)
    "gemma4-causal": (make_tiny_gemma4, {"text_sizes": {"use_bidirectional_attention": None}}),
    # its pan and scan: a photo 1.5 times as wide as high given whole and as 2 crops, each one more image
    "gemma3-pan-and-scan": (make_tiny_gemma3, {"pan_and_scan": {"pan_and_scan_min_crop_size": 32,
                                                                "pan_and_scan_max_num_crops": 3}}),
    # PaliGemmaForConditionalGeneration, prefix LMs (the prompt attends both ways): PaliGemma 2 and 1
    "paligemma2": (make_tiny_paligemma, {"family": "gemma2"}),
    "paligemma": (make_tiny_paligemma, {"family": "gemma"}),
    # images cut into tiles by their processor (a grid that follows each image's size, plus the whole image):
    # Idefics3 (2 x 2 tiles at most, 4 rows each) and SmolVLM (3 x 3, patches of 4, a pixel shuffle of 4)
    "idefics3": (make_tiny_idefics3, {"family": "idefics3"}),
    "smolvlm": (make_tiny_idefics3, {"family": "smolvlm", "patch_size": 4, "scale_factor": 4, "longest_edge": 96}),
    # InternVL (Hugging Face form): up to 4 tiles by aspect ratio and a thumbnail, one run of tokens per image
    "internvl": (make_tiny_internvl, {}),
    # GOT-OCR 2.0: a SAM-style ViTDet tower (256 rows per page, as the processor writes), strided-convolution projector,
    # Qwen2; no chat template (the processor writes the conversation; the adapter gives its form as one)
    "got_ocr2": (make_tiny_got_ocr2, {}),
    # Qianfan-OCR: InternVL's image path under its own classes (a Qwen3 LM), an image written as "<image>" and replaced
    # by its processor (QianfanOCRProcessor, which loads without torchvision)
    "qianfan_ocr": (make_tiny_internvl, {"family": "qianfan_ocr"}),
    # Aya Vision: InternVL's tiles over SigLIP, each tile and the thumbnail named in the text, a SwiGLU projector, Cohere 2
    "aya_vision": (make_tiny_aya_vision, {}),
    # DeepSeek-VL (SigLIP, an MLP aligner, Llama) and Janus (its own tower; begin/end-of-image tokens around each image)
    "deepseek_vl": (make_tiny_deepseek_vl, {}),
    "janus": (make_tiny_deepseek_vl, {"family": "janus"}),
    # patches of any count per image (Qwen2VLImageProcessor) and M-RoPE positions: Qwen2-VL, and Qwen2.5-VL with its
    # windowed vision blocks
    "qwen2_vl": (make_tiny_qwen2_vl, {}),
    "qwen2_5_vl": (make_tiny_qwen2_vl, {"family": "qwen2_5_vl"}),
    "qwen3_vl": (make_tiny_qwen2_vl, {"family": "qwen3_vl"}),
    "qwen3_vl_moe": (make_tiny_qwen2_vl, {"family": "qwen3_vl_moe"}),
    # Qwen3.5: Qwen3-VL's image path without deepstack over gated delta-nets (per-row fixed-size states) and a gated
    # attention layer
    "qwen3_5": (make_tiny_qwen2_vl, {"family": "qwen3_5"}),
    # LFM3-VL: Qwen2-VL's patches under a tower of grid convolutions and attention, an LM of gated short convolutions
    # (per-row fixed-size states) beside sliding-window and full attention, one-stream positions
    "lfm3_vl": (make_tiny_lfm3_vl, {}),
    # EXAONE 4.5: Qwen2.5-VL's windowed tower with grouped-query attention, an EXAONE 4 LM (a sliding layer with the
    # rotary, a full one without), one-stream positions; LLaVA-OneVision-1.5: RiceViT (a class token per image) + Qwen3
    "exaone4_5": (make_tiny_exaone4_5, {}),
    "llava_onevision1_5": (make_tiny_exaone4_5, {"family": "llava_onevision1_5"}),
    # GLM-4.1V: Qwen2-VL's patches and M-RoPE with its own tower (a position grid resampled bicubically) and a GLM-4
    # LM (pairwise rotary over half of each head); GLM-4.5V's form over a GLM-4-MoE LM
    "glm4v": (make_tiny_glm4v, {}),
    "glm4v_moe": (make_tiny_glm4v, {"family": "glm4v_moe"}),
    "glm_ocr": (make_tiny_glm4v, {"family": "glm_ocr"}),  # no position grid, q/k normed per head in the tower
    # PaddleOCR-VL: Qwen2-VL's patches and M-RoPE, patches given row-major, a SigLIP tower with a half-pixel grid
    "paddleocr_vl": (make_tiny_paddleocr_vl, {}),
    # HunYuanVL (HunyuanOCR): patches row-major under a SigLIP tower, a merger that frames each image (newline, begin and
    # end rows), a HunYuan dense LM with XD-RoPE positions in four streams
    "hunyuan_vl": (make_tiny_hunyuan_vl, {}),
    # MiniCPM-V 4.6: an overview and slices of any size, a SigLIP tower with a window-attention merger, a 2 x 2 merge
    # MLP (16 patches per token), Qwen3.5's hybrid LM with plain positions (MiniCPM-OCR's 4x form: test_minicpm_v)
    "minicpm_v": (make_tiny_minicpm_v, {}),
    "minicpm_v4_7": (make_tiny_minicpm_v, {"family": "minicpmv4_7"}),  # its positions on a canvas of the image
    # Cosmos3 Edge: Qwen2-VL's patches and M-RoPE (interleaved), a SigLIP2 tower with an antialiased resized grid, a
    # Llama-style LM with a ReLU² MLP without a gate
    "cosmos3_edge": (make_tiny_cosmos3_edge, {}),
    "mistral3": (make_tiny_mistral3, {}),
    "llava_pixtral": (make_tiny_mistral3, {"llava": True, "longest_edge": 32}),  # every patch a token: 64 at most
    # LightOnOCR: Mistral 3's image path under other module names, the last hidden state, a Qwen3 LM, one image token
    # per merge block and no row-break or end token
    "lighton_ocr": (make_tiny_lighton_ocr, {}),
    # LLaVA-NeXT: images resized into the best of three resolutions, cut into tiles plus the whole image, rows packed
    # by each image's size with a newline per row of the picture
    "llava_next": (make_tiny_llava_next, {}),
    # LLaVA-NeXT-Video, its image path: LLaVA-NeXT's under its classes (its video path not exported)
    "llava_next_video": (make_tiny_llava_next, {"video": True}),
    # LLaVA-OneVision: the same tiles over SigLIP and Qwen2, a packed picture past 2 tiles' rows shrunk (bilinear)
    "llava_onevision": (make_tiny_llava_onevision, {}),
}


# What each tiny build's parity runs (tiny_build): half the default tokens on half the default samples. The
# generation is about a third of a tiny build's CPU time and 54 builds are a third of the suite's; the default
# samples' three photos (square, wide, tall) and a text-only prompt are all still there, and 16 tokens are past
# every tiny model's cache steps and windows that matter.
TINY_PARITY_TOKENS = 16


#: the tiny builds' max_sequence where 256 tokens do not hold two images and the answer: GOT-OCR's 256 rows per page
TINY_MAX_SEQUENCE = {"got_ocr2": 640}


def tiny_samples(max_images: int) -> list:
    """The default parity samples cut to three: one photo alone, text only, and the other two photos together (each
    alone where a build takes one image)."""
    from vlm_export.compare.parity import default_samples

    by_label = {sample.label: sample for sample in default_samples(max_images)}
    return [by_label["astronaut"], by_label["text-only"],
            *([by_label["two-images"]] if max_images >= 2 else [by_label["chelsea"], by_label["coffee"]])]


def _shared_folder(tmp_path_factory, name: str) -> Path:
    """A folder every pytest-xdist worker of this run shares (each worker's basetemp is a child of
    the run's), so what one worker makes the others reuse instead of making it again."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = root / name
    folder.mkdir(exist_ok=True)
    return folder


def _stage_fingerprint(stage) -> str | None:
    """A hash of everything the ONNX export of ``stage`` depends on in this process: its name and
    declared I/O, its example inputs, every submodule's class and attributes (HF configs included),
    every parameter and buffer's bytes and which of them are tied. None when an attribute has no
    value-based form (an object known only by its address): such a stage is always exported."""
    import hashlib

    import torch

    h = hashlib.sha256()

    def norm(value):
        if isinstance(value, torch.Tensor):
            flat = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            return ("tensor", str(value.dtype), tuple(value.shape), hashlib.sha256(flat.tobytes()).hexdigest())
        if isinstance(value, dict):
            return ("dict", [(norm(k), norm(v)) for k, v in value.items()])
        if isinstance(value, (list, tuple)):
            return (type(value).__name__, [norm(v) for v in value])
        if callable(value) and hasattr(value, "__qualname__") and not isinstance(value, type):
            return ("callable", getattr(value, "__module__", ""), value.__qualname__)
        text = repr(value)
        if " at 0x" in text:
            raise LookupError(text[:200])
        return text

    try:
        h.update(repr((stage.name, stage.spec.to_dict(), norm(tuple(stage.example_inputs)))).encode())
        for name, module in stage.module.named_modules(remove_duplicate=False):
            # hook dicts are keyed by ids that count up per model load: their functions alone
            attrs = {k: (list(v.values()) if k.endswith("hooks") and isinstance(v, dict) else v)
                     for k, v in vars(module).items() if k not in ("_parameters", "_buffers", "_modules")}
            h.update(repr((name, type(module).__module__, type(module).__qualname__, norm(attrs))).encode())
        first: dict[int, str] = {}
        for name, tensor in [*stage.module.named_parameters(remove_duplicate=False),
                             *stage.module.named_buffers(remove_duplicate=False)]:
            h.update(repr((name, first.setdefault(id(tensor), name), norm(tensor))).encode())
    except LookupError:
        return None
    return h.hexdigest()


_EXPORTED: list[str] = []  # stages this worker really exported since the last test (VLM_EXPORT_TEST_CPU_LOG)


@pytest.fixture(scope="session", autouse=True)
def _shared_exports(tmp_path_factory):
    """Builds of the same tiny model (a shared build, precision variants, a failed-parity build, a
    --force rebuild ...) export the same stage modules again, and the export is most of a tiny
    build's CPU time (about 19 of 25 CPU-s for tiny LLaVA). Each distinct stage (_stage_fingerprint:
    same weights, classes, attributes and declared I/O) is exported by the real exporter once per
    test run, whatever the worker; a later build receives a copy of that graph and goes on to judge
    it by its own parity as before. The key holds no code: a test that patches a stage's forward
    and then builds gets the unpatched graph (none does). VLM_EXPORT_TEST_EXPORT_CACHE=0 exports
    every time."""
    import shutil

    from filelock import FileLock

    import vlm_export.build as build_module

    if os.environ.get("VLM_EXPORT_TEST_EXPORT_CACHE", "1") == "0":
        yield
        return
    shared = _shared_folder(tmp_path_factory, "stage-exports")
    real_export = build_module.export_stage

    def export_once(stage, out_dir: Path, opset: int = 18) -> Path:
        key = _stage_fingerprint(stage)
        if key is None:
            _EXPORTED.append(f"{stage.name}(no key)")
            return real_export(stage, out_dir, opset)
        cached = shared / f"{key}-opset{opset}"
        out_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cached) + ".lock"):
            if not (cached / ".done").exists():
                _EXPORTED.append(stage.name)
                path = real_export(stage, out_dir, opset)
                shutil.rmtree(cached, ignore_errors=True)
                cached.mkdir()
                for f in (path, path.with_name(path.name + ".data")):
                    if f.exists():
                        shutil.copy2(f, cached / f.name)
                (cached / ".done").touch()
                return path
            for f in cached.iterdir():  # copies, not links: a test may rewrite its build's graphs
                if f.name != ".done":
                    shutil.copy2(f, out_dir / f.name)
        return out_dir / f"{stage.name}.onnx"

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build_module, "export_stage", export_once)
        yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Tiny random models by name (TINY_MODELS), made once per test run, whatever the worker."""
    from filelock import FileLock

    import tiny_models

    shared = _shared_folder(tmp_path_factory, "tiny-models")
    tiny_models.SHARED_TOKENIZER_DIR = _shared_folder(tmp_path_factory, "smollm2-tokenizer")

    def get(name: str) -> Path:
        path = shared / name
        with FileLock(str(path) + ".lock"):
            if not (path / ".made").exists():
                maker, kwargs = TINY_MODELS[name]
                path.mkdir(exist_ok=True)
                maker(path, **kwargs)
                (path / ".made").touch()
        return path

    return get


def _freeze_the_heap() -> None:
    """What lives after a build (modules, caches: 300-700 thousand objects) moved out of the collector's sight, so
    each later full collection - a build runs four of its own, and Python its automatic ones - scans only what came
    since: 0.45 CPU-s each after the first tiny build here, none after the freeze. The garbage is collected first, so
    only live objects are frozen."""
    import gc

    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def tiny_build(tiny_model_dir, tmp_path_factory):
    """Builds (export + parity on ``tiny_samples``) of the tiny models, made once per test run, whatever the worker.
    A build folder exists only once its build succeeded (build() writes it atomically)."""
    from filelock import FileLock

    from vlm_export.adapters import adapter_for
    from vlm_export.build import BuildOptions, BuildResult, build
    from vlm_export.manifest import read_manifest

    shared = _shared_folder(tmp_path_factory, "tiny-builds")

    def get(name: str) -> BuildResult:
        out = shared / name
        with FileLock(str(out) + ".lock"):
            if not out.exists():
                folder = tiny_model_dir(name)
                samples = tiny_samples(min(2, adapter_for(folder).max_images or 2))  # as build() bounds max_images
                result = build(folder, out, BuildOptions(max_sequence=TINY_MAX_SEQUENCE.get(name, 256),
                                                         parity_new_tokens=TINY_PARITY_TOKENS, samples=samples))
                _freeze_the_heap()
                return result
        manifest = read_manifest(out)
        return BuildResult(out, manifest, manifest["parity"]["failures"])

    return get


@pytest.fixture(scope="session")
def llava_server(tiny_build, tmp_path_factory):
    """(build path, server): ONE tritonserver serving the python repository of the tiny llava build,
    shared by the test modules that send it requests (a vlm model takes 20-60 s to load on a loaded
    2-core machine). Its tests send one request at a time or compare deltas of its metrics. Stopped,
    its whole process group, when the session ends; ``start`` leaves nothing behind when it fails."""
    from vlm_export.model_repository.render import RepositoryOptions, render_repository
    from vlm_export.serve.server import TritonServer

    build = tiny_build("llava-llama").path
    repo = render_repository(build, tmp_path_factory.mktemp("repo") / "repo", RepositoryOptions(vlm_instances=1))
    with TritonServer(repo, log_file=tmp_path_factory.mktemp("log") / "triton.log") as server:
        yield build, server


class CliResult:
    """What a CLI run gave: exit code, stdout, stderr."""

    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture
def run_cli(capsys):
    """The CLI in this process (``main(argv)``, what the console script calls): seconds cheaper than a
    process per case; an exception escaping ``main`` fails the test as a traceback would.
    (test_cli_errors runs the real process once.)"""
    from vlm_export.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run


def a_word_spelt_in(tokenizer, text: str, token_ids) -> str:
    """A word of ``text`` whose bad-words spelling (``bad_words_token_ids``) is in ``token_ids``: banning
    it must change that answer. Prefers one with two spellings (with and without its space)."""
    from vlm_export.runtime.generate import bad_words_token_ids

    def spelt(word):
        return [ids for ids in bad_words_token_ids(tokenizer, [word])
                if any(tuple(token_ids[i:i + len(ids)]) == ids for i in range(len(token_ids)))]

    words = [w for w in text.split() if spelt(w)]
    assert words, f"no word of {text!r} is spelt in its tokens as bad_words spells it"
    return next((w for w in words if len(bad_words_token_ids(tokenizer, [w])) == 2), words[0])


def recorded_notes():
    """A build's progress that keeps the one-line notes it prints (``.lines``), for tests that read them."""
    from vlm_export.progress import Progress

    class Notes(Progress):
        def __init__(self):
            self.lines: list[str] = []

        def note(self, text: str) -> None:
            self.lines.append(text)

    return Notes()


def assert_one_line_error(result: CliResult, *needles: str) -> None:
    """A non-zero exit and exactly one ``error:`` line holding every needle, no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def pipeline_failing_on(pipe, poison: str = "poison"):
    """``pipe`` with its decoder wrapped by an injected fault: a prefill whose ids hold a token of
    ``poison`` (one that "Tell me a story." lacks) raises RunnerError; everything else runs on the
    real runner."""
    from vlm_export.errors import RunnerError
    from vlm_export.runtime.pipeline import VLMPipeline
    from vlm_export.runtime.runners import Runner

    marker = next(iter(set(pipe.prompt_ids(poison, 0)) - set(pipe.prompt_ids("Tell me a story.", 0))))

    class FailOnMarker(Runner):
        backend = "faulty"

        def __init__(self, inner):
            super().__init__(inner.name, inner.input_names, inner.output_names)
            self.inner = inner

        def _run(self, feeds):
            if feeds["input_ids"].shape[1] > 1 and marker in feeds["input_ids"]:
                raise RunnerError("lm_decoder: injected failure")
            return self.inner.infer(feeds)

    name = pipe.scheme.decoder_stage
    return VLMPipeline({**pipe.runners, name: FailOnMarker(pipe.runners[name])}, pipe.stages, pipe.scheme,
                       pipe.tokenizer, pipe.image_processor, pipe.layout, pipe.limits, pipe.eos_token_ids)


def stage_weights(result, stage: str) -> list:
    """The initializers of a build's graph for ``stage`` (its standard form), as numpy arrays."""
    import onnx
    from onnx import numpy_helper

    return [numpy_helper.to_array(i) for i in onnx.load(result.path / result.manifest["graphs"][stage]["file"]).graph.initializer]


def holds_weight(arrays, weight) -> bool:
    """Whether one of ``arrays`` is ``weight`` (or its transpose: a MatMul's weight is stored transposed)."""
    import numpy as np

    return any(a.shape == w.shape and np.array_equal(a, w) for a in arrays for w in (weight, weight.T))


def random_photo(seed: int, size=(40, 52)):
    """A random RGB photo of ``size`` (height, width), the same for a seed."""
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def photos(sizes, n: int, first: int = 0) -> list:
    """``n`` random photos going round ``sizes``: the k-th of seed ``first + k`` and size
    ``sizes[(first + k) % len(sizes)]``."""
    return [random_photo(first + k, sizes[(first + k) % len(sizes)]) for k in range(n)]


def requests_of_every_size(sizes) -> list:
    """(prompt, images) requests: one photo of each size, two photos in one turn, and text alone."""
    return ([("What is in the picture?", photos(sizes, 1, k)) for k in range(len(sizes))]
            + [(TWO_IMAGE_TURNS, photos(sizes, 2, 3)), ("Tell me a story.", [])])


def photo_files(folder: Path, sizes) -> list[Path]:
    """``random_photo(k, size)`` for each size, saved as PNG files in ``folder``."""
    paths = []
    for k, size in enumerate(sizes):
        paths.append(Path(folder) / f"photo-{k}.png")
        random_photo(k, size).save(paths[-1])
    return paths


def served_build(build: Path, folder: Path):
    """The python repository of ``build`` rendered into ``folder`` and served by a real tritonserver (a context
    manager giving the server)."""
    from vlm_export.model_repository.render import render_repository
    from vlm_export.serve.server import TritonServer

    return TritonServer(render_repository(build, Path(folder) / "repo"), log_file=Path(folder) / "triton.log")


#: one user turn with two images between words (a prompt whose images are not all at its start)
TWO_IMAGE_TURNS = [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                                {"type": "text", "text": "and"}, {"type": "image"}]}]


#: conversations of the shapes an adapter's prompt must take as its processor does: one image, two, an earlier turn
#: with its image and answer, none
CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "and"},
                                  {"type": "image"}]}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
     {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
     {"role": "user", "content": [{"type": "text", "text": "What colour is it?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
]
CONVERSATION_IDS = ["one image", "two images", "conversation", "text only"]


def check_served_as_in_process(build: Path, folder: Path, sizes, over_http: bool = False, also=None) -> None:
    """``build``'s python repository served by a real tritonserver (its prefix cache on, as served by default), asked
    about photos of ``sizes``: three requests at once over gRPC (the first photo, the second, the last two together),
    over HTTP too where asked (base64 images), then a conversation's second turn that starts with the first's image
    (the last photo) and answer (a prefill continued after a cached prefix): every answer ``generate``'s in process.
    ``also(server, paths)``: more checks on the same server (one start less)."""
    from concurrent.futures import ThreadPoolExecutor

    from vlm_export.client.client import VLMClient
    from vlm_export.runtime.generate import GenerationConfig, generate
    from vlm_export.runtime.load import open_build

    pipe = open_build(build)
    paths = photo_files(folder, sizes)
    asks = [("What is in the picture?", [paths[0]]), ("Describe it.", [paths[1]]), ("Compare them.", paths[-2:])]
    first = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    config = GenerationConfig(max_new_tokens=8)
    expected = [generate(pipe, q, list(images), config).text for q, images in asks]
    with served_build(build, folder) as server:
        client = VLMClient(f"grpc://{server.grpc_url}")
        with ThreadPoolExecutor(len(asks)) as pool:
            assert list(pool.map(lambda ask: client.generate(ask[0], ask[1], max_tokens=8).text, asks)) == expected
        if over_http:
            http = VLMClient(f"http://{server.http_url}")
            assert [http.generate(q, images, max_tokens=8).text for q, images in asks] == expected
        answer = client.generate(messages=first, images=[paths[-1]], max_tokens=8).text
        turns = [*first, {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                 {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]}]
        second = client.generate(messages=turns, images=[paths[-1]], max_tokens=8).text
        if also is not None:
            also(server, paths)
    assert answer == generate(pipe, first, [paths[-1]], config).text
    assert second == generate(pipe, turns, [paths[-1]], config).text


def check_prompt_ids_are_the_loaded_processors(folder, pipe, turns, images):
    """For a processor that loads without torchvision (PaddleOCR-VL's, LightOnOCR's): prompt ids = its own on the chat
    template's text (``turns``, or a string as one user turn) and ``images``. Returns (the processor, its output)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    messages = turns if isinstance(turns, list) else [{"role": "user", "content": turns}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    theirs = processor(text=[text], images=images or None, return_tensors="np")
    assert pipe.prompt_ids(turns, images) == theirs["input_ids"][0].tolist()
    return processor, theirs


def check_raster_prompt_and_patches_are_the_loaded_processors(folder, pipe, turns, images) -> None:
    """For a processor that loads without torchvision and gives each image's patches row-major (PaddleOCR-VL's,
    HunYuanVL's: ``ImagePatches.raster``): prompt ids = its own (``check_prompt_ids_are_the_loaded_processors``), and
    the image path's rows of patches hold its patches, each at its place, and nothing else."""
    import numpy as np

    _, theirs = check_prompt_ids_are_the_loaded_processors(folder, pipe, turns, images)
    if not images:
        return
    pixels = pipe.pixel_values(images)
    real = pixels["patch_mask"].astype(bool)
    start = 0
    for k, (_, h, w) in enumerate(theirs["image_grid_thw"]):
        raster = theirs["pixel_values"][start:start + h * w].reshape(h, w, -1)
        places = pixels["patch_positions"][k][real[k]]
        np.testing.assert_array_equal(pixels["pixel_values"][k][real[k]], raster[places[:, 0], places[:, 1]])
        start += h * w
    assert not pixels["pixel_values"][~real].any()


def check_prompt_ids_and_tiles_are_the_processors(pipe, folder, turns, sizes) -> None:
    """For a processor that loads (Aya Vision's, Qianfan-OCR's: InternVL's tiles counted by ``num_patches``): over
    photos of ``sizes`` (as many per request as ``turns`` has image parts, starting at each size but the last), the
    prompt ids and tiles equal to its ``apply_chat_template``'s, one row of image tokens per tile."""
    import numpy as np
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    n = sum(p["type"] == "image" for m in turns for p in m["content"])
    for first in range(len(sizes) - 1 if n else 1):
        images = photos(sizes, n, first)
        theirs = processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="np", **({"images": images} if images else {}))
        ids = pipe.prompt_ids(turns, images)
        assert ids == theirs["input_ids"][0].tolist()
        if images:
            np.testing.assert_array_equal(pipe.pixel_values(images), theirs["pixel_values"])
            assert ids.count(pipe.layout.image_token_id) == len(theirs["pixel_values"]) * pipe.layout.tokens_per_image


def check_prompt_ids_and_patches_are_the_processors(pipe, folder, turns, images, replace_image_token,
                                                    image_token: str) -> tuple[list[int], dict, str]:
    """For a processor that needs torchvision to load (its video processor: Qwen2-VL's, GLM-4V's), its pieces called as
    it calls them: prompt ids = the tokenizer on the chat template's text with each image token replaced by
    ``replace_image_token`` over the image processor's output; the image path's rows of patches hold the image
    processor's patches, in order, and nothing else. Returns (the ids, the image processor's output, the text)."""
    from types import SimpleNamespace

    import numpy as np
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer, image_processor = AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder)
    theirs = image_processor(images=images, return_tensors="np")
    processor = SimpleNamespace(image_token=image_token, image_processor=image_processor)
    strings = [replace_image_token(processor, theirs, k) for k in range(len(images))]
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    parts = text.split(image_token)
    ids = pipe.prompt_ids(turns, images)
    assert ids == tokenizer(parts[0] + "".join(s + p for s, p in zip(strings, parts[1:])))["input_ids"]
    pixels = pipe.pixel_values(images)
    real = pixels["patch_mask"].astype(bool)
    np.testing.assert_array_equal(pixels["pixel_values"][real], theirs["pixel_values"])
    assert not pixels["pixel_values"][~real].any()
    return ids, theirs, text


def check_text_model_is_a_causal_lm(folder, out, model_type: str) -> None:
    """The LM alone that the adapter writes for the peers (llama.cpp, onnxruntime-genai) loads as a Hugging Face
    causal LM of ``model_type`` and gives the VLM's logits on text."""
    import torch
    from transformers import AutoModelForCausalLM

    from vlm_export.adapters import adapter_for

    loaded = adapter_for(folder).load(folder)
    lm = AutoModelForCausalLM.from_pretrained(loaded.adapter.write_text_model(loaded, out)).eval()
    assert lm.config.model_type == model_type
    ids = torch.tensor([[5, 17, 300, 41, 9, 1000]])
    with torch.no_grad():
        torch.testing.assert_close(lm(ids).logits, loaded.model(input_ids=ids).logits, atol=1e-5, rtol=0)


def check_patch_rows_equal_hf(loaded, images) -> tuple:
    """An adapter of rows of patches (``contract.ImagePatches``: Qwen2-VL's and its kin, Gemma 4's): its split vision
    tower and projector on a padded batch of ``images`` give Hugging Face's ``get_image_features`` on the processor's
    own output (the patches with their grids, or Gemma 4's padded rows with their places), with each deepstack level
    beside the rows, where the model has them. Returns (the processor's flat output, the arranged rows, the
    projector's rows, the deepstack levels)."""
    import numpy as np
    import torch

    from vlm_export.runtime.images import ImageLimits, processed_images

    adapter = loaded.adapter
    layout, scheme = adapter.prompt_layout(loaded), adapter.scheme(loaded)
    flat = processed_images(loaded.image_processor, images, ImageLimits())
    arranged = layout.image_tiles.arranged(dict(flat))
    vision, projector = adapter.stages(loaded)[:2]
    with torch.no_grad():
        rows = projector.module(vision.module(*(torch.from_numpy(arranged[t.name]) for t in vision.spec.inputs)))
        places = flat["image_grid_thw"] if "image_grid_thw" in flat else flat["image_position_ids"]
        theirs = loaded.model.model.get_image_features(torch.from_numpy(flat["pixel_values"]), torch.from_numpy(places))
    levels = getattr(theirs, "deepstack_features", None) or []
    want = torch.cat([torch.cat(list(level)) for level in [theirs.pooler_output, *levels]], dim=-1)
    placed = scheme.image_input_from_values({"image_embeds": rows.numpy(), **arranged})
    placed = getattr(placed, "rows", placed)  # M-RoPE's image input carries each row's place beside it
    np.testing.assert_allclose(placed, want.numpy(), atol=2e-5, rtol=0)
    return flat, arranged, rows.numpy(), len(levels)


def check_padded_image_rows_equal_hf(loaded, images, **feature_settings) -> None:
    """An adapter of rows of patches cut from the processor's padded images (Mistral 3's kin: pixel_values [images, 3,
    H, W] with ``image_sizes``): its split tower and projector on ``images``, the rows of padding dropped by the
    scheme, give Hugging Face's ``get_image_features`` (with ``feature_settings``: which layers, which strategy)."""
    import numpy as np
    import torch

    from vlm_export.runtime.images import ImageLimits, processed_images

    adapter = loaded.adapter
    layout, scheme = adapter.prompt_layout(loaded), adapter.scheme(loaded)
    flat = processed_images(loaded.image_processor, images, ImageLimits(), layout.image_tiles)
    arranged = layout.image_tiles.arranged(dict(flat))
    vision, projector = adapter.stages(loaded)[:2]
    with torch.no_grad():
        rows = projector.module(vision.module(*(torch.from_numpy(arranged[t.name]) for t in vision.spec.inputs)))
        sizes = torch.from_numpy(np.asarray(flat["image_sizes"]))
        want = loaded.model.model.get_image_features(torch.from_numpy(flat["pixel_values"]), image_sizes=sizes,
                                                     **feature_settings).pooler_output
    got = scheme.image_input_from_values({"image_embeds": rows.numpy(), **arranged})
    np.testing.assert_allclose(got, torch.cat(list(want)).numpy(), atol=2e-5, rtol=0)


def check_rows_positions_and_largest_image(folder, images, start: str, end: str) -> None:
    """For a model of rows of patches with M-RoPE (Qwen2-VL's kin): image rows = Hugging Face's
    (``check_patch_rows_equal_hf``), positions = its ``get_rope_index``'s around the config's ``start`` / ``end``
    token ids (``check_mrope_positions_equal_hf``), and the largest of ``images`` exactly the adapter's most tokens
    per image (the processor's own limit, as the adapter reads it)."""
    from vlm_export.adapters import adapter_for

    loaded = adapter_for(folder).load(folder)
    layout = loaded.adapter.prompt_layout(loaded)
    flat, arranged, rows, _ = check_patch_rows_equal_hf(loaded, images)
    assert max(layout.image_tiles.tokens(grid) for grid in layout.image_tiles.grids(flat)) == layout.tokens_per_image
    cfg = loaded.config
    check_mrope_positions_equal_hf(loaded, flat, arranged, rows, getattr(cfg, start), getattr(cfg, end))


def check_mrope_positions_equal_hf(loaded, flat, arranged, rows, start: int, end: int) -> None:
    """The ``spliced_mrope`` scheme's positions for a left-padded prefill of three prompts over the first four
    images of ``flat`` (two with their start and end tokens, one without its start, none) are the model's own
    ``get_rope_index``'s, and each row's next position is its length plus Hugging Face's delta."""
    import numpy as np
    import torch

    from vlm_export.contract.spliced import PRESENT_STATES, named_states

    scheme, layout, token = loaded.adapter.scheme(loaded), loaded.adapter.prompt_layout(loaded), \
        loaded.config.image_token_id
    counts = [layout.image_tiles.tokens(grid) for grid in layout.image_tiles.grids(flat)]
    prompts = [[7, start, *[token] * counts[0], end, 8, 9, start, *[token] * counts[1], end, 10],
               [11, 12],
               [start, *[token] * counts[2], end, *[token] * counts[3], 13]]  # the second image without its start
    feeds = scheme.prefill_feeds(prompts, scheme.join_image_inputs([
        scheme.image_input_from_values({"image_embeds": rows[k:k + 1],
                                        **{n: arranged[n][k:k + 1] for n in ("patch_positions", "patch_mask")}})
        for k in range(4)]))
    ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    theirs, deltas = loaded.model.model.get_rope_index(ids, (ids == token).int() * mask.int(),
                                                       image_grid_thw=torch.from_numpy(flat["image_grid_thw"][:4]),
                                                       attention_mask=mask)
    real = mask.bool().numpy()
    np.testing.assert_array_equal(feeds["position_ids"][:, real], theirs.numpy()[:, real])
    outputs = {n: np.zeros((3, 1, len(ids[0]), 1), np.float32) for n in scheme.present_names}
    outputs.update({n: np.zeros((3, *s.shape), np.float32)  # a hybrid LM's fixed-size states (Qwen3.5's)
                    for n, s in named_states(scheme.geometry, PRESENT_STATES)})
    state = scheme.prefill_state(outputs, [len(p) for p in prompts], feeds)
    np.testing.assert_array_equal(state.positions, deltas.reshape(-1).numpy() + [len(p) for p in prompts])


def check_prefix_cache_equal_a_full_prefill(pipe, turn, images) -> None:
    """A spliced scheme of rows of patches (with places: M-RoPE's kin; or one stream) continuing from a cached
    prefix: with the cache the greedy tokens are those without (first sight, repeats, a conversation's next turn on
    its first ``turn`` and answer); a continued prefill's logits, K/V and next positions are the whole prefill's at
    cuts before, inside and after an image's rows; the same text over another second image shares keys through the
    first image and parts within the second. ``images``: three lists of one photo each, of different sizes."""
    import numpy as np

    from vlm_export.runtime.generate import GenerationConfig, generate, image_input_for
    from vlm_export.runtime.prefix_cache import PrefixCache

    config = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    requests = [(turn, images[0]), (turn, images[1]), (TWO_IMAGE_TURNS, images[1] + images[2]), ("Say hello.", [])]
    expected = [generate(pipe, p, i, config).token_ids for p, i in requests]
    first = generate(pipe, turn, images[0], config)
    follow_up = turn + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And the title?"}]
    expected_follow_up = generate(pipe, follow_up, images[0], config).token_ids
    pipe.prefix_cache = cache = PrefixCache(64 << 20, min_reused=1)
    for _ in range(2):
        assert [generate(pipe, p, i, config).token_ids for p, i in requests] == expected
    assert cache.hits >= len(requests)
    assert generate(pipe, turn, images[0], config).token_ids == first.token_ids
    reused = cache.reused_tokens
    assert generate(pipe, follow_up, images[0], config).token_ids == expected_follow_up
    assert cache.reused_tokens - reused >= first.prompt_tokens

    ids = pipe.prompt_ids(TWO_IMAGE_TURNS, images[1] + images[2])
    image = image_input_for(pipe, images[1] + images[2], TWO_IMAGE_TURNS)  # as generate encodes them
    full_logits, full = pipe.prefill(ids, image)
    keys = pipe.prefix_keys(ids, image)
    hit = cache.lookup(keys)
    placeholders = np.flatnonzero(np.asarray(ids) == pipe.scheme.image_token_id)
    for length in (hit.length, 3, int(placeholders[5]), int(placeholders[-1]) + 1):
        logits, state = pipe.prefill_continuing(pipe.scheme.prefix_state(hit.caches, length), ids, image)
        np.testing.assert_allclose(logits[0], full_logits, rtol=1e-5, atol=1e-5)
        for name in pipe.scheme.past_names:
            np.testing.assert_allclose(state.caches[name], full.caches[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(state.positions, full.positions)
    swapped = images[1] + images[0]
    other = pipe.prefix_keys(pipe.prompt_ids(TWO_IMAGE_TURNS, swapped), image_input_for(pipe, swapped, TWO_IMAGE_TURNS))
    encoded = pipe.encode_images(pipe.pixel_values(images[1]))
    first_image = len(getattr(encoded, "rows", encoded))  # M-RoPE's image input carries places beside its rows
    parted = int(np.flatnonzero(keys[:len(other)] != other[:len(keys)])[0])
    # keys are the rows' bits: the first image's are the same in both prompts (on a fused tower because each image
    # is encoded alone: VLMPipeline.encodes_images_alone), so the keys part at the second image
    assert int(placeholders[first_image]) <= parted <= int(placeholders[first_image]) + 1, (parted, first_image)


def check_answers_equal_hf_generate(pipe, loaded, requests, new_tokens: int = 12) -> None:
    """Each (prompt, images) of ``requests``: ``generate``'s greedy tokens on ``pipe`` = the adapter's Hugging Face
    reference on the same prompt ids and preprocessed images, alone; and all of them decoded together in one batch
    give the same tokens."""
    import torch

    from vlm_export.runtime.generate import GenerationConfig, GenerationRequest, generate, generate_batch

    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    alone = []
    for prompt, images in requests:
        ids = pipe.prompt_ids(prompt, images)
        raw = pipe.pixel_values(images) if images else None  # one array, or several inputs by name
        pixels = ({n: torch.from_numpy(v) for n, v in raw.items()} if isinstance(raw, dict) else
                  None if raw is None else torch.from_numpy(raw))
        want = loaded.adapter.reference_generate(loaded, torch.tensor([ids]), pixels, new_tokens, [-1])
        alone.append(generate(pipe, prompt, images, config).token_ids)
        assert alone[-1] == want, [im.size for im in images]
    assert [r.token_ids for r in generate_batch(pipe, [GenerationRequest(p, i, config) for p, i in requests])] == alone


def fp32_gate(reference) -> float:
    """The build's fp32 gate on an output (max abs error <= 1e-4 + 1e-4 x its largest magnitude)."""
    import numpy as np

    return 1e-4 + 1e-4 * float(np.abs(reference).max())


def fp32_bound(ref_max_abs: float, relative: float = 1e-5) -> float:
    """How far fp32 ONNX Runtime may be from fp32 PyTorch on outputs as large as ``ref_max_abs``: other
    GEMM kernels sum in another order, an error that grows with the values' scale (T5's unscaled
    attention: 1.07e-4 on logits up to 15 on an AVX-512 EPYC, under 1e-4 on AVX2)."""
    return 1e-4 + relative * float(ref_max_abs)


def wait_for(predicate, seconds: float = 20.0) -> bool:
    """Poll ``predicate`` every 0.1 s until it holds (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def common_prefix(a, b) -> int:
    """How many leading items two id sequences share (what a prefix-cache lookup reuses at most)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


# The suite's schedule under `-n 2 --dist loadfile`: xdist hands out whole files, in collection order,
# to whichever worker is free, so the longest files go first (longest first, each to the worker that
# frees up: the last file to finish is a short one). Ranked by CPU-seconds per file as measured by
# VLM_EXPORT_TEST_CPU_LOG below (2026-11-30; a session fixture counts in the first file to use it).
# Files not listed (short ones, new ones) follow in their usual order; a new file of more than ~10
# CPU-s belongs in this list.
LONGEST_FIRST = (
    "test_demo_build.py",  # the demo build (SmolLM2's 30-layer decoder), served and batched on 60 questions
    "test_export_core.py",  # the first build of every tiny model
    "test_qformer.py",
    "test_forms.py",
    "test_stub_recovery.py",
    "test_bench.py",
    "test_deploy.py",
    "test_render.py",
    "test_mllama.py",  # ~80 CPU-s alone (its build, an fp16 decoder build, one served tritonserver)
    "test_serving.py",
    "test_openai_api.py",  # short, but shares test_serving's llava_server: next to it, likely the same worker
    "test_precision.py",
    "test_prefix_cache.py",  # ~100 CPU-s: generation with and without the cache on six builds and PyTorch
    "test_cli_errors.py",
    "test_demo_model.py",
    "test_lora.py",
    "test_policy.py",
    "test_florence2.py",  # ~15 CPU-s of its own (fp16 variant, a CLI build) on the shared florence2 build
    "test_gemma3.py",  # HF's model and processor against the shared gemma3 build, the prefix cache on it
    "test_paligemma.py",  # likewise for the two PaliGemma builds
    "test_qwen3_5.py",  # ~90 CPU-s: HF generate on every size, a served tritonserver, a tiny MoE model of its own
    "test_lfm3_vl.py",  # HF generate on every size, a served tritonserver
    "test_hunyuan_vl.py",  # likewise
    "test_gemma4.py",  # likewise
    "test_exaone4_5.py",  # HF generate on every size for two families, a served tritonserver
    "test_got_ocr2.py",  # its build (a tower of 4096 patches) and HF generate on pages of every size
)


def pytest_configure(config):
    # xdist re-sorts loadfile's files by their number of tests unless told not to, which put the
    # 5-test demo build file, half the suite's CPU time, last: the order below is the schedule
    if getattr(config.option, "loadscopereorder", False):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """VLM_EXPORT_TEST_CPU_LOG=<file>: append each test's CPU seconds (setup, call and teardown,
    so a session fixture counts where it is first built) as a JSON line. The wall clock on a
    loaded machine says little about where the suite's work goes; CPU time does."""
    log = os.environ.get("VLM_EXPORT_TEST_CPU_LOG")
    if not log:
        yield
        return
    import json

    cpu, wall = _cpu_seconds(), time.monotonic()
    yield
    row = {"test": item.nodeid, "cpu": round(_cpu_seconds() - cpu, 2), "wall": round(time.monotonic() - wall, 2),
           "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "exported": list(_EXPORTED)}
    _EXPORTED.clear()
    with open(log, "a") as f:
        f.write(json.dumps(row) + "\n")
