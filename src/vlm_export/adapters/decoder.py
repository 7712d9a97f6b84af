"""Stage helpers shared by adapters whose model is "image stages + a Hugging Face causal LM"
(Llama, Mistral, Qwen2, ... anything whose base model takes ``inputs_embeds`` and a ``Cache``),
fed by the ``spliced`` decoding scheme.

Why the decoder embeds ids itself: the token-embedding matrix is then shipped once (inside the
decoder, shared with the LM head when the model ties them) instead of once in a separate
embedding graph and again as the LM head, and a serving client sends token ids, not
embeddings. Image features arrive as a flat table ``image_embeds [n, hidden]``; the k-th
placeholder id (row-major over the batch, as Hugging Face's ``masked_scatter`` fills) takes
row k. Decode steps pass an empty table ``[0, hidden]``.
"""
from __future__ import annotations

import contextlib
import inspect
import weakref
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import DynamicCache

from ..contract import (DECODER_PRECISIONS, IMAGE, IMAGE_PRECISIONS, DecoderGeometry, StageSpec, TensorSpec)
from ..contract.spliced import SplicedScheme, layer_kv_shapes
from ..errors import AdapterError, first_line
from .base import LoadedModel, Stage, save_causal_lm
from .loading import PER_ROW_LONGROPE

EXAMPLE_IMAGES = 2
EXAMPLE_BATCH, EXAMPLE_SEQ, EXAMPLE_PAST = 2, 3, 4


class SplicingDecoder(nn.Module):
    """``(input_ids, image_embeds, attention_mask, position_ids, *past) -> (logits, *present)``,
    ``logits [batch, 1, vocab]`` for the last position of every row. The rows of one call have
    one length; rows that joined a running batch at different times are aligned on the right,
    their shorter caches padded on the left with positions the attention mask hides.

    ``embed_tokens``, ``text_model`` (called with ``inputs_embeds``) and ``lm_head`` are the original
    modules, shared, not copied. ``text_model`` is the base model and ``lm_head`` the head where the
    model's own forward applies that head to it (LLaVA's); where it calls a whole causal LM (BLIP-2's,
    PrefixVLM's), ``text_model`` is that causal LM and ``lm_head`` None: its forward makes the logits, with
    whatever it adds to the head (Cohere's logit scale, Gemma 2's final soft cap, Granite's logits
    scaling), as Hugging Face's generate samples them.
    """

    def __init__(self, embed_tokens: nn.Module, text_model: nn.Module, lm_head: nn.Module | None,
                 image_token_id: int, num_layers: int):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.text_model = text_model
        self.lm_head = lm_head
        self.image_token_id = int(image_token_id)
        self.num_layers = num_layers
        # the next token needs the last position only: logits for every prompt position would cost a
        # [sequence x vocab] matmul and output at prefill (Hugging Face generate's logits_to_keep=1)
        self._keep_last = ({"logits_to_keep": 1} if lm_head is None
                           and "logits_to_keep" in inspect.signature(text_model.forward).parameters else {})

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        return splice_image_rows(self.embed_tokens, input_ids, image_embeds, self.image_token_id)

    def attention_masks(self, input_ids, image_embeds, inputs_embeds, attention_mask, position_ids, cache):
        """What ``text_model`` gets as its attention mask: the (batch, total) padding mask, from which it makes
        its own causal ones. A model whose own forward makes other masks (Gemma 3's image blocks) overrides it."""
        return attention_mask

    def text_inputs(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> dict:
        """What ``text_model`` gets from the ids besides the spliced embeddings: nothing; a model whose own forward
        reads the ids again (Gemma 4's per-layer input embeddings) overrides it."""
        return {}

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits from the last hidden state, as the model's own forward makes them: its ``lm_head``; a
        model whose forward adds to it (PaliGemma's final soft cap) overrides it."""
        return self.lm_head(hidden)

    def forward(self, input_ids, image_embeds, attention_mask, position_ids, *past):
        cache = DynamicCache()
        for layer in range(self.num_layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        inputs_embeds = self.embed(input_ids, image_embeds)
        out = self.text_model(
            inputs_embeds=inputs_embeds,
            attention_mask=self.attention_masks(input_ids, image_embeds, inputs_embeds, attention_mask, position_ids,
                                                cache),
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            **self.text_inputs(input_ids, image_embeds),
            **self._keep_last,
        )
        logits = out.logits[:, -1:] if self.lm_head is None else self.head(out.last_hidden_state[:, -1:])
        present = []
        for layer in cache.layers[: self.num_layers]:
            present += [layer.keys, layer.values]
        return (logits, *present)


def image_rows(input_ids: torch.Tensor, image_embeds: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """For each position, the row of ``image_embeds`` it takes, 1-based (the k-th placeholder, row-major,
    takes row k); 0 for text. A placeholder id past the table's rows is text: a model may generate its own
    image token, which a decode step (no image rows) embeds as the token it is, as Hugging Face's generate does."""
    flat = (input_ids == image_token_id).reshape(-1).to(torch.int64)
    index = torch.cumsum(flat, dim=0) * flat  # the k-th placeholder -> k (1-based), text -> 0
    return torch.where(index <= image_embeds.shape[0], index, torch.zeros_like(index)).reshape(input_ids.shape)


def splice_image_rows(embed_tokens: nn.Module, input_ids: torch.Tensor, image_embeds: torch.Tensor,
                      image_token_id: int) -> torch.Tensor:
    """The ids' embeddings with each placeholder replaced by its row of ``image_embeds`` (``image_rows``;
    HF's ``masked_scatter``, in a form that exports with an empty table too)."""
    batch, seq = input_ids.shape
    index = image_rows(input_ids, image_embeds, image_token_id).reshape(-1)
    is_image = (index > 0).reshape(batch, seq)
    # placeholder ids may lie outside the vocabulary (prefix layout): embed a valid id there
    text_embeds = embed_tokens(torch.where(is_image, torch.zeros_like(input_ids), input_ids))
    hidden = text_embeds.shape[-1]
    # row 0 of the table is padding so text positions (index 0) and an empty table work
    table = torch.cat([text_embeds.new_zeros(1, hidden), image_embeds.to(text_embeds.dtype)], dim=0)
    spliced = table.index_select(0, index).reshape(batch, seq, hidden)
    return torch.where(is_image.unsqueeze(-1), spliced, text_embeds)


def text_geometry(text_cfg, text_model: nn.Module) -> DecoderGeometry:
    """KV geometry of a Hugging Face causal LM (shared by adapters that wrap one): the layers, the KV
    heads and the head size of the cache ``text_model`` (the base model or the causal LM) writes,
    measured (``cache_shape``), since configs spell them many ways (Falcon's ``multi_query`` keeps one KV
    head while its config names none); the rest from ``text_cfg``. A model without a position table
    (ALiBi: BLOOM, MPT) has no ``max_position_embeddings``: None, no bound but the build's. Layers whose (KV
    heads, head size) differ (Gemma 4's) give ``layer_kv``."""
    shapes = cache_shape(text_cfg, text_model)
    return DecoderGeometry(
        num_layers=len(shapes),
        num_kv_heads=shapes[0][0],
        head_dim=shapes[0][1],
        layer_kv=shapes if len(set(shapes)) > 1 else (),
        hidden_size=text_cfg.hidden_size,
        vocab_size=text_cfg.vocab_size,
        max_position_embeddings=getattr(text_cfg, "max_position_embeddings", None),
        batch_switched_positions=longrope_switch(text_cfg) if _batch_picks_longrope(text_model) else None,
        **attention_windows(text_cfg),
    )


def _batch_picks_longrope(text_model: nn.Module) -> bool:
    """Whether a longrope rotary of ``text_model`` still picks its factors per call for the whole batch
    (one ``loading.longrope_per_row`` could not make per row: a rope type per attention type)."""
    for module in text_model.modules():
        kind = getattr(module, "rope_type", None)
        if "longrope" in (kind.values() if isinstance(kind, dict) else [kind]) and not getattr(
                module, PER_ROW_LONGROPE, False):
            return True
    return False


def longrope_switch(text_cfg) -> int | None:
    """Where a longrope rotary (Phi-3's, Phi-4-mini's) switches from its short to its long factors: Hugging
    Face picks them per call by the largest position in the batch (``original_max_position_embeddings``);
    ``text_geometry`` records it where the loaded model still does (``loading.longrope_per_row`` makes it per
    row otherwise). None for any other rotary. Read from the config's rope parameters (5.x) or
    rope scaling (4.x), one dict or one per attention type."""
    rope = getattr(text_cfg, "rope_parameters", None) or getattr(text_cfg, "rope_scaling", None) or {}
    kinds = [rope] if "rope_type" in rope or "type" in rope else [v for v in rope.values() if isinstance(v, dict)]
    for kind in kinds:
        if (kind.get("rope_type") or kind.get("type")) == "longrope":
            return kind.get("original_max_position_embeddings") or getattr(text_cfg, "original_max_position_embeddings",
                                                                           None)
    return None


_CACHE_SHAPES: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, int], ...]]" = weakref.WeakKeyDictionary()


def cache_shape(text_cfg, text_model: nn.Module) -> tuple[tuple[int, int], ...]:
    """(KV heads, head size) of each layer's cache ``text_model`` writes for one token, measured once per
    model. An LM whose cache is not one (keys, values) pair of (batch, heads, sequence, head size) per
    layer (a state-space or recurrent one: Mamba, Jamba, RecurrentGemma) is refused in one line. Layers after
    the last that caches, caching nothing, are left out: they read earlier layers' K/V (Gemma 4's shared layers,
    Hugging Face's ``DummyLayer``), which the decoder has in those layers' caches, grown by the same call."""
    if text_model in _CACHE_SHAPES:
        return _CACHE_SHAPES[text_model]
    kind = getattr(text_cfg, "model_type", type(text_model).__name__)
    refusal = (f"the language model ({kind}) {{}}, not a transformer's KV cache (keys and values of (batch, heads, "
               "sequence, head size) per layer), which this adapter's decoder carries: a state-space or recurrent LM is "
               "not supported here (the qwen3_5 and lfm3_vl adapters carry Qwen3.5's linear-attention and LFM3's short-"
               "convolution states, for their own classes)")
    param = next(text_model.parameters())
    try:
        with torch.no_grad():
            out = text_model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=param.device), use_cache=True)
    except Exception as e:  # noqa: BLE001 - a model that cannot run one token with a cache cannot be exported
        # its own forward failed: a config that does not fit its weights or its class (Helium with a head size
        # its o_proj does not take), or a cache of another kind; it says which, not vlm-export
        raise AdapterError(f"the language model ({kind}) fails to run one token with a cache in PyTorch "
                           f"({first_line(e)}): check that Hugging Face's own forward runs on this model and config; "
                           "the exported decoder needs a transformer's KV cache (keys and values per layer)") from None
    cache = getattr(out, "cache", None)  # transformers 5's name; 4's below
    cache = getattr(out, "past_key_values", None) if cache is None else cache
    layers = getattr(cache, "layers", None)
    while layers and type(layers[-1]).__name__ == "DummyLayer":
        layers = layers[:-1]
    keys = [getattr(layer, "keys", None) for layer in layers] if layers is not None else []
    if not keys or any(k is None or k.dim() != 4 or k.shape[2] != 1 for k in keys):
        seen = ("no cache" if cache is None
                else f"a {type(cache).__name__} whose layers do not all hold one token's keys")
        raise AdapterError(refusal.format(f"returned {seen}"))
    # a hybrid's layers hold keys AND a state-space or linear-attention state (Falcon-H1's conv_states and
    # recurrent_states): the keys alone pass the check above, and the export would fail deep in the tracer
    states = sorted({name for layer in layers for name, value in vars(layer).items()
                     if name.endswith("_states") and isinstance(value, (dict, list, tuple, torch.Tensor))})
    if states:
        raise AdapterError(refusal.format(f"keeps {', '.join(states)} beside its keys and values (a hybrid of "
                                          f"attention and state-space or linear-attention layers)"))
    values = [getattr(layer, "values", None) for layer in layers]
    if any(v is None or v.shape != k.shape for k, v in zip(keys, values)):
        seen = sorted({tuple(v.shape[1:]) for v in values if v is not None})
        raise AdapterError(f"the language model ({kind}) keeps values of another shape than its keys (keys "
                           f"{tuple(keys[0].shape[1:])}, values {seen or 'none'}: e.g. DeepSeek-V2/V3's multi-head "
                           "latent attention, whose values are narrower): one head size for keys and values is what "
                           "the exported decoder carries; not supported")
    shapes = tuple((int(k.shape[1]), int(k.shape[3])) for k in keys)
    _CACHE_SHAPES[text_model] = shapes
    return shapes


def attention_windows(text_cfg) -> dict:
    """``sliding_window`` and ``windowed_layers`` of a Hugging Face causal-LM config (empty if no layer
    has a window): ``layer_types`` names the windowed layers where the config has it (Qwen2/3 with
    ``use_sliding_window``, Gemma 3's pattern), else ``sliding_window`` applies to every layer
    (Mistral, Phi-3)."""
    window = getattr(text_cfg, "sliding_window", None)
    layer_types = getattr(text_cfg, "layer_types", None)
    if layer_types is None:
        windowed = tuple(range(text_cfg.num_hidden_layers))
    else:
        windowed = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    if not window or not windowed:
        return {}
    return {"sliding_window": int(window), "windowed_layers": windowed}


class LastHiddenState(nn.Module):
    """pixel_values -> a vision tower's last hidden state (what Gemma 3's and PaliGemma's projectors read)."""

    def __init__(self, vision_tower: nn.Module):
        super().__init__()
        self.vision_tower = vision_tower

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_tower(pixel_values=pixel_values, return_dict=True).last_hidden_state


def spliced_stages(loaded: LoadedModel, scheme: SplicedScheme, vision: nn.Module, projector: nn.Module, size: int,
                   text: nn.Module, decoder_cls: type[SplicingDecoder] = SplicingDecoder,
                   **decoder_kwargs) -> list[Stage]:
    """The image path (``vision`` then ``projector`` on ``size`` x ``size`` images) and the spliced decoder over
    ``text``, a text model without its head, and the model's ``lm_head``: LLaVA's, Gemma 3's, PaliGemma's,
    Idefics3's, InternVL's stages. ``decoder_cls`` (with ``decoder_kwargs``) makes a model's own masks."""
    decoder = decoder_cls(text.get_input_embeddings(), text, loaded.model.lm_head, loaded.config.image_token_id,
                          scheme.geometry.num_layers, **decoder_kwargs)
    return [*image_path_stages(vision, projector, (size, size)), spliced_decoder_stage(decoder, scheme)]


def last_hidden_state_stages(loaded: LoadedModel, scheme: SplicedScheme, decoder_cls: type[SplicingDecoder],
                             **decoder_kwargs) -> list[Stage]:
    """The stages of a model whose projector reads its vision tower's last hidden state and whose text model
    (``model.language_model``) takes the spliced embeddings before its head (``lm_head``): Gemma 3's and
    PaliGemma's. ``decoder_cls`` (with ``decoder_kwargs``) makes their masks."""
    m = loaded.model
    return spliced_stages(loaded, scheme, LastHiddenState(m.model.vision_tower), m.model.multi_modal_projector,
                          loaded.config.vision_config.image_size, m.model.language_model, decoder_cls,
                          **decoder_kwargs)


def greedy_reference(model: nn.Module, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     max_new_tokens: int, eos_token_ids: list[int], **inputs) -> list[int]:
    """The original model's own greedy ``generate`` on ``input_ids`` (one row, every token real), its pixels and
    any other ``inputs`` its processor gives (``token_type_ids``): the new tokens."""
    images = {} if pixel_values is None else {"pixel_values": pixel_values}  # None trips HF's generate
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            **images,
            **inputs,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,  # the build decodes one sequence: the reference too, whatever the config says
            eos_token_id=eos_token_ids,
            pad_token_id=eos_token_ids[0],
        )
    return out[0, input_ids.shape[1]:].tolist()


class SplicedLanguageModel:
    """What the adapters of a VLM holding its text model as ``model.language_model`` beside its ``lm_head`` share
    (mixed in before ``VLMAdapter``): the text model's geometry, the original model's own greedy ``generate`` as the
    reference, the LM written alone for the peers."""

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        return text_geometry(loaded.config.text_config, loaded.model.model.language_model)

    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        return greedy_reference(loaded.model, input_ids, pixel_values, max_new_tokens, eos_token_ids)

    def write_text_model(self, loaded: LoadedModel, out: Path) -> Path:
        return save_language_model(loaded, out)


def save_language_model(loaded: LoadedModel, out: Path, text: nn.Module | None = None) -> Path:
    """``VLMAdapter.write_text_model`` for a model that holds its text model without the head (``text``; default
    ``model.language_model``: LLaVA's, Gemma 3's, PaliGemma's, InternVL's; Idefics3's ``model.text_model``) and
    the head beside it (``lm_head``)."""
    m = loaded.model
    return save_causal_lm(loaded.config.text_config, m.model.language_model if text is None else text, m.lm_head,
                          loaded.tokenizer, out, getattr(m, "generation_config", None))


def _traced_spec(name: str, value: torch.Tensor, first_dim: str) -> TensorSpec:
    """A stage output's spec from its example value: dim 0 is named, the rest as measured."""
    return TensorSpec(name, str(value.dtype).removeprefix("torch."), (first_dim, *value.shape[1:]))


def image_path_stages(vision: nn.Module, projector: nn.Module, image_size: tuple[int, int],
                      embeds_name: str = "image_embeds", *, projector_name: str = "projector",
                      projector_inputs: Sequence[tuple[TensorSpec, torch.Tensor]] = (),
                      projector_dim_ranges: dict[str, tuple[int, int, int]] | None = None,
                      projector_follows_default: bool = True) -> list[Stage]:
    """``vision_encoder`` (pixel_values -> image_features) and the projecting stage
    (``projector_name``: image_features, then any ``projector_inputs`` given as (spec, example),
    -> ``embeds_name`` [images, tokens, hidden]), each with a dynamic number of images;
    ``projector_dim_ranges`` bound the extra inputs' own dynamic dims (TensorRT profiles)."""
    gen = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(EXAMPLE_IMAGES, 3, *image_size, generator=gen)
    extra = tuple(value for _, value in projector_inputs)
    with torch.no_grad():
        features = vision.eval()(pixel_values).contiguous()  # a strided view would export sym_stride
        embeds = projector.eval()(features, *extra)
    pixels = TensorSpec("pixel_values", "float32", ("images", 3, *image_size), "pixels")
    feats = _traced_spec("image_features", features, "images")
    vision_spec = StageSpec("vision_encoder", IMAGE, (pixels,), (feats,), IMAGE_PRECISIONS)
    feats_in = TensorSpec(feats.name, feats.dtype, feats.dims, "upstream")
    projector_spec = StageSpec(projector_name, IMAGE, (feats_in, *(spec for spec, _ in projector_inputs)),
                               (_traced_spec(embeds_name, embeds, "images"),), IMAGE_PRECISIONS,
                               projector_dim_ranges or {}, projector_follows_default)
    return [Stage(vision_spec, vision, (pixel_values,)), Stage(projector_spec, projector, (features, *extra))]


def spliced_decoder_stage(module: SplicingDecoder, scheme: SplicedScheme) -> Stage:
    """The decoder stage with example inputs: two rows with a placeholder each, a short past."""
    g = scheme.geometry
    width = getattr(module.embed_tokens, "embedding_dim", g.hidden_size)
    if width != g.hidden_size:
        # e.g. OPT-350m's word_embed_proj_dim: HF's masked_scatter would cut each image embedding into
        # pieces of the token width without an error; there is no right answer to export
        raise AdapterError(
            f"the language model's token embeddings are {width} wide but its hidden size (the image "
            f"embeddings' width) is {g.hidden_size}: image embeddings cannot replace token embeddings in this "
            "model (an LM with projected word embeddings, such as OPT-350m's word_embed_proj_dim)")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(g.vocab_size, 1000), (EXAMPLE_BATCH, EXAMPLE_SEQ), generator=gen)
    ids[ids == scheme.image_token_id] = 0
    ids[0, 1] = ids[1, 2] = scheme.image_token_id  # two placeholders -> two rows of image_embeds
    total = EXAMPLE_PAST + EXAMPLE_SEQ
    past = [torch.randn(EXAMPLE_BATCH, heads, EXAMPLE_PAST, size, generator=gen) for heads, size in layer_kv_shapes(g)]
    past += [torch.randn(EXAMPLE_BATCH, *state.shape, generator=gen) for state in g.states]  # a hybrid's other layers
    spec = scheme.decoder_spec(DECODER_PRECISIONS)
    positions = torch.arange(EXAMPLE_PAST, total).repeat(EXAMPLE_BATCH, 1)
    streams = next(t.dims for t in spec.inputs if t.name == "position_ids")[:-2]  # M-RoPE's three (contract/mrope.py)
    example = (ids, torch.randn(2, scheme.image_row_width, generator=gen),
               torch.ones(EXAMPLE_BATCH, total, dtype=torch.int64),
               positions.expand(*streams, -1, -1).clone(), *past)
    return Stage(spec, module, example,
                 export_context=lambda: base_rope_frequencies(module.text_model))


@contextlib.contextmanager
def base_rope_frequencies(text_model: nn.Module):
    """Dynamic-NTK rotary embeddings (``rope_type`` "dynamic") recompute their frequencies only once a
    sequence grows past ``max_position_embeddings``, a branch on the positions' values that torch.export
    cannot trace. A build's ``max_sequence`` never exceeds that length, where they use their base
    frequencies, so they are exported as plain rotary embeddings: exact within the build's limits."""
    changed = []
    for module in text_model.modules():
        kind = getattr(module, "rope_type", None)
        if isinstance(kind, str) and "dynamic" in kind:
            changed.append((module, kind))
            module.rope_type = "default"
        elif isinstance(kind, dict) and any(isinstance(v, str) and "dynamic" in v for v in kind.values()):
            changed.append((module, kind))  # per layer type (Gemma 3): each dynamic one, the same way
            module.rope_type = {k: "default" if isinstance(v, str) and "dynamic" in v else v for k, v in kind.items()}
    try:
        yield
    finally:
        for module, kind in changed:
            module.rope_type = kind
