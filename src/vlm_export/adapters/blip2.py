"""BLIP-2: Hugging Face ``Blip2ForConditionalGeneration`` with a decoder-only language model (one
with an encoder-decoder LM, Flan-T5, is ``blip2_t5.py``'s: the two tell their configs apart by
``use_decoder_only_language_model``, see ``handles``).

Q-Former fusion: the ViT's last hidden states -> a small BERT-like transformer whose
``num_query_tokens`` learned queries cross-attend to them -> ``language_projection`` -> one
embedding per query, spliced where the processor put its ``num_query_tokens`` image tokens (in
front of the tokenized text) into any Hugging Face causal LM (OPT, Llama, ...).

Stages: ``vision_encoder`` and ``qformer`` (Q-Former + projection, its own graph so it gets its own
precision), then the spliced ``lm_decoder``. The Q-Former stays fp32 under a blanket
``--precision fp16``, as Hugging Face keeps it (``_keep_in_fp32_modules``): its post-attention
LayerNorms see activations that lose the image detail in fp16. Name it to convert it anyway.

The prompt is built exactly as ``Blip2Processor`` builds it (plain text, the tokenizer's own
special tokens, the image tokens in front); loading checks that against the processor itself, so
a processor that would not expand the image tokens is a load error, not a misplaced image.
"""
from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..contract import DecoderGeometry, PromptLayout
from ..contract.spliced import SplicedScheme
from ..errors import AdapterError
from ..runtime.prompt import build_prompt_ids
from . import register
from .base import LoadedModel, Stage, VLMAdapter, check_image_size
from .decoder import SplicingDecoder, image_path_stages, spliced_decoder_stage, text_geometry
from .loading import load_hf_parts, load_processor, run_processor

PROBE_PROMPT = "Question: what is in the picture? Answer:"


class VisionEncoder(nn.Module):
    """pixel_values -> the vision model's last hidden states (post-LayerNorm), as get_image_features."""

    def __init__(self, vision_model: nn.Module):
        super().__init__()
        self.vision_model = vision_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision_model(pixel_values, return_dict=True).last_hidden_state


class QFormerProjector(nn.Module):
    """image_features -> the queries' Q-Former output -> language_projection -> [images, queries, text hidden]."""

    def __init__(self, query_tokens: nn.Parameter, qformer: nn.Module, language_projection: nn.Module):
        super().__init__()
        self.query_tokens = query_tokens
        self.qformer = qformer
        self.language_projection = language_projection

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        queries = self.query_tokens.expand(image_features.shape[0], -1, -1)
        image_mask = torch.ones(image_features.shape[:-1], dtype=torch.long, device=image_features.device)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_features,
                           encoder_attention_mask=image_mask, return_dict=True).last_hidden_state
        return self.language_projection(out)


def decoder_only_lm(config: dict) -> bool:
    """Whether a BLIP-2-style config.json has a decoder-only language model: its own
    ``use_decoder_only_language_model``, else the rule its config class applies (the text model's
    type is a causal LM's)."""
    if config.get("use_decoder_only_language_model") is not None:
        return bool(config["use_decoder_only_language_model"])
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return (config.get("text_config") or {}).get("model_type", "opt") in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


class QFormerAdapterBase(VLMAdapter):
    """What BLIP-2 and InstructBLIP share: the load checks, the decoder, the prompt and the reference."""

    model_cls: ClassVar[str]
    processor_cls: ClassVar[str]
    #: one image per prompt: the processor puts one set of query tokens in front of the text
    max_images = 1
    #: the kind of language model this adapter takes (blip2_t5.py takes the encoder-decoder ones)
    decoder_only: ClassVar[bool] = True

    @classmethod
    def handles(cls, config: dict) -> bool:
        return decoder_only_lm(config) == cls.decoder_only

    @classmethod
    def refusal(cls, config: dict) -> str:
        kind = "a decoder-only" if decoder_only_lm(config) else "an encoder-decoder"
        takes = "decoder-only LMs (OPT, Llama, ...)" if cls.decoder_only else "encoder-decoder LMs (T5)"
        text = (config.get("text_config") or {}).get("model_type", "?")
        return f"it has {kind} language model ({text}); {cls.name} takes {takes}"

    def load(self, path: Path) -> LoadedModel:
        import transformers

        model, tokenizer, image_processor = load_hf_parts(getattr(transformers, self.model_cls), path)
        cfg = model.config
        if bool(cfg.use_decoder_only_language_model) != self.decoder_only:
            raise AdapterError(f"{path}: {self.refusal(cfg.to_dict())} - leave --adapter out to pick the adapter "
                               "from config.json")
        if cfg.image_token_id is None:
            raise AdapterError(f"{path / 'config.json'} has no image_token_index: this checkpoint predates image "
                               "tokens; re-save it with a current transformers and a processor with num_query_tokens")
        processor = load_processor(getattr(transformers, self.processor_cls), path)
        loaded = LoadedModel(self, Path(path), model, tokenizer, image_processor, cfg, processor=processor,
                             image_text_tokenizer=getattr(processor, "qformer_tokenizer", None))
        self._check_image_text_tokenizer(loaded)
        self._check_processor(loaded)
        check_image_size(loaded, self.image_size(loaded))
        return loaded

    @staticmethod
    def _check_image_text_tokenizer(loaded: LoadedModel) -> None:
        """The Q-Former's own tokenizer (InstructBLIP's) must write ids its text embeddings have: a folder
        without its qformer_tokenizer/ makes transformers fall back to the LM's tokenizer, whose ids run past
        them (HF's own forward then fails with an index error on the first prompt)."""
        tok, qformer = loaded.image_text_tokenizer, loaded.config.qformer_config
        if tok is None or len(tok) <= qformer.vocab_size:
            return
        missing = "" if (loaded.path / "qformer_tokenizer").is_dir() else " (the folder has no qformer_tokenizer/: " \
            "transformers loaded the language model's tokenizer in its place)"
        raise AdapterError(f"the Q-Former tokenizer in {loaded.path} has {len(tok)} tokens but the Q-Former embeds "
                           f"{qformer.vocab_size}{missing}; save the processor with its own qformer_tokenizer "
                           "(processor.save_pretrained)")

    def _check_processor(self, loaded: LoadedModel) -> None:
        """Our prompt ids must be the processor's own, image tokens included."""
        from PIL import Image

        processor, cfg = loaded.processor, loaded.config
        if processor.num_query_tokens != cfg.num_query_tokens:
            expands = (f"expands {processor.num_query_tokens} image tokens" if processor.num_query_tokens is not None
                       else "sets no num_query_tokens (an old processor: it writes no image tokens)")
            raise AdapterError(
                f"the processor in {loaded.path} {expands} but the model has {cfg.num_query_tokens} queries; "
                f"set num_query_tokens={cfg.num_query_tokens} in its processor_config.json")
        probe = dict(images=[Image.new("RGB", (8, 8))], text=PROBE_PROMPT)
        theirs = run_processor(processor, loaded.path, **probe)["input_ids"][0]
        ours = build_prompt_ids(loaded.tokenizer, self.prompt_layout(loaded), PROBE_PROMPT, 1)
        if list(theirs) != ours:
            found = sum(1 for t in theirs if t == cfg.image_token_id)
            raise AdapterError(
                f"the processor in {loaded.path} lays out the prompt differently from the model's config: it puts "
                f"{found} image token(s) of id {cfg.image_token_id} where the model expects {cfg.num_query_tokens} in "
                "front of the text; check the tokenizer's image token and the config's image_token_index")

    def stages(self, loaded: LoadedModel) -> list[Stage]:
        return [*self.image_stages(loaded), *self.language_stages(loaded)]

    def image_stages(self, loaded: LoadedModel) -> list[Stage]:
        """The image path: ``vision_encoder`` and ``qformer`` (which each model reads in its own way)."""
        raise NotImplementedError

    def language_stages(self, loaded: LoadedModel) -> list[Stage]:
        """The language model's stages: one spliced decoder here (``blip2_t5.T5LanguageModel``: a T5's two)."""
        return [self.decoder_stage(loaded)]

    def decoder_stage(self, loaded: LoadedModel) -> Stage:
        lm = loaded.model.language_model
        scheme = self.scheme(loaded)
        # Blip2ForConditionalGeneration calls the causal LM itself: its forward makes the logits
        decoder = SplicingDecoder(lm.get_input_embeddings(), lm, None, scheme.image_token_id,
                                  scheme.geometry.num_layers)
        return spliced_decoder_stage(decoder, scheme)

    def image_size(self, loaded: LoadedModel) -> tuple[int, int]:
        size = loaded.config.vision_config.image_size
        return size, size

    def scheme(self, loaded: LoadedModel) -> SplicedScheme:
        return SplicedScheme(self.geometry(loaded), loaded.config.image_token_id)

    def prompt_layout(self, loaded: LoadedModel) -> PromptLayout:
        # the processor: plain text (no chat template) with the tokenizer's special tokens, queries in front
        return PromptLayout(kind="prefix", image_token_id=loaded.config.image_token_id,
                            tokens_per_image=loaded.config.num_query_tokens, use_chat_template=False,
                            add_special_tokens=True)

    def geometry(self, loaded: LoadedModel) -> DecoderGeometry:
        return text_geometry(loaded.config.text_config, loaded.model.language_model)

    def generation_config(self, loaded: LoadedModel):
        # BLIP-2's and InstructBLIP's generate end in language_model.generate: the LM's config rules, not
        # the top-level one (which a checkpoint's generation_config.json may set differently)
        return loaded.model.language_model.generation_config

    def reference_generate(self, loaded, input_ids, pixel_values, max_new_tokens, eos_token_ids, prompt=""):
        """HF generate on inputs the model's own processor builds from the prompt text (our pixels:
        the same image processor made them). Text-only prompts go to the language model itself,
        as BLIP-2's generate needs an image."""
        from PIL import Image

        common = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=eos_token_ids,
                      pad_token_id=eos_token_ids[0])
        with torch.no_grad():
            if pixel_values is None:
                out = loaded.model.language_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                                           **common)
                return out[0, input_ids.shape[1]:].tolist()
            blank = [Image.new("RGB", (8, 8))] * pixel_values.shape[0]  # only the processor's text output is used
            inputs = loaded.processor(images=blank, text=prompt, return_tensors="pt")
            inputs["pixel_values"] = pixel_values
            out = loaded.model.generate(**inputs, **common)
        return out[0, inputs["input_ids"].shape[1]:].tolist()


@register
class Blip2Adapter(QFormerAdapterBase):
    name = "blip2"
    model_types = ("blip-2",)
    description = "Hugging Face Blip2ForConditionalGeneration (ViT + Q-Former + any decoder-only HF LM: OPT, Llama, ...)"
    model_cls = "Blip2ForConditionalGeneration"
    processor_cls = "Blip2Processor"

    def image_stages(self, loaded: LoadedModel) -> list[Stage]:
        m = loaded.model
        qformer = QFormerProjector(m.query_tokens, m.qformer, m.language_projection)
        return image_path_stages(VisionEncoder(m.vision_model), qformer, self.image_size(loaded),
                                 projector_name="qformer", projector_follows_default=False)
