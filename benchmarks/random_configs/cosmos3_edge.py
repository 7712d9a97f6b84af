"""One random tiny Cosmos3 Edge per seed: python cosmos3_edge.py SEED OUT_DIR. Other patch and merge sizes, pixel
bounds (so patches per image), learned position grids coarser or finer than the images' (so the antialiased shrink
and the stretch both), vision and text shapes (so interleaved M-RoPE sections), the MLP's activation and biases than
the test fixture's (the draws of paddleocr_vl.py, plus the activation and q/k/v biases). Prints what it drew as JSON.
Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_models as tm
from paddleocr_vl import draw


def main():
    seed, out = int(sys.argv[1]), Path(sys.argv[2])
    drawn = draw(random.Random(seed), lambda r: dict(hidden_act=r.choice(["relu2", "relu2", "silu"]),
                                                     attention_bias=r.choice([False, True])))
    drawn["mlp_bias"] = drawn.pop("bias")
    tm.make_tiny_cosmos3_edge(out, seed=seed, **drawn)
    print(json.dumps({"seed": seed, **drawn}))


if __name__ == "__main__":
    main()
