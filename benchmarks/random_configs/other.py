"""One random tiny Mllama / BLIP-2 / InstructBLIP / Florence-2 per seed (seed % 4 picks the class): python other.py
SEED OUT_DIR. Prints what it drew as JSON. Used by sweep.sh."""
import json, random, sys
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import torch
import tiny_models as tm

seed, out = int(sys.argv[1]), Path(sys.argv[2])
r = random.Random(seed)
kind = ["mllama", "blip2", "instructblip", "florence2"][seed % 4]
desc = {"seed": seed, "kind": kind}

def mllama():
    tiles = r.choice([1, 2, 3, 4])
    patch = r.choice([4, 8])
    image_size = patch * r.choice([2, 3, 4])
    vlayers = r.choice([2, 3, 4])
    inter = sorted(r.sample(range(vlayers), r.choice([1, 2])))
    vh = r.choice([32, 48])
    vision = dict(hidden_size=vh, num_hidden_layers=vlayers, num_global_layers=r.choice([1, 2]),
                  attention_heads=r.choice([2, 4]), patch_size=patch, intermediate_layers_indices=inter,
                  vision_output_dim=vh * (len(inter) + 1))
    n = r.choice([2, 3, 4, 6])
    cross = sorted(r.sample(range(n), r.choice([1, 2])))
    heads = r.choice([2, 4, 8]); kv = r.choice([k for k in (1, 2, 4) if heads % k == 0])
    text = dict(hidden_size=r.choice([64, 96]), intermediate_size=r.choice([96, 128]), num_attention_heads=heads,
                num_key_value_heads=kv)
    desc.update(tiles=tiles, image=image_size, patch=patch, vlayers=vlayers, inter=inter, n=n, cross=cross,
                heads=heads, kv=kv, hidden=text["hidden_size"])
    tm.make_tiny_mllama(out, seed=seed, cross_layers=tuple(cross), num_layers=n, tiles=tiles, image_size=image_size,
                        vision_sizes=vision, text_sizes=text)

def blip(instruct):
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessor, InstructBlipConfig,
                              InstructBlipForConditionalGeneration, InstructBlipProcessor,
                              InstructBlipQFormerConfig, InstructBlipVisionConfig, LlamaConfig, OPTConfig)
    family = r.choice(["opt", "llama", "t5"])
    tok = tm.make_t5_tokenizer() if family == "t5" else tm._blip_text_tokenizer()
    V = tm._padded_vocab(len(tok))
    ids = dict(eos_token_id=2, bos_token_id=1, pad_token_id=2)
    hidden = r.choice([48, 64, 96])
    heads = r.choice([h for h in (2, 4, 6) if hidden % h == 0 and (hidden // h) % 8 == 0])
    layers = r.choice([1, 2, 3])
    if family == "opt":
        text = OPTConfig(vocab_size=V, hidden_size=hidden, word_embed_proj_dim=hidden, ffn_dim=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=512,
                         do_layer_norm_before=True, **ids)
    elif family == "llama":
        text = LlamaConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=r.choice([k for k in (1, 2) if heads % k == 0]),
                           max_position_embeddings=512, **ids)
    else:
        from transformers import T5Config
        text = T5Config(vocab_size=V, d_model=hidden, d_kv=16, d_ff=2 * hidden, num_layers=layers,
                        num_decoder_layers=layers, num_heads=heads, relative_attention_num_buckets=8,
                        relative_attention_max_distance=32, feed_forward_proj=r.choice(["gated-gelu", "relu"]),
                        decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id, initializer_factor=2.0)
    patch = r.choice([4, 8, 14]); image = patch * r.choice([2, 3, 4])
    vh = r.choice([32, 48])
    qh = r.choice([32, 64])
    Vc, Qc = (InstructBlipVisionConfig, InstructBlipQFormerConfig) if instruct else (Blip2VisionConfig, Blip2QFormerConfig)
    vision = Vc(image_size=image, patch_size=patch, hidden_size=vh, intermediate_size=64, num_hidden_layers=r.choice([1, 2]),
                num_attention_heads=2, initializer_range=0.02)
    qextra = {}
    if instruct:
        qtok = tm.make_qformer_tokenizer()
        qextra = dict(vocab_size=tm._padded_vocab(len(qtok)), max_position_embeddings=64, pad_token_id=qtok.pad_token_id)
    qformer = Qc(hidden_size=qh, num_hidden_layers=r.choice([1, 2, 3]), num_attention_heads=2, intermediate_size=64,
                 cross_attention_frequency=r.choice([1, 2]), encoder_hidden_size=vh, **qextra)
    nq = r.choice([1, 4, 8])
    desc.update(family=family, hidden=hidden, heads=heads, layers=layers, image=image, patch=patch, vh=vh, qh=qh,
                nq=nq, qlayers=qformer.num_hidden_layers, caf=qformer.cross_attention_frequency)
    torch.manual_seed(seed)
    image_token = tok.convert_tokens_to_ids(tm.BLIP_IMAGE_TOKEN)
    ip = BlipImageProcessor(size={"height": image, "width": image})
    if instruct:
        cfg = InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=nq,
                                 image_token_index=image_token)
        model = InstructBlipForConditionalGeneration(cfg).eval()
    else:
        cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=nq,
                          image_text_hidden_size=32, image_token_index=image_token)
        model = Blip2ForConditionalGeneration(cfg).eval()
    tm._randomise_query_tokens(model)
    model.save_pretrained(out)
    if instruct:
        InstructBlipProcessor(image_processor=ip, tokenizer=tok, qformer_tokenizer=qtok, num_query_tokens=nq).save_pretrained(out)
    else:
        Blip2Processor(image_processor=ip, tokenizer=tok, num_query_tokens=nq).save_pretrained(out)

def florence():
    stages = r.choice([2, 3, 4])
    h = r.choice([32, 48]); w = r.choice([32, 48, 64]) if stages < 4 else r.choice([64, 96])
    if stages == 4: h = r.choice([64, 96])
    kw = dict(seed=seed, image_size=(h, w), vision_stages=stages, encoder_layers=r.choice([1, 2]),
              decoder_layers=r.choice([1, 2, 3]), decoder_heads=r.choice([2, 4]), hidden=r.choice([64, 96]),
              scale_embedding=r.random() < 0.5)
    desc.update({k: v for k, v in kw.items() if k != "seed"})
    tm.make_tiny_florence2(out, **kw)

{"mllama": mllama, "blip2": lambda: blip(False), "instructblip": lambda: blip(True), "florence2": florence}[kind]()
print(json.dumps(desc))
