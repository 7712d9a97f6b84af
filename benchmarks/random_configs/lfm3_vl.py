"""One random tiny LFM3-VL per seed: python lfm3_vl.py SEED OUT_DIR. Other patch and merge sizes, pixel bounds (so
patches per image), tower layouts (grid convolutions of 1, 3 or 5 taps a side and grouped-query attention in any
order) and LM layouts (short convolutions of 2-5 taps, sliding-window and full attention in any order, one attention
layer at least, windows shorter and longer than the prompts), with and without sandwich norms, attention gates, conv
biases and tied embeddings, than the test fixture's. Prints what it drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm


def main():
    seed, out = int(sys.argv[1]), Path(sys.argv[2])
    r = random.Random(seed)
    patch, merge = r.choice([2, 4, 6]), r.choice([1, 2, 2, 3])
    block = patch * merge  # pixels per image token side
    most = r.choice([2, 4, 6, 8])  # image tokens per side of the largest image
    heads = r.choice([2, 4])
    layers = r.choice([1, 2, 3, 4, 5])
    kinds = [r.choice(["conv", "conv", "sliding_attention", "full_attention"]) for _ in range(layers)]
    kinds[r.randrange(layers)] = r.choice(["sliding_attention", "full_attention"])
    text = dict(hidden_size=r.choice([32, 48, 64]), intermediate_size=r.choice([72, 128, 200]), layer_types=kinds,
                num_attention_heads=heads, num_key_value_heads=r.choice([k for k in (1, 2, 4) if heads % k == 0]),
                head_dim=r.choice([8, 16, 32]), conv_L_cache=r.choice([2, 3, 4, 5]),
                sliding_window=r.choice([4, 16, 24, 64, 256]), use_sandwich_norm=r.random() < 0.5,
                use_attention_gate=r.random() < 0.5, conv_bias=r.random() < 0.3)
    vh = r.choice([16, 32, 48])
    vheads = r.choice([h for h in (1, 2, 4) if vh % h == 0 and (vh // h) % 4 == 0])
    depth = r.choice([1, 2, 3, 4])
    vision = dict(hidden_size=vh, intermediate_size=r.choice([24, 48, 64]), num_hidden_layers=depth,
                  num_attention_heads=vheads, num_key_value_heads=r.choice([k for k in (1, 2, 4) if vheads % k == 0]),
                  conv_kernel_size=r.choice([1, 3, 3, 5]),
                  layer_types=[r.choice(["conv", "full_attention"]) for _ in range(depth)])
    tied = r.random() < 0.5
    desc = dict(seed=seed, patch=patch, merge=merge, max_pixels=(most * block) ** 2, text=text, vision=vision,
                tied=tied)
    tm.make_tiny_lfm3_vl(out, seed=seed, patch_size=patch, merge=merge, min_pixels=block ** 2,
                         max_pixels=(most * block) ** 2, text_sizes=text, vision_sizes=vision, tie_word_embeddings=tied)
    print(json.dumps(desc))


if __name__ == "__main__":
    main()
