"""ONNX Runtime's profile of a decode loop, ours or onnxruntime-genai's, per op type: kernel ms per
decode step, nodes per step, us per node (the profiler inflates every node's time: compare shares).

    .venv/bin/python benchmarks/profile_peer.py ours BUILD
    .venv/bin/python benchmarks/profile_peer.py genai GENAI_FOLDER BUILD   # BUILD: for the prompt's tokens

genai is profiled through its own config (session_options.enable_profiling, in a copy of the folder)."""
import glob, json, os, shutil, sys, tempfile
from collections import defaultdict
from pathlib import Path
import numpy as np
import onnxruntime as ort
from vlm_export.adapters.reference import open_pipeline
from vlm_export.bench.peer import GenaiDecoder, OurDecoder

kind, folder = sys.argv[1], Path(sys.argv[2])
build = Path(sys.argv[3]) if kind == "genai" else folder
tmp = Path(tempfile.mkdtemp(prefix="profile_peer_"))
prefix, tokens = str(tmp / "profile"), 64
if kind == "ours":
    sessions, real_init = [], ort.InferenceSession.__init__

    def profiled(self, path, opts=None, *args, **kwargs):  # the decoder's session only
        if "lm_decoder" in str(path):
            opts.enable_profiling, opts.profile_file_prefix = True, prefix
            sessions.append(self)
        real_init(self, path, opts, *args, **kwargs)

    ort.InferenceSession.__init__ = profiled
    pipe = open_pipeline(build, threads=2, check_hashes=False)
    decoder = OurDecoder(pipe, "")
else:
    pipe = open_pipeline(build, threads=2, check_hashes=False)
    copy = tmp / "model"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["enable_profiling"] = prefix
    (copy / "genai_config.json").write_text(json.dumps(config))
    decoder = GenaiDecoder(copy, 2, "")
ids = pipe.prompt_ids("What animal is in the picture?", 0)
for _ in range(3):
    decoder.generate(ids, tokens)
if kind == "ours":
    path = sessions[0].end_profiling()
else:
    del decoder  # genai writes its profile when the session closes
    import gc
    gc.collect()
    path = sorted(glob.glob(prefix + "*.json"))[-1]
events = json.load(open(path))
runs = [e for e in events if e.get("name") == "model_run"]
median = np.median([e["dur"] for e in runs])
steps = [e for e in runs if e["dur"] < 3 * median][tokens:]  # decode steps, the first generation dropped
starts, ends = np.array([e["ts"] for e in steps]), np.array([e["ts"] + e["dur"] for e in steps])
time, count = defaultdict(float), defaultdict(int)
for e in events:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
        i = np.searchsorted(starts, e["ts"], side="right") - 1
        if i >= 0 and e["ts"] <= ends[i]:
            time[e["args"]["op_name"]] += e["dur"]
            count[e["args"]["op_name"]] += 1
n = len(steps)
print(f"{kind} {folder}: {n} decode steps, model_run p50 {np.median([e['dur'] for e in steps]) / 1e3:.3f} ms, "
      f"kernels {sum(time.values()) / n / 1e3:.3f} ms/step, load {os.getloadavg()[0]:.2f}")
for op, t in sorted(time.items(), key=lambda x: -x[1]):
    print(f"  {op:34s} {t / n / 1e3:7.3f} ms/step {count[op] / n:6.1f} nodes/step {t / count[op]:7.1f} us/node")
shutil.rmtree(tmp, ignore_errors=True)
