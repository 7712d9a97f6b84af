"""Where a decode step's time goes, ours against onnxruntime-genai's: the same LM's two graphs run by
the same ONNX Runtime with the same session options, each through its own loop.

* ``genai-og``: genai's folder through its own C++ generator (og.Generator), the step as its users see it;
* ``genai-raw``: genai's model.onnx in a plain ONNX Runtime session from Python (its past/present
  buffers shared, as genai binds them; same intra-op threads and spinning as ours): its graph alone;
* each NAME=BUILD: our decoder through ``VLMPipeline.step`` (the in-place KV buffer), with
  ``run_with_iobinding`` timed apart from the Python around it.

Text only, the 37-token prompt, 64 greedy tokens (EOS ignored), generation by generation in mirrored
order, the first round discarded; p50 over every decode step. "run" = ONNX Runtime's call alone,
"step" = the whole step of that loop, "python" = step - run (0 for genai-og: its loop is C++).

    .venv/bin/python benchmarks/peer_graph_ab.py GENAI_FOLDER NAME=BUILD [NAME=BUILD ...] [--rounds 7] [--json OUT]
"""
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vlm_export.adapters.reference import open_pipeline
from vlm_export.bench.peer import GenaiDecoder

NEW_TOKENS = 64


def ours(pipe, ids):
    session = pipe.runners["lm_decoder"].session
    real, spent = session.run_with_iobinding, []

    def timed(binding, *args, **kwargs):
        start = time.perf_counter()
        out = real(binding, *args, **kwargs)
        spent.append(time.perf_counter() - start)
        return out

    session.run_with_iobinding = timed

    def generation():
        logits, prefilled = pipe.prefill(list(ids), pipe.scheme.empty_image_input())
        state, token = pipe.running(prefilled, [len(ids) + NEW_TOKENS]), int(np.argmax(logits))
        spent.clear()
        walls, tokens = [], [token]
        for _ in range(NEW_TOKENS - 1):
            start = time.perf_counter()
            logits, state = pipe.step(state, np.asarray([token]))
            token = int(np.argmax(logits[0]))
            walls.append(time.perf_counter() - start)
            tokens.append(token)
        return list(spent), walls, tokens

    return generation


def genai_raw(folder: Path, ids, threads: int):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")  # as our runner's default
    session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    shape = (1, decoder["num_key_value_heads"], len(ids) + NEW_TOKENS, decoder["head_size"])
    caches = {i.name: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
              for i in session.get_inputs() if i.name.startswith("past_key_values")}

    def generation():
        binding, spent, walls = session.io_binding(), [], []
        binding.bind_output("logits", "cpu")  # first: get_outputs()[0]
        for name, value in caches.items():  # past and present on one buffer, as genai's past_present_share_buffer
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values", "present"), value)

        def run(tokens, total):
            binding.bind_cpu_input("input_ids", np.asarray([tokens], np.int64))
            binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
            binding.bind_output("logits", "cpu")
            start = time.perf_counter()
            session.run_with_iobinding(binding)
            spent.append(time.perf_counter() - start)
            return int(np.argmax(binding.get_outputs_as_ortvaluevector()[0].numpy()[0, -1]))

        token = run(list(ids), len(ids))
        spent.clear()
        tokens = [token]
        for i in range(NEW_TOKENS - 1):
            start = time.perf_counter()
            token = run([token], len(ids) + 1 + i)
            walls.append(time.perf_counter() - start)
            tokens.append(token)
        return list(spent), walls, tokens

    return generation


def genai_og(folder: Path, ids, threads: int):
    decoder = GenaiDecoder(folder, threads, "fp32")
    og = decoder.og

    def generation():
        params = og.GeneratorParams(decoder.model)
        # min_length = max_length: EOS does not end it (as the other loops, which ignore it)
        params.set_search_options(do_sample=False, max_length=len(ids) + NEW_TOKENS, min_length=len(ids) + NEW_TOKENS)
        generator = og.Generator(decoder.model, params)
        generator.append_tokens(list(ids))
        generator.generate_next_token()
        tokens, walls = [int(generator.get_next_tokens()[0])], []
        for _ in range(NEW_TOKENS - 1):
            start = time.perf_counter()
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
            walls.append(time.perf_counter() - start)
        return list(walls), walls, tokens

    return generation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("genai", type=Path)
    parser.add_argument("builds", nargs="+", metavar="NAME=BUILD")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pipes = {name: open_pipeline(Path(path), threads=args.threads, check_hashes=False)
             for name, path in (b.split("=", 1) for b in args.builds)}
    ids = next(iter(pipes.values())).prompt_ids("What animal is in the picture?", 0)
    eos = set(GenaiDecoder(args.genai, args.threads, "fp32").eos)

    def answer(tokens):  # up to the first EOS
        return next((tokens[:i] for i, t in enumerate(tokens) if t in eos), tokens)

    loops = {"genai-og": genai_og(args.genai, ids, args.threads), "genai-raw": genai_raw(args.genai, ids, args.threads),
             **{name: ours(pipe, ids) for name, pipe in pipes.items()}}
    load_before = os.getloadavg()
    times = {name: ([], []) for name in loops}
    answers = {}
    for r in range(args.rounds):
        for name in (list(loops) if r % 2 == 0 else list(loops)[::-1]):
            run, step, tokens = loops[name]()
            answers[name] = tokens
            if r:  # the first round warms every session
                times[name][0].extend(run)
                times[name][1].extend(step)
    rows, reference = {}, answer(answers["genai-raw"])
    for name, (run, step) in times.items():
        run_ms, step_ms = np.median(run) * 1e3, np.median(step) * 1e3
        rows[name] = {"run_ms": round(float(run_ms), 3), "step_ms": round(float(step_ms), 3),
                      "python_ms": round(float(np.median(np.array(step) - np.array(run)) * 1e3), 3),
                      # genai's own loop holds EOS off (min_length), the others do not: up to the first EOS
                      "same_answer_as_genai_raw": answers[name][:len(reference)] == reference}
        print(f"{name:12s} run p50 {run_ms:7.3f} ms  step p50 {step_ms:7.3f} ms  python {rows[name]['python_ms']:6.3f} ms"
              f"  answer = genai-raw's: {rows[name]['same_answer_as_genai_raw']}")
    result = {"load_before": load_before, "load_after": os.getloadavg(), "rounds": args.rounds,
              "threads": args.threads, "new_tokens": NEW_TOKENS, "rows": rows}
    print("load", load_before, "->", result["load_after"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
