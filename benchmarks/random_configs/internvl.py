"""One random tiny InternVL (InternVLForConditionalGeneration) or, one in three, Qianfan-OCR (its classes over the same
parts, a Qwen3 LM, "<image>" marks) per seed: python internvl.py SEED OUT_DIR. Other tile and patch sizes, tile counts,
feature layers, InternViT options (q/k norm, RMS norm, layer scale, mean pooling) and LM shapes than the test
fixtures'. Prints what it drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm

seed, out = int(sys.argv[1]), Path(sys.argv[2])
r = random.Random(seed)
patch = r.choice([4, 6, 8, 14])
side = 2 * r.choice([1, 2, 3])  # patches per tile side: even, for the pixel shuffle of 0.5
vh = r.choice([16, 32, 48])
layers = r.choice([1, 2, 3])
vision = dict(hidden_size=vh, intermediate_size=2 * vh, num_hidden_layers=layers,
              num_attention_heads=r.choice([h for h in (1, 2, 4) if vh % h == 0]), use_qk_norm=r.random() < 0.4,
              norm_type=r.choice(["layer_norm", "rms_norm"]), layer_scale_init_value=r.choice([0.1, 1.0]),
              use_mean_pooling=r.random() < 0.5)
heads = r.choice([2, 4, 8])
text = dict(hidden_size=r.choice([48, 64, 96]), intermediate_size=r.choice([72, 128, 200]),
            num_hidden_layers=r.choice([1, 2, 3, 4]), num_attention_heads=heads,
            num_key_value_heads=r.choice([k for k in (1, 2, 4, 8) if heads % k == 0]),
            tie_word_embeddings=r.random() < 0.25)  # tied, tiny random heads echo the prompt's last token
feature_layer = r.choice([-1, -1, -2 if layers > 1 else -1])
max_patches = r.choice([1, 2, 4, 6, 12])
bfloat16 = r.random() < 0.3
family = "qianfan_ocr" if r.random() < 1 / 3 else "internvl"  # drawn last: earlier seeds draw what they drew
desc = dict(seed=seed, family=family, tile=patch * side, patch=patch, max_patches=max_patches,
            feature_layer=feature_layer, tokens_per_tile=side ** 2 // 4, vision=vision, text=text)
tm.make_tiny_internvl(out, seed=seed, image_size=patch * side, patch_size=patch, max_patches=max_patches,
                      text_sizes=text, vision_sizes=vision, feature_layer=feature_layer, family=family)
if bfloat16:  # saved in bfloat16, as InternVL checkpoints are (the build loads fp32)
    import torch
    from transformers import AutoModelForImageTextToText
    AutoModelForImageTextToText.from_pretrained(out).to(torch.bfloat16).save_pretrained(out)
    desc["dtype"] = "bfloat16"
print(json.dumps(desc))
