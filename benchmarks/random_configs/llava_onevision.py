"""One random tiny LLaVA-OneVision (LlavaOnevisionForConditionalGeneration) per seed: python llava_onevision.py SEED
OUT_DIR. Other tile and patch sizes, resolutions, anyres_max_N (how far a packed picture is shrunk), SigLIP and Qwen2
shapes than the test fixture's. Prints what it drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm

seed, out = int(sys.argv[1]), Path(sys.argv[2])
r = random.Random(seed)
patch = r.choice([4, 6, 8])
tile = patch * r.choice([2, 3, 4, 5])
grids = [(a, b) for a in range(1, 5) for b in range(1, 5)]
pinpoints = sorted(r.sample(grids, r.choice([2, 4, 8, 16])))
picture_tiles = r.choice([1, 2, 4, 9])
vh = r.choice([16, 32, 48])
vision = dict(patch_size=patch, hidden_size=vh, intermediate_size=2 * vh, num_hidden_layers=r.choice([1, 2, 3]),
              num_attention_heads=r.choice([h for h in (1, 2, 4) if vh % h == 0]))
heads = r.choice([2, 4, 8])
text = dict(hidden_size=r.choice([48, 64, 96]), intermediate_size=r.choice([72, 128, 200]),
            num_hidden_layers=r.choice([1, 2, 3]), num_attention_heads=heads,
            num_key_value_heads=r.choice([k for k in (1, 2, 4, 8) if heads % k == 0]))
desc = dict(seed=seed, tile=tile, patch=patch, grids=pinpoints, picture_tiles=picture_tiles, vision=vision, text=text)
tm.make_tiny_llava_onevision(out, seed=seed, image_size=tile, picture_tiles=picture_tiles,
                             pinpoints=tuple((a * tile, b * tile) for a, b in pinpoints), text_sizes=text,
                             vision_sizes=vision)
print(json.dumps(desc))
