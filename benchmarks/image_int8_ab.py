"""An int8 image stage against its fp32 graph, and against itself with its per-reader quantizers merged.

    python benchmarks/image_int8_ab.py FP32_GRAPH INT8_GRAPH [--threads 2] [--rounds 12] [--json OUT]

FP32_GRAPH: a stage's fp32 graph (an fp32 build's ``graphs/vision_encoder.onnx``); INT8_GRAPH: the same
stage from an int8 build (``graphs/vision_encoder.int8.onnx``). The third row is INT8_GRAPH with the
``axis`` attributes that ``precision.convert.keep_quantizers_apart`` gave its activation QuantizeLinear
nodes taken away: what ONNX Runtime runs when its common-subexpression elimination merges them (its
x86 uint8 conversion then skips their readers). One random input of the graph's declared shape; the
three sessions take turns, order mirrored every round; p50 of each, and each output's cosine to fp32.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _merged(int8: Path, folder: Path) -> Path:
    model = onnx.load(str(int8), load_external_data=False)
    scalars = {i.name for i in model.graph.initializer if not i.dims}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[1] in scalars:
            kept = [a for a in node.attribute if a.name != "axis"]
            del node.attribute[:]
            node.attribute.extend(kept)
    out = folder / int8.name  # beside nothing: an int8 image stage is saved inline
    onnx.save(model, str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fp32", type=Path)
    parser.add_argument("int8", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths = {"fp32": args.fp32, "int8": args.int8, "int8, quantizers merged": _merged(args.int8, Path(folder))}
        sessions = {name: _session(path, args.threads) for name, path in paths.items()}
        first = sessions["fp32"].get_inputs()[0]
        shape = [d if isinstance(d, int) else 1 for d in first.shape]
        feed = {first.name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        outputs = {name: s.run(None, feed)[0] for name, s in sessions.items()}  # also the warm-up
        times = {name: [] for name in sessions}
        order = list(sessions)
        for round_ in range(args.rounds):
            for name in (order if round_ % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                sessions[name].run(None, feed)
                times[name].append(time.perf_counter() - start)
    reference = outputs["fp32"].astype(np.float64).ravel()
    rows = []
    for name, samples in times.items():
        out = outputs[name].astype(np.float64).ravel()
        rows.append({"graph": name, "p50_ms": round(float(np.median(samples)) * 1e3, 2),
                     "cosine_to_fp32": round(float(reference @ out / (np.linalg.norm(reference) * np.linalg.norm(out))), 6)})
    base = rows[0]["p50_ms"]
    print(f"input {first.name} {shape}, {args.threads} threads, {args.rounds} rounds, ONNX Runtime {ort.__version__}")
    print("| graph | p50 ms | vs fp32 | cosine to fp32 |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['graph']} | {row['p50_ms']:.1f} | {base / row['p50_ms']:.2f}x | {row['cosine_to_fp32']:.6f} |")
    if args.json:
        args.json.write_text(json.dumps({"input": shape, "threads": args.threads, "rounds": args.rounds,
                                         "onnxruntime": ort.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
