"""One random tiny Gemma 4 per seed: python gemma4.py SEED OUT_DIR. Other patch and cell sizes and most cells per
image, tower sizes (standardized soft tokens or not), and text layouts than the test fixture's: sliding and full
layers in any order, full layers' K/V as wide as the sliding ones' or wider, with fewer heads or not, values from the
keys' projection or their own, 0 to several layers sharing earlier layers' K/V, per-layer input embeddings or none,
images attending both ways on the sliding layers or causally, windows shorter than a prompt, a final soft cap or none,
a double-wide MLP, mixture-of-experts blocks. Prints what it drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm


def main():
    seed, out = int(sys.argv[1]), Path(sys.argv[2])
    r = random.Random(seed)
    patch, cell = r.choice([2, 4, 6]), r.choice([2, 2, 3, 4])  # 1: refused (Hugging Face keeps the padding)
    layers = r.choice([2, 3, 4, 5, 7])
    kinds = [r.choice(["sliding_attention", "full_attention"]) for _ in range(layers - 1)] + ["full_attention"]
    # shared layers read the last earlier layer of their kind: every kind among them must have one before them
    shared = [n for n in range(0, layers - 1) if set(kinds[:layers - n]) == set(kinds)]
    heads = r.choice([2, 4])
    k_eq_v = r.random() < 0.5
    text = dict(hidden_size=r.choice([32, 48, 64]), intermediate_size=r.choice([72, 128]), num_hidden_layers=layers,
                layer_types=kinds, num_attention_heads=heads,
                num_key_value_heads=r.choice([k for k in (1, 2, 4) if heads % k == 0]),
                head_dim=r.choice([8, 16, 32]), global_head_dim=r.choice([16, 32, 64]), attention_k_eq_v=k_eq_v,
                num_global_key_value_heads=r.choice([None, 1, 2]) if k_eq_v else None,
                num_kv_shared_layers=r.choice(shared), sliding_window=r.choice([4, 8, 16, 64]),
                hidden_size_per_layer_input=r.choice([0, 8, 16]),
                use_bidirectional_attention=r.choice([None, "vision"]),
                final_logit_softcapping=r.choice([None, 30.0, 0.5]), use_double_wide_mlp=r.random() < 0.2)
    if text["num_global_key_value_heads"] and heads % text["num_global_key_value_heads"]:
        text["num_global_key_value_heads"] = 1
    if r.random() < 0.3:
        text.update(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
    vh = r.choice([16, 32, 48])
    vheads = r.choice([h for h in (1, 2, 4) if vh % h == 0 and (vh // h) % 4 == 0])
    vision = dict(hidden_size=vh, intermediate_size=r.choice([24, 48, 64]), num_hidden_layers=r.choice([1, 2, 3]),
                  num_attention_heads=vheads, num_key_value_heads=vheads, head_dim=vh // vheads,
                  position_embedding_size=256, standardize=r.random() < 0.3,
                  use_clipped_linears=r.random() < 0.5)
    cells = r.choice([70, 140])
    desc = dict(seed=seed, patch=patch, cell=cell, max_soft_tokens=cells, text=text, vision=vision)
    tm.make_tiny_gemma4(out, seed=seed, patch_size=patch, cell=cell, max_soft_tokens=cells, text_sizes=text,
                        vision_sizes=vision)
    print(json.dumps(desc))


if __name__ == "__main__":
    main()
