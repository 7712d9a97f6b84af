"""A random LLaVA whose LM is GPT-J-shaped at ~125M (hidden 768, 12 layers, 12 heads of 64, rotary over the
first 32 channels of each head in pairs, before the head transpose; attention and MLP in parallel; LayerNorm)."""
import sys
from pathlib import Path
import torch
from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, GPTJConfig, LlavaConfig,
                          LlavaForConditionalGeneration)
from vlm_export.demo.smollm2 import GGUF_NAME, gguf_dir
out = Path(sys.argv[1])
torch.manual_seed(0)
vision = CLIPVisionConfig(image_size=64, patch_size=16, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
text = GPTJConfig(vocab_size=49152, n_embd=768, n_layer=12, n_head=12, rotary_dim=32, n_positions=2048,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False)
cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=16, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu")
LlavaForConditionalGeneration(cfg).eval().save_pretrained(out)
AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME).save_pretrained(out)
CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(out)
print(out)
