"""GLM-4.1V, GLM-4.5V, GLM-4.6V and GLM-OCR: ``Glm4vForConditionalGeneration``, ``Glm4vMoeForConditionalGeneration``
(its LM a GLM-4-MoE), ``Glm46VForConditionalGeneration`` (for model type ``glmga`` too, with its own image processor)
and ``GlmOcrForConditionalGeneration``.

Qwen2-VL's image path and prompt (``adapters/qwen2_vl.py``: rows of patches of any image size, one image token per
merge block, multimodal rotary positions made by the ``spliced_mrope`` scheme, which ``get_rope_index`` computes the
same way for images) with its own tower and merger, each followed here as Hugging Face computes it:

- the patch embedding is normed (RMSNorm), then gets the tower's learned ``side x side`` grid of position embeddings
  resampled to each image's grid of patches by ``grid_sample`` (bicubic, corners not aligned, border padding) at the
  patches' centres - the same op in the graph, on the image's own rows and columns read off ``patch_positions`` and
  ``patch_mask``, so images of different sizes share one batch (GLM-OCR's tower has neither: its patches enter the
  blocks as embedded, and its attention norms q and k per head before the rotary);
- after the blocks the projector norms the patches, merges each ``merge x merge`` block by the tower's strided
  convolution (a matmul here: kernel = stride = the block) and runs the SwiGLU merger;
- the LM is GLM-4's (norms after attention and after the MLP; q/k/v biased but in GLM-OCR) with M-RoPE on
  neighbouring channel pairs of part of each head; for text alone the three streams are one and it is a plain
  GLM-4 (GLM-4-MoE).

Video inputs are not supported (GLM writes a timestamp after each frame: ``Glm4vProcessor.replace_video_token``).
"""
from __future__ import annotations

from torch import nn

from ..errors import AdapterError
from . import register
from .base import LoadedModel
from .qwen2_vl import PatchVisionTower, Qwen2VLAdapter, image_grid_sizes


class ResampledGridPatchTower(PatchVisionTower):
    """:class:`PatchVisionTower` with GLM-4V's embedding: the patch embedding normed, plus the learned position grid
    resampled to each image's grid by ``grid_sample`` with the tower's own mode, at each patch's centre in
    [-1, 1] ((place + 0.5) / patches along that side), as ``Glm4vVisionEmbeddings`` does for its flat sequence."""

    def embed(self, pixel_values, patch_positions, patch_mask):
        hidden = super().embed(pixel_values, patch_positions, patch_mask)
        if not hasattr(self.tower, "embeddings"):  # GLM-OCR's tower: neither the norm nor a position grid
            return hidden
        hidden = self.tower.post_conv_layernorm(hidden)
        table = self.tower.embeddings.position_embedding.weight
        side = int(round(table.shape[0] ** 0.5))
        grid = table.reshape(side, side, -1).permute(2, 0, 1).unsqueeze(0).float()  # [1, width, rows, columns]
        size = image_grid_sizes(patch_positions, patch_mask)
        centres = (patch_positions.float() + 0.5) / size.float() * 2 - 1  # (row, column)
        where = centres.flip(-1).unsqueeze(2)  # grid_sample reads (x, y): [images, patches, 1, 2]
        sampled = nn.functional.grid_sample(grid.expand(where.shape[0], -1, -1, -1), where,
                                            mode=self.tower.embeddings.interpolated_method, align_corners=False,
                                            padding_mode="border")  # [images, width, patches, 1]
        return hidden + sampled.squeeze(-1).transpose(1, 2).to(hidden.dtype)


class StridedMergerProjector(nn.Module):
    """image_features [images, patches, width] (the last block's output) -> image_embeds [images, patches / merge²,
    hidden]: the tower's final norm, its ``merge x merge`` strided convolution over each block of consecutive patches
    (a matmul with the kernel laid out as the patches are: row in block, column in block, channel) and the merger."""

    def __init__(self, visual: nn.Module, merge: int, hidden_size: int):
        super().__init__()
        self.norm, self.merger, self.hidden_size = visual.post_layernorm, visual.merger, hidden_size
        conv = visual.downsample
        self.weight = nn.Parameter(conv.weight.detach().permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1))
        self.bias = conv.bias
        self.block = merge * merge

    def forward(self, image_features):
        images, patches, width = image_features.shape
        blocks = self.norm(image_features).reshape(images * patches // self.block, self.block * width)
        return self.merger(nn.functional.linear(blocks, self.weight, self.bias)).reshape(images, -1, self.hidden_size)


@register
class Glm4vAdapter(Qwen2VLAdapter):
    name = "glm4v"
    model_types = ("glm4v", "glm4v_moe", "glm46v", "glmga", "glm_ocr")
    model_classes = {"glm4v": ("Glm4vForConditionalGeneration", "Glm4Config"),
                     "glm46v": ("Glm46VForConditionalGeneration", "Glm4Config"),
                     "glmga": ("Glm46VForConditionalGeneration", "Glm4Config"),  # GLM-4.6V's model, its own processor
                     "glm4v_moe": ("Glm4vMoeForConditionalGeneration", "Glm4MoeConfig"),
                     "glm_ocr": ("GlmOcrForConditionalGeneration", "Glm4Config")}
    # GLM-OCR's q/k/v have no biases (GLM-4's have)
    text_lm_settings = {"glm_ocr": {"attention_bias": False}}
    description = ("Hugging Face Glm4vForConditionalGeneration / Glm4vMoeForConditionalGeneration / "
                   "Glm46VForConditionalGeneration (model types glm46v, glmga) / GlmOcrForConditionalGeneration "
                   "(GLM-4.1V / 4.5V / 4.6V / GLM-OCR: "
                   "a ViT on patches of any image size, GLM-4V's with a bicubically resampled position grid + strided "
                   "merge and SwiGLU merger + a GLM-4 or GLM-4-MoE LM with multimodal rotary positions)")
    default_image_token = "<|image|>"

    def load(self, path):
        loaded = super().load(path)
        # Glmga's torchvision image processor rounds sizes to patch x merge x patch_expand_factor pixels, its Pillow
        # one (the one this build runs, as Hugging Face's own Pillow backend) to patch x merge alone: they agree only
        # at a factor of 1
        expand = getattr(loaded.image_processor, "patch_expand_factor", 1)
        if expand != 1:
            raise AdapterError(f"the image processor in {path} sets patch_expand_factor {expand}: Hugging Face's Pillow "
                               "image processor ignores it (its torchvision one rounds image sizes to it), so the "
                               "two disagree on the image's patches; save it with patch_expand_factor 1")
        return loaded

    @staticmethod
    def _largest_image_pixels(loaded: LoadedModel, largest: int) -> int:
        # Glm4vImageProcessor's smart_resize bounds frames x height x width, a still image being temporal_patch_size
        # frames: its largest image is a half of longest_edge for GLM's two
        return largest // Glm4vAdapter._frames_per_patch(loaded)

    def vision_modules(self, loaded: LoadedModel) -> tuple[nn.Module, nn.Module]:
        visual = loaded.model.model.visual
        return (ResampledGridPatchTower(visual),
                StridedMergerProjector(visual, int(loaded.config.vision_config.spatial_merge_size),
                                       loaded.config.text_config.hidden_size))

    def _text_lm_settings(self, loaded: LoadedModel) -> dict:
        # GLM-4V's text attention makes its heads hidden / heads wide where the config names no head_dim; GLM-4's
        # config would default to 128
        text = loaded.config.text_config
        return {**super()._text_lm_settings(loaded),
                "head_dim": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads}
