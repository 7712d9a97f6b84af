"""One random tiny Gemma 3 VLM (Gemma3ForConditionalGeneration) per seed: python gemma3.py SEED OUT_DIR.
Other tower sizes, pooled grids, text shapes, layer layouts (sliding / global), windows shorter than a prompt,
soft caps and query scalars than the test fixture's; some pan and scan (crop settings that crop the sample photos,
or not). Prints what it drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm

seed, out = int(sys.argv[1]), Path(sys.argv[2])
r = random.Random(seed)
patch = r.choice([4, 6, 8, 14])
side = r.choice([2, 3, 4, 6])  # patches per side
tokens_side = r.choice([d for d in range(1, side + 1) if side % d == 0])  # the pooled grid's side
vh = r.choice([16, 32, 48])
vision = dict(hidden_size=vh, intermediate_size=2 * vh, num_hidden_layers=r.choice([1, 2, 3]),
              num_attention_heads=r.choice([h for h in (1, 2, 4) if vh % h == 0]))
layers = r.choice([1, 2, 3, 4, 6])
heads = r.choice([2, 4, 8])
kv = r.choice([k for k in (1, 2, 4, 8) if heads % k == 0])
text = dict(hidden_size=r.choice([48, 64, 96]), intermediate_size=r.choice([72, 128, 200]), num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=r.choice([8, 16, 32]),
            sliding_window=r.choice([4, 8, 16, 64]),
            layer_types=[r.choice(["sliding_attention", "full_attention"]) for _ in range(layers)],
            query_pre_attn_scalar=r.choice([8, 16, 64, 256]),
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": r.choice([10000.0, 1e6])},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
if r.random() < 0.3:
    text["attn_logit_softcapping"] = r.choice([20.0, 50.0])
# the build's sample photos are 1.5 times as wide as high (crops of 226 x 300 and 300 x 400): most of these crop them
pan_and_scan = None if r.random() < 0.6 else dict(
    pan_and_scan_min_crop_size=r.choice([8, 32, 128, 256]), pan_and_scan_max_num_crops=r.choice([1, 2, 3, 4]),
    pan_and_scan_min_ratio_to_activate=r.choice([1.2, 1.4, 2.0]))
desc = dict(seed=seed, image=patch * side, patch=patch, tokens_per_image=tokens_side ** 2, vision=vision, text=text,
            pan_and_scan=pan_and_scan)
tm.make_tiny_gemma3(out, seed=seed, image_size=patch * side, patch_size=patch, mm_tokens_per_image=tokens_side ** 2,
                    text_sizes=text, vision_sizes=vision, pan_and_scan=pan_and_scan)
if r.random() < 0.3:  # saved in bfloat16, as Gemma 3 checkpoints are (the build loads fp32)
    import torch
    from transformers import Gemma3ForConditionalGeneration
    Gemma3ForConditionalGeneration.from_pretrained(out).to(torch.bfloat16).save_pretrained(out)
    desc["dtype"] = "bfloat16"
print(json.dumps(desc))
