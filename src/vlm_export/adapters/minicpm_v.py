"""MiniCPM-V 4.6 and MiniCPM-OCR: ``MiniCPMV4_6ForConditionalGeneration`` and ``MiniCPMOcrForConditionalGeneration``
(the same classes under two names; MiniCPM-OCR keeps four times as many image tokens by default).

The image processor gives each image as an overview and, where it is larger than the tower's area, a grid of equal
slices, each a grid of patches of its own size (``contract.ImageSlices``); the image path reads one row of patches per
slice. The tower is SigLIP's layers on them, each patch's position looked up nearest on the learned position table
(Hugging Face's ``get_vision_nearest_position_ids``, here from each patch's place and its slice's grid in the graph),
attention masked to the slice's real patches. In its "16x" mode a window-attention merger follows vision layer
``insert_layer_id``: each 2 x 2 window of patches attends within itself and becomes one token (its four joined, an
MLP, plus their mean); the remaining layers see the merged slice. The projector (``merger``) joins each 2 x 2 block of
the tower's tokens and projects them into the LM: 16 patches per image token ("4x": the merge MLP alone, 4). Patches
come in an order where both merges read consecutive rows (``ImageSlices.patch_positions``), so the graph needs no
gather.

The LM is Qwen3.5's hybrid (``adapters/qwen3_5.py``: gated delta-nets around gated full attention) with plain
positions (the model gives none but the text's), so the scheme is ``spliced_patches`` (each slice's real rows, in
order). MiniCPM-V 4.7 (``MiniCPMV4_7ForConditionalGeneration``, :class:`MiniCPMV4_7Adapter`) has the same image path
and LM and places every crop of an image, and the markers around them, on one canvas of multimodal rotary positions:
the ``spliced_mrope_canvas`` scheme (``contract/canvas.py``). Video inputs are not supported.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..contract import DecoderGeometry, ImageSlices, PromptLayout
from ..contract.canvas import MARKERS, CanvasMRopeScheme
from ..contract.layout import PATCH_MASK, PATCH_POSITIONS
from ..contract.patches import PatchRowsScheme
from ..errors import AdapterError
from ..runtime.images import MAX_ASPECT_RATIO
from . import model_class_by_type, register
from .base import LoadedModel, Stage, chat_template_takes_parts, processor_setting, use_saved_chat_template
from .decoder import SplicingDecoder, spliced_decoder_stage
from .loading import load_hf_parts
from .qwen2_vl import Qwen2VLAdapter, image_attention_mask, image_grid_sizes, masked_attention, patch_grids, \
    patch_row_stages, separate_heads
from .qwen3_5 import delta_net_decoder, delta_net_geometry

#: the tokenizer's names of the text around an image, as the processor reads them
SLICE_TOKENS = ("image_start_token", "image_end_token", "slice_start_token", "slice_end_token",
                "image_id_start_token", "image_id_end_token")


class SliceTower(nn.Module):
    """(pixel_values [slices, patches, channels x patch x patch], patch_positions [slices, patches, 2], patch_mask
    [slices, patches]: ``contract.ImageSlices``) -> the tower's last hidden state [slices, patches / 4 (after a window
    merger) or patches, width], layer by layer as Hugging Face's ``MiniCPMV4_6VisionModel`` computes it.
    ``merge_after``: the layer after which the window-attention merger runs (None: none, the "4x" mode)."""

    def __init__(self, tower: nn.Module, merge_after: int | None):
        super().__init__()
        self.tower, self.merge_after = tower, merge_after
        # the position table's bucket edges, made eagerly as Hugging Face makes them (a float arange, whose length
        # rounding decides: 3 edges for a side of 3), so the graph holds them as a constant (traced, the arange's
        # length was worked out exactly - 2 - and ONNX shape inference then disagreed with the graph)
        side = tower.embeddings.num_patches_per_side
        self.register_buffer("edges", torch.arange(1 / side, 1.0, 1 / side), persistent=False)

    def forward(self, pixel_values, patch_positions, patch_mask):
        tower = self.tower
        # the patch embedding's Conv2d covers each patch whole (kernel = stride = the patch): a matmul with its
        # weights flattened as the patches are (channels, rows, columns)
        conv = tower.embeddings.patch_embedding
        hidden = nn.functional.linear(pixel_values, conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)
        hidden = hidden + tower.embeddings.position_embedding(self._position_ids(patch_positions, patch_mask))
        mask = image_attention_mask(patch_mask)
        for number, layer in enumerate(tower.encoder.layers):
            x = layer.layer_norm1(hidden)
            attn = layer.self_attn
            hidden = hidden + attn.out_proj(masked_attention(*separate_heads(attn, x), mask, attn.scaling))
            hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
            if number == self.merge_after:
                hidden = self._window_merge(tower.vit_merger, hidden)
                mask = image_attention_mask(patch_mask[:, ::4])  # a window is real where its first patch is
        return tower.post_layernorm(hidden)

    def _position_ids(self, patch_positions, patch_mask):
        """Each patch's row of the position table: its place over its slice's grid, as a fraction, bucketed on the
        table's side (``get_vision_nearest_position_ids``: the same float32 fractions and bucket edges)."""
        side = self.tower.embeddings.num_patches_per_side
        grid = image_grid_sizes(patch_positions, patch_mask)  # [slices, 1, (rows, columns)]
        fractions = patch_positions.to(torch.float32) / grid.to(torch.float32)
        buckets = (fractions.unsqueeze(-1) >= self.edges).sum(dim=-1)  # bucketize(right=True): the edges passed
        return buckets[..., 0] * side + buckets[..., 1]

    @staticmethod
    def _window_merge(merger: nn.Module, hidden):
        """Hugging Face's ``MiniCPMV4_6ViTWindowAttentionMerger`` on windows of four consecutive patches."""
        slices, patches, width = hidden.shape
        windows = hidden.reshape(slices * patches // 4, 4, width)
        attn = merger.self_attn
        q, k, v = separate_heads(attn, merger.layer_norm1(windows))
        windows = windows + attn.out_proj(masked_attention(q, k, v, 0.0, attn.scaling))  # all four real, or none
        joined = merger.linear_2(merger.act(merger.linear_1(merger.pre_norm(windows.flatten(1)))))
        return (joined + windows.mean(dim=1)).reshape(slices, patches // 4, width)


class JoinedBlockProjector(nn.Module):
    """image_features [slices, tokens, width] -> image_embeds [slices, tokens / 4, hidden]: each 2 x 2 block of
    consecutive tokens joined (row in block, column in block, channel) and run through the merge MLP, which norms the
    joined vector (Hugging Face's ``MiniCPMV4_6Merger`` with one merge round)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, image_features):
        slices, tokens, width = image_features.shape
        return self.mlp(image_features.reshape(slices, tokens // 4, 4 * width)).reshape(slices, tokens // 4, -1)


@register
class MiniCPMV4_6Adapter(Qwen2VLAdapter):
    name = "minicpm_v"
    model_types = ("minicpmv4_6", "minicpm_ocr")
    model_classes = {"minicpmv4_6": ("MiniCPMV4_6ForConditionalGeneration", "Qwen3_5TextConfig"),
                     "minicpm_ocr": ("MiniCPMOcrForConditionalGeneration", "Qwen3_5TextConfig")}
    description = ("Hugging Face MiniCPMV4_6ForConditionalGeneration / MiniCPMOcrForConditionalGeneration (an image "
                   "as an overview and slices of any size, a SigLIP tower with a window-attention merger, a 2 x 2 "
                   "merge MLP, and Qwen3.5's hybrid LM of gated delta-nets and gated attention)")

    def load(self, path: Path) -> LoadedModel:
        from transformers import AutoConfig

        path = Path(path)
        classes = {kind: model for kind, (model, _) in self.model_classes.items()}
        model_cls = model_class_by_type(path, self.name, classes)
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception:  # noqa: BLE001 - load_hf_parts below says what is wrong with the folder
            config = None
        if config is not None:
            self._check_config(config, path)  # before the weights load (their shapes follow it)
        model, tokenizer, image_processor = load_hf_parts(model_cls, path)
        cfg = model.config
        loaded = LoadedModel(self, path, model, tokenizer, image_processor, cfg)
        use_saved_chat_template(tokenizer, path)
        for name, have, want in (("patch_size", getattr(image_processor, "patch_size", None),
                                  cfg.vision_config.patch_size),
                                 ("downsample_mode", getattr(image_processor, "downsample_mode", None),
                                  cfg.downsample_mode)):
            if have != want:
                raise AdapterError(f"the image processor in {path} ({type(image_processor).__name__}) has {name} "
                                   f"{have} but the model takes {want}: save the model's own image processor beside it")
        missing = [name for name in ("image_token", *SLICE_TOKENS) if not getattr(tokenizer, name, None)]
        if missing:
            raise AdapterError(f"the tokenizer in {path} names no {', '.join(missing)} (MiniCPMV4_6Processor writes "
                               "images with them): save the model's own tokenizer beside it")
        if tokenizer.convert_tokens_to_ids(tokenizer.image_token) != cfg.image_token_id:
            raise AdapterError(f"the tokenizer in {path} makes {tokenizer.image_token} the id "
                               f"{tokenizer.convert_tokens_to_ids(tokenizer.image_token)} but the model's config says "
                               f"image_token_id {cfg.image_token_id}: save the model's own tokenizer beside it")
        self._slices(loaded)
        return loaded

    @staticmethod
    def _check_config(cfg, path: Path) -> None:
        """AdapterError where the model merges its image tokens in a way the split does not take."""
        if tuple(cfg.merge_kernel_size) != (2, 2) or int(cfg.merger_times) != 1 \
                or tuple(cfg.vision_config.window_kernel_size) != (2, 2):
            raise AdapterError(f"{path} merges image tokens with merge_kernel_size {list(cfg.merge_kernel_size)}, "
                               f"merger_times {cfg.merger_times} and window_kernel_size "
                               f"{list(cfg.vision_config.window_kernel_size)}; vlm-export takes 2 x 2 merges, one merge "
                               "round: not supported")
        if cfg.downsample_mode not in ("16x", "4x"):
            raise AdapterError(f"{path} sets downsample_mode {cfg.downsample_mode!r}: the model takes '16x' or '4x'")
        layers = int(cfg.vision_config.num_hidden_layers)
        if cfg.downsample_mode == "16x" and not 0 <= int(cfg.insert_layer_id) < layers:
            raise AdapterError(f"{path} merges windows after vision layer {cfg.insert_layer_id} of {layers}: the "
                               "model's image tokens would not match its grids; set insert_layer_id to a layer")

    @staticmethod
    def _merge(loaded: LoadedModel) -> int:
        """Patches per side of one image token's block: 4 where the window merger runs, else 2."""
        return 4 if loaded.config.downsample_mode == "16x" else 2

    def _slices(self, loaded: LoadedModel) -> ImageSlices:
        processor, tokenizer = loaded.image_processor, loaded.tokenizer
        numbered = processor_setting(loaded.path, "use_image_id")
        numbered = processor.use_image_id if numbered is None else numbered
        return ImageSlices(
            merge=self._merge(loaded), max_patches=self._most_patches(loaded),
            max_slices=int(processor.max_slice_nums) if processor.slice_mode else 0, patch=int(processor.patch_size),
            start=tokenizer.image_start_token, end=tokenizer.image_end_token, slice_start=tokenizer.slice_start_token,
            slice_end=tokenizer.slice_end_token,
            numbered=f"{tokenizer.image_id_start_token}{{index}}{tokenizer.image_id_end_token}" if numbered else "")

    @staticmethod
    def _most_patches(loaded: LoadedModel) -> int:
        """The most patches of one slice the image processor makes: its own ``find_best_resize`` over every aspect it
        may see (overviews and slices alike are resized to about ``scale_resolution``² pixels at their aspect), at
        each aspect where its rounded height steps and on a fine grid between."""
        processor = loaded.image_processor
        side, patch = int(processor.scale_resolution), int(processor.patch_size)
        tallest = int(side * MAX_ASPECT_RATIO ** 0.5) + 2
        aspects = np.concatenate([(side / np.arange(1, tallest)) ** 2, np.geomspace(1 / MAX_ASPECT_RATIO,
                                                                                    MAX_ASPECT_RATIO, 4001)])
        aspects = aspects[(aspects >= 1 / MAX_ASPECT_RATIO) & (aspects <= MAX_ASPECT_RATIO)]
        most = 0
        for aspect in aspects:
            h, w = processor.find_best_resize((1000.0, 1000.0 * float(aspect)), side, patch, processor.downsample_mode,
                                              allow_upscale=True)
            most = max(most, (h // patch) * (w // patch))
        if most < MiniCPMV4_6Adapter._merge(loaded) ** 2:
            raise AdapterError(f"the image processor in {loaded.path} makes slices of {most} patches, less than one "
                               "image token: raise its scale_resolution")
        return most

    def vision_modules(self, loaded: LoadedModel) -> tuple[nn.Module, nn.Module]:
        cfg, model = loaded.config, loaded.model.model
        merge_after = int(cfg.insert_layer_id) if cfg.downsample_mode == "16x" else None
        return SliceTower(model.vision_tower, merge_after), JoinedBlockProjector(model.merger.mlp[0])

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        slices = self._slices(loaded)
        tower, projector = self.vision_modules(loaded)
        # two slices as the processor packs them: a grid of 2 x 2 merge blocks and one of 1 x 2
        m, patch = slices.merge, slices.patch
        grids = [(2 * m, 2 * m), (m, 2 * m)]
        channels = int(loaded.config.vision_config.num_channels)
        total = sum(h * w for h, w in grids)
        pixels = torch.randn(1, channels, patch, total * patch, generator=torch.Generator().manual_seed(0)).numpy()
        scheme = self.scheme(loaded)
        processed = {"pixel_values": pixels, "target_sizes": np.array(grids), "num_patches_per_image": [1, 1],
                     "grids": [[0, 0], [0, 0]]}
        pooled = 4 if tower.merge_after is not None else 1  # the window merger: a token per 2 x 2 patches
        return [*patch_row_stages(tower, projector, slices, processed, pooled),
                spliced_decoder_stage(self.decoder(loaded, scheme), scheme)]

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        slices, token = self._slices(loaded), loaded.tokenizer.image_token
        # the chat template writes the image token once per image; MiniCPMV4_6Processor puts each image's text
        # (``ImageSlices.text``) in its place (a raw prompt's too)
        return PromptLayout(kind="inline", image_token_id=loaded.config.image_token_id,
                            tokens_per_image=slices.max_patches // slices.merge ** 2, image_token=token,
                            chat_parts=chat_template_takes_parts(loaded.tokenizer, token),
                            images_where_written=True, image_tiles=slices)

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        return delta_net_geometry(loaded)

    def decoder(self, loaded: LoadedModel, scheme: PatchRowsScheme) -> SplicingDecoder:
        return delta_net_decoder(loaded)

    def scheme(self, loaded: LoadedModel) -> PatchRowsScheme:
        return PatchRowsScheme(self.geometry(loaded), loaded.config.image_token_id, self._merge(loaded))

    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        """HF generate on our prompt ids with the processor's own packed patches and slice grids, rebuilt from the
        image path's rows (each slice's real patches put back row-major)."""
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if pixel_values is not None:
            inputs.update(self._reference_image_inputs(loaded, input_ids, pixel_values))
        with torch.no_grad():
            out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                        eos_token_id=eos_token_ids, pad_token_id=eos_token_ids[0])
        return out[0, input_ids.shape[1]:].tolist()

    def _reference_image_inputs(self, loaded: LoadedModel, input_ids, pixel_values: dict) -> dict:
        return {"pixel_values": self._reference_pixels(loaded, pixel_values),
                "target_sizes": torch.tensor(patch_grids(pixel_values), dtype=torch.int32)}

    def _reference_pixels(self, loaded: LoadedModel, pixel_values: dict) -> torch.Tensor:
        """The processor's packed ``pixel_values [1, channels, patch, patches x patch]`` back from the rows."""
        patch, channels = int(loaded.config.vision_config.patch_size), int(loaded.config.vision_config.num_channels)
        packed = []
        for row, places, real, (h, w) in zip(pixel_values["pixel_values"], pixel_values[PATCH_POSITIONS],
                                             pixel_values[PATCH_MASK].bool(), patch_grids(pixel_values)):
            kept, places = row[real], places[real]
            raster = kept[torch.argsort(places[:, 0] * w + places[:, 1])]  # row-major over the slice
            packed.append(raster.reshape(-1, channels, patch, patch).permute(1, 2, 0, 3).reshape(channels, patch, -1))
        return torch.cat(packed, dim=-1).unsqueeze(0)


@register
class MiniCPMV4_7Adapter(MiniCPMV4_6Adapter):
    name = "minicpm_v4_7"
    model_types = ("minicpmv4_7",)
    model_classes = {"minicpmv4_7": ("MiniCPMV4_7ForConditionalGeneration", "Qwen3_5TextConfig")}
    description = ("Hugging Face MiniCPMV4_7ForConditionalGeneration (MiniCPM-V 4.6's slices, tower, merger and hybrid "
                   "LM, every crop of an image placed on one canvas of multimodal rotary positions)")

    @staticmethod
    def _check_config(cfg, path: Path) -> None:
        MiniCPMV4_6Adapter._check_config(cfg, path)
        missing = [f"{name}_id" for name in MARKERS if getattr(cfg, f"{name}_id", None) is None]
        if missing:
            raise AdapterError(f"{path}/config.json sets no {', '.join(missing)}: the canvas positions are placed by "
                               "these markers (MiniCPM-V 4.7's conversion stores them); set them to the tokenizer's ids")

    def scheme(self, loaded: LoadedModel) -> CanvasMRopeScheme:
        cfg = loaded.config
        return CanvasMRopeScheme(self.geometry(loaded), cfg.image_token_id, self._merge(loaded),
                                 {name: getattr(cfg, f"{name}_id") for name in MARKERS})

    def _reference_image_inputs(self, loaded: LoadedModel, input_ids, pixel_values: dict) -> dict:
        """MiniCPM-V 4.6's, and which tokens are an image's (without them generate places no canvas)."""
        return {**super()._reference_image_inputs(loaded, input_ids, pixel_values),
                "mm_token_type_ids": (input_ids == loaded.config.image_token_id).to(torch.int32)}
