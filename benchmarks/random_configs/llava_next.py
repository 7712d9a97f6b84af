"""One random tiny LLaVA-NeXT (LlavaNextForConditionalGeneration; one in four LLaVA-NeXT-Video's classes, its image path)
per seed: python llava_next.py SEED OUT_DIR. Other
tile and patch sizes, resolutions (so tile grids and cut-back pictures), towers (CLIP with its CLS dropped, SigLIP
with every patch kept), feature layers and LM families and shapes than the test fixture's. Prints what it drew as
JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm

seed, out = int(sys.argv[1]), Path(sys.argv[2])
r = random.Random(seed)
patch = r.choice([4, 6, 8, 10])
tile = patch * r.choice([2, 3, 4, 5])
grids = [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (3, 2), (2, 3), (3, 3), (1, 1), (1, 4)]
pinpoints = [(rows * tile, cols * tile) for rows, cols in r.sample(grids, r.choice([1, 2, 3, 5]))]
tower = r.choice(["clip", "clip", "siglip"])
strategy = "default" if tower == "clip" else "full"
layers = r.choice([1, 2, 3])
vh = r.choice([16, 32, 48])
vision = dict(patch_size=patch, hidden_size=vh, intermediate_size=2 * vh, num_hidden_layers=layers,
              num_attention_heads=r.choice([h for h in (1, 2, 4) if vh % h == 0]))
feature_layer = r.choice([-1, -2 if layers > 1 else -1, [-2, -1] if layers > 1 else -1])
family = r.choice(["llama", "mistral", "qwen2"])
heads = r.choice([2, 4, 8])
text = dict(hidden_size=r.choice([48, 64, 96]), intermediate_size=r.choice([72, 128, 200]),
            num_hidden_layers=r.choice([1, 2, 3]), num_attention_heads=heads,
            num_key_value_heads=r.choice([k for k in (1, 2, 4, 8) if heads % k == 0]))
video = random.Random(f"video-{seed}").random() < 0.25  # a generator of its own: other seeds draw what they drew
desc = dict(seed=seed, tile=tile, patch=patch, pinpoints=pinpoints, tower=tower, feature_layer=feature_layer,
            family=family, vision=vision, text=text, video=video)
tm.make_tiny_llava_next(out, family=family, seed=seed, image_size=tile, pinpoints=tuple(pinpoints), tower=tower,
                        strategy=strategy, feature_layer=feature_layer, text_sizes=text, vision_sizes=vision,
                        video=video)
print(json.dumps(desc))
