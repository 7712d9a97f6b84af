"""What decoding several sequences together buys, in-process on ONNX Runtime: the generation
scheduler's throughput at max_batch 1, 2, 4, 8 (same requests, EOS ignored), one decode step's
latency per batch size (on the in-place KV buffer where the build has one), one request's image path +
prefill, and from those the ceiling: the throughput ratio no scheduler can beat with these costs.
Records benchmarks/results/<name>/batch.json and batch.md.

    python benchmarks/batch_decode.py build/demo --name demo

A decode step of a small LM reads every weight once whatever the batch, so a step for 4 rows
should cost far less than 4 steps for 1; this measures how much less on the machine at hand.
Batch sizes take turns in mirrored blocks (1 2 4 8, 8 4 2 1) so a busy spell hits all alike.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = ("What shape is in the image?", "What color is the shape?", "Is there a circle?",
             "Does this image not contain a red shape?")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from vlm_export.bench import batching, measure
    from vlm_export.datasets import load_split
    from vlm_export.manifest import read_manifest
    from vlm_export.runtime.generate import GenerationConfig, GenerationRequest, generate_batch
    from vlm_export.runtime.load import open_build

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("build", type=Path)
    p.add_argument("--name", default=None)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    pipe = open_build(args.build, threads=args.threads)
    batches = [b for b in (1, 2, 4, 8) if b <= pipe.limits.max_batch]
    config = GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    items = load_split("test", args.requests)
    requests = [GenerationRequest(QUESTIONS[i % len(QUESTIONS)], (it.image,), config) for i, it in enumerate(items)]
    generate_batch(pipe, requests[:2], max_batch=2)  # warm-up: sessions, kernels, tokenizer

    def run(b: int) -> float:
        start = time.perf_counter()
        results = generate_batch(pipe, requests, max_batch=b)
        assert sum(r.completion_tokens for r in results) == len(requests) * args.new_tokens
        return time.perf_counter() - start

    walls = measure.alternating({str(b): lambda b=b: run(b) for b in batches}, warmup=0, n=args.rounds)
    # one decode step at a realistic past length, per batch size, on the state the scheduler runs (the
    # in-place buffer where the build has one); and one request's own work: its image path + prefill
    past = len(pipe.prompt_ids(QUESTIONS[0], 1)) + args.new_tokens // 2
    steps = batching.step_costs(pipe, batches, past, None, pipe.prompt_ids(QUESTIONS[0], 1)[-1])
    prefill_ms = batching.request_cost(pipe, [(r.prompt, r.images[0]) for r in requests])  # 2 untimed

    tokens = len(requests) * args.new_tokens
    rows = []
    for b in batches:
        wall = float(np.median(walls[str(b)]))
        rows.append({"max_batch": b, "requests": len(requests), "tokens": tokens, "wall_s": round(wall, 3),
                     "tokens_per_s": round(tokens / wall, 2), "decode_step_ms": steps[b],
                     "decode_step_ms_per_row": round(steps[b]["p50"] / b, 3)})
    base = rows[0]
    # the best a scheduler can do with these costs (vlm_export.bench.batching)
    for r in rows:
        r["throughput_vs_batch1"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
        r["ceiling_vs_batch1"] = round(batching.ceiling(prefill_ms["p50"], {b: st["p50"] for b, st in steps.items()},
                                                        args.new_tokens, r["max_batch"]), 3)
    out = {"created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "build": str(args.build),
           "machine": measure.machine(), "load_average": measure.load_average(),
           "settings": {"new_tokens": args.new_tokens, "ignore_eos": True, "greedy": True, "rounds": args.rounds,
                        "decode_past": past, "decode_state": "in place" if pipe.kv_in_place else "copying",
                        "threads": args.threads or "ONNX Runtime default (every core)",
                        "prefill": "each request alone, then it joins the running batch"},
           "decoder_precision": read_manifest(args.build)["graphs"][pipe.scheme.decoder_stage]["precision"],
           "backend": pipe.backend, "prefill_ms": prefill_ms, "rows": rows}
    folder = RESULTS / (args.name or args.build.name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "batch.json").write_text(json.dumps(out, indent=2))
    lines = [f"# Batched decoding: {args.build.name}", "",
             f"{out['created']}, {out['machine']['cpu']} ({out['machine']['usable_cores']} cores), load {out['load_average']}. "
             f"{len(requests)} easy-vqa requests (one image each), {args.new_tokens} new tokens each (EOS ignored), greedy; "
             f"median of {args.rounds} rounds. Decode step at past {past} ({out['settings']['decode_state']} KV), "
             f"p50 of 20. One request's first token alone (preprocessing, image path, prefill): {prefill_ms['p50']} ms "
             f"(p50 of {prefill_ms['n']}).", "",
             "The ceiling is the most a scheduler can reach with these costs: b prefills one after another "
             "(compute bound) then the new tokens in b-row steps, against b requests alone.", "",
             "| max_batch | tokens/s | vs batch 1 | ceiling vs batch 1 | wall (s) | decode step p50 (ms) | per row (ms) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['max_batch']} | {r['tokens_per_s']} | {r['throughput_vs_batch1']}x | "
                     f"{r['ceiling_vs_batch1']}x | {r['wall_s']} | "
                     f"{r['decode_step_ms']['p50']} | {r['decode_step_ms_per_row']} |")
    (folder / "batch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
