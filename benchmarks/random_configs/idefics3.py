"""One random tiny Idefics3 or SmolVLM per seed: python idefics3.py SEED OUT_DIR. Other tile sizes, patch sizes,
pixel shuffles, longest edges (multiples of the tile and not), splitting on or off, text shapes than the test
fixtures'. Prints what it drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm

seed, out = int(sys.argv[1]), Path(sys.argv[2])
r = random.Random(seed)
family = r.choice(["idefics3", "smolvlm"])
patch = r.choice([4, 6, 8, 14])
scale = r.choice([1, 2, 3])
side = scale * r.choice([1, 2, 3])  # patches per tile side: the pixel shuffle takes scale x scale of them
tile = patch * side
edge = r.choice([tile, 2 * tile, 3 * tile, 2 * tile + r.choice([1, 5, tile // 2])])  # not always a multiple
vh = r.choice([16, 32, 48])
vision = dict(hidden_size=vh, intermediate_size=2 * vh, num_hidden_layers=r.choice([1, 2, 3]),
              num_attention_heads=r.choice([h for h in (1, 2, 4) if vh % h == 0]))
heads = r.choice([2, 4, 8])
text = dict(hidden_size=r.choice([48, 64, 96]), intermediate_size=r.choice([72, 128, 200]),
            num_hidden_layers=r.choice([1, 2, 3, 4]), num_attention_heads=heads,
            num_key_value_heads=r.choice([k for k in (1, 2, 4, 8) if heads % k == 0]), head_dim=r.choice([8, 16, 32]),
            tie_word_embeddings=r.random() < 0.5, rope_theta=r.choice([10000.0, 1e5, 2.7e5]))
splitting = r.random() < 0.8
desc = dict(seed=seed, family=family, tile=tile, patch=patch, scale=scale, longest_edge=edge, splitting=splitting,
            tokens_per_tile=side ** 2 // scale ** 2, vision=vision, text=text)
tm.make_tiny_idefics3(out, seed=seed, family=family, image_size=tile, patch_size=patch, scale_factor=scale,
                      longest_edge=edge, splitting=splitting, text_sizes=text, vision_sizes=vision)
if r.random() < 0.3:  # saved in bfloat16, as SmolVLM checkpoints are (the build loads fp32)
    import torch
    from transformers import AutoModelForImageTextToText
    AutoModelForImageTextToText.from_pretrained(out).to(torch.bfloat16).save_pretrained(out)
    desc["dtype"] = "bfloat16"
print(json.dumps(desc))
