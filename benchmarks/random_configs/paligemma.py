"""One random tiny PaliGemma (1 or 2) per seed: python paligemma.py SEED OUT_DIR. Other tower sizes, text shapes,
layer layouts (Gemma 2's sliding / global, windows shorter than a prompt), soft caps and query scalars than the test
fixtures'. Prints what it drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm

seed, out = int(sys.argv[1]), Path(sys.argv[2])
r = random.Random(seed)
family = r.choice(["gemma", "gemma2"])
patch = r.choice([4, 6, 8, 14])
side = r.choice([1, 2, 3, 4])
vh = r.choice([16, 32, 48])
vision = dict(hidden_size=vh, intermediate_size=2 * vh, num_hidden_layers=r.choice([1, 2, 3]),
              num_attention_heads=r.choice([h for h in (1, 2, 4) if vh % h == 0]))
layers = r.choice([1, 2, 3, 4])
heads = r.choice([2, 4, 8])
text = dict(hidden_size=r.choice([48, 64, 96]), intermediate_size=r.choice([72, 128, 200]), num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=r.choice([k for k in (1, 2, 4, 8) if heads % k == 0]),
            head_dim=r.choice([8, 16, 32]))
if family == "gemma2":
    text.update(sliding_window=r.choice([4, 8, 64]), query_pre_attn_scalar=r.choice([8, 16, 256]),
                layer_types=[r.choice(["sliding_attention", "full_attention"]) for _ in range(layers)],
                attn_logit_softcapping=r.choice([None, 20.0, 50.0]), final_logit_softcapping=r.choice([None, 10.0, 30.0]))
desc = dict(seed=seed, family=family, image=patch * side, patch=patch, vision=vision, text=text)
tm.make_tiny_paligemma(out, seed=seed, family=family, image_size=patch * side, patch_size=patch, text_sizes=text,
                       vision_sizes=vision)
if r.random() < 0.3:  # saved in bfloat16, as PaliGemma checkpoints are (the build loads fp32)
    import torch
    from transformers import PaliGemmaForConditionalGeneration
    PaliGemmaForConditionalGeneration.from_pretrained(out).to(torch.bfloat16).save_pretrained(out)
    desc["dtype"] = "bfloat16"
print(json.dumps(desc))
