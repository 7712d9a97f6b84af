"""One random tiny PaddleOCR-VL per seed: python paddleocr_vl.py SEED OUT_DIR. Other patch and merge sizes, pixel
bounds (so patches per image), learned position grids coarser or finer than the images', vision and text shapes (so
M-RoPE sections), biases on or off than the test fixture's. Prints what it drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm


def draw(r: random.Random, text_extras=lambda r: {}) -> dict:
    """The shapes of a SigLIP-style tower on rows of patches with a learned position grid and an M-RoPE LM (this
    generator's and cosmos3_edge.py's): patch and merge sizes, the largest image, the grid, one bias switch, the text
    and vision sizes (``text_extras(r)``: more text settings, drawn after the sizes)."""
    patch, merge = r.choice([2, 4, 6]), r.choice([1, 2, 2, 3])
    most = r.choice([2, 4, 6, 8])  # image tokens per side of the largest image
    heads = r.choice([2, 4])
    head = r.choice([8, 12, 16, 32])
    text = dict(hidden_size=heads * 16, head_dim=head, intermediate_size=r.choice([72, 128, 200]),
                num_hidden_layers=r.choice([1, 2, 3]), num_attention_heads=heads,
                num_key_value_heads=r.choice([k for k in (1, 2, 4) if heads % k == 0]), **text_extras(r))
    vh = r.choice([16, 32, 48])
    vheads = r.choice([h for h in (1, 2, 4) if vh % h == 0 and (vh // h) % 4 == 0])
    vision = dict(num_hidden_layers=r.choice([1, 2, 3]), hidden_size=vh, intermediate_size=r.choice([24, 48, 64]),
                  num_attention_heads=vheads)
    grid, bias = r.choice([2, 3, 6, 8, 16]), r.choice([False, True])
    block = patch * merge  # pixels per image token side
    return dict(patch_size=patch, merge=merge, min_pixels=block ** 2, max_pixels=(most * block) ** 2,
                position_grid=grid, bias=bias, text_sizes=text, vision_sizes=vision)


def main():
    seed, out = int(sys.argv[1]), Path(sys.argv[2])
    drawn = draw(random.Random(seed))
    drawn["use_bias"] = drawn.pop("bias")
    tm.make_tiny_paddleocr_vl(out, seed=seed, **drawn)
    print(json.dumps({"seed": seed, **drawn}))


if __name__ == "__main__":
    main()
