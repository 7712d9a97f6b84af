"""Prefix fusion: pooled vision output -> MLP -> N prefix embeddings prepended to the text.

This file is also the worked example of writing an adapter (see docs/adapters.md, "Adding an
architecture"): a small model class a user composes from Hugging Face parts, its folder format,
and the adapter that splits it.

Folder format (``PrefixVLM.save_pretrained`` writes it, ``from_pretrained`` reads it)::

    config.json               {"model_type": "prefix_vlm", "num_prefix_tokens": 8,
                               "projector_hidden_size": 512, "projector_act": "gelu",
                               "vision_model": "vision", "text_model": "text"}
    projector.safetensors     fc1.weight, fc1.bias, fc2.weight, fc2.bias
    vision/                   a CLIPVisionModel folder (save_pretrained)
    text/                     an AutoModelForCausalLM folder (save_pretrained)
    tokenizer files           the text model's tokenizer (AutoTokenizer.save_pretrained)
    preprocessor_config.json  the image processor (e.g. CLIPImageProcessor.save_pretrained)

``vision_model`` / ``text_model`` are paths relative to the folder (or absolute), so a model can
reference sub-models stored elsewhere.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..contract import DecoderGeometry, PromptLayout
from ..contract.spliced import SplicedScheme
from ..errors import ModelLoadError
from . import read_config, register
from .base import LoadedModel, Stage, VLMAdapter, save_causal_lm
from .decoder import SplicingDecoder, image_path_stages, spliced_decoder_stage, text_geometry
from .loading import load_hf_parts

MODEL_TYPE = "prefix_vlm"


class PrefixProjector(nn.Module):
    def __init__(self, vision_hidden: int, hidden: int, text_hidden: int, num_tokens: int, act: str):
        super().__init__()
        self.num_tokens, self.text_hidden = num_tokens, text_hidden
        self.fc1 = nn.Linear(vision_hidden, hidden)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(hidden, num_tokens * text_hidden)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(pooled)))
        return out.reshape(pooled.shape[0], self.num_tokens, self.text_hidden)


class PrefixVLM(nn.Module):
    """A CLIP vision model + an MLP + any causal LM, images as a prefix of N embeddings."""

    def __init__(self, vision, text, num_prefix_tokens: int, projector_hidden_size: int,
                 projector_act: str = "gelu"):
        super().__init__()
        self.vision, self.text = vision, text
        self.config = {
            "model_type": MODEL_TYPE,
            "num_prefix_tokens": num_prefix_tokens,
            "projector_hidden_size": projector_hidden_size,
            "projector_act": projector_act,
            "vision_model": "vision",
            "text_model": "text",
        }
        self.projector = PrefixProjector(vision.config.hidden_size, projector_hidden_size,
                                         text.config.hidden_size, num_prefix_tokens, projector_act)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projector(self.vision(pixel_values).pooler_output)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        text = self.text.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return text
        prefix = self.encode_images(pixel_values)  # [images, N, hidden]; one image per row of the batch
        return torch.cat([prefix.reshape(text.shape[0], -1, text.shape[-1]), text], dim=1)

    def forward(self, input_ids, pixel_values=None, **kwargs):
        embeds = self.embed(input_ids, pixel_values)
        return self.text(inputs_embeds=embeds, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, pixel_values=None, **kwargs):
        """New tokens only (HF returns only new tokens when given inputs_embeds)."""
        embeds = self.embed(input_ids, pixel_values)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        return self.text.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)

    def save_pretrained(self, path: Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.vision.save_pretrained(path / "vision")
        self.text.save_pretrained(path / "text")
        save_file({k: v.contiguous() for k, v in self.projector.state_dict().items()}, path / "projector.safetensors")
        (path / "config.json").write_text(json.dumps(self.config, indent=2))

    @classmethod
    def from_pretrained(cls, path: Path, dtype=torch.float32, attn_implementation: str | None = None,
                        experts_implementation: str | None = None):
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, CLIPVisionModel

        path = Path(path)
        cfg = read_config(path)
        missing = [k for k in ("num_prefix_tokens", "projector_hidden_size") if k not in cfg]
        if missing:
            raise ModelLoadError(f"{path / 'config.json'} lacks {', '.join(missing)} (prefix_vlm format: see docs/adapters.md)")
        kw = {"dtype": dtype} | ({"attn_implementation": attn_implementation} if attn_implementation else {})
        vision = CLIPVisionModel.from_pretrained(path / cfg.get("vision_model", "vision"), **kw)
        text = AutoModelForCausalLM.from_pretrained(  # a mixture-of-experts LM: experts as load_hf_parts asks
            path / cfg.get("text_model", "text"), **kw,
            **({"experts_implementation": experts_implementation} if experts_implementation else {}))
        model = cls(vision, text, cfg["num_prefix_tokens"], cfg["projector_hidden_size"],
                    cfg.get("projector_act", "gelu"))
        model.config.update({k: cfg[k] for k in ("vision_model", "text_model") if k in cfg})
        model.projector.load_state_dict(load_file(path / "projector.safetensors"))
        return model.to(dtype)


class PooledVisionEncoder(nn.Module):
    def __init__(self, vision: nn.Module):
        super().__init__()
        self.vision = vision

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values).pooler_output


@register
class PrefixAdapter(VLMAdapter):
    name = "prefix"
    model_types = (MODEL_TYPE,)
    description = "prefix fusion: CLIP pooled output -> MLP -> N embeddings before the text (PrefixVLM)"

    def load(self, path: Path) -> LoadedModel:
        model, tokenizer, processor = load_hf_parts(PrefixVLM, path)
        return LoadedModel(self, Path(path), model, tokenizer, processor, model.config)

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        m = loaded.model
        scheme = self.scheme(loaded)
        # the causal LM's own forward makes the logits (None: no head applied apart), as its generate's are
        decoder = SplicingDecoder(m.text.get_input_embeddings(), m.text, None, scheme.image_token_id,
                                  scheme.geometry.num_layers)
        size = m.vision.config.image_size
        return [*image_path_stages(PooledVisionEncoder(m.vision), m.projector, (size, size)),
                spliced_decoder_stage(decoder, scheme)]

    def scheme(self, loaded: LoadedModel) -> SplicedScheme:
        # the placeholder lies outside the vocabulary, so it can never collide with a text token
        return SplicedScheme(self.geometry(loaded), loaded.model.text.config.vocab_size)

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        return PromptLayout(kind="prefix", image_token_id=self.scheme(loaded).image_token_id,
                            tokens_per_image=loaded.config["num_prefix_tokens"])

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        return text_geometry(loaded.model.text.config, loaded.model.text)

    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        n_prefix = 0 if pixel_values is None else pixel_values.shape[0] * loaded.config["num_prefix_tokens"]
        out = loaded.model.generate(
            input_ids[:, n_prefix:], pixel_values, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=eos_token_ids, pad_token_id=eos_token_ids[0],
        )
        return out[0].tolist()

    def write_text_model(self, loaded: LoadedModel, out: Path) -> Path:
        # the text model already is a causal LM; rebuilt from its config like any other adapter's,
        # so what is written is what the build exported (a merged LoRA included)
        text = loaded.model.text
        return save_causal_lm(text.config, text.base_model, text.get_output_embeddings(), loaded.tokenizer, out,
                              getattr(text, "generation_config", None))
