"""One random tiny VLM and a random trained-looking PEFT adapter made on it, per seed: python lora.py SEED OUT_DIR.
Seeds below 100 a LLaVA; from 100 three in four, the others other.py's model for that seed (Mllama, BLIP-2, InstructBLIP, Florence-2).
The adapter goes to OUT_DIR.lora (sweep.sh passes it as --lora). Prints what it drew as JSON."""
import json, random, subprocess, sys, warnings
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import torch
import tiny_models as tm

warnings.simplefilter("ignore")
seed, out = int(sys.argv[1]), Path(sys.argv[2])
r = random.Random(seed)
on_llava = seed < 100 or random.Random(seed * 7919 + 1).random() < 0.75  # own draw: LLaVA seeds draw as before
if on_llava:
    family = r.choice(list(tm.TEXT_FAMILIES))
    tower = r.choice(["clip", "siglip", "dinov2"])
    tm.make_tiny_llava(out, family=family, seed=seed, tower=tower, hf_processor=r.random() < 0.5)
    base = dict(family=family, tower=tower)
else:
    made = subprocess.run([sys.executable, str(Path(__file__).with_name("other.py")), str(seed), str(out)],
                          capture_output=True, text=True, check=True)
    base = json.loads(made.stdout.splitlines()[-1])

import peft
from vlm_export.adapters import adapter_for

model = adapter_for(out).load(out).model  # the full model the build loads, as the adapter must be made on
names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
# which linears: every one, the language model's, the tower's, the projector's, a random few
where = r.choice(["all-linear", "language", "vision", "projector", "few"])
pick = {"all-linear": "all-linear",
        "language": [n for n in names if "language_model." in n],
        "vision": [n for n in names if "vision" in n],
        "projector": [n for n in names if "projector" in n or "qformer" in n],
        "few": r.sample(names, min(len(names), r.choice([1, 3, 6])))}[where] or "all-linear"
kind = r.choice(["lora", "lora", "dora", "rslora", "loha", "lokr", "ia3", "vera", "fourierft", "boft", "oft", "hra",
                 "adalora", "lntuning", "bias", "modules_to_save", "lm_head", "embedding", "tokens"])
common = dict(target_modules=pick)
if kind in ("lora", "dora", "rslora", "bias", "modules_to_save", "lm_head", "embedding", "tokens"):
    extra = {}
    if kind == "bias":
        extra["bias"] = r.choice(["all", "lora_only"])
    if kind == "modules_to_save":
        extra["modules_to_save"] = [r.choice(["multi_modal_projector" if on_llava else "vision_model", "lm_head"])]
    if kind == "lm_head":  # LoRA on the head too (tied to embed_tokens in many of these families)
        common["target_modules"] = (["lm_head"] + names) if pick == "all-linear" else ["lm_head"] + list(pick)
    if kind == "embedding":
        common["target_modules"] = ["embed_tokens"] + (names if pick == "all-linear" else list(pick))
    if kind == "tokens":  # new tokens' embeddings trained beside LoRA
        extra["trainable_token_indices"] = {"embed_tokens": r.sample(range(100, 200), 3)}
    config = peft.LoraConfig(r=r.choice([1, 2, 4, 8]), lora_alpha=r.choice([1, 8, 16]), init_lora_weights=False,
                             use_dora=kind == "dora", use_rslora=kind == "rslora", **common, **extra)
elif kind == "loha":
    config = peft.LoHaConfig(r=r.choice([2, 4]), init_weights=False, **common)
elif kind == "lokr":
    config = peft.LoKrConfig(r=r.choice([2, 4]), init_weights=False, **common)
elif kind == "ia3":
    tm_names = names if pick == "all-linear" else list(pick)
    config = peft.IA3Config(target_modules=tm_names, feedforward_modules=[n for n in tm_names if r.random() < 0.4],
                            init_ia3_weights=False)
elif kind == "vera":
    config = peft.VeraConfig(r=4, init_weights=False, **common)
elif kind == "fourierft":
    config = peft.FourierFTConfig(n_frequency=8, init_weights=False, **common)
elif kind == "boft":
    config = peft.BOFTConfig(boft_block_size=4, init_weights=False, **common)
elif kind == "oft":
    config = peft.OFTConfig(r=0, oft_block_size=4, init_weights=False, **common)
elif kind == "hra":
    config = peft.HRAConfig(r=4, init_weights=False, **common)
elif kind == "adalora":
    config = peft.AdaLoraConfig(r=4, total_step=10, init_lora_weights=False, **common)
else:  # lntuning: the norms' weights trained
    config = peft.LNTuningConfig(target_modules=None)
desc = dict(base, seed=seed, adapter=kind, where=where,
            n_targets=len(pick) if isinstance(pick, list) else pick)
try:
    torch.manual_seed(seed)
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():  # trained-looking: adapters whose init_weights=False still leaves a no-op
        for n, p in peft_model.named_parameters():
            if p.requires_grad and kind in ("vera", "lntuning", "tokens", "modules_to_save", "bias", "fourierft", "hra",
                                            "boft", "oft"):
                p.add_(0.05 * torch.randn_like(p))
    if r.random() < 0.3:  # trained in bfloat16 and saved so, as many adapters are (the build loads fp32)
        for p in peft_model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
        desc["adapter_dtype"] = "bfloat16"
    peft_model.save_pretrained(f"{out}.lora")
except Exception as e:  # the maker's own draw does not fit this model: no adapter, a plain build
    desc["make_error"] = str(e).splitlines()[0][:200]
    print(json.dumps(desc)); sys.exit(1)
print(json.dumps(desc))
