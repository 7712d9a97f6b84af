"""One random tiny Qwen3-VL or Qwen3-VL-MoE per seed: python qwen3_vl.py SEED OUT_DIR. qwen2_vl.py's draws (patch and
merge sizes, pixel bounds, head sizes so interleaved M-RoPE sections, Qwen3 shapes), with experts, learned position
grids coarser and finer than the images' grids, and deepstack blocks (none to three, in any order in the config, more
levels than LM layers too). Prints what it drew as JSON. Used by sweep.sh."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen2_vl import main

main(["qwen3_vl", "qwen3_vl_moe"])
