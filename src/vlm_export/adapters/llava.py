"""LLaVA: Hugging Face ``LlavaForConditionalGeneration``.

ViT-style vision tower of a fixed input size (CLIP, SigLIP, DINOv2, ViT) -> hidden states of
``vision_feature_layer`` (one layer, or several concatenated) -> the first token dropped for
``vision_feature_select_strategy="default"`` (CLIP's CLS; HF drops it whatever the tower) -> the
multi-modal projector -> one embedding per patch, spliced at the image-token positions of any
Hugging Face causal LM (Llama, Mistral, Qwen2, ...).
"""
from __future__ import annotations

import weakref
from pathlib import Path

import torch
from torch import nn

from ..contract import DecoderGeometry, PromptLayout
from ..contract.spliced import SplicedScheme
from ..errors import AdapterError
from . import register
from .base import (LoadedModel, Stage, VLMAdapter, chat_template_takes_parts, check_image_size,
                   use_saved_chat_template)
from .decoder import greedy_reference, save_language_model, spliced_stages, text_geometry
from .loading import load_hf_parts, load_processor, run_processor


class LlavaVisionEncoder(nn.Module):
    """pixel_values -> the selected hidden states, exactly as LlavaModel.get_image_features."""

    def __init__(self, vision_tower: nn.Module, feature_layer: int | list[int], strategy: str):
        super().__init__()
        self.vision_tower = vision_tower
        self.layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        self.drop_first = strategy == "default"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        picked = [hidden[i][:, 1:] if self.drop_first else hidden[i] for i in self.layers]
        return picked[0] if len(picked) == 1 else torch.cat(picked, dim=-1)


_TOKENS_PER_IMAGE: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()


def has_pixtral_tower(config: dict) -> bool:
    """Whether a LLaVA config's vision tower is Pixtral's (images of any size: the llava_pixtral adapter's)."""
    return (config.get("vision_config") or {}).get("model_type") == "pixtral"


def tower_needs_more_than_pixels(tower: nn.Module) -> list[str]:
    """The inputs a vision tower's forward requires besides ``pixel_values`` (SigLIP 2's NaFlex tower: its patch mask
    and each image's grid), read off its signature."""
    import inspect

    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [name for name, p in inspect.signature(tower.forward).parameters.items()
            if p.default is p.empty and p.kind in kinds and name not in ("self", "pixel_values")]


def tower_tokens(vision: LlavaVisionEncoder, size: int) -> int:
    """Tokens one image becomes, measured once per tower by running it on two blank ``size`` x ``size``
    images, as HF's LLaVA counts them: towers declare their positions many ways (CLIP counts its CLS
    token, SigLIP has none, DINOv2 and ViT interpolate theirs and may add register tokens), and what
    the tower emits is what the processor expands the image token to. A tower that needs more than the pixels
    (SigLIP 2's NaFlex) or does not give each image a row of its own (Pixtral's packs images of any size into one
    sequence) is refused."""
    tower = vision.vision_tower
    if tower not in _TOKENS_PER_IMAGE:
        kind = getattr(tower.config, "model_type", type(tower).__name__)
        needs = tower_needs_more_than_pixels(tower)
        if needs:
            raise AdapterError(f"the {kind!r} vision tower needs {', '.join(needs)} beside the pixels (a tower of "
                               "variable resolution), which a fixed-shape image path of one size does not give: write "
                               "an adapter for it (see docs/adapters.md)")
        weight = next(tower.parameters())
        with torch.no_grad():
            out = vision(torch.zeros(2, 3, size, size, dtype=weight.dtype, device=weight.device))
        if out.dim() != 3 or out.shape[0] != 2:
            raise AdapterError(
                f"the {kind!r} vision tower made {tuple(out.shape)} features for 2 images, not one row of tokens per "
                "image (a variable-resolution tower packs every image into one sequence), which the llava adapter's "
                "fixed-shape image path needs: write an adapter for it (see docs/adapters.md)")
        _TOKENS_PER_IMAGE[tower] = int(out.shape[1])
    return _TOKENS_PER_IMAGE[tower]


def check_feature_layers(layers, tower_layers: int | None, path: Path) -> None:
    """``vision_feature_layer`` (one index or several) must name hidden states the tower has: its
    ``tower_layers`` + 1 (the embeddings' output first), counted from either end."""
    if tower_layers is None:
        return
    for layer in layers if isinstance(layers, (list, tuple)) else [layers]:
        if not -(tower_layers + 1) <= int(layer) <= tower_layers:
            raise AdapterError(
                f"vision_feature_layer {layers} in {Path(path) / 'config.json'} names hidden state {layer}, but the "
                f"{tower_layers}-layer vision tower has {tower_layers + 1} (indices {-(tower_layers + 1)} to "
                f"{tower_layers}): fix the config")


def processor_image_tokens(loaded: LoadedModel, processor_cls, size: tuple[int, int]):
    """(the checkpoint's own processor, the image tokens it writes for a blank image of ``size`` (width, height)),
    or None where the folder has no processor of its own (an image processor alone) or one that leaves the image
    token as written (patch_size unset: the model expanded it, as transformers before 4.47 did): vlm-export then
    writes the model's own count itself."""
    from PIL import Image

    path, cfg = loaded.path, loaded.config
    if not (path / "processor_config.json").is_file():
        return None
    processor = load_processor(processor_cls, path, cfg.image_token_id)
    if processor.patch_size is None:
        return None
    ids = run_processor(processor, path, text=f"{processor.image_token} probe",
                        images=Image.new("RGB", size))["input_ids"][0]
    return processor, sum(1 for i in ids if i == cfg.image_token_id)


def reference_image_kwargs(loaded: LoadedModel) -> dict:
    """What HF's generate is given besides the pixels: one feature layer as a one-item list, since transformers
    asks the tower for hidden states only where vision_feature_layer is truthy, so at 0 (the embeddings' output)
    its own forward fails."""
    layer = loaded.config.vision_feature_layer
    return {"vision_feature_layer": [layer]} if isinstance(layer, int) else {}


def check_llava_parts(loaded: LoadedModel, strategy: str | None = None) -> None:
    """What LLaVA and LLaVA-NeXT checkpoints share: a feature selection Hugging Face knows (``strategy``: the config's
    ``vision_feature_select_strategy`` where None), feature layers the tower has, an image token inside the LM's
    embeddings; the tokenizer gets the processor's chat template."""
    cfg, path, tokenizer = loaded.config, loaded.path, loaded.tokenizer
    strategy = cfg.vision_feature_select_strategy if strategy is None else strategy
    if strategy not in ("default", "full"):
        raise AdapterError(
            f"vision_feature_select_strategy {strategy!r} in {path} is not supported (expected 'default' or 'full')"
        )
    check_feature_layers(cfg.vision_feature_layer, getattr(cfg.vision_config, "num_hidden_layers", None), path)
    vocab = cfg.text_config.vocab_size
    if not 0 <= cfg.image_token_id < vocab:
        raise AdapterError(
            f"image_token_id {cfg.image_token_id} in {Path(path) / 'config.json'} is outside the language model's "
            f"{vocab} token embeddings (Hugging Face's own forward fails on it): the image token was added to "
            "the tokenizer without model.resize_token_embeddings(len(tokenizer)); resize and save again")
    # what the processor's apply_chat_template renders with (llava-hf folders ship the processor's template beside
    # a tokenizer that may carry its own text-only one)
    use_saved_chat_template(tokenizer, path)


@register
class LlavaAdapter(VLMAdapter):
    name = "llava"
    model_types = ("llava",)
    description = ("Hugging Face LlavaForConditionalGeneration (CLIP, SigLIP, ViT or DINOv2 tower + MLP projector + "
                   "any HF causal LM)")

    @classmethod
    def handles(cls, config: dict) -> bool:
        return not has_pixtral_tower(config)  # images of any size: adapters/pixtral.py

    @classmethod
    def refusal(cls, config: dict) -> str:
        return "llava takes towers of a fixed input size"

    #: the Hugging Face class of the whole model
    model_cls = "LlavaForConditionalGeneration"

    @staticmethod
    def feature_strategy(config) -> str:
        """Whether the projector reads each selected layer's first row too ("full") or not ("default")."""
        return config.vision_feature_select_strategy

    def load(self, path: Path) -> LoadedModel:
        import transformers

        model, tokenizer, processor = load_hf_parts(getattr(transformers, self.model_cls), path)
        loaded = LoadedModel(self, Path(path), model, tokenizer, processor, model.config)
        check_llava_parts(loaded, self.feature_strategy(model.config))
        cfg = model.config
        check_image_size(loaded, (cfg.vision_config.image_size,) * 2)
        self._check_processor_tokens(loaded, self.tokens_per_image(loaded))  # refuses a tower without one row per image
        return loaded

    @staticmethod
    def _check_processor_tokens(loaded: LoadedModel, rows: int) -> None:
        """A checkpoint's own LlavaProcessor writes each image token out as its patch_size,
        num_additional_image_tokens and vision_feature_select_strategy count; Hugging Face's forward
        refuses a count other than the tower's ("Image features and image tokens do not match"), so
        such a checkpoint is refused here too. A folder with no processor of its own (an image
        processor alone), or one that leaves the token as written (patch_size unset: the model
        expanded it, as transformers before 4.47 did), gets vlm-export's expansion to the tower's count."""
        from transformers import LlavaProcessor

        path, cfg = loaded.path, loaded.config
        size = cfg.vision_config.image_size
        probed = processor_image_tokens(loaded, LlavaProcessor, (size, size))
        if probed is None or probed[1] == rows:
            return
        processor, written = probed
        patch, strategy = cfg.vision_config.patch_size, loaded.adapter.feature_strategy(cfg)
        extra = rows + (strategy == "default") - (size // patch) ** 2  # the tower's tokens past its patches (CLS)
        fix = (f"patch_size {patch}, num_additional_image_tokens {extra}, vision_feature_select_strategy "
               f"{strategy!r}" if extra >= 0 else "the values that give the tower's count")
        raise AdapterError(
            f"the LlavaProcessor in {path} writes {written} image tokens per image (patch_size {processor.patch_size}, "
            f"num_additional_image_tokens {processor.num_additional_image_tokens}, vision_feature_select_strategy "
            f"{processor.vision_feature_select_strategy!r}) but the vision tower gives {rows} features for a "
            f"{size}x{size} image; Hugging Face's generate refuses this checkpoint too: set {fix} in "
            "processor_config.json")

    @staticmethod
    def vision_encoder(loaded: LoadedModel) -> LlavaVisionEncoder:
        cfg = loaded.config
        return LlavaVisionEncoder(loaded.model.model.vision_tower, cfg.vision_feature_layer,
                                  loaded.adapter.feature_strategy(cfg))

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        m = loaded.model
        return spliced_stages(loaded, self.scheme(loaded), self.vision_encoder(loaded), m.model.multi_modal_projector,
                              loaded.config.vision_config.image_size, m.model.language_model)

    def scheme(self, loaded: LoadedModel) -> SplicedScheme:
        return SplicedScheme(self.geometry(loaded), loaded.config.image_token_id)

    def tokens_per_image(self, loaded: LoadedModel) -> int:
        return tower_tokens(self.vision_encoder(loaded), loaded.config.vision_config.image_size)

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        token = loaded.tokenizer.convert_ids_to_tokens(loaded.config.image_token_id)
        return PromptLayout(kind="inline", image_token_id=loaded.config.image_token_id,
                            tokens_per_image=self.tokens_per_image(loaded), image_token=token,
                            chat_parts=chat_template_takes_parts(loaded.tokenizer, token), images_where_written=True)

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        return text_geometry(loaded.config.text_config, loaded.model.model.language_model)

    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        inputs = reference_image_kwargs(loaded) if pixel_values is not None else {}
        return greedy_reference(loaded.model, input_ids, pixel_values, max_new_tokens, eos_token_ids, **inputs)

    def write_text_model(self, loaded: LoadedModel, out: Path) -> Path:
        return save_language_model(loaded, out)
