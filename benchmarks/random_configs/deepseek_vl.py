"""One random tiny DeepSeek-VL or Janus (DeepseekVLForConditionalGeneration / JanusForConditionalGeneration) per seed:
python deepseek_vl.py SEED OUT_DIR. Either family, other tower sizes (patches of 4-14, 2-6 a side), SigLIP / Janus tower
and Llama shapes than the test fixtures'. Prints what it drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm

seed, out = int(sys.argv[1]), Path(sys.argv[2])
r = random.Random(seed)
family = r.choice(["deepseek_vl", "janus"])
patch = r.choice([4, 6, 8, 14])
side = r.choice([s for s in (2, 3, 4, 6) if patch * s >= 16])  # the image processors' min_size is 14 px
vh = r.choice([16, 32, 48])
vision = dict(hidden_size=vh, intermediate_size=2 * vh, num_hidden_layers=r.choice([1, 2, 3]),
              num_attention_heads=r.choice([h for h in (1, 2, 4) if vh % h == 0]))
heads = r.choice([2, 4, 8])
text = dict(hidden_size=r.choice([48, 64, 96]), intermediate_size=r.choice([72, 128, 200]),
            num_hidden_layers=r.choice([1, 2, 3, 4]), num_attention_heads=heads,
            num_key_value_heads=r.choice([k for k in (1, 2, 4, 8) if heads % k == 0]))
desc = dict(seed=seed, family=family, image=patch * side, patch=patch, tokens_per_image=side ** 2, vision=vision,
            text=text)
tm.make_tiny_deepseek_vl(out, seed=seed, family=family, image_size=patch * side, patch_size=patch, text_sizes=text,
                         vision_sizes=vision)
if r.random() < 0.3:  # saved in bfloat16 (the build loads fp32)
    import torch
    from transformers import DeepseekVLForConditionalGeneration, JanusForConditionalGeneration
    cls = JanusForConditionalGeneration if family == "janus" else DeepseekVLForConditionalGeneration
    cls.from_pretrained(out).to(torch.bfloat16).save_pretrained(out)
    desc["dtype"] = "bfloat16"
print(json.dumps(desc))
