"""Peer runtimes in the bench (issue 16): another runtime's decoder on the SAME language model,
measured in the same run as ours.

The peers are onnxruntime-genai (its model builder's fused graph of the build's LM, written by
the adapter as a standalone causal-LM folder) and llama.cpp (through llama-cpp-python, on a GGUF
file of the same LM). Each runs text only: the same prompt token ids (the build's own
tokenizer and chat template, no image), greedy, the same number of new tokens (EOS ignored),
the same thread count. Ours is the build's decoder graph on ONNX Runtime, fed by the build's
decoding scheme, with the image input empty. Every decoder is driven token ids in, token ids out
(no detokenisation), and the decoders take turns in mirrored blocks (``measure.alternating``).

Time to first token = everything a request does before its first new token is known (the
peer's generator set-up, the prefill of the prompt, the greedy pick); decode = one step per
later token (a forward pass of one token + the greedy pick), p50 over every step of every run.
A peer's int4 is not held to our accuracy gate, so its greedy answers are compared with ours
on the bench's prompts (where they first differ).

Both peers are optional: absent, they are skipped with a one-line notice.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..errors import BuildError, InputError
from . import measure

GENAI, LLAMA_CPP, OURS = "onnxruntime-genai", "llama.cpp", "vlm-export"
#: what ``BenchOptions.peer_precision`` may ask the onnxruntime-genai builder for
PRECISIONS = ("int4", "fp32")
INSTALL_HINT = "pip install 'vlm-export[peer]'"
GENAI_CONFIG = "genai_config.json"
BUILT_MARKER = "vlm_export_peer.json"  # beside a peer built by the bench: what it was built from
# the builder's default int4 block (its --help: "block_size ... Default value is 32"), pinned so
# a later default cannot change what the table compares
INT4_BLOCK = 32
PEER_WARMUP = 1  # discarded generations per block


@dataclass
class Generation:
    """One greedy generation: the new tokens and how long they took."""

    tokens: list[int]
    ttft_s: float
    steps_s: list[float]  # one per token after the first


def _greedy_loop(first: Callable[[], int], step: Callable[[int], int], n: int, stop: Sequence[int]) -> Generation:
    """``first()`` prefills and returns the first token, ``step(token)`` feeds one token and
    returns the next; up to ``n`` tokens, ending early at a token of ``stop``."""
    t0 = time.perf_counter()
    token = first()
    tokens, steps = [token], []
    ttft = time.perf_counter() - t0
    while len(tokens) < n and token not in stop:
        t = time.perf_counter()
        token = step(token)
        steps.append(time.perf_counter() - t)
        tokens.append(token)
    return Generation(tokens, ttft, steps)


class OurDecoder:
    """The build's decoder through its own runner and decoding scheme, text only."""

    runtime = OURS

    def __init__(self, pipe, precision: str):
        self.pipe, self.precision = pipe, precision

    def describe(self) -> dict:
        return {"runtime": self.runtime, "precision": self.precision, "backend": self.pipe.backend,
                "kv": "one buffer written in place" if self.pipe.kv_in_place else "copied each step"}

    def generate(self, ids: Sequence[int], n: int, stop: Sequence[int] = ()) -> Generation:
        pipe, scheme = self.pipe, self.pipe.scheme
        state = None

        def first() -> int:
            nonlocal state
            logits, prefilled = pipe.prefill(list(ids), scheme.empty_image_input())
            state = pipe.running(prefilled, [len(ids) + n])  # the in-place KV buffer where the build has it
            return int(np.argmax(logits))

        def step(token: int) -> int:
            nonlocal state
            logits, state = pipe.step(state, np.asarray([token]))
            return int(np.argmax(logits[0]))

        return _greedy_loop(first, step, n, stop)


class GenaiDecoder:
    """An onnxruntime-genai model folder, driven by its Generator API (og.Model, og.GeneratorParams,
    og.Generator: append_tokens runs the prompt, generate_next_token picks a token and, from the
    second call on, first runs the model on the previous one)."""

    runtime = GENAI

    def __init__(self, folder: Path, threads: int, precision: str):
        import onnxruntime_genai as og

        self.og, self.folder, self.precision = og, Path(folder), precision
        config = og.Config(str(folder))
        # genai_config.json's session options: the same intra-op thread count as ours
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)
        eos = json.loads((self.folder / GENAI_CONFIG).read_text())["model"].get("eos_token_id", [])
        self.eos = tuple(eos) if isinstance(eos, list) else (eos,)

    def describe(self) -> dict:
        return {"runtime": self.runtime, "precision": self.precision, "model": str(self.folder),
                "version": self.og.__version__}

    def generate(self, ids: Sequence[int], n: int, stop: Sequence[int] = ()) -> Generation:
        og = self.og
        gen = None

        def first() -> int:
            nonlocal gen
            params = og.GeneratorParams(self.model)
            length = len(ids) + n
            # greedy; a timed run (no stop tokens) masks EOS until the length, so it makes all n
            # tokens as ours does; the agreement run stops at EOS like ours
            params.set_search_options(do_sample=False, max_length=length, min_length=0 if stop else length)
            gen = og.Generator(self.model, params)
            gen.append_tokens(np.asarray(ids, dtype=np.int32))
            gen.generate_next_token()
            return int(gen.get_next_tokens()[0])

        def step(_: int) -> int:  # the generator already holds the previous token
            gen.generate_next_token()
            return int(gen.get_next_tokens()[0])

        # the generator is done at its own EOS ids too: the loop must end there as well
        return _greedy_loop(first, step, n, tuple(stop) + (self.eos if stop else ()))


class LlamaCppDecoder:
    """A GGUF file on llama.cpp (llama-cpp-python's Llama: reset, eval, the last row's logits)."""

    runtime = LLAMA_CPP

    def __init__(self, gguf: Path, threads: int, context: int):
        import llama_cpp

        self.lib, self.gguf = llama_cpp, Path(gguf)
        # n_threads decodes, n_threads_batch prefills: both the bench's thread count
        self.llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=context, n_batch=max(512, context),
                                   n_threads=threads, n_threads_batch=threads, verbose=False)
        self.n_vocab = self.llm.n_vocab()
        self.precision = _gguf_type(llama_cpp, self.llm.metadata.get("general.file_type"))

    def describe(self) -> dict:
        return {"runtime": self.runtime, "precision": self.precision, "model": str(self.gguf),
                "version": getattr(self.lib, "__version__", None)}

    def shape(self) -> dict:
        meta, arch = self.llm.metadata, self.llm.metadata.get("general.architecture", "")
        return {"num_layers": int(meta.get(f"{arch}.block_count", -1)),
                "hidden_size": int(meta.get(f"{arch}.embedding_length", -1)), "vocab_size": self.n_vocab}

    def _next(self) -> int:
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))
        return int(np.argmax(logits))

    def generate(self, ids: Sequence[int], n: int, stop: Sequence[int] = ()) -> Generation:
        llm = self.llm

        def first() -> int:
            llm.reset()
            llm.eval(list(ids))
            return self._next()

        def step(token: int) -> int:
            llm.eval([token])
            return self._next()

        return _greedy_loop(first, step, n, stop)


def _gguf_type(llama_cpp, file_type) -> str:
    """The GGUF's ``general.file_type`` as llama.cpp names it (its LLAMA_FTYPE_* constants): Q4_1, ..."""
    for name in dir(llama_cpp):
        if name.startswith("LLAMA_FTYPE_") and str(getattr(llama_cpp, name)) == str(file_type):
            kind = name.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")
            return {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}.get(kind, kind)
    return f"GGUF file type {file_type}"


# --------------------------------------------------------------------------- finding the peers


def available(runtime: str) -> bool:
    """Whether the runtime's package imports (an install whose native library fails counts as absent)."""
    module = {GENAI: "onnxruntime_genai", LLAMA_CPP: "llama_cpp"}[runtime]
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def absent_notice(runtime: str) -> str:
    package = {GENAI: "onnxruntime-genai", LLAMA_CPP: "llama-cpp-python"}[runtime]
    return f"{runtime} peer skipped: {package} is not installed ({INSTALL_HINT})"


def graph_precision(folder: Path) -> str:
    """int4/int8 when the graph's MatMuls are MatMulNBits, else the element type of its logits."""
    import onnx

    config = json.loads((folder / GENAI_CONFIG).read_text())
    model = onnx.load(os.fspath(folder / config["model"]["decoder"]["filename"]), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            return f"int{bits}"
    logits = next((o for o in model.graph.output if o.name == "logits"), model.graph.output[0])
    dtype = onnx.helper.tensor_dtype_to_np_dtype(logits.type.tensor_type.elem_type)
    return {"float32": "fp32", "float16": "fp16"}.get(dtype.name, dtype.name)


def check_same_lm(label: str, shape: dict, geometry) -> None:
    """InputError when a peer's model is visibly not the build's LM (layers, width or vocabulary)."""
    ours = {"num_layers": geometry.num_layers, "hidden_size": geometry.hidden_size, "vocab_size": geometry.vocab_size}
    wrong = [f"{k} {shape[k]} (the build's LM: {v})" for k, v in ours.items() if shape.get(k) not in (None, v)]
    if wrong:
        raise InputError(f"{label} is not this build's language model: {', '.join(wrong)}")


def genai_shape(folder: Path) -> dict:
    model = json.loads((folder / GENAI_CONFIG).read_text())["model"]
    decoder = model.get("decoder", {})
    return {"num_layers": decoder.get("num_hidden_layers"), "hidden_size": decoder.get("hidden_size"),
            "vocab_size": model.get("vocab_size")}


def genai_folder(peer: str) -> Path:
    folder = Path(peer)
    if not (folder / GENAI_CONFIG).is_file():
        raise InputError(f"--peer {peer}: not an onnxruntime-genai model folder (no {GENAI_CONFIG}); pass one "
                         "made by its model builder, or 'build'")
    return folder


def build_genai_model(build_dir: Path, source: dict, precision: str, out: Path) -> Path | str:
    """The build's LM through onnxruntime-genai's model builder, into ``out`` (reused while the
    source model and the builder are the same). Returns the folder, or why there is none."""
    import onnxruntime_genai as og

    from ..adapters.reference import load_source

    key = {"source": source, "precision": precision, "onnxruntime_genai": og.__version__,
           "block_size": INT4_BLOCK if precision == "int4" else None}
    marker = out / BUILT_MARKER
    if (out / GENAI_CONFIG).is_file() and marker.is_file() and json.loads(marker.read_text()) == key:
        return out
    loaded = load_source(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        lm = loaded.adapter.write_text_model(loaded, Path(tmp) / "lm")
        if lm is None:
            return f"no standalone LM for this architecture ({loaded.adapter.name} adapter)"
        del loaded
        built = Path(tmp) / "model"
        extra = ["hf_token=false"] + ([f"block_size={INT4_BLOCK}"] if precision == "int4" else [])
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(lm), "-o", str(built),
               "-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "cache"), "--extra_options", *extra]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0 or not (built / GENAI_CONFIG).is_file():
            last = (run.stderr.strip().splitlines() or ["no message"])[-1]
            raise BuildError(f"onnxruntime-genai's model builder failed on {build_dir.name}'s LM: {last}")
        (built / BUILT_MARKER).write_text(json.dumps(key, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(built, out)
    return out


# --------------------------------------------------------------------------- measuring


def first_divergence(ours: Sequence[int], theirs: Sequence[int]) -> int | None:
    """Index of the first token where two greedy answers differ (a shorter answer differs where
    it ends); None when they are the same."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            return i
    return None if len(ours) == len(theirs) else min(len(ours), len(theirs))


def _until_stop(tokens: list[int], stop: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stop:
            return tokens[: i + 1]
    return tokens


def agreement(ours, peer, prompts: list[tuple[str, list[int]]], n: int, stop: Sequence[int], tokenizer) -> dict:
    """Greedy answers of ``peer`` against ``ours`` on each prompt, up to EOS (ours' EOS ids)."""
    stop_set = {int(s) for s in stop}
    rows = []
    for text, ids in prompts:
        a = _until_stop(ours.generate(ids, n, stop).tokens, stop_set)
        b = _until_stop(peer.generate(ids, n, stop).tokens, stop_set)
        cut = first_divergence(a, b)
        rows.append({"prompt": text, "first_divergence": cut, "ours_tokens": len(a), "peer_tokens": len(b),
                     "ours_text": tokenizer.decode(a, skip_special_tokens=True),
                     "peer_text": tokenizer.decode(b, skip_special_tokens=True)})
    same = sum(r["first_divergence"] is None for r in rows)
    return {"identical": same, "prompts": len(rows), "rows": rows}


def summarize(generations: list[Generation]) -> dict:
    steps = [s for g in generations for s in g.steps_s]
    decode = measure.summarize(steps)
    return {"runs": len(generations), "tokens": sum(len(g.tokens) for g in generations),
            "ttft_ms": measure.summarize([g.ttft_s for g in generations]), "decode_ms": decode,
            "tokens_per_s": round(1e3 / decode["p50"], 3) if steps else None}


def compare(decoders: dict, prompts: list[tuple[str, list[int]]], n: int, runs: int, warmup: int,
            stop: Sequence[int], tokenizer, advance: Callable[[], None] = lambda: None) -> list[dict]:
    """Every decoder timed on the first prompt in mirrored blocks, then each peer's greedy answers
    against ours on every prompt. ``decoders``: label -> decoder, ours first. One row per decoder;
    ratios are ours against the row's (> 1: ours is faster)."""
    ids = prompts[0][1]
    timed = measure.alternating({label: (lambda d=d: d.generate(ids, n)) for label, d in decoders.items()},
                                warmup, runs, None, advance)
    ours_label, ours = next(iter(decoders.items()))
    rows = []
    base = summarize(timed[ours_label])
    for label, decoder in decoders.items():
        row = {"label": label, **decoder.describe(), **summarize(timed[label])}
        if decoder is not ours:
            row["ours_vs_peer"] = {
                "decode_tokens_per_s": round(row["decode_ms"]["p50"] / base["decode_ms"]["p50"], 3),
                "ttft": round(row["ttft_ms"]["p50"] / base["ttft_ms"]["p50"], 3)}
            row["agreement"] = agreement(ours, decoder, prompts, n, stop, tokenizer)
        rows.append(row)
    return rows


def bench_peers(build_dir: Path, manifest: dict, pipe, options, threads: int, progress,
                questions: Sequence[str]) -> dict:
    """The peer section of the results: ours and each peer that ``options`` asks for and that is
    installed, timed on the first of ``questions`` (text only), answering all of them for the
    greedy agreement; ``notices`` says, one line each, which peers were skipped and why."""
    notices: list[str] = []
    decoders: dict = {}
    geometry = pipe.scheme.geometry
    stop = list(pipe.eos_token_ids)
    prompts = [(q, pipe.prompt_ids(q, 0)) for q in questions]
    longest = max(len(ids) for _, ids in prompts)
    pipe.check_length(longest, options.new_tokens)
    if options.peer is not None:
        if not available(GENAI):
            notices.append(absent_notice(GENAI))
        else:
            if options.peer == "build":
                what = f"building the {options.peer_precision} {GENAI} peer of {build_dir.name}'s LM"
                with progress.step(what) as adv:
                    folder = build_genai_model(build_dir, manifest["source"], options.peer_precision,
                                               build_dir / "bench" / f"peer-{options.peer_precision}")
                    adv()
            else:
                folder = genai_folder(options.peer)
            if isinstance(folder, str):
                notices.append(f"{GENAI} peer skipped: {folder}")
            else:
                check_same_lm(f"the {GENAI} model {folder}", genai_shape(folder), geometry)
                decoders[f"{GENAI} {graph_precision(folder)}"] = GenaiDecoder(folder, threads, graph_precision(folder))
    if options.peer_gguf is not None:
        if not available(LLAMA_CPP):
            notices.append(absent_notice(LLAMA_CPP))
        else:
            llama = LlamaCppDecoder(Path(options.peer_gguf), threads, longest + options.new_tokens + 8)
            check_same_lm(f"the GGUF file {options.peer_gguf}", llama.shape(), geometry)
            decoders[f"{LLAMA_CPP} {llama.precision}"] = llama
    out = {"notices": notices, "rows": []}
    if not decoders:
        return out
    precision = manifest["graphs"][pipe.scheme.decoder_stage]["precision"]
    decoders = {f"{OURS} {precision}": OurDecoder(pipe, precision), **decoders}
    runs = options.requests
    with progress.step(f"peer decoders, {options.new_tokens} tokens: {' vs '.join(decoders)}",
                       total=runs * len(decoders)) as advance:
        out["rows"] = compare(decoders, prompts, options.new_tokens, runs, PEER_WARMUP, stop, pipe.tokenizer, advance)
    out.update(prompt=prompts[0][0], prompt_tokens=len(prompts[0][1]), new_tokens=options.new_tokens,
               threads=threads, runs=runs, warmup_per_block=PEER_WARMUP,
               agreement_prompts=[q for q, _ in prompts])
    return out
