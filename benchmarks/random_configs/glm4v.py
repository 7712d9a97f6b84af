"""One random tiny GLM-4.1V / GLM-4.5V / GLM-4.6V / GLM-OCR per seed: python glm4v.py SEED OUT_DIR. Other patch and merge
sizes, pixel bounds (so patches per image), learned position grids coarser or finer than the images', vision and text
shapes (so M-RoPE sections of the rotated half of each head) and GLM-4-MoE routings than the test fixtures'. Prints
what it drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm


def main():
    seed, out = int(sys.argv[1]), Path(sys.argv[2])
    r = random.Random(seed)
    family = r.choice(["glm4v", "glm4v_moe", "glm46v", "glm_ocr"])
    patch, merge = r.choice([2, 4, 6]), r.choice([1, 2, 2, 3])
    block = patch * merge  # pixels per image token side
    most = r.choice([2, 4, 6, 8])  # image tokens per side of the largest image
    heads = r.choice([2, 4])
    head = r.choice([8, 12, 16, 32])
    text = dict(hidden_size=heads * head, intermediate_size=r.choice([72, 128, 200]),
                num_hidden_layers=r.choice([1, 2, 3]), num_attention_heads=heads,
                num_key_value_heads=r.choice([k for k in (1, 2, 4) if heads % k == 0]))
    if family == "glm4v_moe":
        experts = r.choice([2, 4, 8])
        text.update(n_routed_experts=experts, num_experts_per_tok=r.choice([k for k in (1, 2, 4) if k <= experts]),
                    moe_intermediate_size=r.choice([16, 32, 48]), n_shared_experts=r.choice([1, 2]),
                    first_k_dense_replace=r.choice([0, 1]), head_dim=head)
    vh = r.choice([16, 32, 48])
    vheads = r.choice([h for h in (1, 2, 4) if vh % h == 0 and (vh // h) % 4 == 0])
    vision = dict(depth=r.choice([1, 2, 3]), hidden_size=vh, intermediate_size=r.choice([24, 48, 64]),
                  num_heads=vheads)
    grid = r.choice([2, 3, 6, 8, 16])
    # the processor's longest_edge counts a patch's two frames: twice the largest image's pixels
    desc = dict(seed=seed, family=family, patch=patch, merge=merge, max_pixels=2 * (most * block) ** 2,
                position_grid=grid, text=text, vision=vision)
    tm.make_tiny_glm4v(out, seed=seed, family=family, patch_size=patch, merge=merge, min_pixels=block ** 2,
                       max_pixels=2 * (most * block) ** 2, position_grid=grid, text_sizes=text, vision_sizes=vision)
    print(json.dumps(desc))


if __name__ == "__main__":
    main()
