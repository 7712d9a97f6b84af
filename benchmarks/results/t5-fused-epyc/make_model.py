"""A BLIP-2 with a Flan-T5-base-shaped T5 (random weights: d_model 768, 12 + 12 layers, 12 heads of 64,
gated-gelu d_ff 2048, vocabulary 32128) and the test suite's tiny ViT and Q-Former, to time the decoder.

    python make_model.py DIR
"""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "tests"))
from pathlib import Path
import tiny_models as tm
from transformers import T5Config

tok = tm.make_t5_tokenizer()
text = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                tie_word_embeddings=False)
print(tm._save_tiny_blip2(Path(sys.argv[1]), tok, text, 0, 32))
