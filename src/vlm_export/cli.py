"""The ``vlm-export`` command: parses, calls the Python API, prints. No logic of its own."""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from .demo import DEMO_MAX_BATCH
from .errors import InputError, ServeError, VlmExportError, first_line
from .signals import raising

EPILOG = """examples:
  vlm-export demo                                  # build the easy-vqa demo VLM (CPU, no hub)
  vlm-export build path/to/hf_model --out build/mymodel
  vlm-export generate build/mymodel --image cat.png --prompt "What is in the picture?"
  vlm-export verify build/mymodel                  # re-run the parity report
  vlm-export eval build/demo --dataset easy-vqa --limit 200
  vlm-export eval build/mymodel --dataset captions/ --prompt "Describe the image."   # BLEU, ROUGE-L, CIDEr
  vlm-export adapters                              # supported architectures
"""


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of 0 or more, got {text}")
    return value


def _add_fp32_gate(group) -> None:
    """--fp32-atol / --fp32-rtol, for build and verify alike."""
    group.add_argument("--fp32-atol", type=_non_negative_float, default=None,
                       help="fp32 stages pass where max |ONNX - PyTorch| <= atol + rtol x the output's largest magnitude "
                            "(default 1e-4; verify: the build's), or, measured against PyTorch in float64 when they do "
                            "not, where ONNX is within 10x PyTorch fp32's own distance from float64 plus this. The "
                            "report and manifest record a gate given")
    group.add_argument("--fp32-rtol", type=_non_negative_float, default=None, help="see --fp32-atol (default 1e-4)")


def _fp32_gate(args):
    """The Tolerance of --fp32-atol / --fp32-rtol (the one not given keeps its default), or None for neither."""
    from .compare.policy import Tolerance

    given = {k: v for k, v in (("atol", args.fp32_atol), ("rtol", args.fp32_rtol)) if v is not None}
    return Tolerance(**given) if given else None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_build_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("limits (recorded in the manifest; engines and Triton configs derive from them)")
    g.add_argument("--max-batch", type=_positive_int, default=4, help="largest batch of requests (default %(default)s)")
    g.add_argument("--max-images", type=_positive_int, default=2, help="images per prompt (default 2)")
    g.add_argument("--max-sequence", type=_positive_int, default=None,
                   help="prompt + generated tokens (default: the model's limit, at most 4096)")
    g = p.add_argument_group("parity")
    g.add_argument("--parity-tokens", type=_positive_int, default=32,
                   help="greedy tokens compared with the original model's generate (default 32)")
    _add_fp32_gate(g)
    p.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime intra-op threads")
    g = p.add_argument_group("precision")
    g.add_argument("--precision", default=None,
                   help="fp32 (default), fp16 or int8 for every stage, or per stage, e.g. "
                        "vision=int8,projector=fp16,decoder=w4 (decoder also takes w8/w4: weight-only), or both: "
                        "fp16,decoder=w4 (fp16 for every stage not named)")
    g.add_argument("--block-size", type=_positive_int, default=None,
                   help="weight-only block size (default: the weight form's: 32 for matmulnbits; 128 for "
                        "dequantize, 64 where the input dimension is not a multiple of 128 - TensorRT takes 64 or 128)")
    g.add_argument("--weight-scheme", choices=("asymmetric", "zero-point", "symmetric"), default=None,
                   help="weight-only blocks: asymmetric (scale + float minimum, default for ONNX Runtime), "
                        "zero-point (scale + integer zero point, read by MatMulNBits with no extra nodes) or "
                        "symmetric (scale only; the only choice for --weight-form dequantize)")
    g.add_argument("--weight-form", choices=("matmulnbits", "dequantize"), default="matmulnbits",
                   help="weight-only graph form: matmulnbits (ONNX Runtime, default) or dequantize "
                        "(TensorRT, w4 only, W4A16: fp16 decoder, int4 block-wise DequantizeLinear + MatMul)")
    g.add_argument("--weight-activations", choices=("int8", "fp32"), default="int8",
                   help="what MatMulNBits rounds a w8/w4 decoder's activations to: int8 per block (default, "
                        "ONNX Runtime's fast kernels) or fp32 (accuracy level 0: for LMs whose activations carry "
                        "outliers int8 cannot hold, such as T5; slower)")
    g.add_argument("--weight-rounding", choices=("rtn", "gptq"), default=None,
                   help="how the codes of w8/w4 weights and of an int8 decoder's weights are picked: rtn (round "
                        "to nearest; w8/w4's default) or gptq (GPTQ: each rounding error pushed onto the inputs not "
                        "yet rounded, against the layer inputs' second moments measured on the calibration pairs; "
                        "same format and speed, more accurate codes; an int8 decoder's default)")
    g.add_argument("--lm-head", choices=("fp32", "int8", "w8", "w4"), default=None,
                   help="LM head precision (default: w8 in ONNX Runtime's MatMulNBits form, w4 in the dequantize "
                        "form; under an int8 decoder w8 applies to its ONNX Runtime form, the TensorRT form keeping "
                        "fp32, and int8 to both)")
    g.add_argument("--calibration", choices=("minmax", "percentile", "entropy"), default="minmax",
                   help="int8 calibration method of the image stages (default minmax; an int8 decoder takes its "
                        "channels' maxima)")
    g.add_argument("--calibration-images", type=Path, default=None,
                   help="folder of images for int8 calibration and GPTQ (default: photos + easy-vqa train pairs)")
    g.add_argument("--calibration-prompts", type=Path, default=None, help="one prompt per line, cycled over the images")
    g.add_argument("--int8-kernel", choices=("auto", "u8s8", "u8u8"), default="auto",
                   help="an int8 decoder's ONNX Runtime kernel: u8s8 (int8 weights; exact and ~2x faster than fp32 "
                        "on CPUs with VNNI or AMX, saturating on AVX2-only x86), u8u8 (exact everywhere, about "
                        "fp32's speed) or auto (default: u8s8 where this CPU has VNNI/AMX). A u8s8 build refuses to "
                        "open on a CPU without them")
    g.add_argument("--int8-fp32-matmuls", default="auto", metavar="auto|N",
                   help="how many of each int8 stage's most error-prone MatMuls (ranked on the calibration pairs) "
                        "stay fp32: auto (default: the fewest, up to a quarter (one of two or three), whose "
                        "outputs - a decoder's logits - reach the int8 gate on the calibration pairs) or a count "
                        "(0: every MatMul int8; an image stage with fewer keeps all of its own)")
    g.add_argument("--embeddings", choices=("fp32", "w8", "w4"), default="fp32",
                   help="a w8/w4 decoder's lookup tables indexed by the token ids (its token embeddings; Gemma 4's "
                        "per-layer input embeddings, vocabulary x layers x 256): fp32 (default, as exported) or w8 / w4 "
                        "as ONNX Runtime's GatherBlockQuantized, in blocks along each row with integer zero points: for "
                        "size (a lookup reads one row per token), judged by the same gates; the matmulnbits form only")
    g.add_argument("--keep-node", action="append", default=[], metavar="NAME",
                   help="ONNX node kept in higher precision (repeatable)")
    g = p.add_argument_group("graph forms")
    g.add_argument("--no-fuse", action="store_true",
                   help="no ONNX Runtime form of the decoder (fused norms, rotary, attention, packed projections; "
                        "made by default beside the standard graph TensorRT reads): every target runs the standard graph")
    g = p.add_argument_group("task accuracy (answers of the build vs the fp32 PyTorch reference, gated)")
    g.add_argument("--eval-questions", type=int, default=0,
                   help="questions spread evenly over --eval-dataset, answered by both during the build "
                        "(default 0: off; the demo uses 60)")
    g.add_argument("--eval-dataset", default="easy-vqa", help="easy-vqa (test split) or a folder with questions.jsonl")
    g.add_argument("--max-accuracy-drop", type=float, default=1.0,
                   help="accuracy points the build may lose against the reference before it fails (default 1)")


def _add_request_args(p: argparse.ArgumentParser) -> None:
    """What one generation request takes, the same in-process (generate) and served (ask)."""
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt")
    what.add_argument("--messages", type=Path, metavar="FILE.json",
                      help="a conversation instead of one prompt: a JSON list of {role, content} in Hugging Face's "
                           "chat format, the k-th {\"type\": \"image\"} part being the k-th --image")
    p.add_argument("--image", type=Path, action="append", default=[], help="image file (repeat for several)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: the fewest tokens holding this mass")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens only (0 = all)")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="sample among tokens at least this fraction as likely as the most likely one (0 = all)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--bad-word", action="append", default=[], dest="bad_words", metavar="TEXT",
                   help="vLLM's bad_words: text never generated, as the tokenizer spells it alone and (same token "
                        "count) after a space (repeatable)")
    p.add_argument("--repetition-penalty", type=float, default=None,
                   help="Hugging Face's repetition penalty (1 = none; default: the checkpoint's generation config)")
    p.add_argument("--no-repeat-ngram-size", type=int, default=None,
                   help="no n-gram of this size twice (0 = none; default: the checkpoint's generation config)")
    p.add_argument("--min-tokens", type=int, default=None,
                   help="no end of answer before this many tokens (default: the checkpoint's min_new_tokens, else 0)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="OpenAI's: subtracted from the logit of every token already in the answer, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="OpenAI's: subtracted per time a token is already in the answer, in [-2, 2]")
    p.add_argument("--logprobs", action="store_true",
                   help="each generated token's log-probability, listed after the answer (on stderr)")
    p.add_argument("--top-logprobs", type=int, default=0, metavar="N",
                   help="with --logprobs: the N most likely tokens at each position too (at most 20)")
    p.add_argument("--logit-bias", type=_token_bias, action="append", default=[], metavar="TOKEN_ID=BIAS",
                   help="OpenAI's logit_bias: add BIAS (in [-100, 100]; -100 bans the token) to a token's logit; "
                        "repeat for more tokens")


def _token_bias(text: str) -> tuple[int, float]:
    """``TOKEN_ID=BIAS`` -> (id, bias), for --logit-bias."""
    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token), float(bias)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not TOKEN_ID=BIAS (e.g. 1234=-100)") from None


def _request_settings(args) -> dict:
    """The request's generation settings from _add_request_args' options, named as the client and the
    served model name them (GenerationConfig's, but ``max_tokens`` and ``min_tokens``)."""
    return dict(max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
                top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed,
                stop=tuple(args.stop), bad_words=tuple(args.bad_words), repetition_penalty=args.repetition_penalty,
                no_repeat_ngram_size=args.no_repeat_ngram_size, presence_penalty=args.presence_penalty,
                frequency_penalty=args.frequency_penalty, logprobs=args.logprobs, top_logprobs=args.top_logprobs,
                logit_bias=_logit_bias(args.logit_bias))


def _logit_bias(pairs: list[tuple[int, float]]) -> dict[int, float]:
    """--logit-bias's pairs as a mapping; a token given twice is refused (which bias was meant?)."""
    bias = dict(pairs)
    if len(bias) < len(pairs):
        raise InputError("--logit-bias names a token twice; give each token one bias")
    return bias


def _print_logprobs(entries: list[dict] | None) -> None:
    """One line per generated token: its text, log-probability and the alternatives asked for."""
    for entry in entries or ():
        others = ", ".join(f"{e['token']!r} {e['logprob']:.3f}" for e in entry["top_logprobs"])
        print(f"  {entry['token']!r:>16} {entry['logprob']:8.3f}" + (f"   [{others}]" if others else ""),
              file=sys.stderr)


def _messages(args):
    """The conversation in --messages (None without)."""
    if args.messages is None:
        return None
    try:
        return json.loads(args.messages.read_text())
    except OSError as e:
        raise InputError(f"cannot read --messages {args.messages}: {e.strerror}") from None
    except ValueError as e:
        raise InputError(f"--messages {args.messages} is not valid JSON ({e})") from None


def _prompt(args):
    return args.prompt if args.messages is None else _messages(args)


def _build_options(args, **extra):
    """BuildOptions from the shared build flags."""
    from .build import BuildOptions
    from .compare.accuracy import AccuracyCheck
    from .precision.calibration import folder_pairs
    from .precision.convert import PrecisionOptions
    from .precision.spec import parse_precision

    if args.calibration_prompts and not args.calibration_images:
        raise InputError("--calibration-prompts pairs its prompts with the images of --calibration-images; give that "
                         "folder too (the built-in calibration pairs come with their own prompts)")
    pairs = folder_pairs(args.calibration_images, args.calibration_prompts) if args.calibration_images else None
    if args.eval_questions < 0:
        raise InputError(f"--eval-questions must be 0 (off) or more, got {args.eval_questions}")
    accuracy = AccuracyCheck(args.eval_dataset, "test", args.eval_questions, args.max_accuracy_drop) \
        if args.eval_questions else None
    options = BuildOptions(max_batch=args.max_batch, max_images=args.max_images, max_sequence=args.max_sequence,
                           parity_new_tokens=args.parity_tokens, fp32_tolerance=_fp32_gate(args),
                           threads=args.threads, force=args.force,
                           precision=parse_precision(args.precision), calibration_pairs=pairs,
                           precision_options=PrecisionOptions(block_size=args.block_size, lm_head=args.lm_head,
                                                              weight_scheme=args.weight_scheme,
                                                              weight_form=args.weight_form,
                                                              weight_activations=args.weight_activations,
                                                              weight_rounding=args.weight_rounding,
                                                              calibration=args.calibration,
                                                              int8_kernel=args.int8_kernel,
                                                              int8_fp32_matmuls=args.int8_fp32_matmuls,
                                                              embeddings=args.embeddings,
                                                              exclude_nodes=tuple(args.keep_node)),
                           accuracy=accuracy, fuse=not args.no_fuse, **extra)
    if pairs and not options.calibrates:
        raise InputError(f"--calibration-images calibrates int8 stages and GPTQ rounding, and --precision "
                         f"{options.precision} makes neither; add e.g. vision=int8 to --precision, or drop it")
    return options


def _add_hash_check(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-hash-check", action="store_true",
                   help="skip checking the graphs against the sha256 the manifest recorded (a huge build you trust)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-export", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Split a vision-language model into vision encoder, projector and LM decoder graphs, "
                    "export them to ONNX, prove parity with PyTorch stage by stage, and run them.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vlm-export {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("build", help="export a Hugging Face VLM folder and check parity",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  vlm-export build path/to/llava --out build/llava --max-images 1")
    p.add_argument("model", type=Path, help="a Hugging Face model folder (save_pretrained output)")
    p.add_argument("--out", type=Path, required=True, help="build folder to create")
    p.add_argument("--adapter", default=None, help="force an adapter (default: from config.json's model_type)")
    p.add_argument("--force", action="store_true", help="replace an existing build folder")
    p.add_argument("--lora", type=Path, default=None, metavar="ADAPTER_DIR",
                   help="a PEFT adapter (LoRA, LoHa, IA3, ...) made on this model: merged before the export, the "
                        "merge proved per stage against the unmerged adapter")
    p.add_argument("--lora-any-base", action="store_true",
                   help="merge the adapter even if its base_model_name_or_path names another model")
    p.add_argument("--chat-template", type=Path, default=None, metavar="FILE",
                   help="the chat template the model was trained with (Jinja, or a chat_template.json), for a "
                        "checkpoint that ships none or another one: prompts are made with it and the build keeps it")
    _add_build_options(p)

    p = sub.add_parser("generate", help="answer a prompt (and images) with a build",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog='example:\n  vlm-export generate build/demo --image shape.png --prompt "What color is the shape?"')
    p.add_argument("build", type=Path, help="build folder")
    _add_request_args(p)
    _add_hash_check(p)
    p.add_argument("--backend", choices=("onnxruntime", "torch"), default="onnxruntime")
    p.add_argument("--form", choices=("onnxruntime", "standard"), default="onnxruntime",
                   help="graphs run by the onnxruntime backend: the onnxruntime target's (default: the fused "
                        "decoder where the build has one) or the standard ones TensorRT reads (their int8 Q/DQ "
                        "run as written, TensorRT's arithmetic: answers as TensorRT gives them, not a served speed)")
    p.add_argument("--threads", type=_positive_int, default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of streaming text")

    p = sub.add_parser("verify", help="re-run the parity report of a build against its source model")
    p.add_argument("build", type=Path)
    p.add_argument("--parity-tokens", type=_positive_int, default=32)
    _add_fp32_gate(p)
    p.add_argument("--threads", type=_positive_int, default=None)

    p = sub.add_parser("eval", help="VQA accuracy or caption metrics of PyTorch and the build on the same data",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  vlm-export eval build/demo --dataset easy-vqa --split test --limit 200\n"
                              "  vlm-export eval build/mine --dataset path/to/folder   # images + questions.jsonl\n"
                              "  vlm-export eval build/mine --dataset path/to/folder --prompt 'Describe the image.'"
                              "   # images + captions.jsonl\n"
                              "  vlm-export eval build/demo --dataset easy-vqa-captions --limit 50 --prompt "
                              "'What is in the image?'")
    p.add_argument("build", type=Path)
    _add_hash_check(p)
    p.add_argument("--dataset", default="easy-vqa",
                   help="easy-vqa; easy-vqa-captions (its images, template captions made from the labels); or a "
                        'folder with images and questions.jsonl ({"image": "a.png", "question": "...", "answer": '
                        '"..."} per line) or captions.jsonl ({"image": "a.png", "captions": ["...", ...], '
                        '"prompt": "..." (optional)} per line)')
    p.add_argument("--task", choices=("vqa", "caption"), default=None,
                   help="default: from --dataset (questions.jsonl: vqa, captions.jsonl: caption)")
    p.add_argument("--split", default="test", help="easy-vqa split: train or test (default test)")
    p.add_argument("--limit", type=_positive_int, default=None, help="first N items only")
    p.add_argument("--spread", type=_positive_int, default=None,
                   help="N items evenly spaced over the whole set (easy-vqa is ordered by image)")
    p.add_argument("--backends", default="torch,onnxruntime",
                   help="comma-separated: torch,onnxruntime (the first is the reference the others are compared with)")
    p.add_argument("--max-accuracy-drop", type=float, default=1.0,
                   help="vqa: accuracy points a backend may lose against the first before eval fails (default 1)")
    g = p.add_argument_group("captions")
    g.add_argument("--prompt", default=None,
                   help="the prompt that asks for a caption, where captions.jsonl gives none (default: the build's "
                        "declared captioning prompt)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="greedy tokens per caption (default 24)")
    g.add_argument("--max-cider-drop", type=float, default=None,
                   help="CIDEr a backend's captions may lose against the first's before eval fails (default 0.05)")
    g.add_argument("--tokenizer", choices=("simple", "ptb"), default="simple",
                   help="caption tokenisation before scoring: simple (Python, PTB-like; default) or ptb "
                        "(Stanford PTBTokenizer as COCO's scripts run it; needs java)")
    p.add_argument("--threads", type=_positive_int, default=None)

    p = sub.add_parser("demo", help="assemble the easy-vqa demo VLM (SmolLM2 + trained vision tower) and build it",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  vlm-export demo --out build/demo && vlm-export eval build/demo --limit 100")
    p.add_argument("--out", type=Path, default=Path("build/demo"), help="build folder (default build/demo)")
    p.add_argument("--force", action="store_true", help="replace an existing build folder")
    _add_build_options(p)
    # the demo's build answers 60 easy-vqa test questions, gated, and serves batches of DEMO_MAX_BATCH
    p.set_defaults(eval_questions=60, max_batch=DEMO_MAX_BATCH)

    p = sub.add_parser("repository", help="render a Triton model repository from a build",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  vlm-export repository build/demo --target python --out repo/demo")
    p.add_argument("build", type=Path)
    _add_hash_check(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--target", choices=("python", "onnxruntime", "tensorrt"), default="python",
                   help="python: onnxruntime inside python models, loads on any Triton incl. the CPU one in "
                        "nvidia-pytriton (default); onnxruntime / tensorrt: Triton's native backends")
    p.add_argument("--instances", type=_positive_int, default=1, help="instances per graph model")
    p.add_argument("--vlm-instances", type=_positive_int, default=1)
    p.add_argument("--max-queue-delay-us", type=int, default=500, help="dynamic batching window of the image path")
    p.add_argument("--max-queue", type=_positive_int, default=None,
                   help="requests that may wait for a place in the vlm model's batch (default 64); past it a "
                        "request gets UNAVAILABLE at once")
    p.add_argument("--max-image-pixels", type=_positive_int, default=None,
                   help="request images declaring more pixels are refused before decoding (default: 64x the "
                        "model's input area, at least 16 M)")
    p.add_argument("--max-image-mb", type=_positive_int, default=32, help="largest encoded image accepted (default 32)")
    p.add_argument("--image-cache-mb", type=int, default=None,
                   help="the vlm model's image-embedding cache, LRU by image content (default 256; 0: off)")
    p.add_argument("--prefix-cache-mb", type=int, default=None,
                   help="the vlm model's prefix cache: prompts' K/V, reused by later prompts that start the same "
                        "way (the template's system turn, a conversation's earlier turns); default 256; 0: off")
    p.add_argument("--max-prefill-tokens", type=_positive_int, default=None,
                   help="prompt tokens of new requests prefilled in one step, the pause running requests see "
                        "(default 2048)")
    p.add_argument("--max-prefill-padding", type=float, default=None,
                   help="largest share of a batched prefill call that may be padding (default 0.15, for CPUs; "
                        "raise it on a GPU, where a batched prefill costs about one row's time)")
    p.add_argument("--decoder-mode", choices=("in_process", "bls"), default=None,
                   help="where the vlm model runs decode steps (default: in_process for python, bls otherwise)")
    p.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime threads inside python models")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]",
                   help="where the graph models run: cuda gives them KIND_GPU instances (on GPU N for cuda:N) and "
                        "runs the python models' ONNX Runtime sessions on the instance's GPU (needs onnxruntime-gpu "
                        "in the server's environment; else CPU with a notice); the tensorrt target always runs on "
                        "a GPU (default cpu)")
    p.add_argument("--tensorrt-version", default=None, metavar="VERSION",
                   help="tensorrt target: the TensorRT version of the Triton that will serve the plans (its "
                        "container's); plans that will not load on it are refused (default: not checked)")
    p.add_argument("--configs-only", action="store_true",
                   help="write only the config.pbtxt files, checked as always, no model files: e.g. the tensorrt "
                        "configs before any engine is built (for review and CI; not loadable)")
    p.add_argument("--force", action="store_true")

    p = sub.add_parser("serve", help="start a local Triton server on a model repository (Ctrl-C stops it)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  vlm-export serve repo/demo --http-port 8000 --grpc-port 8001")
    p.add_argument("repository", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-file", type=Path, default=None)
    p.add_argument("--openai-port", type=int, default=None,
                   help="also serve an OpenAI-compatible API (/v1/chat/completions, /v1/models) on this port")
    p.add_argument("--openai-model", default=None,
                   help="the model name the OpenAI API lists and accepts (default: the repository folder's name)")
    p.add_argument("--allow-url-fetch", action="store_true",
                   help="let the OpenAI API fetch http(s) image URLs (off: only data: URLs are accepted)")

    p = sub.add_parser("serve-openai", help="serve the OpenAI-compatible API alone, in front of a running Triton "
                                            "(Ctrl-C stops it)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  vlm-export serve-openai --triton-grpc localhost:8001 --port 9000")
    p.add_argument("--triton-grpc", default="localhost:8001", help="Triton's gRPC endpoint, HOST:PORT")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--model", default="vlm", help="the model name the API lists and accepts (default vlm)")
    p.add_argument("--allow-url-fetch", action="store_true",
                   help="fetch http(s) image URLs (off: only data: URLs are accepted)")

    p = sub.add_parser("tokenize", help="a text's token ids in a build's tokenizer (the ids --logit-bias takes)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog='example:\n  vlm-export tokenize build/demo " circle"   # a word inside an answer '
                              'usually starts with its space')
    p.add_argument("build", type=Path)
    p.add_argument("text")
    p.add_argument("--json", action="store_true", help="one JSON list of {token_id, token, bytes}")

    p = sub.add_parser("health", help="exit 0 if the tritonserver on this machine is live and none of its "
                                      "python-backend stubs has died, else 1 with the reason (a liveness probe)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example (the Kubernetes manifests' liveness probe of the triton container):\n"
                              "  vlm-export health --http-port 8000")
    p.add_argument("--http-port", type=int, default=8000, help="the server's HTTP port (default 8000, Triton's)")
    p.add_argument("--host", default="127.0.0.1", help="where its HTTP endpoint is reached (default 127.0.0.1)")
    p.add_argument("--timeout", type=float, default=4.0, help="seconds to wait for /v2/health/live (default 4)")

    p = sub.add_parser("ask", help="ask a served vlm model (HTTP or gRPC, streaming or not)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog='examples:\n  vlm-export ask --url http://127.0.0.1:8000 --image cat.png --prompt "What is it?"\n'
                              '  vlm-export ask --url grpc://127.0.0.1:8001 --image cat.png --prompt "Describe it." --stream')
    p.add_argument("--url", default="http://127.0.0.1:8000", help="http://HOST:PORT or grpc://HOST:PORT")
    _add_request_args(p)
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--model", default="vlm")

    p = sub.add_parser("bench", help="latency per stage and end to end: PyTorch vs ONNX Runtime vs Triton",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  vlm-export bench build/demo --backends torch,onnxruntime,triton --concurrency 1,4")
    p.add_argument("build", type=Path)
    _add_hash_check(p)
    p.add_argument("--backends", default="torch,onnxruntime,triton")
    p.add_argument("--batch", default="1,4", help="image batch sizes of the vision and projector cases")
    p.add_argument("--concurrency", default="1,2,4,8,16", help="concurrent requests against Triton")
    p.add_argument("--new-tokens", type=_positive_int, default=64)
    p.add_argument("--threads", type=_positive_int, default=None, help="threads for every backend (default: all cores)")
    p.add_argument("--out", type=Path, default=None, help="results folder (default BUILD/bench)")
    p.add_argument("--peer", default=None, metavar="DIR|build",
                   help="also time onnxruntime-genai on the build's LM, text only: a folder its model builder made, "
                        "or 'build' to make one into BUILD/bench/peer-PRECISION (needs vlm-export[peer])")
    p.add_argument("--peer-precision", choices=("int4", "fp32"), default="int4",
                   help="precision of the peer made by --peer build (default int4)")
    p.add_argument("--peer-gguf", default=None, metavar="FILE",
                   help="also time llama.cpp (llama-cpp-python) on this GGUF file of the build's LM")
    p.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]",
                   help="where PyTorch and ONNX Runtime run (default cpu). cuda: PyTorch on the GPU in --dtype, ONNX "
                        "Runtime on its TensorRT/CUDA providers where installed (onnxruntime-gpu; else CPU, with a "
                        "notice), CUDA-event timings and the GPU's bandwidth ceiling; refused at once without a GPU")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="the PyTorch reference's dtype (default: fp16 on cuda, fp32 on cpu)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="skip the time-to-first-token run with the prefix cache on and off")

    p = sub.add_parser("engines", help="build TensorRT plans for a build (needs TensorRT and a CUDA GPU), "
                                       "or only check the build against TensorRT's documented constraints")
    p.add_argument("build", type=Path)
    p.add_argument("--check-only", action="store_true",
                   help="check the graphs and the tensorrt Triton configs without TensorRT and build nothing; "
                        "exit 1 on any violation")
    p.add_argument("--tensorrt-version", default=None, metavar="VERSION",
                   help="the TensorRT version the plans are for (default: the installed one, else the checker's)")
    p.add_argument("--version-compatible", action="store_true",
                   help="build plans that later TensorRT releases of the same major version load too (may run "
                        "slower; Triton then needs --backend-config=tensorrt,version-compatible=true)")

    p = sub.add_parser("deploy", help="write manifests that run a rendered model repository (Kubernetes)")
    platforms = p.add_subparsers(dest="platform", required=True, metavar="PLATFORM")
    p = platforms.add_parser(
        "kubernetes", help="Deployment (Triton + OpenAI sidecar), Service and HPA on NVIDIA's Triton container",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  vlm-export deploy kubernetes repo/demo --pvc vlm-models --out k8s/\n"
               "  vlm-export deploy kubernetes repo/demo --repository-uri s3://bucket/demo --credentials-secret aws \\\n"
               "      --image registry.example.com/vlm-export-triton:0.1.0-24.10 --out k8s/\n"
               "build the image first: docker build -f deploy/Dockerfile -t IMAGE .")
    p.add_argument("repository", type=Path,
                   help="the folder `vlm-export repository` wrote (with --repository-uri: the local copy of the upload)")
    p.add_argument("--out", type=Path, required=True, help="folder for the YAML files")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--pvc", help="PersistentVolumeClaim holding the repository (mounted read-only)")
    where.add_argument("--repository-uri", help="s3://BUCKET/PATH, gs://BUCKET/PATH or as://ACCOUNT/CONTAINER/PATH, "
                                                 "read by Triton itself")
    p.add_argument("--pvc-subpath", default="", help="the repository's folder inside the claim")
    p.add_argument("--credentials-secret", default=None,
                   help="Secret for --repository-uri: AWS_* or AZURE_STORAGE_* keys (s3, as); credentials.json (gs)")
    p.add_argument("--name", default="vlm", help="of the Deployment, Service and autoscaler (default vlm)")
    p.add_argument("--namespace", default=None)
    p.add_argument("--image", default=None, help="the image built from deploy/Dockerfile (default vlm-export-triton:VERSION-24.10, with -gpu for python "
                        "models on a GPU: built with onnxruntime-gpu)")
    p.add_argument("--image-pull-secret", default=None)
    p.add_argument("--service-account", default=None)
    p.add_argument("--service-type", choices=("ClusterIP", "NodePort", "LoadBalancer"), default="ClusterIP")
    p.add_argument("--replicas", type=_positive_int, default=None, help="initial replicas (default: left to the autoscaler)")
    p.add_argument("--min-replicas", type=_positive_int, default=1)
    p.add_argument("--max-replicas", type=_positive_int, default=4)
    p.add_argument("--target-cpu", type=_positive_int, default=70, help="autoscaler's CPU utilisation target, percent")
    p.add_argument("--target-queue", type=_positive_int, default=None,
                   help="also scale on vlm_queue_length per pod (needs a custom-metrics adapter)")
    p.add_argument("--cpu", default="4")
    p.add_argument("--memory", default="16Gi")
    p.add_argument("--cpu-limit", default=None)
    p.add_argument("--memory-limit", default=None)
    p.add_argument("--gpus", type=_positive_int, default=None,
                   help="nvidia.com/gpu per pod, for a repository that runs on a GPU (default 1; refused for a CPU one)")
    p.add_argument("--shm-size", default="1Gi")
    p.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--startup-timeout", type=_positive_int, default=900, help="seconds model loading may take")
    p.add_argument("--no-openai", action="store_true", help="no OpenAI-compatible sidecar")
    p.add_argument("--openai-port", type=_positive_int, default=9000)
    p.add_argument("--openai-command", default=None,
                   help="the sidecar's command line (default: vlm-export serve-openai --triton-grpc localhost:8001 "
                        "--host 0.0.0.0 --port PORT)")

    sub.add_parser("adapters", help="list the supported architectures")
    return parser


def _cmd_build(args, progress) -> int:
    from .build import build

    result = build(args.model, args.out, _build_options(args, adapter=args.adapter, lora=args.lora,
                                                          lora_any_base=args.lora_any_base,
                                                          chat_template=args.chat_template), progress)
    _print_summary(result.path, result.manifest)
    return 0


def _print_summary(path: Path, manifest: dict) -> None:
    print(f"build written to {path}")
    from .manifest import stage_forms, targets

    runs = targets(manifest)
    for stage, g in manifest["graphs"].items():
        for form, entry in stage_forms(g).items():
            users = ", ".join(t for t, by_stage in runs.items() if by_stage.get(stage) == form) or "no target"
            print(f"  {stage:15s} {entry['precision']}  {entry['bytes'] / 1e6:8.1f} MB  {entry['file']}  ({form}: {users})")
            fallback = (entry.get("variant") or {}).get("fp32_fallback")
            if fallback:  # an int8 stage: what kept it within the gate, and on which kernel
                kept, total = len(fallback["kept"]), len(fallback["kept"]) + entry["variant"]["quantized_matmuls"]
                print(f"  {'':15s} {entry['variant']['kernel']}; {kept} of {total} MatMuls kept fp32 ({fallback['setting']})")
        if g.get("fusion") and not g["fusion"].get("made"):
            print(f"  {'':15s} no fused form: {g['fusion']['reason']}")
    print(f"  parity: {'passed' if manifest['parity']['passed'] else 'FAILED'} (see {path / 'report.md'})"
          + _parity_notes(manifest))
    report = json.loads((path / "report.json").read_text())
    if report.get("task_accuracy"):
        _print_accuracy(report["task_accuracy"])
    cost = report.get("cost")
    if cost and cost.get("peak_bytes"):  # what the machine that builds it needs
        print(f"  built in {cost['seconds']:.0f} s; peak memory {cost['peak_bytes'] / 1e9:.2f} GB "
              f"({cost['peak_step']})")


def _cmd_generate(args, progress) -> int:
    from .adapters.reference import open_pipeline
    from .runtime.generate import GenerationConfig, GenerationResult, stream

    settings = _request_settings(args)
    config = GenerationConfig(max_new_tokens=settings.pop("max_tokens"), min_new_tokens=settings.pop("min_tokens"),
                              **settings)
    with progress.step(f"loading {args.build} ({args.backend})") as advance:
        pipe = open_pipeline(args.build, args.backend, threads=args.threads, check_hashes=not args.no_hash_check,
                             form=args.form)
        advance()
    for event in stream(pipe, _prompt(args), args.image, config):
        if isinstance(event, GenerationResult):
            if args.json:
                print(json.dumps(event.to_dict()))
            else:
                print()
                _print_logprobs(event.to_dict()["logprobs"])
                print(f"[{event.completion_tokens} tokens, prompt {event.prompt_tokens}, "
                      f"finish: {event.finish_reason}]", file=sys.stderr)
        elif not args.json:
            print(event.text, end="", flush=True)
    return 0


def _parity_notes(manifest: dict) -> str:
    """The parity line's note of fp32 outputs that passed only when measured against PyTorch in float64, and
    of greedy divergences passed as near ties."""
    passed, ties = manifest["parity"].get("passed_by_float64"), manifest["parity"].get("near_ties")
    return ((f"; {len(passed)} fp32 output(s) only by the float64 check (the model's own rounding, magnified): "
             f"{', '.join(passed)}" if passed else "")
            + (f"; greedy tokens parted at {len(ties)} near tie(s): {'; '.join(ties)}" if ties else ""))


def _cmd_verify(args, progress) -> int:
    from .build import BuildOptions, verify

    result = verify(args.build, BuildOptions(parity_new_tokens=args.parity_tokens, threads=args.threads,
                                             fp32_tolerance=_fp32_gate(args)), progress)
    print(f"parity {'passed' if not result.failures else 'FAILED'}: see {args.build / 'report.md'}"
          + _parity_notes(result.manifest))
    for failure in result.failures:
        print(f"  {failure}")
    return 0 if not result.failures else 1


def _cmd_eval(args, progress) -> int:
    from .compare.captions import CaptionGate
    from .compare.policy import AccuracyGate
    from .evaluate import BACKENDS, dataset_task, evaluate_build, evaluate_captions

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        raise InputError(f"unknown backend(s) {unknown or args.backends!r}; choose from {', '.join(BACKENDS)}")
    if dataset_task(args.dataset, args.task) == "caption":
        captions = evaluate_captions(args.build, args.dataset, args.split, args.limit, backends, args.threads,
                                     progress, spread=args.spread, prompt=args.prompt,
                                     max_new_tokens=args.max_new_tokens,
                                     tokenizer=args.tokenizer, check_hashes=not args.no_hash_check,
                                     gate=None if args.max_cider_drop is None else CaptionGate(args.max_cider_drop))
        _print_captions(captions)
        for failure in captions["failures"]:
            print(f"  FAILED {failure}")
        print(f"recorded in {args.build / 'report.md'}")
        return 1 if captions["failures"] else 0
    if args.prompt or args.max_new_tokens or args.tokenizer != "simple" or args.max_cider_drop is not None:
        raise InputError("--prompt, --max-new-tokens, --tokenizer and --max-cider-drop are for captioning sets; "
                         "a VQA set asks each line's question")
    accuracy = evaluate_build(args.build, args.dataset, args.split, args.limit, backends, args.threads, progress,
                              spread=args.spread, gate=AccuracyGate(args.max_accuracy_drop),
                              check_hashes=not args.no_hash_check)
    _print_accuracy(accuracy)
    for failure in accuracy["failures"]:
        print(f"  FAILED {failure}")
    print(f"recorded in {args.build / 'report.md'}")
    return 1 if accuracy["failures"] else 0


def _print_captions(section: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from .compare.captions import caption_rows, gate_line

    header, rows = caption_rows(section)
    table = Table(title=f"{section['dataset']}: {section['images']} images, greedy captions, "
                        f"tokenizer {section['tokenizer']}")
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True, min_width=widths[i])
    for row in rows:
        table.add_row(*row)
    console = Console(width=max(80, sum(w + 3 for w in widths) + 1))  # one line per header, whatever the terminal
    console.print(table)
    if section.get("note"):
        print(section["note"])
    print(f"captions that differ from {section['reference']}'s: {len(section['differing_captions'])}")
    if section.get("gate"):
        print(gate_line(section))


def _print_accuracy(accuracy: dict) -> None:
    print(f"{accuracy['dataset']}: {accuracy['questions']} questions")
    for r in accuracy["results"]:
        print(f"  {r['backend']:12s} accuracy {100 * r['accuracy']:5.1f}%  ({r['correct']}/{r['questions']}, "
              f"{r['seconds']:.1f} s{', batches of %d' % r['batch'] if r.get('batch', 1) > 1 else ''})")
    print(f"  answers that differ between backends: {len(accuracy['disagreements'])}")
    gate = accuracy.get("gate")
    if gate:
        changes = ", ".join(f"{b} {0.0 - d:+.1f} points" for b, d in gate["drop_points"].items())
        print(f"  accuracy gate (at most {gate['max_drop_points']:g} points below {gate['reference']}; {changes}): "
              f"{'passed' if gate['passed'] else 'FAILED'}")


def _cmd_demo(args, progress) -> int:
    from .demo.build_demo import build_demo

    result = build_demo(args.out, _build_options(args), progress)
    _print_summary(result.path, result.manifest)
    print(f'try: vlm-export generate {args.out} --image <easy-vqa image> --prompt "What shape is in the image?"')
    return 0


def _cmd_repository(args, progress) -> int:
    from .model_repository.render import RepositoryOptions, render_repository

    options = RepositoryOptions(target=args.target, instances=args.instances, vlm_instances=args.vlm_instances,
                                max_queue_delay_us=args.max_queue_delay_us, decoder_mode=args.decoder_mode,
                                threads=args.threads, max_image_pixels=args.max_image_pixels,
                                max_image_mb=args.max_image_mb,
                                **({"max_queue": args.max_queue} if args.max_queue else {}),
                                **({} if args.image_cache_mb is None else {"image_cache_mb": args.image_cache_mb}),
                                **({} if args.prefix_cache_mb is None else {"prefix_cache_mb": args.prefix_cache_mb}),
                                **({} if args.max_prefill_tokens is None else {"max_prefill_tokens": args.max_prefill_tokens}),
                                **({} if args.max_prefill_padding is None else {"max_prefill_padding": args.max_prefill_padding}),
                                tensorrt_version=args.tensorrt_version, device=args.device)
    with progress.step(f"rendering the {args.target} repository") as advance:
        out = render_repository(args.build, args.out, options, force=args.force, check_hashes=not args.no_hash_check,
                                configs_only=args.configs_only)
        advance()
    if args.configs_only:
        return 0  # render said what the folder lacks
    print(f"model repository written to {out}")
    print(f"serve it: vlm-export serve {args.out}")
    return 0


def _cmd_serve(args, progress) -> int:
    from .serve.server import serve_forever

    return serve_forever(args.repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                         metrics_port=args.metrics_port, log_file=args.log_file, openai_port=args.openai_port,
                         openai_model=args.openai_model, openai_options={"allow_url_fetch": args.allow_url_fetch})


def _cmd_serve_openai(args, progress) -> int:
    from .serve.openai_api import serve_openai_forever

    return serve_openai_forever(args.triton_grpc, args.host, args.port, args.model,
                                allow_url_fetch=args.allow_url_fetch)


def _cmd_tokenize(args, progress) -> int:
    from .manifest import read_manifest
    from .runtime.generate import token_text
    from .runtime.load import load_tokenizer

    tokenizer = load_tokenizer(args.build / read_manifest(args.build)["tokenizer"])
    pieces = [token_text(tokenizer, token) for token in tokenizer.encode(args.text, add_special_tokens=False)]
    if args.json:
        print(json.dumps([piece.to_dict() for piece in pieces]))
    else:
        for piece in pieces:
            print(f"{piece.token_id:>8}  {piece.text!r}")
    return 0


def _cmd_health(args, progress) -> int:
    from .serve.server import liveness_failure

    reason = liveness_failure(args.http_port, args.host, args.timeout)
    if reason is not None:
        raise ServeError(f"not live: {reason}")
    print(f"live: tritonserver on HTTP port {args.http_port}, no dead python-backend stub")
    return 0


def _cmd_ask(args, progress) -> int:
    from .client.client import VLMClient

    client = VLMClient(args.url, model=args.model)
    params = _request_settings(args)
    if args.stream:
        for event in client.stream(args.prompt, args.image, messages=_messages(args), **params):
            if isinstance(event, str):
                print(event, end="", flush=True)
            else:
                final = event
        print()
    else:
        final = client.generate(args.prompt, args.image, messages=_messages(args), **params)
        print(final.text)
    _print_logprobs(final.logprobs)
    print(f"[{final.completion_tokens} tokens, prompt {final.prompt_tokens}, finish: {final.finish_reason}]",
          file=sys.stderr)
    return 0


def _cmd_deploy(args, progress) -> int:
    import shlex

    from .deploy import KubernetesOptions, build_command, image_for, inspect_repository, render_kubernetes

    selector = dict(item.split("=", 1) for item in args.node_selector if "=" in item)
    if len(selector) != len(args.node_selector):
        raise InputError(f"--node-selector takes KEY=VALUE, got {args.node_selector}")
    options = KubernetesOptions(
        name=args.name, namespace=args.namespace, image_pull_secret=args.image_pull_secret,
        pvc=args.pvc, pvc_subpath=args.pvc_subpath, repository_uri=args.repository_uri,
        credentials_secret=args.credentials_secret, service_account=args.service_account,
        replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_cpu_utilization=args.target_cpu, target_queue_length=args.target_queue, cpu=args.cpu,
        memory=args.memory, cpu_limit=args.cpu_limit, memory_limit=args.memory_limit, gpus=args.gpus,
        shm_size=args.shm_size, node_selector=selector, startup_timeout_s=args.startup_timeout,
        openai=not args.no_openai, openai_port=args.openai_port, service_type=args.service_type,
        openai_command=tuple(shlex.split(args.openai_command)) if args.openai_command else None,
        **({"image": args.image} if args.image else {}))
    paths = render_kubernetes(args.repository, args.out, options, force=args.force)
    print(f"Kubernetes manifests written to {args.out}: {', '.join(p.name for p in paths)}")
    info = inspect_repository(args.repository)
    image = image_for(info, options)
    print(f"image: {image} (build it: {build_command(image, bool(info.python_on_gpu))})")
    if info.python_on_gpu and args.image:
        print(f"  python models on a GPU ({', '.join(info.python_on_gpu)}): {image} must have onnxruntime-gpu in place "
              "of onnxruntime, or they run on the CPU")
    print(f"apply: kubectl apply -f {args.out}")
    return 0


def _cmd_bench(args, progress) -> int:
    from .bench import BenchOptions, parse_csv, run_bench

    options = BenchOptions(backends=parse_csv(args.backends, "--backends"), batch=parse_csv(args.batch, "--batch", int),
                           concurrency=parse_csv(args.concurrency, "--concurrency", int), new_tokens=args.new_tokens,
                           threads=args.threads, out=args.out or args.build / "bench",
                           check_hashes=not args.no_hash_check, peer=args.peer, peer_precision=args.peer_precision,
                           peer_gguf=args.peer_gguf, device=args.device, prefix_cache=not args.no_prefix_cache,
                           dtype=args.dtype or ("fp16" if args.device.strip().lower().startswith("cuda") else "fp32"))
    results = run_bench(args.build, options, progress)
    for kind, path in results["files"].items():
        print(f"  {kind:10s} {path}")
    return 0


def _cmd_engines(args, progress) -> int:
    from .engines.tensorrt import build_engines, check_compatibility

    if args.check_only:
        from .manifest import read_manifest
        from .model_repository.render import RepositoryOptions, model_configs

        configs = model_configs(read_manifest(args.build), RepositoryOptions(target="tensorrt"))
        report = check_compatibility(args.build, args.tensorrt_version, configs)
        for line in report.lines():
            print(line)
        return 0 if report.ok else 1
    engines = build_engines(args.build, progress, version_compatible=args.version_compatible,
                            tensorrt_version=args.tensorrt_version)
    for stage, engine in engines.items():
        print(f"  {stage:15s} {engine['precision']:5s} {engine['file']}  (TensorRT {engine['tensorrt']}"
              f"{', version-compatible' if engine.get('version_compatible') else ''}, compute capability "
              f"{engine['compute_capability']}: {engine['gpu']})")
    return 0


def _cmd_adapters(args, progress) -> int:
    from .adapters import registered

    adapters = sorted(registered().items())
    names = max(len(name) for name, _ in adapters)
    types = max(len("/".join(cls.model_types)) for _, cls in adapters)
    for name, cls in adapters:
        print(f"{name:{names}s} model_type {'/'.join(cls.model_types):{types}s} {cls.description}")
    return 0


COMMANDS = {"build": _cmd_build, "generate": _cmd_generate, "verify": _cmd_verify, "eval": _cmd_eval,
            "demo": _cmd_demo, "repository": _cmd_repository, "serve": _cmd_serve, "serve-openai": _cmd_serve_openai,
            "health": _cmd_health, "tokenize": _cmd_tokenize, "ask": _cmd_ask, "bench": _cmd_bench, "engines": _cmd_engines, "adapters": _cmd_adapters,
            "deploy": _cmd_deploy}


#: top-level module -> the install that provides it, for a command run without its optional extra
OPTIONAL_MODULES = {
    "tritonclient": "vlm-export[serve]", "pytriton": "vlm-export[serve]", "fastapi": "vlm-export[serve]",
    "uvicorn": "vlm-export[serve]", "easy_vqa": "vlm-export[demo]", "onnxruntime_genai": "vlm-export[peer]",
    "llama_cpp": "llama-cpp-python", "kubernetes_validate": "vlm-export[test]",
    "pycocoevalcap": "vlm-export[captions]",
}


def missing_extra(err: ModuleNotFoundError) -> str | None:
    """The one-line hint for a missing optional dependency, or None for any other missing module."""
    top = (err.name or "").split(".")[0]
    if top not in OPTIONAL_MODULES:
        return None
    return (f"this command needs {top!r}, which the default set-up leaves out: pip install '{OPTIONAL_MODULES[top]}' "
            "(or bash scripts/setup.sh --serve / --captions / --tests)")


#: OSErrors that say something about the machine (a read-only build folder, a full disk), not about vlm-export
_ENVIRONMENT_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT}


class _Terminated(KeyboardInterrupt):
    """SIGTERM (what timeout, docker, systemd and Kubernetes send) unwinds as Ctrl-C does, so a build's
    half-written folder is removed on the way out instead of left behind."""


_on_sigterm = raising(_Terminated)


def main(argv: list[str] | None = None) -> int:
    import signal

    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from .progress import RichProgress

    before = signal.signal(signal.SIGTERM, _on_sigterm) if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL else None
    try:
        return _run(args, RichProgress())
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def _run(args, progress) -> int:
    try:
        return COMMANDS[args.command](args, progress)
    except VlmExportError as e:
        # one line; details (e.g. a server log excerpt) stay in the files the message names
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return e.exit_code
    except _Terminated:
        print("terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug, or a library failing in a way no stage anticipated
        hint = missing_extra(e) if isinstance(e, ModuleNotFoundError) else None
        if hint is not None:
            print(f"error: {hint}", file=sys.stderr)
            return 1
        if isinstance(e, OSError) and e.filename and e.errno in _ENVIRONMENT_ERRNOS:  # the machine's, not a bug
            print(f"error: cannot use {e.filename}: {e.strerror} (a read-only or full file system, or no "
                  "permission); give a writable place (--out) or free space", file=sys.stderr)
            return 1
        if os.environ.get("VLM_EXPORT_TRACEBACK"):
            raise
        print(f"error: internal error ({first_line(e)[:300]}), a bug in vlm-export or a library it "
              f"calls, not in your input; the traceback is in {_save_traceback(e)} (VLM_EXPORT_TRACEBACK=1 prints "
              "it): please report it", file=sys.stderr)
        return 70  # EX_SOFTWARE


def _save_traceback(e: BaseException) -> Path:
    import tempfile
    import traceback

    fd, name = tempfile.mkstemp(prefix="vlm-export-traceback-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        f.write(f"vlm-export {' '.join(sys.argv[1:])}\n\n")
        traceback.print_exception(e, file=f)
    return Path(name)


if __name__ == "__main__":
    sys.exit(main())
