"""One random tiny Aya Vision (AyaVisionForConditionalGeneration) per seed: python aya_vision.py SEED OUT_DIR. Other
tile and patch sizes, pixel shuffles, tile counts, feature layers, SigLIP and Cohere 2 shapes (sliding-window and
global layers in random order, windows shorter than a prompt) than the test fixture's. Prints what it drew as JSON.
Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm

seed, out = int(sys.argv[1]), Path(sys.argv[2])
r = random.Random(seed)
patch = r.choice([4, 6, 8, 14])
downsample = r.choice([1, 2, 3])
side = downsample * r.choice([1, 2, 3])  # patches per tile side: a multiple of the pixel shuffle's factor
vh = r.choice([16, 32, 48])
layers = r.choice([1, 2, 3])
vision = dict(hidden_size=vh, intermediate_size=2 * vh, num_hidden_layers=layers,
              num_attention_heads=r.choice([h for h in (1, 2, 4) if vh % h == 0]))
heads = r.choice([2, 4, 8])
text_layers = r.choice([1, 2, 3, 4])
text = dict(hidden_size=r.choice([48, 64, 96]), intermediate_size=r.choice([72, 128, 200]),
            num_hidden_layers=text_layers, num_attention_heads=heads,
            num_key_value_heads=r.choice([k for k in (1, 2, 4, 8) if heads % k == 0]),
            sliding_window=r.choice([4, 8, 64]),
            layer_types=[r.choice(["sliding_attention", "full_attention"]) for _ in range(text_layers)],
            logit_scale=r.choice([0.0625, 0.25, 1.0]), tie_word_embeddings=r.random() < 0.5)
feature_layer = r.choice([-1, -1, -2 if layers > 1 else -1])
max_patches = r.choice([1, 2, 4, 6, 12])
desc = dict(seed=seed, tile=patch * side, patch=patch, downsample=downsample, max_patches=max_patches,
            feature_layer=feature_layer, tokens_per_tile=(side // downsample) ** 2, vision=vision, text=text)
tm.make_tiny_aya_vision(out, seed=seed, image_size=patch * side, patch_size=patch, max_patches=max_patches,
                        downsample=downsample, text_sizes=text, vision_sizes=vision, feature_layer=feature_layer)
if r.random() < 0.3:  # saved in bfloat16 (the build loads fp32)
    import torch
    from transformers import AyaVisionForConditionalGeneration
    AyaVisionForConditionalGeneration.from_pretrained(out).to(torch.bfloat16).save_pretrained(out)
    desc["dtype"] = "bfloat16"
print(json.dumps(desc))
