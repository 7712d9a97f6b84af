"""A random LLaVA whose LM is Gemma-3-270M-shaped (hidden 640, 18 layers, 4 heads and 1 KV head of 256,
MLP 2048, RMSNorms before and after attention and MLP, q/k norms, sliding window 512 on 5 of 6 layers),
its vocabulary SmolLM2's 49152 (Gemma's 262k would be most of the weights)."""
import sys
from pathlib import Path
import torch
from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, Gemma3TextConfig, LlavaConfig,
                          LlavaForConditionalGeneration)
from vlm_export.demo.smollm2 import GGUF_NAME, gguf_dir  # SmolLM2 tokenizer, from the GGUF the demo ships
out = Path(sys.argv[1])
torch.manual_seed(0)
vision = CLIPVisionConfig(image_size=64, patch_size=16, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
text = Gemma3TextConfig(vocab_size=49152, hidden_size=640, num_hidden_layers=18, num_attention_heads=4,
                        num_key_value_heads=1, head_dim=256, intermediate_size=2048, sliding_window=512,
                        query_pre_attn_scalar=256, max_position_embeddings=4096,
                        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=16, vision_feature_layer=-2,
                  vision_feature_select_strategy="default", projector_hidden_act="gelu")
LlavaForConditionalGeneration(cfg).eval().save_pretrained(out)
AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME).save_pretrained(out)
CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(out)
print(out)
