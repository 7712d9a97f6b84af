"""Only the peer section of `vlm-export bench` (faster than the whole bench): the build's decoder vs an
onnxruntime-genai model folder of the same LM and, with a 4th argument `gguf`, llama.cpp on the demo's
SmolLM2 GGUF; text only, 64 greedy tokens, 2 threads. Writes peer_LABEL.json here.

    .venv/bin/python benchmarks/peer_only.py LABEL BUILD GENAI_FOLDER [gguf]

The whole bench does the same with `vlm-export bench BUILD --peer DIR|build --peer-gguf FILE`."""
import json, os, sys, time
from pathlib import Path
from vlm_export.adapters.reference import open_pipeline
from vlm_export.bench import BenchOptions
from vlm_export.bench.peer import bench_peers
from vlm_export.bench.report import peer_section
from vlm_export.bench.run import PROMPTS
from vlm_export.demo.smollm2 import GGUF_NAME, gguf_dir
from vlm_export.manifest import read_manifest
from vlm_export.progress import Progress

label, build, peer = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
gguf = str(gguf_dir() / GGUF_NAME) if len(sys.argv) > 4 and sys.argv[4] == "gguf" else None
options = BenchOptions(backends=("onnxruntime",), new_tokens=64, requests=6, threads=2, peer=peer, peer_gguf=gguf)
print(label, "load before", os.getloadavg(), flush=True)
# hashes not checked: a build folder whose decoder graph was swapped by hand (a fused variant) can be timed
pipe = open_pipeline(build, threads=2, check_hashes=False)
t = time.time()
result = bench_peers(build, read_manifest(build), pipe, options, 2, Progress(), PROMPTS)
print("took %.0f s, load after" % (time.time() - t), os.getloadavg())
print("\n".join(peer_section(result)))
Path(f"peer_{label}.json").write_text(json.dumps({"label": label, "load": os.getloadavg(), **result}, indent=2, default=str))
