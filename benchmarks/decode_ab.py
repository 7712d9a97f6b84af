"""Decode ms/token of several build folders of the same LM (variants of the decoder graph swapped into
copies of one build), their ONNX Runtime decoders run in place as generation runs them, text only, 64
greedy tokens per generation, alternating generation by generation in mirrored order in one process;
then each one's ONNX Runtime profile (kernel time per op type over one generation's decode steps).

    .venv/bin/python benchmarks/decode_ab.py ROUNDS BUILD [BUILD ...]

The first BUILD is the base of the ratios. Hashes are not checked (a swapped graph is the point)."""
import collections, json, os, sys, tempfile, time
from pathlib import Path
import numpy as np, onnxruntime as ort
from vlm_export.adapters.reference import open_pipeline
from vlm_export.manifest import read_manifest
from vlm_export.runtime.load import form_entry

builds = [Path(b) for b in sys.argv[2:]]; rounds = int(sys.argv[1])
pipes = {b.name: open_pipeline(b, threads=2, check_hashes=False) for b in builds}
ids = next(iter(pipes.values())).prompt_ids("What animal is in the picture?", 0)
def gen(pipe, n=64):
    logits, pre = pipe.prefill(list(ids), pipe.scheme.empty_image_input())
    st = pipe.running(pre, [len(ids) + n]); tok = int(np.argmax(logits)); times = []
    for _ in range(n - 1):
        t = time.perf_counter(); logits, st = pipe.step(st, np.asarray([tok])); tok = int(np.argmax(logits[0])); times.append(time.perf_counter() - t)
    return times
print("load", os.getloadavg(), flush=True)
steps = {k: [] for k in pipes}
for name in pipes: gen(pipes[name], 8)
for r in range(rounds):
    for name in (list(pipes) if r % 2 == 0 else list(pipes)[::-1]):
        steps[name] += gen(pipes[name])
base = np.median(steps[builds[0].name])
for name, s in steps.items():
    print(f"{name:8s} decode p50 {np.median(s)*1e3:7.2f} ms/token  ({len(s)} steps)  vs {builds[0].name}: {base/np.median(s):.3f}x tokens/s", flush=True)
print("load", os.getloadavg(), flush=True)
for b in builds:
    pipe = pipes[b.name]; dec = pipe.decoder
    path = b / form_entry(read_manifest(b), pipe.scheme.decoder_stage, "onnxruntime")["file"]
    o = ort.SessionOptions(); o.intra_op_num_threads = 2; o.inter_op_num_threads = 1
    o.add_session_config_entry("session.intra_op.allow_spinning", "1"); o.enable_profiling = True
    o.profile_file_prefix = os.path.join(tempfile.gettempdir(), f"decode_ab_{b.name}")
    dec.session = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    gen(pipe)
    prof = dec.session.end_profiling(); ev = json.load(open(prof)); os.remove(prof)
    runs = [e for e in ev if e.get("cat") == "Session" and e["name"] == "model_run"]
    kern = [e for e in ev if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= runs[1]["ts"]]
    n = len(runs) - 1
    by = collections.defaultdict(float)
    for e in kern: by[e["args"]["op_name"]] += e["dur"]
    tot = sum(by.values())
    print(f"{b.name}: model_run {sum(r['dur'] for r in runs[1:])/n/1e3:.2f} ms/step, kernels {tot/n/1e3:.2f} ms/step: " +
          ", ".join(f"{op} {d/n/1e3:.2f} ({100*d/tot:.0f}%)" for op, d in sorted(by.items(), key=lambda x: -x[1])[:8]), flush=True)
