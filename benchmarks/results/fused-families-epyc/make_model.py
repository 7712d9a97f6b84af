"""SmolLM2-135M-shaped decoders of other families (random weights: gemma2, phi, phi3-longrope) in a LLaVA with a tiny CLIP tower, to time the decode step.

    python make_model.py gemma2|phi|phi3-longrope DIR
"""
import sys
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "tests"))
from pathlib import Path
import torch
import tiny_models as tm
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration

kind, out = sys.argv[1], Path(sys.argv[2])
common = dict(vocab_size=tm.VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
              num_key_value_heads=3, max_position_embeddings=2048, eos_token_id=2, bos_token_id=1, pad_token_id=2)
extra = {"gemma2": dict(head_dim=64, sliding_window=4096, query_pre_attn_scalar=64, attn_logit_softcapping=50.0,
                        final_logit_softcapping=30.0),
         "phi": dict(partial_rotary_factor=0.5, num_key_value_heads=9),
         "phi3-longrope": dict(original_max_position_embeddings=256, rope_scaling={"rope_type": "longrope",
             "original_max_position_embeddings": 256, "short_factor": [1.0 + 0.05 * i for i in range(32)],
             "long_factor": [1.0 + 0.5 * i for i in range(32)]})}[kind]
model_type = {"gemma2": "gemma2", "phi": "phi", "phi3-longrope": "phi3"}[kind]
torch.manual_seed(0)
text = AutoConfig.for_model(model_type, **{**common, **extra})
cfg = LlavaConfig(vision_config=tm._vision_config(), text_config=text, image_token_id=tm.IMAGE_TOKEN_ID,
                  vision_feature_layer=-2, vision_feature_select_strategy="default", multimodal_projector_bias=True)
LlavaForConditionalGeneration(cfg).eval().save_pretrained(out)
tm._save_tokenizer_and_processor(out, 32)
print(out)
