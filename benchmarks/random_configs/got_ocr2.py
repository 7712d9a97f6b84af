"""One random tiny GOT-OCR 2.0 per seed: python got_ocr2.py SEED OUT_DIR. Other patch sizes (pages of 64 patches a side,
the 256 rows per page GotOcr2Processor writes), tower widths, heads, depths, attention windows that divide the grid
and that do not (padded windows), global layers anywhere or none, relative positions on or off, neck widths, and Qwen2
shapes than the test fixture's; tied embeddings or not. Prints what it drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm


def main():
    seed, out = int(sys.argv[1]), Path(sys.argv[2])
    r = random.Random(seed)
    patch = r.choice([2, 2, 3])
    depth = r.choice([1, 2, 3])
    heads = r.choice([1, 2, 4])
    vision = dict(hidden_size=heads * r.choice([8, 16]), num_hidden_layers=depth, num_attention_heads=heads,
                  window_size=r.choice([4, 7, 8, 14]), output_channels=r.choice([8, 16, 24]),
                  global_attn_indexes=sorted(r.sample(range(depth), r.randint(0, depth))), mlp_dim=r.choice([32, 64]),
                  use_rel_pos=r.random() < 0.8, hidden_act=r.choice(["gelu", "gelu_pytorch_tanh"]))
    text_heads = r.choice([2, 4])
    text = dict(hidden_size=r.choice([48, 64, 96]), intermediate_size=r.choice([72, 128, 200]),
                num_hidden_layers=r.choice([1, 2, 3]), num_attention_heads=text_heads,
                num_key_value_heads=r.choice([k for k in (1, 2, 4) if text_heads % k == 0]),
                tie_word_embeddings=r.random() < 0.3)
    desc = dict(seed=seed, patch=patch, image=64 * patch, vision=vision, text=text)
    tm.make_tiny_got_ocr2(out, seed=seed, image_size=64 * patch, patch_size=patch, text_sizes=text, vision_sizes=vision)
    print(json.dumps(desc))


if __name__ == "__main__":
    main()
