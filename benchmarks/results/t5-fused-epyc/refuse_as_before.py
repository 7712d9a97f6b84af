"""Copy BUILD to BUILD-old with its fused decoder remade with the attention pass off (T5's attention as before: unfused)."""
import shutil, sys, json
from pathlib import Path
import vlm_export.export.fuse as F
build = Path(sys.argv[1]); old = build.with_name(build.name + "-old")
shutil.rmtree(old, ignore_errors=True); shutil.copytree(build, old)
m = json.loads((build / "manifest.json").read_text())
windows = None
from vlm_export.contract.geometry import DecoderGeometry
windows = DecoderGeometry.from_dict(m["scheme"]["geometry"]).layer_windows()
F.fuse_attention = lambda *a, **k: None
for f in (old / "graphs").glob("lm_decoder.fused.onnx*"): f.unlink()
r = F.fuse_decoder(build / "graphs/lm_decoder.onnx", old / "graphs/lm_decoder.fused.onnx", max_positions=512, layer_windows=windows)
print(r.fusions, r.notes)
