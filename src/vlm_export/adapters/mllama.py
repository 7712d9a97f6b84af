"""Llama-3.2-Vision: Hugging Face ``MllamaForConditionalGeneration`` (cross-attention fusion).

Stages (decoded by the ``cross_attention`` scheme, see ``contract/cross.py``):

* ``vision_encoder``: the tiled vision model. Its inputs are the image processor's own outputs,
  ``pixel_values [images, tiles, 3, H, W]``, ``aspect_ratio_ids [images]``, ``aspect_ratio_mask
  [images, tiles]`` (the processor nests images per prompt; one request's are folded to axis 0);
  output: the last hidden states with the intermediate layers concatenated, per tile.
* ``projector``: ``multi_modal_projector`` -> ``cross_attention_states [images, tiles, P, hidden]``.
* ``cross_kv``: the k/v projections and k_norm of every cross-attention layer, once per image
  (``cross_key_values``): a separate stage, so decode steps read them and never recompute them,
  and an image's K/V can be cached like any image embedding.
* ``lm_decoder``: the text model (self-attention layers with a growing cache, cross-attention
  layers reading the image K/V under an additive mask computed in the graph) + ``lm_head``.

The cross-attention mask is computed here in an export-friendly form that equals Hugging Face's
``_prepare_cross_attention_mask`` (additive float32-lowest mask, rows that attend to no image
zeroed, and their MLP output zeroed) where a row's images are all real; rows of a batch padded to
more images spread such rows over their own images only, and a row without images skips the
cross-attention layers (``torch.where``, so the skipped branch cannot leak a NaN), as HF does.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from ..contract import DECODER_PRECISIONS, IMAGE, IMAGE_PRECISIONS, DecoderGeometry, PromptLayout, StageSpec, TensorSpec
from ..contract.cross import CROSS_KV, CrossAttentionScheme
from ..errors import AdapterError
from ..runtime.prompt import build_prompt_ids
from . import register
from .base import LoadedModel, Stage, VLMAdapter, check_image_size
from .loading import load_hf_parts, load_processor, run_processor

PROBE_PROMPT = "What is in the picture?"
EXAMPLE_IMAGES, EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST, EXAMPLE_DECODER_IMAGES = 2, 2, 3, 4, 5


class MllamaVisionEncoder(nn.Module):
    """One request's images -> ``[images, tiles, P, vision_output_dim]``, as MllamaModel calls the
    vision model (a batch of one prompt)."""

    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        out = self.vision_model(pixel_values=pixel_values[None], aspect_ratio_ids=aspect_ratio_ids[None],
                                aspect_ratio_mask=aspect_ratio_mask[None]).last_hidden_state
        return out[0]


class CrossKV(nn.Module):
    """``cross_attention_states [images, tiles, P, hidden]`` -> ``[images, 2 x cross layers, kv heads,
    tiles x P, head dim]``: per cross-attention layer its keys (after k_norm) and values, exactly as
    MllamaTextCrossAttention makes them (per image; a row's images are concatenated in order)."""

    def __init__(self, cross_layers: list[nn.Module]):
        super().__init__()
        self.attn = nn.ModuleList([layer.cross_attn for layer in cross_layers])

    def forward(self, cross_attention_states):
        images, hidden = cross_attention_states.shape[0], cross_attention_states.shape[-1]
        states = cross_attention_states.reshape(images, -1, hidden)
        out = []
        for attn in self.attn:
            keys = attn.k_proj(states).view(images, -1, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
            values = attn.v_proj(states).view(images, -1, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
            out += [attn.k_norm(keys), values]
        return torch.stack(out, dim=1)


def cross_attention_bias(cross_attention_mask: torch.Tensor, cross_image_mask: torch.Tensor, tokens_per_tile: int,
                         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(additive mask ``[batch, 1, sequence, images x tiles x P]``, row mask ``[batch, 1, sequence, 1]``):
    Hugging Face's ``_prepare_cross_attention_mask`` without its ``1.0 - mask`` on integers (which does
    not export), and with padding images (``cross_image_mask`` 0) never attended: a row that attends to
    no image gets 0 on its real images' keys (HF: 0 on all of one request's keys), and row mask 0."""
    batch, seq, images, tiles = cross_attention_mask.shape
    attend = (cross_attention_mask > 0)[..., None].expand(batch, seq, images, tiles, tokens_per_tile)
    attend = attend.reshape(batch, seq, images * tiles * tokens_per_tile)
    any_image = attend.any(dim=-1, keepdim=True)
    real = (cross_image_mask > 0)[:, None, :, None].expand(batch, 1, images, tiles * tokens_per_tile)
    real = real.reshape(batch, 1, images * tiles * tokens_per_tile)
    allowed = (attend & any_image) | (real & ~any_image)  # not Where: ONNX Runtime has no bool Where kernel
    lowest = torch.finfo(dtype).min
    bias = torch.where(allowed, torch.zeros((), dtype=dtype), torch.full((), lowest, dtype=dtype))
    return bias[:, None], any_image.to(dtype)[:, None]


class CrossAttentionDecoder(nn.Module):
    """``(input_ids, attention_mask, position_ids, cross_attention_mask, cross_image_mask,
    cross_key_values, *self past) -> (logits [batch, 1, vocab], *self present)``: MllamaTextModel's
    forward with the cross-attention layers reading ``cross_key_values`` from a pre-filled cache."""

    def __init__(self, text_model: nn.Module, lm_head: nn.Module, tokens_per_tile: int):
        super().__init__()
        self.text_model, self.lm_head = text_model, lm_head
        self.cross = [int(i) for i in text_model.config.cross_attention_layers]
        self.self_layers = [i for i in range(len(text_model.layers)) if i not in self.cross]
        self.tokens_per_tile = tokens_per_tile

    def forward(self, input_ids, attention_mask, position_ids, cross_attention_mask, cross_image_mask,
                cross_key_values, *past):
        from transformers.masking_utils import create_causal_mask

        tm = self.text_model
        hidden = tm.embed_tokens(input_ids)
        cache = DynamicCache()
        for idx in range(len(tm.layers)):  # layers in model order: each reads its own cache entry
            if idx in self.cross:
                c = self.cross.index(idx)
                cache.update(cross_key_values[:, 2 * c], cross_key_values[:, 2 * c + 1], idx)
            else:
                s = self.self_layers.index(idx)
                cache.update(past[2 * s], past[2 * s + 1], idx)
        causal = create_causal_mask(config=tm.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                    cache=cache, position_ids=position_ids, layer_idx=self.self_layers[0])
        bias, rows = cross_attention_bias(cross_attention_mask, cross_image_mask, self.tokens_per_tile, hidden.dtype)
        has_images = (cross_image_mask > 0).any(dim=-1)[:, None, None]
        position_embeddings = tm.rotary_emb(hidden, position_ids=position_ids)
        for idx, layer in enumerate(tm.layers):
            if idx in self.cross:
                out = layer(hidden, cross_attention_states=None, cross_attention_mask=bias, attention_mask=causal,
                            full_text_row_masked_out_mask=rows, position_ids=position_ids, cache=cache,
                            position_embeddings=position_embeddings)
                hidden = torch.where(has_images, out, hidden)  # a row without images skips the layer (HF)
            else:
                hidden = layer(hidden, attention_mask=causal, position_ids=position_ids, cache=cache,
                               position_embeddings=position_embeddings)
        logits = self.lm_head(tm.norm(hidden)[:, -1:])
        present = []
        for idx in self.self_layers:
            present += [cache.layers[idx].keys, cache.layers[idx].values]
        return (logits, *present)


@register
class MllamaAdapter(VLMAdapter):
    name = "mllama"
    model_types = ("mllama",)
    description = ("Hugging Face MllamaForConditionalGeneration (Llama-3.2-Vision: tiled vision model, "
                   "cross-attention layers in the text model)")

    def load(self, path: Path) -> LoadedModel:
        from transformers import MllamaForConditionalGeneration, MllamaProcessor

        model, tokenizer, image_processor = load_hf_parts(MllamaForConditionalGeneration, path)
        cfg = model.config
        processor = load_processor(MllamaProcessor, path, cfg.image_token_index)
        text = cfg.text_config
        cross = [int(i) for i in text.cross_attention_layers]
        outside = [i for i in cross if not 0 <= i < text.num_hidden_layers]
        if outside:
            raise AdapterError(f"cross_attention_layers {cross} in "
                               f"{Path(path) / 'config.json'} names layer(s) {outside}, but the text model has "
                               f"{text.num_hidden_layers} (0 to {text.num_hidden_layers - 1}): fix the config")
        if not set(range(text.num_hidden_layers)) - set(cross):
            # the decoder's growing cache is its self-attention layers' (contract/cross.py): without one
            # there is nothing to decode token by token with, and no Llama-3.2-Vision is laid out so
            raise AdapterError(f"every one of the {text.num_hidden_layers} text layers in {path} is a cross-attention "
                               f"layer (cross_attention_layers {cross}): the mllama adapter "
                               "needs self-attention layers between them, as Llama 3.2 Vision has")
        tiles = cfg.vision_config.max_num_tiles
        if image_processor.max_image_tiles != tiles:
            raise AdapterError(f"the image processor in {path} pads images to {image_processor.max_image_tiles} "
                               f"tiles but the vision model takes {tiles}; set its max_image_tiles to {tiles}")
        loaded = LoadedModel(self, Path(path), model, tokenizer, image_processor, cfg, processor=processor)
        check_image_size(loaded, (cfg.vision_config.image_size,) * 2)  # each tile's
        self._check_processor(loaded)
        return loaded

    def _check_processor(self, loaded: LoadedModel) -> None:
        """Our prompt ids must be the processor's own (chat template + processor) for a probe prompt."""
        processor = loaded.processor
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROBE_PROMPT}]}]
        if not getattr(processor, "chat_template", None) and not getattr(loaded.tokenizer, "chat_template", None):
            raise AdapterError(f"the model in {loaded.path} has no chat template; the mllama adapter lays prompts "
                               "out with it (save the processor with its chat template)")
        from PIL import Image

        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        theirs = list(run_processor(processor, loaded.path, images=[[Image.new("RGB", (8, 8))]], text=[text],
                                    add_special_tokens=False)["input_ids"][0])
        ours = build_prompt_ids(loaded.tokenizer, self.prompt_layout(loaded), PROBE_PROMPT, 1)
        if theirs != ours:
            raise AdapterError(f"the processor in {loaded.path} lays out a prompt differently from the tokenizer's chat "
                               f"template ({len(theirs)} vs {len(ours)} tokens for a probe prompt); save the processor "
                               "and tokenizer with the same chat template")

    # ---- declarations ----------------------------------------------------------------------
    def tokens_per_tile(self, loaded: LoadedModel) -> int:
        return loaded.model.model.vision_model.num_patches  # patches + the class token

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        t = loaded.config.text_config
        return DecoderGeometry(num_layers=t.num_hidden_layers - len(t.cross_attention_layers),
                               num_kv_heads=t.num_key_value_heads, head_dim=t.hidden_size // t.num_attention_heads,
                               hidden_size=t.hidden_size, vocab_size=t.vocab_size,
                               max_position_embeddings=t.max_position_embeddings)

    def scheme(self, loaded: LoadedModel) -> CrossAttentionScheme:
        cfg = loaded.config
        return CrossAttentionScheme(self.geometry(loaded), cfg.image_token_index,
                                    len(cfg.text_config.cross_attention_layers), cfg.vision_config.max_num_tiles,
                                    self.tokens_per_tile(loaded))

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        # one image token per image, not expanded; the chat template writes it straight before the text
        return PromptLayout(kind="inline", image_token_id=loaded.config.image_token_index, tokens_per_image=1,
                            image_token=loaded.processor.image_token, image_newline=False)

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        m, cfg = loaded.model, loaded.config
        v, t = cfg.vision_config, cfg.text_config
        tiles, size, per_tile = v.max_num_tiles, v.image_size, self.tokens_per_tile(loaded)
        gen = torch.Generator().manual_seed(0)
        pixels = torch.randn(EXAMPLE_IMAGES, tiles, 3, size, size, generator=gen)
        ratio_ids = torch.tensor([1, len(v.supported_aspect_ratios)])[:EXAMPLE_IMAGES]
        ratio_mask = torch.zeros(EXAMPLE_IMAGES, tiles, dtype=torch.int64)
        for i, rid in enumerate(ratio_ids.tolist()):  # the tiles an image of that aspect ratio fills
            h, w = v.supported_aspect_ratios[rid - 1]
            ratio_mask[i, :h * w] = 1
        vision = MllamaVisionEncoder(m.model.vision_model).eval()
        cross_layers = [m.model.language_model.layers[i] for i in t.cross_attention_layers]
        cross_kv = CrossKV(cross_layers).eval()
        with torch.no_grad():
            features = vision(pixels, ratio_ids, ratio_mask).contiguous()
            states = m.model.multi_modal_projector(features).contiguous()
        img = ("images", tiles)
        vision_spec = StageSpec("vision_encoder", IMAGE, (
            TensorSpec("pixel_values", "float32", (*img, 3, size, size), "pixels"),
            TensorSpec("aspect_ratio_ids", "int64", ("images",), "pixels"),
            TensorSpec("aspect_ratio_mask", "int64", img, "pixels"),
        ), (TensorSpec("image_features", "float32", (*img, per_tile, v.vision_output_dim)),), IMAGE_PRECISIONS)
        projector_spec = StageSpec("projector", IMAGE, (
            TensorSpec("image_features", "float32", (*img, per_tile, v.vision_output_dim), "upstream"),),
            (TensorSpec("cross_attention_states", "float32", (*img, per_tile, t.hidden_size)),), IMAGE_PRECISIONS)
        scheme = self.scheme(loaded)
        kv_spec = TensorSpec(CROSS_KV, "float32", scheme.image_input.dims)
        cross_spec = StageSpec("cross_kv", IMAGE, (
            TensorSpec("cross_attention_states", "float32", (*img, per_tile, t.hidden_size), "upstream"),),
            (kv_spec,), IMAGE_PRECISIONS)
        return [Stage(vision_spec, vision, (pixels, ratio_ids, ratio_mask)),
                Stage(projector_spec, m.model.multi_modal_projector, (features,)),
                Stage(cross_spec, cross_kv, (states,)),
                self._decoder_stage(loaded, scheme)]

    def _decoder_stage(self, loaded: LoadedModel, scheme: CrossAttentionScheme) -> Stage:
        m, g = loaded.model, scheme.geometry
        module = CrossAttentionDecoder(m.model.language_model, m.lm_head, scheme.tokens_per_tile)
        gen = torch.Generator().manual_seed(1)
        batch, seq, past, images = EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST, EXAMPLE_DECODER_IMAGES
        ids = torch.randint(0, min(g.vocab_size, 1000), (batch, seq), generator=gen)
        cross_mask = torch.randint(0, 2, (batch, seq, images, scheme.tiles), generator=gen)
        cross_mask[0, 0] = 0  # a row that attends to no image
        image_mask = torch.ones(batch, images, dtype=torch.int64)
        image_mask[1, -2:] = 0  # a row padded to more images than it has
        kv = torch.randn(batch, 2 * scheme.cross_layers, g.num_kv_heads, images * scheme.tokens_per_image, g.head_dim,
                         generator=gen)
        total = past + seq
        past_kv = [torch.randn(batch, g.num_kv_heads, past, g.head_dim, generator=gen) for _ in range(2 * g.num_layers)]
        example = (ids, torch.ones(batch, total, dtype=torch.int64), torch.arange(past, total).repeat(batch, 1),
                   cross_mask, image_mask, kv, *past_kv)
        return Stage(scheme.decoder_spec(DECODER_PRECISIONS), module, example)

    # ---- the reference ---------------------------------------------------------------------
    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        """HF generate on our prompt ids (the same as the processor's: checked at load), the
        processor's pixel tensors, and the cross-attention mask made by the processor's own functions."""
        from transformers.models.mllama.processing_mllama import (convert_sparse_cross_attention_mask_to_dense,
                                                                  get_cross_attention_token_mask)

        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if pixel_values is not None:
            pixels = {k: torch.as_tensor(v)[None] for k, v in pixel_values.items()}  # one prompt's images
            ids = input_ids[0].tolist()
            spans = get_cross_attention_token_mask(ids, loaded.config.image_token_index)
            tiles = pixels["aspect_ratio_mask"][0].sum(-1).tolist()
            mask = convert_sparse_cross_attention_mask_to_dense([spans], [tiles],
                                                                loaded.config.vision_config.max_num_tiles, len(ids))
            inputs.update(pixels, cross_attention_mask=torch.from_numpy(mask))
        with torch.no_grad():
            out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                        eos_token_id=eos_token_ids, pad_token_id=eos_token_ids[0],
                                        use_cache=hf_generate_can_cache(loaded.config))
        return out[0, input_ids.shape[1]:].tolist()


def hf_generate_can_cache(config) -> bool:
    """Whether HF's cached generate runs this model: it reads the cache's length from layer 0, so
    with a cross-attention layer there (the image K/V's length) its causal mask has the wrong size
    (transformers 5.24 fails with a size mismatch). Without the cache it recomputes everything per
    token: the same maths, slower."""
    return 0 not in config.text_config.cross_attention_layers
