"""One random tiny HunYuanVL (HunyuanOCR's form) per seed: python hunyuan_vl.py SEED OUT_DIR. Other patch and merge
sizes, pixel bounds (so patches per image, tall and wide grids), learned position grids coarser or finer than the
images', 3 or 4 position streams (so rotary sections), the NTK-alpha rotary or the plain one, tied embeddings or not,
vision and text shapes than the test fixture's. Prints what it drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm
from paddleocr_vl import draw


def main():
    seed, out = int(sys.argv[1]), Path(sys.argv[2])
    r = random.Random(seed)
    drawn = draw(r)
    drawn.pop("bias")
    # Hugging Face's merger refuses a grid of one patch per side, which a merge of one would allow
    drawn["merge"] = r.choice([2, 2, 3])
    block = drawn["patch_size"] * drawn["merge"]
    drawn.update(min_pixels=block ** 2, max_pixels=(r.choice([2, 4, 6, 8]) * block) ** 2)  # blocks per side, largest
    drawn["streams"] = r.choice([3, 4])
    drawn["text_sizes"]["head_dim"] = max(drawn["text_sizes"]["head_dim"], 2 * drawn["streams"])
    drawn["alpha"] = r.choice([0.0, 1000.0])
    drawn["tie_word_embeddings"] = r.choice([True, False])
    tm.make_tiny_hunyuan_vl(out, seed=seed, **drawn)
    print(json.dumps({"seed": seed, **drawn}))


if __name__ == "__main__":
    main()
