"""One random tiny Qwen2-VL or Qwen2.5-VL per seed: python qwen2_vl.py SEED OUT_DIR. Other patch and merge sizes,
pixel bounds (so patches per image), window sizes and full-attention blocks (Qwen2.5-VL), head sizes (so M-RoPE
sections) and Qwen2 shapes than the test fixtures'. Prints what it drew as JSON. Used by sweep.sh; qwen3_vl.py draws
Qwen3-VL's the same way."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm


def main(families):
    seed, out = int(sys.argv[1]), Path(sys.argv[2])
    r = random.Random(seed)
    family = r.choice(families)
    patch, merge = r.choice([2, 4, 6]), r.choice([1, 2, 2, 3])
    block = patch * merge  # pixels per image token side
    most = r.choice([2, 4, 6, 8])  # image tokens per side of the largest image
    heads = r.choice([2, 4])
    head = r.choice([8, 12, 16])
    text = dict(hidden_size=heads * head, intermediate_size=r.choice([72, 128, 200]),
                num_hidden_layers=r.choice([1, 2, 3]), num_attention_heads=heads,
                num_key_value_heads=r.choice([k for k in (1, 2, 4) if heads % k == 0]))
    if family.startswith("qwen3_5"):  # a hybrid LM: gated delta-nets and gated attention in any order, one attention at least
        layers = r.choice([1, 2, 3, 4])
        kinds = [r.choice(["linear_attention"] * 3 + ["full_attention"]) for _ in range(layers)]  # 3:1, as Qwen3.5's
        kinds[r.randrange(layers)] = "full_attention"
        key_heads = r.choice([1, 2, 4])
        text.update(layer_types=kinds, num_hidden_layers=layers, head_dim=r.choice([16, 24, 32]),
                    linear_num_key_heads=key_heads, linear_num_value_heads=key_heads * r.choice([1, 2, 3]),
                    linear_key_head_dim=r.choice([4, 8, 16]), linear_value_head_dim=r.choice([4, 8, 12, 16]),
                    linear_conv_kernel_dim=r.choice([2, 3, 4, 5]))
    if family in ("qwen3_vl_moe", "qwen3_5_moe"):
        experts = r.choice([2, 4, 8])
        text.update(num_experts=experts, num_experts_per_tok=r.choice([k for k in (1, 2, 4) if k <= experts]),
                    moe_intermediate_size=r.choice([16, 32, 48]))
        if family == "qwen3_5_moe":  # and a gated shared expert
            text["shared_expert_intermediate_size"] = r.choice([16, 32, 64])
    vh = r.choice([16, 32, 48])
    vheads = r.choice([h for h in (1, 2, 4) if vh % h == 0 and (vh // h) % 4 == 0])
    if family == "qwen2_vl":
        vision = dict(depth=r.choice([1, 2, 3]), embed_dim=vh, mlp_ratio=r.choice([1, 2, 4]), num_heads=vheads)
    elif family == "qwen2_5_vl":
        depth = r.choice([1, 2, 3, 4])
        vision = dict(depth=depth, hidden_size=vh, intermediate_size=r.choice([24, 48, 64]), num_heads=vheads,
                      window_size=r.choice([1, 2, 3]) * block,
                      fullatt_block_indexes=sorted(r.sample(range(depth), r.choice([0, 1]))))
    else:  # Qwen3-VL: a learned position grid coarser or finer than the images', deepstack blocks in any order
        depth = r.choice([1, 2, 3, 4])
        deepstack = r.sample(range(depth), r.choice([k for k in (0, 1, 2, 3) if k <= depth]))
        vision = dict(depth=depth, hidden_size=vh, intermediate_size=r.choice([24, 48, 64]), num_heads=vheads,
                      num_position_embeddings=r.choice([2, 3, 6, 8, 16]) ** 2)
        if not family.startswith("qwen3_5"):  # Qwen3.5's tower has no deepstack
            vision["deepstack_visual_indexes"] = deepstack
    desc = dict(seed=seed, family=family, patch=patch, merge=merge, max_pixels=(most * block) ** 2, text=text,
                vision=vision)
    tm.make_tiny_qwen2_vl(out, seed=seed, family=family, patch_size=patch, merge=merge, min_pixels=block ** 2,
                          max_pixels=(most * block) ** 2, text_sizes=text, vision_sizes=vision)
    print(json.dumps(desc))


if __name__ == "__main__":
    main(["qwen2_vl", "qwen2_5_vl"])
