"""Only the peer section of `vlm-export bench` (faster than the whole bench): the build's decoder vs an
onnxruntime-genai model folder of the same LM and, with `gguf`, llama.cpp on the demo's SmolLM2 GGUF;
text only, 64 greedy tokens, 2 threads. Writes peer_LABEL.json here.

    .venv/bin/python benchmarks/peer_only.py LABEL BUILD GENAI_FOLDER|build [gguf] [NAME=BUILD ...] [--peer-precision fp32]

Each NAME=BUILD adds another build folder of the same LM (a variant of the decoder graph: fused,
weight-only ...) as one more row, timed in the same alternation as the others, its greedy answers
compared with BUILD's; its precision column reads NAME. The whole bench does the first form with
`vlm-export bench BUILD --peer DIR|build --peer-gguf FILE`."""
import json, os, sys, time
from pathlib import Path
from vlm_export.adapters.reference import open_pipeline
from vlm_export.bench import BenchOptions
from vlm_export.bench.peer import OURS, OurDecoder, bench_peers
from vlm_export.bench.report import peer_section
from vlm_export.bench.run import PROMPTS
from vlm_export.demo.smollm2 import GGUF_NAME, gguf_dir
from vlm_export.manifest import read_manifest
from vlm_export.progress import Progress

precision = "int4"  # the peer built with `build`: its builder's int4, or fp32 against an fp32 build
if "--peer-precision" in sys.argv:
    at = sys.argv.index("--peer-precision")
    precision = sys.argv[at + 1]
    del sys.argv[at:at + 2]
label, build, peer = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
gguf = str(gguf_dir() / GGUF_NAME) if "gguf" in sys.argv[4:] else None
variants = [a.split("=", 1) for a in sys.argv[4:] if "=" in a]
options = BenchOptions(backends=("onnxruntime",), new_tokens=64, requests=6, threads=2, peer=peer, peer_gguf=gguf,
                       peer_precision=precision)
print(label, "load before", os.getloadavg(), flush=True)
# hashes not checked: a build folder whose decoder graph was swapped by hand (a fused variant) can be timed
pipe = open_pipeline(build, threads=2, check_hashes=False)
t = time.time()
if not variants:
    result = bench_peers(build, read_manifest(build), pipe, options, 2, Progress(), PROMPTS)
else:
    import vlm_export.bench.peer as peer_module

    extra = {f"{OURS} {name}": OurDecoder(open_pipeline(Path(b), threads=2, check_hashes=False), name)
             for name, b in variants}
    real_compare = peer_module.compare

    def with_variants(decoders, *args, **kwargs):  # ours first, then the variants, then the peers
        ours = next(iter(decoders.items()))
        return real_compare({ours[0]: ours[1], **extra, **dict(list(decoders.items())[1:])}, *args, **kwargs)

    peer_module.compare = with_variants
    try:
        result = bench_peers(build, read_manifest(build), pipe, options, 2, Progress(), PROMPTS)
    finally:
        peer_module.compare = real_compare
print("took %.0f s, load after" % (time.time() - t), os.getloadavg())
print("\n".join(peer_section(result)))
Path(f"peer_{label}.json").write_text(json.dumps({"label": label, "load": os.getloadavg(), **result}, indent=2, default=str))
