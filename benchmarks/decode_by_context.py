"""Decode ms/token and time to first token of several builds of the same LM at several context lengths: text only,
a prompt of repeated sentences cut to each length, greedy steps through the ONNX Runtime decoder as generation runs
it (in place where the build's fused form says so), builds alternating in mirrored order, in one process. Written to
OUT/results.json and OUT/results.md.

    .venv/bin/python benchmarks/decode_by_context.py OUT CONTEXTS STEPS ROUNDS BUILD [BUILD ...]
    e.g. benchmarks/decode_by_context.py results/x 326,2526 32 3 /tmp/old /tmp/new

The first BUILD is the base of the ratios. Hashes are not checked (builds made by other code are the point)."""
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from vlm_export.adapters.reference import open_pipeline

out, contexts, steps, rounds = Path(sys.argv[1]), [int(c) for c in sys.argv[2].split(",")], int(sys.argv[3]), \
    int(sys.argv[4])
builds = [Path(b) for b in sys.argv[5:]]
names = [f"{b.parent.name}/{b.name}" for b in builds]
pipes = dict(zip(names, (open_pipeline(b, threads=2, check_hashes=False) for b in builds)))
first = next(iter(pipes.values()))
sentence = first.tokenizer.encode(" The quick brown fox jumps over the lazy dog.", add_special_tokens=False)


def generate(pipe, length: int) -> tuple[float, list[float]]:
    """(prefill seconds, each decode step's seconds) for a prompt of ``length`` tokens."""
    ids = (sentence * (length // len(sentence) + 1))[:length]
    start = time.perf_counter()
    logits, state = pipe.prefill(ids, pipe.scheme.empty_image_input())
    prefill = time.perf_counter() - start
    state, token, times = pipe.running(state, [length + steps]), int(np.argmax(logits)), []
    for _ in range(steps):
        start = time.perf_counter()
        logits, state = pipe.step(state, np.asarray([token]))
        times.append(time.perf_counter() - start)
        token = int(np.argmax(logits[0]))
    return prefill, times


load = [os.getloadavg()]
measured = {(name, c): {"prefill_s": [], "step_s": []} for name in names for c in contexts}
for name in names:
    generate(pipes[name], 16)  # warm
for r in range(rounds):
    for length in contexts:
        for name in (names if r % 2 == 0 else names[::-1]):
            prefill, times = generate(pipes[name], length)
            measured[name, length]["prefill_s"].append(prefill)
            measured[name, length]["step_s"] += times
load.append(os.getloadavg())
rows = []
for length in contexts:
    base = None
    for name in names:
        m = measured[name, length]
        step, ttft = float(np.median(m["step_s"])) * 1e3, float(np.median(m["prefill_s"])) * 1e3
        base = base or (step, ttft)
        rows.append({"build": name, "context": length, "kv_in_place": bool(pipes[name].kv_in_place),
                     "decode_ms_per_token_p50": round(step, 2), "prefill_ms_p50": round(ttft, 1),
                     "decode_speedup_vs_first": round(base[0] / step, 3),
                     "prefill_ratio_vs_first": round(ttft / base[1], 3),
                     "steps": len(m["step_s"]), "prefills": len(m["prefill_s"])})
machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": 2,
           "load_before_after": load}
out.mkdir(parents=True, exist_ok=True)
(out / "results.json").write_text(json.dumps({"command": sys.argv, "machine": machine, "rows": rows}, indent=1))
lines = [f"`{' '.join(sys.argv)}`; load {load[0][0]:.2f} -> {load[1][0]:.2f}, 2 threads, {steps} greedy steps, "
         f"{rounds} rounds", "", "| build | context | in place | decode ms/token p50 | decode vs first | prefill ms p50 "
         "| prefill vs first |", "|---|---:|---|---:|---:|---:|---:|"]
lines += [f"| {r['build']} | {r['context']} | {r['kv_in_place']} | {r['decode_ms_per_token_p50']} | "
          f"{r['decode_speedup_vs_first']}x | {r['prefill_ms_p50']} | {r['prefill_ratio_vs_first']}x |" for r in rows]
(out / "results.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
