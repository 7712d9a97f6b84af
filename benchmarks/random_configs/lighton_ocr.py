"""One random tiny LightOnOCR (LightOnOcrForConditionalGeneration) per seed: python lighton_ocr.py SEED OUT_DIR.
Other patch sizes, merges (1-3), longest edges (not always whole blocks), Pixtral and Qwen3 shapes (head sizes, KV
heads, layers) than the test fixture's; some saved in bfloat16. Prints what it drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm

seed, out = int(sys.argv[1]), Path(sys.argv[2])
r = random.Random(seed)
patch, merge = r.choice([2, 4, 6, 8]), r.choice([1, 2, 2, 3])
longest = r.choice([2, 3, 5, 8]) * patch * merge + r.choice([0, 0, 1, patch])  # not always whole blocks
vh = r.choice([16, 32, 48])
vheads = r.choice([h for h in (1, 2, 4) if vh % h == 0 and (vh // h) % 4 == 0])
vision = dict(hidden_size=vh, intermediate_size=r.choice([24, 64]), num_hidden_layers=r.choice([1, 2, 3]),
              num_attention_heads=vheads, head_dim=vh // vheads)
heads = r.choice([2, 4, 8])
text = dict(hidden_size=r.choice([48, 64, 96]), intermediate_size=r.choice([72, 128, 200]),
            num_hidden_layers=r.choice([1, 2, 3]), num_attention_heads=heads, head_dim=r.choice([8, 16, 32]),
            num_key_value_heads=r.choice([k for k in (1, 2, 4, 8) if heads % k == 0]))
desc = dict(seed=seed, patch=patch, merge=merge, longest_edge=longest, vision=vision, text=text)
tm.make_tiny_lighton_ocr(out, seed=seed, patch_size=patch, merge=merge, longest_edge=longest, text_sizes=text,
                         vision_sizes=vision)
if r.random() < 0.3:  # saved in bfloat16, as LightOnOCR's checkpoints are (the build loads fp32)
    import torch
    from transformers import LightOnOcrForConditionalGeneration
    LightOnOcrForConditionalGeneration.from_pretrained(out).to(torch.bfloat16).save_pretrained(out)
    desc["dtype"] = "bfloat16"
print(json.dumps(desc))
