"""One random tiny MiniCPM-V 4.6, MiniCPM-V 4.7 (canvas positions) or MiniCPM-OCR per seed: python minicpm_v.py SEED
OUT_DIR. Other patch sizes, overview areas (scale_resolution) and slice counts (0-9, slicing off), position tables coarser and finer than the
slices' grids, towers of 1-4 layers with the window merger after any of them (MiniCPM-V's "16x") or none
(MiniCPM-OCR's "4x"), with and without image ids and tied embeddings, over qwen3_5.py's hybrid LM draws (gated
delta-nets and gated attention in any order, one attention layer at least). Prints what it drew as JSON. Used by
sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm


def main():
    seed, out = int(sys.argv[1]), Path(sys.argv[2])
    r = random.Random(seed)
    family = r.choice(["minicpmv4_6", "minicpm_ocr", "minicpmv4_7"])
    patch = r.choice([2, 4, 6])
    merge = 2 if family == "minicpm_ocr" else 4  # patches per image token side
    side = patch * merge * r.choice([2, 3, 4, 5])  # about this many pixels square per slice
    layers = r.choice([1, 2, 3, 4])
    kinds = [r.choice(["linear_attention"] * 3 + ["full_attention"]) for _ in range(layers)]
    kinds[r.randrange(layers)] = "full_attention"
    heads, key_heads = r.choice([2, 4]), r.choice([1, 2, 4])
    text = dict(hidden_size=heads * r.choice([8, 12, 16]), intermediate_size=r.choice([72, 128, 200]),
                num_attention_heads=heads, num_key_value_heads=r.choice([k for k in (1, 2, 4) if heads % k == 0]),
                layer_types=kinds, head_dim=r.choice([16, 24, 32]), linear_num_key_heads=key_heads,
                linear_num_value_heads=key_heads * r.choice([1, 2, 3]), linear_key_head_dim=r.choice([4, 8, 16]),
                linear_value_head_dim=r.choice([4, 8, 12, 16]), linear_conv_kernel_dim=r.choice([2, 3, 4, 5]))
    vh = r.choice([16, 32, 48])
    depth = r.choice([1, 2, 3, 4])
    vision = dict(hidden_size=vh, intermediate_size=r.choice([24, 48, 64]), num_hidden_layers=depth,
                  num_attention_heads=r.choice([h for h in (1, 2, 4) if vh % h == 0 and (vh // h) % 4 == 0]),
                  image_size=patch * r.choice([2, 3, 8, 16]))  # the position table's side, in patches
    settings = dict(patch_size=patch, scale_resolution=side, max_slice_nums=r.choice([0, 1, 2, 4, 6, 9]),
                    slice_mode=r.random() < 0.8, use_image_id=r.random() < 0.7, insert_layer_id=r.randrange(depth),
                    tie_word_embeddings=r.random() < 0.5)
    desc = dict(seed=seed, family=family, **settings, text=text, vision=vision)
    tm.make_tiny_minicpm_v(out, seed=seed, family=family, text_sizes=text, vision_sizes=vision, **settings)
    print(json.dumps(desc))


if __name__ == "__main__":
    main()
