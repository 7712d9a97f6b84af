"""Qwen2-VL and Qwen2.5-VL: ``Qwen2VLForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration``.

The image processor cuts an image into as many ``patch x patch`` patches as its size needs (between its
``min_pixels`` and ``max_pixels``), each ``merge x merge`` block of them one image token
(``PromptLayout.image_tiles`` as :class:`~vlm_export.contract.ImagePatches`); the image path reads one row
of patches per image with each patch's place (``patch_positions``) and realness (``patch_mask``), so images
of different sizes share one batch. Hugging Face's vision tower runs all images as one flat sequence whose
attention is cut per image (and per window of patches in Qwen2.5-VL's windowed blocks) by lengths read off
the grids at run time, which an exported graph cannot do: :class:`PatchVisionTower` computes the same
blocks from the tower's own modules on the padded rows, a patch attending to the real patches of its image
(a mask) - in a windowed block, to those of its window, gathered into slots of one window each - and its
rotary from the places given, equal to Hugging Face's. The merger is the projector.

The LM reads multimodal rotary positions (M-RoPE: frame, row and column streams): the ``spliced_mrope``
scheme makes them from each image row's place, as ``get_rope_index`` does; for text alone the three
streams are equal, so the text model is an ordinary Qwen2 LM (``write_text_model``). Video inputs are not
supported.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..contract import IMAGE, IMAGE_PRECISIONS, DecoderGeometry, ImagePatches, PromptLayout, StageSpec, TensorSpec
from ..contract.layout import PATCH_MASK, PATCH_POSITIONS, PATCH_SLOTS, WINDOW_PATCHES
from ..contract.mrope import MRopeSplicedScheme
from ..contract.patches import PatchRowsScheme
from ..errors import AdapterError
from . import model_class_by_type, register
from .base import LoadedModel, Stage, VLMAdapter, chat_template_takes_parts, save_causal_lm, use_saved_chat_template
from .decoder import SplicingDecoder, spliced_decoder_stage, text_geometry
from .loading import load_hf_parts


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def image_attention_mask(patch_mask: torch.Tensor) -> torch.Tensor:
    """[images, 1, 1, patches], additive: a patch attends to the real patches of its own image (row) alone - the
    attention Hugging Face cuts per image by lengths read at run time."""
    return torch.where(patch_mask.bool()[:, None, None, :], 0.0, torch.finfo(torch.float32).min)


def masked_attention(q, k, v, mask, scaling: float) -> torch.Tensor:
    """A vision tower's attention on rows of patches: q, k, v [images, heads, patches, head size], every patch
    attending where ``mask`` (additive) lets it -> [images, patches, heads x head size], before the output
    projection."""
    weights = torch.softmax(q @ k.transpose(-1, -2) * scaling + mask, dim=-1)
    return (weights @ v).transpose(1, 2).flatten(2)


def rotary_attention(q, k, v, cos, sin, mask, scaling: float) -> torch.Tensor:
    """:func:`masked_attention` with q and k turned by the rotary's (cos, sin) first."""
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    return masked_attention(q, k, v, mask, scaling)


def separate_heads(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(q, k, v) [images, heads, patches, head size] of an attention with q, k and v projected apart (SigLIP's,
    Pixtral's) on x [images, patches, width]."""
    images, patches, _ = x.shape
    return tuple(proj(x).reshape(images, patches, attn.num_heads, attn.head_dim).transpose(1, 2)
                 for proj in (attn.q_proj, attn.k_proj, attn.v_proj))


class PatchVisionTower(nn.Module):
    """(pixel_values [images, patches, channels x frames x patch x patch], patch_positions [images, patches, 2],
    patch_mask [images, patches], and where the tower attends in windows window_patches [images, slots] and
    patch_slots [images, patches]: ``contract.ImagePatches``) -> the tower's last hidden state [images, patches,
    width], block by block as Hugging Face's vision blocks compute it. ``window``: patches per side of a
    Qwen2.5-VL attention window (None: every block sees the whole image); ``full_blocks``: the blocks that see
    the whole image anyway. A windowed block gathers each window's patches into ``window²`` slots, attends within
    them (empty slots masked) and puts the results back: the attention Hugging Face computes per window, in
    memory and time that grow with the windows, not the square of the image. ``kept_blocks``: blocks whose
    outputs are returned too, after the last hidden state along its width (Qwen3-VL's deepstack features)."""

    def __init__(self, tower: nn.Module, window: int | None = None, full_blocks: tuple[int, ...] = (),
                 kept_blocks: tuple[int, ...] = ()):
        super().__init__()
        self.tower, self.window, self.full_blocks = tower, window, frozenset(full_blocks)
        self.kept_blocks = tuple(kept_blocks)

    def embed(self, pixel_values, patch_positions, patch_mask):
        """The patches' embeddings before the first block."""
        # the patch embedding's Conv3d covers each patch whole (kernel = stride = the patch): a matmul with its
        # weights flattened as the processor flattens a patch (channels, frames, rows, columns). (torch.onnx
        # gave the Conv3d here a bias of the wrong shape, which ONNX Runtime refuses.)
        conv = self.tower.patch_embed.proj
        return nn.functional.linear(pixel_values, conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)

    def forward(self, pixel_values, patch_positions, patch_mask, *windows):
        tower = self.tower
        hidden = self.embed(pixel_values, patch_positions, patch_mask)
        lowest = torch.finfo(torch.float32).min
        whole = (self._angles(patch_positions), image_attention_mask(patch_mask))
        if self.window is not None:
            window_patches, patch_slots = windows
            slots = window_patches.clamp(min=0)  # an empty slot reads patch 0, masked
            size = self.window * self.window
            empty = torch.where((window_patches >= 0).reshape(-1, 1, 1, size), 0.0, lowest)
            places = torch.gather(patch_positions, 1, slots.unsqueeze(-1).expand(-1, -1, 2))
            cos, sin = self._angles(places)
            per_window = ((cos.reshape(-1, 1, size, cos.shape[-1]), sin.reshape(-1, 1, size, sin.shape[-1])), empty)
        kept = {}
        for number, block in enumerate(tower.blocks):
            x = block.norm1(hidden)
            if self.window is None or number in self.full_blocks:
                out = self._attention(block.attn, x, *whole)
            else:  # norm1 and proj act per patch: gathered after the one, put back after the other
                width = x.shape[-1]
                grouped = torch.gather(x, 1, slots.unsqueeze(-1).expand(-1, -1, width)).reshape(-1, size, width)
                out = self._attention(block.attn, grouped, *per_window).reshape(x.shape[0], -1, width)
                out = torch.gather(out, 1, patch_slots.unsqueeze(-1).expand(-1, -1, width))
            hidden = hidden + out
            hidden = hidden + block.mlp(block.norm2(hidden))
            kept[number] = hidden
        return torch.cat([hidden, *(kept[k] for k in self.kept_blocks)], dim=-1) if self.kept_blocks else hidden

    @property
    def rotary(self) -> nn.Module:
        """The tower's axial rotary (its ``inv_freq``)."""
        return self.tower.rotary_pos_emb

    def _angles(self, places):
        """(cos, sin) [images, 1, patches, head size] of the tower's axial rotary at ``places``: (row, column)
        frequencies side by side, twice (Hugging Face's VisionRotaryEmbedding over the positions it computes)."""
        freqs = (places.unsqueeze(-1).float() * self.rotary.inv_freq).flatten(-2)
        angles = torch.cat([freqs, freqs], dim=-1).unsqueeze(1)
        return angles.cos(), angles.sin()

    @staticmethod
    def _attention(attn: nn.Module, x, rotary, mask):
        images, patches, _ = x.shape
        kv_heads = getattr(attn, "num_key_value_heads", attn.num_heads)
        if kv_heads == attn.num_heads:
            qkv = attn.qkv(x).reshape(images, patches, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]  # [images, heads, patches, head size]
        else:  # grouped-query (EXAONE 4.5's tower): q, then fewer K/V heads, each shared by a group of q heads
            width = kv_heads * attn.head_dim
            q, k, v = attn.qkv(x).split([attn.num_heads * attn.head_dim, width, width], dim=-1)
            q, k, v = (t.reshape(images, patches, -1, attn.head_dim).transpose(1, 2) for t in (q, k, v))
            k, v = (t.repeat_interleave(attn.num_heads // kv_heads, dim=1) for t in (k, v))
        if getattr(attn, "q_norm", None) is not None:  # per-head norms before the rotary (GLM-OCR's)
            q, k = attn.q_norm(q), attn.k_norm(k)
        return attn.proj(rotary_attention(q, k, v, *rotary, mask, attn.scaling))


class PatchMergerProjector(nn.Module):
    """The tower's merger: image_features [images, patches, width] -> image_embeds [images, patches / merge², hidden]
    (each merge x merge block of consecutive patches one row)."""

    def __init__(self, merger: nn.Module, hidden_size: int):
        super().__init__()
        self.merger, self.hidden_size = merger, hidden_size

    def forward(self, image_features):
        images, patches, width = image_features.shape
        return self.merger(image_features.reshape(images * patches, width)).reshape(images, -1, self.hidden_size)


class BlockMergeProjector(nn.Module):
    """image_features [images, patches, width] -> image_embeds [images, patches / block, hidden]: a projector that norms
    each patch (its module ``norm`` names), joins each merge block's ``block`` consecutive patches into one row (row
    in block, column in block, channel: the order Hugging Face reshapes them into) and runs its MLP (the modules
    ``mlp`` names, in order): PaddleOCR-VL's, LFM3-VL's, LLaVA-OneVision-1.5's."""

    def __init__(self, projector: nn.Module, norm: str, block: int,
                 mlp: tuple[str, ...] = ("linear_1", "act", "linear_2")):
        super().__init__()
        self.projector, self.norm, self.block, self.mlp = projector, norm, block, mlp

    def forward(self, image_features):
        p = self.projector
        images, _, width = image_features.shape
        rows = getattr(p, self.norm)(image_features).reshape(images, -1, self.block * width)
        for name in self.mlp:
            rows = getattr(p, name)(rows)
        return rows


def patch_grids(pixel_values: dict) -> list[tuple[int, int]]:
    """Each image's grid of patches (rows, columns), read back from the image path's rows of patches (the real ones'
    largest places): what a Hugging Face reference gives the model beside them."""
    real, places = pixel_values[PATCH_MASK].bool(), pixel_values[PATCH_POSITIONS]
    return [(int(places[k][real[k]][:, 0].max()) + 1, int(places[k][real[k]][:, 1].max()) + 1)
            for k in range(len(real))]


def raster_pixels(pixel_values: dict) -> torch.Tensor:
    """[patches of all images, depth]: every image's real patches row-major over the image, as a processor that gives
    them so gives them (``ImagePatches.raster``), back from the image path's rows of patches."""
    out = []
    for k, (h, w) in enumerate(patch_grids(pixel_values)):
        places = pixel_values[PATCH_POSITIONS][k, :h * w]
        raster = torch.empty_like(pixel_values["pixel_values"][k, :h * w])
        raster[places[:, 0] * w + places[:, 1]] = pixel_values["pixel_values"][k, :h * w]
        out.append(raster)
    return torch.cat(out)


def image_grid_sizes(patch_positions: torch.Tensor, patch_mask: torch.Tensor) -> torch.Tensor:
    """[images, 1, (rows, columns)]: each image's grid of patches in the graph, read off its own row of patches (its
    last real patch's row and column, plus one; padding sits at (0, 0)) - ``patch_grids``' twin for the exported
    towers that resample a position grid to each image."""
    return torch.where(patch_mask.bool().unsqueeze(-1), patch_positions, 0).amax(dim=1, keepdim=True) + 1


def patch_row_stages(tower: nn.Module, projector: nn.Module, patches: ImagePatches, processed: dict,
                     pooled: int = 1) -> list[Stage]:
    """The vision encoder (rows of patches, ``contract.ImagePatches``, with their places, mask and any windows ->
    image_features) and the projector (-> image_embeds, a row per merge block) of an image path that reads each image
    as a row of patches; their examples arranged from ``processed``, images as the processor gives them (padded to
    the larger: every dynamic dim >= 2). ``pooled``: patches per row of the tower's output where the tower itself
    merges them (MiniCPM-V's window merger: 4), a dim of its own (``pooled_patches``), so that the projector's
    profiles and ONNX Runtime's buffer planning see its real size."""
    arranged = patches.arranged(processed)
    names = ["pixel_values", PATCH_POSITIONS, PATCH_MASK] + ([WINDOW_PATCHES, PATCH_SLOTS] if patches.window else [])
    example = tuple(torch.from_numpy(arranged[n]) for n in names)
    with torch.no_grad():
        features = tower.eval()(*example)
        embeds = projector.eval()(features)
    ranges = {"patches": (patches.merge ** 2, min(256, patches.max_patches), patches.max_patches)}
    inputs = [TensorSpec("pixel_values", "float32", ("images", "patches", example[0].shape[-1]), "pixels"),
              TensorSpec(PATCH_POSITIONS, "int64", ("images", "patches", 2), "pixels"),
              TensorSpec(PATCH_MASK, "int64", ("images", "patches"), "pixels")]
    if patches.window:
        slots = patches.window ** 2
        ranges["window_slots"] = (slots, min(4 * slots, patches.max_window_slots), patches.max_window_slots)
        inputs += [TensorSpec(WINDOW_PATCHES, "int64", ("images", "window_slots"), "pixels"),
                   TensorSpec(PATCH_SLOTS, "int64", ("images", "patches"), "pixels")]
    rows = "patches" if pooled == 1 else "pooled_patches"
    features_spec = TensorSpec("image_features", "float32", ("images", rows, features.shape[-1]))
    vision_spec = StageSpec("vision_encoder", IMAGE, tuple(inputs), (features_spec,), IMAGE_PRECISIONS, ranges)
    projector_spec = StageSpec(
        "projector", IMAGE, (TensorSpec(features_spec.name, "float32", features_spec.dims, "upstream"),),
        (TensorSpec("image_embeds", "float32", ("images", "image_tokens_per_image", embeds.shape[-1])),),
        IMAGE_PRECISIONS, {rows: tuple(n // pooled for n in ranges["patches"])})
    return [Stage(vision_spec, tower, example), Stage(projector_spec, projector, (features,))]


@register
class Qwen2VLAdapter(VLMAdapter):
    name = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    description = ("Hugging Face Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration (a ViT on "
                   "patches of any image size + patch merger + a Qwen2 LM with multimodal rotary positions)")

    #: each model type's Hugging Face class, and the config of its LM alone (``write_text_model``)
    model_classes = {"qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2Config"),
                     "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2Config")}

    def load(self, path: Path) -> LoadedModel:
        path = Path(path)
        classes = {kind: model for kind, (model, _) in self.model_classes.items()}
        model, tokenizer, image_processor = load_hf_parts(model_class_by_type(path, self.name, classes), path)
        cfg = model.config
        loaded = LoadedModel(self, path, model, tokenizer, image_processor, cfg)
        use_saved_chat_template(tokenizer, path)  # the processor's (typed parts), not the tokenizer's text-only one
        vision = cfg.vision_config
        for name, want in (("patch_size", vision.patch_size), ("merge_size", vision.spatial_merge_size),
                           ("temporal_patch_size", self._frames_per_patch(loaded))):
            have = getattr(image_processor, name, None)
            if have != want:
                raise AdapterError(f"the image processor in {path} ({type(image_processor).__name__}) has {name} "
                                   f"{have} but the vision tower takes {want}: save the model's own image "
                                   "processor beside it")
        token = self._image_token(loaded)
        if tokenizer.convert_tokens_to_ids(token) != cfg.image_token_id:
            raise AdapterError(f"the tokenizer in {path} makes {token} the id {tokenizer.convert_tokens_to_ids(token)} "
                               f"but the model's config says image_token_id {cfg.image_token_id}: save the model's "
                               "own tokenizer beside it")
        self._patches(loaded)  # its pixel limits must make at least one token
        return loaded

    #: the token the chat template writes per image where the tokenizer names none (Qwen2VLProcessor's default)
    default_image_token = "<|image_pad|>"

    def _image_token(self, loaded: LoadedModel) -> str:
        """The token the chat template writes per image, as the processor reads it (the tokenizer's, else the
        family's default)."""
        return getattr(loaded.tokenizer, "image_token", None) or self.default_image_token

    @staticmethod
    def _frames_per_patch(loaded: LoadedModel) -> int:
        """Frames in one patch (a still image repeated to them): the tower's ``temporal_patch_size``, else one."""
        return int(getattr(loaded.config.vision_config, "temporal_patch_size", 1))

    #: whether the image processor gives each image's patches row-major (``ImagePatches.raster``)
    raster_patches = False

    @staticmethod
    def _largest_image_pixels(loaded: LoadedModel, largest: int) -> int:
        """The most pixels of an image the processor makes, from its ``longest_edge`` (``max_pixels``) setting."""
        return largest

    def _patches(self, loaded: LoadedModel) -> ImagePatches:
        """The image processor's patches: most per image from its largest image (``max_pixels``)."""
        processor, vision = loaded.image_processor, loaded.config.vision_config
        size = getattr(processor, "size", None) or {}
        largest = size.get("longest_edge") or getattr(processor, "max_pixels", None)
        if not largest:
            raise AdapterError(f"the image processor in {loaded.path} sets no largest image (size.longest_edge / "
                               f"max_pixels): save the model's own {type(processor).__name__} beside it")
        largest = self._largest_image_pixels(loaded, int(largest))
        merge = int(vision.spatial_merge_size)
        most = largest // int(vision.patch_size) ** 2 // merge ** 2 * merge ** 2
        if most < merge ** 2:
            raise AdapterError(f"the image processor in {loaded.path} allows images of at most {largest} pixels, less "
                               f"than one image token ({merge * vision.patch_size} pixels square): raise max_pixels")
        return ImagePatches(merge=merge, max_patches=most, window=Qwen2VLAdapter._window(loaded)[0] or 0,
                            raster=self.raster_patches)

    @staticmethod
    def _window(loaded: LoadedModel) -> tuple[int | None, tuple[int, ...]]:
        """(patches per side of an attention window, the blocks that see the whole image): Qwen2.5-VL's
        windows of ``window_size`` pixels over merge blocks; (None, ()) for Qwen2-VL's whole-image blocks."""
        vision = loaded.config.vision_config
        if getattr(vision, "window_size", None) is None:
            return None, ()
        merge = int(vision.spatial_merge_size)
        return (int(vision.window_size) // merge // int(vision.patch_size) * merge,
                tuple(int(i) for i in vision.fullatt_block_indexes))

    def vision_modules(self, loaded: LoadedModel) -> tuple[nn.Module, nn.Module]:
        """(the vision tower on rows of patches, the projector on its output)."""
        visual = loaded.model.model.visual
        return (PatchVisionTower(visual, *self._window(loaded)),
                PatchMergerProjector(visual.merger, loaded.config.text_config.hidden_size))

    def decoder(self, loaded: LoadedModel, scheme: MRopeSplicedScheme) -> SplicingDecoder:
        text = loaded.model.model.language_model
        return SplicingDecoder(text.get_input_embeddings(), text, loaded.model.lm_head, loaded.config.image_token_id,
                               scheme.geometry.num_layers)

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        patches = self._patches(loaded)
        tower, projector = self.vision_modules(loaded)
        # two images as the processor gives them: a grid of 4 x 4 merge blocks and one of 2 x 4
        vision = loaded.config.vision_config
        channels = getattr(vision, "in_channels", None) or vision.num_channels
        depth = channels * self._frames_per_patch(loaded) * vision.patch_size ** 2
        grids = [(2 * patches.merge, 2 * patches.merge), (patches.merge, 2 * patches.merge)]
        flat = torch.randn(sum(h * w for h, w in grids), depth, generator=torch.Generator().manual_seed(0))
        scheme = self.scheme(loaded)
        return [*patch_row_stages(tower, projector, patches, {"pixel_values": flat.numpy(),
                                                              "image_grid_thw": [[1, h, w] for h, w in grids]}),
                spliced_decoder_stage(self.decoder(loaded, scheme), scheme)]

    #: whether the LM reads multimodal rotary positions (M-RoPE: the ``spliced_mrope`` scheme); else one stream of
    #: positions, as for text (``spliced_patches``: each image's real rows in order; LFM3-VL, EXAONE 4.5)
    multimodal_positions = True

    def scheme(self, loaded: LoadedModel) -> PatchRowsScheme:
        scheme = MRopeSplicedScheme if self.multimodal_positions else PatchRowsScheme
        return scheme(self.geometry(loaded), loaded.config.image_token_id,
                      int(loaded.config.vision_config.spatial_merge_size))

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        patches = self._patches(loaded)
        token = self._image_token(loaded)
        # the chat template writes "<|vision_start|><|image_pad|><|vision_end|>" per image part; Qwen2VLProcessor
        # puts one image token per merge block in place of each image token (a raw prompt's too)
        return PromptLayout(kind="inline", image_token_id=loaded.config.image_token_id,
                            tokens_per_image=patches.most_tokens(), image_token=token,
                            chat_parts=chat_template_takes_parts(loaded.tokenizer, token),
                            images_where_written=True, image_tiles=patches)

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        return text_geometry(loaded.config.text_config, loaded.model.model.language_model)

    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        """HF generate on our prompt ids with the processor's own inputs: the flat patches of every image and
        their grids, rebuilt from the image path's rows of patches (its real ones, in order), and, for M-RoPE, the
        image tokens' ``mm_token_type_ids``."""
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if pixel_values is not None:
            grids = [[1, h, w] for h, w in patch_grids(pixel_values)]
            inputs.update(pixel_values=self._reference_pixels(loaded, pixel_values),
                          image_grid_thw=torch.tensor(grids))
            if self.multimodal_positions:  # which tokens are an image's (without it generate drops M-RoPE silently)
                inputs["mm_token_type_ids"] = (input_ids == loaded.config.image_token_id).to(torch.int32)
        with torch.no_grad():
            out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                        eos_token_id=eos_token_ids, pad_token_id=eos_token_ids[0])
        return out[0, input_ids.shape[1]:].tolist()

    def _reference_pixels(self, loaded: LoadedModel, pixel_values: dict) -> torch.Tensor:
        """The processor's own flat patches back from the rows of patches (their real ones, in order)."""
        return pixel_values["pixel_values"][pixel_values[PATCH_MASK].bool()]

    #: settings the LM alone needs beyond its text config, by model type
    text_lm_settings: dict[str, dict] = {}
    #: parts of parameter names the LM alone's class calls otherwise (``save_causal_lm``'s ``renamed``)
    text_lm_renamed: dict[str, str] = {}

    def _text_lm_settings(self, loaded: LoadedModel) -> dict:
        return self.text_lm_settings.get(loaded.config.model_type, {})

    def write_text_model(self, loaded: LoadedModel, out: Path) -> Path:
        """The LM as a plain causal LM (Qwen2's; Qwen3-VL's a Qwen3 or Qwen3-MoE): for text alone M-RoPE's three
        streams are one, the plain rotary."""
        import transformers

        text = loaded.config.text_config.to_dict()
        rope = {k: v for k, v in (text.get("rope_parameters") or {}).items()
                if k not in ("mrope_section", "mrope_interleaved", "type")}
        keep = {k: v for k, v in text.items() if k not in ("model_type", "architectures", "rope_parameters",
                                                            "rope_scaling", "transformers_version")}
        text_config_class = self.model_classes[loaded.config.model_type][1]
        keep.update(self._text_lm_settings(loaded))
        config = getattr(transformers, text_config_class)(**keep, rope_parameters=rope or None)
        m = loaded.model
        return save_causal_lm(config, m.model.language_model, m.lm_head, loaded.tokenizer, out,
                              getattr(m, "generation_config", None), renamed=self.text_lm_renamed)
