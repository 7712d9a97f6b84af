"""One random tiny LLaVA per seed (the tests' helpers, other sizes and layouts), one in four a ViP-LLaVA (its classes:
the feature layers side by side without their first rows, a LayerNorm projector): python llava.py SEED OUT_DIR.
Prints what it drew as JSON lines. Used by sweep.sh; see docs/adapters.md (the forty-second session's sweep)."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import tiny_models as tm

seed, out = int(sys.argv[1]), Path(sys.argv[2])
r = random.Random(seed)
family = r.choice(list(tm.TEXT_FAMILIES))
tower = r.choice(["clip", "siglip", "vit", "dinov2", "dinov2-registers"])
patch = r.choice([4, 6, 8, 14])
n = r.choice([2, 3, 4, 5])
image = patch * n
vlayers = r.choice([1, 2, 3])
heads = r.choice([2, 4, 8])
kv = r.choice([h for h in (1, 2, 4, 8) if heads % h == 0])
head_dim = r.choice([8, 16, 32])
hidden = r.choice([48, 64, 96])
text = dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv,
            num_hidden_layers=r.choice([1, 2, 3]), intermediate_size=r.choice([72, 128, 200]))
if r.random() < 0.5:
    text["head_dim"] = head_dim
extra = tm.TEXT_FAMILIES[family][1]
for key in ("layer_types", "layer_rope_theta", "layers_block_type", "no_rope_layers"):  # lists fix the depth
    if isinstance(extra.get(key), list):
        text["num_hidden_layers"] = len(extra[key])
if "rope_parameters" in extra or "rope_scaling" in extra:  # factors sized for the default head size
    text.pop("head_dim", None); text["hidden_size"] = 64; text["num_attention_heads"] = 4
fl_choices = [-1, -2, 0, vlayers, [-2, -1], [0, -1]]
fl = r.choice(fl_choices)
strategy = r.choice(["default", "full"])
hf_processor = r.random() < 0.5
sp = hf_processor and r.random() < 0.5
vip = random.Random(f"vip-{seed}").random() < 0.25  # a generator of its own: other seeds draw what they drew
if vip:  # ViP-LLaVA has no strategy (every layer's first row dropped) and reads a list of layers
    strategy, fl = "default", fl if isinstance(fl, list) else [fl]
vh = r.choice([16, 32, 48])
vs = dict(patch_size=patch, num_hidden_layers=vlayers, hidden_size=vh, num_attention_heads=r.choice([1, 2, 4]) if vh != 48 else r.choice([1, 2, 3]))
desc = dict(seed=seed, family=family, tower=tower, image=image, text=text, vision=vs, feature_layer=fl,
            strategy=strategy, hf_processor=hf_processor, sentencepiece=sp, vip=vip)
tm.make_tiny_llava(out, family=family, seed=seed, strategy=strategy, feature_layer=fl, tower=tower,
                   hf_processor=hf_processor, sentencepiece=sp, image_size=image, text_sizes=text, vision_sizes=vs,
                   vip=vip)
cfgp = out / "config.json"
c = json.loads(cfgp.read_text())
c["projector_hidden_act"] = r.choice(["gelu", "silu", "quick_gelu", "gelu_pytorch_tanh", "relu"])
cfgp.write_text(json.dumps(c, indent=2))
if r.random() < 0.3:  # saved in bfloat16, as many checkpoints are (the build loads fp32)
    import torch
    from transformers import AutoModelForImageTextToText
    m = AutoModelForImageTextToText.from_pretrained(out).to(torch.bfloat16)
    m.save_pretrained(out)
    c = json.loads(cfgp.read_text())
desc.update(act=c["projector_hidden_act"], dtype=c.get("dtype", c.get("torch_dtype")))
if hf_processor and r.random() < 0.5:  # llava-hf's newer image processor: padded to a square first, other norms
    from transformers import LlavaImageProcessor, LlavaProcessor
    processor = LlavaProcessor.from_pretrained(out)
    crop = r.random() < 0.5
    size = {"shortest_edge": image} if crop else {"height": image, "width": image}
    processor.image_processor = LlavaImageProcessor(
        size=size, crop_size={"height": image, "width": image}, do_center_crop=crop, do_pad=r.random() < 0.7,
        image_mean=[r.uniform(0.3, 0.6) for _ in range(3)], image_std=[r.uniform(0.2, 0.4) for _ in range(3)],
        resample=r.choice([2, 3]))
    processor.save_pretrained(out)
    desc.update(image_processor="LlavaImageProcessor", crop=crop, pad=processor.image_processor.do_pad)
print(json.dumps(desc))
