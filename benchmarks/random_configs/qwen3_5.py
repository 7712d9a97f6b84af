"""One random tiny Qwen3.5 or Qwen3.5-MoE per seed: python qwen3_5.py SEED OUT_DIR. qwen2_vl.py's draws for the
image path (patch and merge sizes, pixel bounds, learned position grids coarser and finer than the images' grids, no
deepstack) over a hybrid LM of 1-4 layers, gated delta-nets and gated attention in any order (one attention layer at
least, 3 delta-nets to 1 attention on average), 1-4 key heads each serving 1-3 value heads, key and value sizes
apart, convolutions of 2-5 taps; Qwen3.5-MoE's 2-8 experts and a gated shared expert. Prints what it drew as JSON.
Used by sweep.sh."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen2_vl import main

main(["qwen3_5", "qwen3_5_moe"])
