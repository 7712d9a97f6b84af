"""A random BLIP-2 whose LM is shaped like OPT-125M (LayerNorm, learned positions, no rotary, 12 heads of 64),
behind the tests' small ViT / Q-Former, to time its decoder fused vs unfused."""
import sys
import tempfile
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))  # the repository's tests/
import tiny_models
from transformers import OPTConfig
out = Path(sys.argv[1])
tiny_models.SHARED_TOKENIZER_DIR = Path(tempfile.mkdtemp())
tok = tiny_models._blip_text_tokenizer()
text = OPTConfig(vocab_size=tiny_models._padded_vocab(len(tok)), hidden_size=768, word_embed_proj_dim=768, ffn_dim=3072,
                 num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=2048,
                 do_layer_norm_before=True, eos_token_id=2, bos_token_id=1, pad_token_id=2)
tiny_models._save_tiny_blip2(out, tok, text, 0, 32)
print(out)
