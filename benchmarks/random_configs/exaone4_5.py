"""One random tiny EXAONE 4.5 or LLaVA-OneVision-1.5 per seed: python exaone4_5.py SEED OUT_DIR. Other patch and merge
sizes, pixel bounds (so patches per image) and tower shapes than the test fixtures' - EXAONE 4.5's windowed tower with
windows of 1-3 merge blocks, any whole-image blocks, K/V heads 1-4 under its query heads; RiceViT's widths and heads -
and LMs of 1-4 layers: EXAONE 4's sliding and full layers in any order (windows shorter and longer than the prompts),
Qwen3's; head sizes 8-32, tied embeddings or not. Prints what it drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm


def main():
    seed, out = int(sys.argv[1]), Path(sys.argv[2])
    r = random.Random(seed)
    family = r.choice(["exaone4_5", "llava_onevision1_5"])
    patch, merge = r.choice([2, 4, 6]), r.choice([1, 2, 2, 3])
    block = patch * merge  # pixels per image token side
    most = r.choice([2, 4, 6, 8])  # image tokens per side of the largest image
    heads = r.choice([2, 4])
    layers = r.choice([1, 2, 3, 4])
    text = dict(hidden_size=r.choice([32, 48, 64]), intermediate_size=r.choice([72, 128, 200]), num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=r.choice([k for k in (1, 2, 4) if heads % k == 0]),
                head_dim=r.choice([8, 16, 32]))
    if family == "exaone4_5":
        text.update(layer_types=[r.choice(["sliding_attention", "full_attention"]) for _ in range(layers)],
                    sliding_window=r.choice([4, 16, 24, 64, 256]))
        vheads = r.choice([2, 4])
        depth = r.choice([1, 2, 3, 4])
        vision = dict(depth=depth, hidden_size=vheads * r.choice([8, 12, 16]), intermediate_size=r.choice([24, 48, 64]),
                      num_heads=vheads, num_key_value_heads=r.choice([k for k in (1, 2, 4) if vheads % k == 0]),
                      window_size=r.choice([1, 2, 3]) * block,
                      fullatt_block_indexes=sorted(r.sample(range(depth), r.randint(0, depth))))
    else:
        vheads = r.choice([1, 2, 4])
        vision = dict(depth=r.choice([1, 2, 3]), hidden_size=4 * vheads * r.choice([2, 4]), num_heads=vheads,
                      intermediate_size=r.choice([24, 48, 64]), hidden_act=r.choice(["gelu", "quick_gelu"]))
    tied = r.random() < 0.3
    desc = dict(seed=seed, family=family, patch=patch, merge=merge, max_pixels=(most * block) ** 2, text=text,
                vision=vision, tied=tied)
    tm.make_tiny_exaone4_5(out, seed=seed, family=family, patch_size=patch, merge=merge, min_pixels=block ** 2,
                           max_pixels=(most * block) ** 2, text_sizes=text, vision_sizes=vision,
                           tie_word_embeddings=tied)
    print(json.dumps(desc))


if __name__ == "__main__":
    main()
