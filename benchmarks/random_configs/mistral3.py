"""One random tiny Mistral 3 (Mistral3ForConditionalGeneration), or Pixtral-12B's LLaVA form, per seed: python
mistral3.py SEED OUT_DIR. Other patch sizes, merges (1-3), longest edges (not always whole blocks), feature layers,
Pixtral head sizes, and Mistral / Llama / Qwen2 LMs than the test fixtures'; some saved in bfloat16. Prints what it
drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm

seed, out = int(sys.argv[1]), Path(sys.argv[2])
r = random.Random(seed)
patch, merge = r.choice([2, 4, 6, 8]), r.choice([1, 2, 2, 3])
longest = r.choice([2, 3, 5, 8]) * patch * merge + r.choice([0, 0, 1, patch])  # not always whole blocks
vh = r.choice([16, 32, 48])
layers = r.choice([1, 2, 3])
vision = dict(hidden_size=vh, intermediate_size=r.choice([24, 64]), num_hidden_layers=layers,
              num_attention_heads=r.choice([h for h in (1, 2, 4) if vh % h == 0 and (vh // h) % 4 == 0]))
heads = r.choice([2, 4, 8])
text = dict(hidden_size=r.choice([48, 64, 96]), intermediate_size=r.choice([72, 128, 200]),
            num_hidden_layers=r.choice([1, 2, 3]), num_attention_heads=heads,
            num_key_value_heads=r.choice([k for k in (1, 2, 4, 8) if heads % k == 0]))
family = r.choice(["mistral", "mistral", "llama", "qwen2"])
feature_layer = r.choice([-1, -1, r.randrange(0, layers + 1)])
llava = r.random() < 0.3  # Pixtral-12B's form: no merger, every patch a token (so fewer patches)
if llava:
    merge, longest = 1, r.choice([2, 3, 5]) * patch + r.choice([0, 1])
desc = dict(seed=seed, llava=llava, patch=patch, merge=merge, longest_edge=longest, feature_layer=feature_layer,
            family=family, vision=vision, text=text)
tm.make_tiny_mistral3(out, seed=seed, patch_size=patch, merge=merge, longest_edge=longest, family=family,
                      feature_layer=feature_layer, text_sizes=text, vision_sizes=vision, llava=llava)
if r.random() < 0.3:  # saved in bfloat16, as Mistral's checkpoints are (the build loads fp32)
    import torch
    import transformers
    cls = transformers.LlavaForConditionalGeneration if llava else transformers.Mistral3ForConditionalGeneration
    cls.from_pretrained(out).to(torch.bfloat16).save_pretrained(out)
    desc["dtype"] = "bfloat16"
print(json.dumps(desc))
