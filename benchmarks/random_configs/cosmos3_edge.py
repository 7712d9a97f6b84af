"""One random tiny Cosmos3 Edge per seed: python cosmos3_edge.py SEED OUT_DIR. Other patch and merge sizes, pixel
bounds (so patches per image), learned position grids coarser or finer than the images' (so the antialiased shrink
and the stretch both), vision and text shapes (so interleaved M-RoPE sections), the MLP's activation and biases than
the test fixture's. Prints what it drew as JSON. Used by sweep.sh."""
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
    head = r.choice([8, 12, 16, 32])
    text = dict(hidden_size=heads * 16, head_dim=head, intermediate_size=r.choice([72, 128, 200]),
                num_hidden_layers=r.choice([1, 2, 3]), num_attention_heads=heads,
                num_key_value_heads=r.choice([k for k in (1, 2, 4) if heads % k == 0]),
                hidden_act=r.choice(["relu2", "relu2", "silu"]), attention_bias=r.choice([False, True]))
    vh = r.choice([16, 32, 48])
    vheads = r.choice([h for h in (1, 2, 4) if vh % h == 0 and (vh // h) % 4 == 0])
    vision = dict(num_hidden_layers=r.choice([1, 2, 3]), hidden_size=vh, intermediate_size=r.choice([24, 48, 64]),
                  num_attention_heads=vheads)
    grid, bias = r.choice([2, 3, 6, 8, 16]), r.choice([False, True])
    desc = dict(seed=seed, patch=patch, merge=merge, max_pixels=(most * block) ** 2, position_grid=grid,
                mlp_bias=bias, text=text, vision=vision)
    tm.make_tiny_cosmos3_edge(out, seed=seed, patch_size=patch, merge=merge, min_pixels=block ** 2,
                              max_pixels=(most * block) ** 2, position_grid=grid, mlp_bias=bias, text_sizes=text,
                              vision_sizes=vision)
    print(json.dumps(desc))


if __name__ == "__main__":
    main()
